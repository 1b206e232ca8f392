"""train_speedrun.py end to end on CPU: tiny model, built-in sample corpus, real subprocesses."""
import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonrun import train as train_speedrun
from tritonrun import training
from tritonrun.presets import mfu_peak_info
from tritonrun.recipes.gpt2 import lr_at
from tritonrun.runs import human_count
from tritonrun.data.shards import write_shard
from tritonrun.gpt2.checkpoint import save_checkpoint
from tritonrun.gpt2.ops import GPT2_OPS
from tests.helpers import NEEDS_INTERPRETER, one_thread_env

REPO = Path(__file__).resolve().parents[1]
# Small and fast: 2 micro-batches of 4 x 64 tokens per step.
SMALL = ["--gpu", "cpu", "--model", "tiny", "--data", "sample", "--micro-batch", "4", "--seq-len", "64",
         "--total-batch-tokens", "512", "--val-tokens", "2048", "--warmup-steps", "5"]


def run_cli(*args, timeout=600):
    return subprocess.run([sys.executable, "train_speedrun.py", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=timeout, env=one_thread_env())


def assert_user_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one error line, got:\n{proc.stderr}"
    assert lines[0].startswith("error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def run30(tmp_path_factory):
    out = tmp_path_factory.mktemp("run30")
    proc = run_cli(*SMALL, "--max-steps", 30, "--val-every", 10, "--target-val-loss", 0, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out, proc


def test_30_steps_loss_falls_and_records_are_complete(run30):
    out, proc = run30
    result = json.loads((out / "result.json").read_text())
    losses = result["train_losses"]
    assert len(losses) == 30 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(50257)) < 1.0  # starts near uniform
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0, losses
    assert [v["step"] for v in result["val"]] == [10, 20, 30]
    assert result["val"][-1]["loss"] < result["val"][0]["loss"]
    assert result["final_val_loss"] == result["val"][-1]["loss"]
    assert result["status"] == "max_steps" and result["target_reached"] is False
    assert result["steps_done"] == 30 and result["tokens_seen"] == 30 * 512
    assert result["train_time_s"] > 0 and result["tokens_per_s"] > 0 and result["peak_mem_gib"] > 0
    assert result["config"]["model"] == "tiny" and result["grad_accum"] == 2
    for key in ("commit", "dirty", "python", "torch", "triton", "device"):
        assert key in result["env"]
    step = result["steps"][0]
    assert set(step) == {"step", "loss", "grad_norm", "lr", "ms", "tokens_per_s", "mfu", "peak_mem_gib",
                         "peak_reserved_gib", "skipped"}
    # on CPU: no reserved pool, no card to fit, no MFU peak (the cpu preset has none)
    assert step["peak_reserved_gib"] is None and result["peak_reserved_gib"] is None
    assert result["memory_fit"] is None and result["mfu_peak"] is None
    assert result["leaderboard_row"].startswith("| ") and result["leaderboard_row"].count("|") == 14
    assert "| 15.4K |" in result["leaderboard_row"]  # 30 x 512 tokens
    assert result["leaderboard_row"] in proc.stdout.splitlines()[-1]
    assert (out / "leaderboard.md").read_text().splitlines()[-1] == result["leaderboard_row"]


def test_log_begins_with_version_device_and_config(run30):
    out, _ = run30
    lines = (out / "train.log").read_text().splitlines()
    assert lines[1].startswith("commit ")
    assert lines[2].startswith("python ") and "torch" in lines[2] and "triton" in lines[2]
    assert lines[3].startswith("device ")
    text = "\n".join(lines)
    assert "config:" in text and "micro_batch" in text and "ops:" in text
    steps = [ln for ln in lines if ln.startswith("step ")]
    assert len(steps) == 30
    for field in ("loss", "norm", "lr", "ms", "tok/s", "MFU", "mem"):
        assert field in steps[0]
    assert "MFU: n/a (no peak: pass --peak-tflops)" in lines


def test_loss_plot_is_written(run30):
    pytest.importorskip("matplotlib", reason="loss.png needs matplotlib (pip install -e '.[test]' has it)")
    out, _ = run30
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert json.loads((out / "result.json").read_text())["plot"] == str(out / "loss.png")


def test_finished_run_leaves_a_checkpoint_sample_py_reads(run30, capsys):
    """The CPU preset checkpoints only at the end (--checkpoint-every 0): a finished run still leaves its
    weights, so README's `python sample.py --checkpoint RUN` works on the smoke run."""
    from tests.helpers import load_script

    out, _ = run30
    assert [p.name for p in out.glob("ckpt_*.pt")] == ["ckpt_00000030.pt"]
    sample = load_script("sample.py", "sample_for_run30")
    assert sample.main(["--checkpoint", str(out), "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip()


# The triton backend runs every kernel through Triton's interpreter here: keep its runs tiny.
TINY = ["--micro-batch", "2", "--seq-len", "32", "--total-batch-tokens", "64", "--val-tokens", "64"]


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=NEEDS_INTERPRETER)])
def test_compile_matches_eager(tmp_path, backend):
    """--compile traces the model and the ops behind the seam (custom ops) and trains the same numbers.
    The subprocesses get no TRITON_INTERPRET: the trainer must set it itself, as for a user on CPU."""
    env = one_thread_env(drop=("TRITON_INTERPRET",))
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        proc = subprocess.run([sys.executable, "train_speedrun.py", *SMALL, *TINY, "--backend", backend, flag,
                               "--max-steps", "2", "--val-every", "2", "--timing-warmup-steps", "0",
                               "--out-dir", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = json.loads((out / "result.json").read_text())
        assert result["config"]["compile"] == (flag == "--compile")
        if backend == "triton":
            assert all(result["ops"][name].startswith("triton") for name in GPT2_OPS), result["ops"]
        assert result["autotune"] == {}  # the interpreter runs the tables: nothing to record
        losses[flag] = result["train_losses"] + [result["final_val_loss"]]
    assert losses["--compile"] == pytest.approx(losses["--no-compile"], rel=1e-4)


def test_eval_only_scores_imported_weights(tmp_path):
    """--init-from hf:DIR --eval-only: val loss (and HellaSwag) of those weights, no training."""
    from tritonrun.data.hellaswag import Example, write_examples
    from tritonrun.data.loader import ShardLoader
    from tritonrun.data.sample import prepare_sample
    from tritonrun.gpt2 import GPT, MODEL_SIZES
    from tritonrun.gpt2.hf import save_hf

    torch.manual_seed(3)
    model = GPT(MODEL_SIZES["tiny"])
    save_hf(model, tmp_path / "hf")
    write_examples(tmp_path / "hs.bin", [Example.of([1, 2, 3], [[4], [5, 6], [7], [8, 9, 10]], 2)] * 3)
    out = tmp_path / "o"
    proc = run_cli(*SMALL, "--init-from", f"hf:{tmp_path / 'hf'}", "--eval-only", "--hellaswag-path",
                   tmp_path / "hs.bin", "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "result.json").read_text())
    assert result["status"] == "eval_only" and result["steps"] == [] and len(result["val"]) == 1
    assert result["hellaswag"][0]["n"] == 3
    # the same number computed here: mean loss over the first --val-tokens of the val shard
    loader = ShardLoader(sorted(prepare_sample().glob("*_val_*.bin")), 4, 64)
    with torch.no_grad():
        want = sum(model(*loader.next_batch()).item() for _ in range(2048 // 256)) / (2048 // 256)
    assert result["final_val_loss"] == pytest.approx(want, rel=1e-5)
    assert_user_error(run_cli(*SMALL, "--eval-only", "--resume", "--out-dir", out), "--init-from ckpt:")
    # without weights it would score a random init: refused, nothing written
    assert_user_error(run_cli(*SMALL, "--eval-only", "--out-dir", tmp_path / "none"), "needs weights to score",
                      "--init-from ckpt:")
    assert not (tmp_path / "none").exists()
    assert "not with --resume" in " ".join(run_cli("--help").stdout.split())


def test_high_target_stops_at_first_validation(tmp_path):
    proc = run_cli(*SMALL, "--max-steps", 50, "--val-every", 4, "--target-val-loss", 100, "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["target_reached"] is True and result["target_reached_step"] == 4
    assert result["steps_done"] == 4 and result["status"] == "target_reached"
    assert "| yes |" in result["leaderboard_row"]


def test_warmup_then_reset_equals_a_run_without_warmup(tmp_path):
    records = []
    for warm in (0, 2):
        out = tmp_path / f"warm{warm}"
        proc = run_cli(*SMALL, "--max-steps", 2, "--val-every", 100, "--timing-warmup-steps", warm,
                       "--out-dir", out)
        assert proc.returncode == 0, proc.stderr
        records.append(json.loads((out / "result.json").read_text()))
    cold, warm = records
    # bitwise: same weights, optimizer state and data position after the reset
    assert warm["train_losses"] == cold["train_losses"]
    assert [s["grad_norm"] for s in warm["steps"]] == [s["grad_norm"] for s in cold["steps"]]
    assert warm["final_val_loss"] == cold["final_val_loss"]


@pytest.mark.parametrize("device_name, preset, peak", [
    ("NVIDIA GeForce RTX 4070", "rtx4070", 58.3),
    ("NVIDIA GeForce RTX 4070 SUPER", "rtx4070", 71.0),
    ("NVIDIA GeForce RTX 4070 Ti", "rtx4070ti", 80.2),
    ("NVIDIA GeForce RTX 4070 Ti SUPER", "rtx4070ti", 88.2),
    ("NVIDIA GeForce RTX 3090", "rtx3090", 71.0),
    ("NVIDIA GeForce RTX 3090 Ti", "rtx3090", 80.0),
    ("NVIDIA H100 80GB HBM3", "h100", 989.0),
    ("NVIDIA H100 PCIe", "h100", 756.0),
    ("NVIDIA H100 NVL", "h100", 835.0),
    ("NVIDIA H200", "h200", 989.0),
    ("NVIDIA H200 NVL", "h200", 835.0),
    (None, "cpu", None),  # no CUDA
    ("NVIDIA GeForce RTX 4070 Laptop GPU", None, None),
    ("NVIDIA GeForce RTX 4080", None, None),
])
def test_gpu_auto_picks_the_preset_and_peak_by_device_name(monkeypatch, tmp_path, device_name, preset, peak):
    """Config resolution on a GPU, faked on CPU (it reads only is_available and the device name). MFU divides by
    the running GPU's peak: an H100 PCIe (756) or NVL (835) under the h100 preset would otherwise be measured
    against the SXM's 989 and read 15-24% low, an RTX 4070 SUPER against the 4070's 58.3 and read 22% high. A
    laptop part matches a desktop name but not its memory or clocks, and a card without a preset is not guessed:
    both are one error naming the flags to pass."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: device_name is not None)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device_name)
    argv = ["--gpu", "auto", "--out-dir", str(tmp_path / "run")]
    if preset is None:
        with pytest.raises(train_speedrun.UserError, match=r"--gpu auto .* pass the closest preset"):
            train_speedrun.resolve_config(argv)
        return
    cfg, _ = train_speedrun.resolve_config(argv)
    assert (cfg.gpu, cfg.peak_tflops) == (preset, peak)


@pytest.mark.parametrize("device_name,flags,text", [
    ("NVIDIA H200", [], "MFU vs rtx4070 peak 58.3 TFLOPS (preset), device NVIDIA H200: not this device's peak "
                        "(h200 989 TFLOPS: --peak-tflops 989 measures against it)"),
    ("NVIDIA H200", ["--peak-tflops", "989"], "MFU vs 989 TFLOPS (--peak-tflops), device NVIDIA H200"),
    ("NVIDIA GeForce RTX 4070", [], "MFU vs rtx4070 peak 58.3 TFLOPS (preset), device NVIDIA GeForce RTX 4070"),
    ("NVIDIA GeForce RTX 4070 SUPER", [], "MFU vs rtx4070 peak 71 TFLOPS (preset), device NVIDIA GeForce RTX 4070 "
                                          "SUPER"),
    ("NVIDIA GeForce RTX 4080", [], "MFU vs rtx4070 peak 58.3 TFLOPS (preset), device NVIDIA GeForce RTX 4080: not "
                                    "this device's peak (pass --peak-tflops for it)"),
])
def test_mfu_says_which_peak_it_is_of(monkeypatch, tmp_path, device_name, flags, text):
    """`--gpu rtx4070` on a bigger GPU divides by the 4070's 58.3 TFLOPS: the log line and the record's mfu_peak
    say whose peak it is, the device that ran, and that device's own peak (faked device name, on CPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: device_name)
    cfg, _ = train_speedrun.resolve_config(["--gpu", "rtx4070", "--out-dir", str(tmp_path), *flags])
    info = mfu_peak_info(cfg, device_name)
    assert info["text"] == text and info["peak_tflops"] == cfg.peak_tflops and info["device"] == device_name
    assert info["source"] == ("--peak-tflops" if flags else "preset")
    if device_name == "NVIDIA H200":
        assert (info["device_preset"], info["device_peak_tflops"]) == ("h200", 989.0)


def test_memory_fit_rule_and_cap_fraction(monkeypatch):
    """Fit = peak RESERVED + the CUDA context allowance within the card (the budget, or the device when smaller);
    the allocator cap leaves the context out of the budget, also on a real 4070 (11.99 GiB: the fraction used to
    be 1.0 there, capping nothing). Peak reserved comes from the CUDA allocator (faked here)."""
    ctx = training.CUDA_CONTEXT_GIB
    assert ctx == 0.5
    gib = 2**30
    assert training.allocator_fraction(12, int(11.99 * gib)) == pytest.approx(11.5 / 11.99)
    assert training.allocator_fraction(12, 141 * gib) == pytest.approx(11.5 / 141)
    assert training.allocator_fraction(0, 141 * gib) == 1.0
    fit = training.memory_fit(11.4, 12, 139.8)
    assert fit["fits"] and fit["card_gib"] == 12 and fit["needed_gib"] == pytest.approx(11.9)
    assert not training.memory_fit(11.6, 12, 139.8)["fits"]  # allocated may be far lower: reserved is what counts
    assert training.memory_fit(11.45, 12, 11.99)["fits"] and not training.memory_fit(11.5, 12, 11.99)["fits"]
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: 3 * gib)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 2 * gib)
    cuda = torch.device("cuda", 0)
    assert training.peak_reserved_gib(cuda) == 3.0 and training.peak_memory_gib(cuda) == 2.0
    assert training.peak_reserved_gib(torch.device("cpu")) is None


def test_resume_on_gpus_resolves_hardware_fields(tmp_path, monkeypatch):
    """Config resolution on a GPU, faked on CPU (it reads only is_available and the device name): a run started
    on an H100 PCIe (peak 756) and resumed on an SXM part gets 989; `--resume --gpu auto` on the checkpoint's
    own GPU keeps the checkpoint's hardware fields (micro-batch, compile) instead of the preset's; on other hardware
    the micro-batch is derived again for that card's memory; a peak the user set survives the resume."""
    from tritonrun.memory import fit_preset

    name = ["NVIDIA H100 PCIe"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: name[0])
    resolve = train_speedrun.resolve_config

    def start(out, *flags):
        cfg, _ = resolve(["--out-dir", str(out), "--recipe", "speedrun-dense", "--micro-batch", "16", "--no-compile",
                          *flags])
        out.mkdir()
        save_checkpoint(out, 10, {"run_config": asdict(cfg), "model_kind": "speedrun-dense"})
        return cfg

    cfg = start(tmp_path / "a")
    assert (cfg.gpu, cfg.peak_tflops, cfg.micro_batch, cfg.compile) == ("h100", 756.0, 16, False)
    name[0] = "NVIDIA H100 80GB HBM3"
    for flags in ([], ["--gpu", "auto"], ["--gpu", "h100"]):
        cfg, path = resolve(["--resume", "--out-dir", str(tmp_path / "a"), *flags])
        assert path is not None and (cfg.gpu, cfg.peak_tflops, cfg.micro_batch, cfg.compile) == \
            ("h100", 989.0, 16, False), flags
    # other hardware: its preset's fields, and the micro-batch sized anew for its memory (the estimate's pick)
    cfg, _ = resolve(["--resume", "--out-dir", str(tmp_path / "a"), "--gpu", "h200"])
    h200 = fit_preset("h200", "speedrun-dense", "d12", 1024, 524288, "torch")["micro_batch"]
    assert (cfg.gpu, cfg.micro_batch, cfg.compile) == ("h200", h200, True) and h200 > 16

    name[0] = "NVIDIA H100 PCIe"
    start(tmp_path / "b", "--peak-tflops", "500")
    name[0] = "NVIDIA H100 80GB HBM3"
    cfg, _ = resolve(["--resume", "--out-dir", str(tmp_path / "b")])
    assert cfg.peak_tflops == 500.0


def test_torch_ops_resolve_and_resume(tmp_path):
    """--torch-ops is a hardware field: canonical order in the config, free to change on resume, cleared when a
    resumed run switches to --backend torch; a checkpoint from before the field existed resumes with the
    preset's value."""
    resolve = train_speedrun.resolve_config
    cfg, _ = resolve([*SMALL, "--backend", "triton", "--torch-ops", "linear_cross_entropy,attention",
                      "--out-dir", str(tmp_path / "a")])
    assert cfg.torch_ops == "attention,linear_cross_entropy"
    (tmp_path / "a").mkdir()
    save_checkpoint(tmp_path / "a", 10, {"run_config": asdict(cfg)})
    resumed = lambda *flags: resolve(["--resume", "--out-dir", str(tmp_path / "a"), *flags])[0]  # noqa: E731
    assert resumed().torch_ops == "attention,linear_cross_entropy"
    assert resumed("--torch-ops", "gelu").torch_ops == "gelu"
    assert (resumed("--backend", "torch").backend, resumed("--backend", "torch").torch_ops) == ("torch", "")
    old = {k: v for k, v in asdict(cfg).items() if k != "torch_ops"}  # written before --torch-ops existed
    (tmp_path / "old").mkdir()
    save_checkpoint(tmp_path / "old", 10, {"run_config": old})
    cfg, _ = resolve(["--resume", "--out-dir", str(tmp_path / "old")])
    assert (cfg.backend, cfg.torch_ops) == ("triton", "")


@NEEDS_INTERPRETER
def test_torch_ops_run_in_torch_and_are_recorded(tmp_path):
    """A triton run that keeps attention and the LM head in torch: the placement, the config and the
    leaderboard row say so."""
    proc = run_cli(*SMALL, *TINY, "--backend", "triton", "--torch-ops", "attention,linear_cross_entropy",
                   "--max-steps", "1", "--val-every", "1", "--timing-warmup-steps", "0", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["config"]["torch_ops"] == "attention,linear_cross_entropy"
    kept = {"attention", "linear_cross_entropy"}
    assert {k for k, v in result["ops"].items() if v == "torch (--torch-ops)"} == kept
    assert all(result["ops"][k].startswith("triton") for k in GPT2_OPS if k not in kept)
    assert "| triton (torch: attention,linear_cross_entropy) |" in (tmp_path / "leaderboard.md").read_text()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: GPU presets resolve only on a GPU")
def test_config_takes_the_running_gpus_peak():
    cfg, _ = train_speedrun.resolve_config(["--out-dir", "unused"])
    assert cfg.peak_tflops == train_speedrun.peak_tflops_for(cfg.gpu, torch.cuda.get_device_name())
    cfg, _ = train_speedrun.resolve_config(["--peak-tflops", "500", "--out-dir", "unused"])
    assert cfg.peak_tflops == 500.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the memory cap is a CUDA allocator setting")
def test_memory_cap_is_set_and_lifted_per_trainer():
    """--memory-gib caps the process's CUDA allocator; a later Trainer without a cap (bench/train.py builds
    many in one process) lifts it instead of inheriting it."""
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        for gib, want in ((2.0, (2.0 - training.CUDA_CONTEXT_GIB) * 2**30 / total), (0.0, 1.0)):
            cfg, _ = train_speedrun.resolve_config(
                ["--gpu", "auto", "--recipe", "gpt2", "--model", "tiny", "--data", "sample", "--micro-batch", "2",
                 "--seq-len", "64", "--total-batch-tokens", "128", "--val-tokens", "128", "--no-compile", "--memory-gib", str(gib),
                 "--out-dir", "unused"])
            train_files, val_file = train_speedrun.open_data(cfg)
            training.Trainer(cfg, train_files, val_file, training.Dist(cfg.device))
            assert torch.cuda.get_per_process_memory_fraction() == pytest.approx(want), gib
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)


def test_lr_schedule_is_llmc():
    cfg, _ = train_speedrun.resolve_config(["--gpu", "cpu", "--lr", "6e-4", "--warmup-steps", "10",
                                           "--max-steps", "110", "--out-dir", "unused"])
    lr = lambda s: lr_at(cfg, s)  # noqa: E731
    assert lr(0) == pytest.approx(6e-5) and lr(9) == pytest.approx(6e-4)
    assert lr(10) == pytest.approx(6e-4) and lr(60) == pytest.approx(3e-4)
    assert lr(110) == pytest.approx(0.0, abs=1e-12)


def test_presets_are_data_and_flags_override():
    assert set(train_speedrun.PRESETS) == {"rtx4070", "rtx4070ti", "rtx4090", "rtx3090", "a100", "h100",
                                           "h200", "cpu"}
    for name, p in train_speedrun.PRESETS.items():
        if name != "cpu":
            assert (p.device, p.dtype, p.compile, p.memory_gib > 0, p.sm_count > 0) == ("cuda", "bf16", True, True,
                                                                                     True), name
    from tritonrun.defaults import RUN_DEFAULTS, SMOKE_DEFAULTS
    assert (RUN_DEFAULTS["total_batch_tokens"], RUN_DEFAULTS["model"], RUN_DEFAULTS["seq_len"]) == (524_288, "d12",
                                                                                                 1024)
    assert SMOKE_DEFAULTS["total_batch_tokens"] % (SMOKE_DEFAULTS["micro_batch"] * SMOKE_DEFAULTS["seq_len"]) == 0
    cfg, _ = train_speedrun.resolve_config(["--gpu", "cpu", "--micro-batch", "2", "--lr", "1e-3",
                                           "--no-compile", "--out-dir", "x"])
    assert (cfg.micro_batch, cfg.lr, cfg.compile, cfg.model) == (2, 1e-3, False, "tiny")
    assert cfg.grad_accum == 1024 // (2 * 128)


# ------------------------------------------------------------------------------------- user errors
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message; this machine has CUDA")
def test_gpu_preset_without_cuda(tmp_path):
    assert_user_error(run_cli("--gpu", "rtx4070", "--out-dir", tmp_path), "needs a CUDA GPU",
                      "--gpu cpu --model tiny --data sample")


def test_missing_data_dir(tmp_path):
    assert_user_error(run_cli(*SMALL, "--data", tmp_path / "nope", "--out-dir", tmp_path / "o"),
                      "no such directory", "--data sample")


def test_data_dir_without_shards_prints_the_fetch_command(tmp_path):
    (tmp_path / "d").mkdir()
    assert_user_error(run_cli(*SMALL, "--data", tmp_path / "d", "--out-dir", tmp_path / "o"),
                      "_train_", "_val_", "--data sample",
                      f"`python -m tritonrun.data.fineweb --out-dir {tmp_path / 'd'}`", "--download")


def _hub_env(tmp_path, url):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1", NO_PROXY="127.0.0.1",
               no_proxy="127.0.0.1")
    return env


def test_download_flag_fetches_the_shards_then_trains(tmp_path):
    """--download runs the printed fetch command for real (huggingface_hub against a local stand-in hub)."""
    from tritonrun.data import fineweb
    from tests.hubserver import HubServer

    with HubServer() as hub:
        rng = np.random.default_rng(0)
        made = tmp_path / "made"
        made.mkdir()
        for i in range(fineweb.DEFAULT_TRAIN_SHARDS + 1):  # what the default command fetches: val + 99 train
            name = fineweb.shard_name(i)
            write_shard(made / name, rng.integers(0, 50257, 3000 if i == 0 else 700))
            hub.add(fineweb.DOWNLOAD_REPO, name, (made / name).read_bytes())
        data = tmp_path / "fineweb10B"
        proc = subprocess.run([sys.executable, "train_speedrun.py", *SMALL[:-4], "--data", str(data), "--download",
                               "--max-steps", "1", "--val-tokens", "1024", "--out-dir", str(tmp_path / "o")],
                              cwd=REPO, capture_output=True, text=True, timeout=600, env=_hub_env(tmp_path, hub.url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"--download: python -m tritonrun.data.fineweb --out-dir {data}" in proc.stdout
    assert len(list(data.glob("fineweb_train_*.bin"))) == fineweb.DEFAULT_TRAIN_SHARDS
    assert json.loads((tmp_path / "o" / "result.json").read_text())["steps_done"] == 1


def test_download_flag_with_dead_hub_is_one_error_line(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = tmp_path / "fineweb10B"
    proc = subprocess.run([sys.executable, "train_speedrun.py", *SMALL, "--data", str(data), "--download",
                           "--out-dir", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=_hub_env(tmp_path, f"http://127.0.0.1:{port}"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2  # the fetcher's own line (what broke) and the trainer's (how to retry)
    assert "--download into" in errors[1] and "python -m tritonrun.data.fineweb" in errors[1]
    assert not list(data.glob("*.bin"))


def test_hellaswag_runs_every_n_steps_and_lands_in_records(tmp_path):
    from tritonrun.data.hellaswag import Example, write_examples

    rng = np.random.default_rng(0)
    examples = [Example.of(rng.integers(0, 50257, 5).tolist(),
                           [rng.integers(0, 50257, 1 + k).tolist() for k in range(4)], int(rng.integers(4)))
                for _ in range(6)]
    path = tmp_path / "hs.bin"
    write_examples(path, examples)
    out = tmp_path / "o"
    proc = run_cli(*SMALL, "--max-steps", 4, "--val-every", 100, "--hellaswag-every", 2, "--hellaswag-path", path,
                   "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    hs = json.loads((out / "result.json").read_text())["hellaswag"]
    assert [h["step"] for h in hs] == [2, 4] and all(h["n"] == 6 for h in hs)
    assert all(0 <= h["acc"] <= 1 and 0 <= h["acc_norm"] <= 1 for h in hs)
    assert "hellaswag step     2 | acc" in (out / "train.log").read_text()


def test_bad_shard_names_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_shard(d / "x_val_000000.bin", list(range(5000)))
    bad = d / "x_train_000001.bin"
    write_shard(bad, list(range(5000)))
    with open(bad, "r+b") as f:
        f.write((12345).to_bytes(4, "little"))
    assert_user_error(run_cli(*SMALL, "--data", d, "--out-dir", tmp_path / "o"), str(bad), "magic")


@pytest.mark.parametrize("args,needle", [
    (["--micro-batch", "abc"], "invalid int value"),
    (["--micro-batch", "0"], "--micro-batch must be positive"),
    (["--total-batch-tokens", "1000"], "not a multiple of micro-batch x seq-len"),
    (["--seq-len", "300"], "exceeds model tiny's context"),
    (["--lr", "-1"], "--lr must be a positive"),
    (["--gpu", "tpu"], "invalid choice"),
    (["--val-tokens", "100"], "less than one micro-batch"),
    (["--val-tokens", "1000000"], "lower --val-tokens"),
    (["--backend", "triton", "--torch-ops", "attention,gelu2"], "--torch-ops: unknown op 'gelu2': choose from"),
    (["--torch-ops", "attention"], "applies to --backend triton"),
])
def test_bad_flag_values(tmp_path, args, needle):
    assert_user_error(run_cli(*SMALL, *args, "--out-dir", tmp_path / "o"), needle)


def test_out_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a dir")
    assert_user_error(run_cli(*SMALL, "--out-dir", blocker / "run"), "not writable", "--out-dir")


def test_out_dir_with_a_previous_run_is_not_overwritten(run30):
    out, _ = run30
    before = (out / "result.json").read_bytes(), (out / "train.log").read_bytes()
    assert_user_error(run_cli(*SMALL, "--max-steps", 1, "--out-dir", out), "already holds a run", "--resume")
    assert ((out / "result.json").read_bytes(), (out / "train.log").read_bytes()) == before


def test_cuda_oom_names_the_knobs(monkeypatch, capsys, tmp_path):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.07 GiB")

    monkeypatch.setattr(training, "run", oom)
    rc = train_speedrun.main([*SMALL, "--out-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "out of memory" in err[0] and "--micro-batch" in err[0] and "--seq-len" in err[0]


@pytest.mark.parametrize("n,text", [(0, "0"), (999, "999"), (1000, "1K"), (51_200, "51.2K"), (99_960, "100K"),
                                    (999_999, "1M"), (9_013_559_296, "9.01B"), (123_456_789_012, "123B")])
def test_leaderboard_token_counts_keep_their_scale(n, text):
    assert human_count(n) == text


def test_no_final_checkpoint_writes_none_and_says_so(tmp_path):
    """--no-final-checkpoint (timing runs: the GPU check's main-job steps) finishes without writing one."""
    proc = run_cli(*SMALL, "--max-steps", "2", "--val-every", "2", "--no-final-checkpoint", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not list(tmp_path.glob("ckpt_*.pt"))
    assert "no final checkpoint (--no-final-checkpoint)" in proc.stdout
    assert json.loads((tmp_path / "result.json").read_text())["config"]["final_checkpoint"] is False
