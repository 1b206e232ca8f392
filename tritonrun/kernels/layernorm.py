"""LayerNorm over the last dim, and LayerNorm fused with the residual add that precedes it.

    layer_norm(x, weight, bias, eps)                -> y = (x - mean) * rstd * weight + bias
    add_layer_norm(x, residual, weight, bias, eps)  -> (layer_norm(s), s),  s = x + residual

Layout: x, residual (..., C) row-major, viewed as (rows, C); weight, bias (C,). Any rows, C <= 8192.
Dtypes: fp32 / fp16 / bf16, mixed allowed (autocast training feeds add_layer_norm a bf16 branch output
and the fp32 residual stream). s and y take torch's promoted dtype of (x, residual), as `x + residual`
and F.layer_norm would; dweight/dbias take the parameters' dtype. Every element is loaded in its
storage dtype, all math is fp32, and each output is rounded once at its store. mean and rstd are kept
in fp32 (rows,) for the backward.

Why it is fast (a bandwidth-bound op; ~10 FLOPs per element forward, ~12 backward, far below any
GPU's ridge point, so bytes moved is the whole story; formulas in `bytes_moved` below, used by
bench/kernels.py):
- forward, one pass: read x (and residual) once, write y (and s) once, plus 8 B/row of statistics.
  Unfused PyTorch reads s back after writing it (add, then layer_norm): add_layer_norm saves one
  read of rows x C.
- backward, one pass over rows + a tiny second pass: each program walks a contiguous block of rows,
  writes the input gradient and keeps fp32 partial sums of dweight/dbias in registers, then stores one
  (C,) partial row per program (grid = a few programs per SM); the second kernel sums the partials in
  a fixed order. No atomics: the result is bitwise reproducible for a given GPU. For add_layer_norm
  the gradient of s (from its later uses) is added in the same pass, and dx == dresidual is the same
  tensor (returned twice, never copied); under mixed dtypes the kernel also writes the low-precision
  copy in that same pass instead of a separate cast.
- the backward recomputes x_hat from the saved input (x, or s for add_layer_norm) and the fp32
  mean/rstd: y is not saved.

The ops are torch.library custom ops (namespace "tritonrun") with fake and autograd registrations,
so torch.compile traces through them (each launch stays one opaque kernel in the graph). On CPU
tensors they run through the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import planned as planned_target

MAX_C = 8192  # one row lives in registers: BLOCK_N = next_power_of_2(C) <= 8192

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _ln_fwd_kernel(
    X,  # (rows, C) x's dtype: the LN input, or the branch output added to the residual
    R,  # (rows, C) residual's dtype; unused unless HAS_RESIDUAL
    W,  # (C,) weight
    B,  # (C,) bias
    Y,  # (rows, C) out dtype: the normalized output
    S,  # (rows, C) out dtype: x + residual; unused unless HAS_RESIDUAL
    Mean,  # (rows,) fp32, saved for the backward
    Rstd,  # (rows,) fp32, saved for the backward
    n_rows,
    C,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next_power_of_2(C); lanes >= C are masked
):
    # Bytes: rows*C*(x + [residual + s] + y) + 8*rows (+ 2*C*w, cached). FLOPs: ~10 per element
    # (add, 2 sums, sub, square, scale, fma).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    offs = rows.to(tl.int64)[:, None] * C + cols[None, :]

    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + offs, mask=mask, other=0.0).to(tl.float32)
        s = x.to(S.dtype.element_ty)
        tl.store(S + offs, s, mask=mask)
        # Normalize s as stored (rounded to its dtype), exactly what the backward will reload:
        # y == layer_norm(s) for the s the caller gets back.
        x = s.to(tl.float32)

    mean = tl.sum(x, axis=1) / C
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / C  # two-pass variance on registers: no cancellation
    rstd = tl.rsqrt(var + eps)
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _ln_bwd_kernel(
    DY,  # (rows, C) grad of y, y's dtype
    DS_IN,  # (rows, C) grad of the s output (add_layer_norm), s's dtype; unused unless HAS_DS_IN
    XS,  # (rows, C) the tensor that was normalized: x (layer_norm) or s (add_layer_norm)
    W,  # (C,) weight
    Mean,  # (rows,) fp32
    Rstd,  # (rows,) fp32
    DX,  # (rows, C) XS's dtype: grad of XS (for add_layer_norm: ds = dx = dresidual)
    DX_LOWP,  # (rows, C) the same gradient in a second dtype (mixed precision); unused unless HAS_LOWP
    DW_PARTIAL,  # (programs, C) fp32: this program's sum over its rows of dy * x_hat
    DB_PARTIAL,  # (programs, C) fp32: this program's sum over its rows of dy
    n_rows,
    C,
    rows_per_program,
    HAS_DS_IN: tl.constexpr,
    HAS_LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per loop iteration
    BLOCK_N: tl.constexpr,
):
    # Bytes: rows*C*(dy + xs + [ds_in] + dx + [dx_lowp]) + 8*rows + programs*C*8 (partials).
    # FLOPs: ~12 per element. Math, per row (x_hat = (xs - mean) * rstd, g = w * dy):
    #   dxs = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) [+ ds_in]
    #   dweight += dy * x_hat,  dbias += dy
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < C
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for start in range(row_start, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        xs = tl.load(XS + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (xs - mean[:, None]) * rstd[:, None], 0.0)
        g = w[None, :] * dy  # zero on masked lanes (dy and w loaded as 0)
        c1 = tl.sum(g * x_hat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS_IN:
            dx += tl.load(DS_IN + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_LOWP:
            tl.store(DX_LOWP + offs, dx.to(DX_LOWP.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        db_acc += dy
    # Fixed-shape tree sums: the same rows always reduce in the same order.
    tl.store(DW_PARTIAL + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(DB_PARTIAL + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_mask)


@triton.jit
def _ln_dwdb_kernel(
    DW_PARTIAL,  # (programs, C) fp32
    DB_PARTIAL,  # (programs, C) fp32
    DW,  # (C,) weight's dtype
    DB,  # (C,) bias's dtype
    n_partials,
    C,
    BLOCK_P: tl.constexpr,  # partial rows per step
    BLOCK_C: tl.constexpr,  # columns per program
):
    # Second pass of the deterministic reduction. Bytes: 2*programs*C*4 + 2*C*w. FLOPs: 2*programs*C.
    pid = tl.program_id(0)
    cols = pid * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    dw = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_partials)[:, None] & col_mask[None, :]
        offs = p[:, None] * C + cols[None, :]
        dw += tl.load(DW_PARTIAL + offs, mask=mask, other=0.0)
        db += tl.load(DB_PARTIAL + offs, mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(dw, axis=0).to(DW.dtype.element_ty), mask=col_mask)
    tl.store(DB + cols, tl.sum(db, axis=0).to(DB.dtype.element_ty), mask=col_mask)


# ----------------------------------------------------------------------------- configs, bytes moved


class LNConfig(NamedTuple):
    fwd_warps: int
    fwd_rows: int  # rows per forward program (BLOCK_M)
    bwd_warps: int
    bwd_rows: int  # rows per backward loop step (BLOCK_M)
    bwd_programs_per_sm: int  # backward grid = SMs * this (capped by the row count)


# arch -> [(largest BLOCK_N, config)], first match wins. Starting points chosen by register budget
# (a 4-warp program holding BLOCK_M x 1024 fp32 needs 8*BLOCK_M registers per live tensor per thread);
# NOT yet tuned on a GPU: a GPU session should sweep these with bench/kernels.py and edit the table.
# "interpreter" (TRITON_INTERPRET=1 on CPU) wants few, large programs: each program is a Python call.
CONFIGS: dict[str, list[tuple[int, LNConfig]]] = {
    "sm_80": [(1024, LNConfig(4, 4, 4, 2, 4)), (2048, LNConfig(8, 2, 8, 1, 4)),
              (4096, LNConfig(8, 1, 8, 1, 2)), (8192, LNConfig(16, 1, 16, 1, 2))],
    "sm_89": [(1024, LNConfig(4, 4, 4, 2, 4)), (2048, LNConfig(8, 2, 8, 1, 4)),
              (4096, LNConfig(8, 1, 8, 1, 2)), (8192, LNConfig(16, 1, 16, 1, 2))],
    "sm_90": [(1024, LNConfig(4, 4, 4, 2, 4)), (2048, LNConfig(8, 2, 8, 1, 4)),
              (4096, LNConfig(8, 1, 8, 1, 2)), (8192, LNConfig(16, 1, 16, 1, 2))],
    "default": [(1024, LNConfig(4, 2, 4, 1, 4)), (2048, LNConfig(8, 1, 8, 1, 4)),
                (4096, LNConfig(8, 1, 8, 1, 2)), (8192, LNConfig(16, 1, 16, 1, 2))],
    "interpreter": [(1024, LNConfig(1, 16, 1, 16, 1)), (2048, LNConfig(1, 8, 1, 8, 1)),
                    (4096, LNConfig(1, 4, 1, 4, 1)), (8192, LNConfig(1, 2, 1, 2, 1))],
}
INTERPRETER_PROGRAMS = 4  # backward grid under the interpreter (stands in for "SMs")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def _device_arch_and_sms(device: torch.device) -> tuple[str, int]:
    if device.type != "cuda" or _interpreting():
        return "interpreter", INTERPRETER_PROGRAMS
    major, minor = torch.cuda.get_device_capability(device)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return f"sm_{major}{minor}", sms


def get_config(C: int, device: torch.device, planned: bool = False) -> tuple[int, LNConfig, int]:
    """(BLOCK_N, config, SM count) for width C on `device`; with `planned`, for the GPU a fake implementation
    plans for (kernels.target.planning_for) when one is named."""
    if not 0 < C <= MAX_C:
        raise ValueError(f"layer_norm: C={C} is outside 1..{MAX_C} (one row must fit in one program)")
    block_n = triton.next_power_of_2(C)
    target = planned_target() if planned else None
    arch, sms = (target.arch, target.sm_count) if target is not None else _device_arch_and_sms(device)
    table = CONFIGS.get(arch, CONFIGS["default"])
    config = next(cfg for max_n, cfg in table if block_n <= max_n)
    return block_n, config, sms


def bytes_moved(rows: int, C: int, pass_: str, *, x: torch.dtype, y: torch.dtype, w: torch.dtype,
                residual: torch.dtype | None = None) -> int:
    """Minimum DRAM bytes of one call (the benchmark's GB/s numerator), pass_ in fwd | bwd | fwd+bwd.
    `y` is the output dtype (= s's dtype for add_layer_norm). Backward assumes the s output has a
    gradient too (it always has one inside GPT-2, except after the final ln_f). The fp32 partials of
    the dweight/dbias reduction (2 * 4 * programs * C, written and read once, < 1% at GPT-2 shapes)
    are implementation overhead and are not counted."""
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    n, sx, sy, sw = rows * C, size(x), size(y), size(w)
    params = 2 * C * sw  # weight + bias read (fwd) / dweight + dbias written (bwd)
    stats = 8 * rows  # mean + rstd, fp32
    if residual is None:
        fwd = n * (sx + sy) + params + stats
        bwd = n * (sy + sx + sx) + C * sw + stats + params  # read dy, x; write dx
    else:
        sr = size(residual)
        fwd = n * (sx + sr + 2 * sy) + params + stats  # read x, residual; write s, y
        extra = (sx if x != y else 0) + (sr if residual != y else 0)  # low-precision grad copies
        bwd = n * (sy + 3 * sy + extra) + C * sw + stats + params  # read dy, ds, s; write ds
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ---------------------------------------------------------------------------------- host launchers


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher hands to a kernel comes from here (tests patch it to NaN-fill, proving
    that each output element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1, t.shape[-1])


def _forward(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
             eps: float):
    """Returns y, s (None without residual), mean, rstd; y and s shaped like x, mean/rstd like x[..., 0]."""
    C = x.shape[-1]
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"layer_norm: weight/bias must be ({C},), got {tuple(weight.shape)}/{tuple(bias.shape)}")
    out_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    x2 = _as_rows(x)
    r2 = _as_rows(residual) if residual is not None else x2
    n_rows, dev = x2.shape[0], x.device
    y = _alloc((n_rows, C), out_dtype, dev)
    s = _alloc((n_rows, C), out_dtype, dev) if residual is not None else y
    mean = _alloc((n_rows,), torch.float32, dev)
    rstd = _alloc((n_rows,), torch.float32, dev)
    if n_rows:
        block_n, cfg, _ = get_config(C, dev)
        grid = (triton.cdiv(n_rows, cfg.fwd_rows),)
        _ln_fwd_kernel[grid](x2, r2, weight.contiguous(), bias.contiguous(), y, s, mean, rstd, n_rows, C, eps,
                             HAS_RESIDUAL=residual is not None, BLOCK_M=cfg.fwd_rows, BLOCK_N=block_n,
                             num_warps=cfg.fwd_warps)
    y, rows_shape = y.view(x.shape), x.shape[:-1]
    return y, (s.view(x.shape) if residual is not None else None), mean.view(rows_shape), rstd.view(rows_shape)


def _bwd_programs(n_rows: int, cfg: LNConfig, sms: int) -> int:
    """Backward grid: a few programs per SM, each with a (C,) fp32 dweight and dbias partial row."""
    return max(1, min(triton.cdiv(n_rows, cfg.bwd_rows), sms * cfg.bwd_programs_per_sm))


def _backward(dy: torch.Tensor, ds_in: torch.Tensor | None, xs: torch.Tensor, weight: torch.Tensor,
              mean: torch.Tensor, rstd: torch.Tensor, lowp_dtype: torch.dtype):
    """Returns dxs (xs's dtype), dxs in lowp_dtype (empty when that equals xs's dtype), dweight, dbias."""
    C = xs.shape[-1]
    xs2, dy2 = _as_rows(xs), _as_rows(dy)
    ds2 = _as_rows(ds_in) if ds_in is not None else dy2
    n_rows, dev = xs2.shape[0], xs.device
    has_lowp = lowp_dtype != xs.dtype
    dx = _alloc((n_rows, C), xs.dtype, dev)
    dx_lowp = _alloc((n_rows, C) if has_lowp else (0,), lowp_dtype, dev)
    dw = _alloc((C,), weight.dtype, dev)
    db = _alloc((C,), weight.dtype, dev)
    block_n, cfg, sms = get_config(C, dev)
    programs = _bwd_programs(n_rows, cfg, sms)
    rows_per_program = triton.cdiv(n_rows, programs) if n_rows else 0
    dw_partial = _alloc((programs, C), torch.float32, dev)
    db_partial = _alloc((programs, C), torch.float32, dev)
    _ln_bwd_kernel[(programs,)](dy2, ds2, xs2, weight.contiguous(), mean.reshape(-1), rstd.reshape(-1), dx,
                                dx_lowp if has_lowp else dx, dw_partial, db_partial, n_rows, C, rows_per_program,
                                HAS_DS_IN=ds_in is not None, HAS_LOWP=has_lowp, BLOCK_M=cfg.bwd_rows,
                                BLOCK_N=block_n, num_warps=cfg.bwd_warps)
    block_c = 128 if not _interpreting() else min(block_n, 1024)
    _ln_dwdb_kernel[(triton.cdiv(C, block_c),)](dw_partial, db_partial, dw, db, programs, C,
                                               BLOCK_P=32, BLOCK_C=block_c, num_warps=4)
    return dx.view(xs.shape), (dx_lowp.view(xs.shape) if has_lowp else dx_lowp), dw, db


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y, _, mean, rstd = _forward(x, None, weight, bias, eps)
    return y, mean, rstd


@torch.library.custom_op("tritonrun::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.shape != residual.shape:
        raise ValueError(f"add_layer_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ")
    return _forward(x, residual, weight, bias, eps)


@torch.library.custom_op("tritonrun::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd(dy: torch.Tensor, ds_in: torch.Tensor | None, xs: torch.Tensor, weight: torch.Tensor,
                    mean: torch.Tensor, rstd: torch.Tensor, lowp_dtype: torch.dtype
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dy, ds_in, xs, weight, mean, rstd, lowp_dtype)


@_layer_norm_fwd.register_fake
def _(x, weight, bias, eps):
    rows = x.shape[:-1]
    return (x.new_empty(x.shape), x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@_add_layer_norm_fwd.register_fake
def _(x, residual, weight, bias, eps):
    dt, rows = torch.promote_types(x.dtype, residual.dtype), x.shape[:-1]
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=dt),
            x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32))


@_layer_norm_bwd.register_fake
def _(dy, ds_in, xs, weight, mean, rstd, lowp_dtype):
    # What _backward allocates (a memory estimate under FakeTensorMode sees the peak inside the op): row-major
    # copies of non-contiguous inputs, the outputs, and the per-program fp32 dweight/dbias partials.
    C = xs.shape[-1]
    n_rows = xs.numel() // max(1, C)
    copies = [t.new_empty(t.shape) for t in (xs, dy, ds_in) if t is not None and not t.is_contiguous()]
    lowp = xs.new_empty(xs.shape if lowp_dtype != xs.dtype else (0,), dtype=lowp_dtype)
    dx, dw, db = xs.new_empty(xs.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape)
    _, cfg, sms = get_config(C, xs.device, planned=True)
    partials = [xs.new_empty((_bwd_programs(n_rows, cfg, sms), C), dtype=torch.float32) for _ in range(2)]
    del copies, partials
    return dx, lowp, dw, db


def _ln_setup(ctx, inputs, output):
    x, weight = inputs[0], inputs[1]
    y, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.set_materialize_grads(False)


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    if dy is None:
        return None, None, None, None
    dx, _, dw, db = _layer_norm_bwd(dy, None, x, weight, mean, rstd, x.dtype)
    return dx, dw, db, None


def _add_ln_setup(ctx, inputs, output):
    x, residual, weight = inputs[0], inputs[1], inputs[2]
    y, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)  # s, not x and residual: x_hat is recomputed from s
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.set_materialize_grads(False)


def _add_ln_backward(ctx, dy, ds_in, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    if dy is None and ds_in is None:
        return None, None, None, None, None
    if dy is None:  # only s was used downstream: LayerNorm contributes nothing
        return ds_in.to(x_dtype), ds_in.to(r_dtype), None, None, None
    # x + residual -> s: both inputs get ds. One dtype that differs from s's is written by the same pass.
    lowp = x_dtype if x_dtype != s.dtype else r_dtype
    ds, ds_lowp, dw, db = _layer_norm_bwd(dy, ds_in, s, weight, mean, rstd, lowp)
    pick = lambda dt: ds if dt == s.dtype else (ds_lowp if dt == lowp else ds.to(dt))  # noqa: E731
    return pick(x_dtype), pick(r_dtype), dw, db, None


_layer_norm_fwd.register_autograd(_ln_backward, setup_context=_ln_setup)
_add_layer_norm_fwd.register_autograd(_add_ln_backward, setup_context=_add_ln_setup)


# ------------------------------------------------------------------------------------- public API


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim (weight and bias required, as in GPT-2)."""
    return _layer_norm_fwd(x, weight, bias, eps)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(layer_norm(x + residual), x + residual) in one pass over memory."""
    y, s, _, _ = _add_layer_norm_fwd(x, residual, weight, bias, eps)
    return y, s


# ------------------------------------------------------------------------- plain-PyTorch reference


def reference_layer_norm(x, weight, bias, eps: float = 1e-5, compute_dtype=torch.float64):
    """The same math in plain PyTorch, computed in `compute_dtype` (tests compare against fp64), result
    cast back to the output dtype the kernel uses."""
    xf = x.to(compute_dtype)
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)  # biased, as LayerNorm
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(compute_dtype) + bias.to(compute_dtype)
    return y.to(x.dtype)


def reference_add_layer_norm(x, residual, weight, bias, eps: float = 1e-5, compute_dtype=torch.float64):
    s = x + residual  # rounded to the promoted dtype, like the kernel's s output
    return reference_layer_norm(s, weight, bias, eps, compute_dtype), s
