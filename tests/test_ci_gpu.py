""".ci/gpu, the GPU half of CI: its argument checks and its refusal on a machine without CUDA."""
import json
import os
import signal
import subprocess
import sys

import pytest

from tests.helpers import HAS_CUDA
from tests.test_train_cli import REPO


def ci_gpu(*args):
    return subprocess.run(["bash", ".ci/gpu", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=120)


def test_usage_and_unknown_phase(tmp_path):
    proc = ci_gpu()
    assert proc.returncode == 2 and proc.stderr.startswith("usage: .ci/gpu OUT_DIR")
    proc = ci_gpu(tmp_path, "tests", "benchmarks")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown phase 'benchmarks': choose from tests, kernels, train, cap, resume"


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal; this machine has a CUDA GPU")
def test_refuses_without_cuda(tmp_path):
    proc = ci_gpu(tmp_path / "out")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: no CUDA GPU visible to python: .ci/gpu is the GPU half of CI (.ci/run is the CPU half)"]
    assert not list((tmp_path / "out").iterdir())  # nothing run, nothing written


def test_phases_run_their_commands_with_extra_args(tmp_path):
    """The phase plumbing, without a GPU: PYTHON is a stand-in that logs its arguments (and, as bench/train.py,
    leaves the records the merge and project steps read). TRITONRUN_<PHASE>_ARGS reach their phase's command,
    word-split. The projection reads the sweep merged with the cap check, so its micro-batch can use the cap's
    result; the test workers' thread count does not leak into the benchmark phases."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(f"""#!/usr/bin/env bash
echo "$*" >> {calls}
if [ "${{1:-}}" = -m ]; then echo "${{OMP_NUM_THREADS:-unset}}" > {calls}.omp; fi
if [ "${{1:-}}" = bench/kernels.py ]; then echo "${{OMP_NUM_THREADS:-unset}}" > {calls}.omp-kernels; fi
if [ "${{1:-}}" = bench/train.py ] && [ "${{2:-}}" = --cap-gib ]; then touch "$5/train-fake.json"; fi
if [ "${{1:-}}" = bench/train.py ] && [ "${{2:-}}" = --no-sweep ]; then touch "$5/train-fake-cap.json"; fi
if [ "${{1:-}}" = bench/train.py ] && [ "${{2:-}}" = --merge ]; then touch "$6/train-fake-merged.json"; fi
exit 0
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "TRITONRUN_TRAIN_ARGS": "--micro-batches 8,16",
           "TRITONRUN_KERNELS_ARGS": "--quick", "TRITONRUN_TESTS_ARGS": "-k bf16", "TRITONRUN_TEST_WORKERS": "4"}
    env.pop("OMP_NUM_THREADS", None)
    env.pop("TRITONRUN_CAP_ARGS", None)
    env.pop("TRITONRUN_RESUME_ARGS", None)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", ".ci/gpu", str(out), "tests", "kernels", "train", "cap", "resume"], cwd=REPO,
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in calls.read_text().splitlines() if line.split()[0] != "-c" and line != "-"]
    xdist = ["-n", "4"]  # the stand-in answers `-c 'import xdist'` with 0: xdist is "installed"
    # and the workers share the cores: each torch gets cores / workers threads, not all of them
    assert (tmp_path / "calls.omp").read_text().strip() == str(max(1, len(os.sched_getaffinity(0)) // 4))
    assert (tmp_path / "calls.omp-kernels").read_text().strip() == "unset"
    assert lines == [
        " ".join(["-m pytest -q -rs -p no:cacheprovider", *xdist, "-k bf16"]),
        f"bench/kernels.py --out-dir {out} --plot --quick",
        f"bench/train.py --cap-gib 0 --out-dir {out} --micro-batches 8,16",
        f"bench/train.py --no-sweep --profile --out-dir {out}",
        f"bench/resume.py --out-dir {out}",
        f"bench/train.py --merge {out}/train-fake.json {out}/train-fake-cap.json --out-dir {out}",
        f"bench/train.py --project rtx4070 --from-record {out}/train-fake-merged.json",
    ]
    assert "all phases passed: tests kernels train cap resume" in proc.stdout

    # `train` alone: no cap record to merge, the projection reads the sweep's
    calls.unlink()
    out = tmp_path / "out-train"
    proc = subprocess.run(["bash", ".ci/gpu", str(out), "train"], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line for line in calls.read_text().splitlines() if line.split()[0] != "-c" and line != "-"] == [
        f"bench/train.py --cap-gib 0 --out-dir {out} --micro-batches 8,16",
        f"bench/train.py --project rtx4070 --from-record {out}/train-fake.json",
    ]


# ------------------------------------------------------------------ the budgeted check (.ci/gpu OUT --budget S)
def check_module():
    from tests.helpers import load_script

    return load_script(".ci/gpu_check.py", "gpu_check")


STAND_IN = """#!/usr/bin/env bash
# a stand-in python for the budgeted check: logs its arguments and leaves what each real step would leave
echo "$*" >> {calls}
arg() {{ local want=$1; shift; while [ $# -gt 0 ]; do [ "$1" = "$want" ] && {{ echo "$2"; return; }}; shift; done; }}
case "${{1:-}}" in
  .ci/gpu_probe.py)
    echo '{{"line": "stand-in env", "cuda_available": {cuda}, "device": "NVIDIA H200", "device_preset": "h200",
      "device_peak_tflops": 989.0, "modules": {{"torch": true, "triton": true, "numpy": true, "tqdm": true,
      "tiktoken": true, "tqdm": {tqdm}, "pytest": true, "xdist": true}}}}' | tr -d '\\n'; echo ;;
  train_speedrun.py)
    d=$(arg --out-dir "$@"); mkdir -p "$d"
    echo '{{"status": "max_steps", "tokens_per_s": 123456.0, "peak_reserved_gib": 8.0, "timed_compiles": 0,
      "batch_sizing": {{"field": "seq_len", "value": 4096, "reserved_gib": 9.0}}}}' > "$d/result.json"
    echo main job ran ;;
  bench/train.py)
    d=$(arg --out-dir "$@"); mkdir -p "$d"
    echo '{{"kind": "train", "cap": {{"runs": [{{"backend": "triton", "micro_batch": 8, "fits": true,
      "peak_reserved_gib": 9.5, "peak_alloc_gib": 8.0}}]}}}}' > "$d/train-fake.json"
    echo "| markdown of the record |" > "$d/train-fake.md" ;;
  bench/memory.py)
    echo '{{"peak_reserved_estimate_bytes": 10737418240, "peak_bytes": 9663676416}}' > "$(arg --json "$@")" ;;
  bench/kernels.py)
    d=$(arg --out-dir "$@"); mkdir -p "$d"
    echo '{{"kind": "kernels"}}' > "$d/kernels-fake.json"; echo '{{}}' > "$d/kernels-fake.png" ;;
  -m) echo "3 passed in 0.01s" ;;
esac
exit 0
"""


def stand_in(tmp_path, cuda="true", tqdm="true"):
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(STAND_IN.format(calls=calls, cuda=cuda, tqdm=tqdm))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "TRITONRUN_COMMIT": "0123abcd", "TRITONRUN_CHECK_SCRATCH":
           str(tmp_path / "scratch")}
    return calls, env


KERNEL_OPS = ("attention", "cross_entropy", "layernorm", "gelu", "adamw", "muon", "relu2", "rmsnorm", "rope",
              "window_attention")


def test_dry_run_prints_the_plan_anywhere(tmp_path):
    """The plan: steps in order of importance (the kernels' GPU tests, then the main job's default path and its
    triton twin, then the benches), each with its command; the kernel step's test files, collected from the tests
    themselves, hold every kernel's file."""
    proc = ci_gpu(tmp_path / "out", "--budget", 540, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    rows = [ln.split()[1] for ln in proc.stdout.splitlines() if ln[:4].strip().rstrip(".").isdigit()]
    assert rows == ["env", "kernel-tests", "main-torch", "main-triton", "train-mb8", "memory", "kernel-bench",
                    "autotune-tests"]
    deadlines = [int(ln.split("deadline +")[1].split()[0]) for ln in proc.stdout.splitlines() if "deadline +" in ln]
    assert deadlines == sorted(deadlines) and deadlines[-1] <= 540 and len(deadlines) >= 4  # the required four run
    assert ("main-torch: python train_speedrun.py --gpu rtx4070 --data sample --total-batch-tokens 49152 "
            "--max-steps 6") in proc.stdout and "--no-final-checkpoint" in proc.stdout
    assert "main-triton: python train_speedrun.py --gpu rtx4070 --backend triton --data sample" in proc.stdout
    files = next(ln for ln in proc.stdout.splitlines() if ln.startswith("kernel-tests' files ("))
    for op in KERNEL_OPS:
        assert f"tests/test_{op}.py (" in files, op
    assert "tests/test_speedrun_window_model.py (" in files and "tests/test_packed_loader.py (" in files
    assert "test_bench_" not in files and "test_ci_" not in files
    assert "OUT_DIR gets at most: check.log, check.json, main-torch.json, main-triton.json" in proc.stdout
    assert not (tmp_path / "out").exists()  # a plan only
    proc = ci_gpu(tmp_path / "out", "--budget", 200, "--dry-run")
    assert proc.returncode == 0 and "main-triton     skipped: slot" in proc.stdout
    proc = ci_gpu(tmp_path / "out", "--budget", 0)
    assert proc.returncode == 2 and proc.stderr.startswith("error: --budget 0:")


def test_gpu_tests_option_keeps_only_what_needs_a_gpu():
    """tests/conftest.py's --gpu-tests (the kernel step's selection) keeps the CUDA-gated tests and the bf16 cases
    of a kernel's file and nothing else."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q", "--gpu-tests",
                           "tests/test_relu2.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    kept = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    everything = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=", "--collect-only", "-q",
                                 "tests/test_relu2.py"], cwd=REPO, capture_output=True, text=True, timeout=300)
    total = [ln for ln in everything.stdout.splitlines() if "::" in ln]
    assert kept and len(kept) < len(total), proc.stdout[-2000:]
    assert all("bf16" in ln or "cuda" in ln.lower() or "gpu" in ln.lower() for ln in kept), kept


def test_budget_arithmetic(monkeypatch):
    """A slot is at most the step's nominal time, keeps GRACE for its stop and the later required steps'
    minimum (+ GRACE) when it can; when it cannot, the earlier (more important) step takes what is left; under
    its own minimum a step is skipped."""
    m = check_module()
    monkeypatch.setattr(m, "GRACE", 10)
    steps = [m.Step("a", 100, 30, True), m.Step("b", 200, 50, True), m.Step("c", 60, 40, False)]
    assert m.slot_for(steps, 0, 1000) == 100  # nominal
    assert m.slot_for(steps, 0, 150) == 80  # 150 - 10 (own grace) - (50 + 10) for b
    assert m.slot_for(steps, 0, 90) == 80  # b's reserve would leave a < 30: a first, b gets what is left
    assert m.slot_for(steps, 1, 100) == 90  # c is optional: no reserve for it
    assert m.slot_for(steps, 2, 45) == 35  # under c's 40: plan() skips it
    rows = m.plan(steps, 200)
    assert [(r["step"], r["slot_s"], r["deadline_s"], r["skip"]) for r in rows] == [
        ("a", 100, 100, False), ("b", 80, 190, False), ("c", 0, None, True)]


def test_budgeted_check_runs_the_steps_in_order_and_leaves_few_files(tmp_path):
    """The whole check with a stand-in python: the env probe, then each step's command in order, records copied
    into OUT_DIR under fixed names, logs merged: at most 8 plain files directly in OUT_DIR, each under 16 MiB,
    check.json naming the commit from $TRITONRUN_COMMIT. The canary's MFU peak is the running GPU's."""
    calls, env = stand_in(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", ".ci/gpu", str(out), "--budget", "5000"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    scratch = tmp_path / "scratch"
    memory = (REPO / "bench" / "memory.py").is_file()
    main = ("--data sample --total-batch-tokens 49152 --max-steps 6 --val-every 1000 --val-tokens 16384 "
            "--checkpoint-every 0 --no-final-checkpoint --hellaswag-every 0")
    want = [".ci/gpu_probe.py",
            "-m pytest -o addopts= -q -rs -p no:cacheprovider -n 4 --gpu-tests tests "
            "--ignore-glob=tests/test_bench_* --ignore-glob=tests/test_ci_* -k not every_autotune_candidate",
            f"train_speedrun.py --gpu rtx4070 {main} --out-dir {scratch}/main-torch --peak-tflops 989.0",
            f"train_speedrun.py --gpu rtx4070 --backend triton {main} --out-dir {scratch}/main-triton "
            "--peak-tflops 989.0",
            "bench/train.py --micro-batches 8 --configs triton,triton+compile,torch+compile --warmup 3 "
            f"--cap-max-micro-batch 8 --out-dir {scratch}/train"]
    if memory:
        want.append(f"bench/memory.py --gpu rtx4070 --recipe speedrun-dense --backend triton --micro-batch 8 --json "
                    f"{scratch}/memory.json")
    want += [f"bench/kernels.py --quick --op attention --op cross_entropy --out-dir {scratch}/kernels",
             "-m pytest -o addopts= -q -rs -p no:cacheprovider tests/test_attention.py tests/test_cross_entropy.py "
             "-k every_autotune_candidate"]
    assert lines == want
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["check.log", "check.json", "main-torch.json", "main-triton.json", "train.json",
                            "kernels.json"] + (["memory.json"] if memory else []))
    assert len(files) <= 8 and all((out / f).is_file() and (out / f).stat().st_size < 16 * 2**20 for f in files)
    rec = json.loads((out / "check.json").read_text())
    assert rec["commit"] == "0123abcd" and rec["complete"] and rec["budget_s"] == 5000
    status = {s["step"]: s["status"] for s in rec["steps"]}
    assert status == {"env": "ok", "kernel-tests": "ok", "main-torch": "ok", "main-triton": "ok", "train-mb8": "ok",
                      "memory": "ok" if memory else "skipped", "kernel-bench": "ok", "autotune-tests": "ok"}
    log = (out / "check.log").read_text()
    assert "env: stand-in env" in log and "main job ran" in log and "| markdown of the record |" in log
    assert ("main-torch: max_steps, seq_len 4096, 123,456 tok/s, peak reserved 8.00 GiB vs estimate 9.00 GiB "
            "(x1.125), timed_compiles 0") in log
    assert "3 passed" in log
    if not memory:
        assert "skip memory: bench/memory.py does not exist in this tree" in log
    else:
        assert ("reserved: estimate 10.00 GiB (peak_reserved_estimate_bytes) vs measured 9.50 GiB (x1.053); "
                "allocated: estimate 9.00 GiB (peak_bytes) vs measured 8.00 GiB (x1.125)") in log


def test_budgeted_check_names_missing_packages_and_refuses_without_cuda(tmp_path):
    calls, env = stand_in(tmp_path, tqdm="false")
    out = tmp_path / "out"
    proc = subprocess.run(["bash", ".ci/gpu", str(out), "--budget", "5000"], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = (out / "check.log").read_text()
    assert "missing: tqdm (tqdm): pip install tqdm" in log
    assert "skip main-torch: missing tqdm" in log and "skip main-triton: missing tqdm" in log
    assert not any(ln.startswith("train_speedrun.py") for ln in calls.read_text().splitlines())

    calls, env = stand_in(tmp_path, cuda="false")
    proc = subprocess.run(["bash", ".ci/gpu", str(tmp_path / "out2"), "--budget", "5000"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr
    assert [s["status"] for s in json.loads((tmp_path / "out2" / "check.json").read_text())["steps"]] == ["failed"]


def test_a_step_past_its_deadline_gets_sigint_and_keeps_its_records(tmp_path, monkeypatch):
    """A step still running at its deadline gets SIGINT (its process group); one that writes its record on
    SIGINT leaves it, and it reaches OUT_DIR; one that ignores SIGINT is killed GRACE seconds later; a later
    step left with too little time is skipped with one line. The check itself runs with SIGINT ignored (as under
    nohup): its steps still get the default back (two CI runs started in the background once failed here)."""
    m = check_module()
    monkeypatch.setattr(m, "GRACE", 2)
    scratch = tmp_path / "scratch"
    polite = ("trap 'mkdir -p {d}; echo {{\\\"partial\\\": true}} > {d}/train-x.json; echo got SIGINT; exit 130' INT; "
              "echo started; while true; do sleep 0.1; done").format(d=scratch / "train")
    stubborn = "trap '' INT; while true; do sleep 0.1; done"
    scripts = {"train-mb8": polite, "kernel-bench": stubborn, "autotune-tests": "true"}
    steps = [m.Step("train-mb8", 2, 1, True), m.Step("kernel-bench", 2, 1, False),
             m.Step("autotune-tests", 30, 20, False)]
    out = tmp_path / "out"
    env = {**os.environ, "TRITONRUN_COMMIT": "feed", "TRITONRUN_CHECK_SCRATCH": str(scratch)}
    # started as nohup or a background job would start it, with SIGINT ignored: the steps must get it back
    ignored = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = m.run_check(out, 12, steps=steps, py="unused", cmds=lambda name, *a: ["bash", "-c", scripts[name]],
                         env=env)
    finally:
        signal.signal(signal.SIGINT, ignored)
    assert rc == 0
    rec = json.loads((out / "check.json").read_text())
    first, second, third = rec["steps"]
    assert first["status"] == "interrupted" and first["rc"] == 130 and first["records"] == ["train.json"]
    assert json.loads((out / "train.json").read_text()) == {"partial": True}
    assert second["status"] == "interrupted" and second["rc"] == -9  # SIGKILL after GRACE
    assert third["status"] == "skipped" and "< 20 s" in third["why"]
    log = (out / "check.log").read_text()
    assert "started" in log and "got SIGINT" in log and "SIGINT at its 2 s deadline" in log
    assert "skip autotune-tests:" in log
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "check.log", "train.json"]


def test_memory_estimate_against_the_measured_peak():
    """bench/memory.py's JSON (fields, first present wins: reserved peak_reserved_estimate_bytes,
    peak_reserved_bytes, peak_reserved_estimate_gib, peak_reserved_gib; live peak_bytes, peak_alloc_bytes, peak_gib)
    against the cap check's triton+compile run at micro-batch 8 in bench/train.py's record."""
    m = check_module()
    train = {"cap": {"runs": [{"backend": "torch", "micro_batch": 8, "fits": True, "peak_reserved_gib": 11.0,
                               "peak_alloc_gib": 10.0},
                              {"backend": "triton", "micro_batch": 8, "fits": True, "peak_reserved_gib": 8.0,
                               "peak_alloc_gib": 7.5}]}}
    c = m.memory_comparison({"peak_reserved_estimate_bytes": 6 * 2**30, "peak_bytes": 3 * 2**30}, train)
    assert (c["estimate_reserved_gib"], c["estimate_reserved_field"], c["measured_reserved_gib"]) == \
        (6.0, "peak_reserved_estimate_bytes", 8.0)
    assert c["reserved_estimate_over_measured"] == 0.75 and c["alloc_estimate_over_measured"] == 0.4
    assert m.describe_comparison(c) == (
        "memory: rtx4070 triton+compile mb 8: reserved: estimate 6.00 GiB (peak_reserved_estimate_bytes) vs "
        "measured 8.00 GiB (x0.750); allocated: estimate 3.00 GiB (peak_bytes) vs measured 7.50 GiB (x0.400)")
    c = m.memory_comparison({"peak_reserved_gib": 9.0}, None)
    assert c["estimate_reserved_gib"] == 9.0 and c["measured_reserved_gib"] is None and c["estimate_alloc_gib"] is None
    assert "(no fitting cap-check run in train.json)" in m.describe_comparison(c)
    assert m.memory_comparison({"fits": True}, train)["estimate_reserved_gib"] is None
    # an estimate of one recipe's step is never set against a measured peak of the other's
    est = {"recipe": "speedrun", "peak_reserved_estimate_bytes": 6 * 2**30, "peak_bytes": 3 * 2**30}
    c = m.memory_comparison(est, {**train, "recipe": "gpt2"})
    assert c["measured_reserved_gib"] is None and "reserved_estimate_over_measured" not in c
    assert "(recipes differ: estimate speedrun, measured gpt2)" in m.describe_comparison(c)
    assert m.memory_comparison(est, {**train, "recipe": "speedrun"})["measured_reserved_gib"] == 8.0
