#!/usr/bin/env python
"""Static fit check: every Triton kernel launch the training presets can make, compiled for its GPU
without one, with its shared memory, registers, spills, tensor-core instruction and occupancy.

    python bench/ada.py --arch sm_89 --json bench/results/ada-DATE.json   # RTX 40xx; prints the table
    python bench/ada.py --arch all --json PATH                            # sm_80, sm_86, sm_89, sm_90
    python bench/ada.py --arch sm_89,sm_90 --models d12                   # a subset
    python bench/ada.py --markdown PATH [--arch sm_89]                    # the "Ada fit" section, printed
    python bench/ada.py --markdown PATH --out docs/ada-fit.md             # ... as the document README links to

Exit status 1 when any launch does not fit (shared memory over the per-block limit, spilled registers,
a bf16 tl.dot that did not become a tensor-core instruction); the table and the JSON name it.

What is compiled: the launches themselves, not a copy of the tables. For every GPU preset of
tritonrun.presets.PRESETS whose GPU has the architecture (GPU_PRESETS below) and every GPT-2 size
(--models, default d12 d24 d36 d48 from gpt2.config.MODEL_SIZES), each kernel file's host code is
called on CPU tensors of the training shapes (rows = micro-batch x seq_len, the micro-batch
train_speedrun.py derives for d12 under --backend triton on the preset's card, C = n_embd, H = n_head,
D = 64) and dtypes (bf16 autocast: bf16 matmul outputs, fp32 residual stream, params and grads), the
way the model and trainer call it, while each kernel file is told it runs on that GPU (its device
lookup is patched to return the preset's architecture and SM count; `drive_*` below, one per kernel
file). Every `kernel[grid](...)` launch is intercepted before anything would reach CUDA and turned
into what JITFunction.run would compile: Triton's own argument binder specializes the real arguments
(dtypes, 16-byte alignment, integers divisible by 16 or equal to 1) and `_pack_args` gives signature,
constexprs, attributes and options (num_warps / num_stages as the launcher passes them, Triton's
defaults otherwise). So the configs, the constexpr variants and even constants written inline in a
launcher (layernorm's dweight/dbias block, attention's delta block, AdamW's finalize block) come from
the kernel files. Attention (triton.autotune) and cross-entropy (tritonrun/kernels/tune.py) are autotuned on a
GPU: every config of their autotune spaces (TUNE_SPACE, the table entry first) is recorded, since the
autotuner may pick any of them there.
Distinct launches are compiled once (in --jobs processes, with Triton's on-disk cache).

Covered: attention fwd / bwd delta / bwd dK,dV / bwd dQ (bf16 q, k, v in the model's strided layout);
layernorm fwd and bwd for layer_norm (fp32, ln_1 of block 0) and add_layer_norm (bf16 branch + fp32
residual; with and without the residual's gradient, the latter for ln_f) and the dweight/dbias
reduction, at every C; gelu fwd/bwd (bf16, 4C wide); cross-entropy fwd / dh / dW (bf16 h and weight,
as autocast casts them; dh writes bf16 or, when the vocab is split over programs, fp32 partials), plain and
with the speedrun recipe's logit softcap 30 (SOFTCAP is a constexpr: separate kernels);
AdamW update for fp32 params (what training uses), bf16 params + fp32 masters (round to nearest and
stochastic rounding), and the clip kernels (grad sum of squares, norm finalize), with the real
model's parameter count and groups; for the speedrun model (issue 26) rmsnorm fwd / bwd / mix bwd / lambdas
reduction for rms_norm (fp32 embeddings), add_rms_norm (bf16 branch + fp32 residual, with and without s's
gradient) and mix_rms_norm (fp32 x, x0, lambdas), relu2 fwd/bwd (bf16, 4C wide), at every C; and rope (the
speedrun's QK-norm + RoPE, tritonrun/kernels/rope.py) fwd and bwd at d12 with the speedrun's 6 heads of 128 (bf16 q, k);
window_attention (issue 27, tritonrun/kernels/window_attention.py) fwd / bwd dK,dV / bwd dQ (+ attention's delta kernel)
at d12 with 6 heads of 128, B = 1 packed sequence of T = 65,536 and 16,384, windows 64 and 1,792 (one record
per kernel: the window is not specialized on).
fp32-input fallbacks (attention's FP32_CONFIG, cross-entropy's "fp32" overrides) are not launched by any
preset and stay checked by the kernels' own tests.

sm_86 (the rtx3090 preset) has no table entry of its own in any kernel: it gets what each kernel's
own lookup gives a capability-8.6 device, which is what will run there -- attention and cross-entropy
map 8.6 to their sm_89 tables (same 101,376 B per block), layernorm, gelu, adamw, rmsnorm and relu2 to their
"default" tables. The sm_80 tables are not used for 8.6: they are sized for 166,912 B per block.

Registers and spills: `ptxas -v` on the kernel's PTX, with the ptxas Triton itself picks for the
architecture (triton/backends/nvidia/bin/ptxas, ptxas-blackwell for sm_90) and the flags Triton's
make_cubin passes (-lineinfo, --regAllocOptLevel=2, --fmad=false without fp fusion,
--gpu-name=sm_90a for Hopper); cached beside the kernel in Triton's cache. Shared memory is the
compiled kernel's metadata.shared (the dynamic shared memory a launch requests). mma: the distinct
tensor-core instructions in the PTX (mma.sync.aligned..., wgmma.mma_async...), "none" if absent;
dot_inputs: element types of the tt.dot operands in the TTIR (bf16 dots must use tensor cores).

Theoretical occupancy (CUDA's occupancy calculator, cuda_occupancy.h), per SM, W = num_warps:
    regs_per_warp   = ceil(registers * 32 / 256) * 256                   (allocation unit 256 registers)
    blocks_regs     = floor(floor(65536 / 4 / regs_per_warp) * 4 / W)     (64K registers, split over the
                                                                          4 sub-partitions; 0 if a block
                                                                          needs more than 64K)
    blocks_shared   = floor(shared_per_sm / (ceil(shared / 128) * 128 + 1024))   (128 B unit; 1 KB is
                                                                          reserved per block since sm_80)
    blocks_warps    = floor(max_warps / W)
    blocks_per_sm   = min(blocks_regs, blocks_shared, blocks_warps, max_blocks)
    warps_per_sm    = blocks_per_sm * W;  occupancy = warps_per_sm / max_warps
    limiter         = the term(s) equal to the minimum: registers | shared | warps | blocks
with ARCHS below: shared_per_sm (largest carveout) sm_80 167,936 B (164 KB), sm_86 / sm_89 102,400 B
(100 KB), sm_90 233,472 B (228 KB) -- each minus the 1 KB reserve is the per-block limit (166,912 /
101,376 / 232,448 B); max_warps 64 / 48 / 48 / 64; max_blocks 32 / 16 / 24 / 32 (CUDA's table of
compute capabilities). Persistent kernels (cross-entropy dh/dW) choose their own program count; the
figure is still what the SM could hold.

Record (JSON: a list, one per distinct launch per architecture):
    kernel        "<kernel file>.<jit function>", e.g. "attention._attn_fwd"
    config        the kernel's tl.constexpr parameters, then warps= and stages=; launches that differ
                  only in argument specialization append the differing arguments in [...]
    arch          sm_80 | sm_86 | sm_89 | sm_90;  table: the kernel's config-table key that served it
    shared_bytes, shared_limit (per block), registers (per thread), spill_bytes (= spill_stores +
                  spill_loads), mma, dot_inputs, occupancy (fraction), warps_per_sm, blocks_per_sm,
                  limiter, num_warps, num_stages, fits (bool), problems (why not), error (compile/ptxas)
    constexprs, signature ("*bf16/16": 16-byte aligned pointer, "i32/16": divisible by 16, "=1": an
                  argument equal to 1, compiled in as a constant),
    used_by ("preset/model: variant" that launch it), triton, ptxas, commit (+ "-dirty")
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# First, before any import: this checkout's tritonrun first, and bench/ (sys.path[0] when a script here runs) out,
# so bench/kernels.py never becomes the top-level `kernels` (Hugging Face's package of that name, which
# transformers imports).
sys.path[:] = [str(REPO)] + [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from unittest import mock  # noqa: E402

from tritonrun.kernels.aot import cached_ptxas_stats, mma_instructions, ptxas_info  # noqa: E402
from tritonrun.runinfo import reports_write_failures  # noqa: E402

# ------------------------------------------------------------------------------------- hardware


@dataclass(frozen=True)
class ArchLimits:
    cc: int  # compute capability as Triton's GPUTarget wants it (89 = 8.9)
    shared_per_block: int  # bytes, the opt-in maximum one block may request
    shared_per_sm: int  # bytes, the largest shared-memory carveout of the SM (includes 1 KB per block reserve)
    max_warps: int  # resident warps per SM
    max_blocks: int  # resident blocks per SM


ARCHS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits(80, 166_912, 167_936, 64, 32),  # A100
    "sm_86": ArchLimits(86, 101_376, 102_400, 48, 16),  # RTX 30xx
    "sm_89": ArchLimits(89, 101_376, 102_400, 48, 24),  # Ada: RTX 40xx
    "sm_90": ArchLimits(90, 232_448, 233_472, 64, 32),  # H100 / H200
}
REGS_PER_SM = 65_536
REG_ALLOC_UNIT = 256  # registers, per warp
SUB_PARTITIONS = 4  # the register file is split over the SM's 4 schedulers
SHARED_ALLOC_UNIT = 128  # bytes
SHARED_RESERVED_PER_BLOCK = 1024  # bytes, from sm_80 on


def _gpu_presets() -> dict[str, tuple[str, int]]:
    from tritonrun.presets import PRESETS

    return {name: (p.arch, p.sm_count) for name, p in PRESETS.items() if p.arch is not None}


# The GPU of each CUDA preset of tritonrun.presets.PRESETS: (architecture, SM count), the presets' hardware facts.
GPU_PRESETS: dict[str, tuple[str, int]] = _gpu_presets()
GPT2_MODELS = ("d12", "d24", "d36", "d48")  # gpt2.config.MODEL_SIZES names of the GPT-2 family


def occupancy(arch: str, num_warps: int, registers: int, shared_bytes: int) -> dict:
    """Theoretical occupancy of one kernel on one SM of `arch` (the formula in the module docstring)."""
    a = ARCHS[arch]
    regs_per_warp = -(-registers * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    if regs_per_warp * num_warps > REGS_PER_SM:
        by_regs = 0
    else:
        by_regs = (REGS_PER_SM // SUB_PARTITIONS // max(regs_per_warp, 1)) * SUB_PARTITIONS // num_warps
    smem = -(-shared_bytes // SHARED_ALLOC_UNIT) * SHARED_ALLOC_UNIT + SHARED_RESERVED_PER_BLOCK
    limits = {"registers": by_regs, "shared": a.shared_per_sm // smem, "warps": a.max_warps // num_warps,
              "blocks": a.max_blocks}
    blocks = min(limits.values())
    return {"occupancy": blocks * num_warps / a.max_warps, "warps_per_sm": blocks * num_warps,
            "blocks_per_sm": blocks, "limiter": "+".join(k for k, v in limits.items() if v == blocks)}


# ---------------------------------------------------------------------------------- launch capture


@dataclass(frozen=True)
class Case:
    """One (preset, model) the presets can run: the shapes and dtypes the kernels see."""
    preset: str
    arch: str
    sms: int
    model: str
    rows: int  # micro-batch x seq_len
    batch: int
    seq_len: int
    n_embd: int
    n_head: int
    low: object  # torch dtype of matmul outputs: bf16 under bf16 autocast
    grad_clip: float

    @property
    def cc(self) -> tuple[int, int]:
        n = ARCHS[self.arch].cc
        return n // 10, n % 10


def launch_micro_batch(preset: str) -> int:
    """The micro-batch of the preset's cases: the one train_speedrun.py derives for GPT-2 d12 under --backend triton
    on that card (tritonrun.memory.fit_preset, cached; the run that launches these kernels), used for every model
    size as a shape, not a claim that the bigger models fit at it."""
    from tritonrun.memory import derived_micro_batch

    return derived_micro_batch(preset, "gpt2", "d12", "triton") or 1


def cases_for(arch: str, models=GPT2_MODELS, presets=None) -> list[Case]:
    import torch
    from tritonrun.defaults import RUN_DEFAULTS
    from tritonrun.gpt2.config import MODEL_SIZES
    from tritonrun.presets import PRESETS
    from tritonrun.recipes import get_recipe

    gpt2 = get_recipe("gpt2").defaults(on_gpu=True)
    T = RUN_DEFAULTS["seq_len"]
    out = []
    for name, (gpu_arch, sms) in GPU_PRESETS.items():
        if gpu_arch != arch or (presets and name not in presets):
            continue
        p = PRESETS[name]
        low = {"bf16": torch.bfloat16, "fp32": torch.float32}[p.dtype]
        B = launch_micro_batch(name)
        for model in models:
            m = MODEL_SIZES[model]
            out.append(Case(name, arch, sms, model, B * T, B, T, m.n_embd, m.n_head, low, gpt2["grad_clip"]))
    return out


class Recorder:
    """Collects the distinct kernel launches of the drivers for one architecture, as JITFunction.run
    would compile them (triton 3.9: its binder, then _pack_args), without a driver or a GPU."""

    def __init__(self, arch: str):
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend

        self.arch = arch
        self.backend = make_backend(GPUTarget("cuda", ARCHS[arch].cc, 32))
        self.launches: dict[str, dict] = {}
        self._binders: dict[int, object] = {}
        self._where = ""  # "preset/model: variant" of the launches being recorded
        self._table = ""

    @contextlib.contextmanager
    def variant(self, case: Case, what: str, table: str):
        self._where, self._table = f"{case.preset}/{case.model}: {what}", table
        try:
            yield
        finally:
            self._where = ""

    def add(self, fn, args: tuple, kwargs: dict) -> None:
        from triton import knobs
        from triton.runtime.jit import create_function_from_signature

        kwargs = dict(kwargs)
        # as JITFunction.run does before binding
        kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
        # launch options JITFunction.run adds; which exist depends on the Triton version
        for knob in ("instrumentation_mode", "fpsan_homomorphic_casts"):
            if hasattr(knobs.compilation, knob):
                kwargs[knob] = getattr(knobs.compilation, knob)
        binder = self._binders.get(id(fn))
        if binder is None:
            binder = self._binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self.backend)
        bound, specialization, opts = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(self.backend, kwargs, bound, specialization, opts)
        module = fn.fn.__module__
        names = fn.arg_names
        declared = {names[p.num]: constexprs[(p.num,)] for p in fn.params if p.is_constexpr}
        sig = {}
        for i, name in enumerate(names):
            if signature[name] == "constexpr":
                sig[name] = f"={constexprs[(i,)]}" if name not in declared else "constexpr"
            else:
                div = any(a == ["tt.divisibility", 16] for a in attrs.get((i,), []))
                sig[name] = signature[name] + ("/16" if div else "")
        job = {"module": module, "fn": fn.__name__, "cc": ARCHS[self.arch].cc, "signature": signature,
               "constexprs": [[list(k), v] for k, v in constexprs.items()],
               "attrs": [[list(k), v] for k, v in attrs.items()], "options": options.__dict__}
        key = json.dumps(job, sort_keys=True, default=str)
        entry = self.launches.get(key)
        if entry is None:
            entry = self.launches[key] = {
                "kernel": f"{module.rsplit('.', 1)[-1]}.{fn.__name__}", "arch": self.arch, "table": self._table,
                "constexprs": declared, "num_warps": options.num_warps, "num_stages": options.num_stages,
                "signature": sig, "used_by": [], "job": job}
        if self._where not in entry["used_by"]:
            entry["used_by"].append(self._where)

    def intercept(self, module) -> contextlib.ExitStack:
        """Route every `kernel[grid](...)` of `module`'s @triton.jit functions to `add` (nothing runs)."""
        from triton.runtime.jit import JITFunction

        fns = [fn for fn in vars(module).values() if isinstance(fn, JITFunction)]
        if not fns:
            raise RuntimeError(f"{module.__name__} has no JITFunction: was it imported with TRITON_INTERPRET=1?")
        stack = contextlib.ExitStack()
        for fn in fns:
            def run(*args, grid, warmup, _fn=fn, **kwargs):
                self.add(_fn, args, kwargs)
            stack.enter_context(mock.patch.object(fn, "run", run, create=True))
        return stack


def _device_capability(case: Case):
    """torch.cuda.get_device_capability answering for the case's GPU (for kernels that ask torch)."""
    return mock.patch("torch.cuda.get_device_capability", lambda device=None: case.cc)


# ------------------------------------------------------------------ drivers: one per kernel file
# Each calls its kernel file's host code the way the model/trainer do, on CPU tensors (torch.empty:
# never touched, so large shapes cost nothing), with the kernel file's device lookup answering for the
# case's GPU. No kernel runs: the launches are recorded.


def drive_attention(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.kernels import attention as attn

    B, T, C, H = case.batch, case.seq_len, case.n_embd, case.n_head
    D = C // H

    class Tuner:  # stands in for attn._autotuned(...): records every config the autotuner may pick
        def __init__(self, kind, arch, d):
            self.tuner = real_autotuned(kind, arch, d)

        def __getitem__(self, grid):
            return lambda *args, **kw: [rec.add(self.tuner.fn, args, {**kw, **cfg.all_kwargs()})
                                        for cfg in self.tuner.configs]

    real_autotuned = attn._autotuned
    with contextlib.ExitStack() as stack:
        stack.enter_context(rec.intercept(attn))
        stack.enter_context(_device_capability(case))
        stack.enter_context(mock.patch.object(attn, "_check", lambda *a: None))  # refuses CPU tensors
        stack.enter_context(mock.patch.object(attn, "_autotuned", Tuner))
        stack.enter_context(mock.patch.dict(os.environ, {"TRITONRUN_AUTOTUNE": "1"}))
        # GPT-2's heads (D = C / n_head = 64), and at d12 the speedrun-dense model's 6 heads of 128 (its dense
        # causal attention; the windowed model's D = 128 is drive_window_attention's)
        shapes = [(H, D)] + ([(C // SPEEDRUN_HEAD_DIM, SPEEDRUN_HEAD_DIM)] if case.model == "d12" else [])
        for h, d in shapes:
            with rec.variant(case, f"causal attention B={B} H={h} T={T} D={d}", attn.arch_key(case.cc)):
                # the models' layout: q, k, v are (B, H, T, D) views of (B, T, H, D) projections (bf16)
                qkv = torch.empty(B, T, 3 * C, dtype=case.low)
                q, k, v = (t.view(B, T, h, d).transpose(1, 2).requires_grad_() for t in qkv.split(C, dim=2))
                o = attn.causal_attention(q, k, v)
                do = torch.empty(B, T, h, d, dtype=case.low).transpose(1, 2)  # grad of y.transpose(1, 2)
                torch.autograd.grad(o, (q, k, v), do)


def drive_layernorm(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.kernels import layernorm as ln

    B, T, C = case.batch, case.seq_len, case.n_embd
    f32 = torch.float32
    table = case.arch if case.arch in ln.CONFIGS else "default"  # ln.get_config's lookup
    leaf = lambda dt: torch.empty(B, T, C, dtype=dt).requires_grad_()  # noqa: E731
    params = lambda: (torch.empty(C, dtype=f32).requires_grad_(), torch.empty(C, dtype=f32).requires_grad_())  # noqa: E731
    grad = lambda: torch.empty(B, T, C, dtype=f32)  # noqa: E731  (y, s are fp32: their grads too)
    with rec.intercept(ln), mock.patch.object(ln, "_device_arch_and_sms", lambda device: (case.arch, case.sms)):
        with rec.variant(case, "layer_norm (block 0 ln_1: fp32 embeddings)", table):
            x, (w, b) = leaf(f32), params()
            torch.autograd.grad(ln.layer_norm(x, w, b), (x, w, b), grad())
        with rec.variant(case, "add_layer_norm (bf16 branch + fp32 residual; y and s used)", table):
            x, r, (w, b) = leaf(case.low), leaf(f32), params()
            y, s = ln.add_layer_norm(x, r, w, b)
            torch.autograd.grad((y, s), (x, r, w, b), (grad(), grad()))
        with rec.variant(case, "add_layer_norm (ln_f: s unused)", table):
            x, r, (w, b) = leaf(case.low), leaf(f32), params()
            y, _ = ln.add_layer_norm(x, r, w, b)
            torch.autograd.grad(y, (x, r, w, b), grad())


def drive_gelu(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.kernels import gelu as ge

    table = case.arch if case.arch in ge.CONFIGS else "default"  # ge.get_config's lookup
    with rec.intercept(ge), mock.patch.object(ge, "_arch", lambda device: case.arch), \
            rec.variant(case, "gelu on c_fc's bf16 output (B, T, 4C)", table):
        x = torch.empty(case.batch, case.seq_len, 4 * case.n_embd, dtype=case.low).requires_grad_()
        torch.autograd.grad(ge.gelu(x), x, torch.empty_like(x))


def drive_cross_entropy(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.gpt2.config import MODEL_SIZES
    from tritonrun.kernels import cross_entropy as ce

    m = MODEL_SIZES[case.model]
    with _device_capability(case):
        table = ce.arch_key(torch.device("cuda"))

    def choose(kind, h, weight, vocab_size, launch, softcap=None):  # stands in for ce._choose, the autotuner
        if h.dtype != torch.float32:  # fp32 is never tuned (ce._autotuning)
            for cfg in ce.TUNE_SPACE[table][kind]:  # any of these may be picked on a GPU: record each launch
                launch(cfg)
        return ce.get_config(h.device, h.dtype)[kind]  # the table (arch_key is patched to it below)

    with contextlib.ExitStack() as stack:
        stack.enter_context(rec.intercept(ce))
        stack.enter_context(mock.patch.object(ce, "_check", lambda *a: None))  # refuses CPU tensors
        stack.enter_context(mock.patch.object(ce, "arch_key", lambda device: table))
        stack.enter_context(mock.patch.object(ce, "_sm_count", lambda device: case.sms))
        stack.enter_context(mock.patch.object(ce, "_choose", choose))
        # plain (the gpt2 recipe) and with the speedrun recipe's logit softcap 30 (a constexpr: its own kernels)
        for softcap in (None, 30.0):
            what = f"LM head + CE, N={case.rows} (bf16 h, weight: autocast)" + (f", softcap {softcap:g}"
                                                                               if softcap else "")
            with rec.variant(case, what, table):
                # under autocast linear_cross_entropy casts h (ln_f output) and the tied wte to bf16 first
                h = torch.empty(case.rows, m.n_embd, dtype=case.low).requires_grad_()
                w = torch.empty(m.padded_vocab_size, m.n_embd, dtype=case.low).requires_grad_()
                targets = torch.zeros(case.rows, dtype=torch.int64)
                loss = ce.linear_cross_entropy(h, w, targets, -1, m.vocab_size, softcap=softcap)
                torch.autograd.grad(loss, (h, w))


def drive_adamw(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.gpt2 import GPT
    from tritonrun.gpt2.config import MODEL_SIZES
    from tritonrun.kernels import adamw

    from tritonrun.recipes import get_recipe

    gpt2 = get_recipe("gpt2").defaults(on_gpu=True)  # the recipe that runs AdamW: its decay, lr and betas
    with torch.device("meta"):  # the real parameter list and groups, no memory
        groups = GPT(MODEL_SIZES[case.model]).param_groups(gpt2["weight_decay"])
    table = case.arch if case.arch in adamw.CONFIGS else "default"  # adamw.launch_config's lookup
    variants = [("fp32 params (training: fp32 masters, bf16 autocast)", torch.float32, False),
                ("bf16 params + fp32 masters (FusedAdamW option)", torch.bfloat16, False),
                ("bf16 params + fp32 masters + stochastic rounding (FusedAdamW option)", torch.bfloat16, True)]
    with rec.intercept(adamw), mock.patch.object(adamw, "_arch", lambda device: case.arch):
        for what, dtype, stochastic in variants:
            with rec.variant(case, what, table):
                # one small CPU tensor per model parameter: the compiled kernels depend on the tensor count
                # and dtype (the chunk tables are data), not on the sizes
                params = [[torch.zeros(16, dtype=dtype) for _ in g["params"]] for g in groups]
                for t in (t for ts in params for t in ts):
                    t.grad = torch.zeros_like(t)
                opt = adamw.FusedAdamW([{"params": ps, "weight_decay": g["weight_decay"]}
                                        for ps, g in zip(params, groups)],
                                       lr=gpt2["lr"], betas=(gpt2["beta1"], gpt2["beta2"]),
                                       eps=1e-8,  # as tritonrun/training.py
                                       master_weights=True, stochastic_rounding=stochastic)
                if case.grad_clip > 0:
                    opt.clip_grad_norm_(case.grad_clip)
                opt.step()


# ---- rope (issue 26: the speedrun model's QK-norm + RoPE, tritonrun/kernels/rope.py) ----
SPEEDRUN_HEAD_DIM = 128  # modded-nanogpt's 2024-11-10 record: 6 heads of 128 at n_embd 768 (d12)


def drive_rope(rec: Recorder, case: Case) -> None:
    """qk_norm_rope forward + backward at the speedrun model's attention input: d12 only (the record's model is
    d12-sized; the other GPT-2 sizes have no speedrun variant), H = 768 / 128 = 6, D = 128, bf16 q and k as the
    c_q / c_k outputs (B, T, H, D), their grads as attention returns them ((B, H, T, D) views of (B, T, H, D)
    memory), fp32 tables."""
    import torch

    from tritonrun.kernels import rope

    if case.model != "d12":
        return
    B, T, D = case.batch, case.seq_len, SPEEDRUN_HEAD_DIM
    H = case.n_embd // D
    table = case.arch if case.arch in rope.CONFIGS else "default"  # rope.get_config's lookup
    with contextlib.ExitStack() as stack:
        stack.enter_context(rec.intercept(rope))
        stack.enter_context(mock.patch.object(rope, "_arch", lambda device: case.arch))
        stack.enter_context(mock.patch.object(rope, "_check", lambda *a: None))  # refuses CPU tensors
        stack.enter_context(rec.variant(case, f"qk_norm_rope (speedrun) B={B} T={T} H={H} D={D}", table))
        q, k = (torch.empty(B, T, H, D, dtype=case.low).requires_grad_() for _ in range(2))
        cos, sin = torch.empty(T, D // 2), torch.empty(T, D // 2)
        q2, k2 = rope.qk_norm_rope(q, k, cos, sin, 1e-6)
        grads = [torch.empty(B, T, H, D, dtype=case.low).transpose(1, 2) for _ in range(2)]
        torch.autograd.grad((q2, k2), (q, k), grads)



# ---- issue 26's speedrun ops (tritonrun/kernels/rmsnorm.py, tritonrun/kernels/relu2.py) ----------------------
# The speedrun model (2024-11-10 record) at each case's training shape, with bf16 autocast's dtypes: fp32
# embeddings into the first norm, bf16 branch outputs added to the fp32 residual stream, the fp32 stream and
# x0 mixed by fp32 lambdas, ReLU^2 on c_fc's bf16 (B, T, 4C) output.


def drive_rmsnorm(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.kernels import rmsnorm as rn

    B, T, C, f32 = case.batch, case.seq_len, case.n_embd, torch.float32
    table = case.arch if case.arch in rn.CONFIGS else "default"  # rn.get_config's lookup
    leaf = lambda dt: torch.empty(B, T, C, dtype=dt).requires_grad_()  # noqa: E731
    grad = lambda: torch.empty(B, T, C, dtype=f32)  # noqa: E731  (y, s are fp32: their grads too)
    with rec.intercept(rn), mock.patch.object(rn, "_arch", lambda device: case.arch):
        with rec.variant(case, "rms_norm (the fp32 embeddings)", table):
            x = leaf(f32)
            torch.autograd.grad(rn.rms_norm(x), x, grad())
        with rec.variant(case, "add_rms_norm (bf16 branch + fp32 residual; y and s used)", table):
            x, r = leaf(case.low), leaf(f32)
            torch.autograd.grad(rn.add_rms_norm(x, r), (x, r), (grad(), grad()))
        with rec.variant(case, "add_rms_norm (final norm: s unused)", table):
            x, r = leaf(case.low), leaf(f32)
            torch.autograd.grad(rn.add_rms_norm(x, r)[0], (x, r), grad())
        with rec.variant(case, "mix_rms_norm (fp32 stream x and x0, fp32 lambdas; y and s used)", table):
            x, x0, lam = leaf(f32), leaf(f32), torch.empty(2, dtype=f32).requires_grad_()
            torch.autograd.grad(rn.mix_rms_norm(x, x0, lam), (x, x0, lam), (grad(), grad()))


def drive_relu2(rec: Recorder, case: Case) -> None:
    import torch

    from tritonrun.kernels import relu2 as r2

    table = case.arch if case.arch in r2.CONFIGS else "default"  # r2.get_config's lookup
    with rec.intercept(r2), mock.patch.object(r2, "_arch", lambda device: case.arch), \
            rec.variant(case, "relu2 on c_fc's bf16 output (B, T, 4C)", table):
        x = torch.empty(case.batch, case.seq_len, 4 * case.n_embd, dtype=case.low).requires_grad_()
        torch.autograd.grad(r2.relu2(x), x, torch.empty_like(x))
# ---- end of issue 26's speedrun ops ----------------------------------------------------------------------------


# ---- window_attention (issue 27: document-masked sliding-window attention, tritonrun/kernels/window_attention.py) ----
WINDOW_SEQ_LENS = (65_536, 16_384)  # the packed sequence (one per micro-batch, B = 1) and a quarter of it
WINDOW_SIZES = (64, 1_792)  # the 2024-11-24 record's window schedule ends: both must be ONE compiled kernel


def drive_window_attention(rec: Recorder, case: Case) -> None:
    """window_attention forward + backward at the speedrun's attention shape, independent of the preset's
    seq_len: B = 1 packed sequence of T in WINDOW_SEQ_LENS tokens, 6 heads of 128 (d12 only, as rope), bf16
    q, k, v as (B, H, T, D) views of (B, T, H, D) memory, 40 documents, each window of WINDOW_SIZES. The
    window is a runtime argument: the launches of both windows must merge into one record per kernel."""
    import torch

    from tritonrun.kernels import window_attention as wa

    if case.model != "d12":
        return
    D = SPEEDRUN_HEAD_DIM
    H = case.n_embd // D
    with contextlib.ExitStack() as stack:
        stack.enter_context(rec.intercept(wa))
        stack.enter_context(_device_capability(case))
        stack.enter_context(mock.patch.object(wa, "_check", lambda *a: None))  # refuses CPU tensors
        for T in WINDOW_SEQ_LENS:
            cu = torch.linspace(0, T, 41).round().to(torch.int32)
            for window in WINDOW_SIZES:
                with rec.variant(case, f"window attention B=1 H={H} T={T} D={D} window={window}",
                                 wa.arch_key(case.cc)):
                    q, k, v = (torch.empty(1, T, H, D, dtype=case.low).transpose(1, 2).requires_grad_()
                               for _ in range(3))
                    o = wa.window_attention(q, k, v, cu, window)
                    torch.autograd.grad(o, (q, k, v), torch.empty(1, T, H, D, dtype=case.low).transpose(1, 2))
# ---- end of window_attention ----------------------------------------------------------------------------------


# ---- fp8 (issue 35: the FP8 matmuls of modded-nanogpt's record #89, tritonrun/kernels/fp8.py) ----------------------
FP8_ARCHS = ("sm_89", "sm_90")  # FP8 tensor cores: Ada and Hopper; the sm_80 / sm_86 presets never launch these


def drive_fp8(rec: Recorder, case: Case) -> None:
    """fp8_linear forward + backward (quantize bf16 activations, fp32 weights and bf16 output grads; the scaled
    matmuls e4m3 x e4m3 -> bf16, e5m2 x e4m3 -> bf16 (dx) and e5m2^T x e4m3 -> fp32 (dw)) at d12's three FP8
    products: the MLP's up (C -> 4C) and down (4C -> C) projections and the LM head (C -> 50,304), at 8,192 rows (a
    packed micro-batch; the row count is a runtime argument, specialized only on its divisibility by 16)."""
    import torch

    from tritonrun.kernels import fp8

    if case.model != "d12" or case.arch not in FP8_ARCHS:
        return
    table = case.arch if case.arch in fp8.MM_CONFIGS else "default"
    C, rows = case.n_embd, 8_192
    with rec.intercept(fp8), mock.patch.object(fp8, "_arch", lambda device: case.arch):
        for what, (n_out, n_in) in (("MLP up", (4 * C, C)), ("MLP down", (C, 4 * C)), ("LM head", (50_304, C))):
            with rec.variant(case, f"fp8_linear {what} ({rows} x {n_in} -> {n_out})", table):
                x = torch.empty(rows, n_in, dtype=torch.bfloat16).requires_grad_()
                w = torch.empty(n_out, n_in, dtype=torch.float32).requires_grad_()
                y = fp8.fp8_linear(x, w, 1.0, 1.0, 1.0)
                torch.autograd.grad(y, (x, w), torch.empty_like(y))


def drive_bigram(rec: Recorder, case: Case) -> None:
    """Record #89's bigram hash embedding (issue 35, tritonrun/kernels/bigram.py) forward + backward at its shape:
    one packed sequence of 8,192 tokens, the 377,280 x 768 bf16 table and 8,192 x 768 bf16 signs (d12 only)."""
    import torch

    from tritonrun.kernels import bigram as bg

    if case.model != "d12":
        return
    with rec.intercept(bg), mock.patch.object(bg, "_arch", lambda device: case.arch), \
            mock.patch("torch.ops.aten.embedding_dense_backward", lambda g, idx, rows, *a: g.new_empty(rows, 768)), \
            rec.variant(case, "bigram_embed (8,192 ids, 377,280 x 768 bf16 table)", "default"):
        x = torch.empty(8_192, dtype=torch.long)
        table = torch.empty(377_280, 768, dtype=torch.bfloat16).requires_grad_()
        signs = torch.empty(8_192, 768, dtype=torch.bfloat16)
        out = bg.bigram_embed(x, table, signs)
        torch.autograd.grad(out, table, torch.empty_like(out))


def drive_mlp_relu2(rec: Recorder, case: Case) -> None:
    """Record #89's fused ReLU² MLP step (issue 35, tritonrun/kernels/mlp_relu2.py) at d12: the up projection with
    its relu^2 epilogue in bf16 and, on FP8 architectures, with e4m3 operands emitting the e4m3 post and partial
    maxima; the backward's 2 (g W2) sqrt(post) epilogue; 8,192 rows (a packed micro-batch)."""
    import torch

    from tritonrun.kernels import mlp_relu2 as mr

    if case.model != "d12":
        return
    table = case.arch if case.arch in mr.CONFIGS else "default"
    C, H, rows = case.n_embd, 4 * case.n_embd, 8_192
    with rec.intercept(mr), mock.patch.object(mr, "_arch", lambda device: case.arch):
        with rec.variant(case, f"linear_relu2 bf16 ({rows} x {C} -> {H}) and its backward", table):
            x, w1 = torch.empty(rows, C, dtype=torch.bfloat16), torch.empty(H, C, dtype=torch.bfloat16)
            post, _, _ = mr.linear_relu2(x, w1.t())
            mr.relu2_grad_matmul(torch.empty(rows, C, dtype=torch.bfloat16), torch.empty(C, H, dtype=torch.bfloat16),
                                 post)
        if case.arch in FP8_ARCHS:
            with rec.variant(case, f"linear_relu2 fp8 ({rows} x {C} -> {H}, e4m3 post out)", table):
                e4 = torch.float8_e4m3fn
                one = torch.ones(1)
                mr.linear_relu2(torch.empty(rows, C, dtype=e4), torch.empty(H, C, dtype=e4).t(), one, one)


def drive_mtp_head(rec: Recorder, case: Case) -> None:
    """Record #89's fused LM head loss (issue 35, tritonrun/kernels/mtp_head.py) at d12: 4,096 rows (a packed
    micro-batch of the 12 GB plan), the transposed 768 x 50,304 bf16 head, K = 3, 2, 1 multi-token-prediction targets
    (a constexpr: one kernel set per stage) with the prefix term; forward, dh and dW."""
    import torch

    from tritonrun.kernels import cross_entropy as ce
    from tritonrun.kernels import mtp_head as mh
    from tritonrun.kernels.target import arch_key, capability_of

    if case.model != "d12":
        return
    table = arch_key(capability_of(case.arch))
    with rec.intercept(mh), mock.patch.object(mh, "_check", lambda *a: None), \
            mock.patch.object(mh, "_arch", lambda device: table), \
            mock.patch.object(ce, "_sm_count", lambda device: case.sms):
        for k in (3, 2, 1):
            with rec.variant(case, f"MTP head K={k} + prefix, 4,096 rows, 768 x 50,304 bf16", table):
                h = torch.empty(4_096, 768, dtype=torch.bfloat16).requires_grad_()
                w = torch.empty(768, 50_304, dtype=torch.bfloat16).requires_grad_()
                t = torch.zeros(4_096, dtype=torch.long)
                losses = mh.mtp_head_loss(h, w, t, torch.ones(k), t, torch.tensor(0.25))
                torch.autograd.grad(losses, (h, w), torch.empty_like(losses))


DRIVERS = {"attention": drive_attention, "layernorm": drive_layernorm, "gelu": drive_gelu,
           "cross_entropy": drive_cross_entropy, "adamw": drive_adamw}
DRIVERS.update(rmsnorm=drive_rmsnorm, relu2=drive_relu2, rope=drive_rope)  # issue 26's speedrun ops
DRIVERS.update(window_attention=drive_window_attention)  # issue 27
DRIVERS.update(fp8=drive_fp8, bigram=drive_bigram, mlp_relu2=drive_mlp_relu2, mtp_head=drive_mtp_head)  # issue 35


# ----------------------------------------------------------------------------------- compile + ptxas

_DOT = re.compile(r"tt\.dot\b.*?:\s*tensor<(?:\d+x)+([A-Za-z]\w*)[^>]*>\s*\*\s*tensor<(?:\d+x)+([A-Za-z]\w*)")


def compile_job(job: dict) -> dict:
    """Compile one recorded launch for its architecture; shared bytes, ptxas numbers, mma, dot inputs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(job["module"]), job["fn"])
    src = ASTSource(fn, job["signature"], {tuple(k): v for k, v in job["constexprs"]},
                    {tuple(k): v for k, v in job["attrs"]})
    try:
        kernel = triton.compile(src, target=GPUTarget("cuda", job["cc"], 32), options=dict(job["options"]))
    except Exception as e:  # noqa: BLE001 - reported in the record, named by kernel and config
        return {"error": f"compile failed: {type(e).__name__}: {str(e).strip()[:500]}"}
    ptx = kernel.asm["ptx"]
    try:
        stats = cached_ptxas_stats(kernel, job["cc"], job["options"]["enable_fp_fusion"])
    except RuntimeError as e:
        return {"shared_bytes": kernel.metadata.shared, "error": str(e)}
    dots = sorted({t for pair in _DOT.findall(kernel.asm["ttir"]) for t in pair})
    return {"shared_bytes": kernel.metadata.shared, **stats,
            "mma": ", ".join(mma_instructions(ptx)) or "none", "dot_inputs": dots}


# ------------------------------------------------------------------------------------ records


def fit_problems(r: dict) -> list[str]:
    """Why a record does not fit its architecture (empty: it fits)."""
    if r.get("error"):
        return [r["error"]]
    out = []
    if r["shared_bytes"] > r["shared_limit"]:
        out.append(f"shared memory {r['shared_bytes']} B > {r['shared_limit']} B per block")
    if r["spill_bytes"]:
        out.append(f"register spills: {r['spill_stores']} B stored, {r['spill_loads']} B loaded "
                   f"({r['registers']} registers)")
    if "bf16" in r["dot_inputs"]:
        ok = ("mma.sync" in r["mma"] or (r["arch"] == "sm_90" and "wgmma" in r["mma"])) and "bf16" in r["mma"]
        if not ok:
            out.append(f"bf16 tl.dot without a bf16 tensor-core instruction (mma: {r['mma']})")
    if any(t.startswith("f8") for t in r["dot_inputs"]):  # TTIR f8E4M3FN / f8E5M2 operands
        ok = ("mma.sync" in r["mma"] or (r["arch"] == "sm_90" and "wgmma" in r["mma"])) and \
            ("e4m3" in r["mma"] or "e5m2" in r["mma"])
        if not ok:
            out.append(f"fp8 tl.dot without an fp8 tensor-core instruction (mma: {r['mma']})")
    return out


def _config_strings(entries: list[dict]) -> None:
    """config = constexprs + warps/stages; launches equal in that get the differing arguments appended."""
    for e in entries:
        cx = " ".join(f"{k}={v}" for k, v in e["constexprs"].items())
        e["config"] = f"{cx} warps={e['num_warps']} stages={e['num_stages']}".strip()
    groups: dict[tuple, list[dict]] = {}
    for e in entries:
        groups.setdefault((e["kernel"], e["arch"], e["config"]), []).append(e)
    for same in groups.values():
        if len(same) > 1:
            names = [n for n in same[0]["signature"] if len({e["signature"][n] for e in same}) > 1]
            for e in same:
                e["config"] += " [" + " ".join(f"{n}:{e['signature'][n]}" for n in names) + "]"


def collect(archs: list[str], models=GPT2_MODELS, presets=None, kernels=None, jobs: int = 2,
            log=print) -> list[dict]:
    """Drive, compile and measure every launch; one record per (arch, distinct launch)."""
    from concurrent.futures import ProcessPoolExecutor

    import triton

    from tritonrun.runinfo import git_commit

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("bench/ada.py compiles real kernels: run it without TRITON_INTERPRET=1")
    entries = []
    for arch in archs:
        rec = Recorder(arch)
        cases = cases_for(arch, models, presets)
        if not cases:
            raise ValueError(f"no GPU preset of tritonrun.presets.PRESETS has {arch} (GPU_PRESETS)")
        for case in cases:
            for name, drive in DRIVERS.items():
                if kernels is None or name in kernels:
                    drive(rec, case)
        entries += rec.launches.values()
        log(f"{arch}: {len(rec.launches)} distinct launches from {len(cases)} preset/model cases")
    _config_strings(entries)
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max(1, jobs)) as pool:
        results = list(pool.map(compile_job, [e["job"] for e in entries]))
    log(f"compiled {len(entries)} kernels in {time.perf_counter() - t0:.1f} s ({jobs} processes)")
    commit, dirty = git_commit()
    import platform

    import torch

    host = {"torch": torch.__version__, "python": platform.python_version()}  # the host that compiled the record
    records = []
    for e, res in zip(entries, results):
        arch = e["arch"]
        r = {"kernel": e["kernel"], "config": e["config"], "arch": arch, "table": e["table"],
             "shared_bytes": res.get("shared_bytes"), "shared_limit": ARCHS[arch].shared_per_block,
             "registers": res.get("registers"), "spill_bytes": None, "spill_stores": res.get("spill_stores"),
             "spill_loads": res.get("spill_loads"), "mma": res.get("mma"), "dot_inputs": res.get("dot_inputs", []),
             "occupancy": None, "warps_per_sm": None, "blocks_per_sm": None, "limiter": None,
             "num_warps": e["num_warps"], "num_stages": e["num_stages"], "error": res.get("error")}
        if r["spill_stores"] is not None:
            r["spill_bytes"] = r["spill_stores"] + r["spill_loads"]
        if r["registers"] is not None:
            r.update(occupancy(arch, e["num_warps"], r["registers"], r["shared_bytes"]))
        r["problems"] = fit_problems(r)
        if r["registers"] is None and not r["error"]:
            r["problems"].append("registers and spills not checked: triton bundles no ptxas here")
        r["fits"] = not r["problems"]
        r.update(constexprs=e["constexprs"], signature=e["signature"], used_by=e["used_by"],
                 triton=triton.__version__, ptxas=ptxas_info(ARCHS[arch].cc)[1], torch=host["torch"],
                 python=host["python"], commit=commit + ("-dirty" if dirty else ""))
        records.append(r)
    order = {name: i for i, name in enumerate(DRIVERS)}
    records.sort(key=lambda r: (list(ARCHS).index(r["arch"]), order.get(r["kernel"].split(".")[0], 99),
                                r["kernel"], r["config"]))
    return records


# ------------------------------------------------------------------------------------ output


def short_mma(mma: str | None) -> str:
    """'mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32' -> 'mma.sync m16n8k16 bf16'; wgmma shapes joined by +."""
    if not mma or mma == "none":
        return mma or "-"
    groups: dict[tuple[str, str], list[str]] = {}
    for ins in mma.split(", "):
        parts = ins.split(".")
        op = "wgmma" if parts[0] == "wgmma" else "mma.sync"
        shape = next((p for p in parts if re.fullmatch(r"m\d+n\d+k\d+", p)), "?")
        types = "/".join(sorted({p for p in parts if p in ("bf16", "f16", "tf32", "e4m3", "e5m2", "s8")}))
        groups.setdefault((op, types), [])
        if shape not in groups[(op, types)]:
            groups[(op, types)].append(shape)
    return ", ".join(f"{op} {'+'.join(shapes)} {types}".strip() for (op, types), shapes in groups.items())


def occupancy_text(r: dict) -> str:
    if r["occupancy"] is None:
        return "-"
    return f"{100 * r['occupancy']:.0f}% ({r['warps_per_sm']}w, {r['limiter']})"


def print_table(records: list[dict]) -> None:
    head = f"{'arch':<6}{'kernel':<36}{'shared B':>9}{'regs':>5}{'spill':>6}  {'tensor cores':<32}{'occupancy':<29}{'fit':<4} config"
    print(head)
    print("-" * len(head))
    for r in records:
        fit = "ok" if r["fits"] else "NO"
        print(f"{r['arch']:<6}{r['kernel']:<36}{r['shared_bytes'] if r['shared_bytes'] is not None else '-':>9}"
              f"{r['registers'] if r['registers'] is not None else '-':>5}"
              f"{r['spill_bytes'] if r['spill_bytes'] is not None else '-':>6}  {short_mma(r['mma']):<32}"
              f"{occupancy_text(r):<29}{fit:<4} {r['config']}")
    for r in records:
        if not r["fits"]:
            print(f"DOES NOT FIT: {r['arch']} {r['kernel']} {r['config']}: {'; '.join(r['problems'])}")


def merge_specializations(rows: list[dict]) -> list[dict]:
    """One row per (kernel, config): launches that differ only in argument specialization (e.g. H = 16
    divisible by 16 at d24) are merged; numbers that differ become ranges, occupancy is the lowest."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["config"].split(" [")[0]), []).append(r)

    def span(values):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        lo, hi = min(values), max(values)
        return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"

    out = []
    for (kernel, config), same in groups.items():
        worst = min(same, key=lambda r: (r["occupancy"] is not None, r["occupancy"] or 0))
        out.append({"kernel": kernel, "config": config, "launches": len(same), "fits": all(r["fits"] for r in same),
                    "shared": span([r["shared_bytes"] for r in same]), "registers": span([r["registers"] for r in same]),
                    "spills": span([r["spill_bytes"] for r in same]),
                    "mma": ", ".join(dict.fromkeys(short_mma(r["mma"]) for r in same)),
                    "occupancy": occupancy_text(worst),
                    "max_registers": max((r["registers"] for r in same if r["registers"] is not None), default=None)})
    return out


# Registers per thread at or above which a launch has no headroom: another ptxas (a driver's JIT, a Triton
# release) could make it spill. 255 is the hardware maximum.
REGISTER_HEADROOM = 250


def no_headroom(m: dict) -> bool:
    return m.get("max_registers") is not None and m["max_registers"] >= REGISTER_HEADROOM


def markdown(records: list[dict], arch: str = "sm_89", source: str | None = None) -> str:
    """The README "Ada fit" section: the table of `arch`'s launches, generated from a record."""
    rows = [r for r in records if r["arch"] == arch]
    if not rows:
        raise ValueError(f"the record has no {arch} entries (it has: {sorted({r['arch'] for r in records})})")
    lim = ARCHS[arch]
    first = rows[0]
    bad = [r for r in rows if not r["fits"]]
    presets = sorted({u.split("/")[0] for r in rows for u in r["used_by"]})
    models = sorted({u.split("/")[1].split(":")[0] for r in rows for u in r["used_by"]})
    speedrun = sorted({r["kernel"].split(".")[0] for r in rows if r["kernel"].split(".")[0] in SPEEDRUN_KERNELS})
    also = f" and the speedrun model's {', '.join(speedrun)} at d12" if speedrun else ""
    merged = merge_specializations(rows)
    lines = [
        "## Ada fit" if arch == "sm_89" else f"## {arch} fit",
        "",
        f"Every Triton kernel launch that the {', '.join(presets)} preset{'s' if len(presets) > 1 else ''} can make "
        f"({arch}; GPT-2 {', '.join(models)}{also} at their training shapes, bf16 autocast), compiled for {arch} "
        f"without "
        f"a GPU by `python bench/ada.py --arch {arch}` (triton {first['triton']}, ptxas {first['ptxas']}, commit "
        f"`{first['commit'][:10]}`{f'; record `{source}`' if source else ''}). Limits: {lim.shared_per_block:,} B of "
        f"shared memory per block, 255 registers per thread; per SM {REGS_PER_SM // 1024}K registers, "
        f"{lim.shared_per_sm // 1024} KB of shared memory, {lim.max_warps} warps, {lim.max_blocks} blocks. "
        f"Occupancy is theoretical: resident warps per SM / {lim.max_warps} (w = warps, then what limits it). "
        f"Rows merge launches that differ only in argument specialization; ranges show their spread. "
        + (f"**{len(bad)} of {len(rows)} launches do not fit.**" if bad else
           f"All {len(rows)} launches fit: no spills, every bf16 and fp8 `tl.dot` on tensor cores "
           "(checked by `tests/test_ada.py`)."),
        "",
        "| kernel | config | shared B | regs | spill B | tensor cores | occupancy |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    tight = [m for m in merged if no_headroom(m)]
    for m in merged:
        flag = "" if m["fits"] else " **does not fit**"
        regs = f"**{m['registers']}** ⚠" if no_headroom(m) else m["registers"]
        lines.append(f"| `{m['kernel']}` | {m['config']}{flag} | {m['shared']} | {regs} | {m['spills']} "
                     f"| {m['mma']} | {m['occupancy']} |")
    if tight:
        lines += ["", f"⚠ No register headroom ({REGISTER_HEADROOM}+ of 255 per thread, {len(tight)} row"
                      f"{'s' if len(tight) > 1 else ''}): these fit spill-free with this ptxas, but another ptxas "
                      f"(a Triton release, a driver's JIT) could spill them; a spill there is what to check first "
                      f"when one of them slows down."]
    return "\n".join(lines) + "\n"


# Kernels only the speedrun model launches (issues 26-27): named in the document's opening line.
SPEEDRUN_KERNELS = ("rmsnorm", "relu2", "rope", "window_attention", "fp8", "bigram", "mlp_relu2", "mtp_head")


def document(records: list[dict], archs: list[str], source: str, out: str) -> str:
    """docs/ada-fit.md: the fit section of each arch as a page of its own (README links to it and keeps a summary),
    with the command that wrote it, so that it is regenerated, never edited."""
    command = f"python bench/ada.py --markdown {source} --arch {','.join(archs)} --out {out}"
    parts = [f"<!-- generated by `{command}`: edit bench/ada.py, not this file -->", ""]
    for arch in archs:
        parts.append(markdown(records, arch, source=source).replace("## ", "# ", 1))
    parts.append(f"Regenerate: `python bench/ada.py --arch all --json bench/results/ada-<date>.json` compiles every "
                 f"launch (no GPU needed) and writes a record; `{command}` writes this page from it.\n")
    return "\n".join(parts)


# ------------------------------------------------------------------------------------ CLI


def parse_archs(text: str) -> list[str]:
    archs = list(ARCHS) if text == "all" else [a.strip() for a in text.split(",") if a.strip()]
    for a in archs:
        if a not in ARCHS:
            raise SystemExit(f"error: unknown --arch {a!r}: choose from {', '.join(ARCHS)} or all")
    return archs


@reports_write_failures
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Compile every kernel launch the presets can make for a GPU "
                                            "architecture (no GPU needed) and report its resources.")
    p.add_argument("--arch", default="sm_89", help=f"comma list from {', '.join(ARCHS)}, or all (default sm_89)")
    p.add_argument("--json", type=Path, help="write the records (a JSON list) here")
    p.add_argument("--models", default=",".join(GPT2_MODELS), help="GPT-2 sizes (gpt2.config.MODEL_SIZES names)")
    p.add_argument("--presets", help="comma list of GPU presets (default: every preset of each --arch)")
    p.add_argument("--kernels", help=f"comma list from {', '.join(DRIVERS)} (default: all)")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="compile processes")
    p.add_argument("--markdown", type=Path, metavar="RECORD",
                   help="print the fit section for --arch from this record and exit (no compiling)")
    p.add_argument("--out", type=Path, help="with --markdown: write the sections as a document here (docs/ada-fit.md)")
    args = p.parse_args(argv)
    archs = parse_archs(args.arch)
    if args.markdown:
        records = json.loads(args.markdown.read_text())
        try:
            rel = args.markdown.resolve().relative_to(REPO)
        except ValueError:
            rel = args.markdown
        if args.out:
            from tritonrun.runinfo import atomic_write_text

            try:
                out_rel = args.out.resolve().relative_to(REPO)
            except ValueError:
                out_rel = args.out
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(args.out, document(records, archs, str(rel), str(out_rel)))
            print(f"wrote {args.out}")
            return 0
        for arch in archs:
            print(markdown(records, arch, source=str(rel)))
        return 0
    # The kernels must be real JITFunctions: the interpreter flag (set by tests' conftest) must not leak in.
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated (silences its warning)
    split = lambda s: [x.strip() for x in s.split(",") if x.strip()] if s else None  # noqa: E731
    kernels = split(args.kernels)
    for k in kernels or []:
        if k not in DRIVERS:
            raise SystemExit(f"error: unknown --kernels {k!r}: choose from {', '.join(DRIVERS)}")
    t0 = time.perf_counter()
    records = collect(archs, split(args.models), split(args.presets), kernels, args.jobs)
    print_table(records)
    if args.json:
        from tritonrun.runinfo import atomic_write_json

        args.json.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, records)
        print(f"wrote {args.json} ({len(records)} records)")
    bad = [r for r in records if not r["fits"]]
    print(f"{len(records) - len(bad)} of {len(records)} launches fit ({time.perf_counter() - t0:.0f} s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
