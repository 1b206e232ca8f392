"""ReLU², forward and backward, elementwise over a tensor of any shape.

    relu2(x)  = relu(x)^2 = max(x, 0)^2
    relu2'(x) = 2 * relu(x)            (0 for x <= 0; the backward is dx = 2 * relu(x) * dy)

The speedrun model's MLP activation (modded-nanogpt, from the 2024-10-14 record on: `F.relu(x).square()`
between c_fc and c_proj, on the (rows, 4C) hidden layer).

Layout: any shape, flattened (made contiguous). Dtypes: fp32 / fp16 / bf16, loaded in the storage
dtype, computed in fp32, rounded once at the store; y and dx take x's dtype. relu(x)^2 can overflow
the storage dtype for x > sqrt(finfo.max) (fp16: x > 255.9) exactly as torch's does: inf, not NaN.
NaN inputs propagate to y and dx, as in torch (relu via a select, not max: a GPU's max drops NaN).

Bytes moved (the whole cost: 2 FLOPs per element forward, 3 backward, far below the ridge point):
forward reads x and writes y (2 * n * size); backward reads x and dy and writes dx (3 * n * size).
Only x is saved for the backward (never y, which has the same size): 2 * relu(x) is one select and one
add away. Eager PyTorch runs relu and square as two kernels (4 * n * size forward, and its autograd
saves both relu(x) and the square's input); torch.compile fuses them into one, the peer to beat.

Fusion: ReLU² sits between c_fc and c_proj (no biases in the speedrun model). Applying it in c_fc's
epilogue (and its derivative in c_proj's dgrad) would save these passes over the (rows, 4C) hidden
layer, but the matmuls are torch's (cuBLAS) here: nothing is fused. A GPU session should measure
`bench/kernels.py --op relu2` against torch.compile first.

Registered as torch.library custom ops (namespace "tritonrun", fake + autograd registrations) so
torch.compile traces through; on CPU tensors the kernels run through the Triton interpreter.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import device_arch, interpreting

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _relu2_fwd_kernel(
    X,  # (n,) x's dtype, contiguous
    Y,  # (n,) x's dtype
    n,
    BLOCK: tl.constexpr,
):
    # Bytes: 2 * n * size. FLOPs: 2 per element (select, square).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.where(x < 0.0, 0.0, x)  # not tl.maximum: its GPU max drops a NaN operand; this keeps NaN, as torch
    tl.store(Y + offs, (r * r).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _relu2_bwd_kernel(
    DY,  # (n,) grad of y, y's dtype
    X,  # (n,) the saved input
    DX,  # (n,) x's dtype
    n,
    BLOCK: tl.constexpr,
):
    # Bytes: 3 * n * size. FLOPs: 3 per element (select, add, mul).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.where(x < 0.0, 0.0, x)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, ((r + r) * dy).to(DX.dtype.element_ty), mask=mask)  # 2r exact: one rounding in all


# ----------------------------------------------------------------------------- configs, bytes moved

# arch -> (BLOCK elements per program, num_warps). Starting points (16-byte vector loads, >= 8
# elements per thread), as tritonrun/kernels/gelu.py; NOT yet tuned on a GPU: sweep with bench/kernels.py --op relu2
# and edit. "interpreter": few, large programs (each program is one Python call on CPU).
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


def _check(x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise ValueError(f"relu2: needs a floating-point tensor, got {x.dtype}")


def _launch_fwd(x: torch.Tensor) -> torch.Tensor:
    _check(x)
    x1 = x.contiguous().view(-1)
    y = _alloc(x1.shape, x.dtype, x.device)
    if x1.numel():
        block, warps = get_config(x.device)
        _relu2_fwd_kernel[(triton.cdiv(x1.numel(), block),)](x1, y, x1.numel(), BLOCK=block, num_warps=warps)
    return y.view(x.shape)


def _launch_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    x1, dy1 = x.contiguous().view(-1), dy.contiguous().view(-1)
    dx = _alloc(x1.shape, x.dtype, x.device)
    if x1.numel():
        block, warps = get_config(x.device)
        _relu2_bwd_kernel[(triton.cdiv(x1.numel(), block),)](dy1, x1, dx, x1.numel(), BLOCK=block,
                                                              num_warps=warps)
    return dx.view(x.shape)


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::relu2_fwd", mutates_args=())
def _relu2_fwd(x: torch.Tensor) -> torch.Tensor:
    return _launch_fwd(x)


@torch.library.custom_op("tritonrun::relu2_bwd", mutates_args=())
def _relu2_bwd(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return _launch_bwd(dy, x)


# The fakes allocate what the launchers allocate (bench/memory.py): the contiguous copies of non-contiguous inputs
# (none in the speedrun model's MLP), then the output.
@_relu2_fwd.register_fake
def _(x):
    x.contiguous()
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_relu2_bwd.register_fake
def _(dy, x):
    x.contiguous(), dy.contiguous()
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])  # x only: 2 * relu(x) is recomputed


def _backward(ctx, dy):
    (x,) = ctx.saved_tensors
    return _relu2_bwd(dy, x)


_relu2_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------- public API


def relu2(x: torch.Tensor) -> torch.Tensor:
    """relu(x)**2 (the speedrun model's MLP activation)."""
    return _relu2_fwd(x)


# ------------------------------------------------------------------------- plain-PyTorch reference


def reference_relu2(x: torch.Tensor, compute_dtype=torch.float64) -> torch.Tensor:
    """relu(x)^2 in `compute_dtype` (tests compare against fp64), cast back to x's dtype."""
    return torch.relu(x.to(compute_dtype)).square().to(x.dtype)
