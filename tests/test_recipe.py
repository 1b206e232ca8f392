"""--recipe speedrun-dense (the 2024-11-10 record; --recipe speedrun before the 2024-12-17 one took the name; the
packed windowed recipe is tests/test_recipe_packed.py) end to end on CPU (tiny model, built-in sample corpus): the
run learns and its records name the recipe, the optimizer covers every parameter once, the schedule and Muon momentum are the ones applied,
resume is bitwise after SIGKILL, 2 gloo ranks equal 1 process, --compile equals eager, flags that do not apply
are one error line, and 20 steps of the triton backend follow torch with the record's optimizers."""
import json
import math
import signal
import subprocess
import sys
from dataclasses import fields
from types import SimpleNamespace

import pytest
import torch

from tritonrun import train as train_speedrun
from tritonrun import training
from tritonrun.defaults import run_defaults
from tritonrun.gpt2.checkpoint import list_checkpoints, load_checkpoint
from tritonrun.gpt2.ops import SPEEDRUN_DENSE_OPS as SPEEDRUN_OPS, get_ops
from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS as SPEEDRUN_MODELS, SpeedrunGPT
from tritonrun.recipes import RECIPES, get_recipe
from tests.helpers import (HAS_CUDA, NEEDS_INTERPRETER, hellaswag_by_hand, one_thread_env,
                           random_hellaswag_examples)
from tests.test_resume import start_cli, wait_for
from tests.test_train_cli import REPO, run_cli

SPEEDRUN = ["--recipe", "speedrun-dense", "--gpu", "cpu", "--model", "tiny", "--data", "sample"]
# 2 micro-batches of 2 x 32 tokens per step: the tiny speedrun model's cost is its 50304-row head and wte.
SMALL = [*SPEEDRUN, "--micro-batch", "2", "--seq-len", "32", "--total-batch-tokens", "128", "--val-tokens", "256"]


def result(out) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def run16(tmp_path_factory):
    out = tmp_path_factory.mktemp("speedrun16")
    proc = run_cli(*SPEEDRUN, "--micro-batch", "4", "--seq-len", "64", "--total-batch-tokens", "512",
                   "--val-tokens", "2048", "--max-steps", 16, "--val-every", 8, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def test_speedrun_run_learns_and_records_name_the_recipe(run16):
    rec = result(run16)
    losses = rec["train_losses"]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(50257)) < 1.0  # zero-init head: uniform at the start
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 2.0, losses
    assert rec["val"][-1]["loss"] < rec["val"][0]["loss"]
    assert rec["recipe"] == rec["config"]["recipe"] == "speedrun-dense"
    # the record's recipe on the cpu preset: --lr is a multiplier, no warmup, clip or decay
    assert (rec["config"]["lr"], rec["config"]["warmup_steps"], rec["config"]["grad_clip"],
            rec["config"]["weight_decay"]) == (1.0, 0, 0.0, 0.0)
    assert set(rec["ops"]) == set(SPEEDRUN_OPS)  # only the ops this model calls
    assert "| tiny (speedrun-dense) |" in rec["leaderboard_row"]
    model = SpeedrunGPT(SPEEDRUN_MODELS["tiny"])
    assert rec["flops_per_token"] == model.flops_per_token(64)  # MFU's FLOPs are the speedrun model's
    assert rec["parameters"] == model.num_parameters(include_padding=False)
    log = (run16 / "train.log").read_text()
    assert "\nrecipe speedrun-dense\n" in log and "muon  torch (tritonrun/kernels/muon.py" in log
    for name in SPEEDRUN_OPS:
        assert f"\n  {name} " in log
    assert "\n  gelu " not in log and "\n  layer_norm " not in log


def test_schedule_and_momentum_as_applied(run16):
    """From the step records: Muon's lr 0.04 x the record's multiplier (constant, then linear to 0 over the
    last 30% of the steps: 5 of 16), Muon momentum 0.85 -> 0.95 over 500 steps (0.85 + 0.1 step/500)."""
    steps = result(run16)["steps"]
    cooldown = get_recipe("speedrun-dense").cooldown_steps(16)
    assert cooldown == 5
    for s in steps:
        i = s["step"] - 1  # 0-based step the schedule was evaluated at
        scale = 1.0 if i < 16 - cooldown else (16 - i) / cooldown
        assert s["lr_scale"] == pytest.approx(scale, abs=1e-12)
        assert s["lr"] == pytest.approx(0.04 * scale, abs=1e-12)
        assert s["muon_momentum"] == pytest.approx(0.85 + 0.1 * i / 500, abs=1e-12)


def test_checkpoint_names_the_model_and_holds_muon_state(run16):
    ckpt = load_checkpoint(list_checkpoints(run16)[-1])
    assert ckpt["model_kind"] == "speedrun-dense"
    assert ckpt["model_config"] == SPEEDRUN_MODELS["tiny"].to_dict()
    muon = ckpt["optimizer"]["muon"]
    n_matrices = sum(p.dim() == 2 for p in SpeedrunGPT(SPEEDRUN_MODELS["tiny"]).transformer.h.parameters())
    assert len(muon["state"]) == n_matrices and all("momentum_buffer" in v for v in muon["state"].values())
    assert len(ckpt["optimizer"]["adam"]["state"]) == 2 + 2 * 2 + 1  # wte, lm_head, 2 x (lambdas, lamb), skips


def make_trainer(tmp_path, *flags):
    cfg, _ = train_speedrun.resolve_config([*SMALL, "--out-dir", str(tmp_path), *flags])
    train_files, val_file = train_speedrun.open_data(cfg)
    return cfg, training.Trainer(cfg, train_files, val_file, training.Dist(cfg.device))


def test_optimizer_covers_every_parameter_once_with_the_records_lrs(tmp_path):
    cfg, tr = make_trainer(tmp_path, "--lr", "0.5")
    seen = [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in tr.model.parameters())  # every parameter, exactly once
    base = {g["name"]: g["base_lr"] for g in tr.optimizer.param_groups}
    assert base == pytest.approx({"wte": 0.3, "lm_head": 0.004, "scalars": 0.02, "matrices": 0.02})  # x --lr
    assert all(g["weight_decay"] == 0.0 for g in tr.optimizer.param_groups)
    assert tr.optimizer.adam.param_groups[0]["betas"] == (0.9, 0.95)
    assert {id(p) for p in tr.optimizer.muon.param_groups[0]["params"]} == \
        {id(p) for p in tr.model.transformer.h.parameters() if p.dim() == 2}
    # a step past the end (an untimed warm-up step near the end of a resumed run) gets the end's lr, 0
    assert tr.schedule.apply(tr.optimizer, cfg.max_steps + 2)["lr_scale"] == 0.0


def test_warmup_restore_includes_muon_state(tmp_path):
    """state() / load_state() (the untimed warm-up's restore) bring Muon's momentum buffers back too."""
    _, tr = make_trainer(tmp_path)
    snap = training._host_copy(tr.state())
    first = tr.train_step(0)
    assert tr.optimizer.muon.state  # the step made momentum buffers
    tr.load_state(snap)
    assert not tr.optimizer.muon.state and not tr.optimizer.adam.state
    assert tr.train_step(0) == first


@pytest.mark.parametrize("args, needle", [
    (["--weight-decay", "0.1"], "--weight-decay does not apply to --recipe speedrun-dense"),
    (["--final-lr-frac", "0.1"], "--final-lr-frac does not apply to --recipe speedrun-dense"),
    (["--model", "d24"], "--model d24 is not a --recipe speedrun-dense model: choose one of d12, tiny"),
    (["--init-from", "hf:gpt2"], "--recipe speedrun-dense cannot train"),
    (["--warmup-steps", "40", "--max-steps", "50"], "overlaps the speedrun cooldown"),
    (["--recipe", "gpt2", "--muon-coefficients", "polar_express"], "--muon-coefficients does not apply"),
    (["--recipe", "nanogpt"], "invalid choice"),
])
def test_flags_that_do_not_apply_are_one_error_line(tmp_path, capsys, args, needle):
    assert train_speedrun.main([*SMALL, "--out-dir", str(tmp_path / "o"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_recipe_defaults_by_preset():
    cpu, _ = train_speedrun.resolve_config(["--gpu", "cpu", "--out-dir", "x"])
    assert cpu.recipe == "gpt2" and (cpu.lr, cpu.weight_decay) == (2e-3, 0.1)  # the smoke preset is unchanged
    gpu_default = train_speedrun.DEFAULT_RECIPE["cuda"]
    assert gpu_default == "record89" and train_speedrun.DEFAULT_RECIPE["cpu"] == "gpt2"
    # every recipe's defaults, over the run defaults, give every run field but the out dir and the derived batch
    for name, recipe in RECIPES.items():
        for device in ("cuda", "cpu"):
            have = {**run_defaults(device), **recipe.defaults(on_gpu=device == "cuda")}
            missing = {f.name for f in fields(train_speedrun.Config)} - set(have) - {
                "gpu", "recipe", "out_dir", "micro_batch", "memory_gib", "peak_tflops", "backend", "compile",
                "dtype", "timing_warmup_steps", "device"}
            assert not missing, (name, device, missing)
            if device == "cpu":
                assert "micro_batch" in have  # the smoke run's batch is fixed: a CPU has no memory to size it by
    assert get_recipe("speedrun-dense").defaults(on_gpu=True) == {
        "lr": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "final_lr_frac": 0.0,
        "beta1": 0.9, "beta2": 0.95, "max_steps": 3000, "val_every": 125}
    assert get_recipe("speedrun-dense").cooldown_steps(3000) == 900  # the record's warmdown_iters
    text = " ".join(train_speedrun.build_parser().format_help().split())  # --help says how the flags map
    assert "MULTIPLIER on every group's base lr" in text and "--weight-decay and --final-lr-frac do not apply" in text
    assert "speedrun-dense the 2024-11-10 record" in text


def test_sigkill_then_resume_is_bitwise_and_recipe_is_run_defining(tmp_path):
    run = [*SMALL, "--max-steps", 6, "--val-every", 3, "--checkpoint-every", 2, "--keep-checkpoints", 0]
    straight = tmp_path / "straight"
    proc = run_cli(*run, "--out-dir", straight)
    assert proc.returncode == 0, proc.stderr

    killed = tmp_path / "killed"
    proc = start_cli(*run, "--out-dir", killed)
    wait_for(lambda: (killed / "ckpt_00000002.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(list_checkpoints(killed)) in (1, 2)
    for flag, value in (("--recipe", "gpt2"), ("--muon-coefficients", "polar_express")):
        bad = run_cli("--resume", "--out-dir", killed, flag, value)
        assert bad.returncode == 2 and f"{flag} {value} conflicts" in bad.stderr, bad.stderr
    proc = run_cli("--resume", "--out-dir", killed)
    assert proc.returncode == 0, proc.stderr
    a, b = result(straight), result(killed)
    assert b["resumed_from"] and b["recipe"] == "speedrun-dense" and len(b["train_losses"]) == 6
    assert a["train_losses"] == b["train_losses"]  # bitwise
    assert [s["grad_norm"] for s in a["steps"]] == [s["grad_norm"] for s in b["steps"]]
    assert [v["loss"] for v in a["val"]] == [v["loss"] for v in b["val"]]


def test_init_from_a_speedrun_checkpoint_takes_its_recipe_and_model(run16, tmp_path, capsys):
    cfg, _ = train_speedrun.resolve_config(["--gpu", "cpu", "--data", "sample", "--init-from", f"ckpt:{run16}",
                                           "--out-dir", str(tmp_path)])
    assert (cfg.recipe, cfg.model) == ("speedrun-dense", "tiny")
    assert train_speedrun.main(["--gpu", "cpu", "--recipe", "gpt2", "--init-from", f"ckpt:{run16}",
                                "--out-dir", str(tmp_path / "o")]) == 2
    assert "holds a speedrun-dense model, which --recipe gpt2 cannot train" in capsys.readouterr().err
    model = get_recipe(cfg.recipe).build_model(cfg, get_ops("torch"))
    assert torch.equal(model.lm_head.weight, load_checkpoint(list_checkpoints(run16)[-1])["model"]["lm_head.weight"])


@NEEDS_INTERPRETER
def test_triton_backend_cli_run(tmp_path):
    """The speedrun model's ops through the seam on the triton backend (the interpreter): runs and learns."""
    proc = run_cli(*SMALL, "--backend", "triton", "--max-steps", 4, "--val-every", 4,
                   "--timing-warmup-steps", "0", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = result(tmp_path)
    assert rec["recipe"] == "speedrun-dense" and all(rec["ops"][n].startswith("triton") for n in SPEEDRUN_OPS), \
        rec["ops"]
    assert rec["train_losses"][-1] < rec["train_losses"][0] and math.isfinite(rec["final_val_loss"])


def test_compile_matches_eager(tmp_path):
    losses = {}
    for flag in ("--no-compile", "--compile"):
        out = tmp_path / flag
        proc = run_cli(*SMALL, flag, "--max-steps", 2, "--val-every", 2, "--timing-warmup-steps", 0, "--out-dir", out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        rec = result(out)
        assert rec["config"]["compile"] == (flag == "--compile")
        losses[flag] = rec["train_losses"] + [rec["final_val_loss"]]
    assert losses["--compile"] == pytest.approx(losses["--no-compile"], rel=1e-4)


def one_process_and_two_ranks(tmp_path, args) -> tuple:
    """The trainer with `args` once as one process and once under torchrun with 2 gloo ranks; their out dirs."""
    single = tmp_path / "single"
    proc = run_cli(*args, "--out-dir", single)
    assert proc.returncode == 0, proc.stderr
    ddp = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "train_speedrun.py", *map(str, args), "--out-dir", str(ddp)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    return single, ddp


def assert_losses_match(a: dict, b: dict) -> None:
    """Two runs' train losses and final val equal to all-reduce rounding (gradients summed in another order)."""
    for x, y in zip(a["train_losses"], b["train_losses"], strict=True):
        assert abs(x - y) <= 1e-4, (a["train_losses"], b["train_losses"])
    assert abs(a["final_val_loss"] - b["final_val_loss"]) <= 1e-4


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """Muon shards its Newton-Schulz over the 2 ranks (matrix j on rank j mod 2) and all-gathers the updates."""
    args = [*SMALL, "--micro-batch", "1", "--max-steps", 3, "--val-every", 3]
    single, ddp = one_process_and_two_ranks(tmp_path, args)
    a, b = result(single), result(ddp)
    assert b["world_size"] == 2 and b["grad_accum"] == a["grad_accum"] == 4
    assert_losses_match(a, b)  # the same tokens per step; summed in another order: rounding, not bits
    assert "sharded over 2 ranks" in (ddp / "train.log").read_text()


@pytest.mark.skipif(HAS_CUDA, reason="on a CUDA machine the kernels are compiled, not interpreted: the bf16 "
                                     "curves of tests/test_speedrun_model.py run instead")
def test_20_steps_triton_follows_torch_with_the_records_optimizers():
    """The tiny speedrun model (2 blocks, 50304-row head shrunk to a 101-word vocabulary for the interpreter)
    trained by SpeedrunOptimizer (Adam groups + Muon, the record's lrs and momentum warmup) on one batch."""
    import dataclasses

    config = dataclasses.replace(SPEEDRUN_MODELS["tiny"], block_size=32, vocab_size=101, padded_vocab_size=128)
    run = SimpleNamespace(lr=1.0, beta1=0.9, beta2=0.95, muon_coefficients="quintic", max_steps=20, warmup_steps=0)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (2, 17), generator=gen)

    def curve(backend):
        torch.manual_seed(0)
        model = SpeedrunGPT(config, get_ops(backend, "cpu"))
        with torch.no_grad():  # random where the record zero-inits (see below), the same draw for both backends
            for module in model.modules():
                if getattr(module, "zero_init", False):
                    module.weight.normal_(0.0, 1.0 / math.sqrt(module.weight.shape[1]))
            model.lm_head.weight[config.vocab_size:].zero_()
        recipe = get_recipe("speedrun-dense")
        opt, schedule = recipe.build_optimizer(model, model.ops, run), recipe.schedule(run, model)
        losses = []
        for step in range(20):
            schedule.apply(opt, step)
            loss = model(data[:, :-1], data[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    ref, ours = curve("torch"), curve("triton")
    assert ref[-1] < ref[0] - 1.0  # it learns, so the comparison means something
    # Random weights where the record zero-inits: from the record's init every c_proj is zero, the blocks pass x
    # through and the scalars' (lambdas, skip weights) true gradients are ~1e-8, below fp32's resolution; each
    # backend then gets a different sign and Adam makes a full-lr step of it (tests/test_speedrun_model.py
    # measured both fp32 backends 1e-2 away from fp64 there). Here every gradient is well resolved.
    # fp32 model on both sides; Muon rounds its input to bf16 (the record's), which turns fp32 summation-order
    # differences of ~1e-7 into occasional one-ulp bf16 flips (2^-8 relative) of single update entries: the
    # curves stay together to ~1e-3, not 1e-5 as with Adam alone (tests/test_speedrun_model.py). Measured here
    # (torch 2.13, triton 3.9 interpreter), from the record's init: at most 4.1e-4 relative (loss 4.6 -> 0.12); from
    # this random init the batch is memorized (5.35 -> ~0.08) and the same flips give <= 2.3e-4 absolute, which is
    # 3e-3 relative near 0.08: hence an absolute floor of 1e-3, 2e-4 of the curve's 5.3 range.
    assert ours == pytest.approx(ref, rel=1e-3, abs=1e-3)


def test_bench_project_takes_the_token_count_of_the_recipe_it_measured(tmp_path):
    """bench/train.py --project: a speedrun-dense record (or one saying "speedrun", written before the 2024-12-17
    recipe took that name) projects the 11-10 record's 3000 x 524,288 tokens at its d12's FLOPs per token; a record
    without "recipe" (older ones) stays llm.c's 9.0e9 at GPT-2's."""
    import re

    from tritonrun.gpt2 import GPT, MODEL_SIZES
    from tests.test_bench_train import bench

    runs = [{"name": "triton+compile", "backend": "triton", "compile": True, "micro_batch": 8, "fits": True,
             "tokens_per_s": 3.5e5, "mfu": 0.4}]
    for recipe, tokens, model in (("speedrun-dense", 3000 * 524_288, SpeedrunGPT(SPEEDRUN_MODELS["d12"])),
                                  ("speedrun", 3000 * 524_288, SpeedrunGPT(SPEEDRUN_MODELS["d12"])),
                                  (None, 9.0e9, GPT(MODEL_SIZES["d12"]))):
        path = tmp_path / f"{recipe}.json"
        path.write_text(json.dumps({"env": {"device": "Fake GPU"}, "runs": runs,
                                    **({"recipe": recipe} if recipe else {})}))
        proc = bench("--project", "rtx4070", "--from-record", str(path))
        assert proc.returncode == 0, proc.stderr
        flops = int(re.search(r"flops_per_token\s*=\s*(\d+)", proc.stdout).group(1))
        assert flops == model.flops_per_token(1024)
        assert f"--recipe {'speedrun-dense' if recipe else 'gpt2'}" in proc.stdout
        hours = float(re.search(r"^hours = ([\d.]+)$", proc.stdout, re.M).group(1))
        assert hours == pytest.approx(tokens * flops / (58.3e12 * 0.4) / 3600, rel=1e-5)


def test_trainer_hellaswag_scores_the_speedrun_model(tmp_path):
    """The trainer's HellaSwag call on SpeedrunGPT (model(idx) -> softcapped logits over the real vocabulary)."""
    examples = random_hellaswag_examples(6)
    _, tr = make_trainer(tmp_path)
    tr.train_step(0)  # a non-zero head: the endings' losses differ
    hs = tr.hellaswag(examples)
    assert hs["n"] == 6 and 0 <= hs["acc"] <= 1 and 0 <= hs["acc_norm"] <= 1
    want = hellaswag_by_hand(tr.model, examples)  # scored without tritonrun.data.hellaswag
    assert hs == pytest.approx(want, abs=1e-6)  # the same counts (the trainer's means are fp32)
