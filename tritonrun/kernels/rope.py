"""QK-norm + rotary position embedding over q and k, in one pass, written in attention's layout.

    qk_norm_rope(q, k, cos, sin, eps) -> (q2, k2)
        per head vector x (q or k at one (b, t, h)), over its D features:
        x_hat = x / sqrt(mean(x^2) + eps)                        (RMSNorm, no weight)
        y1 = x_hat1 * cos[t] + x_hat2 * sin[t]                   x_hat1 = x_hat[:D/2], x_hat2 = x_hat[D/2:]
        y2 = -x_hat1 * sin[t] + x_hat2 * cos[t]                  y = [y1, y2]  (modded-nanogpt's convention)
    rope_tables(T, D, base) -> (cos, sin)                        (T, D/2) fp32: angle t * base^(-2i/D)

Layout: q, k (B, T, H, D) views of the q/k projection outputs: last dim contiguous, the other three
strides arbitrary (a (B, T, C) c_q output viewed as heads, or a slice of a fused (B, T, 3C) qkv
output), read in place. q2, k2 are written directly as (B, H, T, D) contiguous tensors, the layout
kernels.attention.causal_attention reads per (b, h) in T-blocks: the transpose is the kernel's store
pattern, never a copy. cos, sin (T_tab >= T, D/2) fp32 contiguous, row t for position t. The backward
reads dq2, dk2 of any strides (attention returns them as (B, H, T, D) views of (B, T, H, D) memory)
and writes dq, dk contiguous in q's (B, T, H, D) shape. D even, <= MAX_D; q and k of one shape and dtype.

Precision: q, k load in their storage dtype (fp32 / fp16 / bf16); the norm (sum of squares, rsqrt),
the rotation and the whole backward are fp32, with the fp32 tables; each output is rounded once at its
store. (modded-nanogpt's record rounds the normalized x and its cos/sin tables to bf16 and rotates in
bf16; this kernel is the more exact version of the same function.)

Which fusion (the issue: "one pass over q and k, or RoPE inside the attention kernel's q/k loads; choose
by bytes moved"). d12 speedrun micro-batch: N = B*T*H = 8*1024*6 = 49,152 head rows of D = 128, bf16
(s = 2 B): one of q, k, q2, k2 is N*D*s = 12.58 MB; the fp32 tables are 2*T*(D/2)*4 = 0.52 MB.
  separate pass (this file), `bytes_moved` below:
    forward   read q, k; write q2, k2                           4*N*D*s + tables =  50.9 MB
    backward  read dq2, dk2, q, k; write dq, dk                 6*N*D*s + tables =  76.0 MB
    total per layer per micro-step 126.9 MB: ~0.25 ms at an RTX 4070's 504 GB/s, ~3.0 ms over 12 layers.
    rstd is recomputed in the backward from the x it must read anyway (the row is in registers):
    saving it would add 8 B per row written and read, for nothing. The saved tensors are q and k
    themselves, as torch's F.rms_norm saves them: no more activation memory than the torch path.
  inside attention's q/k loads: q2, k2, dq2, dk2 never touch DRAM (attention reads raw q, k instead of q2,
    k2: the same bytes), so by bytes alone the fusion wins, by those same ~127 MB per layer (~0.25 ms on a
    4070). What it costs instead:
    - forward: K tiles are re-read by every query block (T/BLOCK_M = 8 at BLOCK_M = 128; 4.5 visits per
      key block on average under the causal mask), so K's norm (a row reduction over D) and rotation
      (two (BLOCK_N, D/2) fp32 table tiles) are redone at each visit: 4.5*N*D*10 = 0.28 GFLOP, cheap in
      FLOPs but on the critical path of the tensor-core inner loop, with extra live registers next to
      the (BLOCK_M, 128) fp32 accumulator the loop already holds at D = 128;
    - backward: the dK/dV kernel re-normalizes and re-rotates Q at each of its query-block visits and the
      dQ kernel does the same to K at each key-block visit, and each must push its dk / dq back through
      the rotation and the norm's Jacobian (a second row reduction) before its store;
    - the attention kernels are shared with the GPT-2 track (no q/k norm there): every kernel would gain a
      constexpr variant, its autotune space and its Ada fit checks would double.
  A d12 micro-step (6 * 124M matmul params * 8192 tokens = 6.1 TFLOP, ~210 ms at 50% MFU on a 4070) spends
  ~3 ms (~1.4%) in this pass: the most the fusion could win, before its inner-loop costs. The separate
  one-pass kernel is chosen: its store already does the transpose, so it runs at the floor of an unfused
  op, 4 tensor passes forward and 6 backward. (Torch eager: rms_norm, then ~8 elementwise kernels for the
  halves, products and cat, then the layout copy.) If a GPU profile ever shows this pass above ~2% of a
  step, the fusion is the next step, and this file's math is what it would inline.

FLOPs: ~10 per element forward (square, sum, rsqrt scale, 4 mul + 2 add of the rotation), ~18 backward;
far below any GPU's ridge point: bytes moved is the whole story.

Grid: (cdiv(T, BLOCK_T), B*H). A program owns BLOCK_T positions of one (b, h) and handles both q and k
at them, loading each cos/sin tile once for the two. Every output element is written by exactly one
program (no atomics, no partials: bitwise deterministic).

The ops are torch.library custom ops (namespace "tritonrun") with fake and autograd registrations, so
torch.compile traces through them. On CPU tensors they run through the Triton interpreter
(TRITON_INTERPRET=1, set before import).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import device_arch, interpreting

MAX_D = 512  # one head vector lives in one program's registers (two (BLOCK_T, D/2) halves)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _norm_rope_tile(
    X,  # this (b, h)'s base pointer into a (B, T, H, D) input, last dim contiguous
    stride_xt,  # its T stride
    Y,  # this (b, h)'s base pointer into the (B, H, T, D) contiguous output
    t,  # (BLOCK_T,) positions
    T,
    cols,  # (BLOCK_H,) feature index within a half
    mask,  # (BLOCK_T, BLOCK_H)
    cos,  # (BLOCK_T, BLOCK_H) fp32
    sin,  # (BLOCK_T, BLOCK_H) fp32
    HALF,  # D // 2
    eps,
):
    # One (BLOCK_T, D) tile of one tensor: RMS-normalize each row, rotate the halves, store transposed.
    x_offs = t.to(tl.int64)[:, None] * stride_xt + cols[None, :]
    x1 = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
    mean_sq = tl.where(t < T, mean_sq, 1.0)  # rows past T (masked) stay finite even at eps = 0
    rstd = tl.rsqrt(mean_sq + eps)[:, None]
    x1 = x1 * rstd
    x2 = x2 * rstd
    y_offs = t.to(tl.int64)[:, None] * (2 * HALF) + cols[None, :]
    tl.store(Y + y_offs, (x1 * cos + x2 * sin).to(Y.dtype.element_ty), mask=mask)
    tl.store(Y + y_offs + HALF, (x2 * cos - x1 * sin).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_fwd_kernel(
    Q,  # (B, T, H, D) q's dtype, last dim contiguous, strides stride_q*
    K,  # (B, T, H, D) same dtype, strides stride_k*
    COS,  # (T_tab, D/2) fp32 contiguous
    SIN,  # (T_tab, D/2) fp32 contiguous
    Q2,  # (B, H, T, D) contiguous, q's dtype
    K2,  # (B, H, T, D) contiguous
    T,
    H,
    HALF,  # D // 2
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    eps,
    BLOCK_T: tl.constexpr,  # positions per program
    BLOCK_H: tl.constexpr,  # next_power_of_2(D/2); lanes >= D/2 are masked
):
    # Bytes: 4*N*D*s (read q, k; write q2, k2) + 2*BLOCK_T*D/2*4 of tables per program (L2 hits after the
    # first (b, h)). FLOPs: ~10 per element.
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_H)
    mask = (t < T)[:, None] & (cols < HALF)[None, :]
    tab = t[:, None] * HALF + cols[None, :]
    cos = tl.load(COS + tab, mask=mask, other=0.0)
    sin = tl.load(SIN + tab, mask=mask, other=0.0)
    out = pid_bh.to(tl.int64) * T * (2 * HALF)  # (b, h)'s first row in the (B, H, T, D) outputs
    _norm_rope_tile(Q + b * stride_qb + h * stride_qh, stride_qt, Q2 + out, t, T, cols, mask, cos, sin, HALF, eps)
    _norm_rope_tile(K + b * stride_kb + h * stride_kh, stride_kt, K2 + out, t, T, cols, mask, cos, sin, HALF, eps)


@triton.jit
def _norm_rope_bwd_tile(
    X,  # this (b, h)'s base pointer into the saved (B, T, H, D) input, last dim contiguous
    stride_xt,
    DY,  # this (b, h)'s base pointer into the (B, H, T, D) output gradient, last dim contiguous
    stride_dyt,
    DX,  # this (b, h)'s base pointer into the (B, T, H, D) contiguous input gradient
    stride_dxt,  # H * D
    t, T, cols, mask, cos, sin, HALF, eps,
):
    # Per row, with x_hat = x * rstd (rstd recomputed from x: the row is loaded anyway):
    #   g1 = dy1*cos - dy2*sin,  g2 = dy1*sin + dy2*cos            (the rotation transposed: dL/dx_hat)
    #   dx = rstd * (g - x_hat * mean(g * x_hat))                  (RMSNorm's Jacobian, mean over D)
    t64 = t.to(tl.int64)[:, None]
    x_offs = t64 * stride_xt + cols[None, :]
    dy_offs = t64 * stride_dyt + cols[None, :]
    x1 = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    dy1 = tl.load(DY + dy_offs, mask=mask, other=0.0).to(tl.float32)
    dy2 = tl.load(DY + dy_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    D = 2 * HALF
    mean_sq = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / D
    rstd = tl.rsqrt(tl.where(t < T, mean_sq, 1.0) + eps)[:, None]
    x1 = x1 * rstd
    x2 = x2 * rstd
    g1 = dy1 * cos - dy2 * sin
    g2 = dy1 * sin + dy2 * cos
    proj = ((tl.sum(g1 * x1, axis=1) + tl.sum(g2 * x2, axis=1)) / D)[:, None]
    dx_offs = t64 * stride_dxt + cols[None, :]
    tl.store(DX + dx_offs, (rstd * (g1 - x1 * proj)).to(DX.dtype.element_ty), mask=mask)
    tl.store(DX + dx_offs + HALF, (rstd * (g2 - x2 * proj)).to(DX.dtype.element_ty), mask=mask)


@triton.jit
def _qk_norm_rope_bwd_kernel(
    DQ2,  # (B, H, T, D) grad of q2, any strides but a contiguous last dim (attention's dq: a view)
    DK2,  # (B, H, T, D) grad of k2
    Q,  # (B, T, H, D) the saved input q, last dim contiguous
    K,  # (B, T, H, D) the saved input k
    COS,  # (T_tab, D/2) fp32 contiguous
    SIN,  # (T_tab, D/2) fp32 contiguous
    DQ,  # (B, T, H, D) contiguous, q's dtype
    DK,  # (B, T, H, D) contiguous
    T,
    H,
    HALF,
    stride_dqb, stride_dqh, stride_dqt,
    stride_dkb, stride_dkh, stride_dkt,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    eps,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # Bytes: 6*N*D*s (read dq2, dk2, q, k; write dq, dk) + tables. FLOPs: ~18 per element.
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_H)
    mask = (t < T)[:, None] & (cols < HALF)[None, :]
    tab = t[:, None] * HALF + cols[None, :]
    cos = tl.load(COS + tab, mask=mask, other=0.0)
    sin = tl.load(SIN + tab, mask=mask, other=0.0)
    dx = (b * T * H + h) * (2 * HALF)  # (b, t=0, h) in the (B, T, H, D) contiguous grads
    _norm_rope_bwd_tile(Q + b * stride_qb + h * stride_qh, stride_qt, DQ2 + b * stride_dqb + h * stride_dqh,
                        stride_dqt, DQ + dx, H * 2 * HALF, t, T, cols, mask, cos, sin, HALF, eps)
    _norm_rope_bwd_tile(K + b * stride_kb + h * stride_kh, stride_kt, DK2 + b * stride_dkb + h * stride_dkh,
                        stride_dkt, DK + dx, H * 2 * HALF, t, T, cols, mask, cos, sin, HALF, eps)


# ----------------------------------------------------------------------------- configs, bytes moved


class RopeConfig(NamedTuple):
    fwd_block_t: int  # positions per forward program (BLOCK_T)
    fwd_warps: int
    bwd_block_t: int  # positions per backward program
    bwd_warps: int


# arch -> [(largest BLOCK_H = next_power_of_2(D/2), config)], first match wins (D = 128: the 64 row).
# Starting points chosen by register budget: a tile is BLOCK_T x BLOCK_H fp32; the forward holds ~4 live
# (x1, x2, cos, sin), the backward ~6 (+ dy1, dy2). At D = 128 with 4 warps: forward BLOCK_T = 32 is 16
# registers per tile per thread, backward BLOCK_T = 16 is 8, with 16-byte bf16 vector loads; compiled for
# sm_89 that is 76 / 64 registers per thread, no spills (bench/ada.py). NOT yet timed on a GPU: a GPU
# session should sweep these with bench/kernels.py --op qk_norm_rope and edit the table.
# "interpreter" (TRITON_INTERPRET=1 on CPU): fewer, larger programs (each program is a Python call), but
# BLOCK_T = 16 keeps the tests' T = 37 crossing two block boundaries with a partial last block.
CONFIGS: dict[str, list[tuple[int, RopeConfig]]] = {
    "sm_80": [(64, RopeConfig(32, 4, 16, 4)), (128, RopeConfig(16, 4, 8, 4)), (256, RopeConfig(8, 8, 4, 8))],
    "sm_89": [(64, RopeConfig(32, 4, 16, 4)), (128, RopeConfig(16, 4, 8, 4)), (256, RopeConfig(8, 8, 4, 8))],
    "sm_90": [(64, RopeConfig(32, 4, 16, 4)), (128, RopeConfig(16, 4, 8, 4)), (256, RopeConfig(8, 8, 4, 8))],
    "default": [(64, RopeConfig(16, 4, 16, 4)), (128, RopeConfig(16, 4, 8, 4)), (256, RopeConfig(8, 8, 4, 8))],
    "interpreter": [(256, RopeConfig(16, 1, 16, 1))],
}


_interpreting = interpreting
_arch = device_arch  # the config-table key of a device (bench/ada.py patches it per file)


def get_config(D: int, device: torch.device) -> tuple[int, RopeConfig, str]:
    """(BLOCK_H, config, table key) for head dim D on `device`."""
    block_h = triton.next_power_of_2(D // 2)
    arch = _arch(device)
    key = arch if arch in CONFIGS else "default"
    config = next(cfg for max_h, cfg in CONFIGS[key] if block_h <= max_h)
    return block_h, config, key


def bytes_moved(B: int, T: int, H: int, D: int, pass_: str, *, dtype: torch.dtype) -> int:
    """Minimum DRAM bytes of one call (the benchmark's GB/s numerator), pass_ in fwd | bwd | fwd+bwd:
    forward reads q, k and writes q2, k2; backward reads dq2, dk2, q, k and writes dq, dk; each pass reads
    the two fp32 (T, D/2) tables once (they stay in L2 across the B*H programs that share them)."""
    n = B * T * H * D * torch.empty((), dtype=dtype).element_size()
    tables = 2 * T * (D // 2) * 4
    fwd, bwd = 4 * n + tables, 6 * n + tables
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


# ---------------------------------------------------------------------------------- host launchers


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer a launcher hands to a kernel comes from here (tests patch it to NaN-fill, proving
    that each output element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_shapes_only(q, k, cos, sin) -> None:
    """The checks of _check that need no device (tracing under torch.compile fails early, not in the kernel)."""
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"qk_norm_rope wants q and k of one shape (B, T, H, D); got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    _check_shapes_only(q, k, cos, sin)
    if q.dtype != k.dtype or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"qk_norm_rope wants q and k both fp32, fp16 or bf16; got {q.dtype} and {k.dtype}")
    T, D = q.shape[1], q.shape[3]
    if D % 2 or not 2 <= D <= MAX_D:
        raise ValueError(f"qk_norm_rope: head dim D={D} must be even and in 2..{MAX_D} (rotary pairs its halves)")
    for name, tab in (("cos", cos), ("sin", sin)):
        if tab.dim() != 2 or tab.shape[0] < T or tab.shape[1] != D // 2 or tab.dtype != torch.float32:
            raise ValueError(f"qk_norm_rope: {name} must be fp32 (T >= {T}, D/2 = {D // 2}); got {tab.dtype} "
                             f"{tuple(tab.shape)}. "
                             "HINT: build the tables with tritonrun.kernels.rope.rope_tables(T, D)")
    if not (q.device == k.device == cos.device == sin.device):
        raise ValueError(f"qk_norm_rope: q, k, cos, sin on different devices: {q.device}, {k.device}, "
                         f"{cos.device}, {sin.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("qk_norm_rope on CPU tensors runs only in the Triton interpreter. "
                           "HINT: set TRITON_INTERPRET=1 before importing tritonrun.kernels.rope")


def _forward(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """q2, k2: (B, H, T, D) contiguous in q's dtype."""
    _check(q, k, cos, sin)
    B, T, H, D = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    cos, sin = cos.contiguous(), sin.contiguous()
    q2 = _alloc((B, H, T, D), q.dtype, q.device)
    k2 = _alloc((B, H, T, D), q.dtype, q.device)
    if q2.numel():
        block_h, cfg, _ = get_config(D, q.device)
        grid = (triton.cdiv(T, cfg.fwd_block_t), B * H)
        _qk_norm_rope_fwd_kernel[grid](q, k, cos, sin, q2, k2, T, H, D // 2,
                                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                       eps, BLOCK_T=cfg.fwd_block_t, BLOCK_H=block_h, num_warps=cfg.fwd_warps)
    return q2, k2


def _backward(dq2: torch.Tensor, dk2: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
              sin: torch.Tensor, eps: float):
    """dq, dk: contiguous, shaped (B, T, H, D) like q, in q's dtype."""
    B, T, H, D = q.shape
    q, k = _last_dim_contiguous(q), _last_dim_contiguous(k)
    dq2, dk2 = _last_dim_contiguous(dq2), _last_dim_contiguous(dk2)
    cos, sin = cos.contiguous(), sin.contiguous()
    dq = _alloc((B, T, H, D), q.dtype, q.device)
    dk = _alloc((B, T, H, D), q.dtype, q.device)
    if dq.numel():
        block_h, cfg, _ = get_config(D, q.device)
        grid = (triton.cdiv(T, cfg.bwd_block_t), B * H)
        _qk_norm_rope_bwd_kernel[grid](dq2, dk2, q, k, cos, sin, dq, dk, T, H, D // 2,
                                       dq2.stride(0), dq2.stride(1), dq2.stride(2),
                                       dk2.stride(0), dk2.stride(1), dk2.stride(2),
                                       q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                                       eps, BLOCK_T=cfg.bwd_block_t, BLOCK_H=block_h, num_warps=cfg.bwd_warps)
    return dq, dk


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::qk_norm_rope_fwd", mutates_args=())
def _qk_norm_rope_fwd(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, cos, sin, eps)


@torch.library.custom_op("tritonrun::qk_norm_rope_bwd", mutates_args=())
def _qk_norm_rope_bwd(dq2: torch.Tensor, dk2: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                      sin: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _backward(dq2, dk2, q, k, cos, sin, eps)


# The fakes allocate what _forward / _backward allocate, in order (bench/memory.py): copies of inputs whose last dim
# is strided and of non-contiguous tables (none in the speedrun model), then the outputs.
@_qk_norm_rope_fwd.register_fake
def _(q, k, cos, sin, eps):
    _check_shapes_only(q, k, cos, sin)
    B, T, H, D = q.shape
    _last_dim_contiguous(q), _last_dim_contiguous(k), cos.contiguous(), sin.contiguous()
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T, D))


@_qk_norm_rope_bwd.register_fake
def _(dq2, dk2, q, k, cos, sin, eps):
    _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(dq2), _last_dim_contiguous(dk2)
    cos.contiguous(), sin.contiguous()
    return q.new_empty(q.shape), q.new_empty(q.shape)  # contiguous (B, T, H, D), as _backward allocates


def _setup(ctx, inputs, output):
    q, k, cos, sin, eps = inputs
    ctx.save_for_backward(q, k, cos, sin)  # the inputs, not q2/k2: rstd is recomputed from x in the backward
    ctx.eps = eps


def _backward_rule(ctx, dq2, dk2):
    q, k, cos, sin = ctx.saved_tensors
    dq, dk = _qk_norm_rope_bwd(dq2, dk2, q, k, cos, sin, ctx.eps)
    return dq, dk, None, None, None  # no gradient for the tables (fixed positions) nor eps


_qk_norm_rope_fwd.register_autograd(_backward_rule, setup_context=_setup)


# ------------------------------------------------------------------------------------- public API


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS-normalize each head vector of q and k over D, rotate it by its position's angles, and return
    both as (B, H, T, D) contiguous tensors for causal_attention. q, k: (B, T, H, D) views (last dim
    contiguous); cos, sin: (T, D/2) fp32 from rope_tables. Differentiable in q and k."""
    return _qk_norm_rope_fwd(q, k, cos, sin, float(eps))


def rope_tables(T: int, D: int, base: float = 10000.0, device: torch.device | str | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, D/2) fp32: angle[t, i] = t * inv_freq[i], inv_freq = 1 / base^(2i / D) for
    i < D/2 (modded-nanogpt's Rotary). Computed in fp64 and rounded once to fp32 (the record builds the
    angles in fp32 and then rounds cos/sin to bf16; the model decides which tables it passes)."""
    if D % 2 or D < 2 or T < 0:
        raise ValueError(f"rope_tables: D={D} must be even and >= 2, T={T} >= 0")
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float64) / D))
    angles = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    return angles.cos().to(device=device, dtype=torch.float32), angles.sin().to(device=device, dtype=torch.float32)


# ------------------------------------------------------------------------- plain-PyTorch reference


def reference_qk_norm_rope(q, k, cos, sin, eps: float, compute_dtype: torch.dtype | None = torch.float64):
    """The same math in plain PyTorch; (q2, k2) as (B, H, T, D) contiguous in q's dtype.
    compute_dtype fp64 (the tests' reference): everything, tables included, upcast to it and rounded once
    at the end. compute_dtype None: torch eager as a model writes it (the benchmark's and the tests'
    same-precision peer): F.rms_norm in the input dtype, then the rotation with the fp32 tables (type
    promotion), cast back to the input dtype."""
    T, D = q.shape[1], q.shape[3]
    half = D // 2
    c, s = cos[:T, None, :], sin[:T, None, :]  # (T, 1, D/2): broadcast over (B, T, H, D/2)

    def one(x):
        if compute_dtype is None:
            xh, c_, s_ = torch.nn.functional.rms_norm(x, (D,), eps=eps), c, s
        else:
            xf = x.to(compute_dtype)
            xh = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
            c_, s_ = c.to(compute_dtype), s.to(compute_dtype)
        return _rotate(xh, c_, s_, half).to(x.dtype).transpose(1, 2).contiguous()

    return one(q), one(k)


def _rotate(x, cos, sin, half):
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin], dim=-1)
