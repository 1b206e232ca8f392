#!/usr/bin/env python
"""Peak memory of one whole training step, estimated without a GPU: the command line of the estimator
in tritonrun/memory.py (what runs, how it is tracked, the fit rule: its docstring).

    python bench/memory.py --gpu rtx4070                                  # both backends, the largest that fits
    python bench/memory.py --gpu rtx4070 --backend triton --micro-batch 16 --json est.json
    python bench/memory.py --gpu rtx4070 --micro-batch 16,8 --max --record  # bench/results/memory-rtx4070-<date>.json
    python bench/memory.py --gpu rtx4070 --recipe speedrun --max --record   # memory-speedrun-packed-rtx4070-<date>.json
    python bench/memory.py --gpu rtx4070 --recipe speedrun-dense --max --record  # memory-speedrun-dense-rtx4070-...
    python bench/memory.py --gpu rtx4070 --recipe record89 --max --record   # memory-record89-rtx4070-<date>.json

--max: the largest micro-batch dividing total_batch_tokens / T whose estimate fits the budget (the estimate grows
with the micro-batch; the search checks that it does); under a packed recipe the largest power-of-two --seq-len.
Without --micro-batch (dense) or --seq-len (packed) it searches as --max does: the size train_speedrun.py derives
at startup (tritonrun.memory.fit_preset, the same search). --record writes bench/results/memory-<preset>-<date>.json
(gpt2), memory-speedrun-packed-... (speedrun), memory-speedrun-dense-... (speedrun-dense) or memory-record89-...
(record89: its own step, tritonrun.memory.record89_estimate, over its 393,216-token batch); tests hold the derivation
to these records.
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
from dataclasses import replace  # noqa: E402

import torch  # noqa: E402

from tritonrun.memory import (BUDGET_MARGIN, CONTEXT_ALLOWANCE, FRAGMENTATION, GIB, GPUS, Setup, estimate,  # noqa: E402
                              fit, recipe_parts)
from tritonrun.recipes import RECIPES as RECIPE_REGISTRY, get_recipe  # noqa: E402
from tritonrun.runinfo import atomic_write_json, env_info, reports_write_failures  # noqa: E402


class UserError(Exception):
    """A mistake on the command line: one `error:` line, exit 2."""


RECIPES = tuple(RECIPE_REGISTRY)


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
                        "no clip), speedrun-dense (2024-11-10) or record89 (2026-07-17: NorMuon + cautious Adam, bf16 "
                        "storage); default: train_speedrun.py's on a GPU (record89)")
    p.add_argument("--backend", choices=["torch", "triton", "both"], default="both",
                   help="ops to estimate (default both: triton first, then torch)")
    p.add_argument("--micro-batch", metavar="N[,N...]", help="micro-batch(es) to estimate (default: search the largest "
                                                                  "that fits, as --max)")
    p.add_argument("--max", action="store_true", help="also find the largest micro-batch that fits the budget "
                                                      "(speedrun: the largest packed --seq-len)")
    p.add_argument("--model", help="model size (default d12; gpt2: d12, d24, ...; speedrun: d12, tiny)")
    p.add_argument("--seq-len", type=int, help="sequence length (default 1024; packed recipes: search the largest "
                                               "that fits, as --max)")
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
    from tritonrun.defaults import DEFAULT_RECIPE, RUN_DEFAULTS
    from tritonrun.presets import PRESETS

    preset = PRESETS[args.gpu]
    recipe = args.recipe or DEFAULT_RECIPE[preset.device]
    total = get_recipe(recipe).defaults(on_gpu=True).get("total_batch_tokens", RUN_DEFAULTS["total_batch_tokens"])
    sizes = get_recipe(recipe).sizes()
    model = args.model or RUN_DEFAULTS["model"]
    if model not in sizes:
        takers = [r.name for r in RECIPE_REGISTRY.values() if model in r.sizes()]
        raise UserError(f"--model {model!r} is not a {recipe} model: choose from {', '.join(sizes)}"
                        + (f" (or --recipe {takers[0]})" if takers else ""))
    packed = get_recipe(recipe).packed
    seq_len = args.seq_len or RUN_DEFAULTS["seq_len"]  # packed without --seq-len: the search sets it
    if not (args.micro_batch if not packed else args.seq_len):
        args.max = True  # no size given: the trainer's, the largest that fits
    if packed and args.micro_batch and args.micro_batch.strip() != "1":
        raise UserError(f"--micro-batch {args.micro_batch}: --recipe {recipe} packs one sequence per micro-batch; "
                        f"size it with --seq-len (or --max to search it)")
    if seq_len <= 0 or seq_len > sizes[model].block_size:
        raise UserError(f"--seq-len {seq_len}: must be in 1..{sizes[model].block_size} for {recipe} {model}")
    lengths = get_recipe(recipe).packed_lengths(total, sizes[model].block_size)
    if packed and args.seq_len and seq_len not in lengths:
        raise UserError(f"--seq-len {seq_len} is not a packed length of --recipe {recipe} over its {total}-token "
                        f"batch: pick one of {', '.join(map(str, lengths))}")
    if total % seq_len:
        raise UserError(f"--seq-len {seq_len} does not divide the total batch of {total} tokens: pick a power of two")
    if args.seq_len is not None and args.seq_len <= 0:
        raise UserError(f"--seq-len {args.seq_len}: must be positive")
    if args.budget_gib is not None and not (math.isfinite(args.budget_gib) and args.budget_gib > 0):
        raise UserError(f"--budget-gib {args.budget_gib:g}: must be positive")
    setup = Setup(args.gpu, model, seq_len, total, preset.memory_gib, GPUS[args.gpu],
                  args.budget_gib, recipe)
    backends = ["triton", "torch"] if args.backend == "both" else [args.backend]
    micro_batches = parse_micro_batches(args.micro_batch) if args.micro_batch else []
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
    return (f"{e['backend']:<6} B={e['micro_batch']:<4} T={e['seq_len']:<6} peak {e['peak_bytes'] / GIB:6.2f} GiB  "
            f"reserved est. "
            f"{e['peak_reserved_estimate_bytes'] / GIB:6.2f} GiB  {'fits' if e['fits'] else 'DOES NOT FIT':<12} | "
            f"params {s['parameters']:.2f}  grads {s['grads']:.2f}  optim {s['optimizer_state']:.2f}  "
            f"act {s['activations']:.2f}  temp {s['temporaries']:.2f}  (peak in {e['peak_phase']}, "
            f"{e['seconds']:.1f} s)")


@reports_write_failures
def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        setup, backends, micro_batches = resolve(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    budget = setup.budget_bytes
    print(f"memory estimate: recipe {setup.recipe}, preset {setup.preset} ({setup.target.arch}, "
          f"{setup.target.sm_count} SMs), model {setup.model}, T={setup.seq_len}, "
          f"{'bf16 autocast' if get_recipe(setup.recipe).autocast else 'bf16 storage (no autocast)'}, eager; budget "
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
    for backend in backends if args.max else []:  # tritonrun.memory.fit's search, through get (printed, kept)
        found = fit(setup, backend, use_cache=False, estimate_fn=lambda s, be, mb: get(be, mb, s.seq_len))
        key, best = found["searched"], found[found["searched"]]
        shape = (lambda v: (1, v)) if setup.packed else (lambda v: (v, None))  # (micro-batch, seq_len) of a value
        peaks = [get(backend, *shape(v))["peak_bytes"] for v, _ in found["tried"]]
        monotone = all(a < c for a, c in zip(peaks, peaks[1:]))
        what = "sequence length" if setup.packed else "micro-batch"
        (seq_maxima if setup.packed else maxima)[backend] = {
            key: best, "tried": [{key: v, "fits": f} for v, f in found["tried"]], f"peak_grows_with_{key}": monotone}
        print(f"  {backend}: largest {'packed --seq-len' if setup.packed else 'micro-batch'} within "
              f"{budget / GIB:.2f} GiB reserved: {best}"
              f"{'' if monotone else f' (WARNING: the estimate did not grow with the {what})'}", flush=True)
        if best is not None and not micro_batches:
            estimates.append(get(backend, *shape(best)))
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
        "step": (primary["step"] if "step" in primary else packed_step if setup.packed
                 else "forward + backward per micro-batch, grad clip 1.0, AdamW step, zero_grad"
                 if recipe_parts(setup.recipe, setup.model)[3]
                 else "forward + backward per micro-batch, no grad clip, Adam step (wte, lm_head, scalars) then "
                      "Muon step (fp32 momentum = optimizer_state; bf16 Newton-Schulz batched by shape = "
                      "temporaries), zero_grad"),
        "packed": setup.packed,
        "mode": "eager", "dtype": primary.get("dtype", "bf16 autocast"), "model": setup.model,
        "seq_len": primary["seq_len"],
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
