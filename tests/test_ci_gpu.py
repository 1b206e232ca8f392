""".ci/gpu, the GPU half of CI: its argument checks and its refusal on a machine without CUDA."""
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
