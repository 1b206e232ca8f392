#!/usr/bin/env python3
"""The budgeted GPU check behind `.ci/gpu OUT_DIR --budget SECONDS [--dry-run]`: one command that answers, in
this order, within a fixed time (a lent GPU's lease):

  1. env            the env line (commit, python, torch, CUDA, triton, numpy, device) and an import check of
                    everything the steps need; missing packages are named with the fix
  2. kernel-tests   the GPU tests of every kernel, model and loader, generated from the test files: pytest
                    --gpu-tests (tests/conftest.py: only the tests a CPU run skips for want of CUDA, and every
                    bf16 case; not the benches' tests nor this check's own); --dry-run lists the files
  3. main-torch     the main job's default path, a few steps: train_speedrun.py --gpu rtx4070 on --data sample
                    (the default --recipe record89, torch backend, eager as its defaults say), its packed length
                    sized for the 12 GB card and the allocator capped there: tok/s, peak reserved memory against
                    the estimate it was sized by, timed_compiles; no final checkpoint (GBs to write)
  4. main-triton    the same with --backend triton
  then, only with time left:
  5. train-mb8      bench/train.py at micro-batch 8: triton, triton+compile, torch+compile in one round-robin,
                    then the rtx4070 preset's cap check (peak reserved + context allowance)
  6. memory         bench/memory.py's GPU-free estimate against the cap check's measured peak (same recipe and
                    preset)
  7. kernel-bench   bench/kernels.py --quick for attention and cross-entropy
  8. autotune-tests every autotune candidate of attention and cross-entropy, natively

Budget: each step gets a slot, at most its nominal seconds, and never so much that the later required steps
(1-4) lose their minimum; a step whose slot is under its own minimum is skipped with one line. At the slot's end
the step's process group gets SIGINT (the benchmarks and the trainer keep their records so far: they rewrite them
as they go), then SIGKILL after GRACE seconds, which every slot leaves free. `--dry-run` prints the plan (steps in
order, each with its slot and deadline, as if each used all of it) and exits 0 on any machine.

OUT_DIR gets at most 8 plain files, directly in it (what a device lease brings back): check.log (every step's
output, merged), check.json (this run: plan, env, per-step status, exit codes, seconds, commit), main-torch.json
and main-triton.json (the trainer's result.json of each main-job run), train.json (bench/train.py's record),
memory.json (bench/memory.py's estimate), kernels.json (bench/kernels.py's record). While a step runs its output goes to OUT_DIR/<step>.log, merged into
check.log when it ends, so even a check killed from outside leaves the running step's output behind.

Records name the commit: a copy of the tree without .git (a lent machine gets files only) takes it from
$TRITONRUN_COMMIT (runinfo.git_commit); the check says so when neither exists. Wheels the lent machine lacks
(none is needed today: --data sample is committed pre-tokenized) may travel as .whl/ in the tree and are
installed with pip --no-index --no-deps --target into a private dir put on PYTHONPATH.

Slots, from measured costs (CPU proxies, cold caches; no GPU has timed them yet, so each is generous): about
0.37 CPU-s of Triton compile per kernel launch and 0.32 s per launcher build (the kernel step: ~250 GPU tests,
mostly first launches); about 20 s per Dynamo + AOT trace of the d12 model, 3-4 traces per compiled run
(training graph, the window's one recompile, validation) before Inductor's codegen, so a compiled main-job run
costs ~100-150 s before its first timed step; a final checkpoint of the 275.6M-parameter speedrun model with its
optimizer state is ~3 GB, which is why the main-job runs pass --no-final-checkpoint.

The steps' python is $PYTHON (default: the interpreter running this file): tests use a stand-in that logs its
arguments. This file needs only the standard library.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GRACE = 15  # seconds between a step's SIGINT and its SIGKILL (records are written in that window)


def _default_sigint() -> None:
    """In a step's child before exec: SIGINT back to its default. A check started with SIGINT ignored (nohup, a
    background job of a non-interactive shell) would pass SIG_IGN on, and a step could then neither trap it (bash)
    nor turn it into KeyboardInterrupt (Python): its deadline would end in SIGKILL with its records unwritten."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
MAX_LOG_BYTES = 3 * 2**19  # per step in check.log (1.5 MiB): head + tail beyond it (a returned file: < 16 MiB)
OUT_FILES = ("check.log", "check.json", "main-torch.json", "main-triton.json", "train.json", "memory.json",
             "kernels.json")
# module -> (package, fix): the import check's table (what each step needs is Step.needs)
FIXES = {
    "torch": ("torch", "pip install torch (a CUDA build)"),
    "triton": ("triton", "pip install triton (torch's CUDA wheels pin one)"),
    "numpy": ("numpy", "pip install numpy"),
    "tqdm": ("tqdm", "pip install tqdm"),
    "tiktoken": ("tiktoken", "pip install tiktoken"),
    "pytest": ("pytest", "pip install pytest"),
    "xdist": ("pytest-xdist", "optional: pip install pytest-xdist (tests run in one process without it)"),
}
# The kernel step's selection, generated from the test files: tests/conftest.py's --gpu-tests keeps, in every test
# file, the tests a CPU run skips for want of CUDA (a skipif naming CUDA or a GPU) and every bf16 case; the benches'
# tests and this check's own are left to their steps. A new kernel's GPU tests join by themselves.
GPU_TESTS = ["--gpu-tests", "tests", "--ignore-glob=tests/test_bench_*", "--ignore-glob=tests/test_ci_*",
             "-k", "not every_autotune_candidate"]


def list_gpu_tests(py: str) -> dict[str, int] | str:
    """{test file: GPU tests in it} by a pytest collection of GPU_TESTS (no test runs), or why it failed."""
    try:
        proc = subprocess.run([py, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", "-p", "no:cacheprovider",
                               *GPU_TESTS], cwd=REPO, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as e:
        return f"pytest --collect-only failed: {e}"
    files: dict[str, int] = {}
    for line in proc.stdout.splitlines():
        if "::" in line:
            name = line.split("::", 1)[0]
            files[name] = files.get(name, 0) + 1
    return files or f"pytest --collect-only found no GPU test (exit {proc.returncode}): {proc.stdout[-500:]}"


MEMORY_SCRIPT = "bench/memory.py"
# bench/memory.py --json: the estimate of peak reserved memory, compared with the measured peak reserved, and of
# peak live (allocated) memory, compared with the measured peak allocated. The first name of each is the one
# bench/memory.py writes (tests/test_memory.py checks it); the others, first present wins, read older records.
RESERVED_FIELDS = (("peak_reserved_estimate_bytes", 2**-30), ("peak_reserved_bytes", 2**-30),
                   ("peak_reserved_estimate_gib", 1.0), ("peak_reserved_gib", 1.0))
ALLOC_FIELDS = (("peak_bytes", 2**-30), ("peak_alloc_bytes", 2**-30), ("peak_gib", 1.0))


def log(fh, msg: str) -> None:
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


@dataclass
class Step:
    name: str
    want: int  # nominal seconds: the slot is at most this
    least: int  # below this the step is skipped
    required: bool  # steps 1-4; the others run only with time left
    needs: tuple = ()  # modules (FIXES) it cannot run without
    what: str = ""
    script: str | None = None  # a script that may be absent from the tree: then the step is skipped


MAIN_NEEDS = ("torch", "triton", "numpy", "tqdm", "tiktoken")
STEPS = [
    Step("env", 45, 10, True, (), "env line + import check (installs .whl/*.whl when present)"),
    Step("kernel-tests", 150, 60, True, ("torch", "triton", "pytest"),
         "the GPU tests of every kernel, model and loader (pytest --gpu-tests)"),
    Step("main-torch", 200, 120, True, MAIN_NEEDS,
         "train_speedrun.py --gpu rtx4070 (the default recipe and backend), 6 steps on --data sample"),
    Step("main-triton", 150, 90, True, MAIN_NEEDS, "the same with --backend triton"),
    Step("train-mb8", 270, 120, False, ("torch", "triton", "numpy"),
         "bench/train.py mb 8: triton, triton+compile vs torch+compile; cap check"),
    Step("memory", 60, 20, False, ("torch",), "bench/memory.py estimate vs the cap check's measured peak",
         MEMORY_SCRIPT),
    Step("kernel-bench", 150, 60, False, ("torch", "triton", "numpy"), "bench/kernels.py --quick: attention, CE"),
    Step("autotune-tests", 150, 45, False, ("torch", "triton", "pytest"), "every autotune candidate (attn, CE)"),
]


def runnable(step: Step) -> bool:
    """False for a step whose script is not in this tree (bench/memory.py until it lands): skipped, no reserve."""
    return step.script is None or (REPO / step.script).is_file()


def slot_for(steps: list[Step], i: int, left: float) -> int:
    """Seconds step i may run when `left` seconds of the budget remain: at most its nominal time, leaving GRACE
    for its own stop and, where that still leaves step i its minimum, the minimum (+ GRACE) of every later
    required step. The order is the order of importance: when both cannot be had, step i takes what is left.
    Under steps[i].least: skip it."""
    later = sum(s.least + GRACE for s in steps[i + 1:] if s.required and runnable(s))
    slot = min(steps[i].want, left - GRACE - later)
    if slot < steps[i].least:
        slot = min(steps[i].want, left - GRACE)
    return int(max(0, slot))


def plan(steps: list[Step], budget: float) -> list[dict]:
    """The dry-run plan: each step's slot and deadline (seconds from the start) as if every earlier one used its
    whole slot plus GRACE. A real run gives later steps whatever earlier ones leave."""
    t, rows = 0.0, []
    for i, s in enumerate(steps):
        slot = slot_for(steps, i, budget - t)
        if slot < s.least:
            rows.append({"step": s.name, "slot_s": slot, "deadline_s": None, "skip": True})
            continue
        rows.append({"step": s.name, "slot_s": slot, "deadline_s": int(t + slot), "skip": False})
        t += slot + GRACE
    return rows


# ------------------------------------------------------------------------------------------ running
class Runner:
    """Runs one step's command in its own process group with a deadline; output to OUT/<step>.log."""

    def __init__(self, out: Path, fh, env: dict):
        self.out, self.fh, self.env = out, fh, env
        self.child: subprocess.Popen | None = None

    def run(self, name: str, argv: list[str], slot: int) -> dict:
        path = self.out / f"{name}.log"
        log(self.fh, f"== {name}: {shlex.join(argv)}  (deadline {slot} s)")
        start = time.monotonic()
        interrupted = False
        with open(path, "wb") as out:
            self.child = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          preexec_fn=_default_sigint)
            try:
                rc = self.child.wait(timeout=slot)
            except subprocess.TimeoutExpired:
                interrupted = True
                rc = self.stop()
            except KeyboardInterrupt:  # the check itself was stopped: stop the step the same way, then go
                self.stop()
                raise
            finally:
                self.child = None
        seconds = time.monotonic() - start
        text = path.read_bytes()
        path.unlink()
        if len(text) > MAX_LOG_BYTES:
            cut = len(text) - MAX_LOG_BYTES
            text = (text[:MAX_LOG_BYTES // 4] + f"\n[... {cut:,} bytes cut ...]\n".encode()
                    + text[-(MAX_LOG_BYTES * 3 // 4):])
        self.fh.write(text.decode(errors="replace"))
        status = "interrupted" if interrupted else ("ok" if rc == 0 else "failed")
        why = f" (SIGINT at its {slot} s deadline)" if interrupted else ""
        log(self.fh, f"== {name}: {status}, exit {rc} after {seconds:.0f} s{why}")
        tail = text.decode(errors="replace").rstrip("\n").splitlines()[-15:]
        print("\n".join("   | " + ln for ln in tail), flush=True)
        return {"status": status, "rc": rc, "seconds": round(seconds, 1), "slot_s": slot, "log_tail": tail}

    def stop(self) -> int:
        """SIGINT to the step's process group (KeyboardInterrupt: records written so far stay), SIGKILL after
        GRACE. Returns the exit code."""
        child = self.child
        try:
            os.killpg(child.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        try:
            return child.wait(timeout=GRACE)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            return child.wait()


def newest(pattern: str) -> Path | None:
    paths = [Path(p) for p in glob.glob(pattern)]
    return max(paths, key=lambda p: p.stat().st_mtime) if paths else None


def copy_record(src: Path | None, dst: Path) -> bool:
    if src is None or not src.is_file():
        return False
    dst.write_bytes(src.read_bytes())
    return True


def estimate_gib(est: dict, fields) -> tuple[float | None, str | None]:
    for key, scale in fields:
        if isinstance(est.get(key), (int, float)) and not isinstance(est.get(key), bool):
            return est[key] * scale, key
    return None, None


def memory_comparison(estimate: dict, train: dict | None, backend: str = "triton", micro_batch: int = 8) -> dict:
    """bench/memory.py's estimate against the cap check's measured peaks for the same config (rtx4070 preset,
    `backend`+compile, `micro_batch`) in bench/train.py's record: reserved against reserved, live (allocated)
    against allocated."""
    reserved, reserved_key = estimate_gib(estimate, RESERVED_FIELDS)
    alloc, alloc_key = estimate_gib(estimate, ALLOC_FIELDS)
    out = {"backend": backend, "micro_batch": micro_batch,
           "estimate_reserved_gib": reserved, "estimate_reserved_field": reserved_key,
           "estimate_alloc_gib": alloc, "estimate_alloc_field": alloc_key,
           "measured_reserved_gib": None, "measured_alloc_gib": None}
    out["recipe"] = estimate.get("recipe")
    runs = ((train or {}).get("cap") or {}).get("runs") or []
    measured_recipe = (train or {}).get("recipe")
    if out["recipe"] and measured_recipe and measured_recipe != out["recipe"]:  # not the same step: no ratio
        out["recipe_mismatch"] = f"estimate {out['recipe']}, measured {measured_recipe}"
        runs = []
    run = next((r for r in runs if r.get("backend") == backend and r.get("micro_batch") == micro_batch
                and r.get("fits")), None)
    if run is not None:
        out["measured_reserved_gib"] = run.get("peak_reserved_gib")
        out["measured_alloc_gib"] = run.get("peak_alloc_gib")
        for kind in ("reserved", "alloc"):
            if out[f"estimate_{kind}_gib"] is not None and out[f"measured_{kind}_gib"]:
                out[f"{kind}_estimate_over_measured"] = out[f"estimate_{kind}_gib"] / out[f"measured_{kind}_gib"]
    return out


def describe_comparison(c: dict) -> str:
    def one(kind: str, label: str) -> str:
        est, meas = c[f"estimate_{kind}_gib"], c[f"measured_{kind}_gib"]
        text = f"{label}: estimate " + ("n/a" if est is None else f"{est:.2f} GiB ({c[f'estimate_{kind}_field']})")
        text += " vs measured " + ("n/a" if meas is None else f"{meas:.2f} GiB")
        ratio = c.get(f"{kind}_estimate_over_measured")
        return text + ("" if ratio is None else f" (x{ratio:.3f})")

    where = "" if c["measured_reserved_gib"] is not None else (
        f" (recipes differ: {c['recipe_mismatch']})" if c.get("recipe_mismatch")
        else " (no fitting cap-check run in train.json)")
    return (f"memory: rtx4070 {c['backend']}+compile mb {c['micro_batch']}{where}: {one('reserved', 'reserved')}; "
            f"{one('alloc', 'allocated')}")


# ------------------------------------------------------------------------------------------ the check
def commands(name: str, py: str, scratch: Path, probe: dict) -> list[str]:
    if name == "kernel-tests":
        xdist = ["-n", "4"] if probe.get("modules", {}).get("xdist") else []
        # addopts cleared: pyproject's `-n auto` needs pytest-xdist, which the lent image may lack
        return [py, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider", *xdist, *GPU_TESTS]
    if name in ("main-torch", "main-triton"):
        # 49,152 tokens a step: whole packed sequences of any power-of-two length up to 16,384 under every recipe
        # (record89's stages take a third, two thirds and all of it)
        argv = [py, "train_speedrun.py", "--gpu", "rtx4070", "--data", "sample",
                "--total-batch-tokens", "49152", "--max-steps", "6", "--val-every", "1000", "--val-tokens", "16384",
                "--checkpoint-every", "0", "--no-final-checkpoint", "--hellaswag-every", "0",
                "--out-dir", str(scratch / name)]
        if name == "main-triton":
            argv[4:4] = ["--backend", "triton"]
        if probe.get("device_peak_tflops"):  # MFU of the GPU that runs it, not the 4070's 58.3
            argv += ["--peak-tflops", str(probe["device_peak_tflops"])]
        return argv
    if name == "train-mb8":
        return [py, "bench/train.py", "--micro-batches", "8", "--configs", "triton,triton+compile,torch+compile",
                "--warmup", "3", "--cap-max-micro-batch", "8", "--out-dir", str(scratch / "train")]
    if name == "memory":
        # bench/train.py's recipe (speedrun-dense on GPUs: it times (micro-batch, T = 1024) steps), so that the
        # estimate and the measured peak are of the same step
        return [py, MEMORY_SCRIPT, "--gpu", "rtx4070", "--recipe", "speedrun-dense", "--backend", "triton",
                "--micro-batch", "8", "--json", str(scratch / "memory.json")]
    if name == "kernel-bench":
        return [py, "bench/kernels.py", "--quick", "--op", "attention", "--op", "cross_entropy",
                "--out-dir", str(scratch / "kernels")]
    if name == "autotune-tests":
        return [py, "-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider", "tests/test_attention.py",
                "tests/test_cross_entropy.py", "-k", "every_autotune_candidate"]
    raise KeyError(name)


def describe_main(name: str, rec: dict) -> str:
    """One line of a main-job run's record: its batch, speed, memory against the estimate it was sized by, and
    compiles inside the clock."""
    sizing = rec.get("batch_sizing") or {}
    est, meas = sizing.get("reserved_gib"), rec.get("peak_reserved_gib")
    ratio = f" (x{est / meas:.3f})" if est and meas else ""
    batch = f"{sizing['field']} {sizing['value']}" if sizing else "batch from the flags"
    tok = rec.get("tokens_per_s") or 0.0
    return (f"{name}: {rec.get('status')}, {batch}, {tok:,.0f} tok/s, peak reserved "
            + ("n/a" if meas is None else f"{meas:.2f} GiB") + " vs estimate "
            + ("n/a" if est is None else f"{est:.2f} GiB") + f"{ratio}, timed_compiles {rec.get('timed_compiles')}")


def collect(name: str, scratch: Path, out: Path, fh) -> list[str]:
    """Copy a step's record into OUT under its fixed name; returns the names written."""
    got = []
    if name in ("main-torch", "main-triton") and copy_record(scratch / name / "result.json", out / f"{name}.json"):
        got.append(f"{name}.json")
        try:
            log(fh, describe_main(name, json.loads((out / f"{name}.json").read_text())))
        except (ValueError, TypeError, KeyError) as e:
            log(fh, f"{name}: cannot read its result.json ({e})")
    if name == "train-mb8":
        rec = newest(str(scratch / "train" / "train-*.json"))
        if copy_record(rec, out / "train.json"):
            got.append("train.json")
        md = newest(str(scratch / "train" / "train-*.md"))
        if md is not None:
            fh.write(md.read_text())
    if name == "memory" and copy_record(scratch / "memory.json", out / "memory.json"):
        got.append("memory.json")
    if name == "kernel-bench" and copy_record(newest(str(scratch / "kernels" / "kernels-*.json")),
                                              out / "kernels.json"):
        got.append("kernels.json")
    return got


def install_wheels(py: str, env: dict, fh) -> str | None:
    """pip install .whl/*.whl (no index, no deps) into a private dir on PYTHONPATH; None, or why it failed."""
    wheels = sorted(glob.glob(str(REPO / ".whl" / "*.whl")))
    if not wheels:
        return None
    site = env.get("TRITONRUN_SITE", "/tmp/tritonrun-site")
    proc = subprocess.run([py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", site, *wheels], cwd=REPO, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        return f"pip install .whl/*.whl failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    env["PYTHONPATH"] = site + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    log(fh, f"installed {', '.join(Path(w).name for w in wheels)} into {site} (PYTHONPATH)")
    return None


def probe(py: str, env: dict, fh, timeout: float) -> dict | None:
    try:
        proc = subprocess.run([py, ".ci/gpu_probe.py"], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(10.0, timeout))
    except subprocess.TimeoutExpired:
        log(fh, f"env probe: no answer within {max(10.0, timeout):.0f} s")
        return None
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        log(fh, f"env probe failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
        return None


def commit_of(env: dict) -> str:
    if env.get("TRITONRUN_COMMIT"):
        return env["TRITONRUN_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_check(out: Path, budget: float, steps: list[Step] = STEPS, py: str | None = None,
              cmds=commands, env: dict | None = None) -> int:
    t0 = time.monotonic()
    py = py or os.environ.get("PYTHON") or sys.executable
    env = dict(os.environ if env is None else env)
    env["PYTHONUNBUFFERED"] = "1"
    env["TRITONRUN_COMMIT"] = commit = commit_of(env)
    out.mkdir(parents=True, exist_ok=True)
    # where the steps write before their records are copied to OUT_DIR: emptied first, so no earlier check's
    # record is taken for this one's (and the canary's --out-dir holds no run)
    scratch = Path(env.get("TRITONRUN_CHECK_SCRATCH") or f"/tmp/tritonrun-check-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    record = {"kind": "gpu-check", "commit": commit, "budget_s": budget, "grace_s": GRACE, "python": py,
              "steps": [], "env": None, "memory": None, "complete": False}

    def save() -> None:
        tmp = out / ".check.json.tmp"
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, out / "check.json")

    with open(out / "check.log", "a") as fh:
        log(fh, f"GPU check: budget {budget:.0f} s, commit {commit}"
                + ("" if commit != "unknown" else " (no .git and no $TRITONRUN_COMMIT: set TRITONRUN_COMMIT=<hash>)"))
        runner = Runner(out, fh, env)
        try:
            failed = run_steps(steps, budget, t0, py, env, out, scratch, fh, runner, record, save, cmds)
        except KeyboardInterrupt:  # SIGINT/SIGTERM to the check: the running step was stopped, records kept
            record["interrupted"] = True
            save()
            log(fh, "GPU check interrupted: check.json and the records so far are in OUT_DIR")
            return 130
        if failed is None:
            return 2
        total = time.monotonic() - t0
        record.update(complete=True, seconds=round(total, 1))
        save()
        summary = ", ".join(f"{e['step']} {e['status']}" for e in record["steps"])
        log(fh, f"GPU check done in {total:.0f} s of {budget:.0f}: {summary}")
    extra = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES)
    if extra:
        print(f"warning: OUT_DIR holds files the check did not write: {', '.join(extra)}", file=sys.stderr)
    return 1 if failed else 0


def run_steps(steps, budget, t0, py, env, out, scratch, fh, runner, record, save, cmds) -> bool | None:
    """Every step in order; True if one failed, None when the env step found no usable GPU."""
    info: dict = {}
    failed = False
    for i, s in enumerate(steps):
        left = budget - (time.monotonic() - t0)
        slot = slot_for(steps, i, left)
        entry = {"step": s.name, "what": s.what, "required": s.required}
        missing = [FIXES.get(m, (m, ""))[0] for m in s.needs if info and not info["modules"].get(m, False)]
        if slot < s.least:
            entry.update(status="skipped", why=f"{left:.0f} s left, its slot would be {slot} s < {s.least} s")
        elif missing:
            entry.update(status="skipped", why=f"missing {', '.join(missing)} (see the env step's fix)")
        elif not runnable(s):
            entry.update(status="skipped", why=f"{s.script} does not exist in this tree")
        elif s.name == "env":
            start = time.monotonic()
            why = install_wheels(py, env, fh)
            info = probe(py, env, fh, slot) or {}
            record["env"] = info
            entry.update(status="ok", seconds=round(time.monotonic() - start, 1))
            if why:
                log(fh, f"warning: {why}")
            if not info:
                entry.update(status="failed", why="the env probe failed")
            else:
                log(fh, "env: " + info.get("line", "?"))
                for m, ok in info.get("modules", {}).items():
                    if not ok:
                        pkg, fix = FIXES.get(m, (m, "install it"))
                        log(fh, f"missing: {pkg} ({m}): {fix}")
                if not info.get("cuda_available"):
                    entry.update(status="failed", why="no CUDA GPU")
            record["steps"].append(entry)
            save()
            if entry["status"] != "ok":
                log(fh, f"error: {entry.get('why')} visible to {py}: the budgeted check needs a CUDA GPU "
                        f"(--dry-run prints the plan anywhere)")
                record["complete"] = True
                save()
                print(f"error: {entry.get('why')} visible to {py}: .ci/gpu --budget needs a CUDA GPU",
                      file=sys.stderr)
                return None
            continue
        else:
            entry.update(runner.run(s.name, cmds(s.name, py, scratch, info), slot))
            entry["records"] = collect(s.name, scratch, out, fh)
            failed |= entry["status"] == "failed"
            if s.name == "memory" and (out / "memory.json").is_file():
                train = json.loads((out / "train.json").read_text()) if (out / "train.json").is_file() else None
                try:
                    record["memory"] = memory_comparison(json.loads((out / "memory.json").read_text()), train)
                    log(fh, describe_comparison(record["memory"]))
                except (ValueError, AttributeError) as e:
                    log(fh, f"memory: cannot read memory.json ({e})")
        if entry["status"] == "skipped":
            log(fh, f"skip {s.name}: {entry['why']}")
        record["steps"].append(entry)
        save()
    return failed


def dry_run(budget: float, steps: list[Step] = STEPS) -> int:
    print(f"GPU check plan: budget {budget:.0f} s; each step stopped with SIGINT at its deadline, SIGKILL "
          f"{GRACE} s later; times from the start, as if every step used its whole slot")
    for n, (s, row) in enumerate(zip(steps, plan(steps, budget)), 1):
        kind = "required" if s.required else "if time is left"
        if not runnable(s):
            print(f"  {n}. {s.name:15s} skipped: {s.script} does not exist in this tree")
        elif row["skip"]:
            print(f"  {n}. {s.name:15s} skipped: slot {row['slot_s']} s < its minimum {s.least} s ({kind})")
        else:
            print(f"  {n}. {s.name:15s} slot {row['slot_s']:4d} s  deadline +{row['deadline_s']:4d} s  "
                  f"({kind}) {s.what}")
    print("commands (python: the interpreter running the check; SCRATCH: its scratch dir):")
    for s in steps:
        if s.name != "env":
            print(f"  {s.name}: {shlex.join(commands(s.name, 'python', Path('SCRATCH'), {}))}")
    found = list_gpu_tests(os.environ.get("PYTHON") or sys.executable)
    if isinstance(found, str):
        print(f"kernel-tests' files: unknown here ({found})")
    else:
        print(f"kernel-tests' files ({sum(found.values())} GPU tests in {len(found)} files): "
              + ", ".join(f"{f} ({n})" for f, n in found.items()))
    wheels = sorted(Path(p).name for p in glob.glob(str(REPO / ".whl" / "*.whl")))
    print(f"wheels to install from .whl/: {', '.join(wheels) if wheels else 'none'}")
    print(f"OUT_DIR gets at most: {', '.join(OUT_FILES)}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog=".ci/gpu", description="the budgeted GPU check (see .ci/gpu_check.py)")
    p.add_argument("out", type=Path, metavar="OUT_DIR")
    p.add_argument("--budget", type=float, required=True, help="seconds the whole check may take (e.g. 540)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit 0 (any machine)")
    args = p.parse_args(argv)
    if not math.isfinite(args.budget) or args.budget <= 0:
        print(f"error: --budget {args.budget:g}: give the seconds the check may take, e.g. --budget 540",
              file=sys.stderr)
        return 2
    if args.dry_run:
        return dry_run(args.budget)
    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)  # a kill from outside: stop the running step, keep the records
    if args.out.exists() and not args.out.is_dir():
        print(f"error: OUT_DIR {args.out} is not a directory", file=sys.stderr)
        return 2
    return run_check(args.out.resolve(), args.budget)


if __name__ == "__main__":
    sys.exit(main())
