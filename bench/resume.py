#!/usr/bin/env python
"""Resume exactness on this machine: N steps straight against N/2 steps, a checkpoint, and --resume.

    python bench/resume.py                         # GPU: d12, bf16, both backends; writes bench/results/resume-*.json
    python bench/resume.py --smoke --out-dir DIR   # CPU: tiny model, fp32; the CPU guarantee is bitwise

Per backend and compile mode (on a GPU both: --compile, the GPU presets' default, and --no-compile), three fresh
`train_speedrun.py` processes on the same data and seed:
  A  N steps straight, checkpointing at step N/2;
  B  the same again: how far two uninterrupted runs of this GPU/software already differ (the noise floor);
  C  A's step-N/2 checkpoint alone in a new out dir, continued with --resume to step N.
Recorded: the per-step train losses and grad norms of A, B and C, and for C-vs-A and B-vs-A over steps N/2+1..N the
largest absolute and relative difference of the loss, of the grad norm, and of the final val loss, plus whether they
are bitwise equal. Resume adds error of its own only if C-vs-A exceeds B-vs-A. README's "Long runs" section quotes
the GPU record. Under --compile, Inductor would lower nn.Embedding's backward (wte, wpe) to a scatter-add run with
atomics on CUDA; the model's lookups go through tritonrun/gpt2/embedding.py (an eager, deterministic backward) so that
the Triton backend's compiled runs can be bitwise too. The compiled rows measure whether they are.
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
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import torch  # noqa: E402

from tritonrun.runinfo import atomic_write_json, env_info, record_dir, record_stem, reports_write_failures  # noqa: E402


def log(msg: str = "") -> None:
    print(msg, flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=("torch", "triton"), action="append",
                   help="repeatable (default: both)")
    p.add_argument("--steps", type=int, default=None, help="N, even (default 20; smoke 8)")
    p.add_argument("--model", default=None, help="default d12 (smoke: tiny)")
    p.add_argument("--micro-batch", type=int, default=None, help="default 8 (smoke 4)")
    p.add_argument("--seq-len", type=int, default=None, help="default 1024 (smoke 64)")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per step (default 2)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="only compiled (--compile) or only eager (--no-compile) runs (default on a GPU: both, the "
                        "presets' compiled default first; smoke: eager)")
    p.add_argument("--data", default="sample", help="data dir or 'sample' (default: the built-in sample corpus)")
    p.add_argument("--gpu", default=None, help="preset (default auto; smoke cpu)")
    p.add_argument("--smoke", action="store_true", help="CPU run of the tiny model (the bitwise case)")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the record goes (default bench/results; a smoke run writes only where told)")
    p.add_argument("--keep-runs", type=Path, default=None, help="keep the three runs' out dirs here")
    args = p.parse_args(argv)
    smoke = args.smoke
    args.backend = args.backend or ["torch", "triton"]
    args.steps = args.steps or (8 if smoke else 20)
    args.model = args.model or ("tiny" if smoke else "d12")
    args.micro_batch = args.micro_batch or (4 if smoke else 8)
    args.seq_len = args.seq_len or (64 if smoke else 1024)
    args.gpu = args.gpu or ("cpu" if smoke else "auto")
    args.compile_modes = [args.compile] if args.compile is not None else ([False] if smoke else [True, False])
    if args.steps < 2 or args.steps % 2:
        p.error(f"--steps {args.steps}: needs an even number >= 2 (the checkpoint is taken at N/2)")
    return args


def train_argv(args, backend: str, compile_: bool, out_dir: Path) -> list[str]:
    tokens = args.micro_batch * args.seq_len
    half = args.steps // 2
    # (micro-batch, T) runs: gpt2 on the cpu preset, speedrun-dense on GPUs (the packed --recipe speedrun, the GPU
    # presets' default, takes no --micro-batch)
    import torch

    on_cpu = args.gpu == "cpu" or (args.gpu == "auto" and not torch.cuda.is_available())
    recipe = "gpt2" if on_cpu else "speedrun-dense"
    return ["--gpu", args.gpu, "--recipe", recipe, "--model", args.model, "--data", args.data, "--backend", backend,
            "--compile" if compile_ else "--no-compile", "--micro-batch", str(args.micro_batch),
            "--seq-len", str(args.seq_len), "--total-batch-tokens", str(tokens * args.grad_accum),
            "--max-steps", str(args.steps), "--warmup-steps", str(max(1, half)), "--val-every", str(args.steps),
            "--val-tokens", str(tokens), "--checkpoint-every", str(half), "--keep-checkpoints", "0",
            "--hellaswag-every", "0", "--target-val-loss", "0", "--out-dir", str(out_dir)]


def run_cli(argv: list[str]) -> dict:
    out_dir = Path(argv[argv.index("--out-dir") + 1])
    proc = subprocess.run([sys.executable, str(REPO / "train_speedrun.py"), *argv], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise SystemExit(f"error: train_speedrun.py {' '.join(argv)} exited {proc.returncode}:\n{tail}")
    return json.loads((out_dir / "result.json").read_text())


def diff(a: list[float], b: list[float]) -> dict:
    pairs = list(zip(a, b, strict=True))
    abs_d = [abs(x - y) for x, y in pairs]
    rel_d = [abs(x - y) / max(abs(y), 1e-30) for x, y in pairs]
    first = next((i for i, d in enumerate(abs_d) if d != 0.0), None)
    return {"max_abs": max(abs_d, default=0.0), "max_rel": max(rel_d, default=0.0),
            "bitwise": all(x == y for x, y in pairs), "first_differing_index": first}


def compare(ref: dict, other: dict, first_step: int) -> dict:
    """other against ref over steps first_step+1..N (1-based), plus the final val loss."""
    norms = lambda r: [s["grad_norm"] for s in r["steps"]]  # noqa: E731
    out = {"loss": diff(other["train_losses"][first_step:], ref["train_losses"][first_step:]),
           "grad_norm": diff(norms(other)[first_step:], norms(ref)[first_step:]),
           "val_loss": diff([other["final_val_loss"]], [ref["final_val_loss"]])}
    out["bitwise"] = all(v["bitwise"] for v in out.values())
    return out


def measure(args, backend: str, compile_: bool, work: Path) -> dict:
    half = args.steps // 2
    tag = f"{backend}{'+compile' if compile_ else ''}"
    a_dir, b_dir, c_dir = work / f"{tag}-A", work / f"{tag}-B", work / f"{tag}-C"
    log(f"[{tag}] A: {args.steps} steps straight (checkpoint at {half})")
    a = run_cli(train_argv(args, backend, compile_, a_dir))
    log(f"[{tag}] B: the same again (noise floor)")
    b = run_cli(train_argv(args, backend, compile_, b_dir))
    c_dir.mkdir(parents=True)
    shutil.copy2(a_dir / f"ckpt_{half:08d}.pt", c_dir / f"ckpt_{half:08d}.pt")
    log(f"[{tag}] C: A's step-{half} checkpoint, --resume to {args.steps}")
    c = run_cli(["--resume", "--out-dir", str(c_dir)])
    if len(c["train_losses"]) != args.steps or c["resumed_from"][0]["step"] != half:
        raise SystemExit(f"error: the resumed run did not continue from step {half} to {args.steps}")
    resumed, noise = compare(a, c, half), compare(a, b, half)
    log(f"[{tag}] resume vs straight: loss max rel {resumed['loss']['max_rel']:.3g} "
        f"(bitwise {resumed['bitwise']}); straight vs straight: {noise['loss']['max_rel']:.3g} "
        f"(bitwise {noise['bitwise']})")
    return {"backend": backend, "compile": compile_, "resume_vs_straight": resumed,
            "straight_vs_straight": noise, "resume_adds_error": resumed["loss"]["max_abs"] > noise["loss"]["max_abs"],
            "losses": {"A": a["train_losses"], "B": b["train_losses"], "C": c["train_losses"]},
            "grad_norms": {k: [s["grad_norm"] for s in r["steps"]] for k, r in (("A", a), ("B", b), ("C", c))},
            "val_loss": {"A": a["final_val_loss"], "B": b["final_val_loss"], "C": c["final_val_loss"]},
            "config": a["config"]}


@reports_write_failures
def main(argv=None) -> int:
    args = parse_args(argv)
    has_cuda = torch.cuda.is_available()
    if not has_cuda and not args.smoke:
        print("error: no CUDA GPU: the GPU resume tolerance needs one; --smoke --out-dir DIR runs the CPU (bitwise) "
              "case", file=sys.stderr)
        return 2
    try:
        out_dir = record_dir(args.out_dir, args.smoke)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    device = torch.device("cuda" if has_cuda and not args.smoke else "cpu")
    env = env_info(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    log(f"resume check on {env['device']}: {args.model}, {args.steps} steps, micro-batch {args.micro_batch} x "
        f"{args.seq_len} x {args.grad_accum}, compile {'/'.join(map(str, args.compile_modes))}, backends "
        f"{', '.join(args.backend)}")
    path = None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{record_stem('resume', env['device'], args.smoke, now)}.json"
    results = []

    def save() -> None:
        """The record of the backends measured so far ("complete": false until all are), rewritten after each."""
        atomic_write_json(path, {
            "kind": "resume", "smoke": args.smoke,
            "complete": len(results) == len(args.backend) * len(args.compile_modes),
            "date": now.isoformat(timespec="seconds"), **env,
            "steps": args.steps, "checkpoint_step": args.steps // 2, "model": args.model,
            "micro_batch": args.micro_batch, "seq_len": args.seq_len, "grad_accum": args.grad_accum,
            "data": args.data, "backends": list(args.backend), "compile_modes": list(args.compile_modes),
            "method": "A: N steps straight with a checkpoint at N/2; B: A again (run-to-run noise); C: A's N/2 "
                      "checkpoint resumed to N. Differences over steps N/2+1..N and the final val loss; each run "
                      "a fresh train_speedrun.py process.",
            "runs": results,
        })

    work = Path(tempfile.mkdtemp(prefix="tritonrun-resume-"))
    try:
        for compile_ in args.compile_modes:
            for backend in args.backend:
                results.append(measure(args, backend, compile_, work))
                if path is not None:
                    save()
        if args.keep_runs is not None:
            shutil.copytree(work, args.keep_runs, dirs_exist_ok=True)
    except KeyboardInterrupt:  # e.g. a time limit's SIGINT (.ci/gpu): the backends measured so far are on disk
        done = ", ".join(f"{r['backend']}{'+compile' if r.get('compile') else ''}" for r in results) or "none"
        print(f"interrupted: backends measured so far: {done}" + (f" (in {path})" if path and results else ""),
              file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if path is None:
        log("no record written (smoke run without --out-dir)")
        return 0
    log(f"wrote {path}")
    if args.smoke and not all(r["resume_vs_straight"]["bitwise"] for r in results):
        print("error: on CPU a resumed run must be bitwise equal to a straight one, and it is not", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
