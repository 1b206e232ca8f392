#!/usr/bin/env python
"""End-to-end training benchmark: tokens/s, MFU and peak memory of tritonrun against a torch.compile baseline.

    python bench/train.py                          # GPU: the sweep + 12 GiB cap check; writes bench/results/train-*.json
    python bench/train.py --profile                # ... plus a per-op-kind profile split and a .md summary
    python bench/train.py --project rtx4070 --from-record bench/results/train-<dev>-<date>.json   # no GPU needed
    python bench/train.py --smoke --out-dir /tmp/x # CPU smoke run (tiny model): NOT A TIMING
    python bench/train.py --merge A.json B.json   # one record from parts measured in separate commands

What is measured (GPU). The d12 model and optimizers of --recipe (default speedrun-dense, the 2024-11-10 model, on
GPUs: the presets' packed --recipe speedrun is not timed here yet; gpt2 = GPT-2 124M under llm.c's AdamW; the
record's "recipe" says which, records from before the rename say "speedrun" for speedrun-dense), T = 1024, bf16
autocast, for each micro-batch
in --micro-batches (default 8,16,32,64) and each configuration:
  (a) triton          --backend triton --no-compile      (our kernels)
      triton+compile  --backend triton --compile
  (b) torch+compile   --backend torch --compile           (SDPA + fused AdamW: the nanoGPT baseline)
  (c) torch           --backend torch --no-compile
  --torch-ops OPS (repeatable) adds, per OPS, the triton configurations again with those ops kept in torch
  (train_speedrun.py --torch-ops), named e.g. "triton+compile (torch: linear_cross_entropy)": the cost or gain of
  each kernel in the whole step, timed in the same round-robin. They count as triton runs in the speedup.
Each configuration is a real training_speedrun Trainer (train_speedrun._resolve on explicit flags, then
training.Trainer), stepped with Trainer.train_step. One "step" = one optimizer step with gradient accumulation
--grad-accum (default 1: tokens per step = micro_batch x T; the llm.c recipe accumulates to 2^19 tokens, which
amortizes the optimizer over 512/micro_batch micro-batches, so accumulation 1 slightly understates what a full
run gets, the same way for every configuration). Data: a synthetic llm.c shard of uniformly random tokens written
to a temp dir and read through the real ShardLoader (throughput does not depend on token values); no FineWeb.

Timing: all configurations of one micro-batch are built together, each gets --warmup untimed steps (compile,
autotune, allocator), then the timed steps run round-robin in blocks of --block steps (config 1, 2, 3, 4, 1, 2,
...) so clock/thermal drift hits every configuration alike, until each has --steps (>= 20) timed steps. Every
step is timed alone (synchronize, perf_counter, train_step, synchronize); reported: the median and every step.
tokens_per_s = tokens per step / median step time; mfu = tokens_per_s x flops_per_token / peak (the model's
6N + 6LCT; peak from the device's preset, or --peak-tflops). A configuration that raises torch.OutOfMemoryError
is recorded {"fits": false}, freed, and the others go on. Peak memory per configuration: max_memory_allocated
over its own timed blocks minus what the other configurations of the group hold resident at that time (their
weights and optimizer state), i.e. its own peak as if it ran alone; peak_reserved_gib is the shared allocator's
reserved peak during its blocks (an upper bound, the pool is shared). Triton runs also list the autotuned tiles
the process has picked by then ("autotune", tritonrun/kernels/tune.py picks(); tuning happens in the warm-up).

12 GiB cap (--cap-gib 12, default; 0 = off): the rtx4070 preset's config (its backend/compile, the micro-batch
train_speedrun.py derives for each backend under the cap by the memory estimate, and
--backend triton beside it) with cfg.memory_gib = 12, which Trainer applies as
set_per_process_memory_fraction((12 GiB - the 0.5 GiB CUDA context allowance) / total): the fraction bounds only
PyTorch's allocator, and the context lies outside it. Each runs alone, micro-batches from the derived one upward:
--warmup untimed steps under the cap (compile and autotune, whose timing buffers are not the run's), then the
cache is emptied and the peak statistics reset, and the timed steps' peak allocated and reserved are recorded
(the warm-up's beside them). A micro-batch fits when it does not OOM and peak RESERVED + the context allowance
<= the card (the cap, or the device's total when smaller: a real 4070 reports 11.99 GiB); the largest that fits
is reported per backend. The cap emulates the card's budget on a larger GPU, not its speed.

--profile: torch.profiler over one step of triton+compile and torch+compile (micro-batch --profile-micro-batch),
CUDA kernel time bucketed by kernel name, first match wins, case-insensitive (see BUCKETS below); GPU user
annotations (record_function ranges on the device timeline) are not kernels and are left out.

The record is rewritten after every micro-batch group and after the cap check ("complete": false until the
end), so a run stopped by a time limit keeps what it measured. --project takes the best triton MFU among runs
at a micro-batch the target can hold: at most the largest that fitted the record's cap check, else the
micro-batch train_speedrun.py derives for that configuration on the target (the memory estimate).

--merge: a sweep split over several commands (e.g. --micro-batches 8,16 then 32,64 under a 10-minute limit, and
--no-sweep --profile for the cap check) gives several records; --merge joins them into one record (runs, cap,
profile, speedups recomputed) after checking that they measured the same thing: same device, versions, commit,
model, sequence length, dtype, accumulation, steps, block, warm-up and peak. No GPU needed.
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
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import torch  # noqa: E402

from tritonrun.memory import derived_micro_batch  # noqa: E402
from tritonrun.kernels.tune import picks as autotune_picks  # noqa: E402  (imports no triton)
from tritonrun.runinfo import (atomic_write_json, atomic_write_text, env_info, record_dir,  # noqa: E402
                              record_stem, reports_write_failures)

GIB = 2**30
SEQ_LEN = 1024
DEFAULT_MICRO_BATCHES = (8, 16, 32, 64)
# (name, backend, compile): (a) ours, (b) the baseline, (c) eager torch
CONFIGS = [("triton", "triton", False), ("triton+compile", "triton", True),
           ("torch+compile", "torch", True), ("torch", "torch", False)]

# Profile buckets: CUDA kernel name -> op kind, first match wins (re.search, case-insensitive). Inductor names its
# kernels after the fused aten ops (triton_per_fused_native_layer_norm_..., triton_poi_fused_gelu_...), ours are
# the @triton.jit function names (kernels/*.py), cuBLAS/cuDNN/flash kernels carry gemm/xmma/nvjet/flash/fmha.
# Attention and classifier are tested before matmul so that a fused attention or LM-head+CE kernel is counted
# under its op, not as a GEMM. Gradient-norm clipping kernels (ours: _grad_sumsq/_finalize_norm; torch: the
# multi_tensor LpNorm) go to optimizer. The matmul pattern names library GEMMs only: Inductor (no max-autotune)
# leaves GEMMs to cuBLAS and names the pointwise kernel it fuses a bias add into after the addmm
# (triton_poi_fused_addmm_gelu_...), which is GELU or LayerNorm work, not a matmul.
BUCKETS = [
    ("attention", r"attn|flash|sdpa|fmha|scaled_dot_product|softmax_fwd|attention"),
    ("classifier", r"cross_entropy|lce|log_softmax|nll_loss|logsumexp"),
    ("optimizer", r"adam|grad_sumsq|finalize_norm|lpnorm|multi_tensor"),
    ("matmul", r"gemm|cutlass|mma|matmul|nvjet|xmma|cublas|sm\d+_|ampere_|hopper_"),
    ("norms", r"layer_?norm|(^|_)ln(_|$)|native_layer_norm"),
    ("gelu", r"gelu|tanh"),
]


def log(msg: str = "") -> None:
    print(msg, flush=True)



def bucket_of(kernel_name: str) -> str:
    for kind, pattern in BUCKETS:
        if re.search(pattern, kernel_name, re.IGNORECASE):
            return kind
    return "other"


# ------------------------------------------------------------------------------------------- data
def synthetic_data(tmp: Path, vocab_size: int, tokens: int) -> Path:
    """An llm.c-format train and val shard of uniformly random tokens (seed 0) in tmp."""
    import numpy as np

    from tritonrun.data.shards import write_shard

    rng = np.random.default_rng(0)
    write_shard(tmp / "synthetic_train_000001.bin", rng.integers(0, vocab_size, tokens, dtype=np.uint16))
    write_shard(tmp / "synthetic_val_000000.bin", rng.integers(0, vocab_size, tokens, dtype=np.uint16))
    return tmp


# ---------------------------------------------------------------------------------------- trainers
class Spec:
    def __init__(self, name, backend, compile_, micro_batch, args, memory_gib=0.0, gpu=None, torch_ops=""):
        self.name, self.backend, self.compile, self.micro_batch = name, backend, compile_, micro_batch
        self.args, self.memory_gib, self.gpu, self.torch_ops = args, memory_gib, gpu or args.gpu, torch_ops


def sweep_configs(backends: list[str], compiles: list[bool], torch_ops: list[str],
                  names: list[str] | None = None) -> list[tuple]:
    """(name, backend, compile, torch_ops) of every configuration the sweep times: CONFIGS filtered (by backend,
    compile and, with --configs, name), then per --torch-ops value a copy of the triton ones that keeps those ops
    in torch."""
    base = [(n, b, c, "") for n, b, c in CONFIGS if b in backends and c in compiles and (names is None or n in names)]
    variants = [(f"{n} (torch: {ops})", b, c, ops) for ops in torch_ops for n, b, c, _ in base if b == "triton"]
    return base + variants


def make_config(spec: Spec, data_dir: Path, out_dir: Path):
    from tritonrun import train as ts

    a = spec.args
    tokens = spec.micro_batch * a.seq_len
    argv = ["--gpu", spec.gpu, "--recipe", a.recipe, "--model", a.model, "--seq-len", str(a.seq_len),
            "--dtype", a.dtype,
            "--backend", spec.backend, "--compile" if spec.compile else "--no-compile",
            "--micro-batch", str(spec.micro_batch), "--total-batch-tokens", str(tokens * a.grad_accum),
            "--memory-gib", str(spec.memory_gib), "--data", str(data_dir), "--out-dir", str(out_dir),
            "--val-tokens", str(tokens), "--timing-warmup-steps", "0", "--checkpoint-every", "0",
            "--hellaswag-every", "0", "--max-steps", "1000000", "--warmup-steps", "10"]
    if spec.torch_ops:
        argv += ["--torch-ops", spec.torch_ops]
    if a.peak_tflops is not None:
        argv += ["--peak-tflops", str(a.peak_tflops)]
    cfg, _ = ts._resolve(ts.build_parser().parse_args(argv))
    return cfg


def build_trainer(spec: Spec, data_dir: Path, out_dir: Path, warmup: int = 0):
    """A real training.Trainer for `spec`, after `warmup` untimed steps (compile, autotune, allocator)."""
    from tritonrun import train as ts
    from tritonrun import training

    cfg = make_config(spec, data_dir, out_dir)
    train_files, val_file = ts.open_data(cfg)
    tr = training.Trainer(cfg, train_files, val_file, training.Dist(cfg.device))
    for i in range(warmup):
        tr.train_step(i)
    tr.sync()
    return cfg, tr


def cuda(device) -> bool:
    return device.type == "cuda"


def mem_alloc(device) -> int:
    return torch.cuda.memory_allocated(device) if cuda(device) else 0


def free_memory(device, reset_compiled: bool = False) -> None:
    gc.collect()
    if cuda(device):
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    if reset_compiled:  # only between groups: live trainers of a group would recompile inside timed steps
        torch._dynamo.reset()


def timed_step(tr, step: int) -> float:
    tr.sync()
    t0 = time.perf_counter()
    tr.train_step(step)
    tr.sync()
    return (time.perf_counter() - t0) * 1e3


def run_record(spec: Spec, cfg, tr, ms: list[float], peak_alloc, peak_reserved, tokens_per_step: int) -> dict:
    med = statistics.median(ms)
    tok_s = tokens_per_step / (med / 1e3)
    peak = cfg.peak_tflops
    return {"name": spec.name, "backend": spec.backend, "compile": spec.compile, "torch_ops": spec.torch_ops,
            "micro_batch": spec.micro_batch, "grad_accum": cfg.grad_accum, "tokens_per_step": tokens_per_step,
            "fits": True,
            "tokens_per_s": tok_s, "mfu": tok_s * tr.flops_per_token / (peak * 1e12) if peak else None,
            "peak_alloc_gib": peak_alloc, "peak_reserved_gib": peak_reserved,
            "step_ms_median": med, "step_ms_all": ms, "ops": tr.ops.placement,
            # the autotuned tiles this process has picked so far (cross-entropy keys name their row bucket)
            "autotune": autotune_picks() if spec.backend == "triton" else {}}


def oom_record(spec: Spec, where: str) -> dict:
    return {"name": spec.name, "backend": spec.backend, "compile": spec.compile, "torch_ops": spec.torch_ops,
            "micro_batch": spec.micro_batch, "fits": False, "oom_during": where, "tokens_per_s": None, "mfu": None,
            "peak_alloc_gib": None, "peak_reserved_gib": None, "step_ms_median": None, "step_ms_all": []}


def sweep_group(specs: list[Spec], args, data_dir: Path, out_dir: Path, device) -> list[dict]:
    """Build every config of one micro-batch, warm each up, then time them round-robin."""
    live, records = [], {}
    for spec in specs:
        before = mem_alloc(device)
        tr = None
        try:
            cfg, tr = build_trainer(spec, data_dir, out_dir, warmup=args.warmup)
            resident = mem_alloc(device) - before  # weights + optimizer state this trainer keeps
            live.append({"spec": spec, "cfg": cfg, "tr": tr, "ms": [], "resident": resident,
                         "peak_alloc": 0.0, "peak_reserved": 0.0, "step": args.warmup})
            log(f"  built {spec.name} mb={spec.micro_batch} (ops: {tr.ops.placement})")
        except torch.OutOfMemoryError:
            records[spec.name] = oom_record(spec, "build/warm-up")
            log(f"  {spec.name} mb={spec.micro_batch}: out of memory, recorded fits=false")
        if spec.name in records:  # outside the except block: its traceback (holding the activations) is gone
            del tr
            free_memory(device)
    free_memory(device)  # the warm-ups' cached blocks (the tuners' timing buffers) leave the reserved peaks
    interrupted = False
    try:
        _time_round_robin(live, records, args, device)
    except KeyboardInterrupt:  # a time limit's SIGINT: the steps timed so far become records, marked as such
        interrupted = True
    for e in [e for e in live if not e["ms"]]:
        live.remove(e)
    for e in live:
        spec, cfg = e["spec"], e["cfg"]
        pa, pr = (e["peak_alloc"], e["peak_reserved"]) if cuda(device) else (None, None)
        records[spec.name] = run_record(spec, cfg, e["tr"], e["ms"], pa, pr,
                                        spec.micro_batch * cfg.seq_len * cfg.grad_accum)
        r = records[spec.name]
        if interrupted:
            r["interrupted"] = f"stopped by SIGINT after {len(e['ms'])} of {args.steps} timed steps"
        mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        log(f"  {spec.name:15s} mb={spec.micro_batch:3d}  {r['step_ms_median']:9.2f} ms  "
            f"{r['tokens_per_s']:12,.0f} tok/s  MFU {mfu}" + ("  (interrupted)" if interrupted else ""))
    live.clear()
    e = tr = None  # the loops' last trainer too: its blocks would stay cached into the next group's peaks
    done = [records[s.name] for s in specs if s.name in records]
    if interrupted:
        raise Interrupted(done)
    free_memory(device, reset_compiled=True)
    return done


class Interrupted(Exception):
    """SIGINT (KeyboardInterrupt) inside a measurement; `part` is what it had measured (runs, or the cap dict)."""

    def __init__(self, part):
        super().__init__("interrupted")
        self.part = part


def _time_round_robin(live: list[dict], records: dict, args, device) -> None:
    """The timed steps of one group: blocks of --block steps per configuration in turn until each has --steps."""
    while any(len(e["ms"]) < args.steps for e in live):
        for e in list(live):
            if len(e["ms"]) >= args.steps:
                continue
            tr = e["tr"]
            try:
                if cuda(device):
                    torch.cuda.synchronize(device)
                    others = mem_alloc(device) - e["resident"]
                    torch.cuda.reset_peak_memory_stats(device)
                for _ in range(min(args.block, args.steps - len(e["ms"]))):
                    e["ms"].append(timed_step(tr, e["step"]))
                    e["step"] += 1
                if cuda(device):
                    e["peak_alloc"] = max(e["peak_alloc"], (torch.cuda.max_memory_allocated(device) - others) / GIB)
                    e["peak_reserved"] = max(e["peak_reserved"], torch.cuda.max_memory_reserved(device) / GIB)
            except torch.OutOfMemoryError:
                records[e["spec"].name] = oom_record(e["spec"], "timed steps")
            if e["spec"].name in records:  # outside the except block, as above
                live.remove(e)
                e["tr"] = tr = None  # the round's list(live) still holds e: drop its weights, state and grads
                free_memory(device)


def speedups(runs: list[dict]) -> dict:
    """Best triton run over the torch+compile run, per micro-batch and overall best."""
    ok = [r for r in runs if r.get("fits") and r.get("tokens_per_s")]
    per_mb, reasons = {}, {}
    for mb in sorted({r["micro_batch"] for r in runs}):
        ours = [r for r in ok if r["micro_batch"] == mb and r["backend"] == "triton"]
        base = [r for r in ok if r["micro_batch"] == mb and r["backend"] == "torch" and r["compile"]]
        if ours and base:
            best = max(ours, key=lambda r: r["tokens_per_s"])
            per_mb[str(mb)] = {"speedup": best["tokens_per_s"] / base[0]["tokens_per_s"], "ours": best["name"],
                               "ours_tokens_per_s": best["tokens_per_s"],
                               "baseline_tokens_per_s": base[0]["tokens_per_s"]}
        else:
            missing = [n for n, got in (("triton run", ours), ("torch+compile run", base)) if not got]
            reasons[str(mb)] = f"no {' and no '.join(missing)} at micro-batch {mb}"
    if not per_mb:
        return {"per_micro_batch": {}, "best": None, "reason": "; ".join(reasons.values()) or "no runs",
                "missing": reasons}
    best_mb = max(per_mb, key=lambda k: per_mb[k]["speedup"])
    ours_best = max((r for r in ok if r["backend"] == "triton"), key=lambda r: r["tokens_per_s"])
    base_best = max((r for r in ok if r["backend"] == "torch" and r["compile"]), key=lambda r: r["tokens_per_s"])
    return {"per_micro_batch": per_mb, "best": {"micro_batch": int(best_mb), **per_mb[best_mb]},
            "best_overall": {"ours": f"{ours_best['name']} mb={ours_best['micro_batch']}",
                             "baseline": f"torch+compile mb={base_best['micro_batch']}",
                             "speedup": ours_best["tokens_per_s"] / base_best["tokens_per_s"]},
            "definition": "tokens_per_s of the best triton run (with or without compile, --torch-ops variants "
                          "included) / tokens_per_s of torch+compile, at equal micro-batch; best_overall compares "
                          "each side's best micro-batch",
            "missing": reasons}


# --------------------------------------------------------------------------------------------- cap
def cap_check(args, data_dir: Path, out_dir: Path, device) -> dict:
    from tritonrun.presets import PRESETS
    from tritonrun.training import CUDA_CONTEXT_GIB, allocator_fraction

    preset = PRESETS["rtx4070"]
    total = torch.cuda.get_device_properties(device).total_memory
    out = {"preset": "rtx4070", "cap_gib": args.cap_gib, "fraction": allocator_fraction(args.cap_gib, total),
           "device_total_gib": total / GIB, "context_allowance_gib": CUDA_CONTEXT_GIB, "steps": args.cap_steps,
           "warmup": args.warmup,
           "how": "Trainer(cfg.memory_gib=cap) -> set_per_process_memory_fraction((cap - context allowance) / "
                  "total); each run alone; --warmup untimed steps under the cap (compile, autotune: the tuners' "
                  "timing buffers), then the cache emptied and the peak statistics reset, then the timed steps: "
                  "peak_alloc_gib / peak_reserved_gib are theirs (steady state), warmup_peak_*_gib the warm-up's. "
                  "fit: peak reserved + context allowance <= the card (min of cap and device total); "
                  "largest_fitting: the largest micro-batch (doubling from the one train_speedrun.py derives for the "
                  "backend under the cap) with no OOM and a fit; preset_pass: the derived ones fit",
           "runs": [], "largest_fitting": {}}
    backends = [(preset.backend, preset.compile)] + [(b, preset.compile) for b in ("torch", "triton")
                                                      if b != preset.backend]
    try:
        _cap_runs(out, backends, args, data_dir, out_dir, device, total, preset)
    except KeyboardInterrupt:  # a time limit's SIGINT: the runs so far stay in the record
        out["interrupted"] = "stopped by SIGINT"
    derived = out["derived_micro_batch"]
    preset_runs = [r for r in out["runs"] if r["micro_batch"] == derived.get(r["name"]) and r["fits"]]
    out["preset_pass"] = bool(preset_runs) and all(r["fits_card"] for r in preset_runs)
    torch.cuda.set_per_process_memory_fraction(1.0, device)  # device is indexed: torch requires it here
    if out.get("interrupted"):
        raise Interrupted(out)
    free_memory(device)
    return out


def _cap_runs(out: dict, backends, args, data_dir: Path, out_dir: Path, device, total: int, preset) -> None:
    from tritonrun.training import CUDA_CONTEXT_GIB, memory_fit

    out["derived_micro_batch"] = {}
    for backend, comp in backends:
        name = f"{backend}{'+compile' if comp else ''}"
        largest = None
        mb = derived_micro_batch("rtx4070", args.recipe, args.model, backend, seq_len=args.seq_len,
                                 memory_gib=args.cap_gib)
        out["derived_micro_batch"][name] = mb
        # from the derived one (one sequence when the estimate fits none), at most --cap-max-micro-batch
        mb = min(mb or 1, args.cap_max_micro_batch)
        while mb <= args.cap_max_micro_batch:
            spec = Spec(name, backend, comp, mb, args, memory_gib=args.cap_gib, gpu="rtx4070")
            free_memory(device, reset_compiled=True)
            torch.cuda.reset_peak_memory_stats(device)
            tr = None
            try:
                cfg, tr = build_trainer(spec, data_dir, out_dir, warmup=args.warmup)  # tunes here, under the cap
                warm_alloc = torch.cuda.max_memory_allocated(device) / GIB
                warm_reserved = torch.cuda.max_memory_reserved(device) / GIB
                free_memory(device)  # the tuners' cached blocks go back before the peaks restart
                torch.cuda.reset_peak_memory_stats(device)
                ms = [timed_step(tr, args.warmup + i) for i in range(args.cap_steps)]
                rec = run_record(spec, cfg, tr, ms, torch.cuda.max_memory_allocated(device) / GIB,
                                 torch.cuda.max_memory_reserved(device) / GIB, mb * cfg.seq_len * cfg.grad_accum)
                rec.pop("step_ms_all")
                rec["warmup_peak_alloc_gib"], rec["warmup_peak_reserved_gib"] = warm_alloc, warm_reserved
                rec["mfu_note"] = "MFU against the rtx4070 preset's 58.3 TFLOPS peak but timed on " \
                                  "this device: meaningless as a 4070 figure"
                rec["fit"] = memory_fit(rec["peak_reserved_gib"], args.cap_gib, total / GIB)
                rec["fits_card"] = rec["fit"]["fits"]
                if rec["fits_card"]:  # fitting = no OOM under the cap and reserved + context within the card
                    largest = mb
                log(f"  cap {args.cap_gib} GiB {name} mb={mb}: peak alloc {rec['peak_alloc_gib']:.2f} GiB, "
                    f"reserved {rec['peak_reserved_gib']:.2f} GiB (warm-up: {warm_reserved:.2f}), "
                    f"{'FITS' if rec['fits_card'] else 'DOES NOT FIT'} (reserved + {CUDA_CONTEXT_GIB} GiB context "
                    f"= {rec['fit']['needed_gib']:.2f} of {rec['fit']['card_gib']:.2f} GiB)")
            except torch.OutOfMemoryError:
                rec = oom_record(spec, "under the cap")
                rec["fits_card"] = False
                log(f"  cap {args.cap_gib} GiB {name} mb={mb}: out of memory")
            del tr
            out["runs"].append(rec)
            if not rec["fits_card"]:
                break
            mb *= 2
            out["largest_fitting"][name] = largest
        out["largest_fitting"][name] = largest


# ----------------------------------------------------------------------------------------- profile
def kernel_split(events, buckets: list[str]) -> tuple[dict, dict]:
    """(ms per bucket, ms per kernel name) over the profiler's GPU kernel events. Skipped: CPU events, and
    GPU user annotations (record_function ranges that Kineto also reports on the device timeline: each
    optimizer step, each compiled graph call), which span the kernels inside them and would count them twice."""
    split, top = {k: 0.0 for k in buckets}, {}
    for ev in events:
        if ev.device_type != torch.autograd.DeviceType.CUDA or getattr(ev, "is_user_annotation", False):
            continue
        ms = ev.device_time_total / 1e3  # a kernel event: its own duration, us
        split[bucket_of(ev.name)] += ms
        top[ev.name] = top.get(ev.name, 0.0) + ms
    return split, top


def profile_split(args, data_dir: Path, out_dir: Path, device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    out = {"micro_batch": args.profile_micro_batch, "buckets": [k for k, _ in BUCKETS] + ["other"],
           "patterns": dict(BUCKETS), "how": "one train_step after the warm-up, CUDA kernel self time summed "
                                             "per bucket; first matching pattern wins", "configs": {}}
    for name, backend, comp in (("triton+compile", "triton", True), ("torch+compile", "torch", True)):
        spec = Spec(name, backend, comp, args.profile_micro_batch, args)
        tr = None
        try:
            _, tr = build_trainer(spec, data_dir, out_dir, warmup=args.warmup)
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                tr.train_step(args.warmup)
                tr.sync()
                step_ms = (time.perf_counter() - t0) * 1e3  # under the profiler: the kernels' sum must fit in it
            split, top = kernel_split(prof.events(), out["buckets"])
            total = sum(split.values())
            out["configs"][name] = {
                "total_kernel_ms": total, "step_ms": step_ms, "ms": split,
                "percent": {k: (100 * v / total if total else 0.0) for k, v in split.items()},
                "top_kernels": [{"name": k, "ms": v, "bucket": bucket_of(k)}
                                for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:15]]}
            log(f"  profile {name}: {total:.2f} ms of kernels: "
                + ", ".join(f"{k} {v:.2f}" for k, v in split.items()))
        except torch.OutOfMemoryError:
            out["configs"][name] = {"fits": False}
        del tr
        free_memory(device, reset_compiled=True)
    return out


def markdown(rec: dict) -> str:
    env = rec["env"]
    lines = [f"# Training benchmark: {env['device']}, {rec['date']}", "",
             f"commit `{env['commit'][:10]}`{' (dirty)' if env['dirty'] else ''}, torch {env['torch']}, triton "
             f"{env['triton']}, CUDA {env['cuda']}. GPT-2 {rec['model']}, T = {rec['seq_len']}, {rec['dtype']}; "
             f"{rec['grad_accum']} micro-batch per optimizer step; median of {rec['steps']} timed steps per "
             f"configuration, round-robin blocks of {rec['block']}.", ""]
    if rec.get("smoke"):
        lines += ["**SMOKE RUN (CPU, tiny model): NOT A TIMING.**", ""]
    if rec.get("merged_from"):
        lines += ["Merged from " + ", ".join(f"`{m['file']}`" + ("" if m["complete"] else " (incomplete)")
                                             for m in rec["merged_from"]) + ".", ""]
    if rec["runs"]:
        lines += ["| config | micro-batch | tok/s | MFU | step ms (median) | peak alloc GiB |", "|---|---|---|---|---|---|"]
        for r in rec["runs"]:
            if not r["fits"]:
                lines.append(f"| {r['name']} | {r['micro_batch']} | OOM | | | |")
                continue
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            pa = "n/a" if r["peak_alloc_gib"] is None else f"{r['peak_alloc_gib']:.2f}"
            lines.append(f"| {r['name']} | {r['micro_batch']} | {r['tokens_per_s']:,.0f} | {mfu} "
                         f"| {r['step_ms_median']:.2f} | {pa} |")
        sp = rec["speedup_vs_compiled_torch"]
        lines += ["", "Speedup vs torch+compile (best triton / torch+compile, equal micro-batch): "
                  + (", ".join(f"mb {k}: {v['speedup']:.3f}x" for k, v in sp["per_micro_batch"].items())
                     or f"n/a ({sp.get('reason')})")]
    else:
        lines += ["No sweep in this record (--no-sweep): the cap check and/or profile only."]
    if rec.get("cap"):
        c = rec["cap"]
        rule = (f"peak reserved + {c['context_allowance_gib']} GiB context <= the card" if "context_allowance_gib"
                in c else f"allocated <= {c.get('alloc_limit_gib')} GiB (an older record's rule)")
        what = ("derived micro-batches (" + ", ".join(f"{k} {v}" for k, v in c["derived_micro_batch"].items())
                + ")" if c.get("derived_micro_batch") else "the preset's micro-batch")  # older records: a field
        lines += ["", f"12 GiB cap ({c['cap_gib']} GiB, rtx4070 preset): {what} fit ({rule}): "
                      f"{'yes' if c['preset_pass'] else 'NO'}; largest fitting "
                      f"micro-batch: " + ", ".join(f"{k} {v}" for k, v in c["largest_fitting"].items())]
    if rec.get("profile"):
        p = rec["profile"]
        lines += ["", f"## Kernel time by op kind (one step, micro-batch {p['micro_batch']})", "",
                  "| op kind | " + " | ".join(p["configs"]) + " |", "|---|" + "---|" * len(p["configs"])]
        for k in p["buckets"]:
            cells = [f"{c['ms'][k]:.2f} ms ({c['percent'][k]:.0f}%)" if "ms" in c else "OOM"
                     for c in p["configs"].values()]
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        lines.append("| kernels / step wall (profiled) | " + " | ".join(
            f"{c['total_kernel_ms']:.2f} / {c['step_ms']:.2f} ms" if "ms" in c else "OOM"
            for c in p["configs"].values()) + " |")
        lines += ["", "Kernel-name patterns (first match wins): "
                  + "; ".join(f"{k}: `{v}`" for k, v in p["patterns"].items()) + "."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ merge
# What every part of a merged record must share: it defines the measurement.
MERGE_SAME = ("smoke", "device", "commit", "versions", "preset", "peak_tflops", "recipe", "model", "seq_len",
              "dtype", "grad_accum", "steps", "block", "warmup")


class MergeError(ValueError):
    pass


def merge_records(paths: list[Path]) -> dict:
    """One train record from parts measured in separate commands. Raises MergeError naming what differs."""
    parts = []
    for path in map(Path, paths):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise MergeError(f"{path}: unreadable ({e})") from None
        if not isinstance(rec, dict) or rec.get("kind") != "train":
            raise MergeError(f"{path}: not a train benchmark record")
        parts.append((path, rec))
    if len(parts) < 2:
        raise MergeError("needs two or more records")
    (first_path, first), rest = parts[0], parts[1:]
    for path, rec in rest:
        for key in MERGE_SAME:
            if rec.get(key) != first.get(key):
                raise MergeError(f"{path.name} and {first_path.name} differ in {key} ({rec.get(key)!r} vs "
                                 f"{first.get(key)!r}): they measured different things; merge like with like")
    dirty = [path.name for path, rec in parts if rec.get("env", {}).get("dirty")]
    if dirty:
        raise MergeError(f"{', '.join(dirty)} measured a modified tree (commit + uncommitted changes): a merge cannot "
                         f"tell whether the parts ran the same code; measure from a clean commit")
    seen, runs = {}, []
    for path, rec in parts:
        for r in rec["runs"]:
            key = (r["name"], r["micro_batch"])
            if key in seen:
                raise MergeError(f"{r['name']} at micro-batch {r['micro_batch']} is in both {seen[key]} and "
                                 f"{path.name}: leave one of them out")
            seen[key] = path.name
            runs.append(r)
    order = [name for name, _, _ in CONFIGS]
    runs.sort(key=lambda r: (r["micro_batch"], order.index(r["name"]) if r["name"] in order else len(order)))
    merged = {k: first[k] for k in first if k not in ("runs", "cap", "profile", "complete", "date", "micro_batches")}
    for key in ("cap", "profile"):
        having = [path.name for path, rec in parts if rec.get(key)]
        if len(having) > 1:
            raise MergeError(f"more than one record holds a {key}: {', '.join(having)}; leave all but one out")
        merged[key] = next((rec[key] for _, rec in parts if rec.get(key)), None)
    merged.update({
        "complete": all(rec.get("complete") for _, rec in parts),
        "date": max(rec["date"] for _, rec in parts),
        "micro_batches": sorted({r["micro_batch"] for r in runs}),
        "runs": runs,
        "speedup_vs_compiled_torch": speedups(runs),
        "merged_from": [{"file": path.name, "date": rec["date"], "complete": rec.get("complete"),
                         "micro_batches": rec.get("micro_batches")} for path, rec in parts],
    })
    return merged


def merge_command(paths: list[Path], out_dir: Path | None) -> int:
    try:
        rec = merge_records(paths)
    except MergeError as e:
        print(f"error: --merge: {e}", file=sys.stderr)
        return 2
    try:
        out_dir = record_dir(out_dir if out_dir is not None else Path(paths[0]).parent, rec["smoke"])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stem = record_stem("train", rec["device"], rec["smoke"], datetime.datetime.fromisoformat(rec["date"])) + "-merged"
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / f"{stem}.json", rec)
    atomic_write_text(out_dir / f"{stem}.md", markdown(rec))
    log(f"merged {len(paths)} records ({', '.join(Path(p).name for p in paths)}): {len(rec['runs'])} runs, "
        f"micro-batches {rec['micro_batches']}, cap {'yes' if rec['cap'] else 'no'}, "
        f"profile {'yes' if rec['profile'] else 'no'}, complete {rec['complete']}")
    log(f"wrote {out_dir / (stem + '.json')} and .md")
    return 0


# ---------------------------------------------------------------------------------------- project
# Records written before the 2024-12-17 recipe took the name "speedrun" measured the 2024-11-10 model under it.
LEGACY_RECIPES = {"speedrun": "speedrun-dense"}


def project(target: str, record_path: Path | None) -> int:
    from tritonrun.presets import PRESETS
    from tritonrun.recipes import RECIPES

    peak = PRESETS[target].peak_tflops
    if record_path is None:
        print(f"error: --project {target} needs the measured MFU, which comes from a benchmark record: pass "
              f"--from-record bench/results/train-<device>-<date>.json (or run on a CUDA GPU to make one)",
              file=sys.stderr)
        return 2
    try:
        rec = json.loads(Path(record_path).read_text())
        runs = [r for r in rec["runs"] if r.get("fits") and r.get("mfu")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"error: --from-record {record_path}: not a readable train benchmark record ({e})", file=sys.stderr)
        return 2
    if not runs:
        print(f"error: --from-record {record_path}: no run with a measured MFU in it", file=sys.stderr)
        return 2
    # Only micro-batches the target can hold: MFU grows with the micro-batch, and the measured device may have
    # run ones that do not fit in the target's memory. The limit per config is the largest micro-batch that
    # fitted this record's cap check (the rtx4070 preset under its cap), else the micro-batch train_speedrun.py
    # derives for it on the target (the memory estimate).
    cap = rec.get("cap") or {}
    fitted = (cap.get("largest_fitting") or {}) if cap.get("preset") == target else {}
    recipe = rec.get("recipe", "gpt2")  # records from before --recipe measured GPT-2 under llm.c's recipe
    recipe = LEGACY_RECIPES.get(recipe, recipe)
    if recipe not in RECIPES or RECIPES[recipe].packed:  # this bench times dense (micro-batch, T) steps only
        print(f"error: --from-record {record_path}: unknown recipe {recipe!r}", file=sys.stderr)
        return 2
    derived = {}

    def target_micro_batch(r) -> int:
        key = (r["backend"], r.get("torch_ops", ""))
        if key not in derived:
            derived[key] = derived_micro_batch(target, recipe, rec.get("model", "d12"), *key,
                                               seq_len=rec.get("seq_len", SEQ_LEN)) or 0
        return derived[key]

    def limit(r):  # a config the cap check found fitting at no micro-batch (None) is left out
        return (fitted[r["name"]] or 0) if r["name"] in fitted else target_micro_batch(r)

    held = [r for r in runs if r["micro_batch"] <= limit(r)]
    ours = [r for r in held if r["backend"] == "triton"]
    pick = max(ours or held, key=lambda r: r["mfu"], default=None)
    if pick is None:
        most = max((limit(r) for r in runs), default=0)
        print(f"error: --from-record {record_path}: no run at a micro-batch {target} can hold (at most {most} by "
              f"the memory estimate, without a cap check in the record): rerun with --micro-batches {most or 1}",
              file=sys.stderr)
        return 2
    why = (f"largest micro-batch fitting the {cap.get('cap_gib')} GiB cap check in this record: {fitted[pick['name']]}"
           if pick["name"] in fitted else f"the micro-batch train_speedrun.py derives for {pick['name']} on "
           f"{target} by the memory estimate, {limit(pick)}: no cap check for it in this record")
    published_tokens, source = RECIPES[recipe].tokens_to_target, RECIPES[recipe].tokens_source
    with torch.device("meta"):
        model = RECIPES[recipe].model_for(RECIPES[recipe].sizes()["d12"])
    flops = model.flops_per_token(SEQ_LEN)
    mfu = pick["mfu"]
    seconds = published_tokens * flops / (peak * 1e12 * mfu)
    device = rec.get("env", {}).get("device", "unknown device")
    log("=" * 88)
    what = f"{recipe} d12"
    log(f"PROJECTION, NOT A MEASUREMENT: time to FineWeb val <= 3.28 on {target} ({what}, --recipe {recipe}, "
        f"T = {SEQ_LEN})")
    log("=" * 88)
    log("time = published_tokens x flops_per_token / (peak_flops x MFU)")
    log(f"  published_tokens = {published_tokens:.3e}   ({source})")
    log(f"  flops_per_token  = {flops}   (6N + 6LCT for {what} at T = {SEQ_LEN}, from "
        f"{type(model).__name__}.flops_per_token)")
    log(f"  peak_flops       = {peak}e12   ({target} dense bf16 tensor-core peak, fp32 accumulate)")
    log(f"  MFU              = {mfu:.4f}   (measured on {device}, NOT on a {target}: {pick['name']} "
        f"micro-batch {pick['micro_batch']}, record {record_path})")
    log(f"                     best MFU among runs at a micro-batch {target} holds ({why})")
    log(f"  time             = {seconds:.1f} s = {seconds / 3600:.3f} hours")
    log(f"hours = {seconds / 3600:.6f}")
    log("Assumes the 4070 reaches the same MFU as the measured device; memory bandwidth, clocks and the 12 GB "
        "budget may make it lower. projection, not a measurement.")
    return 0


# -------------------------------------------------------------------------------------------- main
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description="End-to-end training benchmark: tok/s, MFU, memory vs torch.compile.")
    p.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                   help="the backend x compile x micro-batch sweep (default on); --no-sweep runs only the cap check "
                        "and/or --profile, e.g. as a second command when one command has a time limit")
    p.add_argument("--micro-batches", default=None, help="comma list (default 8,16,32,64; smoke 2,4)")
    p.add_argument("--backend", choices=("torch", "triton"), action="append",
                   help="only these backends (repeatable; default all; smoke: torch)")
    p.add_argument("--torch-ops", action="append", default=[], metavar="OP[,OP...]",
                   help="also time the triton configurations with these ops kept in torch (repeatable, one variant "
                        "each; names as in train_speedrun.py --torch-ops)")
    p.add_argument("--configs", default=None, metavar="NAME[,NAME...]",
                   help=f"only these configurations (default all: {', '.join(n for n, _, _ in CONFIGS)}), e.g. "
                        f"triton,triton+compile,torch+compile")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="only compiled (--compile) or only eager (--no-compile) configs (default both; smoke eager)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 20, >= 20; smoke 3)")
    p.add_argument("--block", type=int, default=5, help="steps per round-robin block (default 5)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per config (default 5; smoke 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak for MFU (default: the device's preset)")
    p.add_argument("--cap-gib", type=float, default=12.0, help="memory cap check with the rtx4070 preset, 0 = off")
    p.add_argument("--cap-steps", type=int, default=3, help="timed steps per cap run (default 3)")
    p.add_argument("--cap-max-micro-batch", type=int, default=64, help="largest micro-batch tried under the cap")
    p.add_argument("--profile", action="store_true", help="profile one step of triton+compile and torch+compile")
    p.add_argument("--profile-micro-batch", type=int, default=16)
    p.add_argument("--recipe", choices=("gpt2", "speedrun-dense"),
                   help="the model and optimizers timed at (micro-batch, T = 1024) (train_speedrun.py --recipe; "
                        "default speedrun-dense on GPUs, gpt2 for --smoke on CPU; the packed --recipe speedrun is "
                        "not timed here yet); --project reads it from the record")
    p.add_argument("--project", choices=("rtx4070",), help="print the projected time to val 3.28 on this GPU")
    p.add_argument("--from-record", type=Path, help="with --project: the record whose MFU to use (no GPU needed)")
    p.add_argument("--merge", type=Path, nargs="+", metavar="RECORD",
                   help="join records of one sweep measured in separate commands into one (no GPU needed)")
    p.add_argument("--smoke", action="store_true", help="CPU-allowed smoke run (tiny model, seq 64): NOT A TIMING")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the record goes (default bench/results; --smoke: only when given, never bench/results)")
    args = p.parse_args(argv)
    args.smoke_defaults = args.smoke
    for name in ("steps", "warmup", "cap_steps", "cap_max_micro_batch", "profile_micro_batch"):
        v = getattr(args, name, None)
        if v is not None and v < (0 if name == "warmup" else 1):
            p.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'warmup' else 'positive'}, got {v}")
    if args.cap_gib is not None and not (math.isfinite(args.cap_gib) and args.cap_gib >= 0):
        p.error(f"--cap-gib must be a finite number >= 0 (0 = off), got {args.cap_gib}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        p.error(f"--peak-tflops must be a positive finite number, got {args.peak_tflops}")
    if args.micro_batches is not None:
        try:
            values = [int(x) for x in args.micro_batches.split(",") if x.strip()]
        except ValueError:
            values = []
        if not values or any(v < 1 for v in values):
            p.error(f"--micro-batches {args.micro_batches!r}: expected positive integers, e.g. 8,16")
    return args


class Refused(Exception):
    """A run the flags or the machine rule out: main prints "error: <message>" and exits 2."""


def smoke_settings(args, device) -> tuple[list[int], list[str], list[bool]]:
    """--smoke: the tiny model's flags and defaults, the banner, and the Triton interpreter when triton runs on the
    CPU; (micro-batches, backends, compile settings)."""
    args.model, args.seq_len, args.dtype, args.gpu = "tiny", 64, "fp32" if device.type == "cpu" else "bf16", \
        "cpu" if device.type == "cpu" else "auto"
    mbs = [2, 4]
    args.steps = args.steps or 3
    args.warmup = 1 if args.warmup is None else args.warmup
    backends = args.backend or ["torch"]
    compiles = [args.compile] if args.compile is not None else [False]
    args.cap_gib, args.profile = 0, False
    log("=" * 88)
    log("SMOKE RUN: tiny model, seq 64, a few steps. NOT A TIMING: never quote these numbers.")
    log("=" * 88)
    if "triton" in backends and device.type == "cpu":
        from tritonrun.gpt2.ops import use_cpu_interpreter

        try:
            use_cpu_interpreter()
        except RuntimeError as e:
            raise Refused(str(e)) from None
    return mbs, backends, compiles


def gpu_settings(args) -> tuple[list[int], list[str], list[bool]]:
    """A GPU measurement: d12 at T = 1024 in bf16 under the device's preset, and the flags' defaults; (micro-batches,
    backends, compile settings). Refused without a preset or --peak-tflops, or with --steps below 20."""
    from tritonrun.errors import UserError
    from tritonrun.presets import resolve_preset

    args.model, args.seq_len, args.dtype = "d12", SEQ_LEN, "bf16"
    try:
        args.gpu = resolve_preset("auto")
    except UserError:
        args.gpu = "h100"
        if args.peak_tflops is None:
            raise Refused(f"no preset knows {torch.cuda.get_device_name()}: pass --peak-tflops for MFU") from None
    mbs = [int(x) for x in args.micro_batches.split(",")] if args.micro_batches else list(DEFAULT_MICRO_BATCHES)
    args.steps = args.steps or 20
    if args.steps < 20:
        raise Refused("--steps must be >= 20 for a GPU measurement")
    args.warmup = 5 if args.warmup is None else args.warmup
    backends = args.backend or ["torch", "triton"]
    compiles = [args.compile] if args.compile is not None else [True, False]
    return mbs, backends, compiles


def pick_configs(args, backends: list[str], compiles: list[bool]) -> list[tuple]:
    """The configurations the sweep times (sweep_configs), after checking --torch-ops and --configs."""
    from tritonrun.gpt2.ops import parse_op_list

    try:
        torch_ops = [",".join(parse_op_list(ops)) for ops in args.torch_ops]
    except ValueError as e:
        raise Refused(f"--torch-ops: {e}") from None
    if torch_ops and "triton" not in backends:
        raise Refused("--torch-ops makes variants of the triton configurations: add --backend triton")
    names = None
    if args.configs is not None:
        names = [n.strip() for n in args.configs.split(",") if n.strip()]
        unknown = [n for n in names if n not in [c[0] for c in CONFIGS]]
        if unknown or not names:
            raise Refused(f"--configs: unknown configuration {unknown[0] if unknown else repr(args.configs)}: "
                          f"choose from {', '.join(n for n, _, _ in CONFIGS)}")
    return sweep_configs(backends, compiles, torch_ops, names)


@dataclass
class BenchRun:
    """One measuring run: the settled flags, the configurations, where the record goes, and what it has measured
    so far (the record is rewritten from these after every part)."""
    args: argparse.Namespace
    smoke: bool
    device: torch.device
    mbs: list[int]  # the sweep's micro-batches (none under --no-sweep)
    configs: list[tuple]  # (name, backend, compile, torch_ops) of each configuration the sweep times
    env: dict
    now: datetime.datetime
    out_dir: Path | None  # None: a smoke run without --out-dir writes no record
    stem: str | None = None
    path: Path | None = None
    runs: list[dict] = field(default_factory=list)
    cap: dict | None = None
    prof: dict | None = None

    def save(self, complete: bool) -> None:
        """The record so far, rewritten atomically after every part: a run stopped by a time limit (or OOM-killed)
        keeps what it measured, marked complete: false."""
        if self.path is None:
            return
        from tritonrun.presets import peak_tflops_for

        args, env = self.args, self.env
        record = {
            "kind": "train", "smoke": self.smoke, "complete": complete, "date": self.now.isoformat(timespec="seconds"),
            "env": env, "device": env["device"], "commit": env["commit"],
            "versions": {k: env[k] for k in ("python", "torch", "triton", "cuda")},
            "preset": args.gpu, "peak_tflops": args.peak_tflops or peak_tflops_for(args.gpu),
            "recipe": args.recipe, "model": args.model, "seq_len": args.seq_len, "dtype": args.dtype,
            "grad_accum": args.grad_accum,
            "micro_batches": self.mbs, "steps": args.steps, "block": args.block, "warmup": args.warmup,
            "method": "steady state: warm-up steps untimed, then timed steps round-robin across the configurations "
                      "of one micro-batch in blocks; each step timed alone (synchronize before/after); median. One "
                      "step = one optimizer step over grad_accum micro-batches (tokens per step = micro_batch x "
                      "seq_len x grad_accum). Data: synthetic uniformly random tokens in an llm.c shard, read by "
                      "the real ShardLoader. peak_alloc_gib: own peak as if alone (group's other trainers' resident "
                      "memory subtracted); peak_reserved_gib: the shared pool's peak (upper bound).",
            "runs": self.runs, "speedup_vs_compiled_torch": speedups(self.runs), "cap": self.cap,
            "profile": self.prof,
        }
        atomic_write_json(self.path, record)
        if complete:
            log(f"wrote {self.path}")
            if self.prof is not None or not self.smoke:
                atomic_write_text(self.out_dir / f"{self.stem}.md", markdown(record))
                log(f"wrote {self.out_dir / (self.stem + '.md')}")


def plan(args, has_cuda: bool) -> BenchRun:
    """The flags settled for a smoke run or a GPU measurement, the configurations, the environment (logged) and the
    record's path; Refused when the machine or the flags leave nothing to measure."""
    if not has_cuda and not args.smoke:
        raise Refused("no CUDA GPU: bench/train.py measures GPU training; use --smoke --out-dir DIR for a CPU smoke "
                      "run (not a timing), or --project rtx4070 --from-record PATH")
    smoke = args.smoke
    try:
        out_dir = record_dir(args.out_dir, smoke)
    except ValueError as e:
        raise Refused(str(e)) from None
    # an indexed device (cuda:N): torch.cuda.set_per_process_memory_fraction rejects a bare "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if has_cuda and not smoke else torch.device("cpu")
    mbs, backends, compiles = smoke_settings(args, device) if smoke else gpu_settings(args)
    # the GPU presets' default recipe is the packed speedrun, which this (B, T = 1024) timing does not run: its dense
    # predecessor stands in
    args.recipe = args.recipe or ("gpt2" if args.gpu == "cpu" else "speedrun-dense")
    if smoke and args.micro_batches:
        mbs = [int(x) for x in args.micro_batches.split(",")]
    if not args.sweep:
        if not ((args.cap_gib and not smoke) or args.profile):
            raise Refused("--no-sweep leaves nothing to measure: add --profile, or a --cap-gib above 0 (on a GPU)")
        mbs = []
    configs = pick_configs(args, backends, compiles)

    env = env_info(device)
    log(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  commit {env['commit'][:10]}"
        f"{' (dirty)' if env['dirty'] else ''}  preset {args.gpu}")
    bench = BenchRun(args=args, smoke=smoke, device=device, mbs=mbs, configs=configs, env=env,
                     now=datetime.datetime.now(), out_dir=out_dir)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        bench.stem = record_stem("train", env["device"], smoke, bench.now)
        bench.path = out_dir / f"{bench.stem}.json"
    return bench


def measure_parts(bench: BenchRun, data_dir: Path, out_dir: Path) -> None:
    """The sweep's micro-batch groups, then the cap check and the profile, the record saved after each part."""
    args, device = bench.args, bench.device
    for mb in bench.mbs:
        log(f"micro-batch {mb}:")
        bench.runs += sweep_group([Spec(n, b, c, mb, args, torch_ops=ops) for n, b, c, ops in bench.configs], args,
                                  data_dir, out_dir, device)
        bench.save(complete=False)
    if args.cap_gib and not bench.smoke:
        bench.cap = cap_check(args, data_dir, out_dir, device)
        bench.save(complete=False)
    if args.profile:
        bench.prof = profile_split(args, data_dir, out_dir, device)


def measure(bench: BenchRun) -> int:
    """Every part measured on synthetic data in a temp dir; 130 when interrupted (the record so far kept), else 0."""
    from tritonrun.gpt2 import MODEL_SIZES

    args, path = bench.args, bench.path
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tmp = Path(tmp)
        data_dir = tmp / "data"
        data_dir.mkdir()
        biggest = max(bench.mbs + ([args.cap_max_micro_batch] if args.cap_gib and not bench.smoke else [])
                      + ([args.profile_micro_batch] if args.profile else []))
        synthetic_data(data_dir, MODEL_SIZES[args.model].vocab_size, 2 * biggest * args.seq_len * args.grad_accum + 2)
        try:
            measure_parts(bench, data_dir, tmp / "out")
        except (Interrupted, KeyboardInterrupt) as e:  # e.g. .ci/gpu's deadline: keep what was measured
            if isinstance(e, Interrupted) and isinstance(e.part, list):
                bench.runs += e.part
            elif isinstance(e, Interrupted):
                bench.cap = e.part
            bench.save(complete=False)
            print(f"interrupted: the record so far{f' is in {path}' if path else ' was not written (no --out-dir)'} "
                  f"(complete: false)", file=sys.stderr)
            return 130
    return 0


def finish(bench: BenchRun) -> int:
    """After the complete record: the smoke warning, and --project from the record just written."""
    if bench.smoke:
        log("SMOKE RUN: NOT A TIMING.")
    if bench.path is not None:
        if bench.args.project:
            return project(bench.args.project, bench.path)
    else:
        log("no record written (smoke run without --out-dir)")
    return 0


@reports_write_failures
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        return merge_command(args.merge, args.out_dir)
    if args.project and args.from_record is not None:
        return project(args.project, args.from_record)
    has_cuda = torch.cuda.is_available()
    if args.project and not has_cuda:
        return project(args.project, None)
    try:
        bench = plan(args, has_cuda)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rc = measure(bench)
    if rc:
        return rc
    bench.save(complete=True)
    return finish(bench)


if __name__ == "__main__":
    sys.exit(main())
