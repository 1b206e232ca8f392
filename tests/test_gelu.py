"""tritonrun/kernels/gelu.py: forward and dx against an fp64 reference, fp32 / fp16 / bf16 (GPU), odd sizes,
poisoned outputs, extremes, determinism, torch.compile, the seam."""
import pytest
import torch
import torch.nn.functional as F

from tritonrun.kernels import gelu as ge
from tritonrun.gpt2.ops import get_ops, torch_gelu
from tests.helpers import ELEMENTWISE_DTYPES, poison_allocations

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (rows, C): prime row counts, the widths GELU sees in GPT-2 MLPs (4C) and odd ones; the element
# count is never a multiple of the block, so the masked tail is always exercised.
SHAPES = [(37, 64), (41, 100), (31, 768), (29, 1024), (23, 1600), (3, 8192), (13, 4 * 768)]

# Rule (REFERENCE.md): max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor * max|ref|,
# ref = fp64 on the same inputs. Floor = one ulp at the largest magnitude for fp16/bf16 (our single
# rounding at the store may land on the largest element while torch's worst error lands on a small
# one); fp32: 8 ulps (2^-20), since exp and the derivative's sum of two terms cost a few ulps in any
# order of evaluation. Measured on CPU: fp32 ours 4e-8 (y) / 1.4e-7 (dx) relative, torch 3e-8 / 6e-7.
DTYPES = ELEMENTWISE_DTYPES


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_allocations(monkeypatch, ge)


def run(fn, x, dy):
    leaf = x.detach().clone().requires_grad_()
    y = fn(leaf)
    (dx,) = torch.autograd.grad(y, leaf, dy.to(y.device, y.dtype))
    return y.detach(), dx


def make(rows, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g) * 3  # covers the saturated tails and the negative dip
    dy = torch.randn(rows, C, generator=g)
    return x.to(DEVICE, dtype), dy


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("rows,C", SHAPES)
def test_gelu(rows, C, dtype, floor):
    x, dy = make(rows, C, dtype, seed=rows * C)
    ours = run(ge.gelu, x, dy)
    peer = run(torch_gelu, x, dy)
    ref = run(ge.reference_gelu, x.double(), dy)
    for name, o, p, r in zip(["y", "dx"], ours, peer, ref):
        assert o.dtype == dtype and o.shape == x.shape, name
        assert not torch.isnan(o).any(), f"{name}: NaN survived (an element was never written)"
        err = (o.double() - r).abs().max().item()
        peer_err = (p.double() - r).abs().max().item()
        bound = 2 * peer_err + floor * r.abs().max().item()
        assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g} (torch's own err {peer_err:.3g})"


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter: numpy evaluates
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # both tl.where branches
def test_extremes_stay_finite():
    """Large |x| saturates without overflow: gelu -> x or -0, gelu' -> 1 or 0 (no inf * 0 = NaN)."""
    x = torch.tensor([-1e30, -1e20, -1e4, -20.0, -5.0, -1e-30, 0.0, 1e-30, 5.0, 20.0, 1e4, 1e20, 1e30],
                     device=DEVICE)
    y, dx = run(ge.gelu, x, torch.ones_like(x))
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    big = x.abs() >= 20  # tanh's argument >= 300: exactly +-1 in fp32, so y = x or 0, dx = 1 or 0 (measured exact)
    torch.testing.assert_close(y[big], torch.where(x[big] > 0, x[big], 0.0), rtol=1e-6, atol=0)
    torch.testing.assert_close(dx[big], (x[big] > 0).float(), rtol=0, atol=1e-6)
    ref_y, ref_dx = run(ge.reference_gelu, x[~big].double(), torch.ones(int((~big).sum())))
    # The exponent's argument reaches |2u log2 e| ~ 24 at x = -5: one fp32 rounding of it (2^-24 relative) is
    # 24 * 2^-24 * ln 2 ~ 1e-6 relative in e^-|2u|, and it takes two (the cube, the scale); on a GPU ex2.approx
    # and the divide add 2 ulps each. 4e-6 covers that; a formula error is orders larger.
    torch.testing.assert_close(y[~big].double(), ref_y, rtol=4e-6, atol=1e-12)
    torch.testing.assert_close(dx[~big].double(), ref_dx, rtol=4e-6, atol=1e-12)


def test_batched_noncontiguous_empty_and_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 2 * 50, generator=g).to(DEVICE)[..., ::2]  # non-contiguous (3, 17, 50)
    dy = torch.randn(3, 17, 50, generator=g)
    first, second = run(ge.gelu, x, dy), run(ge.gelu, x, dy)
    ref = run(ge.reference_gelu, x.double(), dy)
    for o, o2, r in zip(first, second, ref):
        assert torch.equal(o, o2)
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-6)  # fp32 vs fp64: measured 3.3e-7 at 3.4
    assert ge.gelu(torch.empty(0, 8, device=DEVICE)).shape == (0, 8)


def test_backward_saves_only_x():
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    y = ge.gelu(x)
    saved = [t for t in (y.grad_fn._saved_tensors if hasattr(y.grad_fn, "_saved_tensors") else ())]
    if not saved:  # custom_op's generated Function: read through the ctx
        saved = list(y.grad_fn.saved_tensors)
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_torch_compile_matches_eager():
    """torch.compile traces through the custom op (fullgraph: no graph break) and gives eager's result."""
    torch._dynamo.reset()
    x, dy = make(13, 64, torch.float32, seed=2)
    eager = run(ge.gelu, x, dy)
    compiled = run(torch.compile(ge.gelu, fullgraph=True), x, dy)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)  # same kernel, same inputs: measured bitwise


def test_seam_picks_the_kernel():
    ops = get_ops("triton", DEVICE)
    assert ops.gelu is ge.gelu and ops.placement["gelu"].startswith("triton")
    x = torch.randn(4, 9, device=DEVICE)
    # both fp32, tanh evaluated differently: a few ulps, measured 2.4e-7 at |y| <= 2.7
    torch.testing.assert_close(ops.gelu(x), F.gelu(x, approximate="tanh"), rtol=1e-5, atol=1e-6)
