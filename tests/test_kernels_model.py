"""Model level: the whole tiny GPT-2 trained with every Triton kernel (--backend triton) follows the
torch backend's loss curve for 20 steps on --data sample (llm.c's check). On CPU the kernels run in
Triton's interpreter, so the batch is small (1 x 16 tokens per step)."""
import pytest

import train_speedrun
import training

ARGS = ["--gpu", "cpu", "--data", "sample", "--micro-batch", "1", "--seq-len", "16", "--total-batch-tokens", "16",
        "--max-steps", "20", "--warmup-steps", "5", "--lr", "3e-3", "--out-dir", "unused"]


def curve(backend: str) -> tuple[list[float], list[float], dict]:
    cfg, _ = train_speedrun.resolve_config([*ARGS, "--backend", backend])
    train_files, val_file = train_speedrun.open_data(cfg)
    trainer = training.Trainer(cfg, train_files, val_file, training.Dist("cpu"))
    losses, norms = [], []
    for step in range(cfg.max_steps):
        loss, norm, _, applied = trainer.train_step(step)
        assert applied
        losses.append(loss)
        norms.append(norm)
    return losses, norms, trainer.ops.placement


def test_20_steps_triton_backend_follows_torch_backend():
    torch_losses, torch_norms, _ = curve("torch")
    triton_losses, triton_norms, placement = curve("triton")
    assert all(where.startswith("triton") for where in placement.values()), placement
    assert torch_losses[-1] < torch_losses[0] - 1.0  # it learns, so the comparison means something
    # fp32 kernels differ from torch only in summation order (~1e-7 relative per op, see each kernel's
    # tests); 20 steps of clipped AdamW grow that to ~5e-7 here. 1e-5 (~80 ulps) leaves room for other
    # CPUs while any wrong gradient moves the loss by >1e-3 within a few steps.
    assert triton_losses == pytest.approx(torch_losses, rel=1e-5)
    # The grad norm is also computed two ways (torch's foreach norm vs FusedAdamW's fp32 two-pass
    # reduction) over grads that differ in their last bits; measured up to 1.6e-4 relative here.
    assert triton_norms == pytest.approx(torch_norms, rel=1e-3)
