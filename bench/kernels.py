#!/usr/bin/env python
"""Per-kernel benchmark: each Triton kernel against its PyTorch peers at GPT-2 shapes.

    python bench/kernels.py                      # every op, full shapes; writes bench/results/*.json
    python bench/kernels.py --op gelu --quick    # one op, rows = 16*1024 only, shorter runs
    python bench/kernels.py --plot               # ... and a PNG next to the record
    python bench/kernels.py --plot bench/results/kernels-*.json   # PNGs from existing records, no GPU
    python bench/kernels.py --allow-cpu --quick  # no GPU: interpreter smoke run, NOT a timing

For every op and shape: fwd, bwd and fwd+bwd medians (triton.testing.do_bench, 20/50/80% quantiles;
do_bench flushes L2 before each call and the inputs rotate over several sets, so caches don't
flatter), for the Triton kernel and each peer (torch eager, torch.compile). Reported: ms, GB/s (the
kernel file's `bytes_moved` formula, the same for every implementation: effective bandwidth of the
minimum traffic), % of the GPU's peak bandwidth, and the Triton kernel's speedup over each peer.
Before timing, every implementation's outputs and gradients are checked against eager PyTorch (cross_entropy:
an fp32 reference over row chunks, which fits any GPU). Each row times at least MIN_SAMPLES calls.

Shapes: rows = B*T = 16*1024 and 32*1024, C = 768 (GPT-2 124M); GELU runs on the MLP's hidden
width 4C = 3072, where GPT-2 applies it. Dtypes (--dtype autocast, the default) are what bf16-autocast
training feeds each op: add_layernorm gets a bf16 branch output + the fp32 residual stream + fp32
params, layernorm (the first, on the embeddings) fp32, GELU bf16 (c_fc's output).

Cases are a registry (CASES: op name -> function), so later kernels add one entry each. Beyond the
three elementwise ops above:

  adamw          one optimizer step over GPT-2 124M's 148 tensors (124,475,904 fp32 params, random
                 grads; param groups decay/no-decay from model.param_groups(0.1); lr 6e-4, betas
                 (0.9, 0.95), eps 1e-8), global-norm clip 1.0 inside every timed step: FusedAdamW's
                 clip_grad_norm_ + step vs torch.nn.utils.clip_grad_norm_ + torch.optim.AdamW
                 (fused=True) and (foreach=True). One pass, "step". GB/s from tritonrun/kernels/adamw.py's
                 bytes_moved (32 B/param fp32 with clip), the same for every implementation.
  attention      causal attention, B x H = 16 x 12 and 32 x 12, T = 1024, D = 64, bf16, q/k/v in the
                 model's (B, T, H, D) memory viewed as (B, H, T, D). Peers: each SDPA backend that
                 runs (flash, cuDNN, efficient; one that raises is recorded under "skipped" with its
                 reason), torch.compile'd and eager math attention. TFLOPS from tritonrun/kernels/attention.py's
                 attention_flops (causal half; bwd 2.5x fwd), the same for every implementation;
                 speedup vs the best SDPA backend; % of a bf16 8192^3 torch.matmul measured once per
                 run ("matmul_peak_tflops").
  cross_entropy  fused LM head + cross-entropy, rows = 16*1024, C = 768, V = 50304 padded (vocab
                 50257), bf16 h and weight. Peers: tritonrun/gpt2/ops.py's torch_linear_cross_entropy eager
                 (fp32-upcast logits) and torch.compile'd, Liger's LigerFusedLinearCrossEntropyLoss
                 and cut-cross-entropy when importable (else recorded under "skipped"). ms, TFLOPS
                 (model FLOPs lce_flops(executed=False): 2NVC fwd, 4NVC bwd, for every
                 implementation) and peak extra memory (CUDA only: max_memory_allocated during the
                 pass minus what was allocated before it, i.e. beyond the inputs), with speed and
                 memory ratios vs each peer (torch.compile the one the goal names).
  rmsnorm, add_rmsnorm, mix_rmsnorm, relu2
                 issue 26's speedrun ops (tritonrun/kernels/rmsnorm.py, tritonrun/kernels/relu2.py) at the d12 training
                 shape of the rtx4070 preset: rows = 8*1024 (also under --quick), C = 768; relu2 on 4C = 3072. Peers:
                 the 2024-11-10 record's PyTorch (F.rms_norm(x, (C,)) with its default eps; x + residual;
                 l0 * x + l1 * x0 with fp32 scalars; F.relu(x).square()), eager and torch.compile'd. Autocast
                 dtypes: rmsnorm fp32 (the embeddings), add_rmsnorm bf16 branch + fp32 stream, mix_rmsnorm fp32
                 x, x0 and lambdas, relu2 bf16. GB/s from tritonrun/kernels/rmsnorm.py's / tritonrun/kernels/relu2.py's
                 bytes_moved.
  fp8_linear     issue 35's FP8 linear layer (tritonrun/kernels/fp8.py: e4m3 forward, e5m2 output gradient, per-tensor
                 scales) at d12's MLP up / down projections and LM head, 8,192 rows, bf16 x, fp32 weight. Peer:
                 torch._scaled_mm with torch's fp8 casts; checked against the fp64 product of the same fp8 operands.
                 TFLOPS at 2MNK forward, 4MNK backward; the run's measured bf16 matmul peak is beside it.
  relu2_mlp      issue 35's fused ReLU^2 MLP step (tritonrun/kernels/mlp_relu2.py) in bf16 at d12, 8,192 rows, against
                 relu(x W1^T)^2 W2^T in torch eager and compiled; TFLOPS at 4MCH forward, 8MCH backward.
  bigram         issue 35's bigram hash embedding (tritonrun/kernels/bigram.py: hash, lookup and sign in one pass) at
                 one packed sequence of 8,192 tokens, the 377,280 x 768 table, 8,192 sign rows, low dtype. Peers: the
                 torch form (int32 hash, two gathers, a product) eager and torch.compile'd. GB/s from bytes_moved.
  mtp_head       record #89's fused LM head loss (tritonrun/kernels/mtp_head.py: K = 3 multi-token prediction + prefix
                 loss over 23 sigmoid((l + 5) / 7.5) logits, the record's (C, V) head) at 16,384 and 49,152 rows
                 (--quick: 16,384), C = 768, V = 50,304, bf16. Peers: mtp_head_reference (materialized logits) eager and
                 torch.compile'd, checked against it in fp32 over 2,048-row chunks; TFLOPS at 2NVC forward, 4NVC
                 backward, and peak extra memory, as cross_entropy.
  qk_norm_rope   QK-norm + RoPE (tritonrun/kernels/rope.py) at the d12 speedrun's attention input: B = 8, T = 1024,
                 H = 6, D = 128, bf16 q and k as the record's separate c_q / c_k outputs, (B, T, H, D), their
                 gradients as attention returns them ((B, H, T, D) views of (B, T, H, D) memory), fp32
                 rope_tables. Peers: tritonrun/kernels/rope.py's reference_qk_norm_rope(compute_dtype=None) (F.rms_norm,
                 the rotation, transpose + contiguous: the torch path) eager and torch.compile'd. GB/s from
                 tritonrun/kernels/rope.py's bytes_moved (fwd 4, bwd 6 tensor passes + the tables).
  muon           one Muon step (lr 0.04, momentum 0.95, Nesterov, 5 bf16 quintic Newton-Schulz steps) over the
                 d12 speedrun's 72 hidden matrices (48 x 768x768, 12 x 3072x768, 12 x 768x3072; 84,934,656 fp32
                 params, random grads): tritonrun/kernels/muon.py's Muon (row "triton": the project's implementation,
                 whose Newton-Schulz runs batched by shape on torch bf16 GEMMs; muon.py's docstring says why no Triton
                 kernel) vs the record's per-tensor loop in plain torch, eager and with its Newton-Schulz
                 torch.compile'd as the record does. One pass, "step"; TFLOPS from newton_schulz_flops (1.63 TFLOP
                 per step at d12), the same for every implementation.
  window_attention
                 issue 27's document-masked sliding-window attention (tritonrun/kernels/window_attention.py): B = 1
                 packed sequence of T = 65,536 (--quick: 16,384), H = 6, D = 128, bf16 in the model's layout, synthetic
                 documents (lengths uniform in [1, 2000), fixed seed), windows 64 / 256 / 1,024 / 1,792 / 4,096
                 (--quick: 64, 1,792): one row group per window, so time grows with the window at fixed T. Peers:
                 FlexAttention (torch.nn.attention.flex_attention, torch.compile'd) with the same mask, its block
                 mask built outside the timed call, which also checks ours (skipped with the reason where it
                 cannot run); dense causal SDPA ("sdpa.causal_dense": no document mask, no window, the cost
                 without sparsity, checked only against itself); the eager dense-masked math where T <= 4,096
                 (the smoke run: T = 64, windows 4 and 16, FlexAttention skipped on CPU). TFLOPS from
                 window_attention_flops (allowed pairs) for ours and FlexAttention, attention_flops (causal half)
                 for dense SDPA: each row's own work.
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
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable  # noqa: E402

import torch  # noqa: E402

from tritonrun.kernels.tune import picks as autotune_picks  # noqa: E402  (imports no triton)
from tritonrun.runinfo import (RESULTS_DIR, atomic_write_json, env_info, record_dir,  # noqa: E402
                              record_stem, reports_write_failures)

PASSES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.2, 0.5, 0.8)
MIN_SAMPLES = 10  # timed calls per row at least, however slow the call

# Peak DRAM bandwidth, GB/s, from vendor spec sheets; matched as a substring of
# torch.cuda.get_device_name(), first match wins (so the more specific names come first).
PEAK_GBPS: list[tuple[str, float]] = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555),
    ("RTX 4090", 1008), ("RTX 4080 SUPER", 736), ("RTX 4080", 717), ("RTX 4070 Ti SUPER", 672),
    ("RTX 4070 Ti", 504), ("RTX 4070 SUPER", 504), ("RTX 4070", 504),
    ("RTX 3090 Ti", 1008), ("RTX 3090", 936), ("L40S", 864), ("L40", 864), ("L4", 300),
]


def peak_gbps(device_name: str) -> float | None:
    return next((gbps for key, gbps in PEAK_GBPS if key in device_name), None)


# --------------------------------------------------------------------------------------- machinery


@dataclass
class Ctx:
    device: torch.device
    smoke: bool  # CPU interpreter run: not a timing
    quick: bool
    dtype_mode: str  # autocast | fp32 | bf16 | fp16
    peers: list[str]
    rows: list[int]
    C: int
    results: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)  # peers that could not run, each with the reason
    errors: list[str] = field(default_factory=list)  # our own kernels that raised (the run then exits 1)
    matmul_peak: dict | None = None  # the measured matmul peak (measure_matmul_peak), once per run

    def low(self) -> torch.dtype:
        """The training low precision: bf16, or fp16 under the interpreter (no bf16 arithmetic)."""
        return torch.float16 if self.smoke else torch.bfloat16

    def dtype(self, role: str) -> torch.dtype:
        """Dtype of a tensor by role: 'low' (matmul outputs under autocast), 'high' (fp32 stream/params)."""
        if self.dtype_mode == "autocast":
            return self.low() if role == "low" else torch.float32
        d = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype_mode]
        return torch.float16 if (self.smoke and d == torch.bfloat16) else d


def timer(ctx: Ctx, fn: Callable[[], object]) -> list[float]:
    """[q20, median, q80] in ms."""
    if ctx.smoke:  # exercises the path only; wall-clock of the interpreter means nothing
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        times.sort()
        return [times[0], times[1], times[2]]
    import triton.testing

    warmup, rep = (10, 40) if ctx.quick else (25, 100)
    # do_bench times max(1, rep / (its estimate of one call)) calls: a call slower than rep / MIN_SAMPLES (the
    # cross-entropy rows: ~10 ms on an H100, >100 ms on an RTX 4070) would get a handful of samples, or one, and
    # its "quantiles" would be that one call. So rep grows with the call.
    rep = max(rep, (MIN_SAMPLES + 1) * one_call_ms(ctx, fn))
    return list(triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=list(QUANTILES)))


def one_call_ms(ctx: Ctx, fn: Callable[[], object]) -> float:
    """Wall time of one call after a first (compile, autotune, allocator) one, CUDA synchronized."""
    fn()
    torch.cuda.synchronize(ctx.device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(ctx.device)
    return 1e3 * (time.perf_counter() - t0)


def n_sets(ctx: Ctx, set_bytes: int) -> int:
    """Input sets to rotate through: together at least twice the L2, 2..8 sets."""
    if ctx.smoke:
        return 2
    l2 = getattr(torch.cuda.get_device_properties(ctx.device), "L2_cache_size", 50 << 20)
    return max(2, min(8, math.ceil(2 * l2 / max(set_bytes, 1)) + 1))


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def check_close(name: str, got, want, dtypes_low: bool, tol: float | None = None) -> str | None:
    """Loose sanity check against eager PyTorch (the tests hold the tight ones)."""
    tol = tol if tol is not None else (3e-2 if dtypes_low else 1e-4)
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None and w is None:
            continue
        g, w = g.float(), w.float()
        err = (g - w).abs().max().item()
        scale = max(w.abs().max().item(), 1e-6)
        if not math.isfinite(err) or err > tol * scale:
            return f"{name}: output/grad {i} off by {err:.3g} (scale {scale:.3g})"
    return None


def result_row(op: str, shape: dict, dtypes: dict, pass_: str, impl: str, times: list[float],
               nbytes: int | None = None, flops: float | None = None, peak_mb: float | None = None,
               check: str | None = None) -> dict:
    """One result row; every op writes the same fields (None where a metric does not apply)."""
    q20, med, q80 = times
    return {
        "op": op, "shape": shape, "dtypes": {k: str(v).replace("torch.", "") for k, v in dtypes.items()},
        "pass": pass_, "impl": impl, "ms": med, "ms_q20": q20, "ms_q80": q80,
        "bytes": nbytes, "gbps": nbytes / (med * 1e-3) / 1e9 if nbytes else None,
        "flops": flops, "tflops": flops / (med * 1e-3) / 1e12 if flops else None,
        "peak_mb": peak_mb, "check": check or "ok",
    }


def skip(ctx: Ctx, op: str, impl: str, reason: str, shape: dict | None = None) -> None:
    """Record a peer that could not run (not installed, no kernel for this GPU, out of memory)."""
    ctx.skipped.append({"op": op, "shape": shape, "impl": impl, "skipped": reason})
    print(f"  skipped {op} {impl}{f' {shape}' if shape else ''}: {reason}")


def skip_and_free(ctx: Ctx, op: str, impl: str, reason: str, shape: dict) -> None:
    """skip() after a failed run (out of memory, or raised): its memory back to the device first, so the next
    implementation starts from the same free memory. Call it outside the except block, whose traceback holds
    the failed run's tensors."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    skip(ctx, op, impl, reason, shape)


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:limit] if text else ''}"


def peak_extra_mb(fn: Callable, inputs: list, grads: list) -> dict[str, float]:
    """CUDA only. Per pass, MiB (2^20 B): max_memory_allocated while the pass runs minus what was allocated
    just before its forward (the inputs and whatever else is alive), i.e. the memory the pass adds. bwd
    includes the graph its forward saved (alive during the backward) and the gradients it returns."""
    sync, mib = torch.cuda.synchronize, 2.0 ** 20
    out = {}
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = _as_tuple(fn(*inputs))
    sync()
    out["fwd"] = (torch.cuda.max_memory_allocated() - base) / mib
    torch.cuda.reset_peak_memory_stats()  # peak restarts from now (inputs + saved graph)
    got = torch.autograd.grad(outs, inputs, grads, allow_unused=True)
    sync()
    out["bwd"] = (torch.cuda.max_memory_allocated() - base) / mib
    del outs, got
    sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    got = torch.autograd.grad(_as_tuple(fn(*inputs)), inputs, grads, allow_unused=True)
    sync()
    out["fwd+bwd"] = (torch.cuda.max_memory_allocated() - base) / mib
    del got
    return out


def bench_impls(ctx: Ctx, op: str, shape: dict, dtypes: dict, make_set: Callable[[int], tuple],
                impls: dict[str, Callable], nbytes: dict[str, int] | None,
                flops: dict[str, float] | None = None, reference: Callable | None = None,
                memory: bool = False, max_sets: int | None = None) -> None:
    """Time fwd / bwd / fwd+bwd of each implementation on rotating input sets; append result rows.

    make_set(seed) -> (inputs: list of leaf tensors requiring grad, grad_outputs: list).
    nbytes / flops: per pass, the op's formula (the same for every implementation) -> GB/s / TFLOPS.
    reference: the untimed function every implementation is checked against (default impls["torch"]).
    memory: also measure peak extra memory per pass (CUDA only; None elsewhere).
    max_sets: cap on the rotating input sets (ops whose sets alone exceed the L2 and whose retained
    graphs are large). An implementation that runs out of GPU memory is recorded under "skipped"."""
    probe_inputs, probe_grads = make_set(0)
    set_bytes = sum(t.numel() * t.element_size() for t in (*probe_inputs, *probe_grads))
    count = min(n_sets(ctx, set_bytes), max_sets or 8)
    sets = [(probe_inputs, probe_grads)] + [make_set(i) for i in range(1, count)]
    low = any(dt in (torch.bfloat16, torch.float16) for dt in dtypes.values())
    oom = None
    try:
        reference_out = _outputs_and_grads(reference or impls["torch"], *sets[0])
    except torch.cuda.OutOfMemoryError as e:
        oom = f"the reference ran out of memory, nothing can be checked: {_first_line(e, 160)}"
    if oom:  # outside the except block, as below: the traceback's frames hold the graph
        del sets
        skip_and_free(ctx, op, "all", oom, shape)
        return
    for impl, fn in impls.items():
        oom = None
        try:
            checked = reference is not None or impl != "torch"
            ctx.results.extend(_bench_one(ctx, op, shape, dtypes, impl, fn, sets, reference_out if checked else None,
                                          low, nbytes, flops, memory))
        except torch.cuda.OutOfMemoryError as e:
            oom = f"out of memory: {_first_line(e, 160)}"
        except Exception as e:  # one implementation's crash must not cost the others' rows or the record
            if impl == "triton":
                ctx.errors.append(f"{op} {shape_label(shape)}: {_first_line(e)}")
            oom = f"raised {_first_line(e)}"
        if oom:  # outside the except block: its traceback (holding the graphs) is gone, the memory free
            skip_and_free(ctx, op, impl, oom, shape)
    del sets


def _outputs_and_grads(fn, inputs, grads):
    outs = _as_tuple(fn(*inputs))
    return [o.detach() for o in outs] + list(torch.autograd.grad(outs, inputs, grads, allow_unused=True))


def _bench_one(ctx: Ctx, op: str, shape: dict, dtypes: dict, impl: str, fn: Callable, sets: list,
               reference_out: list | None, low: bool, nbytes: dict | None, flops: dict | None,
               memory: bool) -> list[dict]:
    """bench_impls for one implementation: check (unless reference_out is None), time the three passes on
    the rotating sets, then (optionally) measure memory. Returns its rows."""
    status = None
    if reference_out is not None:
        status = check_close(impl, _outputs_and_grads(fn, *sets[0]), reference_out, low)
    if status:
        print(f"  CHECK FAILED {op} {shape} {status}")
    # Graphs for the backward-only timing: one forward per set, retained across calls.
    graphs = [(_as_tuple(fn(*inp)), inp, g) for inp, g in sets]
    step = {"i": 0}

    def next_set(pool):
        step["i"] += 1
        return pool[step["i"] % len(pool)]

    def run_fwd():
        inp, _ = next_set(sets)
        return fn(*inp)

    def run_bwd():
        outs, inp, g = next_set(graphs)
        return torch.autograd.grad(outs, inp, g, retain_graph=True, allow_unused=True)

    def run_both():
        inp, g = next_set(sets)
        return torch.autograd.grad(_as_tuple(fn(*inp)), inp, g, allow_unused=True)

    rows = []
    for pass_, run in zip(PASSES, (run_fwd, run_bwd, run_both)):
        rows.append(result_row(op, shape, dtypes, pass_, impl, timer(ctx, run),
                               nbytes=nbytes[pass_] if nbytes else None,
                               flops=flops[pass_] if flops else None, check=status))
    del graphs
    if memory and ctx.device.type == "cuda":
        mb = peak_extra_mb(fn, *sets[0])
        for row in rows:
            row["peak_mb"] = mb[row["pass"]]
    return rows


def peer_impls(ctx: Ctx, triton_fn: Callable, torch_fn: Callable) -> dict[str, Callable]:
    impls = {"triton": triton_fn, "torch": torch_fn}
    if "compile" in ctx.peers:
        # The backward-only timing replays retained graphs (retain_graph=True); AOTAutograd's donated
        # buffers (reusing saved tensors' memory for grads, a memory saving) forbid that. Recorded.
        import torch._functorch.config as functorch_config

        functorch_config.donated_buffer = False
        impls["torch.compile"] = torch.compile(torch_fn, dynamic=False)
    return impls


# ------------------------------------------------------------------------------------------- cases


def case_layernorm(ctx: Ctx) -> None:
    from tritonrun.gpt2.ops import torch_layer_norm
    from tritonrun.kernels import layernorm as ln

    C, dev = ctx.C, ctx.device
    xd, pd = ctx.dtype("high"), ctx.dtype("high")  # the first LN normalizes the fp32 embedding sum
    for rows in ctx.rows:
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, C, device=dev, generator=g).to(xd).requires_grad_()
            w = (1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            b = (0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            return [x, w, b], [torch.randn(rows, C, device=dev, generator=g).to(xd)]

        nbytes = {p: ln.bytes_moved(rows, C, p, x=xd, y=xd, w=pd) for p in PASSES}
        bench_impls(ctx, "layernorm", {"rows": rows, "C": C}, {"x": xd, "weight": pd}, make_set,
                    peer_impls(ctx, ln.layer_norm, torch_layer_norm), nbytes)


def case_add_layernorm(ctx: Ctx) -> None:
    from tritonrun.gpt2.ops import torch_add_layer_norm
    from tritonrun.kernels import layernorm as ln

    C, dev = ctx.C, ctx.device
    xd, rd, pd = ctx.dtype("low"), ctx.dtype("high"), ctx.dtype("high")
    yd = torch.promote_types(xd, rd)
    for rows in ctx.rows:
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, C, device=dev, generator=g).to(xd).requires_grad_()
            r = torch.randn(rows, C, device=dev, generator=g).to(rd).requires_grad_()
            w = (1 + 0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            b = (0.1 * torch.randn(C, device=dev, generator=g)).to(pd).requires_grad_()
            dy, ds = (torch.randn(rows, C, device=dev, generator=g).to(yd) for _ in range(2))
            return [x, r, w, b], [dy, ds]

        nbytes = {p: ln.bytes_moved(rows, C, p, x=xd, y=yd, w=pd, residual=rd) for p in PASSES}
        bench_impls(ctx, "add_layernorm", {"rows": rows, "C": C}, {"x": xd, "residual": rd, "weight": pd},
                    make_set, peer_impls(ctx, ln.add_layer_norm, torch_add_layer_norm), nbytes)


def case_gelu(ctx: Ctx) -> None:
    from tritonrun.gpt2.ops import torch_gelu
    from tritonrun.kernels import gelu as ge

    H, dev, xd = 4 * ctx.C, ctx.device, ctx.dtype("low")  # GELU sits on the MLP's 4C-wide hidden layer
    for rows in ctx.rows:
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, H, device=dev, generator=g).to(xd).requires_grad_()
            return [x], [torch.randn(rows, H, device=dev, generator=g).to(xd)]

        nbytes = {p: ge.bytes_moved(rows * H, p, dtype=xd) for p in PASSES}
        bench_impls(ctx, "gelu", {"rows": rows, "C": H}, {"x": xd}, make_set,
                    peer_impls(ctx, ge.gelu, torch_gelu), nbytes)


# ---- issue 26's speedrun ops (tritonrun/kernels/rmsnorm.py, tritonrun/kernels/relu2.py): d12 training shapes ---------
# rows = 8 * 1024 (the rtx4070 preset's micro-batch x T; --quick too), C = 768, relu2 on the 4C = 3072 MLP hidden
# layer. Peers: the record's own PyTorch (F.rms_norm with eps=None, F.relu(x).square()), eager and compiled.
# Dtypes under autocast: the first norm sees the fp32 embeddings, add_rmsnorm a bf16 branch output + the fp32
# residual stream, mix_rmsnorm the fp32 stream x and x0 with fp32 lambdas, relu2 c_fc's bf16 output.
SPEEDRUN_ROWS = 8 * 1024


def _speedrun_rows(ctx: Ctx) -> list[int]:
    return ctx.rows if ctx.smoke else [SPEEDRUN_ROWS]


def speedrun_torch_rms_norm(x):
    return torch.nn.functional.rms_norm(x, (x.shape[-1],))


def speedrun_torch_add_rms_norm(x, residual):
    s = x + residual
    return torch.nn.functional.rms_norm(s, (s.shape[-1],)), s


def speedrun_torch_mix_rms_norm(x, x0, lambdas):
    s = lambdas[0] * x + lambdas[1] * x0  # the record's Block.forward
    return torch.nn.functional.rms_norm(s, (s.shape[-1],)), s


def speedrun_torch_relu2(x):
    return torch.nn.functional.relu(x).square()


def _rms_case(ctx: Ctx, op: str, kernel_op: str, xd: torch.dtype, od: torch.dtype | None) -> None:
    """One RMSNorm variant: `kernel_op` names the tritonrun/kernels/rmsnorm.py function and its bytes_moved formula."""
    from tritonrun.kernels import rmsnorm as rn

    C, dev = ctx.C, ctx.device
    yd = xd if od is None else torch.promote_types(xd, od)
    ours = {"rms_norm": lambda x: rn.rms_norm(x), "add_rms_norm": lambda x, r: rn.add_rms_norm(x, r),
            "mix_rms_norm": lambda x, x0, lam: rn.mix_rms_norm(x, x0, lam)}[kernel_op]
    peer = {"rms_norm": speedrun_torch_rms_norm, "add_rms_norm": speedrun_torch_add_rms_norm,
            "mix_rms_norm": speedrun_torch_mix_rms_norm}[kernel_op]
    for rows in _speedrun_rows(ctx):
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            inputs = [torch.randn(rows, C, device=dev, generator=g).to(xd).requires_grad_()]
            if od is not None:
                inputs.append(torch.randn(rows, C, device=dev, generator=g).to(od).requires_grad_())
            if kernel_op == "mix_rms_norm":
                inputs.append(torch.tensor([0.9, 0.3], device=dev).requires_grad_())  # fp32 model scalars
            grads = [torch.randn(rows, C, device=dev, generator=g).to(yd) for _ in range(1 if od is None else 2)]
            return inputs, grads

        nbytes = {p: rn.bytes_moved(rows, C, p, x=xd, other=od, op=kernel_op) for p in PASSES}
        dtypes = {"x": xd} if od is None else {"x": xd, ("residual" if kernel_op == "add_rms_norm" else "x0"): od}
        bench_impls(ctx, op, {"rows": rows, "C": C}, dtypes, make_set, peer_impls(ctx, ours, peer), nbytes)


def case_rmsnorm(ctx: Ctx) -> None:
    _rms_case(ctx, "rmsnorm", "rms_norm", ctx.dtype("high"), None)  # the norm of the fp32 embeddings


def case_add_rmsnorm(ctx: Ctx) -> None:
    _rms_case(ctx, "add_rmsnorm", "add_rms_norm", ctx.dtype("low"), ctx.dtype("high"))


def case_mix_rmsnorm(ctx: Ctx) -> None:
    _rms_case(ctx, "mix_rmsnorm", "mix_rms_norm", ctx.dtype("high"), ctx.dtype("high"))


def case_relu2(ctx: Ctx) -> None:
    from tritonrun.kernels import relu2 as r2

    H, dev, xd = 4 * ctx.C, ctx.device, ctx.dtype("low")  # ReLU^2 sits on the MLP's 4C-wide hidden layer
    for rows in _speedrun_rows(ctx):
        def make_set(seed, rows=rows):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, H, device=dev, generator=g).to(xd).requires_grad_()
            return [x], [torch.randn(rows, H, device=dev, generator=g).to(xd)]

        nbytes = {p: r2.bytes_moved(rows * H, p, dtype=xd) for p in PASSES}
        bench_impls(ctx, "relu2", {"rows": rows, "C": H}, {"x": xd}, make_set,
                    peer_impls(ctx, r2.relu2, speedrun_torch_relu2), nbytes)
# ---- end of issue 26's speedrun ops ----------------------------------------------------------------------------


def measure_matmul_peak(ctx: Ctx) -> dict:
    """The achievable matmul rate, once per run: bf16 torch.matmul 8192 x 8192 x 8192 (smoke: a small fp32
    one, only so the field exists). Attention and cross-entropy rows report their TFLOPS against it."""
    if ctx.matmul_peak is None:
        n, dt = (256, torch.float32) if ctx.smoke else (8192, torch.bfloat16)
        g = torch.Generator(device=ctx.device).manual_seed(0)
        a, b = (torch.randn(n, n, device=ctx.device, generator=g).to(dt) for _ in range(2))
        q20, med, q80 = timer(ctx, lambda: torch.matmul(a, b))
        ctx.matmul_peak = {"tflops": 2 * n ** 3 / (med * 1e-3) / 1e12, "ms": med, "ms_q20": q20, "ms_q80": q80,
                           "shape": [n, n, n], "dtype": str(dt).replace("torch.", "")}
        del a, b
    return ctx.matmul_peak


def _missing(e: Exception, package: str) -> bool:
    """True when e says `package` itself is not installed (not a broken install)."""
    return isinstance(e, ModuleNotFoundError) and (e.name or "").split(".")[0] == package


def try_peer(fn: Callable, inputs: list, grads: list) -> str | None:
    """Run fn forward + backward once; None if it works, else why not (the error and any warnings, such as
    SDPA's 'Flash attention kernel not used because ...')."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.autograd.grad(_as_tuple(fn(*inputs)), inputs, grads, allow_unused=True)
            return None
        except Exception as e:  # noqa: BLE001 -- any failure means "this peer does not run here": record it
            why = [_first_line(e)] + [" ".join(str(w.message).split()) for w in caught]
            return "; ".join(dict.fromkeys(why))[:800]


# AdamW at the llm.c recipe's settings; the smoke run steps a 2-layer model with a 256-row vocab (28 tensors).
ADAMW_HYPER = dict(lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
ADAMW_WEIGHT_DECAY, ADAMW_CLIP = 0.1, 1.0


def case_adamw(ctx: Ctx) -> None:
    from tritonrun.gpt2.config import MODEL_SIZES, GPTConfig
    from tritonrun.gpt2.model import GPT
    from tritonrun.kernels import adamw as aw

    if ctx.smoke:
        name, cfg = "smoke", GPTConfig(block_size=64, vocab_size=250, padded_vocab_size=256, n_layer=2, n_head=2,
                                       n_embd=64)
    else:
        name, cfg = "d12", MODEL_SIZES["d12"]
    # Params: fp32, as the trainer keeps them (autocast), or the one --dtype. bf16 stays bf16 in the smoke run
    # too: FusedAdamW reads and writes bf16 with integer ops, exact under the interpreter.
    dev = ctx.device
    pd = {"autocast": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16,
          "fp16": torch.float16}[ctx.dtype_mode]
    if pd == torch.float16:
        skip(ctx, "adamw", "all", "fp16 params not benchmarked: torch.optim.AdamW keeps fp16 state, where v "
             "underflows and eps=1e-8 rounds to 0 (NaN updates); use --dtype fp32 or bf16")
        return
    torch.manual_seed(0)
    model = GPT(cfg).to(device=dev, dtype=pd)
    params = [p for g in model.param_groups(ADAMW_WEIGHT_DECAY) for p in g["params"]]
    n = sum(p.numel() for p in params)
    init = [p.detach().clone() for p in params]
    shape = {"model": name, "tensors": len(params), "params": n}
    dtypes = {"param": pd, "grad": pd, "state": torch.float32}
    nbytes = aw.bytes_moved(n, pd, master_weights=True, clip=True)

    def reset() -> None:
        """The same params and grads before every implementation's first step (grad norm ~1e-3 * sqrt(n):
        the clip is active)."""
        g = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(p0)
                p.grad = (1e-3 * torch.randn(p.shape, device=dev, generator=g)).to(pd)

    def fused_adamw():
        opt = aw.FusedAdamW(model.param_groups(ADAMW_WEIGHT_DECAY), **ADAMW_HYPER)

        def step():  # the clip coefficient stays on the device; step() applies it as it loads the grads
            opt.clip_grad_norm_(ADAMW_CLIP)
            opt.step()
        return step

    def torch_adamw(**kind):
        def make():
            # param_groups() again: torch.optim writes its defaults into the group dicts it is given
            opt = torch.optim.AdamW(model.param_groups(ADAMW_WEIGHT_DECAY), **ADAMW_HYPER, **kind)

            def step():
                torch.nn.utils.clip_grad_norm_(params, ADAMW_CLIP)  # foreach on CUDA: norm, then grads *= coef
                opt.step()
            return step
        return make

    impls = {"triton": fused_adamw, "torch.fused": torch_adamw(fused=True),
             "torch.foreach": torch_adamw(foreach=True)}

    def first_step(make):
        """Build the optimizer and take one step from the reset state: creates the optimizer state (timing
        then steps on in place; each step moves the same bytes) and gives what the check compares. fp32:
        the update p1 - p0 (~lr); 16-bit params: the params (an update is below their resolution)."""
        reset()
        step = make()
        step()
        with torch.no_grad():
            got = [p.detach().float() - p0.float() for p, p0 in zip(params, init)] if pd == torch.float32 else \
                  [p.detach().clone() for p in params]
        return step, got

    _, reference = first_step(impls["torch.foreach"])  # plain torch, the check's reference
    tol = 1e-3 if pd == torch.float32 else 3e-2  # fp32 update vs p's own rounding: ulp(1) / lr ~ 2e-4
    for impl, make in impls.items():
        oom = None
        try:
            step, got = first_step(make)
            status = check_close(impl, got, reference, pd != torch.float32, tol=tol)
            del got
            if status:
                print(f"  CHECK FAILED adamw {shape} {status}")
            ctx.results.append(result_row("adamw", shape, dtypes, "step", impl, timer(ctx, step), nbytes=nbytes,
                                          check=status))
            del step
        except torch.cuda.OutOfMemoryError as e:
            oom = f"out of memory: {_first_line(e, 160)}"
        except Exception as e:  # as in bench_impls: one optimizer's crash must not cost the others or the record
            if impl == "triton":
                ctx.errors.append(f"adamw {shape_label(shape)}: {_first_line(e)}")
            oom = f"raised {_first_line(e)}"
        if oom:
            skip_and_free(ctx, "adamw", impl, oom, shape)


# Muon at the 2024-11-10 record's settings (lr 0.04, momentum 0.95, Nesterov, 5 quintic steps in bf16) over the
# d12 speedrun's hidden matrices: 12 layers x (4 x 768x768 q/k/v/proj, 3072x768 c_fc, 768x3072 proj) = 72 fp32
# tensors, 84,934,656 params, random grads. The smoke run steps 2 layers at width 64 (12 tensors).
MUON_HYPER = dict(lr=0.04, momentum=0.95)


def case_muon(ctx: Ctx) -> None:
    from tritonrun.kernels import muon as mu

    name, layers, C = ("smoke", 2, 64) if ctx.smoke else ("d12", 12, 768)
    shapes = [(C, C)] * 4 + [(4 * C, C), (C, 4 * C)]
    shapes = shapes * layers
    dev = ctx.device
    gen = torch.Generator(device=dev).manual_seed(0)
    params = [(0.02 * torch.randn(s, device=dev, generator=gen)).requires_grad_() for s in shapes]
    init = [p.detach().clone() for p in params]
    n = sum(p.numel() for p in params)
    shape = {"model": name, "tensors": len(params), "params": n}
    dtypes = {"param": torch.float32, "grad": torch.float32, "state": torch.float32, "newton_schulz": torch.bfloat16}
    flops = float(sum(mu.newton_schulz_flops(*s) for s in shapes))  # Newton-Schulz matmuls, the same for all

    def reset() -> None:
        g = torch.Generator(device=dev).manual_seed(1)
        with torch.no_grad():
            for p, p0 in zip(params, init):
                p.copy_(p0)
                p.grad = 1e-3 * torch.randn(p.shape, device=dev, generator=g)

    def ours():
        return mu.Muon(params, **MUON_HYPER).step

    def loop(orthogonalize):
        def make():
            bufs = [torch.zeros_like(p) for p in params]

            @torch.no_grad()
            def step():  # the record's per-tensor loop (one process: no sharding, no all-reduce)
                mu.reference_muon_step(params, [p.grad for p in params], bufs, orthogonalize=orthogonalize,
                                       nesterov=True, **MUON_HYPER)
            return step
        return make

    impls = {"triton": ours, "torch": loop(mu.reference_newton_schulz)}
    if "compile" in ctx.peers and not ctx.smoke:  # the record compiles its Newton-Schulz; CPU smoke runs skip it
        impls["torch.compile"] = loop(torch.compile(mu.reference_newton_schulz))

    def first_step(make):
        reset()
        step = make()
        step()
        with torch.no_grad():
            got = [p.detach() - p0 for p, p0 in zip(params, init)]
        return step, got

    _, reference = first_step(impls["torch"])
    for impl, make in impls.items():
        failed = None
        try:
            step, got = first_step(make)
            # Two bf16 Newton-Schulz iterations (ours: fp32 norm and addmm epilogues; the loop: the record's op by op
            # bf16) each sit ~1-3 % of max|O| from the exact one (tests/test_muon.py holds the tight fp64 checks).
            status = check_close(impl, got, reference, True, tol=8e-2)
            del got
            if status:
                print(f"  CHECK FAILED muon {shape} {status}")
            ctx.results.append(result_row("muon", shape, dtypes, "step", impl, timer(ctx, step), flops=flops,
                                          check=status))
            del step
        except torch.cuda.OutOfMemoryError as e:
            failed = f"out of memory: {_first_line(e, 160)}"
        except Exception as e:  # one implementation's crash must not cost the others or the record
            if impl == "triton":
                ctx.errors.append(f"muon {shape_label(shape)}: {_first_line(e)}")
            failed = f"raised {_first_line(e)}"
        if failed:
            skip_and_free(ctx, "muon", impl, failed, shape)


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T * s + causal mask) v written out, softmax in fp32: the eager / torch.compile peer."""
    T, D = q.shape[-2], q.shape[-1]
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(D))
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~causal, float("-inf"))
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def sdpa_peers() -> dict[str, Callable]:
    """One causal F.scaled_dot_product_attention per SDPA backend, each forced with sdpa_kernel."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def forced(backend):
        def fn(q, k, v):
            with sdpa_kernel([backend]):  # the backward runs the kernel the forward picked
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return fn

    return {"sdpa.flash": forced(SDPBackend.FLASH_ATTENTION), "sdpa.cudnn": forced(SDPBackend.CUDNN_ATTENTION),
            "sdpa.efficient": forced(SDPBackend.EFFICIENT_ATTENTION)}


def case_attention(ctx: Ctx) -> None:
    from tritonrun.kernels import attention as at

    dev, dt = ctx.device, ctx.dtype("low")  # bf16: what autocast's c_attn hands attention
    H, T, D = (1, 64, 64) if ctx.smoke else (12, 1024, 64)
    batches = [1] if ctx.smoke else ([16] if ctx.quick else [16, 32])
    measure_matmul_peak(ctx)

    def reference(q, k, v):  # fp32 math from the same low-precision inputs, untimed
        return at.attention_reference(q.float(), k.float(), v.float()).to(q.dtype)

    for B in batches:
        shape = {"B": B, "H": H, "T": T, "D": D}

        def make_set(seed, B=B):
            # q, k, v in (B, T, H, D) memory viewed as (B, H, T, D): the model's head layout (D contiguous,
            # T strided), which every implementation reads in place.
            g = torch.Generator(device=dev).manual_seed(seed)
            qkv = [torch.randn(B, T, H, D, device=dev, generator=g).to(dt).transpose(1, 2).requires_grad_()
                   for _ in range(3)]
            return qkv, [torch.randn(B, T, H, D, device=dev, generator=g).to(dt).transpose(1, 2)]

        impls = peer_impls(ctx, at.causal_attention, math_attention)
        probe = make_set(0)
        for name, fn in sdpa_peers().items():
            why = try_peer(fn, *probe)
            if why is None:
                impls[name] = fn
            else:
                skip(ctx, "attention", name, why, shape)
        del probe
        flops = {p: at.attention_flops(B, H, T, D, causal=True, mode=p.replace("+", "_")) for p in PASSES}
        bench_impls(ctx, "attention", shape, {"q": dt, "k": dt, "v": dt}, make_set, impls, None, flops=flops,
                    reference=reference)


def case_cross_entropy(ctx: Ctx) -> None:
    from tritonrun.gpt2.ops import torch_linear_cross_entropy
    from tritonrun.kernels import cross_entropy as lce

    dev, dt = ctx.device, ctx.dtype("low")  # bf16 h (ln_f's output under autocast) and tied wte
    # rows, C, V (padded wte rows), vocab_size (real classes); the smoke shape keeps 6 padded rows
    N, C, V, vocab = (64, 64, 256, 250) if ctx.smoke else (16 * 1024, ctx.C, 50304, 50257)
    shape = {"rows": N, "C": C, "V": V, "vocab_size": vocab}
    measure_matmul_peak(ctx)
    targets = torch.randint(0, vocab, (N,), device=dev, generator=torch.Generator(device=dev).manual_seed(7))

    def make_set(seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        h = torch.randn(N, C, device=dev, generator=g).to(dt).requires_grad_()
        w = (0.02 * torch.randn(V, C, device=dev, generator=g)).to(dt).requires_grad_()  # GPT-2's init std
        return [h, w], [torch.ones((), device=dev)]

    def ours(h, w):
        return lce.linear_cross_entropy(h, w, targets, ignore_index=-1, vocab_size=vocab)

    def eager(h, w):
        return torch_linear_cross_entropy(h, w, targets, ignore_index=-1, vocab_size=vocab)

    impls = peer_impls(ctx, ours, eager)
    # Third-party fused peers, only if installed (never dependencies). Both get weight[:vocab] so that padded
    # rows stay out of the softmax; the slice's backward writes the full-size weight grad.
    probe = make_set(0)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-1)
        impls["liger"] = lambda h, w: liger_loss(w[:vocab], h, targets)  # (lin_weight, input, target)
    except Exception as e:  # not installed, or broken on import: a skipped peer, not a lost record
        skip(ctx, "cross_entropy", "liger", "not installed: pip install liger-kernel"
             if _missing(e, "liger_kernel") else f"import failed: {_first_line(e)}")
    try:
        from cut_cross_entropy import linear_cross_entropy as cce_linear_cross_entropy

        # filter_eps=None: exact gradients like ours (its default skips small softmax terms in the backward,
        # which can move dW past the 3% agreement check; speed is compared at equal exactness)
        impls["cut-cross-entropy"] = lambda h, w: cce_linear_cross_entropy(h, w[:vocab], targets, ignore_index=-1,
                                                                           filter_eps=None)
    except Exception as e:  # not installed, or broken on import: a skipped peer, not a lost record
        skip(ctx, "cross_entropy", "cut-cross-entropy", "not installed: pip install cut-cross-entropy"
             if _missing(e, "cut_cross_entropy") else f"import failed: {_first_line(e)}")
    for name in ("liger", "cut-cross-entropy"):
        why = try_peer(impls[name], *probe) if name in impls else None
        if why is not None:
            del impls[name]
            skip(ctx, "cross_entropy", name, why, shape)
    del probe
    # Model FLOPs of the materialized op (2NVC forward, 4NVC backward; the fused kernel executes 4NVC more
    # in recompute), one formula for every implementation.
    flops = {p: lce.lce_flops(N, vocab, C, part=p.replace("+", "_"), executed=False) for p in PASSES}

    def reference(h, w):
        # fp32, over 8 row chunks recomputed in the backward: ~1.5 GB at N = 16K where the eager peer's forward +
        # backward peaks near 10 GB (three fp32 N x V tensors), more than a 12 GB card has beside the rest.
        # Every implementation, eager torch included, is checked against it.
        return lce.linear_cross_entropy_reference(h, w, targets, -1, vocab, compute_dtype=torch.float32,
                                                  chunk_rows=max(1, N // 8))

    # One input set: h + weight (100 MB) already exceed any L2, and the eager peer's retained graph holds
    # 3+ GB of fp32 logits per set.
    bench_impls(ctx, "cross_entropy", shape, {"h": dt, "weight": dt}, make_set, impls, None, flops=flops,
                reference=reference, memory=True, max_sets=1)


# ---- qk_norm_rope (issue 26: the speedrun's QK-norm + RoPE) ----


def case_qk_norm_rope(ctx: Ctx) -> None:
    from tritonrun.kernels import rope

    dev, dt = ctx.device, ctx.dtype("low")  # bf16: c_q / c_k outputs under autocast
    B, T, H, D = (1, 37, 2, 64) if ctx.smoke else (8, 1024, 6, 128)  # d12 speedrun micro-batch: 8 x 1024 tokens
    cos, sin = rope.rope_tables(T, D, device=dev)
    shape = {"B": B, "H": H, "T": T, "D": D}

    def make_set(seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        q, k = (torch.randn(B, T, H, D, device=dev, generator=g).to(dt).requires_grad_() for _ in range(2))
        # attention's dq, dk: (B, H, T, D) views of (B, T, H, D) memory
        grads = [torch.randn(B, T, H, D, device=dev, generator=g).to(dt).transpose(1, 2) for _ in range(2)]
        return [q, k], grads

    def ours(q, k):
        return rope.qk_norm_rope(q, k, cos, sin, 1e-6)

    def torch_path(q, k):
        return rope.reference_qk_norm_rope(q, k, cos, sin, 1e-6, compute_dtype=None)

    nbytes = {p: rope.bytes_moved(B, T, H, D, p, dtype=dt) for p in PASSES}
    bench_impls(ctx, "qk_norm_rope", shape, {"q": dt, "k": dt, "tables": torch.float32}, make_set,
                peer_impls(ctx, ours, torch_path), nbytes)


# ---- window_attention (issue 27: document-masked sliding-window attention, tritonrun/kernels/window_attention.py) ----
WINDOW_T, WINDOW_T_QUICK = 65_536, 16_384  # the speedrun's packed sequence (B = 1), and --quick's
WINDOWS, WINDOWS_QUICK = (64, 256, 1024, 1_792, 4_096), (64, 1_792)  # the record's schedule spans 64 -> 1,792
WINDOW_MEAN_DOC = 1_000  # tokens: synthetic documents, lengths uniform in [1, 2 * mean) (fixed seed)
WINDOW_DENSE_REFERENCE_MAX_T = 4_096  # the eager dense-masked peer materializes (H, T, T) scores


def window_docs(T: int, mean: int, seed: int = 0) -> list[int]:
    """Document boundaries cu_seqlens (0 first, T last) of random lengths, uniform in [1, 2 * mean)."""
    import random

    rng, cuts = random.Random(seed), [0]
    while cuts[-1] < T:
        cuts.append(min(T, cuts[-1] + rng.randrange(1, 2 * mean)))
    return cuts


def flex_window_peer(cu: torch.Tensor, T: int, window: int, device) -> Callable:
    """torch.compile'd FlexAttention with the same mask (same document, 0 <= q - kv < window); its block mask is
    built once here, outside the timed call (as a trainer would build it once per step)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.searchsorted(cu, torch.arange(T, device=device, dtype=torch.int32), right=True)

    def mask_mod(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T, KV_LEN=T, device=device)
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, block_mask=block_mask)


def case_window_attention(ctx: Ctx) -> None:
    """At fixed T, for each window: ours against compiled FlexAttention with the same mask (and, at small T,
    the eager dense-masked math), plus dense causal SDPA (no document mask, no window: what attention costs
    without the sparsity; its rows are checked against nothing but themselves, they compute other math)."""
    import torch.nn.functional as F

    from tritonrun.kernels import window_attention as wa

    dev, dt = ctx.device, ctx.dtype("low")
    B, H, D = 1, (1 if ctx.smoke else 6), (64 if ctx.smoke else 128)
    T = 64 if ctx.smoke else (WINDOW_T_QUICK if ctx.quick else WINDOW_T)
    windows = (4, 16) if ctx.smoke else (WINDOWS_QUICK if ctx.quick else WINDOWS)
    cuts = window_docs(T, 24 if ctx.smoke else WINDOW_MEAN_DOC)
    cu = torch.tensor(cuts, dtype=torch.int32, device=dev)
    lengths = [b - a for a, b in zip(cuts, cuts[1:])]
    dtypes = {"q": dt, "k": dt, "v": dt}
    measure_matmul_peak(ctx)

    def make_set(seed):  # the model's layout: (B, T, H, D) memory viewed as (B, H, T, D)
        g = torch.Generator(device=dev).manual_seed(seed)
        qkv = [torch.randn(B, T, H, D, device=dev, generator=g).to(dt).transpose(1, 2).requires_grad_()
               for _ in range(3)]
        return qkv, [torch.randn(B, T, H, D, device=dev, generator=g).to(dt).transpose(1, 2)]

    for window in windows:
        shape = {"B": B, "H": H, "T": T, "D": D, "window": window, "docs": len(lengths)}
        impls = {"triton": lambda q, k, v, w=window: wa.window_attention(q, k, v, cu, w)}
        reference = None
        if T <= WINDOW_DENSE_REFERENCE_MAX_T:
            impls["torch"] = lambda q, k, v, w=window: wa.window_attention_reference(q, k, v, cu, w)
            reference = lambda q, k, v, w=window: wa.window_attention_reference(  # noqa: E731
                q.float(), k.float(), v.float(), cu, w).to(q.dtype)
        else:
            skip(ctx, "window_attention", "torch", f"the eager dense-masked math needs (H, T, T) scores: "
                 f"T = {T} > {WINDOW_DENSE_REFERENCE_MAX_T}", shape)
        if dev.type != "cuda":
            skip(ctx, "window_attention", "flex_attention.compile", "smoke run on CPU: FlexAttention is timed "
                 "on a CUDA GPU only", shape)
        else:
            try:
                flex = flex_window_peer(cu, T, window, dev)
                why = try_peer(flex, *make_set(0))
            except Exception as e:  # noqa: BLE001 - not installed / not supported here: recorded with the reason
                why = _first_line(e)
            if why is None:
                impls["flex_attention.compile"] = flex
                reference = reference or flex  # an independent implementation of the same mask checks ours
            else:
                skip(ctx, "window_attention", "flex_attention.compile", why, shape)
        if reference is None:  # nothing independent can run at this T: ours is recorded, marked unchecked
            print(f"  window_attention {shape}: no reference can run (no FlexAttention, T too long for the "
                  "dense math): ours unchecked")
            reference = impls["triton"]
        flops = {p: wa.window_attention_flops(B, H, lengths, D, window, mode=p.replace("+", "_")) for p in PASSES}
        bench_impls(ctx, "window_attention", shape, dtypes, make_set, impls, None, flops=flops, reference=reference,
                    max_sets=2)

        def dense(q, k, v):  # dense causal SDPA over all T (the cost without sparsity); checked against itself
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        flops = {p: attention_flops_dense(B, H, T, D, p) for p in PASSES}
        bench_impls(ctx, "window_attention", shape, dtypes, make_set, {"sdpa.causal_dense": dense}, None,
                    flops=flops, reference=dense, max_sets=2)


def attention_flops_dense(B: int, H: int, T: int, D: int, pass_: str) -> float:
    from tritonrun.kernels.attention import attention_flops

    return attention_flops(B, H, T, D, causal=True, mode=pass_.replace("+", "_"))
# ---- end of window_attention ----------------------------------------------------------------------------------


# ---- fp8_linear (issue 35: record #89's FP8 matmuls, tritonrun/kernels/fp8.py) ---------------------------------
class ScaledMmLinear(torch.autograd.Function):
    """The torch peer: tritonrun/kernels/fp8.py's formulas on torch._scaled_mm (cuBLASLt on CUDA: row-major A,
    column-major B), the operands quantized by torch's own casts (fp8.reference_quantize)."""

    @staticmethod
    def forward(ctx, x, w, x_s, w_s, g_s):
        from tritonrun.kernels.fp8 import E4M3, reference_quantize

        x8, w8 = reference_quantize(x, x_s, E4M3), reference_quantize(w, w_s, E4M3)
        ctx.save_for_backward(x8, w8)
        ctx.scales = (x_s, w_s, g_s)
        one = lambda v: torch.tensor(v, dtype=torch.float32, device=x.device)  # noqa: E731
        return torch._scaled_mm(x8, w8.t(), scale_a=one(x_s), scale_b=one(w_s), out_dtype=torch.bfloat16)

    @staticmethod
    def backward(ctx, dy):
        from tritonrun.kernels.fp8 import E5M2, reference_quantize

        x8, w8 = ctx.saved_tensors
        x_s, w_s, g_s = ctx.scales
        one = lambda v: torch.tensor(v, dtype=torch.float32, device=dy.device)  # noqa: E731
        g8 = reference_quantize(dy, g_s, E5M2)
        dx = torch._scaled_mm(g8, w8.t().contiguous().t(), scale_a=one(g_s), scale_b=one(w_s),
                              out_dtype=torch.bfloat16)
        dw = torch._scaled_mm(g8.t().contiguous(), x8.t().contiguous().t(), scale_a=one(g_s), scale_b=one(x_s),
                              out_dtype=torch.float32)
        return dx, dw, None, None, None


class Fp8Emulated(torch.autograd.Function):
    """The check's reference: tritonrun/kernels/fp8.py's reference_fp8_linear (torch's fp8 casts, fp64 products) as
    an autograd function."""

    @staticmethod
    def forward(ctx, x, w, x_s, w_s, g_s):
        from tritonrun.kernels.fp8 import reference_fp8_linear

        ctx.save_for_backward(x, w)
        ctx.scales = (x_s, w_s, g_s)
        return reference_fp8_linear(x, w, x_s, w_s, g_s)

    @staticmethod
    def backward(ctx, dy):
        from tritonrun.kernels.fp8 import reference_fp8_linear

        x, w = ctx.saved_tensors
        _, dx, dw = reference_fp8_linear(x, w, *ctx.scales, dy)
        return dx, dw, None, None, None


FP8_SCALES = (2 / 448, 6 / 448, 1 / 448)  # x_s, w_s, grad_s for unit-scale inputs (tests/test_fp8.py's)


def case_fp8_linear(ctx: Ctx) -> None:
    """y = x W^T in FP8 at d12's three FP8 products (MLP up C -> 4C, MLP down 4C -> C, LM head C -> 50,304), rows =
    8,192 (a packed micro-batch; smoke: 64 rows of a 64-wide model). Peers: torch._scaled_mm (ScaledMmLinear). Model
    FLOPs 2MNK forward, 4MNK backward; the bf16 matmul peak (measure_matmul_peak) is the record's bf16 yardstick."""
    from tritonrun.kernels import fp8

    dev = ctx.device
    if not fp8.fp8_supported(dev):
        skip(ctx, "fp8_linear", "all", "needs FP8 tensor cores (sm_89 Ada or sm_90 Hopper)")
        return
    measure_matmul_peak(ctx)
    C = 64 if ctx.smoke else ctx.C
    rows = 64 if ctx.smoke else 8 * 1024
    for what, (n_out, n_in) in (("mlp_up", (4 * C, C)), ("mlp_down", (C, 4 * C)), ("lm_head", (50_304, C))):
        if ctx.smoke and what == "lm_head":
            n_out = 512

        def make_set(seed, n_out=n_out, n_in=n_in):
            g = torch.Generator(device=dev).manual_seed(seed)
            x = torch.randn(rows, n_in, device=dev, generator=g).bfloat16().requires_grad_()
            w = (torch.randn(n_out, n_in, device=dev, generator=g) * 0.5).requires_grad_()
            return [x, w], [(0.1 * torch.randn(rows, n_out, device=dev, generator=g)).bfloat16()]

        impls = {"triton": lambda x, w: fp8.fp8_linear(x, w, *FP8_SCALES),
                 "torch._scaled_mm": lambda x, w: ScaledMmLinear.apply(x, w, *FP8_SCALES)}
        probe = make_set(0)
        why = try_peer(impls["torch._scaled_mm"], *probe)
        del probe
        shape = {"rows": rows, "K": n_in, "N": n_out, "what": what}
        if why is not None:
            del impls["torch._scaled_mm"]
            skip(ctx, "fp8_linear", "torch._scaled_mm", why, shape)
        flops = {"fwd": 2.0 * rows * n_in * n_out, "bwd": 4.0 * rows * n_in * n_out,
                 "fwd+bwd": 6.0 * rows * n_in * n_out}
        bench_impls(ctx, "fp8_linear", shape, {"x": torch.bfloat16, "weight": torch.float32}, make_set, impls, None,
                    flops=flops, reference=lambda x, w: Fp8Emulated.apply(x, w, *FP8_SCALES), max_sets=2)
# ---- end of fp8_linear ---------------------------------------------------------------------------------------


def case_relu2_mlp(ctx: Ctx) -> None:
    """Record #89's ReLU^2 MLP step in bf16 (tritonrun/kernels/mlp_relu2.py: up projection fused with relu^2, only post
    saved, the backward's 2 (g W2) sqrt(post) fused) at d12, 8,192 rows (smoke: 64 rows, 64 wide, fp32 operands: the
    interpreter's bf16 tl.dot is wrong). Peers: relu(x W1^T)^2 W2^T in torch, eager and torch.compile'd. Model FLOPs
    4 M C H forward (two matmuls of 2 M C H), 8 M C H backward (four)."""
    from tritonrun.kernels import mlp_relu2 as mr

    dev = ctx.device
    C = 64 if ctx.smoke else ctx.C
    H, M = 4 * C, 64 if ctx.smoke else 8 * 1024
    mm = torch.float32 if ctx.smoke else torch.bfloat16

    def make_set(seed):
        g = torch.Generator(device=dev).manual_seed(seed)
        x = torch.randn(M, C, device=dev, generator=g).to(mm).requires_grad_()
        w1 = (0.05 * torch.randn(H, C, device=dev, generator=g)).to(mm).requires_grad_()
        w2 = (0.05 * torch.randn(C, H, device=dev, generator=g)).to(mm).requires_grad_()
        return [x, w1, w2], [torch.randn(M, C, device=dev, generator=g).to(torch.bfloat16 if not ctx.smoke else mm)]

    def ours(x, w1, w2):
        return mr.relu2_mlp(x, w1, w2, matmul_dtype=mm)

    def eager(x, w1, w2):
        return torch.relu(x @ w1.t()).square() @ w2.t()

    flops = {"fwd": 4.0 * M * C * H, "bwd": 8.0 * M * C * H, "fwd+bwd": 12.0 * M * C * H}
    bench_impls(ctx, "relu2_mlp", {"rows": M, "K": C, "N": H}, {"x": mm, "post": torch.bfloat16}, make_set,
                peer_impls(ctx, ours, eager), None, flops=flops, max_sets=2)


def case_bigram(ctx: Ctx) -> None:
    """Record #89's bigram hash embedding (tritonrun/kernels/bigram.py): one packed sequence of 8,192 tokens (smoke:
    257), the 377,280 x 768 table (smoke: 1,001 x 64) and 8,192 sign rows, in the training low dtype. Peers: the
    torch form (hash in int32 torch ops, two gathers, a product), eager and torch.compile'd."""
    from tritonrun.kernels import bigram as bg

    dev, dt = ctx.device, ctx.dtype("low")
    T, V, D, S = (257, 1_001, 64, 64) if ctx.smoke else (8_192, 377_280, ctx.C, 8_192)
    signs = torch.randn(S, D, device=dev, generator=torch.Generator(device=dev).manual_seed(5)).sign().to(dt)

    x = torch.randint(0, 50257, (T,), device=dev, generator=torch.Generator(device=dev).manual_seed(6))

    def make_set(seed):  # the ids are fixed (integers: no gradient); the table rotates
        g = torch.Generator(device=dev).manual_seed(seed)
        table = (0.01 * torch.randn(V, D, device=dev, generator=g)).to(dt).requires_grad_()
        return [table], [torch.randn(T, D, device=dev, generator=g).to(dt)]

    def ours(table):
        return bg.bigram_embed(x, table, signs)

    def eager(table):
        return bg.reference_bigram_embed(x, table, signs)

    nbytes = {p: bg.bytes_moved(T, D, p, dtype=dt) for p in PASSES}
    bench_impls(ctx, "bigram", {"rows": T, "C": D, "V": V}, {"table": dt}, make_set, peer_impls(ctx, ours, eager),
                nbytes, max_sets=2)


# ---- mtp_head (record #89's LM head loss, tritonrun/kernels/mtp_head.py) ----------------------------------------
MTP_WEIGHTS, MTP_PREFIX_WEIGHT = (1.0, 0.5, 0.25), 0.25  # record #89's first stage at its start (speedrun89.STAGES)


def case_mtp_head(ctx: Ctx) -> None:
    """Record #89's LM head loss (tritonrun/kernels/mtp_head.py: K = 3 multi-token prediction and the prefix loss over
    23 sigmoid((l + 5) / 7.5) logits, stage 1's weights) at the record's rows per GPU: 16,384 (stage 1; --quick) and
    49,152 (stage 3), C = 768, V = 50,304, bf16 h and W (C, V) (smoke: 64 rows, C 64, V 256). Peers: mtp_head_reference
    (materialized logits) eager and torch.compile'd; every implementation is checked against it in fp32 over row
    chunks of 2,048 (recomputed in the backward: it fits a 12 GB card). Model FLOPs 2NVC forward, 4NVC backward
    (mtp_flops(executed=False)); peak extra memory."""
    from tritonrun.kernels import mtp_head as mh

    dev, dt = ctx.device, ctx.dtype("low")
    C, V = (64, 256) if ctx.smoke else (ctx.C, 50_304)
    rows = [64] if ctx.smoke else ([16 * 1024] if ctx.quick else [16 * 1024, 48 * 1024])
    measure_matmul_peak(ctx)
    for N in rows:
        g = torch.Generator(device=dev).manual_seed(8)
        targets = torch.randint(0, V, (N,), device=dev, generator=g)
        prefix = torch.randint(0, V, (N,), device=dev, generator=g)
        prefix = torch.where(torch.rand(N, device=dev, generator=g) < 0.5, prefix, -1)  # half the rows: no prefix
        mtp = torch.tensor(MTP_WEIGHTS, device=dev)  # device tensors, as training passes them
        p = torch.tensor(MTP_PREFIX_WEIGHT, device=dev)

        def make_set(seed, N=N):
            g = torch.Generator(device=dev).manual_seed(seed)
            h = torch.randn(N, C, device=dev, generator=g).to(dt).requires_grad_()
            w = (0.02 * torch.randn(C, V, device=dev, generator=g)).to(dt).requires_grad_()
            return [h, w], [torch.ones(N, device=dev)]  # loss.sum(): the training loop's constant g

        def ours(h, w, targets=targets, prefix=prefix, mtp=mtp, p=p):
            return mh.mtp_head_loss(h, w, targets, mtp, prefix, p)

        def eager(h, w, targets=targets, prefix=prefix):
            return mh.mtp_head_reference(h, w, targets, MTP_WEIGHTS, prefix, MTP_PREFIX_WEIGHT)

        def reference(h, w, targets=targets, prefix=prefix, N=N):
            return mh.mtp_head_reference(h, w, targets, MTP_WEIGHTS, prefix, MTP_PREFIX_WEIGHT,
                                         compute_dtype=torch.float32, chunk_rows=min(2048, N))

        flops = {q: mh.mtp_flops(N, V, C, part=q.replace("+", "_"), executed=False) for q in PASSES}
        # One input set: h + W already exceed any L2, and the eager peer's retained graph holds ~8 fp32 N x V tensors
        bench_impls(ctx, "mtp_head", {"rows": N, "C": C, "V": V, "K": len(MTP_WEIGHTS)}, {"h": dt, "weight": dt},
                    make_set, peer_impls(ctx, ours, eager), None, flops=flops, reference=reference, memory=True,
                    max_sets=1)
# ---- end of mtp_head -------------------------------------------------------------------------------------------


CASES: dict[str, Callable[[Ctx], None]] = {
    "layernorm": case_layernorm,
    "add_layernorm": case_add_layernorm,
    "gelu": case_gelu,
    "adamw": case_adamw,
    "attention": case_attention,
    "cross_entropy": case_cross_entropy,
    "qk_norm_rope": case_qk_norm_rope,
    "muon": case_muon,
    # ---- later kernels register here, one entry each ----
    "rmsnorm": case_rmsnorm,  # issue 26 (speedrun model): tritonrun/kernels/rmsnorm.py, tritonrun/kernels/relu2.py
    "add_rmsnorm": case_add_rmsnorm,
    "mix_rmsnorm": case_mix_rmsnorm,
    "relu2": case_relu2,
    "window_attention": case_window_attention,  # issue 27: tritonrun/kernels/window_attention.py
    "fp8_linear": case_fp8_linear,  # issue 35: tritonrun/kernels/fp8.py (record #89's FP8 matmuls)
    "bigram": case_bigram,  # issue 35: tritonrun/kernels/bigram.py (record #89's bigram hash embedding)
    "relu2_mlp": case_relu2_mlp,  # issue 35: tritonrun/kernels/mlp_relu2.py (record #89's fused ReLU^2 MLP step)
    "mtp_head": case_mtp_head,  # tritonrun/kernels/mtp_head.py (record #89's fused LM head loss)
}


# ------------------------------------------------------------------------------ records and output


def speedups(results: list[dict]) -> list[dict]:
    """triton's speedup over each peer (peer ms / triton ms) and over the best peer, per op/shape/pass; over
    the best SDPA backend where there are some (attention); and, where memory was measured, triton's peak
    extra memory as a fraction of each peer's (peak_mb_ratio: < 1 means lighter)."""
    out, groups, mem = [], {}, {}
    for r in results:
        key = (r["op"], json.dumps(r["shape"]), r["pass"])
        groups.setdefault(key, {})[r["impl"]] = r["ms"]
        if r.get("peak_mb") is not None:
            mem.setdefault(key, {})[r["impl"]] = r["peak_mb"]
    for key, ms in groups.items():
        op, shape, pass_ = key
        if "triton" not in ms:
            continue
        peers = {k: v for k, v in ms.items() if k != "triton"}
        row = {"op": op, "shape": json.loads(shape), "pass": pass_,
               "vs": {k: v / ms["triton"] for k, v in peers.items()}}
        if peers:
            best = min(peers, key=peers.get)
            row["best_peer"], row["vs_best_peer"] = best, peers[best] / ms["triton"]
        sdpa = {k: v for k, v in peers.items() if k.startswith("sdpa.")}
        if sdpa:
            best = min(sdpa, key=sdpa.get)
            row["best_sdpa"], row["vs_best_sdpa"] = best, sdpa[best] / ms["triton"]
        mb = mem.get(key, {})
        if "triton" in mb:
            row["peak_mb_ratio"] = {k: mb["triton"] / v for k, v in mb.items() if k != "triton" and v > 0}
        out.append(row)
    return out


def shape_label(shape: dict) -> str:
    """Short text for a result's shape: rows x C, B x H x T x D, rows x C -> V, rows x K -> N, or the model."""
    if "model" in shape:
        return f"{shape['model']} {shape['tensors']}t"
    if "B" in shape:
        window = f" w{shape['window']}" if "window" in shape else ""
        return f"{shape['B']}x{shape['H']}x{shape['T']}x{shape['D']}{window}"
    if "V" in shape:
        return f"{shape['rows']}x{shape['C']}>{shape['V']}"
    if "K" in shape:  # a matmul: rows x K -> N
        return f"{shape['rows']}x{shape['K']}>{shape['N']}"
    return f"{shape['rows']}x{shape['C']}"


def _fmt(value, spec: str, width: int) -> str:
    return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"


def print_table(results: list[dict], ratios: list[dict], peak: float | None, skipped: list[dict] = ()) -> None:
    head = (f"{'op':<14}{'shape':>17}{'pass':>8}{'impl':>18}{'ms':>10}{'q20-q80':>19}{'GB/s':>8}{'%peak':>6}"
            f"{'TFLOPS':>8}{'%mm':>5}{'MiB':>8}{'triton x':>9}")
    print(head)
    print("-" * len(head))
    ratio_of = {(r["op"], json.dumps(r["shape"]), r["pass"]): r["vs"] for r in ratios}
    for r in results:
        pct = 100 * r["gbps"] / peak if peak and r.get("gbps") else None
        vs = ratio_of.get((r["op"], json.dumps(r["shape"]), r["pass"]), {}).get(r["impl"])
        flag = "" if r["check"] == "ok" else "  CHECK FAILED"
        print(f"{r['op']:<14}{shape_label(r['shape']):>17}{r['pass']:>8}{r['impl']:>18}{r['ms']:>10.4f}"
              f"{r['ms_q20']:>9.4f}-{r['ms_q80']:<9.4f}{_fmt(r.get('gbps'), '.1f', 8)}{_fmt(pct, '.0f', 6)}"
              f"{_fmt(r.get('tflops'), '.1f', 8)}{_fmt(r.get('pct_matmul_peak'), '.0f', 5)}"
              f"{_fmt(r.get('peak_mb'), '.0f', 8)}{'' if vs is None else format(vs, '.2f'):>9}{flag}")
    print("triton x = the peer's median / triton's median (> 1: the Triton kernel is faster); "
          "%mm = % of the measured matmul peak; MiB = peak extra memory (CUDA)")
    for s in skipped:
        print(f"skipped: {s['op']} {s['impl']}{' ' + shape_label(s['shape']) if s.get('shape') else ''}: "
              f"{s['skipped']}")



def plot_record(path: Path) -> Path:
    """One PNG per record, one panel per unit: GB/s (memory-bound ops, peak bandwidth as a line) and TFLOPS
    (attention, cross-entropy; the measured matmul peak as a line), per implementation, op, shape, pass."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rec = json.loads(Path(path).read_text())
    panels = {}  # metric -> rows
    for r in rec["results"]:
        metric = "gbps" if r.get("gbps") else "tflops" if r.get("tflops") else None
        if metric:
            panels.setdefault(metric, []).append(r)
    panels = panels or {"gbps": []}
    sizes = [len({(r["op"], json.dumps(r["shape"]), r["pass"]) for r in rows}) for rows in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.9 * max(sizes) + 2), 4.5 * len(panels)),
                             squeeze=False)
    title = f"{rec['env']['device']} · {rec['date']} · {rec['env']['commit'][:10]}"
    if rec.get("smoke"):
        title = "SMOKE (CPU interpreter, NOT A TIMING) · " + title
    fig.suptitle(title, fontsize=9)
    for ax, (metric, rows) in zip(axes[:, 0], panels.items()):
        groups = list(dict.fromkeys((r["op"], json.dumps(r["shape"]), r["pass"]) for r in rows))
        impls = list(dict.fromkeys(r["impl"] for r in rows))
        value = {(r["op"], json.dumps(r["shape"]), r["pass"], r["impl"]): r[metric] for r in rows}
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            xs = [g + i * width for g in range(len(groups))]
            ax.bar(xs, [value.get((*grp, impl), 0.0) for grp in groups], width, label=impl)
        if metric == "gbps" and rec.get("peak_gbps"):
            ax.axhline(rec["peak_gbps"], color="k", linestyle="--", linewidth=1,
                       label=f"peak {rec['peak_gbps']:.0f} GB/s")
        if metric == "tflops" and rec.get("matmul_peak_tflops"):
            ax.axhline(rec["matmul_peak_tflops"], color="k", linestyle="--", linewidth=1,
                       label=f"matmul peak {rec['matmul_peak_tflops']:.3g} TFLOPS")
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
        ax.set_xticklabels([f"{op}\n{shape_label(json.loads(shape))}\n{p}" for op, shape, p in groups], fontsize=7)
        ax.set_ylabel("GB/s (minimum bytes moved / median time)" if metric == "gbps" else
                      "TFLOPS (op's FLOP formula / median time)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark each Triton kernel against its PyTorch peers at GPT-2 shapes.")
    p.add_argument("--op", action="append", choices=sorted(CASES), help="op to run (repeatable; default: all)")
    p.add_argument("--quick", action="store_true", help="rows = 16*1024 only (attention: B = 16 only) and shorter runs")
    p.add_argument("--plot", nargs="*", metavar="RECORD", default=None,
                   help="write a PNG next to this run's record; with record paths: plot those and exit "
                        "(no GPU needed)")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run a tiny Triton-interpreter smoke pass (NOT a timing; no record in "
                        "bench/results)")
    p.add_argument("--dtype", choices=("autocast", "fp32", "bf16", "fp16"), default="autocast",
                   help="autocast: the dtypes bf16-autocast training feeds each op (default); else one dtype "
                        "everywhere")
    p.add_argument("--peers", default="torch,compile", help="comma list from: torch (always run), compile")
    p.add_argument("--out-dir", type=Path, default=None,
                   help=f"where the JSON record goes (default {RESULTS_DIR.relative_to(REPO)}; smoke runs write "
                        "a record only when this is given, and never into bench/results)")
    return p.parse_args(argv)


class Refused(Exception):
    """A run the flags or the machine rule out: main prints "error: <message>" and exits 2."""


@dataclass
class Run:
    """One measuring run: the cases' context and what its record is made of besides the results."""
    args: argparse.Namespace
    ctx: Ctx
    env: dict
    peak: float | None  # the device's peak bandwidth, GB/s (None: unknown, or a smoke run)
    now: datetime.datetime
    ops: list[str]
    path: Path | None  # the record's file (None: a smoke run without --out-dir writes none)


def plot_records(paths: list[str]) -> int:
    """--plot with record paths: a PNG beside each record, no GPU needed."""
    for path in paths:
        print(f"wrote {plot_record(Path(path))}")
    return 0


def prepare_device(args) -> tuple[torch.device, bool, Path | None]:
    """The device, whether this is a smoke run (no GPU: the Triton interpreter, announced) and the record's
    folder; Refused when there is no GPU without --allow-cpu, or the folder or the interpreter cannot be used."""
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.allow_cpu:
        raise Refused("no CUDA GPU: bench/kernels.py times GPU kernels; pass --allow-cpu for an interpreter "
                      "smoke run (not a timing)")
    smoke = not has_cuda
    try:
        out_dir = record_dir(args.out_dir, smoke)
    except ValueError as e:
        raise Refused(str(e)) from None
    if smoke:
        from tritonrun.gpt2.ops import use_cpu_interpreter

        try:  # before any tritonrun/kernels/ module is imported (the cases import lazily)
            use_cpu_interpreter()
        except RuntimeError as e:
            raise Refused(str(e)) from None
        print("=" * 88)
        print("SMOKE RUN ON CPU through the Triton interpreter: NOT A TIMING. The numbers below only show")
        print("that every case, peer and record field works; never quote them. Run on a CUDA GPU to measure.")
        print("=" * 88)
    return torch.device("cuda" if has_cuda else "cpu"), smoke, out_dir


def plan_run(args, device: torch.device, smoke: bool, out_dir: Path | None) -> Run:
    """The cases' context, the environment (printed with the peak bandwidth), the ops and the record's path."""
    ctx = Ctx(device=device, smoke=smoke, quick=args.quick, dtype_mode=args.dtype,
              peers=[p.strip() for p in args.peers.split(",") if p.strip()],
              rows=[16] if smoke else ([16 * 1024] if args.quick else [16 * 1024, 32 * 1024]),
              C=768)
    env = env_info(device)
    peak = None if smoke else peak_gbps(env["device"])
    print(f"device: {env['device']}  peak: {f'{peak:.0f} GB/s' if peak else 'unknown'}  torch {env['torch']}  "
          f"triton {env['triton']}  commit {env['commit'][:10]}{' (dirty)' if env['dirty'] else ''}")
    now = datetime.datetime.now()
    ops = args.op or list(CASES)
    path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{record_stem('kernels', env['device'], smoke, now)}.json"
    return Run(args=args, ctx=ctx, env=env, peak=peak, now=now, ops=ops, path=path)


def make_record(run: Run, done: list[str]) -> dict:
    """The record of the ops measured so far ("complete": false until all of them are); first sets each
    row's % of the peaks (the matmul peak is measured by the first TFLOPS case)."""
    ctx, peak, smoke, args = run.ctx, run.peak, run.ctx.smoke, run.args
    mm_peak = ctx.matmul_peak["tflops"] if ctx.matmul_peak else None
    for r in ctx.results:
        r["pct_peak"] = 100 * r["gbps"] / peak if peak and r["gbps"] else None
        r["pct_matmul_peak"] = 100 * r["tflops"] / mm_peak if mm_peak and r["tflops"] else None
    return {
        "kind": "kernels", "smoke": smoke, "complete": done == run.ops, "ops_done": list(done),
        "date": run.now.isoformat(timespec="seconds"), "env": run.env,
        "peak_gbps": peak, "args": {"op": run.ops, "quick": args.quick, "dtype": args.dtype,
                                    "peers": ctx.peers},
        "timer": "perf_counter x3 (smoke: not a timing)" if smoke else
                 f"triton.testing.do_bench quantiles {list(QUANTILES)}, L2 flushed, inputs rotated",
        "bytes_formula": "kernels/<op>.py bytes_moved(): minimum DRAM traffic, same for every implementation "
                         "(adamw: tritonrun/kernels/adamw.py bytes_moved(n, dtype, clip=True), per optimizer step)",
        "flops_formula": {"attention": "tritonrun/kernels/attention.py attention_flops(B, H, T, D, causal=True): "
                                       "fwd 4*B*H*T^2*D/2, bwd 2.5x fwd, fwd+bwd 3.5x fwd",
                          "cross_entropy": "tritonrun/kernels/cross_entropy.py "
                                           "lce_flops(N, vocab_size, C, executed=False): "
                                           "fwd 2NVC, bwd 4NVC (model FLOPs of the materialized op)",
                          "mtp_head": "tritonrun/kernels/mtp_head.py mtp_flops(N, V, C, executed=False): "
                                      "fwd 2NVC, bwd 4NVC (model FLOPs of the materialized op)",
                          "muon": "tritonrun/kernels/muon.py newton_schulz_flops(rows, cols, 5) "
                                  "summed over the matrices: "
                                  "Newton-Schulz matmuls only, 5·(4m²n + 2m³) each",
                          "window_attention": "tritonrun/kernels/window_attention.py window_attention_flops: "
                                              "4*D per allowed (q, kv) pair fwd, bwd 2.5x, fwd+bwd 3.5x; the "
                                              "sdpa.causal_dense rows: attention_flops(causal=True)"},
        "peak_mb": "CUDA only (null elsewhere): MiB, torch.cuda.max_memory_allocated during the pass minus "
                   "memory_allocated just before its forward (i.e. beyond the inputs); bwd includes the graph "
                   "its forward saved",
        "matmul_peak_tflops": mm_peak, "matmul_peak": ctx.matmul_peak,
        "notes": "bwd = autograd.grad on retained graphs (one forward per rotating input set); torch.compile "
                 "runs with torch._functorch.config.donated_buffer=False, which retained graphs need. adamw: one "
                 "pass 'step' = clip_grad_norm_(1.0) + step(), timed after one untimed step that creates the "
                 "state. attention: 'torch' and 'torch.compile' are the written-out math attention "
                 "(softmax in fp32); sdpa.* force one backend each with torch.nn.attention.sdpa_kernel. "
                 "cross_entropy: Liger computes the gradients inside its forward (its bwd only scales them); "
                 "cut-cross-entropy runs with filter_eps=None (exact gradients, as ours; its default filters).",
        "results": ctx.results, "speedups": speedups(ctx.results), "skipped": ctx.skipped,
        # the tiles attention and cross-entropy ran with: the autotuners' picks (tritonrun/kernels/tune.py), with
        # the ms of every cross-entropy candidate when measured in this run; empty when nothing was tuned
        "autotune": autotune_picks(),
    }


def run_ops(run: Run) -> list[str] | None:
    """Every op's case in turn, a partial record written after each; None (after saying what was kept) when
    interrupted."""
    torch.manual_seed(0)
    done = []
    for op in run.ops:
        t0 = time.perf_counter()
        try:
            CASES[op](run.ctx)
        except KeyboardInterrupt:  # e.g. a time limit's SIGINT (.ci/gpu): the record after the last finished
            kept = "no op had finished"  # op is already on disk, without the rows of the interrupted one
            if done:
                kept = f"finished: {', '.join(done)}" + (f" (record: {run.path})" if run.path is not None else "")
            print(f"interrupted during {op}; {kept}", file=sys.stderr)
            return None
        done.append(op)
        print(f"  {op}: {time.perf_counter() - t0:.1f} s")
        if run.path is not None and done != run.ops:  # a partial record after every op: a killed run keeps them
            atomic_write_json(run.path, make_record(run, done))
    return done


def write_record(run: Run, record: dict) -> None:
    """The final record (and with --plot its PNG), or why there is none."""
    if run.path is not None:
        atomic_write_json(run.path, record)
        print(f"wrote {run.path}")
        if run.args.plot is not None:
            print(f"wrote {plot_record(run.path)}")
    elif run.args.plot is not None:
        print("no record written (smoke run without --out-dir): nothing to plot")


def exit_status(ctx: Ctx) -> int:
    """Warns about peers that failed their check; 1 when one of ours failed its check or raised, else 0."""
    # Only our kernels decide the exit status; a peer that fails its check stays in the record, marked.
    bad = [r for r in ctx.results if r["check"] != "ok" and r["impl"] == "triton"]
    peers_bad = [r for r in ctx.results if r["check"] != "ok" and r["impl"] != "triton"]
    if ctx.smoke:
        print("SMOKE RUN: NOT A TIMING.")
    for r in peers_bad:
        print(f"warning: peer {r['impl']} failed the correctness check on {r['op']} {shape_label(r['shape'])} "
              f"{r['pass']}: {r['check']} (kept in the record with that check)", file=sys.stderr)
    if bad or ctx.errors:
        what = [f"{len(bad)} result(s) of ours failed the correctness check against eager PyTorch"] if bad else []
        what += [f"our kernel raised on {e}" for e in ctx.errors]
        print(f"error: {'; '.join(what)}", file=sys.stderr)
        return 1
    return 0


@reports_write_failures
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.plot:  # record paths given: plot only
        return plot_records(args.plot)
    try:
        device, smoke, out_dir = prepare_device(args)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = plan_run(args, device, smoke, out_dir)
    done = run_ops(run)
    if done is None:
        return 130
    record = make_record(run, done)
    print_table(run.ctx.results, record["speedups"], run.peak, run.ctx.skipped)
    write_record(run, record)
    return exit_status(run.ctx)


if __name__ == "__main__":
    sys.exit(main())
