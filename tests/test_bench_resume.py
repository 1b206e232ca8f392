"""bench/resume.py: the resume-exactness measurement. On CPU (smoke) both backends must come out bitwise."""
import json
import math
import subprocess
import sys

import pytest
import torch

from tests.helpers import NEEDS_INTERPRETER, load_script, one_thread_env
from tests.test_train_cli import REPO

HAS_CUDA = torch.cuda.is_available()


def bench(*args, timeout=900, env=None):
    return subprocess.run([sys.executable, "bench/resume.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**one_thread_env(), **(env or {})})


@NEEDS_INTERPRETER
def test_smoke_both_backends_resume_bitwise(tmp_path):
    proc = bench("--smoke", "--micro-batch", 1, "--seq-len", 16, "--grad-accum", 1, "--steps", 4,
                 "--out-dir", tmp_path, "--keep-runs", tmp_path / "runs")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [path] = tmp_path.glob("resume-smoke-*.json")
    rec = json.loads(path.read_text())
    assert rec["kind"] == "resume" and rec["smoke"] and rec["steps"] == 4 and rec["checkpoint_step"] == 2
    assert rec["complete"] is True and rec["backends"] == ["torch", "triton"] and rec["compile_modes"] == [False]
    assert rec["commit"] and rec["torch"] == torch.__version__
    assert [r["backend"] for r in rec["runs"]] == ["torch", "triton"]
    for r in rec["runs"]:
        losses = r["losses"]
        assert len(losses["A"]) == len(losses["B"]) == len(losses["C"]) == 4
        assert losses["C"] == losses["A"]  # the CPU guarantee, checked on the raw lists too
        assert r["resume_vs_straight"]["bitwise"] and r["straight_vs_straight"]["bitwise"]
        assert r["resume_vs_straight"]["loss"] == {"max_abs": 0.0, "max_rel": 0.0, "bitwise": True,
                                                   "first_differing_index": None}
        assert r["resume_adds_error"] is False
        assert r["config"]["backend"] == r["backend"] and r["config"]["model"] == "tiny"
    # the resumed run really resumed: its out dir started with only A's step-2 checkpoint
    log = (tmp_path / "runs" / "triton-C" / "train.log").read_text()
    assert "resumed from" in log and "ckpt_00000002.pt at step 2" in log


def test_difference_summary():
    resume = load_script("bench/resume.py", "bench_resume")

    d = resume.diff([1.0, 2.0, 3.5], [1.0, 2.5, 3.0])
    assert d == {"max_abs": 0.5, "max_rel": 0.5 / 2.5, "bitwise": False, "first_differing_index": 1}
    with pytest.raises(ValueError):
        resume.diff([1.0], [1.0, 2.0])  # lists of different length never compare silently


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal; this machine has a CUDA GPU")
def test_refuses_without_gpu():
    proc = bench()
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA GPU") and "--smoke" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_user_errors(tmp_path):
    proc = bench("--smoke", "--out-dir", REPO / "bench" / "results")
    assert proc.returncode == 2 and "never write into bench/results" in proc.stderr
    proc = bench("--smoke", "--steps", 5, "--out-dir", tmp_path)
    assert proc.returncode == 2 and "--steps 5: needs an even number" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_default_measures_compiled_and_eager():
    """The GPU presets train compiled, so the GPU default measures --compile (first) and --no-compile, and each
    run's train_speedrun.py command says which; --compile / --no-compile pick one."""
    resume = load_script("bench/resume.py", "bench_resume")
    args = resume.parse_args([])
    assert args.compile_modes == [True, False]
    assert "--compile" in resume.train_argv(args, "triton", True, REPO / "x")
    assert "--no-compile" in resume.train_argv(args, "triton", False, REPO / "x")
    assert resume.parse_args(["--no-compile"]).compile_modes == [False]
    assert resume.parse_args(["--compile"]).compile_modes == [True]
    assert resume.parse_args(["--smoke"]).compile_modes == [False]


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: the GPU case of resume exactness")
def test_gpu_triton_backend_is_bitwise_torch_backend_recorded(tmp_path):
    """On a GPU the Triton backend has no atomics anywhere (attention, CE, LayerNorm reductions are
    deterministic by construction; cuBLAS is run-to-run deterministic for fixed shapes), so its eager straight
    runs and its resumed run must agree bitwise. The torch backend (SDPA's flash backward accumulates dQ with
    atomics) and the compiled runs (Inductor's embedding backward is a scatter-add with atomics) are only
    measured: their figures go to the record, quoted in README from bench/results.
    Attention's autotuned tile (which sets its summation order) is cached on disk by the first process to tune
    and read by the later ones; a Triton cache of this test's own keeps another xdist worker tuning the same
    key at the same time from writing a different pick between the runs."""
    proc = bench("--model", "tiny", "--micro-batch", 4, "--seq-len", 128, "--steps", 6,
                 "--out-dir", tmp_path, env={"TRITON_CACHE_DIR": str(tmp_path / "triton-cache")})
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [path] = tmp_path.glob("resume-*.json")
    rec = json.loads(path.read_text())
    assert rec["complete"] and sorted((r["backend"], r["compile"]) for r in rec["runs"]) == [
        ("torch", False), ("torch", True), ("triton", False), ("triton", True)]
    runs = {r["backend"]: r for r in rec["runs"] if not r["compile"]}
    assert runs["triton"]["straight_vs_straight"]["bitwise"], runs["triton"]["straight_vs_straight"]
    assert runs["triton"]["resume_vs_straight"]["bitwise"], runs["triton"]["resume_vs_straight"]
    for r in rec["runs"]:
        assert all(math.isfinite(x) for x in r["losses"]["C"]) and len(r["losses"]["C"]) == 6


def test_an_interrupted_run_keeps_the_backends_it_measured(tmp_path, monkeypatch):
    """A time limit's SIGINT during the second backend: the first one's measurement is on disk, marked
    incomplete, and the exit is 130 (measure() stands in: the plumbing, not the runs, is under test)."""
    mod = load_script("bench/resume.py", "bench_resume")

    def measure(args, backend, compile_, work):
        if backend == "triton":
            raise KeyboardInterrupt
        return {"backend": backend, "resume_vs_straight": {"bitwise": True}}

    monkeypatch.setattr(mod, "measure", measure)
    assert mod.main(["--smoke", "--out-dir", str(tmp_path)]) == 130
    [path] = tmp_path.glob("resume-smoke-*.json")
    rec = json.loads(path.read_text())
    assert rec["complete"] is False and rec["backends"] == ["torch", "triton"]
    assert rec["runs"] == [{"backend": "torch", "resume_vs_straight": {"bitwise": True}}]
