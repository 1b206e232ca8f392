"""Weightless RMSNorm over the last dim, fused with the residual add, and with the speedrun's x0 mix.

    rms_norm(x, eps)                   -> y = x * rstd,  rstd = 1 / sqrt(mean(x^2) + eps)
    add_rms_norm(x, residual, eps)     -> (rms_norm(s), s),  s = x + residual
    mix_rms_norm(x, x0, lambdas, eps)  -> (rms_norm(s), s),  s = lambdas[0] * x + lambdas[1] * x0

No weight, no bias (modded-nanogpt's F.rms_norm(x, (C,))); eps=None means torch.finfo(dtype).eps, as
F.rms_norm. mix_rms_norm is the block entry of the 2024-11-10 speedrun record (`x = l0 * x + l1 * x0`
with learnable scalars, then the attention's RMSNorm): s is the block's residual stream, y the
attention input; lambdas is a (2,) tensor (fp32 in the model) and gets a gradient.

Layout: x, residual, x0 (..., C) with a contiguous last dim, viewed as (rows, C) with a row stride:
no copy when the leading dims collapse into one stride (e.g. a column slice of a fused projection),
a contiguous copy otherwise. Any rows, C <= 8192. Outputs are contiguous.
Dtypes: fp32 / fp16 / bf16, mixed allowed (autocast training feeds add_rms_norm a bf16 branch output
and the fp32 residual stream). y and s take torch's promoted dtype of the inputs (lambdas excluded:
the model's l0 is a 0-dim tensor, which does not promote x), as `x + residual` and F.rms_norm would.
Every element is loaded in its storage dtype, all math is fp32 (sum of squares, rsqrt, products),
each output is rounded once at its store; rstd is kept in fp32 (rows,) for the backward.

Backward math, per row (x_hat = s * rstd, dy the grad of y, ds the grad of s from its later uses):
    ds_total = rstd * (dy - x_hat * mean(dy * x_hat)) + ds
    add: dx = dresidual = ds_total;  mix: dx = l0 * ds_total, dx0 = l1 * ds_total,
         dl0 = sum(ds_total * x), dl1 = sum(ds_total * x0)   (over every row and column)
Weightless: no dweight reduction, so the backward is one row-wise pass. The mix's dl0/dl1 are the
only reduction: each program writes its fp32 partial pair, a one-program second kernel sums them in a
fixed order (no atomics: bitwise reproducible for a given GPU and shape).

Bytes moved (bandwidth-bound: ~4 FLOPs per element forward, ~6-10 backward; formulas in
`bytes_moved`, used by bench/kernels.py), n = rows * C, sizes in bytes per element:
    rms_norm      fwd n*(x + y)             bwd n*(dy + x + dx)             (+ 4*rows rstd each way)
    add_rms_norm  fwd n*(x + r + 2*s)       bwd n*(dy + ds + s + ds_out [+ lowp copy])
    mix_rms_norm  fwd n*(x + x0 + 2*s)      bwd n*(dy + ds + x + x0 + dx + dx0)
- forward, one pass: the inputs read once, y and s written once. Unfused PyTorch writes s, then
  reads it back for the norm: the fusion saves that read.
- backward, one pass: recomputes x_hat from what the forward saved (x for rms_norm, s for
  add_rms_norm, x and x0 for mix_rms_norm: s is recomputed from them and rounded exactly as the
  forward stored it) and the fp32 rstd; y is never saved. The grad of s is added in the same pass
  (the add autograd would otherwise do: read 2, write 1). Under mixed dtypes add_rms_norm writes the
  low-precision copy of ds in the same pass instead of a separate cast.

Does fusing the x0 mix pay? (asked by issue 26; yes, by bytes, so mix_rms_norm exists.) Per block, per
micro-batch, n = rows * C elements of the residual stream (fp32 under autocast, 4 B; the record keeps it in
bf16, which halves every figure below and leaves the ratios):
    unfused, eager:  fwd mix 3n (read x, x0; write s) + rms_norm 2n (read s; write y)        = 5n
                     bwd rms_norm 3n (dy, s -> g) + autograd's g + ds 3n + mix 8n (l0*g, l1*g:
                     2n each; sum(g*x), sum(g*x0): 2n each)                                  = 14n
    unfused, best:   fwd as above 5n; bwd add_rms_norm-style (dy, ds, s -> g) 4n + one fused
                     mix backward (g, x, x0 -> dx, dx0, partials) 5n                         = 9n
    fused:           fwd 4n (x, x0 -> y, s); bwd 6n (dy, ds, x, x0 -> dx, dx0)
It removes a write + read of s's gradient and a read of s in the backward, and a read of s forward:
4n of 14n against the best unfused pair, 9n of 19n against eager. At the d12 training shape (8 x 1024
rows, C = 768, fp32 stream: n * 4 B = 25.2 MB) that is 101 MB (best unfused) to 226 MB (eager) per
block, x 12 blocks = 1.2-2.7 GB per micro-batch: 2.4-5.4 ms at an RTX 4070's 504 GB/s, against
~280 ms of matmul work for the micro-batch (6.5 TFLOP at 40% of 58.3 TFLOPS): ~1-2% of a step. Small,
but it is the same class of saving as add_rms_norm's, and it saves one (rows, C) tensor less for the
backward (x and x0, which autograd's unfused mix saves too; not s) -- so it is built. Not fused: the sum of
dx0 over the 12 blocks (x0 feeds every block; autograd adds the 12 gradients), the same either way.

The ops are torch.library custom ops (namespace "tritonrun") with fake and autograd registrations,
so torch.compile traces through them (each launch stays one opaque kernel in the graph). On CPU
tensors they run through the Triton interpreter (TRITON_INTERPRET=1, set before import).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import device_arch, interpreting
from tritonrun.kernels.target import planned as planned_target

MAX_C = 8192  # one row lives in registers: BLOCK_N = next_power_of_2(C) <= 8192

PRE_NONE, PRE_ADD, PRE_MIX = 0, 1, 2  # what the forward computes before normalizing (the PRE constexpr)

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _rms_fwd_kernel(
    X,  # (rows, C) row stride stride_x: rms_norm's input, add's branch output, or mix's x
    R,  # (rows, C) row stride stride_r: add's residual or mix's x0; unused when PRE == 0
    Lambdas,  # (2,) mix's (l0, l1), any float dtype; unused unless PRE == 2
    Y,  # (rows, C) contiguous, out dtype: the normalized output
    S,  # (rows, C) contiguous, out dtype: the pre-norm sum; unused when PRE == 0
    Rstd,  # (rows,) fp32, saved for the backward
    n_rows,
    C,
    stride_x,
    stride_r,
    eps,
    PRE: tl.constexpr,  # 0: normalize x; 1: s = x + r; 2: s = l0 * x + l1 * r
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # next_power_of_2(C); lanes >= C are masked
):
    # Bytes: rows*C*(x + [r + s] + y) + 4*rows. FLOPs: ~4 per element (square, sum, scale; + add/2 fma).
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    offs = rows64 * C + cols[None, :]

    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if PRE != 0:
        r = tl.load(R + rows64 * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if PRE == 1:
            x = x + r
        else:
            x = tl.load(Lambdas).to(tl.float32) * x + tl.load(Lambdas + 1).to(tl.float32) * r
        s = x.to(S.dtype.element_ty)
        tl.store(S + offs, s, mask=mask)
        # Normalize s as stored (rounded to its dtype), exactly what the backward recomputes or reloads:
        # y == rms_norm(s) for the s the caller gets back.
        x = s.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / C + eps)  # masked lanes are 0: they add nothing
    tl.store(Y + offs, (x * rstd[:, None]).to(Y.dtype.element_ty), mask=mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


@triton.jit
def _rms_bwd_kernel(
    DY,  # (rows, C) row stride stride_dy: grad of y, y's dtype
    DS_IN,  # (rows, C) row stride stride_ds: grad of s (add_rms_norm), s's dtype; unused unless HAS_DS_IN
    XS,  # (rows, C) row stride stride_xs: the tensor that was normalized: x (rms_norm) or s (add_rms_norm)
    Rstd,  # (rows,) fp32
    DX,  # (rows, C) contiguous, XS's dtype: grad of XS (for add_rms_norm: ds = dx = dresidual)
    DX_LOWP,  # (rows, C) contiguous: the same gradient in a second dtype (mixed precision); unless HAS_LOWP unused
    n_rows,
    C,
    stride_dy,
    stride_ds,
    stride_xs,
    HAS_DS_IN: tl.constexpr,
    HAS_LOWP: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,
):
    # Bytes: rows*C*(dy + xs + [ds_in] + dx + [dx_lowp]) + 4*rows. FLOPs: ~6 per element.
    # Per row: x_hat = xs * rstd;  dxs = rstd * (dy - x_hat * mean(dy * x_hat)) [+ ds_in]
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    offs = rows64 * C + cols[None, :]

    xs = tl.load(XS + rows64 * stride_xs + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
    x_hat = xs * rstd[:, None]
    c = tl.sum(dy * x_hat, axis=1) / C  # masked lanes: dy = 0
    dx = (dy - x_hat * c[:, None]) * rstd[:, None]
    if HAS_DS_IN:
        dx += tl.load(DS_IN + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
    if HAS_LOWP:
        tl.store(DX_LOWP + offs, dx.to(DX_LOWP.dtype.element_ty), mask=mask)


@triton.jit
def _mix_rms_bwd_kernel(
    DY,  # (rows, C) row stride stride_dy: grad of y, s's dtype (y and s share it); unused unless HAS_DY
    DS_IN,  # (rows, C) row stride stride_ds: grad of s, s's dtype; unused unless HAS_DS_IN
    X,  # (rows, C) row stride stride_x: the saved x
    X0,  # (rows, C) row stride stride_x0: the saved x0
    Lambdas,  # (2,) (l0, l1)
    Rstd,  # (rows,) fp32
    DX,  # (rows, C) contiguous, x's dtype: l0 * ds_total
    DX0,  # (rows, C) contiguous, x0's dtype: l1 * ds_total
    DL_PARTIAL,  # (programs, 2) fp32: this program's sums of ds_total * x and ds_total * x0
    n_rows,
    C,
    stride_dy,
    stride_ds,
    stride_x,
    stride_x0,
    HAS_DY: tl.constexpr,
    HAS_DS_IN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Bytes: rows*C*(dy + ds + x + x0 + dx + dx0) + 4*rows + 8*programs. FLOPs: ~10 per element.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < n_rows
    mask = row_mask[:, None] & (cols < C)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    offs = rows64 * C + cols[None, :]

    l0 = tl.load(Lambdas).to(tl.float32)
    l1 = tl.load(Lambdas + 1).to(tl.float32)
    x = tl.load(X + rows64 * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x0 = tl.load(X0 + rows64 * stride_x0 + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # ds_total: the whole gradient of s
    if HAS_DY:
        dy = tl.load(DY + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0)
        # s exactly as the forward stored it: the same fp32 expression, rounded to s's (= dy's) dtype
        s = (l0 * x + l1 * x0).to(dy.dtype).to(tl.float32)
        dy = dy.to(tl.float32)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        x_hat = s * rstd[:, None]
        c = tl.sum(dy * x_hat, axis=1) / C
        g = (dy - x_hat * c[:, None]) * rstd[:, None]
    if HAS_DS_IN:
        g += tl.load(DS_IN + rows64 * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, (l0 * g).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX0 + offs, (l1 * g).to(DX0.dtype.element_ty), mask=mask)
    # Fixed-shape tree sums: the same rows always reduce in the same order.
    tl.store(DL_PARTIAL + 2 * pid, tl.sum(tl.sum(g * x, axis=1), axis=0))
    tl.store(DL_PARTIAL + 2 * pid + 1, tl.sum(tl.sum(g * x0, axis=1), axis=0))


@triton.jit
def _mix_dl_kernel(
    DL_PARTIAL,  # (programs, 2) fp32
    DL,  # (2,) lambdas' dtype
    n_partials,
    BLOCK_P: tl.constexpr,  # partial rows per step
):
    # Second pass of the deterministic reduction, one program. Bytes: 8*programs + 2*size. FLOPs: 2*programs.
    acc = tl.zeros([BLOCK_P, 2], dtype=tl.float32)
    k = tl.arange(0, 2)
    for p0 in range(0, n_partials, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(DL_PARTIAL + p[:, None] * 2 + k[None, :], mask=(p < n_partials)[:, None], other=0.0)
    tl.store(DL + k, tl.sum(acc, axis=0).to(DL.dtype.element_ty))


# ----------------------------------------------------------------------------- configs, bytes moved


class RMSConfig(NamedTuple):
    fwd_warps: int
    fwd_rows: int  # rows per forward program (BLOCK_M)
    bwd_warps: int
    bwd_rows: int  # rows per backward program (BLOCK_M), rms_norm / add_rms_norm
    mix_bwd_rows: int  # rows per backward program of mix_rms_norm (holds x, x0, s, dy, ds, g: more registers)


# arch -> [(largest BLOCK_N, config)], first match wins. Starting points chosen by register budget (a
# 4-warp program holding BLOCK_M x 1024 fp32 needs 8*BLOCK_M registers per live tensor per thread),
# checked spill-free for sm_80/89/90 by bench/ada.py; NOT yet tuned on a GPU: a GPU session should sweep
# these with bench/kernels.py --op rmsnorm --op add_rmsnorm --op mix_rmsnorm and edit the table.
# "interpreter" (TRITON_INTERPRET=1 on CPU) wants few, large programs: each program is a Python call.
CONFIGS: dict[str, list[tuple[int, RMSConfig]]] = {
    "sm_80": [(1024, RMSConfig(4, 4, 4, 2, 2)), (2048, RMSConfig(8, 2, 8, 1, 1)),
              (4096, RMSConfig(8, 1, 8, 1, 1)), (8192, RMSConfig(16, 1, 16, 1, 1))],
    "sm_89": [(1024, RMSConfig(4, 4, 4, 2, 2)), (2048, RMSConfig(8, 2, 8, 1, 1)),
              (4096, RMSConfig(8, 1, 8, 1, 1)), (8192, RMSConfig(16, 1, 16, 1, 1))],
    "sm_90": [(1024, RMSConfig(4, 4, 4, 2, 2)), (2048, RMSConfig(8, 2, 8, 1, 1)),
              (4096, RMSConfig(8, 1, 8, 1, 1)), (8192, RMSConfig(16, 1, 16, 1, 1))],
    "default": [(1024, RMSConfig(4, 2, 4, 1, 1)), (2048, RMSConfig(8, 1, 8, 1, 1)),
                (4096, RMSConfig(8, 1, 8, 1, 1)), (8192, RMSConfig(16, 1, 16, 1, 1))],
    "interpreter": [(1024, RMSConfig(1, 16, 1, 16, 16)), (2048, RMSConfig(1, 8, 1, 8, 8)),
                    (4096, RMSConfig(1, 4, 1, 4, 4)), (8192, RMSConfig(1, 2, 1, 2, 2))],
}
DL_BLOCK_P = 256  # partial pairs per step of the lambdas' second pass


_interpreting = interpreting
_arch = device_arch  # the config-table key of a device (bench/ada.py patches it per file)


def get_config(C: int, device: torch.device, op: str = "rms_norm") -> tuple[int, RMSConfig]:
    """(BLOCK_N, config) for width C on `device`."""
    if not 0 < C <= MAX_C:
        raise ValueError(f"{op}: C={C} is outside 1..{MAX_C} (one row must fit in one program)")
    block_n = triton.next_power_of_2(C)
    table = CONFIGS.get(_arch(device), CONFIGS["default"])
    return block_n, next(cfg for max_n, cfg in table if block_n <= max_n)


def bytes_moved(rows: int, C: int, pass_: str, *, x: torch.dtype, other: torch.dtype | None = None,
                op: str = "rms_norm") -> int:
    """Minimum DRAM bytes of one call (the benchmark's GB/s numerator), pass_ in fwd | bwd | fwd+bwd.
    op: rms_norm | add_rms_norm (other = the residual's dtype) | mix_rms_norm (other = x0's dtype). y and s
    take the promoted dtype. Backward assumes s has a gradient too (it always has one in the speedrun
    model, except after the final norm). The 4 B/row of rstd is counted; the mix's partial sums (8 B per
    program, < 0.01%) and the (2,) lambdas are not."""
    size = lambda dt: torch.empty((), dtype=dt).element_size()  # noqa: E731
    n, sx, stats = rows * C, size(x), 4 * rows
    if op == "rms_norm":
        fwd, bwd = n * 2 * sx, n * 3 * sx  # read x, write y | read dy, x; write dx
    else:
        if other is None:
            raise ValueError(f"bytes_moved: {op} needs other= (the second input's dtype)")
        so, sy = size(other), size(torch.promote_types(x, other))
        fwd = n * (sx + so + 2 * sy)  # read x, other; write s, y
        if op == "add_rms_norm":
            extra = (sx if x != torch.promote_types(x, other) else 0) + (so if other != torch.promote_types(x, other)
                                                                         else 0)
            bwd = n * (4 * sy + extra)  # read dy, ds, s; write ds (+ the low-precision copy)
        elif op == "mix_rms_norm":
            bwd = n * (2 * sy + 2 * sx + 2 * so)  # read dy, ds, x, x0; write dx, dx0
        else:
            raise ValueError(f"bytes_moved: unknown op {op!r}")
    fwd, bwd = fwd + stats, bwd + stats
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ---------------------------------------------------------------------------------- host launchers


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher hands to a kernel comes from here (tests patch it to NaN-fill, proving
    that each output element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(rows, C) with a unit column stride: a view when the leading dims collapse into one row stride
    (a column slice of a wider tensor, an expanded row), else a contiguous copy."""
    C = t.shape[-1]
    if t.stride(-1) == 1 or C == 1:
        try:
            rows = t.view(-1, C)
            if rows.stride(1) == 1 or C == 1:
                return rows
        except (RuntimeError, ValueError):  # leading dims that do not collapse (e.g. x[::2] over the batch);
            # ValueError: what view raises under FakeTensorMode (its fake implementation, bench/memory.py)
            pass
    return t.contiguous().view(-1, C)


def _row_stride(t2: torch.Tensor) -> int:
    return t2.stride(0) if t2.shape[0] > 1 else t2.shape[1]


def _resolve_eps(eps: float | None, dtype: torch.dtype) -> float:
    if eps is None and dtype.is_floating_point:
        return torch.finfo(dtype).eps
    return 0.0 if eps is None else float(eps)  # a non-float input is refused by the launcher, with its name


def _check_pair(op: str, x: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if x.shape != other.shape:
        raise ValueError(f"{op}: x {tuple(x.shape)} and {name} {tuple(other.shape)} must have the same shape")
    if x.device != other.device:
        raise ValueError(f"{op}: x is on {x.device} but {name} on {other.device}: move both to one device")


def _forward(x: torch.Tensor, other: torch.Tensor | None, lambdas: torch.Tensor | None, eps: float, pre: int):
    """Returns y, s (None when pre == PRE_NONE), rstd; y and s shaped like x, rstd like x[..., 0]."""
    op = ("rms_norm", "add_rms_norm", "mix_rms_norm")[pre]
    C = x.shape[-1] if x.dim() else 0
    out_dtype = x.dtype if other is None else torch.promote_types(x.dtype, other.dtype)
    if not out_dtype.is_floating_point:
        raise ValueError(f"{op}: needs floating-point inputs, got {out_dtype}")
    block_n, cfg = get_config(C, x.device, op)
    x2 = _as_rows(x)
    o2 = _as_rows(other) if other is not None else x2
    n_rows, dev = x2.shape[0], x.device
    y = _alloc((n_rows, C), out_dtype, dev)
    s = _alloc((n_rows, C), out_dtype, dev) if pre != PRE_NONE else y
    rstd = _alloc((n_rows,), torch.float32, dev)
    if n_rows:
        grid = (triton.cdiv(n_rows, cfg.fwd_rows),)
        _rms_fwd_kernel[grid](x2, o2, lambdas if lambdas is not None else rstd, y, s, rstd, n_rows, C,
                              _row_stride(x2), _row_stride(o2), eps, PRE=pre, BLOCK_M=cfg.fwd_rows,
                              BLOCK_N=block_n, num_warps=cfg.fwd_warps)
    rows_shape = x.shape[:-1]
    return y.view(x.shape), (s.view(x.shape) if pre != PRE_NONE else None), rstd.view(rows_shape)


def _backward(dy: torch.Tensor, ds_in: torch.Tensor | None, xs: torch.Tensor, rstd: torch.Tensor,
              lowp_dtype: torch.dtype):
    """rms_norm / add_rms_norm backward. Returns dxs (xs's dtype) and dxs in lowp_dtype (empty when that
    equals xs's dtype)."""
    C = xs.shape[-1]
    xs2, dy2 = _as_rows(xs), _as_rows(dy)
    ds2 = _as_rows(ds_in) if ds_in is not None else dy2
    n_rows, dev = xs2.shape[0], xs.device
    has_lowp = lowp_dtype != xs.dtype
    dx = _alloc((n_rows, C), xs.dtype, dev)
    dx_lowp = _alloc((n_rows, C) if has_lowp else (0,), lowp_dtype, dev)
    if n_rows:
        block_n, cfg = get_config(C, dev)
        grid = (triton.cdiv(n_rows, cfg.bwd_rows),)
        _rms_bwd_kernel[grid](dy2, ds2, xs2, rstd.reshape(-1), dx, dx_lowp if has_lowp else dx, n_rows, C,
                              _row_stride(dy2), _row_stride(ds2), _row_stride(xs2), HAS_DS_IN=ds_in is not None,
                              HAS_LOWP=has_lowp, BLOCK_M=cfg.bwd_rows, BLOCK_N=block_n, num_warps=cfg.bwd_warps)
    return dx.view(xs.shape), (dx_lowp.view(xs.shape) if has_lowp else dx_lowp)


def _mix_backward(dy: torch.Tensor | None, ds_in: torch.Tensor | None, x: torch.Tensor, x0: torch.Tensor,
                  lambdas: torch.Tensor, rstd: torch.Tensor):
    """mix_rms_norm backward. Returns dx (x's dtype), dx0 (x0's dtype), dlambdas (lambdas' dtype)."""
    C, s_dtype = x.shape[-1], torch.promote_types(x.dtype, x0.dtype)
    x2, x02 = _as_rows(x), _as_rows(x0)
    # dy's dtype tells the kernel s's (to recompute s rounded as stored): autograd hands y's dtype, = s's.
    dy2 = _as_rows(dy.to(s_dtype)) if dy is not None else None
    ds2 = _as_rows(ds_in) if ds_in is not None else None
    n_rows, dev = x2.shape[0], x.device
    dx = _alloc((n_rows, C), x.dtype, dev)
    dx0 = _alloc((n_rows, C), x0.dtype, dev)
    dl = _alloc((2,), lambdas.dtype, dev)
    block_n, cfg = get_config(C, dev, "mix_rms_norm")
    programs = triton.cdiv(n_rows, cfg.mix_bwd_rows)
    dl_partial = _alloc((max(programs, 1), 2), torch.float32, dev)
    if n_rows:
        stand_in = dy2 if dy2 is not None else ds2  # for the absent one of dy / ds (never read)
        dy_, ds_ = (dy2 if dy2 is not None else stand_in), (ds2 if ds2 is not None else stand_in)
        _mix_rms_bwd_kernel[(programs,)](dy_, ds_, x2, x02, lambdas, rstd.reshape(-1), dx, dx0, dl_partial,
                                         n_rows, C, _row_stride(dy_), _row_stride(ds_), _row_stride(x2),
                                         _row_stride(x02), HAS_DY=dy2 is not None, HAS_DS_IN=ds2 is not None,
                                         BLOCK_M=cfg.mix_bwd_rows, BLOCK_N=block_n, num_warps=cfg.bwd_warps)
    else:
        dl_partial.zero_()
        programs = 1
    _mix_dl_kernel[(1,)](dl_partial, dl, programs, BLOCK_P=DL_BLOCK_P, num_warps=4)
    return dx.view(x.shape), dx0.view(x0.shape), dl


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::rms_norm_fwd", mutates_args=())
def _rms_norm_fwd(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    y, _, rstd = _forward(x, None, None, eps, PRE_NONE)
    return y, rstd


@torch.library.custom_op("tritonrun::add_rms_norm_fwd", mutates_args=())
def _add_rms_norm_fwd(x: torch.Tensor, residual: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair("add_rms_norm", x, residual, "residual")
    return _forward(x, residual, None, eps, PRE_ADD)


@torch.library.custom_op("tritonrun::mix_rms_norm_fwd", mutates_args=())
def _mix_rms_norm_fwd(x: torch.Tensor, x0: torch.Tensor, lambdas: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_pair("mix_rms_norm", x, x0, "x0")
    if lambdas.shape != (2,) or not lambdas.is_floating_point() or lambdas.device != x.device:
        raise ValueError(f"mix_rms_norm: lambdas must be a (2,) float tensor on {x.device} (l0, l1), got "
                         f"{tuple(lambdas.shape)} {lambdas.dtype} on {lambdas.device}")
    return _forward(x, x0, lambdas.contiguous(), eps, PRE_MIX)


@torch.library.custom_op("tritonrun::rms_norm_bwd", mutates_args=())
def _rms_norm_bwd(dy: torch.Tensor, ds_in: torch.Tensor | None, xs: torch.Tensor, rstd: torch.Tensor,
                  lowp_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dy, ds_in, xs, rstd, lowp_dtype)


@torch.library.custom_op("tritonrun::mix_rms_norm_bwd", mutates_args=())
def _mix_rms_norm_bwd(dy: torch.Tensor | None, ds_in: torch.Tensor | None, x: torch.Tensor, x0: torch.Tensor,
                      lambdas: torch.Tensor, rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _mix_backward(dy, ds_in, x, x0, lambdas.contiguous(), rstd)


# The fakes allocate what the launchers allocate, in their order (bench/memory.py estimates a step's peak from them):
# _as_rows's contiguous copies of inputs that do not collapse into rows (none in the speedrun model), the outputs,
# and mix_rms_norm's per-program fp32 lambda partials, sized by the planned GPU's table (tritonrun/kernels/target.py).


def _fake_arch(device: torch.device) -> str:
    target = planned_target()
    return target.arch if target is not None else _arch(device)


@_rms_norm_fwd.register_fake
def _(x, eps):
    _as_rows(x)
    return x.new_empty(x.shape), x.new_empty(x.shape[:-1], dtype=torch.float32)


@_add_rms_norm_fwd.register_fake
def _(x, residual, eps):
    dt = torch.promote_types(x.dtype, residual.dtype)
    _as_rows(x), _as_rows(residual)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=dt),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@_mix_rms_norm_fwd.register_fake
def _(x, x0, lambdas, eps):
    dt = torch.promote_types(x.dtype, x0.dtype)
    _as_rows(x), _as_rows(x0)
    return (x.new_empty(x.shape, dtype=dt), x.new_empty(x.shape, dtype=dt),
            x.new_empty(x.shape[:-1], dtype=torch.float32))


@_rms_norm_bwd.register_fake
def _(dy, ds_in, xs, rstd, lowp_dtype):
    _as_rows(xs), _as_rows(dy), (_as_rows(ds_in) if ds_in is not None else None)
    return xs.new_empty(xs.shape), xs.new_empty(xs.shape if lowp_dtype != xs.dtype else (0,), dtype=lowp_dtype)


@_mix_rms_norm_bwd.register_fake
def _(dy, ds_in, x, x0, lambdas, rstd):
    C, s_dtype = x.shape[-1], torch.promote_types(x.dtype, x0.dtype)
    x2 = _as_rows(x)
    _as_rows(x0)
    if dy is not None:
        _as_rows(dy.to(s_dtype))
    if ds_in is not None:
        _as_rows(ds_in)
    dx, dx0, dl = x.new_empty(x.shape), x0.new_empty(x0.shape), lambdas.new_empty((2,))
    table = CONFIGS.get(_fake_arch(x.device), CONFIGS["default"])
    cfg = next(c for max_n, c in table if triton.next_power_of_2(C) <= max_n)
    dl_partial = x.new_empty((max(triton.cdiv(x2.shape[0], cfg.mix_bwd_rows), 1), 2), dtype=torch.float32)
    del dl_partial
    return dx, dx0, dl


def _rms_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[1])  # x and rstd: x_hat is recomputed
    ctx.set_materialize_grads(False)


def _rms_backward(ctx, dy, _drstd):
    x, rstd = ctx.saved_tensors
    if dy is None:
        return None, None
    return _rms_norm_bwd(dy, None, x, rstd, x.dtype)[0], None


def _add_rms_setup(ctx, inputs, output):
    x, residual = inputs[0], inputs[1]
    ctx.save_for_backward(output[1], output[2])  # s and rstd, not x and residual: x_hat is recomputed from s
    ctx.dtypes = (x.dtype, residual.dtype)
    ctx.set_materialize_grads(False)


def _add_rms_backward(ctx, dy, ds_in, _drstd):
    s, rstd = ctx.saved_tensors
    x_dtype, r_dtype = ctx.dtypes
    if dy is None and ds_in is None:
        return None, None, None
    if dy is None:  # only s was used downstream: the norm contributes nothing
        return ds_in.to(x_dtype), ds_in.to(r_dtype), None
    # x + residual -> s: both inputs get ds. One dtype that differs from s's is written by the same pass.
    lowp = x_dtype if x_dtype != s.dtype else r_dtype
    ds, ds_lowp = _rms_norm_bwd(dy, ds_in, s, rstd, lowp)
    pick = lambda dt: ds if dt == s.dtype else (ds_lowp if dt == lowp else ds.to(dt))  # noqa: E731
    return pick(x_dtype), pick(r_dtype), None


def _mix_rms_setup(ctx, inputs, output):
    x, x0, lambdas = inputs[0], inputs[1], inputs[2]
    ctx.save_for_backward(x, x0, lambdas, output[2])  # s is recomputed from x and x0 (needed for dlambdas anyway)
    ctx.set_materialize_grads(False)


def _mix_rms_backward(ctx, dy, ds_in, _drstd):
    x, x0, lambdas, rstd = ctx.saved_tensors
    if dy is None and ds_in is None:
        return None, None, None, None
    dx, dx0, dl = _mix_rms_norm_bwd(dy, ds_in, x, x0, lambdas, rstd)
    return dx, dx0, dl, None


_rms_norm_fwd.register_autograd(_rms_backward, setup_context=_rms_setup)
_add_rms_norm_fwd.register_autograd(_add_rms_backward, setup_context=_add_rms_setup)
_mix_rms_norm_fwd.register_autograd(_mix_rms_backward, setup_context=_mix_rms_setup)


# ------------------------------------------------------------------------------------- public API


def rms_norm(x: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """Weightless RMSNorm over the last dim: x / sqrt(mean(x^2) + eps) (eps None: finfo(x.dtype).eps)."""
    return _rms_norm_fwd(x, _resolve_eps(eps, x.dtype))[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, eps: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over memory each way."""
    y, s, _ = _add_rms_norm_fwd(x, residual, _resolve_eps(eps, torch.promote_types(x.dtype, residual.dtype)))
    return y, s


def mix_rms_norm(x: torch.Tensor, x0: torch.Tensor, lambdas: torch.Tensor, eps: float | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(l0 * x + l1 * x0), l0 * x + l1 * x0) with (l0, l1) = lambdas, a (2,) tensor; one pass
    each way, gradients for x, x0 and lambdas."""
    y, s, _ = _mix_rms_norm_fwd(x, x0, lambdas, _resolve_eps(eps, torch.promote_types(x.dtype, x0.dtype)))
    return y, s


# ------------------------------------------------------------------------- plain-PyTorch reference


def reference_rms_norm(x, eps: float | None = None, compute_dtype=torch.float64):
    """The same math in plain PyTorch, computed in `compute_dtype` (tests compare against fp64), result
    cast back to x's dtype (the kernel's output dtype)."""
    eps = _resolve_eps(eps, x.dtype)
    xf = x.to(compute_dtype)
    return (xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)).to(x.dtype)


def reference_add_rms_norm(x, residual, eps: float | None = None, compute_dtype=torch.float64):
    s = x + residual  # rounded to the promoted dtype, like the kernel's s output
    return reference_rms_norm(s, eps, compute_dtype), s


def reference_mix_rms_norm(x, x0, lambdas, eps: float | None = None, compute_dtype=torch.float64):
    """s = l0 * x + l1 * x0 computed in compute_dtype and rounded once to the promoted dtype (as the kernel)."""
    dt = torch.promote_types(x.dtype, x0.dtype)
    lam = lambdas.to(compute_dtype)
    s = (lam[0] * x.to(compute_dtype) + lam[1] * x0.to(compute_dtype)).to(dt)
    return reference_rms_norm(s, eps, compute_dtype), s
