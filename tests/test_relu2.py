"""tritonrun/kernels/relu2.py: forward and dx against an fp64 reference, fp32 / fp16 / bf16 (GPU), odd sizes, poisoned
outputs, NaN and overflow behaviour, strided input, only x saved, torch.compile, the seam."""
import pytest
import torch
import torch.nn.functional as F

from tritonrun.kernels import relu2 as r2
from tritonrun.gpt2.ops import TRITON_OPS, get_ops
from tests.helpers import ELEMENTWISE_DTYPES, poison_allocations

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (rows, C): prime row counts, the speedrun MLP's hidden width 4 * 768 and odd ones; the element count is never
# a multiple of the block, so the masked tail is always exercised.
SHAPES = [(37, 64), (41, 100), (31, 768), (29, 129), (13, 4 * 768)]

# Rule (REFERENCE.md): max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor * max|ref|, ref = fp64 on the
# same inputs. Floors (tests/helpers.py): one ulp at the largest magnitude for fp16/bf16, 8 ulps (2^-20) for
# fp32. relu(x)^2 and 2 relu(x) dy are one rounding each here; torch's eager square is one too, its backward
# (2 relu(x) then * dy) may be two, so the bound is rarely tight: a formula error is orders above it.
DTYPES = ELEMENTWISE_DTYPES


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_allocations(monkeypatch, r2)


def torch_relu2(x):  # the torch peer: the record's F.relu(x).square()
    return F.relu(x).square()


def run(fn, x, dy):
    leaf = x.detach().clone().requires_grad_()
    y = fn(leaf)
    (dx,) = torch.autograd.grad(y, leaf, dy.to(y.device, y.dtype))
    return y.detach(), dx


def make(rows, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g) * 3  # half negative (zero output and grad), half squared
    x[0, :4] = torch.tensor([0.0, -0.0, 1e-30, -1e-30])  # the kink
    dy = torch.randn(rows, C, generator=g)
    return x.to(DEVICE, dtype), dy


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("rows,C", SHAPES)
def test_relu2(rows, C, dtype, floor):
    x, dy = make(rows, C, dtype, seed=rows * C)
    ours = run(r2.relu2, x, dy)
    peer = run(torch_relu2, x, dy)
    ref = run(r2.reference_relu2, x.double(), dy)
    for name, o, p, r in zip(["y", "dx"], ours, peer, ref):
        assert o.dtype == dtype and o.shape == x.shape, name
        assert not torch.isnan(o).any(), f"{name}: NaN survived (an element was never written)"
        err = (o.double() - r).abs().max().item()
        peer_err = (p.double() - r).abs().max().item()
        bound = 2 * peer_err + floor * r.abs().max().item()
        assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g} (torch's own err {peer_err:.3g})"
    negative = x <= 0
    assert (ours[0][negative] == 0).all() and (ours[1][negative] == 0).all()  # exactly zero, not tiny


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # interpreter: numpy's fp16 cast
def test_nan_and_overflow_as_torch():
    """NaN propagates to y and dx (a max() would drop it on a GPU); fp16 overflow gives inf as torch's does."""
    x = torch.tensor([float("nan"), -1.0, 2.0, 300.0, -300.0, float("inf"), float("-inf")], device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        xd = x.to(dtype)
        y, dx = run(r2.relu2, xd, torch.ones(7))
        y_t, dx_t = run(torch_relu2, xd, torch.ones(7))
        torch.testing.assert_close(y, y_t, equal_nan=True, rtol=0, atol=0)
        torch.testing.assert_close(dx, dx_t, equal_nan=True, rtol=0, atol=0)
        assert torch.isnan(y[0]) and torch.isnan(dx[0])


def test_batched_noncontiguous_empty_and_deterministic():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 17, 2 * 50, generator=g).to(DEVICE)[..., ::2]  # non-contiguous (3, 17, 50)
    dy = torch.randn(3, 17, 50, generator=g)
    first, second = run(r2.relu2, x, dy), run(r2.relu2, x, dy)
    ref = run(r2.reference_relu2, x.double(), dy)
    for o, o2, r in zip(first, second, ref):
        assert torch.equal(o, o2)
        torch.testing.assert_close(o.double(), r, rtol=1e-6, atol=1e-7)  # one fp32 rounding: measured 5.8e-8 rel
    assert r2.relu2(torch.empty(0, 8, device=DEVICE)).shape == (0, 8)
    with pytest.raises(ValueError, match="floating-point"):
        r2.relu2(torch.ones(3, dtype=torch.int64, device=DEVICE))


def test_backward_saves_only_x():
    x = torch.randn(5, 7, device=DEVICE, requires_grad=True)
    y = r2.relu2(x)
    saved = list(y.grad_fn.saved_tensors)  # custom_op's generated Function: read through the ctx
    assert len(saved) == 1 and saved[0].data_ptr() == x.data_ptr()


def test_torch_compile_matches_eager():
    """torch.compile traces through the custom op (fullgraph: no graph break) and gives eager's result."""
    torch._dynamo.reset()
    x, dy = make(13, 64, torch.float32, seed=2)
    eager = run(r2.relu2, x, dy)
    compiled = run(torch.compile(r2.relu2, fullgraph=True), x, dy)
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)  # same kernel, same inputs: measured bitwise


def test_seam_picks_the_kernel():
    assert TRITON_OPS["relu2"] == ("tritonrun.kernels.relu2", "relu2")
    ops = get_ops("triton", DEVICE)
    assert ops.relu2 is r2.relu2 and ops.placement["relu2"].startswith("triton")
    x = torch.randn(4, 9, device=DEVICE)
    torch.testing.assert_close(ops.relu2(x), torch_relu2(x), rtol=1e-6, atol=1e-7)  # one rounding each: bitwise
