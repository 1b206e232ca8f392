#!/usr/bin/env python
"""record89's one precision change, measured in training: our bf16 LM head against the record's FP8 one, on CPU.

    OMP_NUM_THREADS=1 python bench/record89_head.py                 # 3 seeds x 2 heads; writes the record
    python bench/record89_head.py --smoke --out-dir DIR             # 2 steps, 1 seed: checks the plumbing

The record runs its training head in FP8 (h and the weight in e4m3 at fixed scales, the logits' gradient in e5m2:
tritonrun/gpt2/speedrun89.py mtp_head_fp8_reference); ours runs it in bf16 (README, record89's deviations). This
trains record #89's model at a small scale, the same run with each head (the ops seam's mtp_head swapped, nothing else),
over several seeds (each its own init and data offset), and asks whether the two heads' loss curves differ by more
than the seeds do:
  model     Record89GPT's topology (11 layers, 6 heads of --head-dim 32: width 192) with a 300-token vocabulary and 97
            bigram rows,
            fp32 parameters, the torch ops (the FP8 head is a torch emulation through torch's fp8 casts);
  data      a fixed random first-order Markov chain over the 300 tokens (sharp transitions: a loss that can fall far
            below ln 300 in a few steps), one packed --seq-len sequence per micro-batch;
  schedule  the recipe's own (tritonrun/recipes/modded_nanogpt_2026_07_17.py) scaled to --steps: stages of 1/3, 2/3,
            all of the micro-batches, the record's lr / momentum / MTP / prefix weights, NorMuon + cautious Adam, the
            record's gradient (sum / 8); after every step the eval loss (plain cross-entropy) of a held-out sequence.
Recorded (bench/results/record89-head-cpu-<date>.json): every curve, each seed's mean eval loss over the last
--window steps, and the verdict: the difference of the two heads' means over seeds against the FP8 head's spread
over seeds (max - min of the per-seed means); "within_noise" when the difference is not larger.
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
import dataclasses  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from tritonrun.runinfo import atomic_write_json, env_info, record_dir, record_stem, reports_write_failures  # noqa: E402

VOCAB = 300


def log(msg: str = "") -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 24; smoke 4)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per head (default 3; smoke 1)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per packed sequence (default 64)")
    p.add_argument("--micro-batches", type=int, default=3,
                   help="micro-batches of the last stage (default 3; the first two stages take 1/3 and 2/3)")
    p.add_argument("--window", type=int, default=6, help="last steps averaged per seed (default 6)")
    p.add_argument("--head-dim", type=int, default=None,
                   help="the model's head width; n_embd = 6 x it (default 32; smoke 16)")
    p.add_argument("--smoke", action="store_true", help="a short run: the plumbing, no figures")
    p.add_argument("--out-dir", type=Path, default=None, help="where the record goes (default bench/results; smoke: "
                                                                "nowhere unless given)")
    args = p.parse_args(argv)
    args.steps = args.steps or (4 if args.smoke else 24)
    args.seeds = args.seeds or (1 if args.smoke else 3)
    if args.steps < 4:
        p.error(f"--steps {args.steps}: the recipe's stages need at least 4")
    if args.micro_batches % 3:
        p.error(f"--micro-batches {args.micro_batches}: a multiple of 3 (the stages take a third and two thirds)")
    args.window = min(args.window, args.steps)
    args.head_dim = args.head_dim or (16 if args.smoke else 32)
    if args.head_dim % 4:
        p.error(f"--head-dim {args.head_dim}: a multiple of 4 (half-truncated RoPE pairs)")
    return args


def markov_corpus(n: int, seed: int = 1234) -> torch.Tensor:
    """n tokens of a first-order Markov chain with a fixed random, sharply peaked transition table."""
    g = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(VOCAB, VOCAB, generator=g) * 3, dim=1)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    for i in range(1, n):
        out[i] = torch.multinomial(trans[out[i - 1]], 1, generator=g)
    return out


def train(head: str, seed: int, args, data: torch.Tensor, held_out: torch.Tensor) -> list[float]:
    """Eval losses after each step of one run: the recipe's schedule and optimizer, `head` the training head."""
    from tritonrun.gpt2 import speedrun89 as s89
    from tritonrun.gpt2.model89 import Record89Config, Record89GPT
    from tritonrun.gpt2.ops import get_ops
    from tritonrun.recipes.modded_nanogpt_2026_07_17 import Record89Schedule, scaled_schedule
    from tritonrun.recipes.record89_optim import Record89Optimizer

    torch.manual_seed(seed)
    ops = get_ops("torch")
    if head == "fp8":
        ops = dataclasses.replace(ops, mtp_head=s89.mtp_head_fp8_reference)
    config = Record89Config(vocab_size=VOCAB, head_dim=args.head_dim, n_embd=6 * args.head_dim, bigram_rows=97,
                            dtype="float32")
    model = Record89GPT(config, ops)
    T, steps = args.seq_len, args.steps
    plan = scaled_schedule(steps)
    schedule = Record89Schedule(plan, T, config.head_dim, "cpu", steps)
    optimizer = Record89Optimizer(model, plan.untie_step)
    cu = torch.tensor([0, T], dtype=torch.int32)
    pos = (seed * 7919) % max(1, data.numel() // 2)  # each seed its own data offset
    curve = []
    for step in range(steps):
        n = schedule.micro_batches(step, args.micro_batches)
        inputs = schedule.window(step)
        model.train()
        for _ in range(n):
            if pos + T + 1 > data.numel():
                pos = 0
            chunk = data[pos:pos + T + 1]
            pos += T + 1
            loss = model(chunk[:-1], chunk[1:], cu, inputs) / n
            (loss * schedule.grad_scale(step, n * T)).backward()
        schedule.apply(optimizer, step)
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            curve.append(model(held_out[:-1], held_out[1:], cu, schedule.window(steps)).item())
    return curve


def verdict(curves: dict, window: int) -> dict:
    means = {head: [sum(c[-window:]) / window for c in runs] for head, runs in curves.items()}
    avg = {head: sum(v) / len(v) for head, v in means.items()}
    spread = max(means["fp8"]) - min(means["fp8"])
    diff = abs(avg["bf16"] - avg["fp8"])
    return {"window": window, "per_seed_means": means, "mean": avg, "difference": diff, "fp8_seed_spread": spread,
            "within_noise": diff <= spread,
            "rule": "|mean over seeds (bf16 head) - mean over seeds (fp8 head)| <= max - min of the fp8 head's "
                    "per-seed means, each the mean eval loss of a run's last `window` steps"}


@reports_write_failures
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out_dir = record_dir(args.out_dir, args.smoke)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    now = datetime.datetime.now()
    T = args.seq_len
    corpus = markov_corpus(args.steps * args.micro_batches * (T + 1) * 2 + 4 * (T + 1))
    data, held_out = corpus[:-(T + 1)], corpus[-(T + 1):]  # the held-out sequence: the same chain's last tokens
    log(f"record89 head precision: {args.seeds} seed(s) x (fp8, bf16), {args.steps} steps, {args.micro_batches} "
        f"micro-batches of {T} tokens in the last stage")
    curves: dict[str, list[list[float]]] = {"fp8": [], "bf16": []}
    seconds = {}
    t_all = time.perf_counter()
    for seed in range(args.seeds):
        for head in ("fp8", "bf16"):
            t0 = time.perf_counter()
            curve = train(head, seed, args, data, held_out)
            seconds[f"{head}-{seed}"] = round(time.perf_counter() - t0, 1)
            curves[head].append(curve)
            log(f"  {head:<4} seed {seed}: eval {curve[0]:.4f} -> {curve[-1]:.4f} ({seconds[f'{head}-{seed}']} s)")
    result = verdict(curves, args.window)
    log(f"last {args.window} steps, mean over seeds: fp8 {result['mean']['fp8']:.4f}, bf16 {result['mean']['bf16']:.4f}"
        f" (difference {result['difference']:.4f}; the fp8 head's seed spread {result['fp8_seed_spread']:.4f}): "
        f"{'within' if result['within_noise'] else 'OUTSIDE'} noise")
    record = {"record": "record89-head", "version": 1, "date": now.strftime("%Y-%m-%d"),
              "env": env_info(torch.device("cpu")), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "config": {"steps": args.steps, "seeds": args.seeds, "seq_len": T, "micro_batches": args.micro_batches,
                         "vocab": VOCAB, "head_dim": args.head_dim, "n_embd": 6 * args.head_dim,
                         "model": "Record89GPT, 11 layers of 6 heads, 97 bigram rows, fp32 parameters",
                         "data": "first-order Markov chain over 300 tokens (torch seed 1234); its last seq_len + 1 "
                                 "tokens held out"},
              "curves": curves, "seconds": seconds, "wall_s": round(time.perf_counter() - t_all, 1), **result}
    if out_dir is not None:
        path = Path(out_dir) / f"{record_stem('record89-head', 'cpu', args.smoke, now)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, record)
        log(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
