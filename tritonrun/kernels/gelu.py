"""tanh-GELU, forward and backward, elementwise over a tensor of any shape.

    gelu(x) = 0.5 * x * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 * x^3)
            = x * sigmoid(2u)            (0.5 * (1 + tanh(u)) == sigmoid(2u): one exp, no tanh;
                                          sigmoid from a = exp(-|2u|) <= 1, so nothing overflows)
    gelu'(x) = sigmoid(2u) + x * sigmoid(2u) * (1 - sigmoid(2u)) * 2u',
               u' = sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)

Layout: any shape, flattened (made contiguous). Dtypes: fp32 / fp16 / bf16, loaded in the storage
dtype, computed in fp32, rounded once at the store; y and dx take x's dtype. Finite for every finite
x (gelu -> x for large x, -> -0 for very negative x; gelu' -> 1 and 0).

Bytes moved (the whole cost: ~12 FLOPs per element forward, ~20 backward, far below the ridge point):
forward reads x and writes y (2 * n * size); backward reads x and dy and writes dx (3 * n * size).
The backward recomputes sigmoid(2u) from x: only x is saved, never y or an intermediate.

Fusion: GPT-2's GELU sits between c_fc (matmul + bias) and c_proj. Fusing the bias add (or the GELU
itself into the matmul epilogue) would save a pass over the (rows, 4C) activation, but the issue
asks to keep only what a benchmark supports, and no GPU measurement exists yet: nothing is fused
here. A GPU session should measure `bench/kernels.py --op gelu` against torch.compile (which fuses
bias + GELU on its own) before deciding.

Registered as torch.library custom ops (namespace "tritonrun", fake + autograd registrations) so
torch.compile traces through; on CPU tensors the kernels run through the Triton interpreter.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import device_arch, interpreting

SQRT_2_OVER_PI = 0.7978845608028654
GELU_COEF = 0.044715

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _gelu_fwd_kernel(
    X,  # (n,) x's dtype, contiguous
    Y,  # (n,) x's dtype
    n,
    BLOCK: tl.constexpr,
):
    # Bytes: 2 * n * size. FLOPs: ~12 per element (cube, fma, scale, abs, exp, select, add, div, mul).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    u2 = (2.0 * 0.7978845608028654 * 1.4426950408889634) * (x + 0.044715 * x * x * x)  # 2u * log2(e)
    a = tl.exp2(-tl.abs(u2))  # e^-|2u| in (0, 1]: never overflows; log2(e) folded in, one rounding less
    sig = tl.where(u2 >= 0.0, 1.0, a) / (1.0 + a)  # sigmoid(2u)
    y = x * sig
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gelu_bwd_kernel(
    DY,  # (n,) grad of y, y's dtype
    X,  # (n,) the saved input
    DX,  # (n,) x's dtype
    n,
    BLOCK: tl.constexpr,
):
    # Bytes: 3 * n * size. FLOPs: ~20 per element.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = x * x
    u2 = (2.0 * 0.7978845608028654 * 1.4426950408889634) * (x + 0.044715 * x2 * x)  # 2u * log2(e)
    a = tl.exp2(-tl.abs(u2))
    inv = 1.0 / (1.0 + a)
    sig = tl.where(u2 >= 0.0, 1.0, a) * inv
    # sigmoid'(2u) = sig * (1 - sig) = a / (1 + a)^2, without the cancellation of 1 - sig near 1.
    t = a * inv * inv
    du2 = (2.0 * 0.7978845608028654) * (1.0 + 3.0 * 0.044715 * x2)  # d(2u)/dx
    dgelu = sig + tl.where(t > 0.0, x * t * du2, 0.0)  # t == 0 for huge |x|, where du2 may be inf
    tl.store(DX + offs, (dy * dgelu).to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs, bytes moved

# arch -> (BLOCK elements per program, num_warps). Starting points (16-byte vector loads, >= 8
# elements per thread); NOT yet tuned on a GPU: sweep with bench/kernels.py --op gelu and edit.
# "interpreter": few, large programs (each program is one Python call on CPU).
CONFIGS: dict[str, tuple[int, int]] = {
    "sm_80": (2048, 8),
    "sm_89": (1024, 4),
    "sm_90": (2048, 8),
    "default": (1024, 4),
    "interpreter": (1 << 16, 1),
}


_interpreting = interpreting
_arch = device_arch  # the config-table key of a device (bench/ada.py patches it per file)


def get_config(device: torch.device) -> tuple[int, int]:
    return CONFIGS.get(_arch(device), CONFIGS["default"])


def bytes_moved(n: int, pass_: str, *, dtype: torch.dtype) -> int:
    """Minimum DRAM bytes of one call over n elements (the benchmark's GB/s numerator)."""
    size = torch.empty((), dtype=dtype).element_size()
    fwd, bwd = 2 * n * size, 3 * n * size
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ---------------------------------------------------------------------------------- host launchers


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests patch it to NaN-fill, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch_fwd(x: torch.Tensor) -> torch.Tensor:
    x1 = x.contiguous().view(-1)
    y = _alloc(x1.shape, x.dtype, x.device)
    if x1.numel():
        block, warps = get_config(x.device)
        _gelu_fwd_kernel[(triton.cdiv(x1.numel(), block),)](x1, y, x1.numel(), BLOCK=block, num_warps=warps)
    return y.view(x.shape)


def _launch_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x1, dy1 = x.contiguous().view(-1), dy.contiguous().view(-1)
    dx = _alloc(x1.shape, x.dtype, x.device)
    if x1.numel():
        block, warps = get_config(x.device)
        _gelu_bwd_kernel[(triton.cdiv(x1.numel(), block),)](dy1, x1, dx, x1.numel(), BLOCK=block,
                                                            num_warps=warps)
    return dx.view(x.shape)


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::gelu_fwd", mutates_args=())
def _gelu_fwd(x: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x)


@torch.library.custom_op("tritonrun::gelu_bwd", mutates_args=())
def _gelu_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _launch_bwd(dy, x)


@_gelu_fwd.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_gelu_bwd.register_fake
def _(dy, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # x only: the backward recomputes everything else


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _gelu_bwd(dy, x)


_gelu_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------- public API


def gelu(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximation GELU (GPT-2's "gelu_new")."""
    return _gelu_fwd(x)


# ------------------------------------------------------------------------- plain-PyTorch reference


def reference_gelu(x: torch.Tensor, compute_dtype=torch.float64) -> torch.Tensor:
    """The textbook tanh form in `compute_dtype` (tests compare against fp64), cast back to x's dtype."""
    xf = x.to(compute_dtype)
    y = 0.5 * xf * (1.0 + torch.tanh(SQRT_2_OVER_PI * (xf + GELU_COEF * xf.pow(3))))
    return y.to(x.dtype)
