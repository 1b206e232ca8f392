"""Document-masked sliding-window attention, block-sparse FlashAttention-2: forward + backward in Triton.

    o = softmax(q @ k^T * scale + mask) @ v                  q, k, v, o: (B, H, T, D)
    mask[i, j] = 0 if doc(i) == doc(j) and 0 <= i - j < window, else -inf

The documents are given as `cu_seqlens`, int32 (n_docs + 1,): document d spans positions
[cu_seqlens[d], cu_seqlens[d + 1]) of T, the same for every batch row (B is 1 in the speedrun: one
packed sequence per micro-batch); cu_seqlens[0] = 0, cu_seqlens[-1] = T (not checked on the device:
that would cost a host sync per call). Empty documents (repeated boundaries) are allowed. `window` >= 1
is a plain runtime integer: a window schedule changes it every step without recompiling anything (the
kernels take it with do_not_specialize, so Triton neither bakes it in as a constant nor specializes on
its divisibility by 16; tests/test_window_attention.py checks the specialization and the jit cache).

Layouts. As tritonrun/kernels/attention.py: q, k, v of any strides (the model's transposed views of its
projections are read in place); o, dq, dk, dv are (B, T, H, D) memory returned as (B, H, T, D)
views. lse and delta are (B, H, T) fp32. cu_seqlens lives on q's device.

Precision. As tritonrun/kernels/attention.py: loads in the storage dtype, every tl.dot accumulates in fp32,
softmax statistics in fp32, base-2 exponentials with log2(e) folded into the score scale, P and dS cast
to the input dtype before their products; fp32 inputs use input_precision="ieee" (exact, for tests).

Block-sparse iteration. Query i may attend keys j in [max(doc_start(i), i - window + 1), i]: a contiguous
range whose ends only grow with i. So the keys a query block [m0, m1) can reach are one contiguous range,
[max(doc_start(m0), m0 - window + 1), m1), and the queries a key block [n0, n1) is reached by are
[n0, min(doc_end(n1 - 1), n1 - 1 + window)). The launcher turns these into per-program block ranges
(`kv_block_ranges`, `q_block_ranges`, int32 (n_blocks, 4) = [lo, full_lo, full_hi, hi] in units of the
streamed block, on the GPU with a few small torch ops from cu_seqlens: searchsorted + elementwise, no
host sync). Tiles are aligned to the streamed block's grid; each program walks them in two kinds of
loop: FULL tiles (every (row, key) pair allowed: no mask, no bound checks, the dense kernel's inner loop),
blocks full_lo..full_hi-1, and masked tiles, the head run lo..full_lo-1 and the tail run full_hi..hi-1
(the forward walks both masked runs in one loop after the full ones: a third loop cost it 34 registers
on sm_89; dK/dV and dQ walk head, full, tail). Full is exact: a tile is full iff its last row's document
starts at or before its first key, its last row is less than `window` past its first key and its last key
is at or before its first row (the program's own rows clamped to T; streamed positions >= T count as not
allowed, so tiles crossing T are masked). Every visited tile holds at least one allowed pair
(tests/test_window_attention.py checks both against brute force on random boundaries). The masks
need doc_start per position: DOC_START, int32 (T,), also from searchsorted.

Algorithm (FlashAttention-2, as tritonrun/kernels/attention.py, reusing its delta kernel).
  forward   grid (cdiv(T, BLOCK_M), B*H). Online softmax over the reachable key blocks; the running
            max starts at -1e30 (finite), since a row may see a first block that is masked entirely for
            it (keys before its window): exp2(-inf - (-1e30)) = 0, no NaN. Saves lse (natural log).
  backward  delta = rowsum(dO * O) (kernels.attention._attn_bwd_delta); dK, dV parallel over key
            blocks, walking the query blocks that reach them; dQ parallel over query blocks, walking
            their key blocks. Every program owns its output rows: no atomics, deterministic (bitwise
            run to run). Padded query rows load lse = +inf (P = 0) in the dK/dV kernel.

Cost. Per (b, h) with a executed tiles of BLOCK_M x BLOCK_N in the forward: 4 * BLOCK_M * BLOCK_N * D
FLOPs per tile (QK^T and PV); the backward executes 4 matmuls per dK/dV tile and 3 per dQ tile (S and dP
recomputed in both, the price of no atomics). Model FLOPs (`window_attention_flops`, what the benchmark
divides by): 4 * D per allowed (i, j) pair forward, 2.5x that backward (FA2's convention, as
attention_flops; dense causal counts T^2 / 2 pairs, the same convention).
  T = 65,536 (one document: the worst case; documents only remove pairs), window = 1,792, D = 128, per token
  per head, with the sm_89 tiles (`python -m tritonrun.kernels.window_attention` prints this; `executed_flops`):
                                         keys per query   FLOPs per token   vs dense causal (T/2 keys)
    dense causal forward                        32,768         16,777,216        1x
    window forward, allowed pairs (model)      1,767.5            904,967     18.5x fewer
    window forward executed, 128 x 64 tiles    1,893.8            969,600     17.3x fewer
    dK/dV executed, 32 x 64 tiles (4 matmuls)  1,830.6          1,874,560     17.9x fewer
    dQ executed, 64 x 32 tiles (3 matmuls)     1,830.6          1,405,920     17.9x fewer
  The forward visits (window + BLOCK_M - 1) keys per query rounded out to the BLOCK_N grid: ~29.6 tiles of
  64 keys per 128-row block, of which all but 2-3 are full. Issue 27's goal (>= 10x fewer attention FLOPs
  than dense causal at T = 64K, window 1,792) holds for the model count and for every executed kernel.
  At T = 16,384 the same window gives 4.5x (forward, executed): the saving grows with T / window.
  bytes (DRAM minimum, s = bytes per element): forward 4*T*D*s (q, k, v read, o written) + 4T (lse) + 4T
  (DOC_START); K and V tiles are re-read by the (window + BLOCK_M) / BLOCK_M query blocks that reach them,
  from L2 (the window's K+V, 1,792 x 128 x 2 x 2 B = 0.9 MB per head, stays resident in Ada's 36 MB L2).
  Backward: delta 2*T*D*s; dK/dV reads q, dO, lse, delta per reaching query block, k, v once, writes dk, dv;
  dQ reads q, dO once and k, v per reachable key block, writes dq: 10*T*D*s + 16T minimum in all.

Why it is fast. Work is T x (window + BLOCK) instead of T^2 / 2; full tiles (~27 of the ~30 forward tiles
per program at window 1,792) run exactly the dense kernel's unmasked inner loop; masked tiles add two
integer compares per element; no host sync (the ranges are device tensors), no recompilation when the window
changes, no atomics; the per-block ranges are 16 B per program, read once.

Configs. `CONFIGS[arch][kernel][D] = (BLOCK_M, BLOCK_N, num_warps, num_stages)`, fixed tables, no autotuner
(the block ranges depend on the block sizes, so they are computed for the one config that runs); blocks need
no divisibility relation (each kernel aligns tiles to its own grid). Compiled without a GPU by bench/ada.py
(triton 3.9, its bundled ptxas) at the issue's shape, T = 65,536 / 16,384, 6 heads of 128, bf16:
    arch   kernel     D=128 tile (M x N, warps, stages)   shared B   regs   spills   tensor cores
    sm_89  fwd        128 x 64, 8, 2                        65,536    228        0   mma.sync m16n8k16
    sm_89  bwd_dkdv    32 x 64, 8, 2                        53,632    199        0   mma.sync m16n8k16
    sm_89  bwd_dq      64 x 32, 8, 2                        53,248    167        0   mma.sync m16n8k16
    sm_80  fwd        128 x 64, 8, 2                        65,536    206        0   mma.sync
    sm_90  fwd        128 x 64, 8, 3                       131,072    220        0   wgmma
(sm_89: 101,376 B of shared memory per block, 255 registers; 8 warps x ~200-228 registers holds one block
of 8 warps per SM, as the dense kernel. D = 64 tiles are the dense kernel's table entries, also spill-free.)
tests/test_ada.py checks every entry the driver launches (sm_89, sm_80, sm_90).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tritonrun.kernels.attention import LOG2E, SUPPORTED_DTYPES, _attn_bwd_delta, arch_key

HEAD_DIMS = (64, 128)  # the speedrun's head dim is 128; 64 is GPT-2's
DELTA_BLOCK = 64

SHARED_LIMIT = {"sm_89": 101_376, "sm_80": 166_912, "sm_90": 232_448}

# (BLOCK_M, BLOCK_N, num_warps, num_stages) for 16-bit inputs. fwd, bwd_dq: BLOCK_M query rows per program,
# BLOCK_N keys per streamed tile; bwd_dkdv: BLOCK_N keys per program, BLOCK_M queries per streamed tile.
# Started from tritonrun/kernels/attention.py's table entries (compile-checked there), re-checked for these kernels
# (three loops each) by bench/ada.py.
CONFIGS: dict[str, dict[str, dict[int, tuple[int, int, int, int]]]] = {
    "sm_89": {
        "fwd": {64: (128, 64, 8, 3), 128: (128, 64, 8, 2)},
        "bwd_dkdv": {64: (32, 128, 8, 2), 128: (32, 64, 8, 2)},
        "bwd_dq": {64: (128, 32, 8, 3), 128: (64, 32, 8, 2)},
    },
    "sm_80": {
        "fwd": {64: (128, 64, 8, 4), 128: (128, 64, 8, 2)},
        "bwd_dkdv": {64: (32, 128, 8, 4), 128: (32, 64, 8, 3)},
        "bwd_dq": {64: (128, 32, 8, 4), 128: (64, 32, 8, 3)},
    },
    "sm_90": {
        "fwd": {64: (128, 64, 8, 4), 128: (128, 64, 8, 3)},
        "bwd_dkdv": {64: (32, 128, 8, 4), 128: (32, 64, 8, 3)},
        "bwd_dq": {64: (128, 32, 8, 4), 128: (64, 32, 8, 3)},
    },
}
# fp32 inputs on a GPU (tests only): small tiles, as tritonrun/kernels/attention.py's FP32_CONFIG.
FP32_CONFIG = {"fwd": (16, 16, 4, 2), "bwd_dkdv": (16, 16, 8, 2), "bwd_dq": (16, 16, 2, 2)}
# TRITON_INTERPRET=1 (CPU tests): small unequal tiles, so short sequences cross many tile boundaries.
INTERPRETER_CONFIG = {"fwd": (32, 16, 4, 1), "bwd_dkdv": (16, 32, 4, 1), "bwd_dq": (32, 16, 4, 1)}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,  # running state and the (BLOCK_M, D) query tile
    K, V, stride_kt, stride_kd, stride_vt, stride_vd,  # this head's K, V, (T, D)
    offs_m, row_lo, T, qk_scale, first, count, split, jump,  # row_lo: first allowed key per row
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over `count` key blocks of the BLOCK_N grid: first, first + 1, ..., skipping `jump`
    blocks after the first `split` (so one loop walks both masked runs, the head and the tail: a third loop
    costs the forward 34 more registers on sm_89, 221 -> 255). MASKED: keys bound-checked on load, scores
    outside [row_lo, row] set to -inf; else every pair is allowed (a full tile)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for i in range(0, count):
        nb = first + i + tl.where(i >= split, jump, 0)
        kpos = nb * BLOCK_N + offs_n
        kT_ptrs = K + offs_d[:, None] * stride_kd + kpos[None, :] * stride_kt  # (D, BLOCK_N)
        v_ptrs = V + kpos[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=kpos[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=kpos[:, None] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        if MASKED:
            allowed = (kpos[None, :] >= row_lo[:, None]) & (kpos[None, :] <= offs_m[:, None])
            s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units; finite: m_i starts at -1e30
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["window"])
def _wattn_fwd(
    Q, K, V,  # (B, H, T, D) any strides, storage dtype
    O,  # (B, H, T, D) any strides, storage dtype (written)
    LSE,  # (B*H, T) fp32 contiguous (written): natural-log logsumexp of the scaled allowed scores
    DOC_START,  # (T,) int32: first position of each position's document
    KV_RANGES,  # (cdiv(T, BLOCK_M), 4) int32: key blocks [lo, full_lo, full_hi, hi) of each query block
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, window, qk_scale,  # window: runtime, never specialized; qk_scale = scale * log2(e)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # FLOPs 4*BLOCK_M*BLOCK_N*D per visited tile; bytes: q tile once, k/v tiles per visited key block, o once.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += pid_bh.to(tl.int64) * T

    lo = tl.load(KV_RANGES + pid_m * 4)
    full_lo = tl.load(KV_RANGES + pid_m * 4 + 1)
    full_hi = tl.load(KV_RANGES + pid_m * 4 + 2)
    hi = tl.load(KV_RANGES + pid_m * 4 + 3)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    row_lo = tl.maximum(tl.load(DOC_START + offs_m, mask=row_ok, other=0), offs_m - window + 1)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # The full tiles first (unmasked), then the masked ones: the head run lo..full_lo-1 and the tail run
    # full_hi..hi-1 in one loop (the order of the tiles does not change the math, only the rounding).
    n_full = full_hi - full_lo
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, row_lo, T, qk_scale, full_lo, n_full, n_full, 0,
                               HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, row_lo, T, qk_scale, lo, (full_lo - lo) + (hi - full_hi), full_lo - lo, n_full,
                               HEAD_DIM, BLOCK_N, True, DOT_PRECISION)
    # Every real row sees its own key (window >= 1), so l_i >= 1 there; padded rows (not stored) may have
    # seen nothing: give them l = 1, not 0/0.
    l_i = tl.where(row_ok, l_i, 1.0)
    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,  # fp32 accumulators and the (BLOCK_N, D) key/value tiles of this program
    Q, DO, LSE, DELTA, DOC_START, stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, T, window, qk_scale, lo, hi,  # [lo, hi): query blocks of the BLOCK_M grid
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV over query blocks lo..hi-1, on transposed scores (keys x queries). MASKED: queries
    bound-checked, pairs outside the window/document get P = 0; else a full tile (no checks)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for mb in range(lo, hi):
        qpos = mb * BLOCK_M + offs_m
        if MASKED:
            q_ok = qpos < T
            qT = tl.load(Q + offs_d[:, None] * stride_qd + qpos[None, :] * stride_qt, mask=q_ok[None, :], other=0.0)
            do = tl.load(DO + qpos[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=q_ok[:, None],
                         other=0.0)
            # Padded query rows: lse = +inf makes their probabilities exactly 0.
            lse2 = tl.load(LSE + qpos, mask=q_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + qpos, mask=q_ok, other=0.0)
            q_lo = tl.maximum(tl.load(DOC_START + qpos, mask=q_ok, other=0), qpos - window + 1)
        else:
            qT = tl.load(Q + offs_d[:, None] * stride_qd + qpos[None, :] * stride_qt)
            do = tl.load(DO + qpos[:, None] * stride_dot + offs_d[None, :] * stride_dod)
            lse2 = tl.load(LSE + qpos) * 1.4426950408889634
            delta = tl.load(DELTA + qpos)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        if MASKED:
            allowed = (offs_n[:, None] >= q_lo[None, :]) & (offs_n[:, None] <= qpos[None, :])
            pT = tl.where(allowed, pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["window"])
def _wattn_bwd_dkdv(
    Q, K, V, DO,  # (B, H, T, D) any strides, storage dtype
    LSE, DELTA,  # (B*H, T) fp32 contiguous
    DK, DV,  # (B, H, T, D) any strides, storage dtype (written)
    DOC_START,  # (T,) int32
    Q_RANGES,  # (cdiv(T, BLOCK_N), 4) int32: query blocks [lo, full_lo, full_hi, hi) of each key block
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T, window, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # FLOPs 8*BLOCK_M*BLOCK_N*D per visited tile (4 matmuls); bytes: k, v, dk, dv tiles once, q/dO/lse/delta
    # tiles per visited query block.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DK += b * stride_dkb + h * stride_dkh
    DV += b * stride_dvb + h * stride_dvh
    LSE += pid_bh.to(tl.int64) * T
    DELTA += pid_bh.to(tl.int64) * T

    lo = tl.load(Q_RANGES + pid_n * 4)
    full_lo = tl.load(Q_RANGES + pid_n * 4 + 1)
    full_hi = tl.load(Q_RANGES + pid_n * 4 + 2)
    hi = tl.load(Q_RANGES + pid_n * 4 + 3)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DOC_START, stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, T, window, qk_scale, lo, full_lo, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DOC_START, stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, T, window, qk_scale, full_lo, full_hi, HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, DOC_START, stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, T, window, qk_scale, full_hi, hi, HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,  # fp32 accumulator, this program's query tiles and row statistics
    K, V, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, row_lo, T, qk_scale, lo, hi,  # [lo, hi): key blocks of the BLOCK_N grid
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ over key blocks lo..hi-1 (MASKED as in _fwd_inner)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for nb in range(lo, hi):
        kpos = nb * BLOCK_N + offs_n
        kT_ptrs = K + offs_d[:, None] * stride_kd + kpos[None, :] * stride_kt  # (D, BLOCK_N)
        vT_ptrs = V + offs_d[:, None] * stride_vd + kpos[None, :] * stride_vt  # (D, BLOCK_N)
        if MASKED:
            kT = tl.load(kT_ptrs, mask=kpos[None, :] < T, other=0.0)
            vT = tl.load(vT_ptrs, mask=kpos[None, :] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if MASKED:
            allowed = (kpos[None, :] >= row_lo[:, None]) & (kpos[None, :] <= offs_m[:, None])
            p = tl.where(allowed, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["window"])
def _wattn_bwd_dq(
    Q, K, V, DO,  # (B, H, T, D) any strides, storage dtype
    LSE, DELTA,  # (B*H, T) fp32 contiguous
    DQ,  # (B, H, T, D) any strides, storage dtype (written)
    DOC_START,  # (T,) int32
    KV_RANGES,  # (cdiv(T, BLOCK_M), 4) int32, as the forward's (for this kernel's block sizes)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, window, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # FLOPs 6*BLOCK_M*BLOCK_N*D per visited tile (3 matmuls); bytes: q, dO, dq tiles once, k/v per key block.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    DQ += b * stride_dqb + h * stride_dqh
    LSE += pid_bh.to(tl.int64) * T
    DELTA += pid_bh.to(tl.int64) * T

    lo = tl.load(KV_RANGES + pid_m * 4)
    full_lo = tl.load(KV_RANGES + pid_m * 4 + 1)
    full_hi = tl.load(KV_RANGES + pid_m * 4 + 2)
    hi = tl.load(KV_RANGES + pid_m * 4 + 3)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    row_lo = tl.maximum(tl.load(DOC_START + offs_m, mask=row_ok, other=0), offs_m - window + 1)
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, row_lo, T, qk_scale, lo, full_lo, HEAD_DIM, BLOCK_N, True, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, row_lo, T, qk_scale, full_lo, full_hi, HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, row_lo, T, qk_scale, full_hi, hi, HEAD_DIM, BLOCK_N, True, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


KERNELS = {"fwd": _wattn_fwd, "bwd_dkdv": _wattn_bwd_dkdv, "bwd_dq": _wattn_bwd_dq}


# ------------------------------------------------------------------------- block ranges (on the GPU)
def _doc_index(cu_seqlens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Index d + 1 of the document d holding each position: cu_seqlens[d] <= pos < cu_seqlens[d + 1]."""
    return torch.searchsorted(cu_seqlens, pos, right=True)


def doc_starts(cu_seqlens: torch.Tensor, T: int) -> torch.Tensor:
    """(T,) int32: the first position of each position's document."""
    pos = torch.arange(T, dtype=torch.int32, device=cu_seqlens.device)
    return cu_seqlens[_doc_index(cu_seqlens, pos) - 1]


def kv_block_ranges(cu_seqlens: torch.Tensor, T: int, window: int, block_m: int, block_n: int) -> torch.Tensor:
    """(cdiv(T, block_m), 4) int32 [lo, full_lo, full_hi, hi]: for each query block [m0, m1), the key blocks
    (of the block_n grid) it visits, lo..hi-1, of which full_lo..full_hi-1 are full tiles (no mask).
    Reachable keys [max(doc_start(m0), m0 - window + 1), m1); a key block n0 is full iff
    n0 >= max(doc_start(m1 - 1), m1 - window) and n0 + block_n - 1 <= m0."""
    dev = cu_seqlens.device
    m0 = torch.arange(0, T, block_m, dtype=torch.int32, device=dev)
    m1 = torch.clamp(m0 + block_m, max=T)
    ds = cu_seqlens[_doc_index(cu_seqlens, torch.stack((m0, m1 - 1))) - 1]  # doc starts of first and last rows
    lo_key = torch.maximum(ds[0], m0 - window + 1)
    full_key = torch.maximum(ds[1], m1 - window)
    lo = torch.div(lo_key, block_n, rounding_mode="floor")
    hi = torch.div(m1 + block_n - 1, block_n, rounding_mode="floor")
    full_lo = torch.minimum(torch.maximum(torch.div(full_key + block_n - 1, block_n, rounding_mode="floor"), lo), hi)
    full_hi = torch.minimum(torch.maximum(torch.div(m0 + 1, block_n, rounding_mode="floor"), full_lo), hi)
    return torch.stack((lo, full_lo, full_hi, hi), dim=1).to(torch.int32).contiguous()


def q_block_ranges(cu_seqlens: torch.Tensor, T: int, window: int, block_m: int, block_n: int) -> torch.Tensor:
    """(cdiv(T, block_n), 4) int32 [lo, full_lo, full_hi, hi]: for each key block [n0, n1), the query blocks
    (of the block_m grid) that reach it, lo..hi-1, of which full_lo..full_hi-1 are full tiles. Reaching
    queries [n0, min(doc_end(n1 - 1), n1 - 1 + window)); a query block m0 is full iff m0 >= n1 - 1 and
    m0 + block_m <= min(doc_end(n0), n0 + window)."""
    dev = cu_seqlens.device
    n0 = torch.arange(0, T, block_n, dtype=torch.int32, device=dev)
    n1 = torch.clamp(n0 + block_n, max=T)
    de = cu_seqlens[_doc_index(cu_seqlens, torch.stack((n0, n1 - 1)))]  # doc ends of first and last keys
    hi_q = torch.minimum(de[1], n1 - 1 + window)
    full_end = torch.minimum(de[0], n0 + window)
    lo = torch.div(n0, block_m, rounding_mode="floor")
    hi = torch.div(hi_q + block_m - 1, block_m, rounding_mode="floor")
    full_lo = torch.minimum(torch.maximum(torch.div(n1 - 1 + block_m - 1, block_m, rounding_mode="floor"), lo), hi)
    full_hi = torch.minimum(torch.maximum(torch.div(full_end, block_m, rounding_mode="floor"), full_lo), hi)
    return torch.stack((lo, full_lo, full_hi, hi), dim=1).to(torch.int32).contiguous()


# --------------------------------------------------------------------------------------- launchers
def _new_output(shape, dtype, device) -> torch.Tensor:
    """Every buffer the op writes is allocated here (tests monkeypatch it to NaN-fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _heads_view(B: int, H: int, T: int, D: int, dtype, device) -> torch.Tensor:
    """A (B, H, T, D) view of (B, T, H, D) memory, as tritonrun/kernels/attention.py returns."""
    return _new_output((B, T, H, D), dtype, device).transpose(1, 2)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit dots


def config(kind: str, D: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launcher uses for `kind` on `device`."""
    if _interpreting():
        return INTERPRETER_CONFIG[kind]
    if dtype == torch.float32:
        return FP32_CONFIG[kind]
    return CONFIGS[arch_key(torch.cuda.get_device_capability(device))][kind][D]


def _launch(kind: str, grid: tuple, args: tuple, cfg: tuple, dtype: torch.dtype) -> None:
    bm, bn, warps, stages = cfg
    KERNELS[kind][grid](*args, HEAD_DIM=args[0].shape[-1], BLOCK_M=bm, BLOCK_N=bn,
                        DOT_PRECISION=_dot_precision(dtype), num_warps=warps, num_stages=stages)


def _check(q, k, v, cu_seqlens, window) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"window_attention wants q, k, v of one shape (B, H, T, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"window_attention wants q, k, v all bf16, fp16 or fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"window_attention supports head dim D in {HEAD_DIMS}; got D={q.shape[-1]}")
    if not (q.device == k.device == v.device == cu_seqlens.device):
        raise ValueError(f"q, k, v, cu_seqlens on different devices: {q.device}, {k.device}, {v.device}, "
                         f"{cu_seqlens.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.dtype != torch.int32 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be int32 of shape (n_docs + 1,) with n_docs >= 1 (0 first, T last); "
                         f"got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1; got {window!r}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("window_attention on CPU tensors runs only in the Triton interpreter. "
                           "HINT: set TRITON_INTERPRET=1 before importing tritonrun.kernels.window_attention")


def _forward(q, k, v, cu_seqlens, window: int, scale: float):
    B, H, T, D = q.shape
    window = min(window, max(T, 1))  # the same mask (i - j <= T - 1), and the kernels' int32 stays int32
    o = _heads_view(B, H, T, D, q.dtype, q.device)
    lse = _new_output((B, H, T), torch.float32, q.device)
    if T == 0 or B * H == 0:
        return o, lse
    cfg = config("fwd", D, q.dtype, q.device)
    ranges = kv_block_ranges(cu_seqlens, T, window, cfg[0], cfg[1])
    args = (q, k, v, o, lse, doc_starts(cu_seqlens, T), ranges,
            *q.stride(), *k.stride(), *v.stride(), *o.stride(), H, T, window, scale * LOG2E)
    _launch("fwd", (triton.cdiv(T, cfg[0]), B * H), args, cfg, q.dtype)
    return o, lse


def _backward(do, q, k, v, o, lse, cu_seqlens, window: int, scale: float):
    B, H, T, D = q.shape
    window = min(window, max(T, 1))
    dq = _heads_view(B, H, T, D, q.dtype, q.device)
    dk = _heads_view(B, H, T, D, q.dtype, q.device)
    dv = _heads_view(B, H, T, D, q.dtype, q.device)
    if T == 0 or B * H == 0:
        return dq, dk, dv
    do = do.to(q.dtype)
    delta = _new_output((B, H, T), torch.float32, q.device)
    _attn_bwd_delta[(triton.cdiv(T, DELTA_BLOCK), B * H)](
        o, do, delta, *o.stride(), *do.stride(), H, T, HEAD_DIM=D, BLOCK=DELTA_BLOCK)
    starts = doc_starts(cu_seqlens, T)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    tail = (H, T, window, scale * LOG2E, scale)
    cfg = config("bwd_dkdv", D, q.dtype, q.device)
    ranges = q_block_ranges(cu_seqlens, T, window, cfg[0], cfg[1])
    _launch("bwd_dkdv", (triton.cdiv(T, cfg[1]), B * H),
            (q, k, v, do, lse, delta, dk, dv, starts, ranges, *common, *dk.stride(), *dv.stride(), *tail), cfg,
            q.dtype)
    cfg = config("bwd_dq", D, q.dtype, q.device)
    ranges = kv_block_ranges(cu_seqlens, T, window, cfg[0], cfg[1])
    _launch("bwd_dq", (triton.cdiv(T, cfg[0]), B * H),
            (q, k, v, do, lse, delta, dq, starts, ranges, *common, *dq.stride(), *tail), cfg, q.dtype)
    return dq, dk, dv


# ------------------------------------------------------------------- custom ops (torch.compile-able)
@torch.library.custom_op("tritonrun::window_attention", mutates_args=())
def window_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window: int, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (B, H, T, D) in q's dtype (a view of (B, T, H, D) memory), lse (B, H, T) fp32."""
    _check(q, k, v, cu_seqlens, window)
    return _forward(q, k, v, cu_seqlens, window, scale)


@window_attention_op.register_fake
def _(q, k, v, cu_seqlens, window, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("tritonrun::window_attention_backward", mutates_args=())
def window_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: torch.Tensor, window: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, H, T, D) in q's dtype, views of (B, T, H, D) memory."""
    return _backward(do, q, k, v, o, lse, cu_seqlens, window, scale)


@window_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, window, scale):
    B, H, T, D = q.shape
    return tuple(q.new_empty((B, T, H, D)).transpose(1, 2) for _ in range(3))


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, window, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.window, ctx.scale = window, scale
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = window_attention_backward_op(do, q, k, v, o, lse, cu_seqlens, ctx.window, ctx.scale)
    return dq, dk, dv, None, None, None


window_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, window: int,
                     scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + document/sliding-window mask) v on (B, H, T, D) tensors of any strides: query i
    attends key j iff both lie in the same document of `cu_seqlens` and 0 <= i - j < window. scale defaults
    to 1/sqrt(D). Differentiable (deterministic block-sparse FlashAttention-2 backward)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return window_attention_op(q, k, v, cu_seqlens, int(window), float(scale))[0]


# --------------------------------------------------------------------------------------- reference
def window_mask(cu_seqlens: torch.Tensor, T: int, window: int) -> torch.Tensor:
    """(T, T) bool: mask[i, j] = same document and 0 <= i - j < window."""
    pos = torch.arange(T, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens.long(), pos, right=True)
    diff = pos[:, None] - pos[None, :]
    return (doc[:, None] == doc[None, :]) & (diff >= 0) & (diff < window)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               window: int, scale: float | None = None) -> torch.Tensor:
    """The plain math in the inputs' dtype (fp64 for the tests' reference), materializing the (T, T) scores
    and the dense mask: for tests and small T."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~window_mask(cu_seqlens, T, window), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


# --------------------------------------------------------------------------------------- cost
def allowed_pairs(doc_lengths: list[int], window: int) -> int:
    """Number of allowed (i, j) pairs: per document of length L, sum_i min(i + 1, window)."""
    total = 0
    for n in doc_lengths:
        w = min(n, window)
        total += w * (w + 1) // 2 + (n - w) * window
    return total


def window_attention_flops(B: int, H: int, doc_lengths: list[int], D: int, window: int, mode: str = "fwd") -> float:
    """Model FLOPs the benchmark divides by: 4*D per allowed pair forward (QK^T, PV), bwd 2.5x, fwd_bwd 3.5x
    (kernels.attention.attention_flops's convention; dense causal = T^2 / 2 pairs there)."""
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"mode must be one of {sorted(factor)}; got {mode!r}")
    return 4.0 * B * H * D * allowed_pairs(doc_lengths, window) * factor[mode]


def executed_tiles(cu_seqlens: torch.Tensor, T: int, window: int, block_m: int, block_n: int,
                   kind: str = "fwd") -> int:
    """Tiles (block_m x block_n score blocks) one (b, h) executes in kernel `kind`: the sum of hi - lo."""
    fn = q_block_ranges if kind == "bwd_dkdv" else kv_block_ranges
    r = fn(cu_seqlens, T, window, block_m, block_n)
    return int((r[:, 3] - r[:, 0]).sum())


def executed_flops(cu_seqlens: torch.Tensor, T: int, window: int, D: int, configs: dict) -> dict[str, float]:
    """FLOPs per (b, h) this code executes, per kernel: fwd 2 matmuls, bwd_dkdv 4, bwd_dq 3 per tile;
    `configs[kind]` = (BLOCK_M, BLOCK_N, ...)."""
    matmuls = {"fwd": 2, "bwd_dkdv": 4, "bwd_dq": 3}
    return {kind: 2.0 * n * D * configs[kind][0] * configs[kind][1] *
            executed_tiles(cu_seqlens, T, window, configs[kind][0], configs[kind][1], kind)
            for kind, n in matmuls.items()}


if __name__ == "__main__":
    # python -m tritonrun.kernels.window_attention [T] [WINDOW]: the FLOPs arithmetic of the docstring (sm_89, D = 128,
    # one document), per token per head.
    import sys

    T = int(sys.argv[1]) if len(sys.argv) > 1 else 65_536
    window = int(sys.argv[2]) if len(sys.argv) > 2 else 1_792
    D = 128
    cu = torch.tensor([0, T], dtype=torch.int32)
    dense = 4 * D * T * T / 2 / T
    model = window_attention_flops(1, 1, [T], D, window) / T
    done = executed_flops(cu, T, window, D, {k: CONFIGS["sm_89"][k][D] for k in KERNELS})
    print(f"T={T} window={window} D={D}, FLOPs per token per head")
    print(f"  dense causal fwd (T^2/2 pairs):     {dense:14,.0f}")
    print(f"  window fwd, allowed pairs:          {model:14,.0f}   {dense / model:6.1f}x fewer "
          f"(mean keys {model / (4 * D):,.1f})")
    for kind, f in done.items():
        per = f / T
        keys = per / ({"fwd": 4, "bwd_dkdv": 8, "bwd_dq": 6}[kind] * D)
        print(f"  executed {kind:<9} tiles {str(CONFIGS['sm_89'][kind][D][:2]):>10}: {per:14,.0f}   "
              f"mean keys per query {keys:,.1f}: {T / 2 / keys:5.1f}x fewer than dense causal's T/2")
