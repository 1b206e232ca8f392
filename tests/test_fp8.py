"""tritonrun/kernels/fp8.py: quantize, scaled matmul and the FP8 linear layer, on CPU through the Triton interpreter.

The quantizer is checked byte for byte against an fp64 emulation of e4m3 / e5m2 written here from the formats'
definitions (every finite value decoded from its bits, nearest by distance, ties to the even code, saturation to
the largest finite value), not from torch's float8 casts; torch's casts are a second check on in-range values.
The interpreter decodes fp8 tl.dot operands exactly and multiplies in fp32, so the matmul runs here too; its
bound is fp32 accumulation: |C - C_fp64| <= K * 2^-24 * (|A| @ |B|) * scale elementwise (each of the K adds
rounds once, relative error u = 2^-24 of a partial sum bounded by the sum of |products|), plus, for a bf16 output,
one bf16 rounding (2^-8 relative). Odd shapes and strided operands throughout.
"""
import math

import pytest
import torch

from tests.helpers import poison_allocations
from tritonrun.kernels import fp8
from tritonrun.kernels.fp8 import E4M3, E5M2

U32 = 2.0 ** -24  # fp32 unit roundoff


# ------------------------------------------------------------------------ the emulation (from the definitions)
def grid(f) -> torch.Tensor:
    """Every finite non-negative value of format f, by code 0, 1, ... (monotonic in the code), decoded from bits."""
    vals = []
    for code in range(128):
        e, m = code >> f.mbits, code & ((1 << f.mbits) - 1)
        if f is E4M3 and code == 0x7F or f is E5M2 and e == 31:
            break  # NaN (e4m3) / inf and NaN (e5m2): past the largest finite value
        vals.append(m * 2.0 ** (1 - f.bias - f.mbits) if e == 0 else (1 + m / 2 ** f.mbits) * 2.0 ** (e - f.bias))
    g = torch.tensor(vals, dtype=torch.float64)
    assert g[-1].item() == f.max
    return g


def emulate(v: torch.Tensor, f) -> torch.Tensor:
    """fp64 values v -> the fp8 value (as fp64): saturate to +-max, nearest grid value, ties to the even code."""
    g = grid(f)
    a = v.abs().clamp(max=f.max)
    hi = torch.searchsorted(g, a).clamp(max=len(g) - 1)
    lo = (hi - 1).clamp(min=0)
    d_lo, d_hi = a - g[lo], g[hi] - a
    pick = torch.where(d_lo < d_hi, lo, torch.where(d_hi < d_lo, hi, torch.where(lo % 2 == 0, lo, hi)))
    out = torch.copysign(g[pick], v)
    return torch.where(v.isnan(), v, out)


def probe_values(f, n_random: int = 3000, seed: int = 0) -> torch.Tensor:
    """Random values over the format's whole range and beyond, every exact tie between neighbours, the fp32
    neighbours of those ties, subnormals, saturation, +-0, +-inf and NaN."""
    gen = torch.Generator().manual_seed(seed)
    g = grid(f)
    mags = 2.0 ** (torch.rand(n_random, generator=gen, dtype=torch.float64) * 40 - 24)
    signs = torch.where(torch.rand(n_random, generator=gen) < 0.5, -1.0, 1.0).double()
    mids = (g[1:] + g[:-1]) / 2  # exact in fp32: one more bit than the format
    mids32 = mids.float()
    near = torch.cat([torch.nextafter(mids32, torch.tensor(math.inf)), torch.nextafter(mids32, torch.tensor(0.0))])
    special = torch.tensor([0.0, -0.0, f.max, -f.max, f.max * 1.03, f.max * 1.1, 1e30, -1e30, math.inf, -math.inf,
                            f.min_subnormal / 2, f.min_subnormal * 0.51, f.min_subnormal * 1.5, 1e-30, math.nan],
                           dtype=torch.float64)
    return torch.cat([mags * signs, mids, -mids, near.double(), special]).float()


# ---------------------------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_matches_the_emulation_byte_for_byte(fmt):
    f = fp8.FORMATS[fmt]
    x = probe_values(f)
    q = fp8.quantize(x, 1.0, fmt)
    assert q.dtype == f.dtype
    want = emulate(x.double(), f)
    got = q.double()
    same = (got == want) | (got.isnan() & want.isnan())
    assert bool(same.all()), (x[~same][:8].tolist(), got[~same][:8].tolist(), want[~same][:8].tolist())
    signs = q.view(torch.uint8) >> 7  # the sign bit of +-0 and of every value
    assert torch.equal(signs[~x.isnan()], torch.signbit(x[~x.isnan()]).to(torch.uint8))
    assert (q.view(torch.uint8)[x.isnan()] & 0x7F == 0x7F).all()  # NaN kept (code 0x7F / 0xFF)
    finite = x.isfinite() & (x.abs() <= f.max)  # torch's cast is the second check where it does not saturate
    assert torch.equal(q[finite].view(torch.uint8), x[finite].to(f.dtype).view(torch.uint8))


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_divides_by_the_scale_and_saturates(fmt):
    """v = x / s in fp32, then the format's rounding; |x / s| above the max gives exactly +-max."""
    f = fp8.FORMATS[fmt]
    s = 0.0371
    x = probe_values(f, n_random=500, seed=1)[:-5] * s  # without the specials (inf / nan / saturation)
    want = emulate((x / s).double(), f)  # x / s in fp32, as the kernel divides
    assert torch.equal(fp8.quantize(x, s, fmt).double(), want)
    big = torch.tensor([f.max * s * 4, -f.max * s * 4])
    assert fp8.quantize(big, s, fmt).double().tolist() == [f.max, -f.max]


def test_quantize_of_bf16_rounds_the_quotient_to_bf16_first():
    """torch's x.div(s) on a bf16 x is bf16(fp32(x) / s): the records quantize that (double rounding), and so do
    we; 2,000 draws where the single rounding of fp32(x) / s would differ in some codes."""
    x = (torch.randn(2000, generator=torch.Generator().manual_seed(2)) * 3).bfloat16()
    s = 4 / 448
    got = fp8.quantize(x, s, "e4m3").double()
    assert torch.equal(got, emulate(x.div(s).double(), E4M3))
    assert not torch.equal(got, emulate((x.float() / s).double(), E4M3))  # the first rounding matters here


def test_a_tensor_scale_gives_the_same_bytes_as_a_float():
    """A scale computed on the device (the MLP's amax scales) is read by the kernel: no host sync, same bytes."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(4)) * 50
    s = torch.tensor([0.0371])
    for fmt in ("e4m3", "e5m2"):
        assert torch.equal(fp8.quantize(x, s, fmt).view(torch.uint8), fp8.quantize(x, 0.0371, fmt).view(torch.uint8))
    with pytest.raises(ValueError, match="one fp32 element"):
        fp8.quantize(x, torch.tensor([1.0, 2.0]))


def test_quantize_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="scale must be a finite number > 0"):
        fp8.quantize(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="needs fp32 or bf16"):
        fp8.quantize(torch.ones(3, dtype=torch.float16), 1.0)
    with pytest.raises(ValueError, match="choose one of e4m3, e5m2"):
        fp8.quantize(torch.ones(3), 1.0, "e3m4")


# ------------------------------------------------------------------------------------------------ matmul
def fp8_operand(shape, f, seed, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).clamp(-f.max, f.max).to(f.dtype)


@pytest.mark.parametrize("M,K,N", [(37, 70, 45), (1, 33, 130), (65, 5, 3)])
@pytest.mark.parametrize("fa,fb", [(E4M3, E4M3), (E5M2, E4M3)], ids=["e4m3xe4m3", "e5m2xe4m3"])
def test_scaled_mm_is_the_fp32_product_of_the_decoded_values(monkeypatch, M, K, N, fa, fb):
    poison_allocations(monkeypatch, fp8)
    a, b = fp8_operand((M, K), fa, 1, 8.0), fp8_operand((N, K), fb, 2, 8.0).t()  # b strided (a transpose)
    scale = 0.013
    exact = (a.double() @ b.double()) * scale
    bound = K * U32 * (a.double().abs() @ b.double().abs()) * scale + 1e-30
    c32 = fp8.scaled_mm(a, b, scale, torch.float32)
    assert c32.dtype == torch.float32 and bool(((c32.double() - exact).abs() <= bound).all())
    c16 = fp8.scaled_mm(a, b, scale, torch.bfloat16)
    assert c16.dtype == torch.bfloat16
    assert bool(((c16.double() - exact).abs() <= 2.0 ** -8 * exact.abs() + bound).all())


def test_scaled_mm_edges():
    a = fp8_operand((4, 0), E4M3, 1)
    assert torch.equal(fp8.scaled_mm(a, fp8_operand((0, 3), E4M3, 2), 1.0, torch.float32), torch.zeros(4, 3))
    assert fp8.scaled_mm(fp8_operand((0, 5), E4M3, 1), fp8_operand((5, 3), E4M3, 2), 1.0).shape == (0, 3)
    with pytest.raises(ValueError, match=r"needs \(M, K\) @ \(K, N\)"):
        fp8.scaled_mm(fp8_operand((2, 3), E4M3, 1), fp8_operand((4, 3), E4M3, 2), 1.0)
    with pytest.raises(ValueError, match="needs float8 operands"):
        fp8.scaled_mm(torch.ones(2, 3), fp8_operand((3, 3), E4M3, 2), 1.0)


# ------------------------------------------------------------------------------------------ the linear layer
SCALES = (2 / 448, 6 / 448, 1 / 448)  # x_s, w_s, grad_s: inputs of a few units use most of e4m3's range


@pytest.mark.parametrize("shape", [(3, 5, 70), (37, 96)])
def test_fp8_linear_forward_and_gradients_match_the_formulas(monkeypatch, shape):
    """y, dx (bf16) and dw (fp32) against the docstring's formulas computed with torch's casts and fp64 matmuls
    (reference_fp8_linear): the same fp8 operands, so only the accumulation (fp32 vs fp64, the bound above) and
    the output rounding differ: y, dx within one bf16 rounding (2^-8 relative) plus K u sum|products|; dw fp32."""
    poison_allocations(monkeypatch, fp8)
    N, K = 45, shape[-1]
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(shape, generator=gen) * 2).bfloat16().requires_grad_()
    w = (torch.randn(N, K, generator=gen) * 0.5).requires_grad_()
    y = fp8.fp8_linear(x, w, *SCALES)
    dy = (torch.randn(y.shape, generator=gen) * 0.1).bfloat16()
    y.backward(dy)
    assert y.dtype == x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.float32
    assert y.shape == (*shape[:-1], N) and x.grad.shape == x.shape and w.grad.shape == w.shape
    y_ref, dx_ref, dw_ref = fp8.reference_fp8_linear(x.detach(), w.detach(), *SCALES, dy)
    x_s, w_s, g_s = SCALES
    x8 = fp8.reference_quantize(x.detach().reshape(-1, K), x_s, E4M3).double()
    w8 = fp8.reference_quantize(w.detach(), w_s, E4M3).double()
    g8 = fp8.reference_quantize(dy.reshape(-1, N), g_s, E5M2).double()
    acc_y = K * U32 * (x8.abs() @ w8.abs().T) * x_s * w_s
    acc_dx = N * U32 * (g8.abs() @ w8.abs()) * g_s * w_s
    acc_dw = x8.shape[0] * U32 * (g8.abs().T @ x8.abs()) * x_s * g_s

    def within(got, ref, acc, bf16: bool):
        got, ref = got.double().reshape(acc.shape), ref.double().reshape(acc.shape)
        # ref was rounded too (bf16): the two roundings of nearby values differ by at most one bf16 ulp, 2^-7
        tol = (2.0 ** -7 * ref.abs() if bf16 else 0) + acc + 1e-30
        return bool(((got - ref).abs() <= tol).all())

    assert within(y, y_ref, acc_y, True) and within(x.grad, dx_ref, acc_dx, True)
    assert within(w.grad, dw_ref, acc_dw, False)


def test_fp8_linear_saturates_like_the_records_cast():
    """Activations past 448 x_s are clamped to 448 (e4m3's largest finite value) before the product."""
    x = torch.tensor([[1000.0, -4.0]], dtype=torch.bfloat16)
    w = torch.tensor([[1.0, 1.0]])
    y = fp8.fp8_linear(x, w, 1.0, 1.0, 1.0)
    assert y.float().tolist() == [[448.0 - 4.0]]  # 444 is a bf16 value


def test_fp8_linear_refuses_bad_input():
    with pytest.raises(ValueError, match="w_s must be a finite number > 0"):
        fp8.fp8_linear(torch.ones(2, 3), torch.ones(4, 3), 1.0, math.nan, 1.0)
    with pytest.raises(ValueError, match=r"x \(\.\.\., 3\) @ w \(N, K\)\^T needed"):
        fp8.fp8_linear(torch.ones(2, 5), torch.ones(4, 3), 1.0, 1.0, 1.0)


def test_fp8_linear_fake_shapes_for_compile_and_the_memory_estimate():
    """The fakes (torch.compile, tritonrun/memory.py) give the real outputs' shapes and dtypes, fp8 saved operands
    included."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 32, dtype=torch.bfloat16)
        w = torch.empty(40, 32)
        y, x8, w8 = torch.ops.tritonrun.fp8_linear_fwd(x, w, 1.0, 1.0, 1.0)
        dx, dw = torch.ops.tritonrun.fp8_linear_bwd(torch.empty(6, 40, dtype=torch.bfloat16), x8, w8, 1.0, 1.0, 1.0)
    assert (y.shape, y.dtype, x8.dtype, w8.dtype) == ((6, 40), torch.bfloat16, E4M3.dtype, E4M3.dtype)
    assert (dx.shape, dx.dtype, dw.shape, dw.dtype) == ((6, 32), torch.bfloat16, (40, 32), torch.float32)


# ------------------------------------------------------------------------------------ the FP8 peak and MFU
def test_fp8_peaks_are_twice_bf16_where_fp8_tensor_cores_exist():
    """The datasheets' dense FP8 figures (fp32 accumulate): RTX 4070 116.6, 4090 330.4 (2 x 165.2; the whitepaper
    rounds to 330.3), H100 SXM 1,978 (datasheet 1,979: 2 x 989.4), H100 PCIe 1,512; none on Ampere."""
    from tritonrun.presets import fp8_peak_tflops_for

    assert fp8_peak_tflops_for("rtx4070", "NVIDIA GeForce RTX 4070") == 116.6
    assert fp8_peak_tflops_for("rtx4070", "NVIDIA GeForce RTX 4070 SUPER") == 142.0
    assert fp8_peak_tflops_for("rtx4090", "NVIDIA GeForce RTX 4090") == 330.4
    assert fp8_peak_tflops_for("h100", "NVIDIA H100 80GB HBM3") == 1978.0
    assert fp8_peak_tflops_for("h100", "NVIDIA H100 PCIe") == 1512.0
    assert fp8_peak_tflops_for("a100", "NVIDIA A100-SXM4-40GB") is None
    assert fp8_peak_tflops_for("rtx3090", "NVIDIA GeForce RTX 3090") is None


def test_mixed_mfu_counts_each_matmul_at_its_own_peak():
    from tritonrun.presets import mixed_mfu

    # 58.3 TFLOP of bf16 work (1 s at peak) + 116.6 TFLOP of FP8 work (1 s at peak) in 4 s: 50 %
    assert mixed_mfu(58.3e12, 116.6e12, 4.0, 58.3, 116.6) == pytest.approx(0.5, rel=1e-12)
    assert mixed_mfu(58.3e12, 0.0, 2.0, 58.3, None) == pytest.approx(0.5, rel=1e-12)  # no FP8: the bf16 MFU
    with pytest.raises(ValueError, match="without an FP8 peak"):
        mixed_mfu(1.0, 1.0, 1.0, 71.0, None)
