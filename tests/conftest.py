"""Test setup: run the real Triton kernels through the interpreter when no CUDA GPU is present.

TRITON_INTERPRET must be set before any module containing @triton.jit is imported, so it is set
here, at conftest import time, before test modules import tritonrun/kernels/.
"""
import os

import pytest
import torch

from tritonrun.gpt2.ops import interpreter_problem  # imports no triton

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    _problem = interpreter_problem()
    if _problem:
        pytest.exit(f"the kernel tests need Triton's CPU interpreter: {_problem}", returncode=2)
    os.environ.setdefault("TRITON_INTERPRET", "1")
else:
    # One fixed config per kernel under tests (the arch table's entry), not the autotuners' timing-dependent picks:
    # test_attention and test_cross_entropy check every autotune candidate, and the autotuned path, on their own.
    os.environ.setdefault("TRITONRUN_AUTOTUNE", "0")

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (none on this machine)")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep tests from writing into ~/.cache: the sample corpus goes to a per-session temp cache."""
    cache = tmp_path_factory.getbasetemp() / "tritonrun-cache"
    monkeypatch.setenv("TRITONRUN_CACHE", str(cache))


@pytest.fixture(autouse=True)
def _restore_matmul_precision():
    """The trainer asks for TF32 on CUDA process-wide; later fp32 comparisons in the same process must not
    inherit it."""
    saved = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture
def one_torch_thread():
    """One intra-op thread for tests of tiny models (faster, and immune to oversubscribed CPUs)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


# ------------------------------------------------------------------ --gpu-tests: the budgeted GPU check's selection
def pytest_addoption(parser):
    parser.addoption("--gpu-tests", action="store_true",
                     help="run only the tests that need a GPU: those a CPU run skips for want of CUDA (a skipif "
                          "whose reason names CUDA or a GPU) and every bf16 case (.ci/gpu_check.py's kernel step)")


def needs_gpu(item) -> bool:
    """What --gpu-tests keeps, read from the tests themselves: a CUDA/GPU skip mark, or a bf16 parameter."""
    if any("CUDA" in m.kwargs.get("reason", "") or "GPU" in m.kwargs.get("reason", "")
           for m in item.iter_markers("skipif")):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(v is torch.bfloat16 or (isinstance(v, str) and v == "bf16") for v in params.values())


def pytest_collection_modifyitems(config, items):
    listing = os.environ.get("TRITONRUN_SKIP_REASONS")
    if listing:  # tests/test_user_errors.py: every skip that applies on this machine, with its reason
        import json

        skips = [[item.nodeid, m.kwargs.get("reason", "")] for item in items for m in item.iter_markers("skipif")
                 if m.args and m.args[0] is True]
        with open(listing, "w") as f:
            json.dump(skips, f)
    if not config.getoption("--gpu-tests"):
        return
    keep = [item for item in items if needs_gpu(item)]
    config.hook.pytest_deselected(items=[item for item in items if not needs_gpu(item)])
    items[:] = keep
