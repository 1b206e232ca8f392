"""tritonrun/kernels/rmsnorm.py: rms_norm, add_rms_norm and mix_rms_norm, forward and every gradient against an fp64
reference, fp32 / fp16 / bf16 (GPU), odd shapes, poisoned outputs, mixed dtypes, deterministic lambdas grads,
strided inputs, torch.compile, the seam."""
import pytest
import torch
import torch.nn.functional as F

from tritonrun.kernels import rmsnorm as rn
from tritonrun.gpt2.ops import TRITON_OPS, get_ops
from tests.helpers import ELEMENTWISE_DTYPES, poison_allocations

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
EPS = 1e-6

# (rows, C): prime row counts; C a power of two, not one (100, 129: one past a power of two), the speedrun's
# width 768, a BLOCK_N = 2048 width, and the 8192 maximum.
SHAPES = [(37, 64), (41, 100), (31, 768), (29, 129), (7, 1600), (3, 8192)]

# (dtype, floor in units of the largest reference magnitude). The rule (REFERENCE.md, flash-attention):
#   max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor * max|ref|,  ref = fp64 on the same inputs.
# Floors (tests/helpers.py): one ulp at the top magnitude for fp16 (2^-10) and bf16 (2^-7), since torch's worst
# error can land on a small element while our single rounding lands on the largest; 8 ulps (2^-20) for fp32,
# where the sum over C (and, for the lambdas' grads, over rows * C) runs in another order than torch's.
DTYPES = ELEMENTWISE_DTYPES


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_allocations(monkeypatch, rn)


# The torch peers: what the model computes without the kernels (F.rms_norm in the inputs' dtype).
def torch_rms_norm(x, eps=EPS):
    return F.rms_norm(x, (x.shape[-1],), eps=eps)


def torch_add_rms_norm(x, residual, eps=EPS):
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), eps=eps), s


def torch_mix_rms_norm(x, x0, lambdas, eps=EPS):
    s = lambdas[0] * x + lambdas[1] * x0  # 0-dim lambdas do not promote x: s keeps the inputs' dtype
    return F.rms_norm(s, (s.shape[-1],), eps=eps), s


def make_inputs(rows, C, dtype, seed, other_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, C, generator=g) * 2 + 0.5  # non-zero mean: RMS is not the std
    other = torch.randn(rows, C, generator=g)
    lambdas = torch.tensor([0.8, 0.35]) + 0.1 * torch.randn(2, generator=g)  # neither 1 nor 0: both terms count
    # Output grads in the outputs' dtype, so that the fp64 reference gets exactly what the kernel and the peer
    # get: else rounding dy alone moves the lambdas' grads (a sum over rows * C) further than either one's error.
    out_dtype = torch.promote_types(dtype, other_dtype or dtype)
    dy = torch.randn(rows, C, generator=g).to(out_dtype)
    ds = torch.randn(rows, C, generator=g).to(out_dtype)
    return x.to(DEVICE, dtype), other.to(DEVICE, other_dtype or dtype), lambdas.to(DEVICE), dy, ds


def run(fn, inputs, grad_outputs):
    """Outputs and grads of every input, with fresh leaves (so no state is shared between impls)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs, leaves, [g.to(o.device, o.dtype) for g, o in zip(grad_outputs, outs)],
                                allow_unused=True)
    return [o.detach() for o in outs] + list(grads)


def assert_rule(names, ours, peer, ref, floor):
    """The low-precision rule per output; `floor` is the inputs' dtype's, and an fp32 output (the residual stream
    of the mixed-dtype path, the lambdas' grads) gets the fp32 floor: it is never rounded to the low dtype."""
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
def test_rms_norm(rows, C, dtype, floor):
    x, _, _, dy, _ = make_inputs(rows, C, dtype, seed=rows * C)
    ref = run(lambda a: rn.reference_rms_norm(a, EPS), upcast([x]), [dy])
    peer = run(torch_rms_norm, [x], [dy])
    ours = run(lambda a: rn.rms_norm(a, EPS), [x], [dy])
    assert_rule(["y", "dx"], ours, peer, ref, floor)


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("rows,C", SHAPES)
def test_add_rms_norm(rows, C, dtype, floor):
    x, r, _, dy, ds = make_inputs(rows, C, dtype, seed=rows * C + 1)
    ref = run(lambda *a: rn.reference_add_rms_norm(*a, EPS), upcast([x, r]), [dy, ds])
    peer = run(torch_add_rms_norm, [x, r], [dy, ds])
    ours = run(lambda *a: rn.add_rms_norm(*a, EPS), [x, r], [dy, ds])
    assert_rule(["y", "s", "dx", "dresidual"], ours, peer, ref, floor)


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("rows,C", SHAPES)
def test_mix_rms_norm(rows, C, dtype, floor):
    """y and s, and the grads of x, x0 and the (fp32) lambdas, with both outputs' grads flowing."""
    x, x0, lam, dy, ds = make_inputs(rows, C, dtype, seed=rows * C + 2)
    ref = run(lambda *a: rn.reference_mix_rms_norm(*a, EPS), upcast([x, x0, lam]), [dy, ds])
    peer = run(torch_mix_rms_norm, [x, x0, lam], [dy, ds])
    ours = run(lambda *a: rn.mix_rms_norm(*a, EPS), [x, x0, lam], [dy, ds])
    assert ours[4].dtype == torch.float32
    assert_rule(["y", "s", "dx", "dx0", "dlambdas"], ours, peer, ref, floor)


@pytest.mark.parametrize("low,floor", [pytest.param(torch.float16, 2.0**-10, id="fp16"),
                                       pytest.param(torch.bfloat16, 2.0**-7, id="bf16")])
def test_mixed_dtypes(low, floor):
    """The autocast training path: a low-precision branch output + the fp32 residual stream. s and y are fp32;
    each input's grad comes back in its own dtype (add: the low copy written by the same backward pass)."""
    x, r, lam, dy, ds = make_inputs(31, 768, low, seed=5, other_dtype=torch.float32)
    for a, b in ((x, r), (r, x)):  # both orders: the backward's low-precision copy serves either input
        ours = run(lambda *t: rn.add_rms_norm(*t, EPS), [a, b], [dy, ds])
        assert ours[0].dtype == ours[1].dtype == torch.float32 and (ours[2].dtype, ours[3].dtype) == (a.dtype, b.dtype)
        assert_rule(["y", "s", "dx", "dresidual"], ours, run(torch_add_rms_norm, [a, b], [dy, ds]),
                    run(lambda *t: rn.reference_add_rms_norm(*t, EPS), upcast([a, b]), [dy, ds]), floor)
        ours = run(lambda *t: rn.mix_rms_norm(*t, EPS), [a, b, lam], [dy, ds])
        assert (ours[2].dtype, ours[3].dtype) == (a.dtype, b.dtype)
        assert_rule(["y", "s", "dx", "dx0", "dlambdas"], ours, run(torch_mix_rms_norm, [a, b, lam], [dy, ds]),
                    run(lambda *t: rn.reference_mix_rms_norm(*t, EPS), upcast([a, b, lam]), [dy, ds]), floor)


def test_mix_backward_is_deterministic():
    """Two backward runs are bitwise equal: the lambdas' partials reduce in a fixed order, no atomics."""
    rows = 1031 if not HAS_CUDA else 16411  # prime; on a GPU enough rows for thousands of programs
    x, x0, lam, dy, ds = make_inputs(rows, 768, torch.float32, seed=7)
    first = run(lambda *a: rn.mix_rms_norm(*a, EPS), [x, x0, lam], [dy, ds])
    second = run(lambda *a: rn.mix_rms_norm(*a, EPS), [x, x0, lam], [dy, ds])
    for name, a, c in zip(["y", "s", "dx", "dx0", "dlambdas"], first, second):
        assert torch.equal(a, c), f"{name} differs between two identical runs"


def test_mix_with_x_is_x0():
    """Block 0 of the speedrun model mixes x0 with itself: both grads reach the one tensor and add up."""
    _, x0, lam, dy, ds = make_inputs(23, 100, torch.float32, seed=8)
    ours = run(lambda a, lm: rn.mix_rms_norm(a, a, lm, EPS), [x0, lam], [dy, ds])
    ref = run(lambda a, lm: rn.reference_mix_rms_norm(a, a, lm, EPS), upcast([x0, lam]), [dy, ds])
    # fp32 vs fp64: dlambdas, 2300-term sums, measured 1.3e-5 at 5.1 (a fifth of the bound); the rest <= 5.3e-7
    for name, o, r in zip(["y", "s", "dx0", "dlambdas"], ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5, msg=name)


def test_dx_and_dresidual_are_one_tensor():
    x, r, _, dy, ds = make_inputs(11, 100, torch.float32, seed=3)
    _, _, dx, dr = run(lambda *a: rn.add_rms_norm(*a, EPS), [x, r], [dy, ds])
    assert dx.data_ptr() == dr.data_ptr(), "same-dtype add_rms_norm should return ds for both inputs"


@pytest.mark.parametrize("keep", ["y", "s"])
@pytest.mark.parametrize("op", ["add", "mix"])
def test_partial_use(op, keep):
    """Gradients flowing from only one of the two outputs (the final norm's s is unused). fp32 against fp64,
    1e-5 abs + rel: a few fp32 ulps of values up to ~120 (measured <= 1.8e-5, a ninth of the bound)."""
    x, other, lam, dy, _ = make_inputs(19, 129, torch.float32, seed=4)
    fns = {"add": (lambda a, b, lm: rn.add_rms_norm(a, b, EPS), lambda a, b, lm: rn.reference_add_rms_norm(a, b, EPS)),
           "mix": (lambda a, b, lm: rn.mix_rms_norm(a, b, lm, EPS),
                   lambda a, b, lm: rn.reference_mix_rms_norm(a, b, lm, EPS))}[op]
    pick = 0 if keep == "y" else 1
    ours = run(lambda *a: fns[0](*a)[pick], [x, other, lam], [dy])
    ref = run(lambda *a: fns[1](*a)[pick], upcast([x, other, lam]), [dy])
    for o, r in zip(ours, ref):
        if r is None:  # add_rms_norm's lambdas are not an input
            assert o is None
            continue
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


def test_strided_inputs():
    """(B, T, C) inputs that are not contiguous: a column slice of a wider tensor (leading dims collapse into
    one row stride: read in place, no copy), every other batch (do not collapse: copied), a strided last dim
    (copied), and an expanded (stride-0) gradient. fp32 against fp64, 1e-5 abs + rel: a few fp32 ulps of values
    up to ~220 (measured <= 2e-5, a tenth of the bound)."""
    g = torch.Generator().manual_seed(11)
    wide = torch.randn(5, 23, 3 * 96, generator=g).to(DEVICE)
    sliced = wide[..., 96:192]  # (5, 23, 96), row stride 288
    assert rn._as_rows(sliced).data_ptr() == sliced.data_ptr() and rn._as_rows(sliced).stride() == (288, 1)
    every_other = torch.randn(10, 23, 96, generator=g).to(DEVICE)[::2]
    last_strided = torch.randn(5, 23, 2 * 96, generator=g).to(DEVICE)[..., ::2]
    other = torch.randn(5, 23, 96, generator=g).to(DEVICE)[:, :, :]
    lam = torch.tensor([0.9, 0.2], device=DEVICE)
    dy = torch.randn(5, 23, 96, generator=g)
    ds = torch.randn(96, generator=g).expand(5, 23, 96)
    for x in (sliced, every_other, last_strided):
        ours = run(lambda a: rn.rms_norm(a, EPS), [x], [dy])
        ref = run(lambda a: rn.reference_rms_norm(a, EPS), upcast([x]), [dy])
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)
        for fn, ref_fn, inputs in ((rn.add_rms_norm, rn.reference_add_rms_norm, [x, wide[..., :96]]),
                                   (rn.mix_rms_norm, rn.reference_mix_rms_norm, [other, x, lam])):
            ours = run(lambda *a, fn=fn: fn(*a, EPS), inputs, [dy, ds])
            ref = run(lambda *a, fn=ref_fn: fn(*a, EPS), upcast(inputs), [dy, ds])
            for o, r in zip(ours, ref):
                torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5)


def test_zero_rows_and_eps():
    """All-zero rows give y = 0 and finite grads (rstd = eps^-1/2); eps is the one passed in, and None means
    F.rms_norm's default (finfo(dtype).eps)."""
    x = torch.zeros(7, 64, device=DEVICE, requires_grad=True)
    y = rn.rms_norm(x, 1e-6)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    assert torch.equal(y, torch.zeros_like(y)) and torch.isfinite(dx).all()
    x = torch.randn(7, 64, device=DEVICE) * 1e-3  # mean(x^2) ~ 1e-6: eps matters
    for eps in (1e-6, 1e-1, None):  # both fp32, other sum order: measured 4.8e-7 at |y| <= 3.4
        torch.testing.assert_close(rn.rms_norm(x, eps), F.rms_norm(x, (64,), eps=eps), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(rn.add_rms_norm(x, x, eps)[0], F.rms_norm(2 * x, (64,), eps=eps),
                                   rtol=1e-5, atol=1e-6)


def test_edge_sizes_and_errors():
    lam = torch.tensor([1.0, 0.0], device=DEVICE, requires_grad=True)
    assert rn.rms_norm(torch.empty(0, 64, device=DEVICE)).shape == (0, 64)
    x = torch.empty(0, 64, device=DEVICE, requires_grad=True)
    y, s = rn.mix_rms_norm(x, x, lam)
    assert y.shape == s.shape == (0, 64)
    dx, dl = torch.autograd.grad((y, s), (x, lam), (torch.ones_like(y), torch.ones_like(s)))
    assert dx.shape == (0, 64) and torch.equal(dl, torch.zeros(2, device=DEVICE))  # an empty sum is 0
    with pytest.raises(ValueError, match="C=8200 is outside"):
        rn.rms_norm(torch.randn(2, 8200, device=DEVICE))
    with pytest.raises(ValueError, match="must have the same shape"):
        rn.add_rms_norm(torch.randn(2, 8, device=DEVICE), torch.randn(3, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"lambdas must be a \(2,\) float tensor"):
        rn.mix_rms_norm(torch.randn(2, 8, device=DEVICE), torch.randn(2, 8, device=DEVICE),
                        torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="floating-point"):
        rn.rms_norm(torch.ones(2, 8, dtype=torch.int64, device=DEVICE))


def test_torch_compile_matches_eager():
    """torch.compile traces through the custom ops (fullgraph: no graph break) and gives eager's result."""
    torch._dynamo.reset()

    def f(x, r, lam):  # the three ops chained, as a block uses them; no pointwise glue
        y, s = rn.add_rms_norm(x, r, EPS)
        y2, s2 = rn.mix_rms_norm(y, s, lam, EPS)
        return rn.rms_norm(y2, EPS), s2

    x, r, lam, dy, ds = make_inputs(26, 64, torch.float32, seed=9)
    x, r, dy, ds = (t.view(2, 13, 64) for t in (x, r, dy, ds))  # (B, T, C), as in the model
    eager = run(f, [x, r, lam], [dy, ds])
    compiled = run(torch.compile(f, fullgraph=True), [x, r, lam], [dy, ds])
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)  # same kernels, same inputs: measured bitwise


@pytest.mark.parametrize("name,attr", [("rms_norm", "rms_norm"), ("add_rms_norm", "add_rms_norm"),
                                       ("mix_rms_norm", "mix_rms_norm")])
def test_seam_picks_the_kernel(name, attr):
    assert TRITON_OPS[name] == ("tritonrun.kernels.rmsnorm", attr)
    ops = get_ops("triton", DEVICE)
    assert getattr(ops, name) is getattr(rn, attr) and ops.placement[name].startswith("triton")
