""".ci/gpu, the GPU half of CI: its argument checks and its refusal on a machine without CUDA."""
import os
import subprocess

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
