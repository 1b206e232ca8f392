"""bench/kernels.py: refuses without a GPU (one line, exit 2); the --allow-cpu smoke run exercises every
case, peer, record field and the plot, says it is not a timing, and never writes into bench/results.

The smoke run happens once per session (a fixture, shared by the xdist workers through
tests.helpers.shared_across_workers) and every test reads its record: on CPU it covers all cases, the elementwise
ops and adamw / attention / cross_entropy / muon, in one subprocess."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import load_script, shared_across_workers

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "kernels.py"
HAS_CUDA = torch.cuda.is_available()
PASSES = ("fwd", "bwd", "fwd+bwd")
# issue 26: tritonrun/kernels/rmsnorm.py, tritonrun/kernels/relu2.py
SPEEDRUN_OPS = ("rmsnorm", "add_rmsnorm", "mix_rmsnorm", "relu2")
ELEMENTWISE = ("layernorm", "add_layernorm", "gelu") + SPEEDRUN_OPS + ("qk_norm_rope",)
NEW_OPS = ("adamw", "attention", "cross_entropy", "muon")
WINDOW_OP = "window_attention"  # issue 27: tritonrun/kernels/window_attention.py
FP8_OP = "fp8_linear"  # issue 35: tritonrun/kernels/fp8.py
BIGRAM_OP = "bigram"  # issue 35: tritonrun/kernels/bigram.py
MLP_OP = "relu2_mlp"  # issue 35: tritonrun/kernels/mlp_relu2.py
HEAD_OP = "mtp_head"  # issue 35: tritonrun/kernels/mtp_head.py
SDPA = ("sdpa.flash", "sdpa.cudnn", "sdpa.efficient")
OPTIONAL_CE_PEERS = {"liger": ("liger_kernel", "pip install liger-kernel"),
                     "cut-cross-entropy": ("cut_cross_entropy", "pip install cut-cross-entropy")}


def bench(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script decides itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_and_load(out_dir: Path, *extra):
    proc = bench("--allow-cpu", "--quick", "--out-dir", str(out_dir), *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = list(out_dir.glob("kernels-*.json"))
    assert len(records) == 1, records
    return proc, records[0], json.loads(records[0].read_text())


@pytest.fixture(scope="module")
def smoke(request):
    """(proc, record path, record, results in bench/results before the run) of one smoke run with --plot."""
    def run(out_dir):
        before = sorted(p.name for p in (REPO / "bench" / "results").glob("*"))
        extra = ["--plot"] + (["--op", "gelu"] if HAS_CUDA else [])  # a real (quick) GPU run: keep it to one op
        return (*run_and_load(out_dir, *extra), before)

    return shared_across_workers(request, "smoke", run)


@pytest.fixture(scope="module")
def new_ops_record(smoke, request):
    """The record holding adamw / attention / cross_entropy / muon rows: the smoke run's on CPU; on a GPU a quick
    real run of those three ops."""
    if not HAS_CUDA:
        return smoke[2]
    args = [a for op in NEW_OPS for a in ("--op", op)]
    return shared_across_workers(request, "new_ops", lambda out_dir: run_and_load(out_dir, *args)[2])


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal; this machine has a CUDA GPU")
def test_refuses_without_gpu_in_one_line():
    proc = bench("--quick")
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--allow-cpu" in lines[0], proc.stderr


def test_smoke_run_writes_a_marked_record_and_plot(smoke, tmp_path):
    proc, path, rec, before = smoke
    assert path.with_suffix(".png").exists()
    assert rec["smoke"] is (not HAS_CUDA)
    assert {"commit", "torch", "triton", "device"} <= set(rec["env"])
    assert rec["autotune"] == {}  # nothing is tuned in the interpreter (CPU) or for gelu (the GPU's case here)
    every = {*ELEMENTWISE, *NEW_OPS, WINDOW_OP, FP8_OP, BIGRAM_OP, MLP_OP, HEAD_OP}
    assert set(rec["args"]["op"]) == ({"gelu"} if HAS_CUDA else every)
    assert rec["complete"] is True and rec["ops_done"] == rec["args"]["op"]
    ops = {"gelu"} if HAS_CUDA else set(ELEMENTWISE)
    got = {(r["op"], r["pass"], r["impl"]) for r in rec["results"] if r["op"] in ELEMENTWISE}
    assert got == {(op, p, i) for op in ops for p in PASSES for i in ("triton", "torch", "torch.compile")}
    fields = set(rec["results"][0])
    for r in rec["results"]:
        assert set(r) == fields, r  # one schema for every op
        assert r["check"] == "ok", r
        assert r["ms_q20"] <= r["ms"] <= r["ms_q80"]
        if r["op"] in ELEMENTWISE:
            assert r["bytes"] > 0 and r["gbps"] > 0 and r["flops"] is None and r["peak_mb"] is None
    assert all(set(s["vs"]) == {"torch", "torch.compile"} for s in rec["speedups"] if s["op"] in ELEMENTWISE)
    if not HAS_CUDA:
        assert proc.stdout.count("NOT A TIMING") >= 2 and "kernels-smoke-" in path.name
        assert sorted(p.name for p in (REPO / "bench" / "results").glob("*")) == before
        # plotting existing records needs no GPU and runs nothing (a copy: the smoke run's files are shared)
        copy = tmp_path / path.name
        shutil.copy(path, copy)
        png = copy.with_suffix(".png")
        assert not png.exists()
        proc = bench("--plot", str(copy))
        assert proc.returncode == 0 and png.exists(), proc.stderr


def rows_of(rec, op):
    rows = [r for r in rec["results"] if r["op"] == op]
    assert rows, f"no {op} rows in the record"
    for r in rows:
        assert r["check"] == "ok", r
        assert r["ms_q20"] <= r["ms"] <= r["ms_q80"] and r["ms"] > 0
    return rows


def skipped_of(rec, op):
    return {s["impl"]: s["skipped"] for s in rec["skipped"] if s["op"] == op}


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the smoke fixture times gelu only")
def test_speedrun_op_rows_use_the_kernel_files_bytes(smoke):
    """Each speedrun op's GB/s numerator is its kernel file's bytes_moved for the row's shape and dtypes."""
    from tritonrun.kernels import relu2, rmsnorm

    dt = lambda r, k: getattr(torch, r["dtypes"][k]) if k in r["dtypes"] else None  # noqa: E731
    for op in SPEEDRUN_OPS:
        for r in rows_of(smoke[2], op):
            rows, C = r["shape"]["rows"], r["shape"]["C"]
            if op == "relu2":
                want = relu2.bytes_moved(rows * C, r["pass"], dtype=dt(r, "x"))
            else:
                kernel_op = {"rmsnorm": "rms_norm", "add_rmsnorm": "add_rms_norm", "mix_rmsnorm": "mix_rms_norm"}[op]
                other = dt(r, "residual") or dt(r, "x0")
                want = rmsnorm.bytes_moved(rows, C, r["pass"], x=dt(r, "x"), other=other, op=kernel_op)
            assert r["bytes"] == want, r


def test_adamw_rows(new_ops_record):
    rows = rows_of(new_ops_record, "adamw")
    assert {(r["pass"], r["impl"]) for r in rows} == {("step", i) for i in ("triton", "torch.fused", "torch.foreach")}
    for r in rows:
        # the 124M model's 148 tensors on a GPU; the smoke run's 2-layer model has 28
        assert r["shape"]["tensors"] == (148 if HAS_CUDA else 28) and r["shape"]["params"] > 0
        assert r["bytes"] == 32 * r["shape"]["params"]  # fp32 params, clip included: one formula for all
        assert r["gbps"] > 0 and r["tflops"] is None and r["peak_mb"] is None
        assert (r["pct_peak"] is None) is (not HAS_CUDA)
    (ratio,) = [s for s in new_ops_record["speedups"] if s["op"] == "adamw"]
    assert set(ratio["vs"]) == {"torch.fused", "torch.foreach"}


def test_muon_rows(new_ops_record):
    from tritonrun.kernels.muon import newton_schulz_flops

    rows = rows_of(new_ops_record, "muon")
    impls = {"triton", "torch"} | ({"torch.compile"} if HAS_CUDA else set())  # no compile in the CPU smoke run
    assert {(r["pass"], r["impl"]) for r in rows} == {("step", i) for i in impls}
    layers, C = (12, 768) if HAS_CUDA else (2, 64)  # the d12 speedrun's 72 hidden matrices; smoke: 2 layers of 64
    flops = layers * (4 * newton_schulz_flops(C, C) + 2 * newton_schulz_flops(4 * C, C))
    for r in rows:
        assert r["shape"]["tensors"] == 6 * layers and r["shape"]["params"] == layers * 12 * C * C
        assert r["flops"] == flops and r["tflops"] > 0 and r["bytes"] is None and r["peak_mb"] is None
    (ratio,) = [s for s in new_ops_record["speedups"] if s["op"] == "muon"]
    assert set(ratio["vs"]) == impls - {"triton"}


def test_attention_rows(new_ops_record):
    rec = new_ops_record
    rows = rows_of(rec, "attention")
    impls = {r["impl"] for r in rows}
    assert {"triton", "torch", "torch.compile"} <= impls
    skipped = skipped_of(rec, "attention")
    for backend in SDPA:  # every SDPA backend either ran or says why not
        assert (backend in impls) != (backend in skipped), backend
        assert backend not in skipped or skipped[backend]
    shapes = {(r["shape"]["B"], r["shape"]["H"], r["shape"]["T"], r["shape"]["D"]) for r in rows}
    assert shapes == ({(16, 12, 1024, 64)} if HAS_CUDA else {(1, 1, 64, 64)})
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in impls for p in PASSES}
    assert rec["matmul_peak_tflops"] > 0
    for r in rows:
        assert r["flops"] > 0 and r["tflops"] > 0 and r["pct_matmul_peak"] > 0
        assert r["bytes"] is None and r["peak_mb"] is None
    fwd = {r["impl"]: r["flops"] for r in rows if r["pass"] == "fwd"}
    both = {r["impl"]: r["flops"] for r in rows if r["pass"] == "fwd+bwd"}
    assert len(set(fwd.values())) == 1 and all(v == pytest.approx(3.5 * fwd["triton"]) for v in both.values())
    for s in (s for s in rec["speedups"] if s["op"] == "attention"):
        assert set(s["vs"]) == impls - {"triton"}
        assert ("vs_best_sdpa" in s) == bool(impls & set(SDPA))


def test_cross_entropy_rows(new_ops_record):
    rec = new_ops_record
    rows = rows_of(rec, "cross_entropy")
    impls = {r["impl"] for r in rows}
    assert {"triton", "torch", "torch.compile"} <= impls
    skipped = skipped_of(rec, "cross_entropy")
    for peer, (module, install) in OPTIONAL_CE_PEERS.items():
        assert (peer in impls) != (peer in skipped), peer
        if importlib.util.find_spec(module) is None:  # absent here: recorded as not installed, not a failure
            assert skipped[peer] == f"not installed: {install}"
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in impls for p in PASSES}
    for r in rows:
        assert r["shape"] == ({"rows": 16384, "C": 768, "V": 50304, "vocab_size": 50257} if HAS_CUDA else
                              {"rows": 64, "C": 64, "V": 256, "vocab_size": 250})
        assert r["flops"] > 0 and r["tflops"] > 0 and r["bytes"] is None
        assert (r["peak_mb"] is None) is (not HAS_CUDA)  # memory is measured on CUDA only
    for s in (s for s in rec["speedups"] if s["op"] == "cross_entropy"):
        assert "torch.compile" in s["vs"]
        assert ("peak_mb_ratio" in s) is HAS_CUDA
        if HAS_CUDA:
            assert "torch.compile" in s["peak_mb_ratio"]


@pytest.mark.skipif(HAS_CUDA, reason="CPU-only behaviour")
def test_smoke_refuses_to_write_into_results():
    proc = bench("--allow-cpu", "--quick", "--op", "gelu", "--out-dir", str(REPO / "bench" / "results"))
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error:")


def test_a_raising_implementation_is_recorded_and_only_ours_decides_the_exit(monkeypatch):
    """A peer that raises (after its import worked) is recorded under "skipped" with the error and costs
    nothing else; our kernel raising is an error the run reports. Timing paths run as in the smoke mode."""
    mod = load_script("bench/kernels.py", "bench_kernels")
    ctx = mod.Ctx(device=torch.device("cpu"), smoke=True, quick=True, dtype_mode="fp32", peers=[], rows=[4], C=8)

    def make_set(seed):
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(4, 8, generator=g, requires_grad=True)], [torch.randn(4, 8, generator=g)]

    def broken(x):
        raise RuntimeError("peer kernel exploded\nsecond line")

    shape = {"rows": 4, "C": 8}
    mod.bench_impls(ctx, "toy", shape, {"x": torch.float32}, make_set,
                    {"triton": lambda x: x * 2, "torch": lambda x: x * 2, "peer": broken}, nbytes=None)
    assert sorted({r["impl"] for r in ctx.results}) == ["torch", "triton"]
    assert all(r["check"] == "ok" for r in ctx.results)
    assert ctx.skipped == [{"op": "toy", "shape": shape, "impl": "peer",
                            "skipped": "raised RuntimeError: peer kernel exploded"}]
    assert ctx.errors == []
    mod.bench_impls(ctx, "toy", shape, {"x": torch.float32}, make_set,
                    {"triton": broken, "torch": lambda x: x * 2}, nbytes=None)
    assert ctx.errors == ["toy 4x8: RuntimeError: peer kernel exploded"]


def test_a_reference_out_of_memory_skips_the_shape_and_the_run_goes_on():
    """No implementation can be checked without the reference: one "skipped" entry for the whole shape, naming
    why, instead of the error ending the run (an RTX 4070 at a shape whose reference does not fit)."""
    mod = load_script("bench/kernels.py", "bench_kernels")
    ctx = mod.Ctx(device=torch.device("cpu"), smoke=True, quick=True, dtype_mode="fp32", peers=[], rows=[4], C=8)

    def make_set(seed):
        return [torch.randn(4, 8, requires_grad=True)], [torch.randn(4, 8)]

    def too_big(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB")

    shape = {"rows": 4, "C": 8}
    mod.bench_impls(ctx, "toy", shape, {"x": torch.float32}, make_set,
                    {"triton": lambda x: x * 2, "torch": lambda x: x * 2}, nbytes=None, reference=too_big)
    assert ctx.results == [] and ctx.errors == []
    assert ctx.skipped == [{"op": "toy", "shape": shape, "impl": "all", "skipped":
                            "the reference ran out of memory, nothing can be checked: "
                            "OutOfMemoryError: CUDA out of memory. Tried to allocate 3.07 GiB"}]


def test_slow_calls_still_get_min_samples(monkeypatch):
    """do_bench times about rep / (one call) calls: rep grows with a slow call so that a row's quantiles come from
    at least MIN_SAMPLES calls (the cross-entropy rows take > 100 ms a call on an RTX 4070), and stays as asked for
    fast ones. do_bench and the CUDA sync are stand-ins here: this checks the arithmetic, not a GPU timing."""
    import time

    import triton.testing

    mod = load_script("bench/kernels.py", "bench_kernels")
    asked = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, warmup, rep, quantiles: asked.append(rep) or [1, 2, 3])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    ctx = mod.Ctx(device=torch.device("cpu"), smoke=False, quick=False, dtype_mode="fp32", peers=[], rows=[4], C=8)
    assert mod.timer(ctx, lambda: None) == [1, 2, 3] and asked == [100]
    mod.timer(ctx, lambda: time.sleep(0.03))
    assert asked[1] >= (mod.MIN_SAMPLES + 1) * 30


def test_a_raising_optimizer_costs_only_its_own_row(monkeypatch):
    """The adamw case catches what bench_impls catches: FusedAdamW raising is recorded (skipped + an error of
    ours) and torch's optimizers still get their rows, instead of the exception ending the run unrecorded."""
    mod = load_script("bench/kernels.py", "bench_kernels")
    from tritonrun.kernels import adamw

    class Exploding:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("fused adamw exploded\nsecond line")

    monkeypatch.setattr(adamw, "FusedAdamW", Exploding)
    ctx = mod.Ctx(device=torch.device("cpu"), smoke=True, quick=True, dtype_mode="fp32", peers=[], rows=[4], C=8)
    mod.case_adamw(ctx)
    assert sorted(r["impl"] for r in ctx.results) == ["torch.foreach", "torch.fused"]
    assert [(s["impl"], s["skipped"]) for s in ctx.skipped] == [("triton", "raised RuntimeError: fused adamw exploded")]
    assert len(ctx.errors) == 1 and ctx.errors[0].endswith("RuntimeError: fused adamw exploded"), ctx.errors


def test_an_interrupted_run_keeps_the_ops_it_finished(tmp_path, monkeypatch):
    """A time limit's SIGINT (.ci/gpu's phase timeout) in the middle of an op: the record of the ops that
    finished is on disk, marked incomplete, and the exit is 130; a partial record is also rewritten after each op."""
    mod = load_script("bench/kernels.py", "bench_kernels")

    def interrupted(ctx):
        raise KeyboardInterrupt

    monkeypatch.setitem(mod.CASES, "adamw", interrupted)
    rc = mod.main(["--allow-cpu", "--quick", "--op", "gelu", "--op", "adamw", "--op", "layernorm",
                   "--out-dir", str(tmp_path)])
    assert rc == 130
    (path,) = tmp_path.glob("kernels-*.json")
    rec = json.loads(path.read_text())
    assert rec["complete"] is False and rec["ops_done"] == ["gelu"] and rec["args"]["op"] == ["gelu", "adamw",
                                                                                            "layernorm"]
    assert {r["op"] for r in rec["results"]} == {"gelu"} and all(r["check"] == "ok" for r in rec["results"])
    assert {s["op"] for s in rec["speedups"]} == {"gelu"}


@pytest.fixture(scope="module")
def fp8_record(smoke, request):
    """The fp8_linear rows: the smoke run's on CPU; on a GPU a quick real run of that op."""
    if not HAS_CUDA:
        return smoke[2]
    return shared_across_workers(request, "fp8", lambda out_dir: run_and_load(out_dir, "--op", FP8_OP)[2])


def test_fp8_linear_rows(fp8_record):
    """Three products (MLP up, MLP down, LM head), ours and torch._scaled_mm (or its skip reason), every pass,
    checked against the fp64 product of the same fp8 operands, TFLOPS from 2MNK / 4MNK / 6MNK."""
    rows = rows_of(fp8_record, FP8_OP)
    assert {r["shape"]["what"] for r in rows} == {"mlp_up", "mlp_down", "lm_head"}
    skipped = skipped_of(fp8_record, FP8_OP)
    assert {r["impl"] for r in rows} | set(skipped) == {"triton", "torch._scaled_mm"}
    for r in rows:
        s = r["shape"]
        mnk = s["rows"] * s["K"] * s["N"]
        assert r["check"] == "ok" and r["flops"] == {"fwd": 2, "bwd": 4, "fwd+bwd": 6}[r["pass"]] * mnk, r
    assert {(r["shape"]["what"], r["pass"]) for r in rows if r["impl"] == "triton"} == \
        {(w, p) for w in ("mlp_up", "mlp_down", "lm_head") for p in PASSES}


def _bigram_bytes(r):
    from tritonrun.kernels import bigram as bg

    s = r["shape"]
    return r["bytes"] == bg.bytes_moved(s["rows"], s["C"], r["pass"], dtype=torch.float16)


def _mlp_flops(r):
    s = r["shape"]
    return r["flops"] == {"fwd": 4, "bwd": 8, "fwd+bwd": 12}[r["pass"]] * s["rows"] * s["K"] * s["N"]


@pytest.mark.parametrize("op,figure", [(BIGRAM_OP, _bigram_bytes), (MLP_OP, _mlp_flops)], ids=[BIGRAM_OP, MLP_OP])
def test_issue_35_op_rows(smoke, op, figure):
    """The bigram embedding's and the fused MLP step's rows (the CPU smoke run; a GPU session runs --op bigram /
    --op relu2_mlp): ours, torch and torch.compile (or its skip), checked; GB/s from bigram.bytes_moved, TFLOPS of
    the MLP from 4 / 8 / 12 M C H."""
    if HAS_CUDA:
        pytest.skip(f"the GPU smoke fixture runs gelu only; `bench/kernels.py --op {op}` measures it")
    rows = rows_of(smoke[2], op)
    assert {r["impl"] for r in rows} | set(skipped_of(smoke[2], op)) == {"triton", "torch", "torch.compile"}
    for r in rows:
        assert figure(r), r


@pytest.fixture(scope="module")
def window_record(request):
    """A run of the window_attention case alone: the smoke run's shapes on CPU, the --quick ones on a GPU."""
    return shared_across_workers(request, "window",
                                 lambda out_dir: run_and_load(out_dir, "--op", WINDOW_OP)[2])


def test_window_attention_rows(window_record):
    """One row group per window at one fixed T (time vs window): ours, FlexAttention with the same mask (or its
    skip reason: always skipped on CPU), dense causal SDPA, and the eager dense-masked math only where T is
    small; TFLOPS from each row's own work (allowed pairs for the masked ones, the causal half for SDPA)."""
    from tritonrun.kernels import window_attention as wa

    bk = load_script("bench/kernels.py", "bench_kernels_window")
    rec = window_record
    rows = rows_of(rec, WINDOW_OP)
    skipped = skipped_of(rec, WINDOW_OP)
    impls = {r["impl"] for r in rows}
    assert {"triton", "sdpa.causal_dense"} <= impls
    assert ("flex_attention.compile" in impls) != ("flex_attention.compile" in skipped)
    assert HAS_CUDA or skipped["flex_attention.compile"].startswith("smoke run on CPU")
    shapes = {json.dumps(r["shape"], sort_keys=True) for r in rows}
    windows = sorted(json.loads(s)["window"] for s in shapes)
    assert windows == sorted(bk.WINDOWS_QUICK if HAS_CUDA else (4, 16))
    assert len({(json.loads(s)["T"], json.loads(s)["D"]) for s in shapes}) == 1  # fixed T and D
    T = json.loads(next(iter(shapes)))["T"]
    assert ("torch" in impls) == (T <= bk.WINDOW_DENSE_REFERENCE_MAX_T)
    cuts = bk.window_docs(T, 24 if not HAS_CUDA else bk.WINDOW_MEAN_DOC)
    lengths = [b - a for a, b in zip(cuts, cuts[1:])]
    for r in rows:
        s = r["shape"]
        assert s["docs"] == len(lengths) and {(i, p) for i in impls for p in PASSES} >= {(r["impl"], r["pass"])}
        mode = r["pass"].replace("+", "_")
        want = (bk.attention_flops_dense(s["B"], s["H"], T, s["D"], r["pass"]) if r["impl"] == "sdpa.causal_dense"
                else wa.window_attention_flops(s["B"], s["H"], lengths, s["D"], s["window"], mode))
        assert r["flops"] == pytest.approx(want) and r["tflops"] > 0
    for w in windows:  # every implementation ran every pass at every window
        got = {(r["impl"], r["pass"]) for r in rows if r["shape"]["window"] == w}
        assert got == {(i, p) for i in impls for p in PASSES}
    for s in (s for s in rec["speedups"] if s["op"] == WINDOW_OP):
        assert set(s["vs"]) == impls - {"triton"} and s["best_sdpa"] == "sdpa.causal_dense"
