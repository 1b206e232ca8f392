"""bench/train.py: the CPU smoke run end to end, the no-GPU refusal, and the --project arithmetic.

The GPU measurement itself (d12 sweep, 12 GiB cap, profile) needs a CUDA GPU; here only its record
machinery runs, on the tiny model (--smoke), and pure helpers are checked in-process."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import HAS_CUDA
from tritonrun.gpt2.ops import GPT2_OPS
from tests.helpers import NEEDS_INTERPRETER, load_script

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "train.py"
RUN_KEYS = {"backend", "compile", "micro_batch", "tokens_per_s", "mfu", "peak_alloc_gib", "peak_reserved_gib",
            "step_ms_median", "step_ms_all", "fits", "autotune"}


def bench(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script decides itself
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def load_module():
    return load_script("bench/train.py", "bench_train")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    before = sorted(p.name for p in (REPO / "bench" / "results").glob("*"))
    proc = bench("--smoke", "--out-dir", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = list(out.glob("train-*.json"))
    assert len(records) == 1, records
    return proc, records[0], json.loads(records[0].read_text()), before


def test_smoke_record_is_complete(smoke):
    proc, path, rec, before = smoke
    assert "NOT A TIMING" in proc.stdout
    assert path.name.startswith("train-smoke-")
    assert rec["smoke"] is True and rec["kind"] == "train" and rec["complete"] is True
    for key in ("device", "commit", "versions", "env", "runs", "speedup_vs_compiled_torch", "method", "grad_accum",
                "steps", "model", "seq_len"):
        assert key in rec, key
    assert rec["model"] == "tiny" and rec["seq_len"] == 64
    assert {"torch", "triton", "python"} <= set(rec["versions"])
    assert sorted(r["micro_batch"] for r in rec["runs"]) == [2, 4]
    for r in rec["runs"]:
        assert RUN_KEYS <= set(r), RUN_KEYS - set(r)
        assert r["fits"] is True and r["backend"] == "torch" and r["compile"] is False and r["autotune"] == {}
        assert len(r["step_ms_all"]) == 3 and r["step_ms_median"] > 0 and r["tokens_per_s"] > 0
        tokens = r["micro_batch"] * 64
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["step_ms_median"] / 1e3))
    sp = rec["speedup_vs_compiled_torch"]
    assert sp["best"] is None and "torch+compile" in sp["reason"] and "triton" in sp["reason"]
    # smoke runs never write into bench/results
    assert sorted(p.name for p in (REPO / "bench" / "results").glob("*")) == before


def test_smoke_refuses_to_write_into_results():
    proc = bench("--smoke", "--out-dir", str(REPO / "bench" / "results"))
    assert proc.returncode == 2 and proc.stderr.startswith("error:")


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-GPU refusal; this machine has a CUDA GPU")
def test_refuses_without_gpu_in_one_line():
    proc = bench()
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--smoke" in lines[0], proc.stderr


@pytest.mark.skipif(HAS_CUDA, reason="without a GPU and a record the MFU input is missing")
def test_project_without_record_names_the_missing_input():
    proc = bench("--project", "rtx4070")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--from-record" in lines[0] and "MFU" in lines[0]


def test_project_arithmetic(tmp_path):
    runs = [
        {"name": "torch+compile", "backend": "torch", "compile": True, "micro_batch": 8, "fits": True,
         "tokens_per_s": 4.0e5, "mfu": 0.45},
        {"name": "triton+compile", "backend": "triton", "compile": True, "micro_batch": 8, "fits": True,
         "tokens_per_s": 3.5e5, "mfu": 0.3917},
        {"name": "triton+compile", "backend": "triton", "compile": True, "micro_batch": 16, "fits": True,
         "tokens_per_s": 3.9e5, "mfu": 0.4321},
        {"name": "triton+compile", "backend": "triton", "compile": True, "micro_batch": 32, "fits": True,
         "tokens_per_s": 4.1e5, "mfu": 0.45},  # measured on a bigger card: more than a 4070 holds
        {"name": "triton", "backend": "triton", "compile": False, "micro_batch": 64, "fits": False, "mfu": None},
    ]
    path = tmp_path / "rec.json"
    path.write_text(json.dumps({"env": {"device": "Fake GPU 9000"}, "runs": runs}))
    proc = bench("--project", "rtx4070", "--from-record", str(path))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "PROJECTION, NOT A MEASUREMENT" in out and "projection, not a measurement" in out
    assert "Fake GPU 9000" in out and "NOT on a rtx4070" in out and "REFERENCE.md" in out
    flops = int(re.search(r"flops_per_token\s*=\s*(\d+)", out).group(1))
    # d12: N = 124,439,808 (without the 47 vocab-padding rows), 6N + 6 * 12 * 768 * 1024
    assert flops == 6 * 124_439_808 + 6 * 12 * 768 * 1024
    hours = float(re.search(r"^hours = ([\d.]+)$", out, re.M).group(1))
    # ours (the best triton run's MFU), not the baseline's; without a cap check in the record, at most the
    # micro-batch train_speedrun.py derives for the fused LM head on the 4070 (16 by the memory estimate), not 32
    from tritonrun.memory import fit_preset
    assert fit_preset("rtx4070", "gpt2", "d12", 1024, 524288, "triton")["micro_batch"] == 16
    assert "derives for triton+compile on rtx4070 by the memory estimate, 16: no cap check" in out
    assert hours == pytest.approx(9.0e9 * flops / (58.3e12 * 0.4321) / 3600, rel=1e-5)

    # with the cap check in the record: micro-batch 16 fits, so its MFU is the one the 4070 would see
    path.write_text(json.dumps({"env": {"device": "Fake GPU 9000"}, "runs": runs,
                                "cap": {"preset": "rtx4070", "cap_gib": 12.0,
                                        "largest_fitting": {"triton+compile": 16, "torch+compile": 8}}}))
    proc = bench("--project", "rtx4070", "--from-record", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "fitting the 12.0 GiB cap check in this record: 16" in proc.stdout
    hours = float(re.search(r"^hours = ([\d.]+)$", proc.stdout, re.M).group(1))
    assert hours == pytest.approx(9.0e9 * flops / (58.3e12 * 0.4321) / 3600, rel=1e-5)

    # a config that fitted at no micro-batch under the cap gives no MFU to project from: the next best does
    path.write_text(json.dumps({"env": {"device": "Fake GPU 9000"}, "runs": runs,
                                "cap": {"preset": "rtx4070", "cap_gib": 12.0,
                                        "largest_fitting": {"triton+compile": None, "torch+compile": 8}}}))
    proc = bench("--project", "rtx4070", "--from-record", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "torch+compile micro-batch 8" in proc.stdout
    hours = float(re.search(r"^hours = ([\d.]+)$", proc.stdout, re.M).group(1))
    assert hours == pytest.approx(9.0e9 * flops / (58.3e12 * 0.45) / 3600, rel=1e-5)

    # only micro-batches the 4070 cannot hold: refused, with the rerun that fixes it
    path.write_text(json.dumps({"env": {"device": "Fake GPU 9000"}, "runs": runs[3:]}))
    proc = bench("--project", "rtx4070", "--from-record", str(path))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--micro-batches 16" in lines[0], proc.stderr


def test_speedups_and_buckets():
    m = load_module()

    def run(name, backend, comp, mb, tok):
        return {"name": name, "backend": backend, "compile": comp, "micro_batch": mb, "fits": True,
                "tokens_per_s": tok}

    runs = [run("triton", "triton", False, 8, 90.0), run("triton+compile", "triton", True, 8, 120.0),
            run("torch+compile", "torch", True, 8, 100.0), run("torch", "torch", False, 8, 70.0),
            run("triton+compile", "triton", True, 16, 130.0), run("torch+compile", "torch", True, 16, 125.0),
            {"name": "torch+compile", "backend": "torch", "compile": True, "micro_batch": 64, "fits": False,
             "tokens_per_s": None}]
    sp = m.speedups(runs)
    assert sp["per_micro_batch"]["8"]["speedup"] == pytest.approx(1.2)
    assert sp["per_micro_batch"]["8"]["ours"] == "triton+compile"
    assert sp["per_micro_batch"]["16"]["speedup"] == pytest.approx(130 / 125)
    assert sp["best"]["micro_batch"] == 8 and sp["best_overall"]["speedup"] == pytest.approx(130 / 125)
    assert "64" in sp["missing"]
    cases = {"_attn_fwd": "attention", "flash_fwd_kernel": "attention", "_lce_bwd_dw_kernel": "classifier",
             "triton_red_fused__log_softmax_0": "classifier", "_adamw_kernel": "optimizer",
             "_finalize_norm_kernel": "optimizer", "sm90_xmma_gemm_bf16bf16_bf16f32": "matmul",
             "nvjet_tst_128x256_64x4": "matmul", "_ln_fwd_kernel": "norms",
             "triton_per_fused_native_layer_norm_3": "norms", "_gelu_bwd_kernel": "gelu",
             "triton_poi_fused_gelu_4": "gelu", "vectorized_elementwise_kernel": "other",
             # Inductor fuses the bias add of an addmm into the pointwise kernel after it: not a matmul
             "triton_poi_fused_addmm_gelu_view_3": "gelu",
             "triton_per_fused_add_addmm_native_layer_norm_7": "norms",
             "ampere_bf16_s16816gemm_bf16_128x128_ldg8_f2f_stages_64x3_tn": "matmul"}
    for name, kind in cases.items():
        assert m.bucket_of(name) == kind, name


def test_kernel_split_counts_each_kernel_once():
    """GPU user annotations (optimizer step / compiled-graph ranges on the device timeline) span the kernels
    inside them: counted, they would double the total. CPU events are not kernels."""
    from types import SimpleNamespace

    m = load_module()
    CUDA, CPU = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU

    def ev(name, us, device=CUDA, annotation=False):
        return SimpleNamespace(name=name, device_time_total=us, device_type=device, is_user_annotation=annotation)

    events = [ev("sm90_xmma_gemm_bf16bf16_bf16f32", 400.0), ev("_adamw_kernel", 100.0),
              ev("Optimizer.step#FusedAdamW.step", 100.0, annotation=True),
              ev("## Call CompiledFxGraph fabc ##", 500.0, annotation=True),
              ev("triton_poi_fused_addmm_gelu_view_3", 50.0), ev("sm90_xmma_gemm_bf16bf16_bf16f32", 200.0),
              ev("aten::mm", 9999.0, device=CPU)]
    split, top = m.kernel_split(events, [k for k, _ in m.BUCKETS] + ["other"])
    assert split == pytest.approx({"attention": 0.0, "classifier": 0.0, "optimizer": 0.1, "matmul": 0.6,
                                   "norms": 0.0, "gelu": 0.05, "other": 0.0})
    assert top == pytest.approx({"sm90_xmma_gemm_bf16bf16_bf16f32": 0.6, "_adamw_kernel": 0.1,
                                 "triton_poi_fused_addmm_gelu_view_3": 0.05})


def test_a_stopped_run_keeps_what_it_measured(tmp_path, monkeypatch):
    """The record is rewritten after every micro-batch group: a run stopped by a time limit in the middle of
    the sweep leaves the groups it finished, marked complete: false."""
    m = load_module()
    real, done = m.sweep_group, []

    def sweep_then_stop(specs, *rest):
        if done:
            raise KeyboardInterrupt  # the time limit arrives during the second micro-batch
        done.append(specs[0].micro_batch)
        return real(specs, *rest)

    monkeypatch.setattr(m, "sweep_group", sweep_then_stop)
    assert m.main(["--smoke", "--out-dir", str(tmp_path)]) == 130  # SIGINT: exit 130, the record kept
    [path] = tmp_path.glob("train-*.json")
    rec = json.loads(path.read_text())
    assert rec["complete"] is False and done == [2]
    assert [(r["name"], r["micro_batch"]) for r in rec["runs"]] == [("torch", 2)] and rec["runs"][0]["fits"]
    assert not list(tmp_path.glob("*.md"))  # the summary comes with the complete record only


def test_sigint_inside_a_group_keeps_its_timed_steps(tmp_path, monkeypatch):
    """.ci/gpu's deadline (SIGINT) in the middle of a group's timed steps (one micro-batch is all the budgeted
    check times): the steps timed so far become runs marked "interrupted", the record is written, exit 130."""
    m = load_module()
    real, calls = m.timed_step, []

    def timed_then_stop(tr, step):
        calls.append(step)
        if len(calls) > 4:
            raise KeyboardInterrupt
        return real(tr, step)

    monkeypatch.setattr(m, "timed_step", timed_then_stop)
    assert m.main(["--smoke", "--micro-batches", "2", "--steps", "20", "--block", "2", "--backend", "torch",
                   "--out-dir", str(tmp_path)]) == 130
    rec = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    [run] = rec["runs"]
    assert rec["complete"] is False and run["name"] == "torch" and len(run["step_ms_all"]) == 4
    assert run["interrupted"] == "stopped by SIGINT after 4 of 20 timed steps"


def test_configs_picks_configurations_by_name(tmp_path):
    m = load_module()
    got = m.sweep_configs(["torch", "triton"], [True, False], [], ["triton", "triton+compile", "torch+compile"])
    assert [c[0] for c in got] == ["triton", "triton+compile", "torch+compile"]
    proc = bench("--smoke", "--configs", "triton,torch+eager", "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
        "error: --configs: unknown configuration torch+eager: choose from triton, triton+compile, torch+compile, "
        "torch")
    assert not list(tmp_path.iterdir())


def test_torch_ops_variants_are_triton_configs_named_by_their_ops():
    m = load_module()
    got = m.sweep_configs(["torch", "triton"], [True, False], ["linear_cross_entropy", "attention,gelu"])
    assert [c[:3] for c in got[:4]] == [tuple(c) for c in m.CONFIGS] and all(c[3] == "" for c in got[:4])
    assert got[4:] == [("triton (torch: linear_cross_entropy)", "triton", False, "linear_cross_entropy"),
                       ("triton+compile (torch: linear_cross_entropy)", "triton", True, "linear_cross_entropy"),
                       ("triton (torch: attention,gelu)", "triton", False, "attention,gelu"),
                       ("triton+compile (torch: attention,gelu)", "triton", True, "attention,gelu")]
    assert m.sweep_configs(["torch"], [False], []) == [("torch", "torch", False, "")]


@NEEDS_INTERPRETER
def test_torch_ops_variant_runs_beside_pure_triton(tmp_path):
    """--torch-ops times a triton configuration with those ops in torch in the same round-robin; its record says
    which ops it kept, and it counts as a triton run."""
    proc = bench("--smoke", "--backend", "triton", "--no-compile", "--torch-ops", "linear_cross_entropy,attention",
                 "--micro-batches", "2", "--out-dir", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(next(tmp_path.glob("train-*.json")).read_text())
    pure, variant = rec["runs"]
    assert (pure["name"], pure["torch_ops"]) == ("triton", "")
    assert (variant["name"], variant["torch_ops"]) == ("triton (torch: attention,linear_cross_entropy)",
                                                       "attention,linear_cross_entropy")
    assert all(pure["ops"][name].startswith("triton") for name in GPT2_OPS), pure["ops"]
    assert {k for k, v in variant["ops"].items() if v == "torch (--torch-ops)"} == {"attention", "linear_cross_entropy"}
    assert variant["fits"] and len(variant["step_ms_all"]) == 3


@pytest.mark.parametrize("args,needle", [
    (["--torch-ops", "gelu"], "error: --torch-ops makes variants of the triton configurations: add --backend triton"),
    (["--backend", "triton", "--torch-ops", "gelo"], "error: --torch-ops: unknown op 'gelo': choose from attention"),
])
def test_bad_torch_ops_are_one_line(tmp_path, args, needle):
    proc = bench("--smoke", *args, "--out-dir", str(tmp_path))
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(needle), proc.stderr
    assert not list(tmp_path.glob("train-*"))


def test_no_sweep_needs_something_to_measure(tmp_path):
    proc = bench("--smoke", "--no-sweep", "--out-dir", str(tmp_path))  # smoke: no cap check, no profile
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("error: --no-sweep leaves nothing to measure: add --profile, or a --cap-gib "
                                   "above 0 (on a GPU)")
    assert not list(tmp_path.iterdir())


def test_markdown_of_a_cap_only_record(smoke):
    """--no-sweep records (cap check / profile only, a second command under a time limit) render without a
    sweep table or a speedup line."""
    _, _, rec, _ = smoke
    mod = load_module()
    cap_only = {**rec, "runs": [], "speedup_vs_compiled_torch": mod.speedups([]),
                "cap": {"cap_gib": 12.0, "context_allowance_gib": 0.5, "preset_pass": True,
                        "largest_fitting": {"torch+compile": 16, "triton+compile": 32}}}
    md = mod.markdown(cap_only)
    assert "No sweep in this record" in md and "Speedup" not in md and "| config |" not in md
    assert "the preset's micro-batch fit (peak reserved + 0.5 GiB context <= the card): yes" in md  # older record
    md = mod.markdown({**cap_only, "cap": {**cap_only["cap"], "derived_micro_batch": {"torch+compile": 8}}})
    assert "derived micro-batches (torch+compile 8) fit (peak reserved" in md
    assert "largest fitting micro-batch: torch+compile 16, triton+compile 32" in md

    buckets = [k for k, _ in mod.BUCKETS] + ["other"]
    ms = dict.fromkeys(buckets, 0.0) | {"matmul": 30.0, "attention": 10.0}
    prof = {"micro_batch": 16, "buckets": buckets, "patterns": dict(mod.BUCKETS),
            "configs": {"triton+compile": {"total_kernel_ms": 40.0, "step_ms": 43.5, "ms": ms,
                                           "percent": {k: 100 * v / 40.0 for k, v in ms.items()}},
                        "torch+compile": {"fits": False}}}
    md = mod.markdown({**cap_only, "profile": prof})
    assert "| matmul | 30.00 ms (75%) | OOM |" in md
    assert "| kernels / step wall (profiled) | 40.00 / 43.50 ms | OOM |" in md


def _parts(rec, tmp_path, **edits):
    """The smoke record cut into two parts (micro-batch 2 | micro-batch 4 + a cap check), written as files."""
    clean = {**rec, "env": {**rec["env"], "dirty": False}}
    first = {**clean, "runs": [r for r in rec["runs"] if r["micro_batch"] == 2], "micro_batches": [2]}
    cap = {"cap_gib": 12.0, "alloc_limit_gib": 11.0, "preset_pass": True, "preset": "rtx4070",
           "largest_fitting": {"torch": 4}}
    second = {**clean, "runs": [r for r in rec["runs"] if r["micro_batch"] == 4], "micro_batches": [4],
              "cap": cap, "complete": False, "date": "2099-01-01T00:00:00", **edits}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, part in zip(paths, (first, second)):
        path.write_text(json.dumps(part))
    return paths


def test_merge_joins_parts_of_one_sweep(smoke, tmp_path):
    """A sweep split over time-limited commands: --merge gives one record with every run, the one cap check,
    speedups recomputed over all runs, and the parts listed; the .md says where it came from."""
    _, _, rec, _ = smoke
    paths = _parts(rec, tmp_path)
    proc = bench("--merge", *map(str, paths), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    [path] = (tmp_path / "out").glob("train-*-merged.json")
    merged = json.loads(path.read_text())
    assert [(r["name"], r["micro_batch"]) for r in merged["runs"]] == [("torch", 2), ("torch", 4)]
    assert merged["runs"] == rec["runs"] and merged["micro_batches"] == [2, 4]
    assert merged["cap"]["largest_fitting"] == {"torch": 4} and merged["profile"] is None
    assert merged["complete"] is False and merged["date"] == "2099-01-01T00:00:00"  # a part was cut short
    assert [m["file"] for m in merged["merged_from"]] == ["a.json", "b.json"]
    assert merged["speedup_vs_compiled_torch"] == load_module().speedups(rec["runs"])
    md = path.with_suffix(".md").read_text()
    assert "Merged from `a.json`, `b.json` (incomplete)." in md and "| torch | 4 |" in md


@pytest.mark.parametrize("what,edits,needle", [
    ("measurement", {"steps": 99}, "differ in steps (99 vs 3)"),
    ("device", {"device": "NVIDIA H100"}, "differ in device"),
    ("dirty tree", "dirty", "measured a modified tree"),
    ("same run twice", "dup", "torch at micro-batch 2 is in both a.json and b.json"),
    ("two cap checks", "cap", "more than one record holds a cap: a.json, b.json"),
])
def test_merge_refuses_parts_that_do_not_belong_together(smoke, tmp_path, what, edits, needle):
    _, _, rec, _ = smoke
    paths = _parts(rec, tmp_path, **(edits if isinstance(edits, dict) else {}))
    if isinstance(edits, str):
        a, b = (json.loads(p.read_text()) for p in paths)
        if edits == "dirty":
            b["env"]["dirty"] = True
        elif edits == "dup":
            b["runs"] += a["runs"]
        else:
            a["cap"] = b["cap"]
        paths[0].write_text(json.dumps(a))
        paths[1].write_text(json.dumps(b))
    proc = bench("--merge", *map(str, paths), "--out-dir", str(tmp_path / "out"))
    assert proc.returncode == 2 and proc.stdout == "", what
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --merge: ") and needle in lines[0], proc.stderr
    assert not (tmp_path / "out").exists()
