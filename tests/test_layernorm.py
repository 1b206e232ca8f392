"""tritonrun/kernels/layernorm.py: forward and every gradient against an fp64 reference, fp32 / fp16 / bf16 (GPU),
odd shapes, poisoned outputs, deterministic backward, mixed dtypes, torch.compile, the seam."""
import pytest
import torch
import torch.nn.functional as F

from tritonrun.kernels import layernorm as ln
from tritonrun.gpt2.ops import get_ops, torch_add_layer_norm, torch_layer_norm
from tests.helpers import ELEMENTWISE_DTYPES, poison_allocations
HAS_CUDA = torch.cuda.is_available()

DEVICE = "cuda" if HAS_CUDA else "cpu"

# (rows, C): prime row counts; C a power of two, not one, GPT-2's widths, and the 8192 maximum.
SHAPES = [(37, 64), (41, 100), (31, 768), (29, 1024), (23, 1600), (3, 8192)]

# (dtype, floor in units of the largest reference magnitude). The rule (REFERENCE.md, flash-attention):
#   max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor * max|ref|,  ref = fp64 on the same inputs.
# Floors: the kernel rounds each output once at its store (<= 0.5 ulp) after fp32 math; torch's own
# worst error can land on a small element and be tiny, so 2x torch alone may undercut a single
# rounding of ours at the largest element. One ulp at the top magnitude covers that: eps(fp16) = 2^-10,
# eps(bf16) = 2^-7. For fp32 the floor is 8 ulps (2^-20): fp32 accumulation order over C (and over rows
# for dweight/dbias) differs from torch's, each ordering costing a few ulps; still ~1e-6 relative, tight.
DTYPES = ELEMENTWISE_DTYPES


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_allocations(monkeypatch, ln)


def make_inputs(rows, C, dtype, seed, residual_dtype=None, param_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g) * 2 + 0.5  # non-zero mean: the subtraction matters
    r = torch.randn(rows, C, generator=g)
    w = torch.randn(C, generator=g) * 0.5 + 1
    b = torch.randn(C, generator=g) * 0.5
    dy = torch.randn(rows, C, generator=g)
    ds = torch.randn(rows, C, generator=g)
    pd = param_dtype or dtype
    return (x.to(DEVICE, dtype), r.to(DEVICE, residual_dtype or dtype), w.to(DEVICE, pd), b.to(DEVICE, pd),
            dy, ds)


def run(fn, inputs, grad_outputs):
    """Outputs and grads of every input, with fresh leaves (so no state is shared between impls)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, [g.to(o.device, o.dtype) for g, o in zip(grad_outputs, outs)],
                                allow_unused=True)
    return [o.detach() for o in outs] + list(grads)


def assert_rule(names, ours, peer, ref, floor):
    """The low-precision rule per output; `floor` is the inputs' dtype's, and an fp32 output (the residual
    stream and parameter grads of the mixed-dtype path) gets the fp32 floor: it is never rounded to the low
    dtype, and a kernel that did round it would hide under the low dtype's floor."""
    for name, o, p, r in zip(names, ours, peer, ref):
        assert o.dtype == p.dtype and o.shape == p.shape, (name, o.dtype, p.dtype, o.shape, p.shape)
        assert not torch.isnan(o).any(), f"{name}: NaN survived (an element was never written)"
        r = r.double()
        err = (o.double() - r).abs().max().item()
        peer_err = (p.double() - r).abs().max().item()
        bound = 2 * peer_err + (2.0**-20 if o.dtype == torch.float32 else floor) * r.abs().max().item()
        assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g} (torch's own err {peer_err:.3g})"


def upcast(inputs):
    return [t.double() for t in inputs]


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("rows,C", SHAPES)
def test_layer_norm(rows, C, dtype, floor):
    x, _, w, b, dy, _ = make_inputs(rows, C, dtype, seed=rows * C)
    ref = run(lambda *a: ln.reference_layer_norm(*a), upcast([x, w, b]), [dy])
    peer = run(torch_layer_norm, [x, w, b], [dy])
    ours = run(ln.layer_norm, [x, w, b], [dy])
    assert_rule(["y", "dx", "dweight", "dbias"], ours, peer, ref, floor)


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("rows,C", SHAPES)
def test_add_layer_norm(rows, C, dtype, floor):
    x, r, w, b, dy, ds = make_inputs(rows, C, dtype, seed=rows * C + 1)
    ref = run(lambda *a: ln.reference_add_layer_norm(*a), upcast([x, r, w, b]), [dy, ds])
    peer = run(torch_add_layer_norm, [x, r, w, b], [dy, ds])
    ours = run(ln.add_layer_norm, [x, r, w, b], [dy, ds])
    assert_rule(["y", "s", "dx", "dresidual", "dweight", "dbias"], ours, peer, ref, floor)


@pytest.mark.parametrize("low,floor", [pytest.param(torch.float16, 2.0**-10, id="fp16"),
                                       pytest.param(torch.bfloat16, 2.0**-7, id="bf16")])
def test_add_layer_norm_mixed_dtypes(low, floor):
    """The autocast training path: low-precision branch output + fp32 residual stream and parameters.
    s and y are fp32; dx comes back in x's dtype (written by the same backward pass), dresidual fp32."""
    x, r, w, b, dy, ds = make_inputs(31, 768, low, seed=5, residual_dtype=torch.float32,
                                     param_dtype=torch.float32)
    ref = run(lambda *a: ln.reference_add_layer_norm(*a), upcast([x, r, w, b]), [dy, ds])
    peer = run(torch_add_layer_norm, [x, r, w, b], [dy, ds])
    ours = run(ln.add_layer_norm, [x, r, w, b], [dy, ds])
    assert ours[0].dtype == ours[1].dtype == torch.float32 and ours[2].dtype == low
    assert_rule(["y", "s", "dx", "dresidual", "dweight", "dbias"], ours, peer, ref, floor)
    # and the reverse order (fp32 x, low-precision residual) takes the other branch of the backward
    ours = run(ln.add_layer_norm, [r, x, w, b], [dy, ds])
    peer = run(torch_add_layer_norm, [r, x, w, b], [dy, ds])
    ref = run(lambda *a: ln.reference_add_layer_norm(*a), upcast([r, x, w, b]), [dy, ds])
    assert_rule(["y", "s", "dx", "dresidual", "dweight", "dbias"], ours, peer, ref, floor)


def test_backward_is_deterministic():
    """Two backward runs are bitwise equal (partials reduced in a fixed order; no atomics)."""
    dtype = torch.float16 if not HAS_CUDA else torch.bfloat16
    rows = 1031 if not HAS_CUDA else 16411  # prime; on a GPU enough rows for many programs per SM
    x, r, w, b, dy, ds = make_inputs(rows, 768, dtype, seed=7, residual_dtype=torch.float32,
                                     param_dtype=torch.float32)
    first = run(ln.add_layer_norm, [x, r, w, b], [dy, ds])
    second = run(ln.add_layer_norm, [x, r, w, b], [dy, ds])
    for name, a, c in zip(["y", "s", "dx", "dresidual", "dweight", "dbias"], first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


def test_dx_and_dresidual_are_one_tensor():
    x, r, w, b, dy, ds = make_inputs(11, 100, torch.float32, seed=3)
    _, _, dx, dr, _, _ = run(ln.add_layer_norm, [x, r, w, b], [dy, ds])
    assert dx.data_ptr() == dr.data_ptr(), "same-dtype add_layer_norm should return ds for both inputs"


def test_batched_noncontiguous_and_partial_use():
    """(B, T, C) input, a non-contiguous x, and gradients flowing from only one of the two outputs. fp32 against
    fp64, 1e-5 abs + rel: a few fp32 ulps of outputs up to ~30 (measured <= 4.4e-6, a fifth of the bound)."""
    g = torch.Generator().manual_seed(11)
    base = torch.randn(5, 23, 2 * 96, generator=g).to(DEVICE)
    x = base[..., ::2]  # (5, 23, 96), stride 2 in the last dim
    r = torch.randn(5, 23, 96, generator=g).to(DEVICE)
    w, b = torch.randn(96, generator=g).to(DEVICE), torch.randn(96, generator=g).to(DEVICE)
    dy = torch.randn(5, 23, 96, generator=g)
    ours = run(ln.layer_norm, [x, w, b], [dy])
    ref = run(lambda *a: ln.reference_layer_norm(*a), upcast([x, w, b]), [dy])
    for o, rf in zip(ours, ref):
        torch.testing.assert_close(o.double(), rf, rtol=1e-5, atol=1e-5)
    for keep in ("y", "s"):  # only one output reaches the loss
        def f(*a, keep=keep):
            y, s = ln.add_layer_norm(*a)
            return y if keep == "y" else s

        def f_ref(*a, keep=keep):
            y, s = ln.reference_add_layer_norm(*a)
            return y if keep == "y" else s

        ours = run(f, [x, r, w, b], [dy])
        ref = run(f_ref, upcast([x, r, w, b]), [dy])
        for o, rf in zip(ours, ref):
            if rf is None:  # weight/bias get no gradient when only s is used
                assert keep == "s" and o is None
                continue
            torch.testing.assert_close(o.double(), rf, rtol=1e-5, atol=1e-5)


def test_constant_rows_and_eps():
    """var = 0 rows: y == bias exactly, and eps is the one passed in."""
    x = torch.full((7, 64), 3.0, device=DEVICE)
    w, b = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    torch.testing.assert_close(ln.layer_norm(x, w, b, 1e-5), b.expand(7, 64), rtol=0, atol=0)
    x = torch.randn(7, 64, device=DEVICE) * 1e-2
    for eps in (1e-5, 1e-1):
        torch.testing.assert_close(ln.layer_norm(x, w, b, eps), F.layer_norm(x, (64,), w, b, eps),
                                   rtol=1e-5, atol=1e-5)  # both fp32, other sum order: measured 4.8e-7


def test_edge_sizes():
    w, b = torch.ones(64, device=DEVICE), torch.zeros(64, device=DEVICE)
    assert ln.layer_norm(torch.empty(0, 64, device=DEVICE), w, b).shape == (0, 64)
    with pytest.raises(ValueError, match="C=8200 is outside"):
        ln.layer_norm(torch.randn(2, 8200, device=DEVICE), torch.ones(8200, device=DEVICE),
                      torch.zeros(8200, device=DEVICE))


def test_torch_compile_matches_eager():
    """torch.compile traces through the custom ops (fullgraph: no graph break) and gives eager's result."""
    torch._dynamo.reset()

    def f(x, r, w, b):  # both ops, chained; no pointwise glue (keeps inductor's CPU codegen short)
        y, s = ln.add_layer_norm(x, r, w, b)
        return ln.layer_norm(y, w, b, 1e-5), s

    x, r, w, b, dy, ds = make_inputs(26, 64, torch.float32, seed=9)
    x, r, dy, ds = (t.view(2, 13, 64) for t in (x, r, dy, ds))  # (B, T, C), as in the model
    eager = run(f, [x, r, w, b], [dy, ds])
    compiled = run(torch.compile(f, fullgraph=True), [x, r, w, b], [dy, ds])
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)  # same kernels, same inputs: measured bitwise


def test_seam_picks_the_kernel():
    ops = get_ops("triton", DEVICE)
    assert ops.layer_norm is ln.layer_norm and ops.add_layer_norm is ln.add_layer_norm
    assert ops.placement["layer_norm"].startswith("triton")
