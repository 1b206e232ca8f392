#!/usr/bin/env python
"""A/B of the recipes at small scale: gpt2 (llm.c) against the speedrun recipes (modded-nanogpt records:
speedrun-dense, the 2024-11-10 one at T = --seq-len; speedrun, the 2024-12-17 one, packed sequences of
--packed-seq-len tokens with its sliding window), equal model size and equal tokens, each at its own tuned lr.

    OMP_NUM_THREADS=1 python bench/recipes.py --jobs 2        # CPU: mini model, sample data; writes the record
    python bench/recipes.py --data data/fineweb10B --gpu auto --model d12 --steps 500 --total-batch-tokens 65536
    python bench/recipes.py --smoke --out-dir DIR             # a few steps each: checks the plumbing, no figures

On a shared CPU run it with OMP_NUM_THREADS=1 (every training inherits it): one intra-op thread is the fastest for the
tiny model there (1.2 s a step instead of 2-3 s with 8 processes on 2 cores); the record notes the setting.

Each recipe (--recipes, default all) sweeps its lrs (--lrs RECIPE=LR,LR,...: for gpt2 AdamW's peak lr, default
1e-3,2e-3,4e-3; for a speedrun recipe the multiplier on every optimizer group's base lr, 1.0 = the record's,
default 0.5,1,2) and keeps the lr with the lowest final val loss. A best lr at either end of what was swept is not
a tuned one: the sweep then goes on past that end by the sweep's own ratio (up to --extend more runs, default 2).
By default every sweep run trains the full budget (--steps x --total-batch-tokens) and the best one is the A/B
run: a shorter sweep (--sweep-steps, the schedule scaled to that length, the kept lr then retrained at the full
budget) is cheaper but favours high lrs (measured here: gpt2's 30-step sweep picked 1.6e-2, which ends 150 steps
at 5.92 where 4e-3 reaches 5.84). A list of one lr skips that recipe's sweep. Every training is a fresh
`train_speedrun.py` process (no state shared between runs) with its own out dir under --work-dir, on the same
data, seed, --val-every and --val-tokens; its result.json gives the val curve. gpt2 warms up over llm.c's
fraction of the run (700 of 18,865 steps), the speedrun recipes over none (the records'); each then follows its
own schedule (cosine to 0; constant, then linear to 0 over the record's last fraction). The record
(bench/results/recipes-<device>-<date>.json; "complete": false until every A/B run is done, rewritten after every
run, so an interrupt keeps the finished runs) holds the sweeps, every recipe's val curve, the ranking and each
recipe's difference from gpt2; a plot goes beside it when matplotlib is installed.
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
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from tritonrun.runinfo import atomic_write_json, env_info, record_dir, record_stem, reports_write_failures  # noqa: E402

# train_speedrun.RECIPES that come in the A/B's shared shapes (mini), gpt2 first (the baseline the others are compared
# with), then in the records' order; spelled out here so that a bad flag gets its error line without torch's import
# time (tests/test_bench_recipes.py checks the two agree). record89's model keeps the record's fixed topology (tiny and
# d12 only): its own CPU learning check is tests/test_recipe89.py.
RECIPES = ("gpt2", "speedrun-dense", "speedrun")


def recipe_of(name: str):
    """The recipe object (tritonrun/recipes/) behind a name: whether it packs, its lr's meaning, its warmup."""
    from tritonrun.recipes import get_recipe

    return get_recipe(name)


def known_recipes() -> tuple[str, ...]:
    return RECIPES


# Default sweeps: around the cpu preset's AdamW peak (2e-3), and around the records' lrs (multiplier 1.0).
DEFAULT_LRS_GPT2 = (1e-3, 2e-3, 4e-3)
DEFAULT_LRS_MULT = (0.5, 1.0, 2.0)


def default_lrs(recipe: str, smoke: bool) -> tuple[float, ...]:
    lrs = DEFAULT_LRS_MULT if recipe_of(recipe).lr_is_multiplier else DEFAULT_LRS_GPT2
    return (lrs[1],) if smoke else lrs


def warmup_steps(name: str, steps: int) -> int:
    """The recipe's lr warmup over a run of `steps` (gpt2: llm.c's 700 of 18,865, at least 1; the records': 0)."""
    frac = recipe_of(name).warmup_fraction
    return max(1, round(frac * steps)) if frac else 0


def log(msg: str = "") -> None:
    print(msg, flush=True)


def lr_list(text: str) -> tuple[float, ...]:
    try:
        lrs = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated numbers, e.g. 1e-3,2e-3") from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more lrs > 0, comma-separated")
    return lrs


def lrs_entry(text: str) -> tuple[str, tuple[float, ...]]:
    recipe, sep, values = text.partition("=")
    if not sep or not recipe.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: give RECIPE=LR,LR,..., e.g. gpt2=1e-3,2e-3")
    return recipe.strip(), lr_list(values)


def recipe_list(text: str) -> tuple[str, ...]:
    names = tuple(r.strip() for r in text.split(",") if r.strip())
    known = known_recipes()
    bad = [r for r in names if r not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"{text!r}: the recipes are {', '.join(known)} (comma-separated)")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"{text!r}: a recipe is named twice")
    return names


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def parse_args(argv=None) -> argparse.Namespace:
    p = _Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default=None, help="train_speedrun.py preset (default cpu; auto picks the GPU's)")
    p.add_argument("--model", default=None,
                   help="model size, the same shape for every recipe (default mini: 4 blocks of 128; smoke tiny)")
    p.add_argument("--data", default="sample", help="'sample' (built-in corpus) or a dir of shards (default sample)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of the A/B runs (default 150; smoke 4)")
    p.add_argument("--sweep-steps", type=int, default=None,
                   help="steps of each lr-sweep run (default --steps: the sweep's best run is the A/B run; shorter "
                        "sweeps favour high lrs; smoke 2)")
    p.add_argument("--total-batch-tokens", type=int, default=None, help="tokens per step (default 1024)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length T (default 128; smoke 64)")
    p.add_argument("--packed-seq-len", type=int, default=None,
                   help="tokens per packed sequence of --recipe speedrun, whose window grows in blocks of 128 tokens "
                        "(default 1024: the window grows 128 -> 1024; smoke 128)")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="sequences per forward (default: train_speedrun.py's, sized for the card)")
    p.add_argument("--val-every", type=int, default=None, help="validate every N steps (default steps/10)")
    p.add_argument("--val-tokens", type=int, default=None, help="val tokens per validation (default 8192; smoke "
                                                                 "the batch)")
    p.add_argument("--recipes", type=recipe_list, default=None,
                   help=f"recipes to compare, comma list (default all: {','.join(known_recipes())})")
    p.add_argument("--lrs", type=lrs_entry, action="append", default=[], metavar="RECIPE=LR,LR,...",
                   help="a recipe's lrs to sweep (repeat per recipe): gpt2's AdamW peak lr (default 1e-3,2e-3,4e-3), "
                        "a speedrun recipe's multiplier on its base lrs (default 0.5,1,2)")
    p.add_argument("--jobs", type=int, default=1,
                   help="trainings at once (default 1; on a CPU each takes a core: run it with OMP_NUM_THREADS=1)")
    p.add_argument("--extend", type=int, default=2,
                   help="more sweep runs past an end when the best lr is at it (default 2; 0 = the list only)")
    p.add_argument("--seed", type=int, default=1337, help="init seed of every run (default 1337)")
    p.add_argument("--smoke", action="store_true", help="a few steps per run, one lr each: the plumbing only")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the record goes (default bench/results; a smoke run writes only where told)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="the runs' out dirs go here and are kept (default a temp dir, removed at the end)")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.gpu = args.gpu or "cpu"
    args.model = args.model or ("tiny" if smoke else "mini")
    args.steps = (4 if smoke else 150) if args.steps is None else args.steps
    args.sweep_steps = (2 if smoke else args.steps) if args.sweep_steps is None else args.sweep_steps
    args.total_batch_tokens = (128 if smoke else 1024) if args.total_batch_tokens is None else args.total_batch_tokens
    args.seq_len = (64 if smoke else 128) if args.seq_len is None else args.seq_len
    args.micro_batch = args.micro_batch or (2 if smoke else None)
    args.packed_seq_len = (128 if smoke else 1024) if args.packed_seq_len is None else args.packed_seq_len
    args.val_every = max(1, args.steps // (2 if smoke else 10)) if args.val_every is None else args.val_every
    args.val_tokens = (args.total_batch_tokens if smoke else 8192) if args.val_tokens is None else args.val_tokens
    args.recipes = args.recipes or known_recipes()
    given = dict(args.lrs)
    for recipe in given:
        if recipe not in args.recipes:
            p.error(f"--lrs {recipe}=...: {recipe} is not among the recipes compared ({', '.join(args.recipes)})")
    args.lrs = {r: given.get(r) or default_lrs(r, smoke) for r in args.recipes}
    if args.jobs < 1:
        p.error(f"--jobs {args.jobs}: needs 1 or more")
    if args.extend < 0:
        p.error(f"--extend {args.extend}: needs 0 or more")
    for name in ("steps", "sweep_steps", "total_batch_tokens", "seq_len", "packed_seq_len", "val_every",
                 "val_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: needs a positive number")
    if args.total_batch_tokens % args.seq_len:
        p.error(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of --seq-len {args.seq_len}: "
                f"pick e.g. --total-batch-tokens {args.seq_len * max(1, args.total_batch_tokens // args.seq_len)}")
    if any(recipe_of(r).packed for r in args.recipes) and args.total_batch_tokens % args.packed_seq_len:
        p.error(f"--total-batch-tokens {args.total_batch_tokens} is not a multiple of --packed-seq-len "
                f"{args.packed_seq_len} (the speedrun recipe's packed sequence): make it a multiple of both")
    return args


def train_argv(args, recipe: str, lr: float, steps: int, out_dir: Path) -> list[str]:
    argv = ["--gpu", args.gpu, "--recipe", recipe, "--model", args.model, "--data", args.data,
            "--seq-len", str(args.packed_seq_len if recipe_of(recipe).packed else args.seq_len),
            "--total-batch-tokens", str(args.total_batch_tokens),
            "--max-steps", str(steps), "--lr", repr(lr), "--val-every", str(min(args.val_every, steps)),
            "--val-tokens", str(args.val_tokens), "--seed", str(args.seed), "--target-val-loss", "0",
            "--checkpoint-every", "0", "--keep-checkpoints", "1", "--hellaswag-every", "0",
            "--warmup-steps", str(warmup_steps(recipe, steps)),
            "--out-dir", str(out_dir)]
    if args.micro_batch and not recipe_of(recipe).packed:  # a packed micro-batch is one sequence
        argv += ["--micro-batch", str(args.micro_batch)]
    return argv


class TrainingFailed(RuntimeError):
    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def run_training(argv: list[str]) -> dict:
    """One fresh train_speedrun.py process; its result.json. A failed run stops the benchmark with its last lines."""
    out_dir = Path(argv[argv.index("--out-dir") + 1])
    proc = subprocess.run([sys.executable, str(REPO / "train_speedrun.py"), *argv], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        if proc.returncode in (130, -2):  # the SIGINT that stopped us reached the child too
            raise KeyboardInterrupt
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        if proc.returncode == 2 and lines and lines[-1].startswith("error: "):  # the trainer refused a flag
            raise TrainingFailed(f"{lines[-1][len('error: '):]} (train_speedrun.py refused: {' '.join(argv)})", 2)
        tail = "\n".join(lines[-5:])
        raise TrainingFailed(f"train_speedrun.py {' '.join(argv)} exited {proc.returncode}:\n{tail}", 1)
    return json.loads((out_dir / "result.json").read_text())


def summary(recipe: str, lr: float, result: dict, wall_s: float) -> dict:
    return {"recipe": recipe, "lr": lr, "steps": result["steps_done"], "tokens": result["tokens_seen"],
            "final_val_loss": result["final_val_loss"],
            "val": [{"step": v["step"], "tokens": v["tokens"], "loss": v["loss"]} for v in result["val"]],
            "train_losses": result["train_losses"], "train_time_s": result["train_time_s"],
            "wall_s": round(wall_s, 2), "parameters": result["parameters"],
            "flops_per_token": result["flops_per_token"], "config": result["config"]}


def save_plot(path: Path, record: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for recipe, run in record["ab"].items():
        ax.plot([v["tokens"] for v in run["val"]], [v["loss"] for v in run["val"]], "o-", ms=3,
                label=f"{recipe} (lr {run['lr']:g}{' x base' if recipe_of(recipe).lr_is_multiplier else ''}): "
                      f"{run['final_val_loss']:.4f}")
    c = record["config"]
    ax.set(xlabel="tokens", ylabel="val loss",
           title=f"recipes A/B · {c['model']} · {c['data']} · {record['device']}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def verdict(ab: dict, recipes: tuple[str, ...]) -> dict | None:
    """Once every recipe's A/B run is in: the ranking by final val loss, each recipe's difference from gpt2's (when
    gpt2 ran) and whether the token counts were equal."""
    if not all(r in ab for r in recipes):
        return None
    ranking = sorted(recipes, key=lambda r: ab[r]["final_val_loss"])
    best = [r for r in ranking if ab[r]["final_val_loss"] == ab[ranking[0]]["final_val_loss"]]
    out = {"winner": best[0] if len(best) == 1 else "tie", "ranking": ranking,
           "equal_tokens": len({ab[r]["tokens"] for r in recipes}) == 1}
    if "gpt2" in ab:
        out["minus_gpt2"] = {r: ab[r]["final_val_loss"] - ab["gpt2"]["final_val_loss"] for r in recipes if r != "gpt2"}
    return out


def next_lr(tried: list[dict]) -> float | None:
    """The lr past the swept end that won, by the sweep's own ratio; None when the best lies inside what was tried."""
    lrs = sorted(s["lr"] for s in tried)
    best = min(tried, key=lambda s: s["final_val_loss"])["lr"]
    if len(lrs) < 2 or lrs[0] < best < lrs[-1]:
        return None
    if best == lrs[-1]:
        return best * (lrs[-1] / lrs[-2])
    return best / (lrs[1] / lrs[0])


class Refused(Exception):
    """A run the flags or the machine rule out: main prints "error: <message>" and exits 2."""


def prepare(args) -> tuple[Path | None, torch.device]:
    """The record's folder and the trainings' device (CUDA or the CPU); Refused for a bad folder, --data or --gpu."""
    try:
        out_dir = record_dir(args.out_dir, args.smoke)
    except ValueError as e:
        raise Refused(str(e)) from None
    if args.data != "sample" and not Path(args.data).is_dir():
        raise Refused(f"--data {args.data}: no such directory (give a dir of shards, or 'sample')")
    import torch  # after the flags: a bad flag's error line comes without torch's import time

    use_cuda = args.gpu != "cpu" and torch.cuda.is_available()
    if args.gpu != "cpu" and not use_cuda:
        raise Refused(f"--gpu {args.gpu} needs a CUDA GPU and there is none: use --gpu cpu")
    return out_dir, torch.device("cuda" if use_cuda else "cpu")


def record_path(out_dir: Path | None, device: str, smoke: bool, now: datetime.datetime) -> Path | None:
    """Where the record goes (its folder made), None when nothing is written."""
    if out_dir is None:
        return None
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir / f"{record_stem('recipes', device, smoke, now)}.json"


def run_config(args) -> dict:
    """The record's "config": what every training shares, the recipes and their lrs as given."""
    return {"gpu": args.gpu, "model": args.model, "data": args.data, "steps": args.steps,
            "sweep_steps": args.sweep_steps, "total_batch_tokens": args.total_batch_tokens,
            "seq_len": args.seq_len, "packed_seq_len": args.packed_seq_len, "micro_batch": args.micro_batch,
            "val_every": args.val_every, "val_tokens": args.val_tokens, "seed": args.seed,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "recipes": list(args.recipes), "lrs_given": {r: list(args.lrs[r]) for r in args.recipes},
            "extend": args.extend, "jobs": args.jobs,
            "gpt2_warmup_steps": warmup_steps("gpt2", args.steps),
            "speedrun_warmup_steps": warmup_steps("speedrun", args.steps)}


def log_plan(args, device: str) -> None:
    """The run's one-line header: model, data, the token budget per recipe and the lrs each sweep tries."""
    tokens = args.steps * args.total_batch_tokens
    lrs_text = "; ".join(f"{r} lr {'x ' if recipe_of(r).lr_is_multiplier else ''}{', '.join(map(str, args.lrs[r]))}"
                         for r in args.recipes)
    log(f"recipes A/B on {device}: --model {args.model}, --data {args.data}, {args.steps} steps x "
        f"{args.total_batch_tokens} tokens = {tokens:,} tokens per recipe (T {args.seq_len}"
        f"{f'; speedrun packed {args.packed_seq_len}' if any(recipe_of(r).packed for r in args.recipes) else ''}); sweep "
        f"{args.sweep_steps} steps: {lrs_text}")


class ABRun:
    """The sweeps and A/B runs of every recipe, and the record made of them so far; shared by the recipes' driver
    threads under --jobs > 1 (its lock guards the record's dicts and the log)."""

    def __init__(self, args, env: dict, now: datetime.datetime, path: Path | None):
        self.args, self.env, self.now, self.path = args, env, now, path
        self.config = run_config(args)
        self.sweep: dict[str, list] = {r: [] for r in args.recipes}
        self.ab: dict[str, dict] = {}
        self.work = args.work_dir or Path(tempfile.mkdtemp(prefix="tritonrun-recipes-"))  # the runs' out dirs
        self.started = time.perf_counter()
        self.lock = threading.Lock()  # the record's dicts and the log, shared by the recipes' threads
        self.pool = ThreadPoolExecutor(max_workers=args.jobs) if args.jobs > 1 else None  # the trainings' slots

    def record(self) -> dict:
        """The record so far ("complete": false until every A/B run is in)."""
        args, ab = self.args, self.ab
        return {"kind": "recipes", "smoke": args.smoke, "complete": len(ab) == len(args.recipes),
                "date": self.now.isoformat(timespec="seconds"), **self.env, "config": self.config,
                "method": "per recipe: an lr sweep at --sweep-steps (skipped for a single lr; continued past an end "
                          "that wins, up to --extend runs), the lr with the lowest final val kept, then the A/B at "
                          "--steps (the sweep's best run itself when --sweep-steps = --steps); equal model, tokens, "
                          "data, seed and val set; gpt2 lr = AdamW peak, a speedrun "
                          "recipe's lr = multiplier on every group's base lr; each run a fresh train_speedrun.py "
                          "process",
                "sweep": self.sweep, "ab": {r: ab[r] for r in args.recipes if r in ab},
                "result": verdict(ab, args.recipes)}

    def save(self) -> None:
        """Rewrites the record (when one is written): an interrupt keeps the finished runs."""
        if self.path is not None:
            atomic_write_json(self.path, self.record())

    def train(self, recipe: str, lrs: list[float], steps: int, name) -> list[tuple[float, dict, float]]:
        """One training per lr (`name(lr)` its out dir under `work`), up to --jobs at once; results in lr order."""
        def one(lr: float) -> tuple[float, dict, float]:
            t0 = time.perf_counter()
            res = run_training(train_argv(self.args, recipe, lr, steps, self.work / name(lr)))
            return lr, res, time.perf_counter() - t0

        if self.pool is None:
            return [one(lr) for lr in lrs]
        return [f.result() for f in [self.pool.submit(one, lr) for lr in lrs]]

    def sweep_lrs(self, recipe: str, full_runs: dict) -> float:
        """The recipe's lr sweep, extended past a winning end up to --extend runs; its best lr. Sweep runs at the
        full budget go into `full_runs` (lr -> summary)."""
        args, sweep, started = self.args, self.sweep, self.started
        lrs = list(args.lrs[recipe])
        extended = 0
        while lrs:
            for lr, res, wall in self.train(recipe, lrs, args.sweep_steps, lambda lr: f"sweep-{recipe}-{lr:g}"):
                entry = summary(recipe, lr, res, wall)
                with self.lock:
                    if args.sweep_steps == args.steps:
                        full_runs[lr] = entry
                    sweep[recipe].append({**{k: v for k, v in entry.items()
                                             if k in ("lr", "steps", "tokens", "final_val_loss", "val", "wall_s")},
                                          "extension": extended > 0})
                    log(f"  sweep {recipe:8s} lr {lr:<8g} {args.sweep_steps} steps: val "
                        f"{res['final_val_loss']:.4f} ({wall:.0f} s, {time.perf_counter() - started:.0f} s so far)")
                    self.save()
            lrs = []
            if extended < args.extend and (more := next_lr(sweep[recipe])) is not None:
                extended += 1
                log(f"  sweep {recipe:8s} best lr at the end swept: trying lr {more:g} "
                    f"({extended} of at most {args.extend} more)")
                lrs = [more]
        best = min(sweep[recipe], key=lambda s: s["final_val_loss"])["lr"]
        if next_lr(sweep[recipe]) is not None:
            log(f"  sweep {recipe:8s} best lr {best:g} is still at an end of the sweep after "
                f"{args.extend} more runs: widen --lrs {recipe}=... or raise --extend")
        return best

    def tune(self, recipe: str) -> None:
        """The recipe's sweep (extended past a winning end) and its A/B run."""
        args, ab = self.args, self.ab
        best = args.lrs[recipe][0]
        full_runs = {}  # lr -> summary of a sweep run at the full budget: the A/B run if it wins
        if len(args.lrs[recipe]) > 1:
            best = self.sweep_lrs(recipe, full_runs)
        if best in full_runs:  # the sweep ran at the full budget: its best run is the A/B run
            with self.lock:
                ab[recipe] = {**full_runs[best], "from_sweep": True}
                log(f"  A/B   {recipe:8s} lr {best:<8g} {args.steps} steps: the sweep's best run, val "
                    f"{ab[recipe]['final_val_loss']:.4f}")
                self.save()
            return
        [(_, res, wall)] = self.train(recipe, [best], args.steps, lambda lr: f"ab-{recipe}")
        with self.lock:
            ab[recipe] = {**summary(recipe, best, res, wall), "from_sweep": False}
            log(f"  A/B   {recipe:8s} lr {best:<8g} {args.steps} steps, {res['tokens_seen']:,} tokens: val "
                f"{res['final_val_loss']:.4f} ({wall:.0f} s, {time.perf_counter() - self.started:.0f} s so far)")
            self.save()


def run_recipes(ab_run: ABRun) -> int:
    """Every recipe's sweep and A/B run (one driver thread per recipe under --jobs > 1), then the work dir removed
    unless --work-dir kept it; 0, or 130 when interrupted, or a failed training's exit status."""
    args, pool = ab_run.args, ab_run.pool
    try:
        if pool is None:
            for recipe in args.recipes:
                ab_run.tune(recipe)
        else:  # one driver thread per recipe; their trainings share the --jobs slots of the pool
            with ThreadPoolExecutor(max_workers=len(args.recipes)) as drivers:
                for f in [drivers.submit(ab_run.tune, recipe) for recipe in args.recipes]:
                    f.result()
    except KeyboardInterrupt:
        done = ", ".join(ab_run.ab) or "none"
        path = ab_run.path
        kept = f" (record in {path}, complete: false)" if path is not None and path.exists() else ""
        print(f"interrupted: A/B runs finished: {done}{kept}", file=sys.stderr)
        return 130
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if args.work_dir is None:
            shutil.rmtree(ab_run.work, ignore_errors=True)
    return 0


def log_ranking(rec: dict, ab: dict) -> None:
    """The A/B table, best final val loss first, with each recipe's difference from gpt2, and the winner."""
    v = rec["result"]
    log("")
    log("| recipe         | lr       | tokens     | final val | - gpt2  |")
    log("|----------------|----------|------------|-----------|---------|")
    for recipe in v["ranking"]:
        run = ab[recipe]
        diff = v.get("minus_gpt2", {}).get(recipe)
        log(f"| {recipe:14s} | {run['lr']:<8g} | {run['tokens']:>10,} | {run['final_val_loss']:9.4f} | "
            f"{'' if diff is None else f'{diff:+.4f}':7s} |")
    log(f"winner: {v['winner']} at {'equal' if v['equal_tokens'] else 'UNEQUAL'} tokens")


def write_record(path: Path | None, rec: dict) -> None:
    """The final record with its plot beside it (when matplotlib is installed), or why there is none."""
    if path is None:
        log("no record written (smoke run without --out-dir)")
        return
    plot = save_plot(path.with_suffix(".png"), rec)
    if plot is None:
        log("no plot: matplotlib is not installed (pip install -e '.[plot]')")
    rec["plot"] = Path(plot).name if plot else None
    atomic_write_json(path, rec)
    log(f"wrote {path}" + (f" and {plot}" if plot else ""))


@reports_write_failures
def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        out_dir, device = prepare(args)
    except Refused as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    env = env_info(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    path = record_path(out_dir, env["device"] if device.type == "cuda" else "cpu", args.smoke, now)
    log_plan(args, env["device"])
    ab_run = ABRun(args, env, now, path)
    rc = run_recipes(ab_run)
    if rc:
        return rc
    rec = ab_run.record()
    log_ranking(rec, ab_run.ab)
    write_record(path, rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
