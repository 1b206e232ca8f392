"""Muon (tritonrun/kernels/muon.py) against float64 references, the SVD polar factor, and a plain-torch Muon.

References: `svd_newton_schulz` (float64, through the SVD: U·p_k(...p_1(σ/‖G‖))·Vᵀ, no matmul iteration at all),
`reference_newton_schulz_fp64` (the iteration, float64), `polar_factor` (U·Vᵀ, the limit), `reference_newton_schulz`
(plain torch, the record's op order, bf16) and `reference_muon_step` (the record's per-tensor loop).

All on CPU (Muon has no Triton kernel: tritonrun/kernels/muon.py says why), small shapes except the d12 band fixture.
DDP sharding: 2 gloo ranks under torchrun.

Low-precision rule (REFERENCE.md): max|ours - ref64| <= 2·max|torch_lowprec - ref64| + floor, where torch_lowprec is
the record-style plain-torch iteration in the same dtype and floor is one rounding of the output (unit roundoff of
the dtype times max|ref64|).
"""
import copy
import io
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tritonrun.kernels import muon
from tests.helpers import one_thread_env
from tritonrun.kernels.muon import (POLAR_EXPRESS, QUINTIC, Muon, muon_momentum_at, newton_schulz, ns_coefficients,
                          polar_factor, reference_muon_step, reference_newton_schulz, reference_newton_schulz_fp64,
                          shape_scale, svd_newton_schulz)

UNIT_ROUNDOFF = {torch.bfloat16: 2.0 ** -8, torch.float32: 2.0 ** -24}
SHAPES = [(37, 23), (23, 37), (31, 31), (5, 64)]  # tall, wide, square, very wide; none a power of two but one
# q/k/v/attn-proj, and c_fc (3072x768), which Newton-Schulz runs transposed: the MLP proj's 768x3072 iteration
D12 = [(768, 768), (3072, 768)]


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def max_err(x, ref):
    return (x.double() - ref.double()).abs().max().item()


def quintic(x, a=QUINTIC[0], b=QUINTIC[1], c=QUINTIC[2]):
    return a * x + b * x ** 3 + c * x ** 5


# ------------------------------------------------------------------------------------------ coefficients
def test_published_coefficients_and_refusals():
    assert QUINTIC == (3.4445, -4.7750, 2.0315)  # the 2024-11-10 record
    assert len(POLAR_EXPRESS) == 5  # REFERENCE.md: first triple 8.1566, -22.4833, 15.8788
    assert [round(v, 4) for v in POLAR_EXPRESS[0]] == [8.1566, -22.4833, 15.8788]
    assert muon.SAFETY == {"quintic": 1.0, "polar_express": 1.02}
    triples, safety = ns_coefficients("polar_express", 3)
    assert triples == list(POLAR_EXPRESS[:3]) and safety == 1.02
    for bad, words in [(("cubic", 5), "unknown coefficients"), (("polar_express", 6), "published for 5 steps"),
                       (("quintic", 0), "positive int"), (([QUINTIC] * 2, 3), "must be 3 .a, b, c. triples")]:
        with pytest.raises(ValueError, match=words):
            ns_coefficients(*bad)
    with pytest.raises(ValueError, match="2-D hidden matrices only; give embeddings"):
        Muon([torch.zeros(3, 4, requires_grad=True), torch.zeros(5, requires_grad=True)])
    with pytest.raises(ValueError, match="published for 5 steps"):
        Muon([torch.zeros(3, 4, requires_grad=True)], coefficients="polar_express", ns_steps=7)


def test_momentum_warmup_and_shape_scale():
    assert [muon_momentum_at(s) for s in (0, 250, 500, 3000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert muon_momentum_at(5, warmup_steps=10, start=0.5, end=0.7) == pytest.approx(0.6)
    assert shape_scale(3072, 768) == 2.0 and shape_scale(768, 3072) == 1.0 and shape_scale(768, 768) == 1.0


# ------------------------------------------------------------------------------------------ Newton-Schulz
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_fp64_iteration_equals_the_svd_form(shape, coefficients):
    """The matmul iteration (transpose, normalisation, coefficients, order) is the scalar polynomial applied to
    each singular value: two independent float64 computations agree to rounding (measured <= 5.3e-15; 1e-12 is
    200x that, far below any formula slip)."""
    G = randn(*shape, seed=1)
    via_svd, _ = svd_newton_schulz(G, coefficients=coefficients)
    assert max_err(reference_newton_schulz_fp64(G, coefficients=coefficients), via_svd) < 1e-12
    assert max_err(newton_schulz(G, coefficients=coefficients, dtype=torch.float64), via_svd) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_against_float64(shape, coefficients, dtype):
    G = randn(*shape, seed=2)
    ref, _ = svd_newton_schulz(G, coefficients=coefficients)
    out = torch.full(shape, float("nan"), dtype=dtype)  # poisoned: a result that is not written shows
    out.copy_(newton_schulz(G, coefficients=coefficients, dtype=dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch_err = max_err(reference_newton_schulz(G, coefficients=coefficients, dtype=dtype), ref)
    floor = UNIT_ROUNDOFF[dtype] * ref.abs().max().item()
    assert max_err(out, ref) <= 2 * torch_err + floor, (max_err(out, ref), torch_err)


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
def test_a_stack_is_each_matrix_orthogonalized_on_its_own(coefficients):
    """Muon orthogonalizes same-shape matrices as one batch: each slice must be that matrix's own result (its
    own norm), tall stacks transposed per matrix. Tolerance: the low-precision rule per slice, floor one bf16
    rounding (2^-8 of max|ref|) as in test_newton_schulz_against_float64."""
    for shape in [(3, 29, 11), (3, 11, 29)]:
        G = randn(*shape, seed=3) * torch.tensor([1.0, 1e-3, 50.0], dtype=torch.float32)[:, None, None]
        out = newton_schulz(G, coefficients=coefficients)
        assert out.shape == G.shape
        for i in range(shape[0]):
            ref, _ = svd_newton_schulz(G[i], coefficients=coefficients)
            torch_err = max_err(reference_newton_schulz(G[i], coefficients=coefficients), ref)
            assert max_err(out[i], ref) <= 2 * torch_err + 2.0 ** -8 * ref.abs().max().item()


def test_the_svd_polar_factor_is_the_limit():
    """U·Vᵀ is the fixed point Newton-Schulz approximates: an iteration with p(1) = 1, p'(1) = 0 (the classical
    quintic (15/8, -10/8, 3/8)) converges to it; the record's quintic keeps U and V exactly and moves only the
    singular values (into the band tested below). The 1e-12 bounds: float64 rounding of <= 12 steps of 40 x 24
    matmuls (measured <= 2.7e-15), far below the 0.05 that separates the quintic's output from the limit."""
    G = randn(40, 24, seed=4) + 3 * torch.eye(40, 24)  # σ_min / ‖G‖_F ≈ 0.1: converges in few steps
    P = polar_factor(G)
    assert max_err(P.T @ P, torch.eye(24, dtype=torch.float64)) < 1e-12
    classical = newton_schulz(G, steps=12, coefficients=[(15 / 8, -10 / 8, 3 / 8)] * 12, dtype=torch.float64)
    assert max_err(classical, P) < 1e-12
    out, x = svd_newton_schulz(G)  # record's quintic: U·diag(x)·Vᵀ, x in the band, not 1
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    assert max_err(U.T @ newton_schulz(G, dtype=torch.float64) @ Vh.T, torch.diag(x)) < 1e-12
    assert max_err(out, P) > 0.05


# ------------------------------------------------------------------------------------------ the band, d12 shapes
def quintic_band(steps=5, x0=0.01):
    """Where the record's 5 quintic steps put a singular value that starts at σ/‖G‖_F ∈ [x0, 1].

    p(x) = 3.4445x - 4.7750x³ + 2.0315x⁵ has a local minimum at x* ≈ 1.0501 with L = p(x*) ≈ 0.6818, and a local
    maximum at ≈ 0.5545 (p ≈ 1.2024). Let U = p(L) ≈ 1.1344. [L, U] is invariant: it contains x* (so p >= L on it)
    and lies right of the local maximum (so p <= p(L) = U on it). It is the attractor: a value >= 0.01 grows by
    about a = 3.44 per step while small (0.01 -> 0.034 -> 0.117 -> 0.37 -> 0.94) and lands in [L, U] within 5
    steps, then oscillates there instead of converging to 1 (p(1) = 0.70, p'(1) ≠ 0). Smaller inputs are not yet
    there after 5 steps (they stay below L, or overshoot up to 1.2024 when they pass 0.5545 on the last step).
    Returned: (L, U) from the closed form, checked against iterating p on a fine grid of [x0, 1]."""
    a, b, c = QUINTIC
    disc = np.sqrt(9 * b * b - 20 * a * c)
    x_star = np.sqrt((-3 * b + disc) / (10 * c))  # p'(x) = a + 3b x² + 5c x⁴ = 0, the larger root
    lo = quintic(x_star)
    hi = quintic(lo)
    y = np.linspace(x0, 1.0, 200_001)
    for _ in range(steps):
        y = quintic(y)
    assert abs(y.min() - lo) < 1e-6 and abs(y.max() - hi) < 1e-6  # a 5e-6 grid at flat extrema: measured 1.5e-10
    return lo, hi


# bf16 margin: the last step's output is rounded to bf16 (relative 2^-9 per element), a random perturbation with
# entries of std ≈ 2^-9/√3 · σ/√n, whose spectral norm is ≈ that · (√m + √n) <= 2^-8·σ/√3 ≈ 0.0023 at σ ≈ 1.2; earlier
# steps' roundings pass through p (|p'| <= ~1.5 on the band) and add about as much again (measured: 0.0033 at the
# d12 shapes). 0.01 is 3x the measured deviation and still far inside the published Uniform(0.5, 1.5).
BF16_BAND_MARGIN = 0.01


def gram_svd(G):
    """float64 SVD through the eigendecomposition of the small Gram matrix (fast enough at 768 x 3072 on 2 cores;
    accurate for σ well above 1e-8·σ_max, which is all the band test uses)."""
    G = G.double()
    wide = G.shape[0] <= G.shape[1]
    M = G if wide else G.T
    w, U = torch.linalg.eigh(M @ M.T)
    S = w.clamp_min(0).sqrt()
    V = (M.T @ U) / S.clamp_min(1e-300)
    return (U, S, V) if wide else (V, S, U)  # G = U·diag(S)·Vᵀ


def singular_values(X):
    X = X.double()
    M = X if X.shape[0] <= X.shape[1] else X.T
    return torch.linalg.eigvalsh(M @ M.T).clamp_min(0).sqrt()


def polynomial(x, coefficients, steps=5):
    """The scalar map Newton-Schulz applies to each normalised singular value x = σ/‖G‖_F."""
    triples, safety = ns_coefficients(coefficients, steps)
    x = x / safety
    for a, b, c in triples:
        x = a * x + b * x ** 3 + c * x ** 5
    return x


@pytest.fixture(scope="module", params=D12, ids=lambda s: f"{s[0]}x{s[1]}")
def d12(request):
    """A random matrix of a d12 speedrun shape, its SVD, and the quintic / Polar Express outputs in bf16 (Muon's
    path) and float64 (U·diag(p(x))·Vᵀ: the iteration without rounding, which test_fp64_iteration_equals_the_svd_form
    ties to the matmul iteration; built from the SVD here because fp64 GEMMs at 3072 x 768 are slow on 2 cores)."""
    shape = request.param
    G = randn(*shape, seed=5)
    U, S, V = gram_svd(G)
    x = S / torch.linalg.norm(G.double())  # inputs to the polynomial
    out = {}
    for c in ("quintic", "polar_express"):
        out[(c, torch.bfloat16)] = newton_schulz(G, coefficients=c)
        out[(c, torch.float64)] = (U * polynomial(x, c)) @ V.T
    return shape, G, U, x, V, out


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_singular_values_lie_in_the_band(d12, dtype):
    """Per singular direction of G: d_i = u_iᵀ·O·v_i is the output singular value of input x_i (exact in float64,
    where O = U·diag(p⁵(x))·Vᵀ). Every d_i with x_i >= 0.01 lies in the quintic's band [0.6818, 1.1344] (bf16:
    +-0.01), which is inside the record's published "roughly Uniform(0.5, 1.5)". Wide Gaussian matrices have every
    x_i >= 0.01 there, so their actual singular values are checked too; square ones also have tiny σ (about 18 %
    below 0.01 at 768 x 768), which 5 steps cannot lift into the band: they stay in [0, 1.2024 + margin]."""
    shape, G, U, x, V, out = d12
    lo, hi = quintic_band()
    # fp64: d_i is p⁵(x_i) up to rounding (measured <= 1.1e-14; the closest d_i sits 5e-11 inside the band)
    margin = BF16_BAND_MARGIN if dtype == torch.bfloat16 else 1e-9
    O = out[("quintic", dtype)].double()
    d = ((U.T @ O) * V.T).sum(1)  # diag(Uᵀ O V)
    ok = x >= 0.01
    assert ok.float().mean() > (0.8 if shape[0] == shape[1] else 0.999)
    assert d[ok].min() >= lo - margin and d[ok].max() <= hi + margin, (d[ok].min(), d[ok].max())
    assert 0.5 < lo - margin and hi + margin < 1.5  # the derived band is inside the published one
    sv = singular_values(O)
    assert sv.max() <= quintic(0.5545287908544945) + margin  # the global maximum of p on [0, 1]
    if shape[0] != shape[1]:
        assert sv.min() >= lo - margin and sv.max() <= hi + margin, (sv.min(), sv.max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_polar_express_comes_closer_to_the_limit(d12, dtype):
    """Same 5 steps (same FLOPs): Polar Express ends nearer U·Vᵀ than the quintic, in Frobenius norm and in how far
    the singular values (of directions with x >= 0.01) are from 1."""
    shape, G, U, x, V, out = d12
    P = U @ V.T
    ok = x >= 0.01
    dist, spread = {}, {}
    for c in ("quintic", "polar_express"):
        O = out[(c, dtype)].double()
        dist[c] = torch.linalg.norm(O - P).item() / torch.linalg.norm(P).item()
        spread[c] = (((U.T @ O) * V.T).sum(1)[ok] - 1).abs().max().item()
    assert dist["polar_express"] < 0.75 * dist["quintic"], dist
    assert spread["polar_express"] < 0.6 * spread["quintic"], spread


# ------------------------------------------------------------------------------------------ the optimizer
MUON_SHAPES = [(24, 24), (40, 10), (10, 40), (24, 24), (40, 10)]  # square, tall (scale 2), wide; repeats batch


def make_params(seed=0, dtype=torch.float32):
    return [randn(*s, seed=seed + i).to(dtype).requires_grad_() for i, s in enumerate(MUON_SHAPES)]


def grads_at(step, shapes=MUON_SHAPES):
    return [randn(*s, seed=1000 + 17 * step + i) for i, s in enumerate(shapes)]


def lr_at(step):  # changes every step, like a schedule writing group['lr']
    return 0.04 * (1.0 - 0.1 * step)


def run_ours(params, steps, start=0, opt=None, **kw):
    opt = opt or Muon(params, lr=lr_at(0), momentum=0.85, **kw)
    for s in range(start, start + steps):
        for p, g in zip(params, grads_at(s)):
            p.grad = g.to(p.dtype)
        for group in opt.param_groups:
            group["lr"], group["momentum"] = lr_at(s), muon_momentum_at(s, warmup_steps=4)
        opt.step()
    return opt


def run_reference(params, steps, nesterov=True, orthogonalize=None, dtype=None, momentum_form="sum"):
    """The plain-torch per-tensor Muon on detached copies (in `dtype` if given: float64 for the fp64 Muon)."""
    ps = [p.detach().clone().to(dtype or p.dtype) for p in params]
    bufs = [torch.zeros_like(p) for p in ps]
    for s in range(steps):
        grads = [g.to(ps[0].dtype) for g in grads_at(s)]
        reference_muon_step(ps, grads, bufs, lr=lr_at(s), momentum=muon_momentum_at(s, warmup_steps=4),
                            nesterov=nesterov, orthogonalize=orthogonalize, momentum_form=momentum_form)
    return ps, bufs


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_against_an_independent_float64_muon(nesterov, coefficients, ns_dtype):
    """6 steps, momentum warming up and lr changing every step, tall/wide/square matrices. The fp64 Muon
    orthogonalizes through the SVD (svd_newton_schulz): no shared code with the bf16 iteration. Params: the
    low-precision rule against the record-style plain-torch Muon in the same dtype; momentum buffers: fp32 math
    on both sides, so they agree with the fp64 ones to fp32 rounding: up to 3 roundings a step (μ, the product, the
    sum) over 6 steps, damped by μ and of random sign (measured 2.3 fp32 ulps of max|buf|; 8 allowed)."""
    steps = 6
    params, params_init = make_params(), make_params()
    opt = run_ours(params, steps, nesterov=nesterov, coefficients=coefficients, ns_dtype=ns_dtype)
    ref64, bufs64 = run_reference(params_init, steps, nesterov,
                                  lambda u: svd_newton_schulz(u, coefficients=coefficients)[0], torch.float64)
    low, _ = run_reference(params_init, steps, nesterov,
                           lambda u: reference_newton_schulz(u, coefficients=coefficients, dtype=ns_dtype))
    for i, (p, r64, rl, b64) in enumerate(zip(params, ref64, low, bufs64)):
        delta = (p.detach().double() - params_init[i].detach().double())
        delta64 = r64 - params_init[i].detach().double()
        torch_err = max_err(rl.double() - params_init[i].detach().double(), delta64)
        floor = steps * UNIT_ROUNDOFF[torch.float32] * r64.abs().max().item()  # each step rounds p to fp32
        floor += UNIT_ROUNDOFF[ns_dtype] * delta64.abs().max().item()
        assert max_err(delta, delta64) <= 2 * torch_err + floor, (i, max_err(delta, delta64), torch_err)
        buf = opt.state[p]["momentum_buffer"]
        assert buf.dtype == torch.float32 and max_err(buf, b64) <= 8 * 2.0 ** -24 * b64.abs().max().item()


@pytest.mark.parametrize("coefficients", ["quintic", "polar_express"])
@pytest.mark.parametrize("nesterov", [True, False])
def test_whole_steps_match_a_plain_torch_muon(nesterov, coefficients):
    """The optimizer's mechanics (momentum, Nesterov, shape scale, lr and momentum per step, batching by shape,
    foreach) against the per-tensor loop given the same orthogonalization: the same fp32 ops in the same order,
    so they agree to the last bit (these tests run on CPU, where batched and single GEMMs round alike)."""
    steps = 5
    params = make_params()
    opt = run_ours(params, steps, nesterov=nesterov, coefficients=coefficients)
    ref, bufs = run_reference(make_params(), steps, nesterov,
                              lambda u: newton_schulz(u, coefficients=coefficients))
    for p, r, b in zip(params, ref, bufs):
        assert torch.equal(opt.state[p]["momentum_buffer"], b)
        assert torch.equal(p.detach(), r)


@pytest.mark.parametrize("nesterov", [True, False])
def test_ema_momentum_form_is_the_2024_12_17_records(nesterov):
    """momentum_form="ema" (buf = lerp(buf, g, 1-mu), Nesterov u = lerp(g, buf, mu)) against the per-tensor loop's
    written-out EMA (mul/add, not lerp: other rounding), all in fp64 so only rounding order differs (1e-12 relative;
    measured 4e-16); and it is not the "sum" form while the momentum warms up (steps 0..4 here), so the option
    cannot be a no-op."""
    steps = 5
    params = make_params(dtype=torch.float64)
    opt = run_ours(params, steps, nesterov=nesterov, ns_dtype=torch.float64, momentum_form="ema")
    ns64 = lambda u: newton_schulz(u, dtype=torch.float64)  # noqa: E731
    ref, bufs = run_reference(make_params(dtype=torch.float64), steps, nesterov, ns64, momentum_form="ema")
    summed, _ = run_reference(make_params(dtype=torch.float64), steps, nesterov, ns64, momentum_form="sum")
    for p, r, b, s in zip(params, ref, bufs, summed):
        assert max_err(opt.state[p]["momentum_buffer"], b) <= 1e-12 * b.abs().max().item()
        assert max_err(p.detach(), r) <= 1e-12 * r.abs().max().item()
        assert max_err(s, r) > 1e-6  # measured >= 0.01: the two forms really differ
    with pytest.raises(ValueError, match="momentum_form must be 'sum' or 'ema'"):
        Muon(make_params(), momentum_form="lerp")


def test_one_step_is_minus_lr_times_scaled_orthogonalized_grad():
    """momentum 0, no Nesterov: W1 = W0 - lr·max(1, rows/cols)^0.5·NS(g); a param without a grad is untouched."""
    params = make_params()
    init = [p.detach().clone() for p in params]
    grads = grads_at(0)
    for p, g in zip(params[:-1], grads):
        p.grad = g.clone()
    Muon(params, lr=0.05, momentum=0.0, nesterov=False).step()
    for p, p0, g in zip(params[:-1], init, grads):
        want = p0.add((newton_schulz(g) * shape_scale(*g.shape)).float(), alpha=-0.05)
        assert torch.equal(p.detach(), want)
    assert torch.equal(params[-1].detach(), init[-1])


def test_state_dict_round_trip_continues_bitwise():
    """3 steps, state_dict through torch.save/torch.load into a fresh optimizer on copied params, 3 more steps on
    both: params and momentum buffers identical to the bit (resume is bitwise on CPU)."""
    params = make_params()
    opt = run_ours(params, 3, coefficients="polar_express")
    sd = opt.state_dict()
    assert set(sd["state"]) == set(range(len(params)))
    assert set(sd["state"][0]) == {"momentum_buffer"}
    group = sd["param_groups"][0]
    assert group["momentum"] == muon_momentum_at(2, warmup_steps=4) and group["lr"] == lr_at(2)
    assert group["nesterov"] is True and group["ns_steps"] == 5 and group["coefficients"] == "polar_express"
    blob = io.BytesIO()
    torch.save(sd, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=True)

    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = Muon(resumed_params, lr=1.0, momentum=0.5, coefficients="polar_express")  # overwritten by the load
    resumed.load_state_dict(copy.deepcopy(loaded))
    run_ours(params, 3, start=3, opt=opt)
    run_ours(resumed_params, 3, start=3, opt=resumed)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p.detach(), q.detach())
        assert torch.equal(opt.state[p]["momentum_buffer"], resumed.state[q]["momentum_buffer"])


def test_bf16_params_keep_a_bf16_state():
    params = make_params(dtype=torch.bfloat16)
    opt = run_ours(params, 2)
    for p in params:
        assert p.dtype == torch.bfloat16 and opt.state[p]["momentum_buffer"].dtype == torch.bfloat16
        assert torch.isfinite(p.detach().float()).all()


# ------------------------------------------------------------------------------------------ DDP: sharded
REPO = Path(__file__).resolve().parents[1]
SHARD_WORKER = textwrap.dedent("""
    import sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[1])
    from tritonrun.kernels import muon
    from tests.test_muon import make_params, run_ours

    dist.init_process_group("gloo")
    counted, plain = [], muon.newton_schulz

    def counting(G, **kw):  # how many matrices this rank orthogonalizes, per call
        counted.append(G.shape[0])
        return plain(G, **kw)

    muon.newton_schulz = counting
    params = make_params()
    opt = run_ours(params, 4, coefficients=sys.argv[3])
    assert opt._world() == (2, dist.get_rank())
    torch.save({"params": [p.detach() for p in params], "counted": counted,
                "bufs": [opt.state[p]["momentum_buffer"] for p in params]},
               f"{sys.argv[2]}/rank{dist.get_rank()}.pt")
    dist.barrier()  # no rank tears gloo down while its peer is still in a collective (a C++ abort, seen once in CI)
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("coefficients", ["quintic"])
def test_sharded_over_two_gloo_ranks_equals_one_process(tmp_path, coefficients):
    """torchrun, 2 gloo ranks on CPU, 4 steps over MUON_SHAPES (shape groups of 2, 2 and 1 matrices): each rank
    orthogonalizes one matrix per group (the lone one on rank 0, a zero pad on rank 1), and both end with params
    and momentum buffers identical to the bit to a single process's (on CPU a batched GEMM rounds each matrix as
    alone)."""
    script = tmp_path / "worker.py"
    script.write_text(SHARD_WORKER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(REPO), str(tmp_path), coefficients]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=one_thread_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    params = make_params()
    opt = run_ours(params, 4, coefficients=coefficients, shard=False)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["counted"] == [1, 1, 1] * 4  # 3 shape groups per step, one matrix each (5 unsharded)
        for p, q, b in zip(params, got["params"], got["bufs"]):
            assert torch.equal(p.detach(), q) and torch.equal(opt.state[p]["momentum_buffer"], b)


def test_shard_true_without_a_process_group_says_how_to_fix():
    params = make_params()
    with pytest.raises(RuntimeError, match="torchrun"):
        run_ours(params, 1, shard=True)
