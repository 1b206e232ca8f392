"""Model level: the whole tiny GPT-2 trained with every Triton kernel (--backend triton) follows the
torch backend's loss curve for 20 steps on --data sample (llm.c's check).

CPU: the kernels run in Triton's interpreter in fp32, so the batch is small (1 x 16 tokens per step) and
the curves must agree to ~1e-5. CUDA: bf16 autocast, the training dtype, under the low-precision rule of
REFERENCE.md applied to the curves: |triton_bf16 - ref| <= 2 |torch_bf16 - ref| + floor, ref being the torch
backend in fp32 with exact fp32 matmuls (no TF32)."""
import pytest
import torch

from tritonrun import train as train_speedrun
from tritonrun import training
from tritonrun.gpt2.ops import GPT2_OPS
from tests.helpers import HAS_CUDA

CPU_ARGS = ["--gpu", "cpu", "--data", "sample", "--micro-batch", "1", "--seq-len", "16", "--total-batch-tokens",
            "16", "--max-steps", "20", "--warmup-steps", "5", "--lr", "3e-3", "--out-dir", "unused"]
CUDA_ARGS = ["--gpu", "auto", "--recipe", "gpt2", "--model", "tiny", "--data", "sample", "--micro-batch", "4",
             "--seq-len", "128", "--total-batch-tokens", "1024", "--val-tokens", "512", "--max-steps", "20", "--warmup-steps", "5", "--lr", "3e-3",
             "--no-compile", "--memory-gib", "0", "--out-dir", "unused"]


def curve(args: list[str], exact_fp32: bool = False) -> tuple[list[float], list[float], dict]:
    cfg, _ = train_speedrun.resolve_config(args)
    train_files, val_file = train_speedrun.open_data(cfg)
    trainer = training.Trainer(cfg, train_files, val_file, training.Dist(cfg.device))
    saved = torch.get_float32_matmul_precision()
    if exact_fp32:
        torch.set_float32_matmul_precision("highest")  # the trainer asks for TF32 on CUDA
    try:
        losses, norms = [], []
        for step in range(cfg.max_steps):
            loss, norm, _, applied = trainer.train_step(step)
            assert applied
            losses.append(loss)
            norms.append(norm)
    finally:
        torch.set_float32_matmul_precision(saved)
    return losses, norms, trainer.ops.placement


@pytest.mark.skipif(HAS_CUDA, reason="on a CUDA machine the kernels are compiled, not interpreted: "
                                     "test_gpu_bf16_curves_follow_the_low_precision_rule runs instead")
def test_20_steps_triton_backend_follows_torch_backend():
    torch_losses, torch_norms, _ = curve([*CPU_ARGS, "--backend", "torch"])
    triton_losses, triton_norms, placement = curve([*CPU_ARGS, "--backend", "triton"])
    assert all(placement[name].startswith("triton") for name in GPT2_OPS), placement
    assert torch_losses[-1] < torch_losses[0] - 1.0  # it learns, so the comparison means something
    # fp32 kernels differ from torch only in summation order (~1e-7 relative per op, see each kernel's
    # tests); 20 steps of clipped AdamW grow that to ~5e-7 here. 1e-5 (~80 ulps) leaves room for other
    # CPUs while any wrong gradient moves the loss by >1e-3 within a few steps.
    assert triton_losses == pytest.approx(torch_losses, rel=1e-5)
    # The grad norm is also computed two ways (torch's foreach norm vs FusedAdamW's fp32 two-pass
    # reduction) over grads that differ in their last bits; measured up to 1.6e-4 relative here.
    assert triton_norms == pytest.approx(torch_norms, rel=1e-3)


def max_abs_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA: the bf16 training curve runs bf16 tl.dot (attention, LM head), which the Triton interpreter computes wrongly")
def test_gpu_bf16_curves_follow_the_low_precision_rule():
    ref_losses, ref_norms, _ = curve([*CUDA_ARGS, "--backend", "torch", "--dtype", "fp32"], exact_fp32=True)
    torch_losses, torch_norms, _ = curve([*CUDA_ARGS, "--backend", "torch", "--dtype", "bf16"])
    triton_losses, triton_norms, placement = curve([*CUDA_ARGS, "--backend", "triton", "--dtype", "bf16"])
    # "triton", or "triton (softcap: torch; ...)" for the LM head until its kernel takes softcap (GPT-2 has none)
    assert all(placement[name].startswith("triton") and "interpreter" not in placement[name]
               for name in GPT2_OPS), placement
    assert ref_losses[-1] < ref_losses[0] - 1.0  # it learns, so the comparison means something
    # Floor: 2^-10 of the largest value (about one fp16 ulp, an eighth of a bf16 ulp): slack for a curve
    # where torch's bf16 run happens to land very close to the reference.
    for ours, theirs, ref in ((triton_losses, torch_losses, ref_losses), (triton_norms, torch_norms, ref_norms)):
        bound = 2 * max_abs_diff(theirs, ref) + 2**-10 * max(abs(x) for x in ref)
        assert max_abs_diff(ours, ref) <= bound, (ours, theirs, ref)
