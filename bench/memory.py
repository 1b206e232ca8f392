#!/usr/bin/env python
"""Peak memory of one whole training step, estimated without a GPU.

    python bench/memory.py --gpu rtx4070                                  # both backends at the preset's micro-batch
    python bench/memory.py --gpu rtx4070 --backend triton --micro-batch 16 --json est.json
    python bench/memory.py --gpu rtx4070 --micro-batch 16,8 --max --record  # bench/results/memory-rtx4070-<date>.json
    python bench/memory.py --gpu rtx4070 --recipe speedrun --max --record   # memory-speedrun-packed-rtx4070-<date>.json
    python bench/memory.py --gpu rtx4070 --recipe speedrun-dense --max --record  # memory-speedrun-dense-rtx4070-...

What runs. The real GPT-2 (tritonrun/gpt2/model.py) with the preset's model, T and the backend's ops
(tritonrun/gpt2/ops.py), and the real optimizer (the backend's AdamW, as training.Trainer builds it) under torch's
FakeTensorMode: every tensor has a shape, dtype and storage but no data, so nothing is computed and a d12 step at any
micro-batch takes seconds. One warm-up step (with one micro-batch) creates the optimizer state, then the measured step
runs what Trainer.train_step runs: min(2, grad accumulation) micro-batches of forward under bf16 autocast and backward
(the second one adds into existing grads, as every micro-batch after the first does), the global grad-norm clip
(the fused one of FusedAdamW, or torch's foreach clip), the optimizer step and zero_grad. The Triton ops' fake
implementations (register_fake in kernels/*.py; FusedAdamW allocates its buffers and skips the launch) allocate
what their real launches allocate, scratch included, sized for the preset's GPU (SM count, arch config table:
tritonrun/kernels/target.py). Eager mode: torch.compile changes what is saved and fused, so a compiled step's
activations differ (often lower); the record says "mode": "eager".

Recipes (--recipe; default the preset's recipe field when it has one, else gpt2). gpt2: the above. speedrun-dense
(the 2024-11-10 model, T = 1024) and speedrun (the 2024-12-17 one): tritonrun/gpt2/speedrun.py's SpeedrunGPT
(SPEEDRUN_DENSE_MODELS / SPEEDRUN_MODELS) and the optimizers the trainer builds for it (tritonrun/training.py's
SpeedrunOptimizer): the ops seam's Adam (`optimizer`, torch's fused or the Triton FusedAdamW, weight_decay 0) over
optimizer_groups()["adam"] (wte and the value-embedding tables, lm_head, scalars) and kernels/muon.Muon over the
blocks' matrices. speedrun's micro-batch is ONE packed sequence of --seq-len tokens (default the preset's
speedrun_seq_len) with its document bounds and the schedule's last (largest) window, 1,792; --max searches the
largest power-of-two --seq-len (128 .. the model's 65,536) that fits instead of a micro-batch. Its attention is
ops.window_attention: under --backend triton tritonrun/kernels/window_attention.py's fake (saves q, k, v, the output and
an fp32 logsumexp); under --backend torch the trainer runs FlexAttention under torch.compile on a GPU, which saves the
same tensors, so the estimate uses the kernel's fake there too (the eager CPU path, a dense T x T mask, is not what
a GPU runs). Records: memory-speedrun-packed-<preset>-<date>.json (speedrun), memory-speedrun-dense-... (speedrun-
dense): names no record of the other model ever had. The step has
no grad clip (the record clips nothing): Adam's step, then Muon's: its fp32 momentum buffers (one per matrix,
optimizer state) and its Newton-Schulz temporaries (the Nesterov updates stacked per shape, the bf16 X, A = X Xᵀ,
B and each new X: temporaries). The Muon group's matrices of one shape are orthogonalized in one batch, so those
temporaries scale with the largest shape group (d12: 48 of 768 x 768, 24 of 768 x 3072), not with one matrix.

Fake device. The step runs on fake *CPU* tensors under CPU bf16 autocast, not on a fake CUDA device: in a CPU-only
torch build, autograd on fake CUDA tensors aborts the process (no CUDA device guard; "PyTorch is not linked with
support for cuda devices"). For this model CPU and CUDA autocast make the same casts (matmuls, linear and SDPA in
bf16; the fp32 residual stream keeps layer norms in fp32; the torch LM head upcasts its logits itself):
tests/test_memory.py checks op for op on a fake CUDA forward, which works. The torch attention runs SDPA's CPU
flash kernel under fake tensors, which saves what CUDA's flash kernel saves (output and an fp32 logsumexp).

Tracker. A small dispatch-level ledger: every op's output storage is registered once (views share it), counted
while its Python storage object lives (rounded up to 512 B, the CUDA caching allocator's block size), and the
peak of the live sum is kept with the list of storages live at it. At the end each of those is put in one
category: parameters, grads (the .grad tensors after a backward), optimizer state (tensors the optimizer holds
after its step), activations (allocated in a forward and still alive when its backward starts: saved tensors,
autocast's bf16 weight copies, the batch), temporaries (the rest). Under FakeTensorMode the ledger is fed from
the fake mode itself, so it also sees what the fake implementations allocate inside an op; on real tensors it is
fed by a TorchDispatchMode (tests/test_memory.py checks it against the CPU allocator's own events on a tiny model).
Not seen: memory a library kernel allocates internally without a tensor (cuBLAS workspace, FlashAttention-2's
fp32 dq accumulator, B*T*C*4 bytes for one backward call), autotune benchmarking buffers (tuned before the peak).

Fit. peak_reserved_estimate_bytes = peak_bytes x (1 + FRAGMENTATION) for what the caching allocator reserves
beyond live tensors (block rounding, segments split by earlier sizes); the CUDA context (CONTEXT_ALLOWANCE, CUDA
runtime, cuBLAS handles, loaded kernels) lives outside the allocator. A micro-batch fits when the reserved
estimate is within budget_bytes = the preset's memory minus 1 GiB (12 GB card: 11 GiB), which leaves the context
allowance and 0.5 GiB for the display and the card's own reservations (a "12 GB" RTX 4070 reports 11.99 GiB).
Both allowances are assumptions until the budgeted GPU check (.ci/gpu) prints this estimate against a measured
peak. --max: the largest micro-batch dividing total_batch_tokens / T whose estimate fits (the estimate grows
with the micro-batch; the search checks that it does).
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
import datetime  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402

import torch  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_leaves  # noqa: E402
from torch.utils.weak import WeakIdKeyDictionary  # noqa: E402

from tritonrun.kernels.target import Target, planning_for  # noqa: E402  (imports no triton)
from tritonrun.runinfo import atomic_write_json, env_info  # noqa: E402
from tritonrun.recipes import RECIPES as RECIPE_REGISTRY, get_recipe  # noqa: E402

GIB = 2**30
CATEGORIES = ("parameters", "grads", "optimizer_state", "activations", "temporaries")
CUDA_BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this
CONTEXT_ALLOWANCE = GIB // 2  # CUDA context + cuBLAS/Triton modules, outside the allocator (0.3-0.5 GiB measured
#                               on consumer cards by others; the upper end)
FRAGMENTATION = 0.10  # reserved over allocated at the peak: the caching allocator's rounding and split segments
BUDGET_MARGIN = GIB  # budget = preset memory - this: the context allowance plus 0.5 GiB of headroom

# The GPU behind each preset, as the kernels' fakes need it: config-table key and SM count (REFERENCE.md, NVIDIA
# datasheets). sm_86 (RTX 3090) uses the sm_89 tables, as the kernels' arch_key does.
GPUS: dict[str, Target] = {
    "rtx4070": Target("rtx4070", "sm_89", 46),
    "rtx4070ti": Target("rtx4070ti", "sm_89", 60),
    "rtx4090": Target("rtx4090", "sm_89", 128),
    "rtx3090": Target("rtx3090", "sm_89", 82),
    "a100": Target("a100", "sm_80", 108),
    "h100": Target("h100", "sm_90", 132),
    "h200": Target("h200", "sm_90", 132),
}


class UserError(Exception):
    """A mistake on the command line: one `error:` line, exit 2."""


# ------------------------------------------------------------------------------------------ tracker
@dataclass(eq=False)
class _Entry:
    serial: int
    nbytes: int
    phase: str  # "setup", "forward", "backward", "optimizer", "batch"
    ref: object = None  # weakref to the storage (keeps the callback alive)


@dataclass
class Ledger:
    """Live tensor storage bytes over time, its peak and what was live at the peak (see the module docstring)."""

    granularity: int = 1  # round each storage up to a multiple of this (CUDA_BLOCK for a CUDA estimate)
    phase: str = "setup"
    live_bytes: int = 0
    peak_bytes: int = 0
    peak_phase: str = "setup"
    peak_op: str = ""
    allocations: int = 0
    _entries: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    _live: dict = field(default_factory=dict)  # serial -> _Entry
    _peak_live: list = field(default_factory=list)
    _serial: int = 0
    roles: dict = field(default_factory=lambda: {c: set() for c in CATEGORIES})  # category -> serials
    inside: str = ""  # the custom op (tritonrun::...) whose fake implementation is running, if any
    trace: list | None = None  # when a list: (bytes, op, inside) of every new storage, in order

    def _free(self, serial: int) -> None:
        entry = self._live.pop(serial, None)
        if entry is not None:
            self.live_bytes -= entry.nbytes

    def see(self, tensors, op: str = "") -> None:
        """Register the storages of `tensors` not seen yet; update the peak."""
        grew = False
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._entries:
                continue
            n = -(-storage.nbytes() // self.granularity) * self.granularity
            self._serial += 1
            entry = _Entry(self._serial, n, self.phase)
            serial, free = entry.serial, self._free
            entry.ref = weakref.ref(storage, lambda _, s=serial, f=free: f(s))
            self._entries[storage] = entry
            self._live[serial] = entry
            self.live_bytes += n
            self.allocations += 1
            if self.trace is not None:
                self.trace.append((n, op, self.inside))
            grew = True
        if grew and self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_phase, self.peak_op = self.live_bytes, self.phase, op
            self._peak_live = list(self._live.values())

    def reset_peak(self) -> None:
        self.peak_bytes, self.peak_phase, self.peak_op = self.live_bytes, self.phase, "reset"
        self._peak_live = list(self._live.values())

    def serial_of(self, t: torch.Tensor) -> int | None:
        entry = self._entries.get(t.untyped_storage())
        return entry.serial if entry is not None else None

    def mark(self, category: str, tensors) -> None:
        """These tensors' storages belong to `category` (registered first if not seen yet)."""
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.see(tensors, op=f"mark {category}")
        self.roles[category].update(self.serial_of(t) for t in tensors)

    def mark_live(self, category: str, phases: tuple[str, ...]) -> None:
        """Every storage live now that was allocated in one of `phases` belongs to `category`."""
        self.roles[category].update(e.serial for e in self._live.values() if e.phase in phases)

    def split(self, entries=None) -> dict[str, int]:
        """Bytes per category of `entries` (default: those live at the peak); first matching role wins."""
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self._peak_live if entries is None else entries:
            out[next((c for c in CATEGORIES[:-1] if e.serial in self.roles[c]), "temporaries")] += e.nbytes
        return out


class TrackingMode(TorchDispatchMode):
    """Feeds a Ledger from real tensors: every op's outputs."""

    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ledger.see(tree_leaves(out), str(func))
        return out


class TrackingFakeMode(FakeTensorMode):
    """FakeTensorMode that feeds a Ledger: it also sees the ops a fake implementation runs inside a custom op
    (their scratch), which a TorchDispatchMode stacked above the fake mode would not."""

    def __init__(self, ledger: Ledger):
        super().__init__(allow_non_fake_inputs=True)
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outer = self.ledger.inside
        if not outer and func.namespace == "tritonrun":
            self.ledger.inside = str(func)
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.ledger.inside = outer
        self.ledger.see(tree_leaves(out), str(func))
        return out


# ------------------------------------------------------------------------------------------ the step
def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor the optimizer holds (state, FusedAdamW's flat buffers and tables), found by walking it; a
    SpeedrunOptimizer: both of its optimizers'."""
    if isinstance(optimizer, SpeedrunOptimizer):
        return [t for inner in optimizer.optimizers for t in optimizer_tensors(inner)]
    found, seen = [], set()

    def walk(obj, depth=0):
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            walk(vars(obj), depth + 1)

    walk(optimizer.state)
    walk(getattr(optimizer, "_buckets", None))
    return found


def build_optimizer(model, ops, weight_decay: float = 0.1):
    """The optimizer training.Trainer builds (ops.optimizer), with torch's fused AdamW where torch_adamw would pick
    it on CUDA (it picks foreach for CPU params, and these fake params are CPU ones)."""
    from tritonrun.gpt2.ops import TorchAdamW, torch_adamw

    groups = model.param_groups(weight_decay)
    if ops.optimizer is torch_adamw:
        return TorchAdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return ops.optimizer(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8)


class SpeedrunOptimizer:
    """The speedrun recipe's optimizers as the trainer drives them (tritonrun/training.py's SpeedrunOptimizer, which
    this mirrors for the estimate without the schedule: lr and momentum values do not change what is allocated): the
    seam's Adam over SpeedrunGPT.optimizer_groups()["adam"], then kernels/muon.Muon over its "muon" group."""

    def __init__(self, model, ops):
        from tritonrun.gpt2.ops import TorchAdamW, torch_adamw
        from tritonrun.kernels.muon import Muon

        groups, c = model.optimizer_groups(), model.config
        adam_kw = dict(lr=groups["adam"][0]["lr"], betas=c.adam_betas, eps=c.adam_eps)
        if ops.optimizer is torch_adamw:  # torch_adamw's pick on CUDA params (fused); these fake params are CPU
            self.adam = TorchAdamW(groups["adam"], fused=True, **adam_kw)
        else:
            self.adam = ops.optimizer(groups["adam"], **adam_kw)
        self.muon = Muon(groups["muon"], lr=c.muon_lr, momentum=c.muon_momentum_warmup_start,
                         nesterov=c.muon_nesterov, ns_steps=c.muon_ns_steps, ns_dtype=torch.bfloat16, shard=False,
                         momentum_form=c.muon_momentum_form)
        self.optimizers = (self.adam, self.muon)

    def step(self) -> None:
        self.adam.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def build_speedrun_optimizer(model, ops) -> SpeedrunOptimizer:
    return SpeedrunOptimizer(model, ops)


def training_step(model, optimizer, batches, ledger: Ledger, autocast, grad_clip: float = 1.0) -> None:
    """Trainer.train_step's work on `batches` (one (x, y) per micro-batch, or (x, y, cu_seqlens, window) for the
    packed recipe), phases marked in the ledger. The loss and norm are not read back to the host (a fake tensor has
    no value)."""
    params = list(model.parameters())
    ledger.phase = "optimizer"
    loss_sum = torch.zeros((), device=params[0].device)
    for batch in batches:
        ledger.phase = "batch"
        ledger.mark("activations", [t for t in batch if isinstance(t, torch.Tensor)])
        ledger.phase = "forward"
        with autocast:
            loss = model(*batch) / len(batches)
        ledger.mark_live("activations", ("forward",))  # alive when backward starts: saved for it
        ledger.phase = "backward"
        loss.backward()
        ledger.phase = "optimizer"
        loss_sum += loss.detach()
        del loss
        ledger.mark("grads", [p.grad for p in params if p.grad is not None])
    if grad_clip > 0 and hasattr(optimizer, "clip_grad_norm_"):
        norm = optimizer.clip_grad_norm_(grad_clip)
    elif grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    torch.stack([loss_sum, norm.float()])  # what the trainer reads back (host copy left out)
    optimizer.step()
    ledger.mark("optimizer_state", optimizer_tensors(optimizer))
    optimizer.zero_grad(set_to_none=True)


def make_batches(n: int, B: int, T: int, vocab: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randint(0, vocab, (B, T), device=device), torch.randint(0, vocab, (B, T), device=device))
            for _ in range(n)]


def make_packed_batches(n: int, T: int, vocab: int, window: int, device) -> list[tuple]:
    """The packed recipe's micro-batches: (x, y) of (1, T), cu_seqlens int32 (one document: the count does not
    change what is allocated) and the window."""
    return [(x, y, torch.tensor([0, T], dtype=torch.int32, device=device), window)
            for x, y in make_batches(n, 1, T, vocab, device)]


def packed_ops(ops):
    """The ops of a packed-recipe estimate: under --backend torch the window attention is the kernel's op, whose
    fake saves what compiled FlexAttention saves on a GPU (see the module docstring)."""
    if ops.backend != "torch":
        return ops
    import dataclasses

    from tritonrun.kernels.window_attention import window_attention

    placement = {**ops.placement, "window_attention": "torch (FlexAttention under compile; estimated by the "
                                                      "kernel's saved tensors)"}
    return dataclasses.replace(ops, window_attention=window_attention, placement=placement)


# ------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class Setup:
    preset: str
    model: str
    seq_len: int
    total_batch_tokens: int
    memory_gib: float
    target: Target
    budget_gib: float | None = None  # --budget-gib: instead of memory_gib - 1
    # "gpt2" (GPT + AdamW, grad clip 1.0) | "speedrun" (packed SpeedrunGPT + Adam and Muon, no clip) |
    # "speedrun-dense" (the 11-10 SpeedrunGPT at micro-batch x T)
    recipe: str = "gpt2"

    @property
    def packed(self) -> bool:
        return get_recipe(self.recipe).packed

    @property
    def budget_bytes(self) -> int:
        if self.budget_gib is not None:
            return int(self.budget_gib * GIB)
        return int(self.memory_gib * GIB) - BUDGET_MARGIN

    def micro_batches(self) -> list[int]:
        """Micro-batches the trainer accepts: divisors of total_batch_tokens / seq_len (the packed recipe: 1)."""
        if self.packed:
            return [1]
        n = self.total_batch_tokens // self.seq_len
        return [b for b in range(1, n + 1) if n % b == 0]

    def seq_lens(self, block_size: int) -> list[int]:
        """The packed recipe's --max candidates: powers of two from 128 to the context dividing the total batch."""
        return [t for t in (2 ** k for k in range(7, 21)) if t <= block_size and self.total_batch_tokens % t == 0]


def estimate(setup: Setup, backend: str, micro_batch: int) -> dict:
    """One fake training step of `setup` with `backend` at `micro_batch`; the record entry (see --json)."""
    from tritonrun.gpt2.ops import get_ops

    t0 = time.perf_counter()
    ledger = Ledger(granularity=CUDA_BLOCK)
    build_model, build_opt, config, grad_clip = recipe_parts(setup.recipe, setup.model)
    grad_accum = setup.total_batch_tokens // (micro_batch * setup.seq_len)
    # device "cuda": the ops are resolved as for a GPU run (no interpreter); the tensors are fake CPU ones
    ops = get_ops(backend, "cuda")
    if setup.packed:
        ops = packed_ops(ops)

    def batches_of(n):
        if setup.packed:
            return make_packed_batches(n, setup.seq_len, config.vocab_size, config.final_window, "cpu")
        return make_batches(n, micro_batch, setup.seq_len, config.vocab_size, "cpu")

    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with planning_for(setup.target), TrackingFakeMode(ledger):
        model = build_model(config, ops)
        ledger.mark("parameters", list(model.parameters()))
        ledger.mark("parameters", list(model.buffers()))
        optimizer = build_opt(model, ops)
        warm = batches_of(1)
        training_step(model, optimizer, warm, ledger, autocast, grad_clip)  # creates the optimizer state
        del warm
        ledger.reset_peak()
        batches = batches_of(min(2, max(1, grad_accum)))
        training_step(model, optimizer, batches, ledger, autocast, grad_clip)
        del batches
        after_step = ledger.live_bytes
        del model, optimizer
    split = ledger.split()
    peak = ledger.peak_bytes
    reserved = math.ceil(peak * (1 + FRAGMENTATION))
    return {
        "recipe": setup.recipe, "preset": setup.preset, "backend": backend, "micro_batch": micro_batch,
        "seq_len": setup.seq_len,
        "model": setup.model, "grad_accum": grad_accum, "micro_batches_simulated": min(2, max(1, grad_accum)),
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 3),
        "peak_reserved_estimate_bytes": reserved, "peak_reserved_estimate_gib": round(reserved / GIB, 3),
        "context_allowance_bytes": CONTEXT_ALLOWANCE, "budget_bytes": setup.budget_bytes,
        "fits": reserved <= setup.budget_bytes,
        "split_bytes": split, "split_gib": {k: round(v / GIB, 3) for k, v in split.items()},
        "peak_phase": ledger.peak_phase, "peak_op": ledger.peak_op,
        "resident_after_step_bytes": after_step, "allocations": ledger.allocations,
        "ops": ops.placement, "seconds": round(time.perf_counter() - t0, 2),
    }


def recipe_parts(name: str, model: str):
    """(build_model(config, ops), build_optimizer(model, ops), config, grad clip) of a recipe's training step: the
    recipe's model; the optimizer the trainer builds for it (Adam + Muon for a model with Muon groups, else AdamW);
    the recipe's grad clip over the presets' llm.c 1.0."""
    recipe = get_recipe(name)

    def build_opt(model, ops):
        return build_speedrun_optimizer(model, ops) if hasattr(model, "optimizer_groups") else build_optimizer(model, ops)

    return recipe.model_for, build_opt, recipe.sizes()[model], recipe.defaults(on_gpu=True).get("grad_clip", 1.0)


RECIPES = tuple(RECIPE_REGISTRY)


def search_max(fits_at, candidates: list[int]) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest candidate c with fits_at(c), assuming fits is monotone (true up to a point, then false):
    binary search, then the step above the answer is checked to fail. Returns (c or None, [(c, fits)...])."""
    tried: dict[int, bool] = {}

    def probe(i):
        if candidates[i] not in tried:
            tried[candidates[i]] = fits_at(candidates[i])
        return tried[candidates[i]]

    lo, hi = -1, len(candidates)  # invariant: candidates[lo] fits (or lo = -1), candidates[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    if lo >= 0 and lo + 1 < len(candidates):
        probe(lo + 1)
    return (candidates[lo] if lo >= 0 else None), sorted(tried.items())


# ------------------------------------------------------------------------------------------ CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    from tritonrun.presets import PRESETS

    gpus = [name for name, p in PRESETS.items() if p.device == "cuda"]
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", required=True, choices=gpus, help="preset whose shapes and memory budget to use")
    p.add_argument("--recipe", choices=RECIPES,
                   help="gpt2 (GPT-2 + AdamW, grad clip), speedrun (packed 2024-12-17 SpeedrunGPT + Adam and Muon, "
                        "no clip) or speedrun-dense (2024-11-10); default: the preset's recipe (gpt2 where the preset "
                        "names none)")
    p.add_argument("--backend", choices=["torch", "triton", "both"], default="both",
                   help="ops to estimate (default both: triton first, then torch)")
    p.add_argument("--micro-batch", metavar="N[,N...]", help="micro-batch(es) to estimate (default: the preset's)")
    p.add_argument("--max", action="store_true", help="also find the largest micro-batch that fits the budget "
                                                      "(speedrun: the largest packed --seq-len)")
    p.add_argument("--model", help="model size instead of the preset's (gpt2: d12, d24, ...; speedrun: d12, tiny)")
    p.add_argument("--seq-len", type=int, help="sequence length instead of the preset's")
    p.add_argument("--budget-gib", type=float, help="reserved-memory budget instead of the preset's memory - 1 GiB")
    p.add_argument("--json", metavar="PATH", help="write the record here")
    p.add_argument("--record", action="store_true",
                   help="write the record to bench/results/memory-<preset>-<YYYYmmdd>.json (gpt2), "
                        "memory-speedrun-packed-<preset>-<YYYYmmdd>.json (speedrun) or "
                        "memory-speedrun-dense-<preset>-<YYYYmmdd>.json (speedrun-dense)")
    return p


def parse_micro_batches(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--micro-batch {text!r}: expected positive integers, e.g. 8 or 16,8") from None
    if not values or any(v <= 0 for v in values):
        raise UserError(f"--micro-batch {text!r}: expected positive integers, e.g. 8 or 16,8")
    return values


def resolve(args) -> tuple[Setup, list[str], list[int]]:
    from tritonrun.presets import PRESETS

    preset = PRESETS[args.gpu]
    recipe = args.recipe or getattr(preset, "recipe", "gpt2")
    sizes = get_recipe(recipe).sizes()
    model = args.model or preset.model
    if model not in sizes:
        takers = [r.name for r in RECIPE_REGISTRY.values() if model in r.sizes()]
        raise UserError(f"--model {model!r} is not a {recipe} model: choose from {', '.join(sizes)}"
                        + (f" (or --recipe {takers[0]})" if takers else ""))
    packed = get_recipe(recipe).packed
    seq_len = args.seq_len or (preset.speedrun_seq_len if packed else preset.seq_len)
    if packed and args.micro_batch and args.micro_batch.strip() != "1":
        raise UserError(f"--micro-batch {args.micro_batch}: --recipe {recipe} packs one sequence per micro-batch; "
                        f"size it with --seq-len (or --max to search it)")
    if seq_len <= 0 or seq_len > sizes[model].block_size:
        raise UserError(f"--seq-len {seq_len}: must be in 1..{sizes[model].block_size} for {recipe} {model}")
    if preset.total_batch_tokens % seq_len:
        raise UserError(f"--seq-len {seq_len} does not divide the preset's total batch of "
                        f"{preset.total_batch_tokens} tokens: pick a power of two")
    if args.budget_gib is not None and args.budget_gib <= 0:
        raise UserError(f"--budget-gib {args.budget_gib:g}: must be positive")
    setup = Setup(args.gpu, model, seq_len, preset.total_batch_tokens, preset.memory_gib, GPUS[args.gpu],
                  args.budget_gib, recipe)
    backends = ["triton", "torch"] if args.backend == "both" else [args.backend]
    micro_batches = parse_micro_batches(args.micro_batch) if args.micro_batch else ([] if args.max else
                                                                                    [preset.micro_batch])
    if packed:  # one sequence per micro-batch; --max alone estimates only what its seq_len search visits
        micro_batches = [] if args.max and not args.seq_len else [1]
    allowed = setup.micro_batches()
    for b in micro_batches:
        if b not in allowed:
            raise UserError(f"--micro-batch {b} does not divide {setup.total_batch_tokens} tokens / T={seq_len} "
                            f"into whole micro-batches: choose from {', '.join(map(str, allowed))}")
    return setup, backends, micro_batches


def record_path(setup: Setup, day: datetime.date | None = None) -> Path:
    """bench/results/memory-<preset>-<date>.json for gpt2 (the first records' names),
    memory-speedrun-packed-<preset>-... for speedrun, memory-speedrun-dense-<preset>-... for speedrun-dense (the
    2024-11-10 model's records were memory-speedrun-<preset>-... before the 2024-12-17 recipe took the name
    speedrun: new names, so that no record of one model is ever read as the other's)."""
    prefix = {"gpt2": "memory-", "speedrun": "memory-speedrun-packed-"}.get(setup.recipe, f"memory-{setup.recipe}-")
    return REPO / "bench" / "results" / f"{prefix}{setup.preset}-{day or datetime.date.today():%Y%m%d}.json"


def line(e: dict) -> str:
    s = e["split_gib"]
    return (f"{e['backend']:<6} B={e['micro_batch']:<4} T={e['seq_len']:<6} peak {e['peak_gib']:6.2f} GiB  "
            f"reserved est. "
            f"{e['peak_reserved_estimate_gib']:6.2f} GiB  {'fits' if e['fits'] else 'DOES NOT FIT':<12} | "
            f"params {s['parameters']:.2f}  grads {s['grads']:.2f}  optim {s['optimizer_state']:.2f}  "
            f"act {s['activations']:.2f}  temp {s['temporaries']:.2f}  (peak in {e['peak_phase']}, "
            f"{e['seconds']:.1f} s)")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup, backends, micro_batches = resolve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    budget = setup.budget_bytes
    print(f"memory estimate: recipe {setup.recipe}, preset {setup.preset} ({setup.target.arch}, "
          f"{setup.target.sm_count} SMs), model {setup.model}, T={setup.seq_len}, bf16 autocast, eager; budget "
          f"{budget / GIB:.2f} GiB reserved "
          f"({'--budget-gib' if setup.budget_gib is not None else f'card {setup.memory_gib:g} GiB - 1'}), "
          f"+{FRAGMENTATION:.0%} fragmentation, context "
          f"{CONTEXT_ALLOWANCE / GIB:.1f} GiB outside", flush=True)
    estimates: list[dict] = []
    cache: dict[tuple[str, int, int], dict] = {}

    def get(backend, b, seq_len=None):
        key = (backend, b, seq_len or setup.seq_len)
        if key not in cache:
            cache[key] = estimate(replace(setup, seq_len=key[2]), backend, b)
            print("  " + line(cache[key]), flush=True)
        return cache[key]

    for backend in backends:
        for b in micro_batches:
            estimates.append(get(backend, b))
    maxima, seq_maxima = {}, {}
    block = get_recipe(setup.recipe).sizes()[setup.model].block_size
    for backend in backends if args.max and setup.packed else []:
        best, tried = search_max(lambda t: get(backend, 1, t)["fits"], setup.seq_lens(block))
        peaks = [get(backend, 1, t)["peak_bytes"] for t, _ in tried]
        monotone = all(a < c for a, c in zip(peaks, peaks[1:]))
        seq_maxima[backend] = {"seq_len": best, "tried": [{"seq_len": t, "fits": f} for t, f in tried],
                               "peak_grows_with_seq_len": monotone}
        print(f"  {backend}: largest packed --seq-len within {budget / GIB:.2f} GiB reserved: {best}"
              f"{'' if monotone else ' (WARNING: the estimate did not grow with the sequence length)'}", flush=True)
        if best is not None and not micro_batches:
            estimates.append(get(backend, 1, best))
    for backend in backends if args.max and not setup.packed else []:
        best, tried = search_max(lambda b: get(backend, b)["fits"], setup.micro_batches())
        peaks = [get(backend, b)["peak_bytes"] for b, _ in tried]
        monotone = all(a < c for a, c in zip(peaks, peaks[1:]))
        maxima[backend] = {"micro_batch": best, "tried": [{"micro_batch": b, "fits": f} for b, f in tried],
                           "peak_grows_with_micro_batch": monotone}
        print(f"  {backend}: largest micro-batch within {budget / GIB:.2f} GiB reserved: {best}"
              f"{'' if monotone else ' (WARNING: the estimate did not grow with the micro-batch)'}", flush=True)
        if best is not None and not micro_batches:
            estimates.append(get(backend, best))
    primary = estimates[0] if estimates else get(backends[0], setup.micro_batches()[0])
    packed_step = ("one packed sequence of seq_len tokens per micro-batch (B = 1, window 1,792), forward + backward, "
                   "no grad clip, Adam step (wte and value tables, lm_head, scalars) then Muon step (fp32 momentum = "
                   "optimizer_state; bf16 Newton-Schulz batched by shape = temporaries), zero_grad")
    record = {
        "record": "tritonrun.memory", "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "env": env_info(torch.device("cpu")), "recipe": setup.recipe,
        **{k: primary[k] for k in ("preset", "backend", "micro_batch", "peak_bytes", "peak_reserved_estimate_bytes",
                                   "context_allowance_bytes", "budget_bytes", "fits", "split_bytes")},
        "method": ("FakeTensorMode (fake CPU tensors, CPU bf16 autocast), real model and optimizer, warm-up step "
                   "then one measured step; ledger of live tensor storages rounded to 512 B"),
        "step": (packed_step if setup.packed
                 else "forward + backward per micro-batch, grad clip 1.0, AdamW step, zero_grad"
                 if recipe_parts(setup.recipe, setup.model)[3]
                 else "forward + backward per micro-batch, no grad clip, Adam step (wte, lm_head, scalars) then "
                      "Muon step (fp32 momentum = optimizer_state; bf16 Newton-Schulz batched by shape = "
                      "temporaries), zero_grad"),
        "packed": setup.packed,
        "mode": "eager", "dtype": "bf16 autocast", "model": setup.model, "seq_len": primary["seq_len"],
        "total_batch_tokens": setup.total_batch_tokens,
        "gpu": {"name": setup.target.name, "arch": setup.target.arch, "sm_count": setup.target.sm_count,
                "memory_gib": setup.memory_gib},
        "fragmentation_allowance": FRAGMENTATION, "budget_margin_bytes": BUDGET_MARGIN,
        "fit_rule": "peak_reserved_estimate_bytes = ceil(peak_bytes * (1 + fragmentation_allowance)) <= "
                    "budget_bytes = memory_gib GiB - budget_margin_bytes (context_allowance_bytes lies outside)",
        "estimates": estimates, "max_micro_batch": maxima,
        **({"max_seq_len": seq_maxima} if setup.packed else {}),
    }
    path = Path(args.json) if args.json else None
    if args.record:
        path = record_path(setup)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
