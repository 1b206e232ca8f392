"""--recipe record89 (modded-nanogpt record #89, tritonrun/recipes/modded_nanogpt_2026_07_17.py) on CPU: the tiny
model trains through the CLI on the built-in corpus and a resumed run is bitwise the straight one (through an Adam
step, a stage change and the untie); the schedule's stage batches, gradient scale, step inputs and final window; the
record's gradient (sum of token losses / 8) from the trainer's mean; --fp8 resolution and the one-line refusals;
the FP8 scales' state round trip; the record's FP8 head reference and the bench that trains against it; the
refusals of sampling and export."""
import json
import math
import shutil

import pytest
import torch

from tritonrun import train as train_speedrun
from tritonrun.gpt2 import speedrun89 as s89
from tritonrun.gpt2.model89 import Record89Config, Record89GPT
from tritonrun.recipes import get_recipe
from tritonrun.recipes.modded_nanogpt_2026_07_17 import FINAL_BATCH, Record89Schedule, scaled_schedule
from tests.test_train_cli import assert_user_error, run_cli

RECIPE = ["--recipe", "record89", "--gpu", "cpu", "--model", "tiny", "--data", "sample"]
# 4 steps: stages [0, 1), [1, 3), [3, 4) of 1, 2 and 3 packed sequences of 128 tokens; Adam on steps 1 and 3; the
# untie after step 3 (odd, the first of the third stage); windows 128/384, 384/896, 640/1408 tokens (the first
# stage's short window masks within a sequence).
SMALL = [*RECIPE, "--seq-len", "128", "--total-batch-tokens", "384", "--val-tokens", "256", "--max-steps", "4",
         "--timing-warmup-steps", "0"]


def result(out) -> dict:
    return json.loads((out / "result.json").read_text())


def test_tiny_run_trains_and_resumes_bitwise(tmp_path):
    """A 4-step CLI run learns (val falls from ln V; the training loss is the MTP-weighted sum, ~2 ln V at the start)
    and its staged batches are counted in its tokens; a run resumed from its step-2 checkpoint repeats steps 3-4
    bitwise (losses, grad norms, val), the Adam step, the stage change and the untie included."""
    straight = tmp_path / "straight"
    proc = run_cli(*SMALL, "--val-every", "2", "--checkpoint-every", "2", "--keep-checkpoints", "0",
                   "--no-final-checkpoint", "--out-dir", straight)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    a = result(straight)
    assert a["recipe"] == "record89" and a["status"] == "max_steps"
    assert a["tokens_seen"] == (1 + 2 + 2 + 3) * 128  # the stages' micro-batches
    assert [s["stage"] for s in a["steps"]] == [0, 1, 1, 2]
    assert [s["adam_step"] for s in a["steps"]] == [False, True, False, True]
    weights = (1.0 + 0.5 + 0.25) + 0.25  # stage 0's MTP weights + the prefix weight at step 0
    assert abs(a["train_losses"][0] - weights * math.log(50304)) < 1.0, a["train_losses"]
    vals = [v["loss"] for v in a["val"]]
    assert vals[0] < math.log(50304) - 1.0 and vals[-1] < vals[0], vals
    assert "data: " in (straight / "train.log").read_text()

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(straight / "ckpt_00000002.pt", resumed / "ckpt_00000002.pt")
    proc = run_cli("--resume", "--out-dir", resumed, "--no-final-checkpoint")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    b = result(resumed)
    assert b["resumed_from"] and len(b["train_losses"]) == 4
    assert b["train_losses"] == a["train_losses"]
    assert [s["grad_norm"] for s in b["steps"]] == [s["grad_norm"] for s in a["steps"]]
    assert [v["loss"] for v in b["val"]] == [v["loss"] for v in a["val"]]

    # --init-from ckpt: takes the checkpoint's model (its size named by its shape) and weights
    cfg, _ = train_speedrun.resolve_config(["--recipe", "record89", "--gpu", "cpu", "--data", "sample",
                                            "--init-from", f"ckpt:{resumed}", "--out-dir", str(tmp_path / "init")])
    assert cfg.model == "tiny"
    model = get_recipe("record89").build_model(cfg, None)
    want = torch.load(resumed / "ckpt_00000002.pt", map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in want.items())


def test_schedule_hooks():
    """The record's run length gives its own schedule; a short run scales it. The stage batches are 1/3, 2/3, 3/3 of
    the trainer's micro-batches; the backward scale makes mean x tokens / 8 (the record's sum / 8); a step at or past
    the end gets the final long window (20 blocks) with the last stage's rotary tables."""
    assert scaled_schedule(1285) == s89.Schedule89()
    short = scaled_schedule(30)
    assert short.total_steps == 30 and short.untie_step % 2 == 1 and short.untie_step < 30
    sched = Record89Schedule(s89.Schedule89(), 4096, 128, "cpu", 1285)
    assert [sched.micro_batches(s, 96) for s in (0, 423, 847, 1284)] == [32, 64, 96, 96]
    assert 96 * 4096 == FINAL_BATCH
    assert sched.grad_scale(0, 131_072) == 16_384.0
    last, final = sched.window(1284), sched.window(1285)
    assert last.windows == (6 * 128, 13 * 128) and final.windows == (6 * 128, 20 * 128)
    assert final.scale == last.scale and torch.equal(final.rope["plain"][0], last.rope["plain"][0])
    assert sched.window(5).rope["plain"][0] is sched.window(6).rope["plain"][0]  # cached per stage
    torch.testing.assert_close(sched.window(5).mtp_weights, torch.tensor(s89.Schedule89().mtp_weights(5)))
    # the memory fit's packed lengths: powers of two dividing a stage-1 batch, up to the record's own 16,384 (the fit
    # itself, rtx4070 -> 4,096 with Triton, is tests/test_dry_run.py's against the committed memory record)
    assert get_recipe("record89").packed_lengths(FINAL_BATCH, 65536) == [2 ** k for k in range(7, 15)]


def test_trainer_gradient_is_the_records_sum_over_8():
    """What Trainer.train_step backpropagates (each micro-batch's mean loss / n x grad_scale) is the gradient of the
    sum of all token losses / 8, the record's, over micro-batches of different documents."""
    torch.manual_seed(0)
    config = Record89Config(vocab_size=300, head_dim=16, n_embd=96, bigram_rows=97, dtype="float32")  # torch ops
    model = Record89GPT(config)
    with torch.no_grad():
        model.mlp_bank[1::2].normal_(0, 0.02)
    sched = Record89Schedule(scaled_schedule(12), 32, 16, "cpu", 12)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 300, (1, 32), generator=g), torch.randint(0, 300, (1, 32), generator=g),
                torch.tensor([0, 11, 32], dtype=torch.int32)) for _ in range(2)]
    si = sched.window(0)
    scale = sched.grad_scale(0, 2 * 32)
    for x, y, cu in batches:
        (model(x, y, cu, si) / 2 * scale).backward()
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    (sum(model(x, y, cu, si, reduction="none").sum() for x, y, cu in batches) / 8).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(ours[n], p.grad, rtol=1e-5, atol=1e-7 * p.grad.abs().max().item(), msg=n)


def _cfg(*args):
    cfg, _ = train_speedrun.resolve_config(["--recipe", "record89", "--out-dir", "x", "--dry-run", *args])
    return cfg


def test_fp8_resolution():
    """auto: on with --backend triton on an sm_89 / sm_90 preset, off on torch, on sm_86, on the CPU."""
    gpu = ["--seq-len", "4096"]  # given: no memory sizing
    assert _cfg("--gpu", "rtx4070", "--backend", "triton", *gpu).fp8 == "on"
    assert _cfg("--gpu", "h100", "--backend", "triton", *gpu).fp8 == "on"
    assert _cfg("--gpu", "rtx4070", "--backend", "torch", *gpu).fp8 == "off"
    assert _cfg("--gpu", "rtx4070", "--backend", "triton", "--torch-ops", "relu2_mlp", *gpu).fp8 == "off"
    assert _cfg("--gpu", "rtx3090", "--backend", "triton", *gpu).fp8 == "off"
    assert _cfg("--gpu", "rtx4070", "--backend", "triton", "--fp8", "off", *gpu).fp8 == "off"
    assert _cfg("--gpu", "cpu", "--model", "tiny").fp8 == "off"
    other, _ = train_speedrun.resolve_config(["--recipe", "speedrun", "--gpu", "cpu", "--out-dir", "x"])
    assert other.fp8 == "off"


@pytest.mark.parametrize("args, needles", [
    (["--fp8", "on"], ["--fp8 on runs the MLPs in the Triton relu2_mlp kernel", "--backend triton"]),
    (["--beta1", "0.8"], ["--beta1 does not apply to --recipe record89", "ADAM_TABLE"]),
    (["--micro-batch", "2"], ["--micro-batch does not apply to --recipe record89", "--seq-len"]),
    (["--total-batch-tokens", "1000"], ["not a multiple of 3 x --seq-len 256", "make it 768"]),
    (["--max-steps", "3"], ["--max-steps 3 is too short", "at least 4"]),
    (["--recipe", "speedrun", "--fp8", "on"], ["--fp8 on does not apply to --recipe speedrun", "record89"]),
])
def test_refusals_are_one_line(args, needles, tmp_path):
    proc = run_cli(*RECIPE, *args, "--out-dir", tmp_path / "out")
    assert_user_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_fp8_scales_state_round_trip():
    """Fp8MlpScales.state_dict / load_state_dict (what a checkpoint carries): a restored copy quantizes the same weights
    to the same bytes with the same delayed scales."""
    from tritonrun.kernels.mlp_relu2 import Fp8MlpScales

    g = torch.Generator().manual_seed(0)
    W1, W2 = torch.randn(96, 32, generator=g), torch.randn(32, 96, generator=g)
    a = Fp8MlpScales("cpu")
    for _ in range(3):
        a.refresh(W1, W2)
        W2 = W2 * 1.3
    a.act_scale = torch.tensor([0.0123])
    b = Fp8MlpScales("cpu")
    b.load_state_dict(a.state_dict(), W1, W2 / 1.3)
    assert b.refreshes == a.refreshes == 3
    for name in ("act_scale", "w2_next", "w2_used", "s_up"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.w1_8.view(torch.uint8), b.w1_8.view(torch.uint8))
    assert torch.equal(a.w2_8.view(torch.uint8), b.w2_8.view(torch.uint8))


def test_fp8_head_reference_is_the_bf16_head_within_fp8_error():
    """speedrun89.mtp_head_fp8_reference (the record's FP8 head: e4m3 operands at its fixed scales, bf16 logits, the
    gradient in e5m2) against our exact head (mtp_head_torch, fp32 here): the losses within 2 % (measured 1.4 %: e4m3's
    3 mantissa bits on h and W, up to 2^-4 per product, then the sigmoid rescale and four weighted terms), every
    gradient at a cosine similarity >= 0.99 (e5m2's 2 mantissa bits on the gradient); zero where the exact gradient
    is zero is not required (the e4m3 logits move every softmax weight)."""
    g = torch.Generator().manual_seed(0)
    N, C, V = 40, 384, 300
    h = torch.nn.functional.rms_norm(torch.randn(N, C, generator=g), (C,)).requires_grad_()
    W = (torch.randn(C, V, generator=g) * 0.05).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    prefix = torch.randint(-1, V, (N,), generator=g)
    weights = torch.tensor([1.0, 0.5, 0.25])
    out = {}
    for name, head in (("exact", s89.mtp_head_torch), ("fp8", s89.mtp_head_fp8_reference)):
        h.grad = W.grad = None
        losses = head(h, W, targets, weights, prefix, torch.tensor(0.25))
        (losses.sum() * 3.0).backward()  # a loss scale, as the trainer's grad_scale
        out[name] = (losses.detach(), h.grad.clone(), W.grad.clone())
    (la, dha, dwa), (lb, dhb, dwb) = out["exact"], out["fp8"]
    assert ((lb - la).abs() / la).max() < 0.02
    for a, b in ((dha, dhb), (dwa, dwb)):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) >= 0.99
        assert 0.9 < b.norm() / a.norm() < 1.1


def test_head_precision_bench_smoke(tmp_path):
    """bench/record89_head.py end to end at its smallest (2 heads x 1 seed x 4 steps, heads of 16): both heads train
    the same model from the same init, their curves and the verdict's fields land in the record."""
    import importlib.util
    import json as json_

    spec = importlib.util.spec_from_file_location("bench_record89_head", "bench/record89_head.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--smoke", "--steps", "4", "--micro-batches", "3", "--seq-len", "32", "--head-dim", "16",
                     "--out-dir", str(tmp_path)]) == 0
    [path] = tmp_path.glob("record89-head-smoke-cpu-*.json")
    rec = json_.loads(path.read_text())
    assert [len(c) for c in rec["curves"]["fp8"] + rec["curves"]["bf16"]] == [4, 4]
    assert rec["curves"]["fp8"][0] != rec["curves"]["bf16"][0]  # the heads differ ...
    assert abs(rec["curves"]["fp8"][0][0] - rec["curves"]["bf16"][0][0]) < 0.05  # ... from one init and data
    assert set(rec) >= {"difference", "fp8_seed_spread", "within_noise", "per_seed_means", "env"}


def test_sampling_and_export_refuse_a_record89_checkpoint_in_one_line():
    """Its model trains only: sample.py, HellaSwag and export build models through build_model_from_config, which
    names the kind and what it can do instead (no "unknown model kind")."""
    from tritonrun.gpt2.checkpoint import build_model_from_config

    with pytest.raises(ValueError, match=r"a record89 model: sampling, HellaSwag and export do not take it yet .* "
                                         r"--resume or --init-from ckpt:"):
        build_model_from_config("record89", Record89Config().to_dict())


def test_eager_torch_attention_caps_the_packed_length():
    """The recipe runs eager: its torch window attention builds a dense T x T mask, refused above 16,384 tokens in one
    line that names the fixes; the memory fit never picks more (the record's own stage-1 sequence per GPU)."""
    from tritonrun.errors import UserError

    with pytest.raises(UserError, match="dense 32768 x 32768 mask .* --backend triton"):
        _cfg("--gpu", "h100", "--seq-len", "32768")
    assert _cfg("--gpu", "h100", "--seq-len", "32768", "--backend", "triton").seq_len == 32768
