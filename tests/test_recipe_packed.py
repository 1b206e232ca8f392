"""--recipe speedrun (the 2024-12-17 record: packed sequences, document-masked sliding window, value embeddings) end to
end on CPU (tiny model, built-in sample corpus): one packed sequence per micro-batch from data/loader.PackedLoader and
gradient accumulation up to --total-batch-tokens, the run learns and its records name the recipe, the lr, Muon
momentum and window schedules are the ones applied, MFU's FLOPs average the windowed attention over the schedule,
checkpoints hold Muon's, the loader's and the schedule's state and a SIGKILLed run resumes bitwise, flags that do not
fit are one error line, a checkpoint of the 2024-11-10 recipe from before the rename resumes as speedrun-dense, the
triton backend runs through the trainer and follows torch for 20 steps with the record's optimizers, 2 gloo ranks
equal one process, HellaSwag scores the model."""
import dataclasses
import json
import math
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tritonrun import train as train_speedrun
from tritonrun import training
from tritonrun.data.loader import PackedLoader
from tritonrun.gpt2.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from tritonrun.gpt2.ops import SPEEDRUN_OPS, get_ops
from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS, SPEEDRUN_MODELS, SpeedrunGPT, speedrun_window
from tritonrun.memory import fit_preset
from tritonrun.recipes import get_recipe
from tests.helpers import HAS_CUDA, NEEDS_INTERPRETER, hellaswag_by_hand, random_hellaswag_examples
from tests.test_recipe import assert_losses_match, one_process_and_two_ranks
from tests.test_resume import start_cli, wait_for
from tests.test_train_cli import run_cli

PACKED = ["--recipe", "speedrun", "--gpu", "cpu", "--model", "tiny", "--data", "sample"]
# 2 packed sequences of 256 tokens per step: longer than the first windows (128 tokens), so the window masks.
SMALL = [*PACKED, "--seq-len", "256", "--total-batch-tokens", "512", "--val-tokens", "512"]


def result(out) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def run16(tmp_path_factory):
    out = tmp_path_factory.mktemp("packed16")
    proc = run_cli(*SMALL, "--max-steps", 16, "--val-every", 8, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return out


def test_packed_run_learns_and_records_name_the_recipe(run16):
    rec = result(run16)
    losses = rec["train_losses"]
    assert len(losses) == 16 and all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(50257)) < 1.0  # zero-init head: uniform at the start
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 2.0, losses
    assert rec["val"][-1]["loss"] < rec["val"][0]["loss"]
    assert rec["recipe"] == rec["config"]["recipe"] == "speedrun"
    assert (rec["config"]["micro_batch"], rec["config"]["seq_len"], rec["grad_accum"]) == (1, 256, 2)
    assert (rec["config"]["beta1"], rec["config"]["beta2"]) == (0.8, 0.95)  # the record's Adam betas
    assert set(rec["ops"]) == set(SPEEDRUN_OPS) and "window_attention" in rec["ops"]
    model = SpeedrunGPT(SPEEDRUN_MODELS["tiny"])
    assert rec["parameters"] == model.num_parameters(include_padding=False)  # value tables included
    # MFU's FLOPs: the windowed attention averaged over the run's 16 windows (value tables not counted)
    short = dataclasses.replace(SPEEDRUN_MODELS["tiny"], num_iterations=16, warmdown_iters=6)
    windows = [speedrun_window(s, short) for s in range(16)]
    assert rec["flops_per_token"] == round(sum(model.flops_per_token(256, w) for w in windows) / 16)
    assert model.flops_per_token(256, 128) < rec["flops_per_token"] < model.flops_per_token(256, 256) + 1
    log = (run16 / "train.log").read_text()
    assert "\nrecipe speedrun\n" in log and "| window 128 |" in log and "\n  window_attention " in log


def test_lr_momentum_and_window_schedules_as_applied(run16):
    """From the step records: Muon's lr 0.05 x the multiplier (constant, then linear to 0 over the record's last
    600/1490 of the steps: 6 of 16), momentum 0.85 + 0.1 min(step/300, 1), and the window of the record's formula
    over 16 steps: 128 x int(((1 - s/16) 64 + s/16 1792 + 64) // 128)."""
    steps = result(run16)["steps"]
    cooldown = get_recipe("speedrun").cooldown_steps(16)
    assert cooldown == 6 and get_recipe("speedrun").cooldown_steps(1490) == 600
    for s in steps:
        i = s["step"] - 1
        scale = 1.0 if i < 16 - cooldown else (16 - i) / cooldown
        assert s["lr"] == pytest.approx(0.05 * scale, abs=1e-12)
        assert s["muon_momentum"] == pytest.approx(0.85 + 0.1 * i / 300, abs=1e-12)
        assert s["window"] == 128 * int(((1 - i / 16) * 64 + i / 16 * 1792 + 64) // 128)
    assert [s["window"] for s in steps[:3]] == [128, 128, 256]


def test_checkpoint_holds_muon_loader_and_window_state(run16):
    ckpt = load_checkpoint(list_checkpoints(run16)[-1])
    assert ckpt["model_kind"] == "speedrun" and ckpt["model_config"] == SPEEDRUN_MODELS["tiny"].to_dict()
    model = SpeedrunGPT(SPEEDRUN_MODELS["tiny"])
    muon = ckpt["optimizer"]["muon"]["state"]
    assert len(muon) == sum(p.dim() == 2 for p in model.transformer.h.parameters())
    assert all("momentum_buffer" in v for v in muon.values())
    # wte + 1 value table, lm_head, 4 block lambdas + 3 attn lambdas (block 2 has none), skip weights
    assert len(ckpt["optimizer"]["adam"]["state"]) == 2 + 1 + 4 + 3 + 1
    assert set(ckpt["data"]) >= {"shard", "offset", "epoch"} and ckpt["data"]["offset"] > 0
    assert ckpt["schedule"]["window"] == result(run16)["steps"][-1]["window"]


def make_trainer(tmp_path, *flags):
    cfg, _ = train_speedrun.resolve_config([*SMALL, "--out-dir", str(tmp_path), *flags])
    train_files, val_file = train_speedrun.open_data(cfg)
    return cfg, training.Trainer(cfg, train_files, val_file, training.Dist(cfg.device))


def test_trainer_reads_packed_sequences_and_accumulates(tmp_path):
    """Training sequences are contiguous chunks by default (the 2024-12-17 record's order) and start at documents
    with --doc-aligned; validation reads contiguous windows (the record's val tokens); the step accumulates total /
    seq_len micro-batches of B = 1."""
    _, plain = make_trainer(tmp_path / "plain")
    assert not plain.train_loader.doc_aligned and not plain.cfg.doc_aligned
    cfg, tr = make_trainer(tmp_path, "--doc-aligned")
    assert isinstance(tr.train_loader, PackedLoader) and tr.train_loader.doc_aligned
    assert isinstance(tr.val_loader, PackedLoader) and not tr.val_loader.doc_aligned
    assert tr.grad_accum == 2 and tr.val_steps == 2
    x, y, cu = tr.train_loader.next_batch()
    assert x.shape == (1, 256) and x[0, 0] == 50256 and cu[0] == 0 and cu[-1] == 256
    seen = [id(p) for g in tr.optimizer.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in tr.model.parameters())
    base = {g["name"]: g["base_lr"] for g in tr.optimizer.param_groups}
    assert base == pytest.approx({"wte": 0.6, "lm_head": 0.008, "scalars": 0.04, "matrices": 0.05})
    assert tr.optimizer.muon.momentum_form == "ema" and tr.optimizer.adam.param_groups[0]["betas"] == (0.8, 0.95)


@pytest.mark.parametrize("args, needle", [
    (["--micro-batch", "2"], "--micro-batch 2 does not apply to --recipe speedrun"),
    (["--total-batch-tokens", "600"], "--total-batch-tokens 600 is not a multiple of --seq-len 256"),
    (["--seq-len", "2048"], "--seq-len 2048 exceeds model tiny's context of 1024"),
    (["--weight-decay", "0.1"], "--weight-decay does not apply to --recipe speedrun"),
    (["--model", "d24"], "--model d24 is not a --recipe speedrun model"),
])
def test_flags_that_do_not_fit_are_one_error_line(tmp_path, capsys, args, needle):
    assert train_speedrun.main([*SMALL, "--out-dir", str(tmp_path / "o"), *args]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not (tmp_path / "o").exists()


def test_recipe_defaults_by_preset():
    assert get_recipe("speedrun").defaults(on_gpu=True) == {
        "lr": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "final_lr_frac": 0.0,
        "beta1": 0.8, "beta2": 0.95, "max_steps": 1490, "val_every": 125, "micro_batch": 1}
    assert get_recipe("speedrun").defaults(on_gpu=False)["seq_len"] == 256  # the CPU smoke run's packed length
    cfg, _ = train_speedrun.resolve_config([*PACKED, "--out-dir", "x"])
    assert (cfg.seq_len, cfg.micro_batch, cfg.grad_accum, cfg.total_batch_tokens) == (256, 1, 4, 1024)
    # on a GPU the packed length follows the LM head that runs, as the micro-batch does (the memory estimate)
    seq = {(gpu, backend, ops): fit_preset(gpu, "speedrun", "d12", 1024, 524288, backend, ops)["seq_len"]
           for gpu, backend, ops in (("rtx4070", "torch", ""), ("rtx4070", "triton", ""),
                                     ("rtx4070", "triton", "linear_cross_entropy"), ("h100", "triton", ""))}
    assert list(seq.values())[:3] == [4096, 8192, 4096]
    assert (seq["h100", "triton", ""], 524288 // seq["h100", "triton", ""]) == (65536, 8)  # the record's 8 x 64K
    text = " ".join(train_speedrun.build_parser().format_help().split())
    assert "2024-12-17 record" in text and "ONE packed sequence of --seq-len tokens" in text


def test_sigkill_then_resume_is_bitwise(tmp_path):
    """Muon's momentum, the packed loader's position and the schedule (window from the step) come back."""
    run = [*SMALL, "--max-steps", 6, "--val-every", 3, "--checkpoint-every", 2, "--keep-checkpoints", 0]
    straight = tmp_path / "straight"
    proc = run_cli(*run, "--out-dir", straight)
    assert proc.returncode == 0, proc.stderr
    killed = tmp_path / "killed"
    proc = start_cli(*run, "--out-dir", killed)
    wait_for(lambda: (killed / "ckpt_00000002.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    bad = run_cli("--resume", "--out-dir", killed, "--seq-len", "128")
    assert bad.returncode == 2 and "--seq-len 128 conflicts" in bad.stderr, bad.stderr
    proc = run_cli("--resume", "--out-dir", killed)
    assert proc.returncode == 0, proc.stderr
    a, b = result(straight), result(killed)
    assert b["resumed_from"] and b["recipe"] == "speedrun" and len(b["train_losses"]) == 6
    assert a["train_losses"] == b["train_losses"]  # bitwise
    assert [s["grad_norm"] for s in a["steps"]] == [s["grad_norm"] for s in b["steps"]]
    assert [s["window"] for s in a["steps"]] == [s["window"] for s in b["steps"]]
    assert [v["loss"] for v in a["val"]] == [v["loss"] for v in b["val"]]
    last = lambda out: load_checkpoint(list_checkpoints(out)[-1])  # noqa: E731
    assert last(straight)["data"] == last(killed)["data"]


def test_a_speedrun_run_from_before_the_rename_resumes_as_speedrun_dense(tmp_path):
    """A run of --recipe speedrun when that name was the 2024-11-10 model: its checkpoint says model_kind "speedrun",
    run_config recipe "speedrun", and its model_config has none of the 12-17 fields. --resume continues it as
    speedrun-dense (the same model and math), not as the packed recipe."""
    out = tmp_path / "old"
    dense = ["--recipe", "speedrun-dense", "--gpu", "cpu", "--model", "tiny", "--data", "sample", "--micro-batch", "2",
             "--seq-len", "32", "--total-batch-tokens", "128", "--val-tokens", "256", "--val-every", "2"]
    proc = run_cli(*dense, "--max-steps", 2, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    [path] = list_checkpoints(out)
    ckpt = load_checkpoint(path)
    new_fields = {f.name for f in dataclasses.fields(SPEEDRUN_DENSE_MODELS["tiny"])} - set(OLD_CONFIG_FIELDS)
    ckpt["model_kind"] = ckpt["run_config"]["recipe"] = "speedrun"
    ckpt["model_config"] = {k: v for k, v in ckpt["model_config"].items() if k not in new_fields}
    save_checkpoint(out, 2, {k: v for k, v in ckpt.items() if k not in ("format", "version", "step")})
    proc = run_cli("--resume", "--out-dir", out, "--max-steps", 4)
    assert proc.returncode == 0, proc.stderr
    rec = result(out)
    assert rec["config"]["recipe"] == "speedrun-dense" and len(rec["train_losses"]) == 4
    assert load_checkpoint(list_checkpoints(out)[-1])["model_kind"] == "speedrun-dense"


# SpeedrunConfig's fields before the 2024-12-17 recipe (commit fb71c7b)
OLD_CONFIG_FIELDS = ["block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head", "n_embd", "mlp_ratio",
                     "rope_base", "norm_eps", "logit_softcap", "value_lamb_init", "block_lambdas_init",
                     "skip_weight_init", "wte_lr", "lm_head_lr", "scalar_lr", "adam_betas", "adam_eps",
                     "weight_decay", "muon_lr", "muon_momentum", "muon_momentum_warmup_start",
                     "muon_momentum_warmup_steps", "muon_nesterov", "muon_ns_steps", "muon_ns_coefficients",
                     "muon_ns_eps", "muon_orthogonalizer", "grad_clip", "total_batch_tokens", "device_batch_size",
                     "num_iterations", "warmup_iters", "warmdown_iters", "val_every", "val_tokens"]


@NEEDS_INTERPRETER
def test_triton_backend_cli_run(tmp_path):
    """The windowed model's ops through the seam on the triton backend (the interpreter), kernels/window_attention
    fed by the trainer's cu_seqlens and window: runs and learns."""
    proc = run_cli(*PACKED, "--seq-len", "256", "--total-batch-tokens", "256", "--val-tokens", "256",
                   "--backend", "triton", "--max-steps", 3, "--val-every", 3, "--timing-warmup-steps", "0",
                   "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = result(tmp_path)
    assert rec["ops"]["window_attention"].startswith("triton"), rec["ops"]
    assert all(rec["ops"][n].startswith("triton") for n in SPEEDRUN_OPS), rec["ops"]
    assert rec["train_losses"][-1] < rec["train_losses"][0] and math.isfinite(rec["final_val_loss"])


@pytest.mark.skipif(HAS_CUDA, reason="on a CUDA machine the kernels are compiled, not interpreted: the bf16 "
                                     "checks of tests/test_speedrun_window_model.py run instead")
def test_20_steps_triton_follows_torch_with_the_records_optimizers():
    """The tiny windowed model (vocab shrunk to 101 for the interpreter) trained by SpeedrunOptimizer (Adam groups
    with the value tables in wte's, Muon with EMA momentum) on one packed sequence of 3 documents, window 7 < T.
    As tests/test_recipe.py's same test for the dense model: random weights where the record zero-inits (the zero
    init's scalar gradients are below fp32's resolution), and Muon's bf16 rounding turns fp32 summation-order
    differences into occasional one-ulp flips of single update entries, so rel 1e-3, not Adam's 1e-5. --lr 0.1
    (the multiplier): at the record's lrs these 45 tokens are memorized in one step (5.03 -> 0.44) and the curve
    then sits at 0.002-0.02, where the same flips measured 7 % relative (1.5e-3 absolute); at 0.1 x it goes
    5.03 -> 0.034 over the 20 steps and the backends measured at most 1.5e-4 relative apart (torch 2.13, triton
    3.9 interpreter)."""
    config = dataclasses.replace(SPEEDRUN_MODELS["tiny"], block_size=64, vocab_size=101, padded_vocab_size=128)
    run = SimpleNamespace(lr=0.1, beta1=0.8, beta2=0.95, muon_coefficients="quintic", max_steps=20, warmup_steps=0)
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, config.vocab_size, (1, 46), generator=gen)
    cu = torch.tensor([0, 17, 18, 45], dtype=torch.int32)

    def curve(backend):
        torch.manual_seed(0)
        model = SpeedrunGPT(config, get_ops(backend, "cpu"))
        with torch.no_grad():
            for module in model.modules():
                if getattr(module, "zero_init", False):
                    module.weight.normal_(0.0, 1.0 / math.sqrt(module.weight.shape[1]))
            model.lm_head.weight[config.vocab_size:].zero_()
        recipe = get_recipe("speedrun")
        opt, schedule = recipe.build_optimizer(model, model.ops, run), recipe.schedule(run, model)
        losses = []
        for step in range(20):
            schedule.apply(opt, step)
            loss = model(data[:, :-1], data[:, 1:], cu, 7)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses

    ref, ours = curve("torch"), curve("triton")
    assert ref[-1] < ref[0] - 1.0  # it learns, so the comparison means something
    assert ours == pytest.approx(ref, rel=1e-3)


def test_two_gloo_ranks_equal_one_process(tmp_path):
    """PackedLoader's interleave (sequence k of one process = micro-batch k // 2 of rank k % 2) and Muon sharded over
    the ranks: the same losses as one process, to all-reduce rounding."""
    args = [*PACKED, "--seq-len", "128", "--total-batch-tokens", "256", "--val-tokens", "256", "--max-steps", 3,
            "--val-every", 3]
    single, ddp = one_process_and_two_ranks(tmp_path, args)
    a, b = result(single), result(ddp)
    assert b["world_size"] == 2 and b["grad_accum"] == a["grad_accum"] == 2
    assert_losses_match(a, b)


def test_trainer_hellaswag_scores_the_windowed_model(tmp_path):
    """HellaSwag feeds plain rows: one document each, the schedule's final window (SpeedrunGPT's defaults)."""
    examples = random_hellaswag_examples(6)
    _, tr = make_trainer(tmp_path)
    tr.train_step(0)  # a non-zero head: the endings' losses differ
    hs = tr.hellaswag(examples)
    assert hs["n"] == 6 and 0 <= hs["acc"] <= 1 and 0 <= hs["acc_norm"] <= 1
    want = hellaswag_by_hand(tr.model, examples)  # scored without tritonrun.data.hellaswag
    assert hs == pytest.approx(want, abs=1e-6)  # the same counts (the trainer's means are fp32)


def test_warm_up_reaches_every_window_graph():
    """The untimed warm-up adds one step at the first window that differs and one at the last, so the recompiles a
    window change causes under --compile happen before the clock; nothing is added for a dense schedule."""
    from tritonrun.recipes.modded_nanogpt import RecordSchedule

    windowed = RecordSchedule(dataclasses.replace(SPEEDRUN_MODELS["tiny"], num_iterations=50, warmdown_iters=20))
    steps = windowed.warmup_steps(0, 2, 50)
    first = {windowed.window(s) for s in steps[:2]}
    assert steps[:2] == [0, 1] and len(steps) == 4 and first.isdisjoint(windowed.window(s) for s in steps[2:])
    assert steps[2] == next(s for s in range(2, 50) if windowed.window(s) != windowed.window(1)) and steps[3] == 49
    assert windowed.warmup_steps(0, 0, 50) == [] and windowed.warmup_steps(49, 1, 50) == [49]
    dense = RecordSchedule(SPEEDRUN_DENSE_MODELS["tiny"])
    assert dense.warmup_steps(3, 2, 50) == [3, 4]


def test_compiled_run_has_no_compile_inside_the_clock(tmp_path):
    """A compiled CPU run of --recipe speedrun whose window changes every step: with the warm-up, no graph is
    compiled inside a timed step (result.json timed_compiles 0); without one (--timing-warmup-steps 0) the compiles
    land in the clock and are counted, with a warning naming the step."""
    flags = [*SMALL, "--compile", "--max-steps", "4", "--val-every", "4", "--checkpoint-every", "0"]
    proc = run_cli(*flags, "--out-dir", tmp_path / "warm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "warm" / "result.json").read_text())
    assert len({s["window"] for s in rec["steps"]}) == 4, "the window changes every step"
    assert rec["timed_compiles"] == 0 and "timed_compile_steps" not in rec, rec.get("timed_compile_steps")
    assert "so that no window change compiles in the clock" in proc.stdout
    proc = run_cli(*flags, "--timing-warmup-steps", "0", "--out-dir", tmp_path / "cold")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((tmp_path / "cold" / "result.json").read_text())
    assert rec["timed_compiles"] >= 2 and rec["timed_compile_steps"][:2] == [1, 2], rec.get("timed_compile_steps")
    assert "compiled inside timed step 1" in proc.stdout


class OutOfResources(RuntimeError):
    """Stands in for triton.runtime.errors.OutOfResources (matched by name, as Inductor wraps it)."""


def test_out_of_resources_in_the_warm_up_falls_back_with_one_line(tmp_path, monkeypatch, capsys):
    """A window attention whose compile or launch fails for shared memory during the untimed warm-up (FlexAttention's
    default backward on an Ada part, say) is replaced by the next path, here the Triton kernel (the interpreter on
    CPU): one warning line, the choice in result.json, and the run trains on. Injected: the torch path raises
    Triton's out-of-resources error."""
    from tritonrun.gpt2 import ops as ops_module

    calls = []

    def no_shared_memory(*args, **kwargs):
        calls.append(1)
        raise OutOfResources("out of resource: shared memory, Required: 131074, Hardware limit: 101376. Reducing "
                             "block sizes or `num_stages` may help.")

    monkeypatch.setitem(ops_module.TORCH_OPS, "window_attention", no_shared_memory)
    out = tmp_path / "run"
    assert train_speedrun.main([*SMALL, "--max-steps", "2", "--val-every", "2", "--out-dir", str(out)]) == 0
    text = capsys.readouterr().out
    warnings = [ln for ln in text.splitlines() if ln.startswith("warning: window attention")]
    assert len(warnings) == 1 and "out of resource: shared memory" in warnings[0]
    assert "falling back to the Triton window_attention kernel" in warnings[0] and calls
    rec = json.loads((out / "result.json").read_text())
    assert rec["window_attention_fallback"][0]["from"] == "dense"
    assert rec["window_attention_fallback"][0]["to"] == "the Triton window_attention kernel"
    assert rec["ops"]["window_attention"] == "triton (fallback)" and rec["status"] == "max_steps"
    assert rec["steps_done"] == 2 and all(math.isfinite(s["loss"]) for s in rec["steps"])


def test_other_warm_up_errors_are_not_taken_for_resources():
    from tritonrun.training import is_resource_error

    wrapped = RuntimeError("backend='inductor' raised")
    wrapped.__cause__ = OutOfResources("out of resource: shared memory, Required: 131074")
    assert is_resource_error(wrapped) and is_resource_error(OutOfResources("x"))
    assert not is_resource_error(ValueError("shape mismatch")) and not is_resource_error(torch.OutOfMemoryError("x"))


def test_flex_tiles_fit_a_100_kb_part():
    """FlexAttention's kernel_options: Inductor's defaults where a block gets >= 160 KB (sm_80 166,912 B, sm_90
    232,448 B), smaller tiles at 101,376 B (sm_86, sm_89), halved again (one stage) as the fallback."""
    from tritonrun.gpt2.ops import FLEX_SMALL_SMEM_OPTIONS, flex_options_for

    assert flex_options_for(232_448) is None and flex_options_for(166_912) is None
    assert flex_options_for(101_376) == FLEX_SMALL_SMEM_OPTIONS
    small = flex_options_for(101_376, shrink=1)
    assert small["num_stages"] == 1 and all(small[k] == max(16, v // 2) for k, v in FLEX_SMALL_SMEM_OPTIONS.items())
    assert all(128 % v == 0 for v in FLEX_SMALL_SMEM_OPTIONS.values())  # tiles divide the block mask's blocks


def test_window_attention_fallback_order(monkeypatch):
    """FlexAttention (compiled, CUDA) -> FlexAttention with smaller tiles -> the Triton kernel -> torch's -> nothing
    left: each path is tried once (the state of a CUDA compiled run, faked: no GPU is touched)."""
    from tritonrun.gpt2.ops import torch_window_attention

    shrinks = []
    monkeypatch.setattr(training, "configure_flex", lambda device, shrink=0: shrinks.append(shrink))
    monkeypatch.setattr(training, "load_triton_op", lambda name: "kernel")
    t = SimpleNamespace(ops=SimpleNamespace(window_attention=torch_window_attention, placement={}),
                        device=torch.device("cuda"), cfg=SimpleNamespace(compile=True), tried_paths=set())
    t.window_attention_path = lambda: training.Trainer.window_attention_path(t)
    path = lambda: training.Trainer.window_attention_path(t)  # noqa: E731
    step = lambda: training.Trainer.fall_back_window_attention(t)  # noqa: E731
    assert path() == "flex" and step() == "FlexAttention with smaller tiles" and shrinks == [1]
    assert path() == "flex-small" and step() == "the Triton window_attention kernel"
    assert path() == "triton" and t.ops.window_attention == "kernel"
    assert step().startswith("torch's window attention") and t.ops.window_attention is torch_window_attention
    assert path() == "flex-small" and step() is None
    t.ops.placement, t.tried_paths = {"window_attention": "triton"}, set()  # a triton run
    assert step().startswith("torch's") and step() == "FlexAttention with smaller tiles" and step() is None


def test_long_documents_are_read_whole_unless_doc_aligned_and_skips_are_reported(tmp_path, capsys):
    """A corpus of few long documents (37 of ~3,700 tokens, seq-len 256): contiguous chunks (the default, the
    2024-12-17 record's order) read every token; --doc-aligned starts every sequence at a document and skips the
    rest of the document it cut: the log and result.json say how much, with a warning and the fix above 10 %."""
    from tritonrun.data.shards import write_shard

    rng = np.random.default_rng(0)
    docs = [np.concatenate([[50256], rng.integers(0, 50000, int(rng.integers(3000, 4400)))]) for _ in range(37)]
    d = tmp_path / "long"
    d.mkdir()
    write_shard(d / "long_val_000000.bin", np.concatenate(docs[:4]))
    write_shard(d / "long_train_000001.bin", np.concatenate(docs[4:]))
    flags = [*PACKED, "--data", str(d), "--seq-len", "256", "--total-batch-tokens", "512", "--val-tokens", "512",
             "--max-steps", "2", "--val-every", "2"]
    surveys = {}
    for name, extra in (("contiguous", []), ("aligned", ["--doc-aligned"])):
        assert train_speedrun.main([*flags, *extra, "--out-dir", str(tmp_path / name)]) == 0
        out = capsys.readouterr().out
        surveys[name] = json.loads((tmp_path / name / "result.json").read_text())["data_survey"], out
    contiguous, out = surveys["contiguous"]
    assert contiguous["fraction_skipped"] < 0.01 and "warning: the run would skip" not in out
    aligned, out = surveys["aligned"]
    assert aligned["fraction_skipped"] > 0.85  # one 256-token sequence per ~3,700-token document
    warning = next(ln for ln in out.splitlines() if ln.startswith("warning: the run would skip"))
    assert "drop --doc-aligned" in warning and f"{100 * aligned['fraction_skipped']:.0f} %" in warning
