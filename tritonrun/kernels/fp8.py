"""FP8 matmuls with per-tensor scales: quantize, scaled matmul, and the linear layer built from them.

What modded-nanogpt's records run in FP8 (the LM head from the 2025-01 records on; the MLP projections in the
newest, #89): y = x W^T with x and W divided by fixed per-tensor scales and rounded to e4m3, the product
accumulated in fp32 and multiplied back by the scales; in the backward the output gradient, divided by its own
scale, is rounded to e5m2 (more range, less precision) and multiplies the saved e4m3 operands:

    forward   x8 = fp8_e4m3(x / x_s)    w8 = fp8_e4m3(w / w_s)    y  = (x8 @ w8^T) * (x_s * w_s)        -> bf16
    backward  g8 = fp8_e5m2(dy / g_s)   dx = (g8 @ w8) * (g_s * w_s) -> bf16    dw = (g8^T @ x8) * (x_s * g_s) -> fp32

Ada (sm_89) and Hopper (sm_90) have FP8 tensor cores at twice the bf16 rate (RTX 4070: 116.6 dense TFLOPS with
fp32 accumulate against 58.3 bf16). `torch._scaled_mm` (cuBLASLt) is the torch peer; these are our own kernels:

  quantize   elementwise: v = x / s (rounded to x's dtype first when x is bf16/fp16, as torch's x.div(s) is:
             the records divide bf16 activations), saturated to the format's largest finite value (+-448 e4m3,
             +-57344 e5m2: what the GPU's cvt.rn.satfinite does; an inf becomes the max), rounded to nearest
             even, NaN kept (code 0x7F). The rounding is explicit fp32 arithmetic (the exponent read from the
             bits, then (|v| + M) - M with M = 1.5 * 2^(quantum's exponent + 23), which rounds |v| to a multiple
             of the quantum, ties to even) and the code is assembled from the bits: the Triton interpreter's own
             fp32 -> fp8 conversion is wrong (it truncates, wraps past the max and maps NaN to 384; exact values
             convert right), so this path gives the same bytes on CPU and GPU and the CPU tests prove it (the
             division is tl.div_rn, correctly rounded on both: a GPU's plain `/` is approximate).
  matmul     C = (A8 @ B8) * scale, fp32 accumulation in tl.dot (e4m3 x e4m3, or e5m2 x e4m3 in the backward:
             Ada's mma.sync m16n8k32 takes both), tiles over (M, N) with grouped ordering, any strides (the
             backward's transposes are free), output bf16 (rounded to nearest even from the bits, as in the
             quantizer) or fp32, one rounding at the store.

Interpreter: fp8 tl.dot decodes the operands exactly and multiplies in fp32 (checked: equal to the fp32 matmul of
the decoded values), so every kernel here runs in the CPU tests. The RTX 4070 projection of the speedup is
(FP8 peak / bf16 peak) = 2x on the matmuls it covers, until a GPU measures bench/kernels.py --op fp8_linear.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import device_arch, interpreting


@dataclass(frozen=True)
class Fp8Format:
    name: str
    dtype: torch.dtype
    mbits: int  # stored mantissa bits
    bias: int  # exponent bias
    max: float  # largest finite value

    @property
    def min_normal(self) -> float:
        return 2.0 ** (1 - self.bias)

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (1 - self.bias - self.mbits)


E4M3 = Fp8Format("e4m3", torch.float8_e4m3fn, mbits=3, bias=7, max=448.0)  # no inf; NaN 0x7F / 0xFF
E5M2 = Fp8Format("e5m2", torch.float8_e5m2, mbits=2, bias=15, max=57344.0)  # inf 0x7C; NaN 0x7D-0x7F
FORMATS = {"e4m3": E4M3, "e5m2": E5M2}
NAN_CODE = 0x7F  # a NaN in both formats (sign bit added)

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _round_to_bf16(v):
    """fp32 v rounded to the nearest bf16 value, ties to even, still fp32 (then exact in a .to(bf16)): from the bits,
    because the interpreter's fp32 -> bf16 cast truncates (a GPU's rounds to nearest even: the same result)."""
    b = v.to(tl.int32, bitcast=True)
    b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
    return tl.where(v != v, v, b.to(tl.float32, bitcast=True))


@triton.jit
def _quantize_kernel(
    X,  # (n,) fp32 / bf16 / fp16, contiguous
    Q,  # (n,) uint8: the fp8 codes (the caller's float8 tensor viewed as bytes)
    scale,  # fp32 scalar: v = x / scale; with SCALE_PTR a pointer to the fp32 scale (no host sync)
    n,
    MBITS: tl.constexpr,
    BIAS: tl.constexpr,
    MAXV: tl.constexpr,
    SUB_SCALE: tl.constexpr,  # 1 / the smallest subnormal, 2^(BIAS - 1 + MBITS)
    ROUND_INPUT_DTYPE: tl.constexpr,  # x / scale rounded to bf16 first (torch's x.div(s) on a bf16 x)
    BLOCK: tl.constexpr,
    SCALE_PTR: tl.constexpr = False,
):
    # Bytes: n * (size + 1). About 20 integer / fp32 ops per element: memory-bound on any GPU.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0)
    # IEEE division: a GPU's `/` is approximate (2 ulp), the CPU's exact
    v = tl.div_rn(x.to(tl.float32), tl.load(scale) if SCALE_PTR else scale)
    if ROUND_INPUT_DTYPE:
        v = _round_to_bf16(v)
    code = _fp8_code(v, MBITS, BIAS, MAXV, SUB_SCALE)
    tl.store(Q + offs, code.to(tl.uint8), mask=mask)


@triton.jit
def _fp8_code(v, MBITS: tl.constexpr, BIAS: tl.constexpr, MAXV: tl.constexpr, SUB_SCALE: tl.constexpr):
    """The fp8 byte (int32 0..255) of fp32 v: saturated to +-MAXV, nearest even, NaN -> 0x7F (module docstring)."""
    negative = v.to(tl.int32, bitcast=True) < 0
    is_nan = v != v
    v = tl.where(v > MAXV, MAXV, tl.where(v < -MAXV, -MAXV, v))  # satfinite; NaN fails both and stays NaN
    a = tl.where(negative, -v, v)  # |v|, NaN kept
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127  # floor(log2 a) for a normal fp32 (a < 2^16 here)
    qe = tl.maximum(e, 1 - BIAS) - MBITS  # exponent of the fp8 quantum at a's binade (subnormals: fixed)
    magic = ((qe + 150) << 23).to(tl.float32, bitcast=True) * 1.5  # 1.5 * 2^(qe + 23): ulp of a + magic = 2^qe
    r = (a + magic) - magic  # a rounded to a multiple of 2^qe, ties to even (fp32 adds round to nearest even)
    rb = r.to(tl.int32, bitcast=True)
    re = (rb >> 23) - 127
    normal = ((re + BIAS) << MBITS) | ((rb >> (23 - MBITS)) & ((1 << MBITS) - 1))
    sub = (r * SUB_SCALE).to(tl.int32)  # r / min_subnormal: an exact integer < 2^MBITS
    code = tl.where(re >= 1 - BIAS, normal, sub)
    return tl.where(is_nan, 0x7F, code) | tl.where(negative, 0x80, 0)


@triton.jit
def _grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Rows and columns (int64) of program pid's output tile, in grouped order: GROUP_M row tiles share their B
    columns in L2."""
    n_m, n_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = GROUP_M * n_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(n_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    return (pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M),
            pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N))


@triton.jit
def _tile_product(A, B, rm, rn, M, N, K, stride_am, stride_ak, stride_bk, stride_bn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 sum over K of A[rm, :] @ B[:, rn] (tl.dot, fp32 accumulation; masked at the edges)."""
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = A + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = B + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < k_left), other=0.0)
        b = tl.load(b_ptrs, mask=(rk[:, None] < k_left) & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    return acc


@triton.jit
def _scaled_mm_kernel(
    A, B, C,  # A (M, K) fp8, B (K, N) fp8, C (M, N) bf16 / fp32
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    scale,  # fp32: C = (A @ B) * scale; with SCALE_PTR a pointer to the fp32 scale (no host sync)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCALE_PTR: tl.constexpr = False,
):
    # FLOPs: 2 M N K on the FP8 tensor cores. Bytes: M K + K N (once per tile column / row) + M N * out size.
    rm, rn = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _tile_product(A, B, rm, rn, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
    c = acc * (tl.load(scale) if SCALE_PTR else scale)
    if C.dtype.element_ty == tl.bfloat16:
        c = _round_to_bf16(c)
    c = c.to(C.dtype.element_ty)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :] * stride_cn, c, mask=(rm[:, None] < M) & (rn[None, :] < N))


# ----------------------------------------------------------------------------------------- configs

# arch -> (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages). fp8 mma needs BLOCK_K >= 32. Starting
# points sized to Ada's 100 KB of shared memory per block (128 x 64 + 64 x 128 bytes per stage, 4 stages = 64 KB);
# NOT yet tuned on a GPU: sweep with bench/kernels.py --op fp8_linear and edit.
MM_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "sm_89": (128, 128, 64, 8, 8, 3),
    "sm_90": (128, 128, 128, 8, 8, 4),
    "default": (128, 128, 64, 8, 8, 3),
    "interpreter": (64, 64, 32, 8, 1, 1),
}
QUANT_CONFIGS: dict[str, tuple[int, int]] = {"default": (1024, 4), "interpreter": (1 << 16, 1)}


_arch = device_arch  # the config-table key of a device (bench/ada.py patches it per file)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor cores: Ada (sm_89) and Hopper (sm_90) or newer; the CPU interpreter emulates them."""
    if device.type != "cuda" or interpreting():
        return True
    return torch.cuda.get_device_capability(device) >= (8, 9)


def mm_flops(M: int, N: int, K: int) -> int:
    return 2 * M * N * K


# ---------------------------------------------------------------------------------- host launchers


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests patch it to NaN-fill, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _format(fmt: str | Fp8Format) -> Fp8Format:
    if isinstance(fmt, Fp8Format):
        return fmt
    if fmt not in FORMATS:
        raise ValueError(f"fp8 format {fmt!r}: choose one of {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _scale_arg(scale: float | torch.Tensor, device: torch.device, who: str) -> tuple[object, bool]:
    """A kernel's scale argument and whether it is a pointer: a finite float > 0 by value, or a one-element fp32
    tensor on `device` that the kernel reads (a scale computed on the device: no host sync; its value unchecked)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1 or scale.dtype != torch.float32 or scale.device != device:
            raise ValueError(f"fp8 {who}: a tensor scale must be one fp32 element on the operands' device")
        return scale, True
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"fp8 {who}: the scale must be a finite number > 0, got {scale}")
    return float(scale), False


def quantize(x: torch.Tensor, scale: float | torch.Tensor, fmt: str | Fp8Format = "e4m3") -> torch.Tensor:
    """fp8(x / scale) of x's shape, in the format's torch dtype: saturating, round to nearest even, NaN kept.
    For a bf16 x, x / scale is rounded to bf16 first, as torch's x.div(scale) is. scale: as _scale_arg."""
    f = _format(fmt)
    if x.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fp8 quantize: needs fp32 or bf16, got {x.dtype}")
    arg, by_ptr = _scale_arg(scale, x.device, "quantize")
    x1 = x.contiguous().view(-1)
    q = _alloc(x1.shape, f.dtype, x.device)
    if x1.numel():
        block, warps = QUANT_CONFIGS.get(_arch(x.device), QUANT_CONFIGS["default"])
        _quantize_kernel[(triton.cdiv(x1.numel(), block),)](
            x1, q.view(torch.uint8), arg, x1.numel(), MBITS=f.mbits, BIAS=f.bias, MAXV=f.max,
            SUB_SCALE=1.0 / f.min_subnormal, ROUND_INPUT_DTYPE=x.dtype == torch.bfloat16, BLOCK=block,
            SCALE_PTR=by_ptr, num_warps=warps)
    return q.view(x.shape)


def scaled_mm(a: torch.Tensor, b: torch.Tensor, scale: float | torch.Tensor,
              out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(a @ b) * scale for fp8 a (M, K) and b (K, N), any strides, fp32 accumulation, out_dtype (bf16 / fp32). scale:
    a float, or a one-element fp32 tensor on a's device read by the kernel (a delayed scale: no host sync)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"fp8 scaled_mm: needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if a.dtype not in (E4M3.dtype, E5M2.dtype) or b.dtype not in (E4M3.dtype, E5M2.dtype):
        raise ValueError(f"fp8 scaled_mm: needs float8 operands, got {a.dtype} and {b.dtype}")
    M, K = a.shape
    N = b.shape[1]
    arg, by_ptr = _scale_arg(scale, a.device, "scaled_mm")
    c = _alloc((M, N), out_dtype, a.device)
    if M and N:
        if K == 0:
            return c.zero_()
        bm, bn, bk, gm, warps, stages = MM_CONFIGS.get(_arch(a.device), MM_CONFIGS["default"])
        grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
        _scaled_mm_kernel[grid](a, b, c, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                                c.stride(0), c.stride(1), arg, BLOCK_M=bm, BLOCK_N=bn,
                                BLOCK_K=bk, GROUP_M=gm, SCALE_PTR=by_ptr, num_warps=warps, num_stages=stages)
    return c


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::fp8_linear_fwd", mutates_args=())
def _fp8_linear_fwd(x: torch.Tensor, w: torch.Tensor, x_s: float, w_s: float,
                    grad_s: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x8 = quantize(x, x_s, E4M3)
    w8 = quantize(w, w_s, E4M3)
    return scaled_mm(x8, w8.t(), x_s * w_s, torch.bfloat16), x8, w8


@torch.library.custom_op("tritonrun::fp8_linear_bwd", mutates_args=())
def _fp8_linear_bwd(dy: torch.Tensor, x8: torch.Tensor, w8: torch.Tensor, x_s: float, w_s: float,
                    grad_s: float) -> tuple[torch.Tensor, torch.Tensor]:
    g8 = quantize(dy, grad_s, E5M2)
    dx = scaled_mm(g8, w8, grad_s * w_s, torch.bfloat16)
    dw = scaled_mm(g8.t(), x8, x_s * grad_s, torch.float32)  # (N, K): g8^T @ x8
    return dx, dw


@_fp8_linear_fwd.register_fake
def _(x, w, x_s, w_s, grad_s):
    x8 = torch.empty_like(x, dtype=E4M3.dtype, memory_format=torch.contiguous_format)
    w8 = torch.empty_like(w, dtype=E4M3.dtype, memory_format=torch.contiguous_format)
    return x.new_empty((x.shape[0], w.shape[0]), dtype=torch.bfloat16), x8, w8


@_fp8_linear_bwd.register_fake
def _(dy, x8, w8, x_s, w_s, grad_s):
    torch.empty_like(dy, dtype=E5M2.dtype, memory_format=torch.contiguous_format)
    return dy.new_empty(x8.shape, dtype=torch.bfloat16), dy.new_empty(w8.shape, dtype=torch.float32)


def _setup(ctx, inputs, output):
    _, _, x_s, w_s, grad_s = inputs
    _, x8, w8 = output
    ctx.save_for_backward(x8, w8)  # the fp8 operands (1 byte per element), not x and w
    ctx.scales = (x_s, w_s, grad_s)


def _backward(ctx, dy, _dx8, _dw8):
    x8, w8 = ctx.saved_tensors
    dx, dw = _fp8_linear_bwd(dy.contiguous(), x8, w8, *ctx.scales)
    return dx, dw, None, None, None


_fp8_linear_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------- public API


def fp8_linear(x: torch.Tensor, w: torch.Tensor, x_s: float, w_s: float, grad_s: float) -> torch.Tensor:
    """x (..., K) @ w (N, K)^T in FP8 with the records' per-tensor scales: bf16 out (..., N); dx bf16, dw fp32
    (module docstring). w is typically an fp32 master weight; x a bf16 activation."""
    if w.dim() != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"fp8_linear: x (..., {w.shape[-1] if w.dim() == 2 else '?'}) @ w (N, K)^T needed, got "
                         f"x {tuple(x.shape)}, w {tuple(w.shape)}")
    for name, s in (("x_s", x_s), ("w_s", w_s), ("grad_s", grad_s)):
        if not (s > 0 and s < float("inf")):
            raise ValueError(f"fp8_linear: {name} must be a finite number > 0, got {s}")
    y, _, _ = _fp8_linear_fwd(x.reshape(-1, x.shape[-1]), w, float(x_s), float(w_s), float(grad_s))
    return y.view(*x.shape[:-1], w.shape[0])


# ------------------------------------------------------------------------- plain-PyTorch reference


def reference_quantize(x: torch.Tensor, scale: float, fmt: str | Fp8Format = "e4m3") -> torch.Tensor:
    """torch's own rule: x.div(scale) in x's dtype, clamped to the format's range (satfinite), cast by torch."""
    f = _format(fmt)
    v = x.div(scale).float()
    return torch.where(v.isnan(), v, v.clamp(-f.max, f.max)).to(f.dtype)


def reference_fp8_linear(x: torch.Tensor, w: torch.Tensor, x_s: float, w_s: float, grad_s: float,
                         dy: torch.Tensor | None = None):
    """(y, dx, dw) by the module docstring's formulas with torch's casts and fp64 matmuls (dx, dw when dy)."""
    x2 = x.reshape(-1, x.shape[-1])
    x8, w8 = reference_quantize(x2, x_s, E4M3).double(), reference_quantize(w, w_s, E4M3).double()
    y = ((x8 @ w8.T) * (x_s * w_s)).to(torch.bfloat16).view(*x.shape[:-1], w.shape[0])
    if dy is None:
        return y
    g8 = reference_quantize(dy.reshape(-1, w.shape[0]), grad_s, E5M2).double()
    dx = ((g8 @ w8) * (grad_s * w_s)).to(torch.bfloat16).view(x.shape)
    dw = ((g8.T @ x8) * (x_s * grad_s)).float()
    return y, dx, dw
