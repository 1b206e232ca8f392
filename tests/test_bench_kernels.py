"""bench/kernels.py: refuses without a GPU (one line, exit 2); the --allow-cpu smoke run exercises every
case, peer, record field and the plot, says it is not a timing, and never writes into bench/results."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "kernels.py"
HAS_CUDA = torch.cuda.is_available()


def bench(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script decides itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal; this machine has a CUDA GPU")
def test_refuses_without_gpu_in_one_line():
    proc = bench("--quick")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--allow-cpu" in lines[0], proc.stderr


def test_smoke_run_writes_a_marked_record_and_plot(tmp_path):
    before = sorted(p.name for p in (REPO / "bench" / "results").glob("*"))
    args = ["--allow-cpu", "--quick", "--out-dir", str(tmp_path), "--plot"]
    if HAS_CUDA:  # a real (quick) GPU run: keep it to one op
        args += ["--op", "gelu"]
    proc = bench(*args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = list(tmp_path.glob("kernels-*.json"))
    assert len(records) == 1 and records[0].with_suffix(".png").exists()
    rec = json.loads(records[0].read_text())
    assert rec["smoke"] is (not HAS_CUDA)
    assert {"commit", "torch", "triton", "device"} <= set(rec["env"])
    ops = {"gelu"} if HAS_CUDA else {"layernorm", "add_layernorm", "gelu"}
    got = {(r["op"], r["pass"], r["impl"]) for r in rec["results"]}
    assert got == {(op, p, i) for op in ops for p in ("fwd", "bwd", "fwd+bwd")
                   for i in ("triton", "torch", "torch.compile")}
    for r in rec["results"]:
        assert r["check"] == "ok", r
        assert r["ms_q20"] <= r["ms"] <= r["ms_q80"] and r["bytes"] > 0 and r["gbps"] > 0
    assert all(set(s["vs"]) == {"torch", "torch.compile"} for s in rec["speedups"])
    if not HAS_CUDA:
        assert proc.stdout.count("NOT A TIMING") >= 2 and "kernels-smoke-" in records[0].name
        assert sorted(p.name for p in (REPO / "bench" / "results").glob("*")) == before
        # plotting existing records needs no GPU and runs nothing
        png = records[0].with_suffix(".png")
        png.unlink()
        proc = bench("--plot", str(records[0]))
        assert proc.returncode == 0 and png.exists(), proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_smoke_refuses_to_write_into_results():
    proc = bench("--allow-cpu", "--quick", "--op", "gelu", "--out-dir", str(REPO / "bench" / "results"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")
