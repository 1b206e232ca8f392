"""Record #89's LM head loss, fused: multi-token prediction over sigmoid-capped logits of h @ W, never writing the
N x V logits (tritonrun.gpt2.speedrun89.mtp_loss_reference is the contract, with the record's line numbers).

    l = h @ W                       h (N, C); W (C, V) -- the record stores the head transposed -- all V columns
    u = bf16(sigmoid((l + 5) / 7.5)),   z = 23 u,   lse_i = log sum_v exp z_iv            (z in (0, 23))
    loss_i = sum_k w_k (lse_i - z_i[t_{i+k}])   over k < K with i + k < N and 0 <= t_{i+k} < V
             + p (lse_i - z_i[prefix_i])        when 0 <= prefix_i < V
    dl_i   = g_i (23 / 7.5) u (1 - u) (S_i softmax(z_i) - hit_i)       g: the upstream gradient of loss_i
             S_i   = w_0 + ... + w_{K-1} (+ p when prefix_i is a target): ALL K weights, also on the last K - 1 rows
                     and on rows whose target is -1 (the record's normalizer, kept as the contract keeps it)
             hit_iv = the sum of the weights whose target (t_{i+k} past the filter above, or prefix_i) is column v
    dh = dl @ W^T,   dW = h^T @ dl

u is rounded to bf16 (nearest even, from the fp32 bits: fp8._round_to_bf16, since the interpreter's cast truncates)
as the record's kernel does; z = 23 u is then exact in fp32. The record runs this head's matmuls in FP8 (e4m3
operands, e5m2 gradients); this kernel runs them in the input dtype (bf16 in training; FP8 is tritonrun/kernels/fp8.py).

Weights are data, not constants: w_0..w_{K-1}, p travel as one (K + 1,) fp32 device tensor the kernels read, so the
per-step schedule of the MTP and prefix weights recompiles nothing and syncs nothing; K (1..3) is a constexpr (it
changes only at stage boundaries).

Algorithm (cross_entropy.py's Cut-Cross-Entropy scheme, its planning helpers reused)
  forward   grid (row blocks, vocab splits). A program walks its split's vocab blocks: the (BLOCK_N, BLOCK_V) logits
            tile (a K-loop of tl.dot over C, fp32 accumulator), u and z in registers, then
              sum  += sum_v exp(z - 23)    the fixed max 23 bounds every z: no running max, no rescaling; each term
                                           is in [e^-23, 1], a normal fp32 number
              tgt  += sum_v hit_v z_v      hit: the row's K + 1 target columns with their weights, compared in place
            and writes both per (split, row). The host adds the splits (a fixed order), lse = 23 + log(sum) and
            loss = (sum of the row's valid weights) lse - tgt; lse (N,) fp32 is saved for the backward.
  backward  dl recomputed tile by tile from h, W and lse, two kernels, no atomics, fixed summation order:
    dh      persistent programs over (row block, vocab split) tiles: dh[rows, c] += dl @ W[c, cols]^T chunk by chunk
            of C, the fp32 running sum in a per-program scratch slot (BLOCK_N, C); vocab splits write fp32
            partials (S, N, C) that the host sums in order (cross_entropy._dh_plan sizes both).
    dW      persistent programs over vocab blocks; loop over all row blocks: dW[c, cols] += h[rows, c]^T @ dl, the
            running sum in a per-program slot (C, BLOCK_V) (cross_entropy._dw_plan).
  The tiles are cross_entropy's (the scratch arithmetic of its docstring holds unchanged: BLOCK_V / 2 FLOPs per
  scratch byte in dh, BLOCK_N / 2 in dW).

FLOPs (N rows, V columns, C width)   forward 2NVC; backward 8NVC (dh: 2NVC recompute + 2NVC dl @ W^T; dW: the same);
  as cross_entropy.lce_flops. Per logit besides: forward 2 exp2 + 1 division (sigmoid, the sum), ~10 integer ops (the
  rounding) and K + 1 compare-selects (the targets); each backward kernel the same plus one exp2 (the softmax).
Bytes (e = element bytes)   DRAM: each kernel reads h (N*C*e) and W (V*C*e) once plus O(N) (targets, lse, g,
  partials); the backward writes dh (N*C*e) and dW (V*C*e). On chip, the tile re-reads and the fp32 scratch
  read-modify-writes are cross_entropy's: lce_bytes(N, V, C, e, V_padded=V, blocks=get_config(...)).
  The materialized alternative (the reference) writes and reads N x V fp32 logits, u, softmax and dlogits: at the
  record's 49,152 rows that is 9.9 GB per tensor.

torch.compile: the op is torch.ops.tritonrun.mtp_head_loss (custom_op + register_fake + register_autograd; the
backward its own custom op tritonrun::mtp_head_loss_backward), so dynamo and inductor trace through it.
Configs: CONFIGS[arch] (sm_80 / sm_89 / sm_90, the interpreter), fixed (no autotuning); the sm_89 entries compile
spill-free for sm_89 (tests/test_mtp_head.py::test_sm89_configs_fit, `python -m tritonrun.kernels.mtp_head sm_89`).
NOT yet timed on a GPU: bench/kernels.py --op mtp_head.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch._subclasses.fake_tensor import is_fake
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonrun.kernels import cross_entropy as ce
from tritonrun.kernels.fp8 import _round_to_bf16
from tritonrun.kernels.target import arch_key, capability_of, device_arch
from tritonrun.kernels.target import planned as planned_target

# The record's logit map z = A sigmoid((l + B) / C_) [tritonrun.gpt2.speedrun89.LOGIT_A, LOGIT_B, LOGIT_C]
LOGIT_A, LOGIT_B, LOGIT_C = 23.0, 5.0, 7.5
MAX_K = 3  # multi-token-prediction targets per row the kernels unroll (the record: 3, 2, then 1)

_LOG2E = tl.constexpr(1.4426950408889634)
# sigmoid((l + 5) / 7.5) = 1 / (1 + 2^-(l * _X_SCALE + _X_SHIFT)): (l + 5) / 7.5 in base 2 as one multiply-add
_X_SCALE = tl.constexpr(1.4426950408889634 / 7.5)
_X_SHIFT = tl.constexpr(5.0 * 1.4426950408889634 / 7.5)
_Z2 = tl.constexpr(23.0 * 1.4426950408889634)  # z * log2(e) = u * _Z2
_DZ_DL = tl.constexpr(23.0 / 7.5)  # dz/dl = (23 / 7.5) u (1 - u)
_A = tl.constexpr(LOGIT_A)

# ------------------------------------------------------------------------------------------ configs
# Per-architecture tiles, as data: cross_entropy's shapes where they fit this kernel's heavier epilogue (sigmoid, bf16
# rounding, K + 1 target compares), checked by compiling each entry without a GPU (bf16 and fp16, K = 3; Triton 3.9,
# its ptxas): `python -m tritonrun.kernels.mtp_head sm_80|sm_89|sm_90 bfloat16` prints shared memory, registers and
# spills; tests/test_mtp_head.py::test_sm89_configs_fit holds the sm_89 entries to no spills within 101,376 B.
# Registers: the 8-warp kernels report 254-255 on sm_80/89 (ptxas takes what a 256-thread block allows); capped by
# hand at .maxnreg 240 the sm_89 dh and dW still compile spill-free (fwd at 224), so there is some headroom.
# Rejected for spills (bytes stored): sm_80 fwd BLOCK_K 64 at 3 stages (132), dh at 3 stages (80); sm_90 fwd
# BLOCK_K 64 (8), dh at 3 stages (4), dW 256 x 64 (8 to 44 with BLOCK_K 32 / 64, BLOCK_C 32 / 64 / 128, 2 / 3 stages)
# and 128 x 128 (16).
# NOT timed on a GPU (bench/kernels.py --op mtp_head). "fp32" overrides apply to fp32 inputs (exact "ieee" dots
# on CUDA cores: small gradient-dot extents, as cross_entropy's).


def _fwd_cfg(bn, bv, bk, warps, stages):
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages, waves=2)


def _bwd_cfg(bn, bv, bk, bc, warps, stages, dh=False):
    cfg = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, BLOCK_C=bc, num_warps=warps, num_stages=stages)
    return {**cfg, **({"waves": 2} if dh else {}), "programs_per_sm": 1}


_FP32_IEEE = {
    "fwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=2),
    "dh": dict(BLOCK_N=64, BLOCK_V=32, BLOCK_K=32, BLOCK_C=32, num_warps=8, num_stages=2),
    "dw": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, BLOCK_C=32, num_warps=8, num_stages=2),
}
CONFIGS: dict[str, dict[str, dict]] = {
    "sm_80": {  # A100: 163 KB shared per block
        "fwd": _fwd_cfg(128, 128, 32, 8, 4),  # 48 KB shared
        "dh": _bwd_cfg(64, 256, 32, 32, 8, 2, dh=True),  # 72 KB; BLOCK_C 64 spills 32 B at K = 1 on sm_80
        "dw": _bwd_cfg(256, 64, 32, 64, 8, 3),  # 112 KB
        "fp32": _FP32_IEEE,
    },
    "sm_89": {  # Ada (and sm_86, consumer Blackwell): 101,376 B shared per block
        "fwd": _fwd_cfg(128, 128, 32, 8, 4),  # 48 KB shared
        "dh": _bwd_cfg(64, 256, 32, 64, 8, 2, dh=True),  # 80 KB (3 stages: 112 KB, over the limit)
        "dw": _bwd_cfg(256, 64, 32, 64, 8, 2),  # 80 KB
        "fp32": _FP32_IEEE,
    },
    "sm_90": {  # H100 / H200: 227 KB shared per block; tl.dot lowers to wgmma. 197 / 236 / 181 registers
        "fwd": _fwd_cfg(128, 128, 32, 8, 4),  # 64 KB shared
        "dh": _bwd_cfg(64, 256, 32, 64, 8, 2, dh=True),  # 112 KB
        "dw": _bwd_cfg(128, 64, 32, 64, 8, 3),  # 80 KB; 128 rows: 64 FLOPs per scratch byte (L2-resident slots)
        "fp32": _FP32_IEEE,
    },
    # TRITON_INTERPRET=1 (CPU): numpy runs each tile op, so the largest tiles keep a 50,304-column vocab to ~13
    # steps; the tests swap in 16/32-wide tiles so their odd shapes cross many tile edges.
    "interpreter": {
        "fwd": _fwd_cfg(256, 4096, 64, 4, 1),
        "dh": {**_bwd_cfg(256, 4096, 64, 64, 4, 1, dh=True)},
        "dw": _bwd_cfg(256, 4096, 64, 64, 4, 1),
        "fp32": {},
    },
}
ARCH_SHARED_LIMIT = ce.ARCH_SHARED_LIMIT  # bytes per block (opt-in maximum)


def _arch(device: torch.device) -> str:
    """CONFIGS key of a device: "interpreter", or the nearest table by shared memory (target.arch_key)."""
    key = device_arch(device)
    return key if key == "interpreter" else arch_key(capability_of(key))


def get_config(device: torch.device, dtype: torch.dtype, arch: str | None = None) -> dict[str, dict]:
    table = CONFIGS[arch or _arch(device)]
    cfg = {k: dict(table[k]) for k in ("fwd", "dh", "dw")}
    if dtype == torch.float32:
        for k, over in table["fp32"].items():
            cfg[k].update(over)
    return cfg


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every buffer the op writes comes from here (tests patch it to NaN-fill, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _u_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_wc, stride_wv,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 u = bf16(sigmoid((h[rows] @ W[:, cols] + 5) / 7.5)): the logits never leave registers.
    Masked rows / columns read as 0 (callers mask what they sum)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < C
        h = tl.load(H + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        w = tl.load(W + ks[:, None] * stride_wc + cols[None, :] * stride_wv,
                    mask=kmask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_V)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    u = 1.0 / (1.0 + tl.exp2(-(acc * _X_SCALE + _X_SHIFT)))
    return _round_to_bf16(u)


@triton.jit
def _target(T, idx, N, V):
    """T[idx] where 0 <= idx < N and the value is a column (0 <= t < V), else -1; int32."""
    t = tl.load(T + idx, mask=idx < N, other=-1)
    return tl.where((t >= 0) & (t < V), t, -1).to(tl.int32)


@triton.jit
def _row_targets(T, P, rows, N, V, K: tl.constexpr):
    """The K + 1 target columns of each row: t_i, t_{i+1}, t_{i+2} (those k < K; -1 past row N - 1) and prefix_i."""
    t0 = _target(T, rows, N, V)
    t1 = t0  # (unused when K < 2)
    t2 = t0  # (unused when K < 3)
    if K > 1:
        t1 = _target(T, rows + 1, N, V)
    if K > 2:
        t2 = _target(T, rows + 2, N, V)
    tp = _target(P, rows, N, V)
    return t0, t1, t2, tp


@triton.jit
def _weights(WTS, K: tl.constexpr):
    """w_0, w_1, w_2 (0 beyond K - 1) and p from the (K + 1,) fp32 weight tensor."""
    w0 = tl.load(WTS)
    w1 = 0.0
    w2 = 0.0
    if K > 1:
        w1 = tl.load(WTS + 1)
    if K > 2:
        w2 = tl.load(WTS + 2)
    wp = tl.load(WTS + K)
    return w0, w1, w2, wp


@triton.jit
def _hit_tile(cols, t0, t1, t2, tp, w0, w1, w2, wp, K: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32: the sum of the weights whose target is the column (two targets may coincide)."""
    c = cols[None, :]
    hit = tl.where(c == t0[:, None], w0, 0.0)
    if K > 1:
        hit += tl.where(c == t1[:, None], w1, 0.0)
    if K > 2:
        hit += tl.where(c == t2[:, None], w2, 0.0)
    return hit + tl.where(c == tp[:, None], wp, 0.0)


@triton.jit
def _row_factors(LSE, G, rows, row_mask, tp, w0, w1, w2, wp):
    """Per row: log2 of sum_v exp(z - 23) (the softmax's base-2 offset), S (all K weights + p when the prefix is a
    target) and g * 23 / 7.5 (0 on masked rows)."""
    off2 = (tl.load(LSE + rows, mask=row_mask, other=_A) - _A) * _LOG2E
    s = (w0 + w1 + w2) + tl.where(tp >= 0, wp, 0.0)
    a = tl.load(G + rows, mask=row_mask, other=0.0) * _DZ_DL
    return off2, s, a


@triton.jit
def _dl_tile(u, hit, col_mask, off2, s, a):
    """(BLOCK_N, BLOCK_V) fp32 dl = g (23 / 7.5) u (1 - u) (S softmax(z) - hit); 0 on masked columns."""
    p = tl.exp2((u - 1.0) * _Z2 - off2[:, None])  # exp(z - lse); (u - 1) is exact
    d = (u * (1.0 - u)) * (s[:, None] * p - hit) * a[:, None]
    return tl.where(col_mask[None, :], d, 0.0)


@triton.jit
def _mtp_fwd_kernel(
    H,  # (N, C) storage dtype, row stride stride_h, unit column stride
    W,  # (C, V) storage dtype, strides stride_wc, stride_wv
    T,  # (N,) int64 next-token targets (-1 or >= V: none)
    P,  # (N,) int64 prefix targets (-1 or >= V: none)
    WTS,  # (K + 1,) fp32: w_0 .. w_{K-1}, p
    SUM_PART,  # (S, N) fp32: sum over the split's columns of exp(z - 23)
    TGT_PART,  # (S, N) fp32: sum over the split's columns of hit * z
    N, C, V, stride_h, stride_wc, stride_wv, blocks_per_split,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # FLOPs 2*BLOCK_N*C per column; bytes: the h tile + the split's W columns (L2), 8 B out per row.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    t0, t1, t2, tp = _row_targets(T, P, rows, N, V, K)
    w0, w1, w2, wp = _weights(WTS, K)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        u = _u_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_wc, stride_wv,
                    BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        hit = _hit_tile(cols, t0, t1, t2, tp, w0, w1, w2, wp, K)  # 0 on masked columns: no target there
        tgt += tl.sum(hit * (u * _A), axis=1)  # z = 23 u, exact
        s += tl.sum(tl.where(col_mask[None, :], tl.exp2((u - 1.0) * _Z2), 0.0), axis=1)
    tl.store(SUM_PART + split * N + rows, s, mask=row_mask)
    tl.store(TGT_PART + split * N + rows, tgt, mask=row_mask)


@triton.jit
def _mtp_bwd_dh_kernel(
    H,  # (N, C) storage dtype
    W,  # (C, V) storage dtype
    T, P,  # (N,) int64 targets, prefix targets
    WTS,  # (K + 1,) fp32 weights
    LSE,  # (N,) fp32 natural-log logsumexp of z from the forward
    G,  # (N,) fp32 upstream gradient of each row's loss
    DH_OUT,  # (S, N, C) contiguous: dh itself (S == 1, h's dtype) or fp32 split partials
    SCRATCH,  # (programs, BLOCK_N, C) fp32 running sums, one slot per program
    N, C, V, stride_h, stride_wc, stride_wv, num_row_blocks, num_tiles, blocks_per_split,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # FLOPs per tile: 4*BLOCK_N*C per column (recompute + dl @ W^T); bytes (L2): W columns twice, scratch RMW
    # 8*BLOCK_N*C per vocab block; DRAM: h, W, dh once.
    pid = tl.program_id(0)
    slot = SCRATCH + pid * BLOCK_N * C
    local = tl.arange(0, BLOCK_N)
    w0, w1, w2, wp = _weights(WTS, K)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rb = tile % num_row_blocks
        split = tile // num_row_blocks
        rows = rb * BLOCK_N + local
        row_mask = rows < N
        t0, t1, t2, tp = _row_targets(T, P, rows, N, V, K)
        off2, s, a = _row_factors(LSE, G, rows, row_mask, tp, w0, w1, w2, wp)
        v_begin = split * blocks_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, V)
        out = DH_OUT + split * N * C
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < V
            u = _u_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_wc, stride_wv,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            hit = _hit_tile(cols, t0, t1, t2, tp, w0, w1, w2, wp, K)
            d = _dl_tile(u, hit, col_mask, off2, s, a).to(W.dtype.element_ty)
            # as cross_entropy's dh kernel: column limits instead of scalar booleans (the interpreter mis-types
            # tensor & scalar-bool): read the running sum from step 2 on, keep it until the last step, then store.
            prev_lim = tl.minimum(v0 - v_begin, 1) * C
            keep_lim = tl.minimum(tl.maximum(v_end - v0 - BLOCK_V, 0), 1) * C
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                cmask = cs < C
                w = tl.load(W + cols[:, None] * stride_wv + cs[None, :] * stride_wc,
                            mask=col_mask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_V, BLOCK_C) = W[cs, cols]^T
                acc = tl.load(slot + local[:, None] * C + cs[None, :], mask=cs[None, :] < prev_lim, other=0.0)
                acc = tl.dot(d, w, acc, input_precision=DOT_PRECISION)
                tl.store(slot + local[:, None] * C + cs[None, :], acc, mask=cs[None, :] < keep_lim)
                tl.store(out + rows[:, None] * C + cs[None, :], acc.to(DH_OUT.dtype.element_ty),
                         mask=row_mask[:, None] & cmask[None, :] & (cs[None, :] >= keep_lim))
            tl.debug_barrier()  # this step's scratch stores are visible to the next step's loads


@triton.jit
def _mtp_bwd_dw_kernel(
    H,  # (N, C) storage dtype
    W,  # (C, V) storage dtype
    T, P,  # (N,) int64 targets, prefix targets
    WTS,  # (K + 1,) fp32 weights
    LSE,  # (N,) fp32
    G,  # (N,) fp32
    DW_OUT,  # (C, V) contiguous, W's dtype
    SCRATCH,  # (programs, C, BLOCK_V) fp32 running sums, one slot per program
    N, C, V, stride_h, stride_wc, stride_wv, num_vocab_blocks,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # FLOPs per tile: 4*BLOCK_V*C per row (recompute + h^T @ dl); bytes (L2): h twice, scratch RMW 8*BLOCK_V*C per
    # row block; DRAM: W and dW once.
    pid = tl.program_id(0)
    slot = SCRATCH + pid * C * BLOCK_V
    local = tl.arange(0, BLOCK_V)
    w0, w1, w2, wp = _weights(WTS, K)
    for vb in range(pid, num_vocab_blocks, tl.num_programs(0)):
        cols = vb * BLOCK_V + local
        col_mask = cols < V
        for r0 in range(0, N, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            t0, t1, t2, tp = _row_targets(T, P, rows, N, V, K)
            off2, s, a = _row_factors(LSE, G, rows, row_mask, tp, w0, w1, w2, wp)
            u = _u_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_wc, stride_wv,
                        BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            hit = _hit_tile(cols, t0, t1, t2, tp, w0, w1, w2, wp, K)
            d = _dl_tile(u, hit, col_mask, off2, s, a).to(H.dtype.element_ty)  # (BLOCK_N, BLOCK_V); 0 on masked rows
            prev_lim = tl.minimum(r0, 1) * C  # as in the dh kernel: 0 on the first step, else C
            keep_lim = tl.minimum(tl.maximum(N - r0 - BLOCK_N, 0), 1) * C  # C except on the last step
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                cmask = cs < C
                ht = tl.load(H + rows[None, :] * stride_h + cs[:, None],
                             mask=cmask[:, None] & row_mask[None, :], other=0.0)  # (BLOCK_C, BLOCK_N) = h[rows, cs]^T
                acc = tl.load(slot + cs[:, None] * BLOCK_V + local[None, :], mask=cs[:, None] < prev_lim, other=0.0)
                acc = tl.dot(ht, d, acc, input_precision=DOT_PRECISION)
                tl.store(slot + cs[:, None] * BLOCK_V + local[None, :], acc, mask=cs[:, None] < keep_lim)
                tl.store(DW_OUT + cs[:, None] * V + cols[None, :], acc.to(DW_OUT.dtype.element_ty),
                         mask=cmask[:, None] & col_mask[None, :] & (cs[:, None] >= keep_lim))
            tl.debug_barrier()  # this step's scratch stores are visible to the next step's loads


# ------------------------------------------------------------------------------------------ launchers


def _check(h, weight, targets, prefix_targets, weights) -> None:
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[0]:
        raise ValueError(f"mtp_head_loss: h (N, C) and weight (C, V) expected (the record's transposed head), got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    N = h.shape[0]
    for name, t in (("targets", targets), ("prefix_targets", prefix_targets)):
        if t.shape != (N,) or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"mtp_head_loss: {name} must be ({N},) int64 (-1: no target), got {tuple(t.shape)} "
                             f"{t.dtype}")
    if h.dtype != weight.dtype or h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"mtp_head_loss: h and weight must share one of fp32/fp16/bf16, got {h.dtype} and "
                         f"{weight.dtype} (HINT: cast both, or run under torch.autocast)")
    if weights.dim() != 1 or not 2 <= weights.numel() <= MAX_K + 1:
        raise ValueError(f"mtp_head_loss: 1 to {MAX_K} multi-token-prediction weights, got {weights.numel() - 1}")
    if h.device.type != "cuda" and not ce._interpreting() and not is_fake(h):  # fake: a memory estimate
        raise ValueError("mtp_head_loss: CPU tensors run through the Triton interpreter (HINT: set TRITON_INTERPRET=1 "
                         "before tritonrun.kernels is imported)")
    if max(h.numel(), weight.numel()) >= 2**31:
        raise ValueError("mtp_head_loss: int32 offsets; h and weight must have < 2^31 elements")


def _valid_weight(targets: torch.Tensor, prefix_targets: torch.Tensor, weights: torch.Tensor, V: int) -> torch.Tensor:
    """(N,) fp32: the sum of the weights whose target is a column (the loss's multiplier of lse); no host sync."""
    K = weights.numel() - 1

    def ok(t):
        return (t >= 0) & (t < V)

    total = torch.where(ok(prefix_targets), weights[K], 0.0)
    for k in range(K):
        total = total + torch.where(ok(F.pad(targets[k:], (0, k), value=-1)), weights[k], 0.0)
    return total


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def mtp_forward(h, weight, targets, prefix_targets, weights, config=None, sm_count=None):
    """(losses (N,) fp32, lse (N,) fp32). `config` / `sm_count` override the device's (tests)."""
    _check(h, weight, targets, prefix_targets, weights)
    h = _as_rows(h)
    targets, prefix_targets, weights = targets.contiguous(), prefix_targets.contiguous(), weights.contiguous()
    N, C = h.shape
    V = weight.shape[1]
    dev = h.device
    if N == 0:
        return _alloc((0,), torch.float32, dev), _alloc((0,), torch.float32, dev)
    cfg = (config or get_config(dev, h.dtype))["fwd"]
    n_rb, S, per = ce._fwd_grid(N, V, cfg, sm_count or ce._sm_count(dev))
    sum_part = _alloc((S, N), torch.float32, dev)
    tgt_part = _alloc((S, N), torch.float32, dev)
    _mtp_fwd_kernel[(n_rb, S)](
        h, weight, targets, prefix_targets, weights, sum_part, tgt_part, N, C, V, h.stride(0), weight.stride(0),
        weight.stride(1), per, K=weights.numel() - 1, BLOCK_N=cfg["BLOCK_N"], BLOCK_V=cfg["BLOCK_V"],
        BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=ce._dot_precision(h.dtype), num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    s, tgt = (sum_part[0], tgt_part[0]) if S == 1 else (sum_part.sum(0), tgt_part.sum(0))  # splits: fixed order
    lse = LOGIT_A + torch.log(s)
    return _valid_weight(targets, prefix_targets, weights, V) * lse - tgt, lse


def mtp_backward(grad, h, weight, targets, prefix_targets, weights, lse, config=None, sm_count=None):
    """(dh like h, dweight (C, V) like weight) for the upstream gradient `grad` (N,) of the per-row losses."""
    h = _as_rows(h)
    targets, prefix_targets, weights = targets.contiguous(), prefix_targets.contiguous(), weights.contiguous()
    g, lse = grad.float().contiguous(), lse.contiguous()
    N, C = h.shape
    V = weight.shape[1]
    dev = h.device
    if N == 0:
        return h.new_zeros((0, C)), torch.zeros(weight.shape, dtype=weight.dtype, device=dev)
    cfgs = config or get_config(dev, h.dtype)
    sm = sm_count or ce._sm_count(dev)
    K, prec = weights.numel() - 1, ce._dot_precision(h.dtype)
    common = (N, C, V, h.stride(0), weight.stride(0), weight.stride(1))

    dcfg = cfgs["dh"]  # persistent programs over (row block, vocab split) tiles
    plan = ce._dh_plan(N, C, V, dcfg, sm)
    S = plan["splits"]
    out = _alloc((N, C), h.dtype, dev) if S == 1 else _alloc(plan["partials"], torch.float32, dev)
    scratch = _alloc(plan["scratch"], torch.float32, dev)
    _mtp_bwd_dh_kernel[(plan["programs"],)](
        h, weight, targets, prefix_targets, weights, lse, g, out, scratch, *common, plan["row_blocks"],
        plan["tiles"], plan["blocks_per_split"], K=K, BLOCK_N=dcfg["BLOCK_N"], BLOCK_V=dcfg["BLOCK_V"],
        BLOCK_K=dcfg["BLOCK_K"], BLOCK_C=dcfg["BLOCK_C"], DOT_PRECISION=prec, num_warps=dcfg["num_warps"],
        num_stages=dcfg["num_stages"])
    dh = out if S == 1 else out.sum(0).to(h.dtype)  # split partials: fixed order, deterministic
    del scratch

    wcfg = cfgs["dw"]  # persistent programs over vocab blocks
    plan = ce._dw_plan(C, V, wcfg, sm)
    dw = _alloc((C, V), weight.dtype, dev)
    scratch = _alloc((plan["programs"], C, wcfg["BLOCK_V"]), torch.float32, dev)
    _mtp_bwd_dw_kernel[(plan["programs"],)](
        h, weight, targets, prefix_targets, weights, lse, g, dw, scratch, *common, plan["vocab_blocks"], K=K,
        BLOCK_N=wcfg["BLOCK_N"], BLOCK_V=wcfg["BLOCK_V"], BLOCK_K=wcfg["BLOCK_K"], BLOCK_C=wcfg["BLOCK_C"],
        DOT_PRECISION=prec, num_warps=wcfg["num_warps"], num_stages=wcfg["num_stages"])
    return dh, dw


def _planned_configs(device: torch.device, dtype: torch.dtype) -> tuple[dict[str, dict], int]:
    """(configs, SM count) the fakes size their buffers for: the GPU of kernels.target.planning_for, or the device's."""
    planned = planned_target()
    if planned is not None:
        return get_config(device, dtype, arch=planned.arch), planned.sm_count
    return get_config(device, dtype), ce._sm_count(device)


# ------------------------------------------------------------------------------------------ torch ops


@torch.library.custom_op("tritonrun::mtp_head_loss", mutates_args=())
def _mtp_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, prefix_targets: torch.Tensor,
            weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mtp_forward(h, weight, targets, prefix_targets, weights)


@_mtp_op.register_fake
def _(h, weight, targets, prefix_targets, weights):
    # What mtp_forward allocates besides its outputs: the (S, N) fp32 partials of the splits.
    N = h.shape[0]
    if N:
        cfgs, sm = _planned_configs(h.device, h.dtype)
        _, S, _ = ce._fwd_grid(N, weight.shape[1], cfgs["fwd"], sm)
        parts = h.new_empty((2, S, N), dtype=torch.float32)
        del parts
    return h.new_empty((N,), dtype=torch.float32), h.new_empty((N,), dtype=torch.float32)


@torch.library.custom_op("tritonrun::mtp_head_loss_backward", mutates_args=())
def _mtp_backward_op(grad: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     prefix_targets: torch.Tensor, weights: torch.Tensor, lse: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return mtp_backward(grad, h, weight, targets, prefix_targets, weights, lse)


@_mtp_backward_op.register_fake
def _(grad, h, weight, targets, prefix_targets, weights, lse):
    # What mtp_backward allocates, in its order: dh (or its fp32 split partials) with the dh scratch, then dW with
    # its scratch; the gradients are contiguous.
    N, C = h.shape
    V = weight.shape[1]
    if N == 0:
        return h.new_empty((0, C)), weight.new_empty((C, V))
    cfgs, sm = _planned_configs(h.device, h.dtype)
    plan = ce._dh_plan(N, C, V, cfgs["dh"], sm)
    out = h.new_empty((N, C)) if plan["splits"] == 1 else h.new_empty(plan["partials"], dtype=torch.float32)
    scratch = h.new_empty(plan["scratch"], dtype=torch.float32)
    dh = out if plan["splits"] == 1 else h.new_empty((N, C))
    del scratch, out
    wplan = ce._dw_plan(C, V, cfgs["dw"], sm)
    dw = weight.new_empty((C, V))
    scratch = h.new_empty((wplan["programs"], C, cfgs["dw"]["BLOCK_V"]), dtype=torch.float32)
    del scratch
    return dh, dw


def _setup_context(ctx, inputs, output):
    h, weight, targets, prefix_targets, weights = inputs
    ctx.save_for_backward(h, weight, targets, prefix_targets, weights, output[1])
    ctx.mark_non_differentiable(output[1])  # lse is an auxiliary output


def _backward(ctx, grad_losses, _grad_lse):
    h, weight, targets, prefix_targets, weights, lse = ctx.saved_tensors
    dh, dw = torch.ops.tritonrun.mtp_head_loss_backward(grad_losses, h, weight, targets, prefix_targets, weights, lse)
    return dh, dw, None, None, None


_mtp_op.register_autograd(_backward, setup_context=_setup_context)


def loss_weights(mtp_weights: torch.Tensor | Sequence[float], prefix_weight: torch.Tensor | float,
                 device: torch.device) -> torch.Tensor:
    """The kernels' (K + 1,) fp32 weight tensor [w_0, ..., w_{K-1}, p] on `device`. From device tensors it is built
    on the device (no host sync, nothing for torch.compile to specialize on); from floats it is copied there."""
    if isinstance(mtp_weights, torch.Tensor):
        w = mtp_weights.reshape(-1).to(device=device, dtype=torch.float32)
    else:
        w = torch.tensor([float(x) for x in mtp_weights], dtype=torch.float32).to(device)
    if isinstance(prefix_weight, torch.Tensor):
        p = prefix_weight.reshape(1).to(device=device, dtype=torch.float32)
    else:
        p = torch.tensor([float(prefix_weight)], dtype=torch.float32).to(device)
    return torch.cat([w, p])


def mtp_head_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  mtp_weights: torch.Tensor | Sequence[float], prefix_targets: Optional[torch.Tensor] = None,
                  prefix_weight: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Per-token losses (N,) fp32 of record #89's head (module docstring) for h (N, C) (or (..., C)), weight (C, V),
    targets (N,) int64 (-1: none), mtp_weights (K,) (a device tensor: the schedule's values are data), prefix_targets
    (N,) int64 (-1: none; None: no prefix loss) and prefix_weight; differentiable w.r.t. h and weight."""
    if torch.is_autocast_enabled(h.device.type):  # as F.linear under autocast: both to the autocast dtype
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    h = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    prefix_targets = torch.full_like(targets, -1) if prefix_targets is None else prefix_targets.reshape(-1)
    weights = loss_weights(mtp_weights, prefix_weight, h.device)
    _check(h, weight, targets, prefix_targets, weights)
    return torch.ops.tritonrun.mtp_head_loss(h, weight, targets, prefix_targets, weights)[0]


# ------------------------------------------------------------------------------------------ reference


class _RoundedSigmoid(torch.autograd.Function):
    """u = bf16(sigmoid(x)) in x's dtype, du/dx = u (1 - u) at the rounded u (the record's kernel keeps only u)."""

    @staticmethod
    def forward(ctx, x):
        u = torch.sigmoid(x).bfloat16().to(x.dtype)
        ctx.save_for_backward(u)
        return u

    @staticmethod
    def backward(ctx, grad):
        (u,) = ctx.saved_tensors
        return grad * u * (1 - u)


class _ValueWithGradientOf(torch.autograd.Function):
    """`value` forward, the gradient of `surrogate` (same shape) backward."""

    @staticmethod
    def forward(ctx, value, surrogate):
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def mtp_head_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mtp_weights,
                       prefix_targets: Optional[torch.Tensor], prefix_weight: float,
                       compute_dtype: torch.dtype | None = None, chunk_rows: int | None = None) -> torch.Tensor:
    """Plain PyTorch with materialized logits: per-token losses (N,) whose autograd gives the contract's gradients
    (speedrun89.mtp_loss_reference's formulas; tests/test_mtp_head.py checks the two agree). compute_dtype upcasts h
    and weight first (fp64 for test references); otherwise the matmul runs in the input dtype, the rest in >= fp32.
    Two autograd functions make autograd follow the contract, not the loss as written: u's derivative is taken at the
    bf16-rounded u (_RoundedSigmoid), and the losses carry the gradient of losses + (S_i - valid weights_i) lse_i
    (_ValueWithGradientOf: the normalizer of the K weights whose targets are missing, past the last row or -1).
    (Not a detach trick such as x + (y - y.detach()): compiled, that lost its gradient, as the benchmark's check
    showed.)
    chunk_rows: the same losses over chunks of rows, each chunk's logits recomputed in the backward
    (torch.utils.checkpoint): memory for one chunk's logits, not N x V (the benchmark's check at 49,152 rows)."""
    if compute_dtype is not None:
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
    w = [float(x) for x in mtp_weights]
    p = float(prefix_weight)
    N, V = h.shape[0], weight.shape[1]
    if prefix_targets is None:
        prefix_targets = torch.full_like(targets, -1)
    shifted = torch.stack([F.pad(targets[k:], (0, k), value=-1) for k in range(len(w))] + [prefix_targets])

    def losses(h, shifted):
        logits = h @ weight
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        z = LOGIT_A * _RoundedSigmoid.apply((logits + LOGIT_B) / LOGIT_C)
        lse = torch.logsumexp(z, dim=1)
        out = torch.zeros_like(lse)
        valid = torch.zeros_like(lse)
        for t, wt in zip(shifted, w + [p]):
            ok = (t >= 0) & (t < V)
            zt = z.gather(1, t.clamp(0, V - 1)[:, None])[:, 0]
            out = out + torch.where(ok, wt * (lse - zt), 0.0)
            valid = valid + torch.where(ok, wt, 0.0)
        s_all = sum(w) + torch.where((shifted[-1] >= 0) & (shifted[-1] < V), p, 0.0)
        return _ValueWithGradientOf.apply(out, out + (s_all - valid) * lse)

    if chunk_rows is None or chunk_rows >= N:
        return losses(h, shifted)
    from torch.utils.checkpoint import checkpoint

    return torch.cat([checkpoint(losses, h[i:i + chunk_rows], shifted[:, i:i + chunk_rows], use_reentrant=False)
                      for i in range(0, N, chunk_rows)])


# ------------------------------------------------------------------------------------------ cost model


def mtp_flops(N: int, V: int, C: int, part: str = "fwd_bwd", executed: bool = True) -> int:
    """Matmul FLOPs, as cross_entropy.lce_flops: forward 2NVC, backward 8NVC executed (4NVC model FLOPs)."""
    return ce.lce_flops(N, V, C, part, executed)


# ------------------------------------------------------------------------------------------ AOT check
_KERNELS = {"fwd": "_mtp_fwd_kernel", "dh": "_mtp_bwd_dh_kernel", "dw": "_mtp_bwd_dw_kernel"}
_POINTERS = {"H": "x", "W": "x", "T": "*i64", "P": "*i64", "WTS": "*fp32", "SUM_PART": "*fp32", "TGT_PART": "*fp32",
             "LSE": "*fp32", "G": "*fp32", "DH_OUT": "x", "DW_OUT": "x", "SCRATCH": "*fp32"}
_DIVISIBLE_INTS = {"N", "C", "V", "stride_h", "stride_wc"}  # multiples of 16 at the record's shape (stride_wv = 1)


def compile_config(kname: str, c: dict, arch: str = "sm_89", dtype: torch.dtype = torch.bfloat16, K: int = MAX_K
                   ) -> dict:
    """Compile kernel `kname` ("fwd", "dh", "dw") with config `c` for `arch` without a GPU (TRITON_INTERPRET must be
    unset in this process): shared bytes, registers and spills (ptxas -v, triton's ptxas), the mma instructions."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritonrun.kernels.aot import cached_ptxas_stats, mma_instructions

    cc = int(arch.removeprefix("sm_"))
    ptr = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    fn = globals()[_KERNELS[kname]]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile_config needs TRITON_INTERPRET unset before tritonrun/kernels/ is imported")
    consts = {k: v for k, v in c.items() if k.startswith("BLOCK_")}
    consts.update(K=K, DOT_PRECISION=ce._dot_precision(dtype))
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name == "stride_wv":
            sig[name] = "constexpr"  # 1: Triton specializes a unit stride at launch
            consts[name] = 1
        else:
            sig[name] = (ptr if _POINTERS[name] == "x" else _POINTERS[name]) if name in _POINTERS else "i32"
            if name in _POINTERS or name in _DIVISIBLE_INTS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
    stats = cached_ptxas_stats(kernel, cc)
    return dict(kernel=kname, arch=arch, dtype=str(dtype).removeprefix("torch."), K=K, shared=kernel.metadata.shared,
                shared_limit=ARCH_SHARED_LIMIT[arch], mma=mma_instructions(kernel.asm["ptx"]), **stats, config=c)


def compile_configs(arch: str = "sm_89", dtype: torch.dtype = torch.bfloat16, K: int = MAX_K) -> list[dict]:
    """compile_config for each kernel of `arch`'s table."""
    cfg = get_config(torch.device("cuda"), dtype, arch)
    return [compile_config(kname, cfg[kname], arch, dtype, K) for kname in _KERNELS]


if __name__ == "__main__":  # python -m tritonrun.kernels.mtp_head [arch] [dtype] [K]: the AOT compile table
    import sys

    _arch_arg = sys.argv[1] if len(sys.argv) > 1 else "sm_89"
    _dt = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "bfloat16")
    _k = int(sys.argv[3]) if len(sys.argv) > 3 else MAX_K
    for r in compile_configs(_arch_arg, _dt, _k):
        print(f"{r['arch']} {r['dtype']:>8} K={r['K']} {r['kernel']:>3} {ce.ce_tiles(r['config']):>19}: shared "
              f"{r['shared']:>6}/{r['shared_limit']} B, {r['registers']} regs, spills {r['spill_stores']}/"
              f"{r['spill_loads']} B, {' '.join(r['mma']) or 'no mma'}")
