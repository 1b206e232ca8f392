"""Fused causal attention, FlashAttention-2 style: forward + backward in Triton, any T, fits Ada.

    o = softmax(q @ k^T * scale + causal_mask) @ v           q, k, v, o: (B, H, T, D)

Layouts. q, k, v may have any strides (every kernel takes all four strides of every tensor), so the
model's transposed views of the c_attn output, (B, T, 3C) -> (B, H, T, D), are read in place: no copy.
o, dq, dk, dv are allocated as (B, T, H, D) memory returned as (B, H, T, D) views (`_heads_view`):
the model's `y.transpose(1, 2).contiguous().view(B, T, C)` is then free, and so is autograd's
transpose back from dq/dk/dv into the (B, T, 3C) gradient of c_attn. The logsumexp `lse` and the
backward's `delta` are (B, H, T) fp32.

Precision. q, k, v are loaded in their storage dtype (bf16, fp16 or fp32) and every tl.dot
accumulates in fp32; the softmax statistics (running max, running sum, lse, delta) are fp32. The
probabilities are cast to the input dtype before the P@V and dS@K products (`p.to(v.dtype)`, never
a hard-coded fp16), as FlashAttention does. fp32 inputs use input_precision="ieee" (exact fp32, for
tests; no tensor cores); 16-bit inputs use the tensor cores (mma.sync on sm_80/sm_89, wgmma on
sm_90). Exponentials are exp2 with
log2(e) folded into the score scale: p = exp2(s * scale * log2e - m).

Algorithm (FlashAttention-2).
  forward   grid (T / BLOCK_M, B*H). One program owns BLOCK_M query rows and streams key blocks,
            keeping the running max m, running sum l and the unnormalized accumulator in registers
            (online softmax). Stage 1 walks the key blocks strictly below the diagonal, unmasked;
            stage 2 walks the diagonal block(s) with the causal mask. Blocks entirely above the
            diagonal are never visited (loop bounds). Saves lse = m + log(l) per row (natural log).
  backward  three kernels, no atomics, so it is deterministic (bitwise run to run):
            1. delta = rowsum(dO * O)                  grid (T / BLOCK, B*H)
            2. dK, dV: parallel over key blocks        grid (T / BLOCK_N, B*H); each program walks the
               query blocks at and below its diagonal, recomputing P = exp2(s*scale*log2e - lse*log2e),
               dV += P^T dO, dS = P * (dO V^T - delta), dK += dS^T Q.
            3. dQ: parallel over query blocks          grid (T / BLOCK_M, B*H); walks the key blocks at
               and left of its diagonal, dQ += dS K.
            Every program owns its output rows exclusively (no atomics, no partial buffers); S and P
            are recomputed in both kernels, the price of that.

Any T. Query rows and key rows past T are masked on load (zeros) and on store. Padded query rows
in the dK/dV kernel load lse = +inf, which makes their P exactly 0, so no extra select is needed.

Cost per (b, h), causal (half of the T x T score matrix; the FlashAttention benchmark convention):
  FLOPs  forward: 2 matmuls, 4*T*T*D / 2. Backward, counted as FA2 counts it: 5 matmuls (2.5x the
         forward); this scheme executes 7 (S and dP are recomputed in both the dK/dV and the dQ
         kernel, 3.5x the forward), the price of no atomics. `attention_flops` gives the counted FLOPs.
  bytes  forward: q, o once, k and v once per query block (T / BLOCK_M re-reads, mostly L2 hits),
         lse 4*T. Backward: k, v, dk, dv once and q, dO, lse, delta once per key block (dK/dV kernel);
         q, dO, dq once and k, v once per query block (dQ kernel); delta pass reads o, dO once.

Configs. `CONFIGS[arch][kernel][D] = (BLOCK_M, BLOCK_N, num_warps, num_stages)` is the per-
architecture table; `TUNE_SPACE` is the small pruned autotune space (the table entry is its first
member). tests/test_attention.py::test_sm89_configs_fit compiles every entry for sm_89 (and sm_80,
sm_90) and checks shared memory against the per-block limit and ptxas's spill count. Under the
interpreter (TRITON_INTERPRET=1) `INTERPRETER_CONFIG` is used: small blocks, BLOCK_M != BLOCK_N, so
short test sequences still cross block boundaries and the diagonal spans several sub-blocks.
On a GPU the autotuner (key: T bucket, D, dtype; results cached on disk by Triton) picks from
TUNE_SPACE; TRITONRUN_AUTOTUNE=0 (tritonrun/kernels/tune.py) uses the table entry directly. Under CUDA-graph capture
nothing is timed: a key tuned earlier in the process reuses its pick, any other runs the table entry.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from tritonrun.kernels.target import arch_key
from tritonrun.kernels.tune import autotune_enabled, pick_unless_capturing

# The kernels spell these two as literals (@triton.jit code cannot read plain Python globals).
LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2):   log(x) = log2(x) * LN2

HEAD_DIMS = (32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# --------------------------------------------------------------------------------------- configs
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per architecture, kernel and head dim, for 16-bit inputs.
# fwd and bwd_dq need BLOCK_M % BLOCK_N == 0; bwd_dkdv needs BLOCK_N % BLOCK_M == 0 (the diagonal
# block is walked in sub-blocks of the smaller size). Shared memory per block: sm_80 166,912 B,
# sm_89 101,376 B, sm_90 232,448 B (test_sm89_configs_fit compiles them all and checks, plus spills).
# Not timed (built without a GPU): FA2 / Triton-tutorial-shaped candidates were compiled for each arch
# and only spill-free ones that fit were kept, under both Triton 3.6 (torch 2.11's) and 3.9, whose
# ptxas differ by a few registers at the 255 limit; the autotuner picks among them on the real GPU.
SHARED_LIMIT = {"sm_80": 166_912, "sm_89": 101_376, "sm_90": 232_448}

CONFIGS: dict[str, dict[str, dict[int, tuple[int, int, int, int]]]] = {
    "sm_80": {
        "fwd": {32: (128, 64, 8, 3), 64: (128, 64, 8, 4), 128: (128, 64, 8, 2)},
        "bwd_dkdv": {32: (32, 128, 8, 4), 64: (32, 128, 8, 4), 128: (32, 64, 8, 3)},
        "bwd_dq": {32: (128, 32, 8, 4), 64: (128, 32, 8, 4), 128: (64, 32, 8, 3)},
    },
    "sm_89": {
        "fwd": {32: (128, 64, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 2)},
        "bwd_dkdv": {32: (32, 128, 8, 3), 64: (32, 128, 8, 2), 128: (32, 64, 8, 2)},
        "bwd_dq": {32: (128, 32, 8, 3), 64: (128, 32, 8, 3), 128: (64, 32, 8, 2)},
    },
    "sm_90": {
        "fwd": {32: (128, 64, 8, 3), 64: (128, 64, 8, 4), 128: (128, 64, 8, 3)},
        "bwd_dkdv": {32: (32, 128, 8, 4), 64: (32, 128, 8, 4), 128: (32, 64, 8, 3)},
        "bwd_dq": {32: (128, 32, 8, 4), 64: (128, 32, 8, 4), 128: (64, 32, 8, 3)},
    },
}

# The pruned autotune space: the table entry first, then 1-3 neighbours that also compile without
# spills (smaller tiles / fewer warps: more blocks per SM; bigger tiles: fewer re-reads).
TUNE_SPACE: dict[str, dict[str, dict[int, list[tuple[int, int, int, int]]]]] = {
    "sm_80": {
        "fwd": {32: [(128, 64, 8, 3), (64, 64, 4, 3)],
                64: [(128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 3)],
                128: [(128, 64, 8, 2), (64, 32, 4, 3)]},
        "bwd_dkdv": {32: [(32, 128, 8, 4), (32, 64, 4, 4)],
                     64: [(32, 128, 8, 4), (32, 64, 4, 4), (16, 128, 8, 4)],
                     128: [(32, 64, 8, 3), (16, 128, 8, 2)]},
        "bwd_dq": {32: [(128, 32, 8, 4), (64, 32, 4, 4)],
                   64: [(128, 32, 8, 4), (64, 32, 4, 4), (64, 32, 8, 4)],
                   128: [(64, 32, 8, 3), (64, 16, 4, 3)]},
    },
    "sm_89": {
        "fwd": {32: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 3)],
                64: [(128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (128, 128, 8, 3)],
                128: [(128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 8, 3), (64, 32, 4, 3)]},
        "bwd_dkdv": {32: [(32, 128, 8, 3), (32, 64, 4, 3), (64, 128, 8, 3)],
                     64: [(32, 128, 8, 2), (32, 64, 4, 3), (16, 128, 8, 3)],
                     128: [(32, 64, 8, 2), (32, 64, 8, 3), (16, 64, 8, 2)]},
        "bwd_dq": {32: [(128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 3)],
                   64: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 32, 8, 3)],
                   128: [(64, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2)]},
    },
    "sm_90": {
        "fwd": {32: [(128, 64, 8, 3), (128, 128, 8, 3)],
                64: [(128, 64, 8, 4), (128, 64, 4, 3), (128, 128, 8, 3)],
                128: [(128, 64, 8, 3), (128, 128, 8, 2)]},
        "bwd_dkdv": {32: [(32, 128, 8, 4), (64, 128, 8, 3)],
                     64: [(32, 128, 8, 4), (64, 128, 8, 3), (32, 64, 4, 4)],
                     128: [(32, 64, 8, 3), (32, 128, 8, 2)]},
        "bwd_dq": {32: [(128, 32, 8, 4), (128, 64, 8, 3)],
                   64: [(128, 32, 8, 4), (128, 64, 8, 3), (64, 32, 4, 4)],
                   128: [(64, 32, 8, 3), (128, 64, 8, 2)]},
    },
}

# fp32 inputs (tests and debugging only) on a GPU: one tiny config for every arch and D. ieee fp32
# dots run on FMA units, not tensor cores, and their operand layouts cost far more registers: the
# 16-bit tables spill by kilobytes in fp32; these tiles compile spill-free on sm_80/89/90 at D=128.
FP32_CONFIG = {"fwd": (16, 16, 4, 2), "bwd_dkdv": (16, 16, 8, 2), "bwd_dq": (16, 16, 2, 2)}

# Under TRITON_INTERPRET=1 (CPU tests): small, unequal blocks so T=17 already spans two key blocks.
INTERPRETER_CONFIG = {"fwd": (32, 16, 4, 1), "bwd_dkdv": (16, 32, 4, 1), "bwd_dq": (32, 16, 4, 1)}

DELTA_BLOCK = 64  # rows per program of the delta preprocess (memory bound, any size works)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------- kernels
@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,  # running state and the (BLOCK_M, D) query tile
    K, V, stride_kt, stride_kd, stride_vt, stride_vd,  # this head's K, V, (T, D)
    offs_m, T, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Online softmax over key blocks [lo, hi). CAUSAL: the block straddles the diagonal (and maybe
    T), so keys are masked on load and scores above the diagonal become -inf."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        kpos = start_n + offs_n
        kT_ptrs = K + offs_d[:, None] * stride_kd + kpos[None, :] * stride_kt  # (D, BLOCK_N)
        v_ptrs = V + kpos[:, None] * stride_vt + offs_d[None, :] * stride_vd  # (BLOCK_N, D)
        if CAUSAL:
            kT = tl.load(kT_ptrs, mask=kpos[None, :] < T, other=0.0)
            v = tl.load(v_ptrs, mask=kpos[:, None] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32, unscaled
        if CAUSAL:
            s = tl.where(offs_m[:, None] >= kpos[None, :], s, float("-inf"))
        # Every row has a finite score in the first block it sees (key start_m <= row), so m_new is
        # finite and -inf entries give exp2(-inf) = 0.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 units
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # rescale of the old state; 0 on the first block
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V,  # (B, H, T, D) any strides, storage dtype
    O,  # (B, H, T, D) any strides, storage dtype (written)
    LSE,  # (B*H, T) fp32 contiguous (written): natural-log logsumexp of the scaled scores
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    H, T, qk_scale,  # qk_scale = scale * log2(e)
    T_BUCKET,  # autotune key only (next power of two of T)
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # FLOPs 4*BLOCK_M*D per visited key; bytes: q tile once, k/v tiles per key block, o tile once.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    LSE += pid_bh.to(tl.int64) * T

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Stage 1: key blocks strictly left of the diagonal block: all visible, all < T, no masks.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, T, qk_scale, 0, start_m,
                               HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    # Stage 2: the diagonal block, in BLOCK_N sub-blocks, causal-masked; stops at T.
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, T, qk_scale, start_m, tl.minimum(start_m + BLOCK_M, T),
                               HEAD_DIM, BLOCK_N, True, DOT_PRECISION)

    o = acc / l_i[:, None]
    tl.store(O + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od, o.to(O.dtype.element_ty),
             mask=row_ok[:, None])
    tl.store(LSE + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453, mask=row_ok)


@triton.jit
def _attn_bwd_delta(
    O, DO,  # (B, H, T, D) any strides, storage dtype
    DELTA,  # (B*H, T) fp32 contiguous (written): rowsum(dO * O)
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    H, T,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr,
):
    # Memory bound: reads o and dO once (2*T*D*itemsize), writes T*4 bytes; 2*T*D FLOPs.
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=row_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * T + offs_m, delta, mask=row_ok)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v,  # fp32 accumulators and the (BLOCK_N, D) key/value tiles of this program
    Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, T, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK, dV over query blocks [lo, hi). Works on transposed scores (keys x queries) so
    that no tile needs an explicit transpose before the dK/dV products."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_m in range(lo, hi, BLOCK_M):
        qpos = start_m + offs_m
        q_ok = qpos < T
        qT = tl.load(Q + offs_d[:, None] * stride_qd + qpos[None, :] * stride_qt, mask=q_ok[None, :], other=0.0)
        do = tl.load(DO + qpos[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=q_ok[:, None], other=0.0)
        # Padded query rows: lse = +inf makes their probabilities exactly 0.
        lse2 = tl.load(LSE + qpos, mask=q_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + qpos, mask=q_ok, other=0.0)
        sT = tl.dot(k, qT, input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        pT = tl.math.exp2(sT * qk_scale - lse2[None, :])
        if CAUSAL:
            pT = tl.where(qpos[None, :] >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)  # (BLOCK_N, BLOCK_M)
        dsT = pT * (dpT - delta[None, :])  # gradient w.r.t. the scaled scores
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO,  # (B, H, T, D) any strides, storage dtype
    LSE, DELTA,  # (B*H, T) fp32 contiguous
    DK, DV,  # (B, H, T, D) any strides, storage dtype (written)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    H, T, qk_scale, sm_scale,
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # FLOPs 8*BLOCK_N*D per visited query (4 matmuls); bytes: k, v tiles once, q/dO tiles per query
    # block at or below the diagonal, dk, dv tiles once.
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

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < T
    k = tl.load(K + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=key_ok[:, None], other=0.0)
    v = tl.load(V + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=key_ok[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    # The diagonal block: queries [start_n, start_n + BLOCK_N) in BLOCK_M sub-blocks, causal-masked.
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, T, qk_scale, start_n, tl.minimum(start_n + BLOCK_N, T),
                         HEAD_DIM, BLOCK_M, True, DOT_PRECISION)
    # Queries strictly below the diagonal block see every key of this block; only T is masked.
    dk, dv = _dkdv_inner(dk, dv, k, v, Q, DO, LSE, DELTA, stride_qt, stride_qd, stride_dot, stride_dod,
                         offs_n, T, qk_scale, start_n + BLOCK_N, T,
                         HEAD_DIM, BLOCK_M, False, DOT_PRECISION)
    dk = dk * sm_scale
    tl.store(DK + offs_n[:, None] * stride_dkt + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=key_ok[:, None])
    tl.store(DV + offs_n[:, None] * stride_dvt + offs_d[None, :] * stride_dvd, dv.to(DV.dtype.element_ty),
             mask=key_ok[:, None])


@triton.jit
def _dq_inner(
    dq, q, do, lse2, delta,  # fp32 accumulator, this program's query tiles and row statistics
    K, V, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, T, qk_scale, lo, hi,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ over key blocks [lo, hi)."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        kpos = start_n + offs_n
        kT_ptrs = K + offs_d[:, None] * stride_kd + kpos[None, :] * stride_kt  # (D, BLOCK_N)
        vT_ptrs = V + offs_d[:, None] * stride_vd + kpos[None, :] * stride_vt  # (D, BLOCK_N)
        if CAUSAL:
            kT = tl.load(kT_ptrs, mask=kpos[None, :] < T, other=0.0)
            vT = tl.load(vT_ptrs, mask=kpos[None, :] < T, other=0.0)
        else:
            kT = tl.load(kT_ptrs)
            vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N)
        p = tl.math.exp2(s * qk_scale - lse2[:, None])
        if CAUSAL:
            p = tl.where(offs_m[:, None] >= kpos[None, :], p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO,  # (B, H, T, D) any strides, storage dtype
    LSE, DELTA,  # (B*H, T) fp32 contiguous
    DQ,  # (B, H, T, D) any strides, storage dtype (written)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    H, T, qk_scale, sm_scale,
    T_BUCKET,  # autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # FLOPs 6*BLOCK_M*D per visited key (3 matmuls); bytes: q, dO tiles once, k/v tiles per key block.
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

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=row_ok[:, None], other=0.0)
    lse2 = tl.load(LSE + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + offs_m, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Key blocks strictly left of the diagonal block: unmasked.
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, T, qk_scale, 0, start_m, HEAD_DIM, BLOCK_N, False, DOT_PRECISION)
    # The diagonal block, causal-masked, stopping at T.
    dq = _dq_inner(dq, q, do, lse2, delta, K, V, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, T, qk_scale, start_m, tl.minimum(start_m + BLOCK_M, T),
                   HEAD_DIM, BLOCK_N, True, DOT_PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + offs_m[:, None] * stride_dqt + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None])


KERNELS = {"fwd": _attn_fwd, "bwd_dkdv": _attn_bwd_dkdv, "bwd_dq": _attn_bwd_dq}

# --------------------------------------------------------------------------------------- launchers


def _new_output(shape, dtype, device) -> torch.Tensor:
    """Every buffer the op writes is allocated here (tests monkeypatch it to NaN-fill)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _heads_view(B: int, H: int, T: int, D: int, dtype, device) -> torch.Tensor:
    """A (B, H, T, D) view of (B, T, H, D) memory: what the model's `transpose(1, 2).contiguous()`
    and autograd's transpose back into the c_attn gradient want, so both become free."""
    return _new_output((B, T, H, D), dtype, device).transpose(1, 2)


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit dots


def _t_bucket(T: int) -> int:
    return max(16, triton.next_power_of_2(T))


def _table_config(kind: str, D: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    if _interpreting():
        return INTERPRETER_CONFIG[kind]
    if dtype == torch.float32:
        return FP32_CONFIG[kind]
    return CONFIGS[arch_key(torch.cuda.get_device_capability(device))][kind][D]


_TUNERS: dict[tuple[str, str, int], object] = {}  # (kind, arch, D) -> triton Autotuner


def drop_spilling(kind: str):
    """triton.autotune's early_config_prune for KERNELS[kind]: compile each candidate for this GPU (warmup: no
    launch) and drop those that spill registers (the compiled kernel's n_spills, this GPU's ptxas), before any is
    timed. Best effort: a candidate it cannot probe stays, and when every one spills all stay (the timing picks)."""
    def prune(configs, named_args, **kwargs):
        if len(configs) < 2:
            return configs
        keep = []
        for cfg in configs:
            try:
                kernel = KERNELS[kind].warmup(**named_args, **kwargs, **cfg.all_kwargs(), grid=(1,))
                kernel._init_handles()  # loads the binary: n_spills is read there
                spills = int(getattr(kernel, "n_spills", 0) or 0)
            except Exception:  # noqa: BLE001 - probing only; the autotuner reports a real failure itself
                spills = 0
            if not spills:
                keep.append(cfg)
        return keep or configs
    return prune


def _autotuned(kind: str, arch: str, D: int):
    if (kind, arch, D) not in _TUNERS:
        configs = [
            triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for (m, n, w, s) in TUNE_SPACE[arch][kind][D]
        ]
        _TUNERS[kind, arch, D] = triton.autotune(configs=configs, key=["T_BUCKET", "HEAD_DIM"], cache_results=True,
                                                 prune_configs_by={"early_config_prune": drop_spilling(kind)}
                                                 )(KERNELS[kind])
    return _TUNERS[kind, arch, D]


def tuning_decisions() -> list[dict]:
    """The autotuner's picks in this process (measured now or read from Triton's cache): kernel, arch, D, the
    tuning key (T bucket, D, argument dtypes) and the config as (BLOCK_M, BLOCK_N, num_warps, num_stages)."""
    out = []
    for (kind, arch, D), tuner in _TUNERS.items():
        for key, cfg in getattr(tuner, "cache", {}).items():
            out.append({"kernel": kind, "arch": arch, "D": D, "key": [str(k) for k in key],
                        "config": [cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages]})
    return out


def _picked(tuner) -> set:
    """The (T bucket, dtype) keys `tuner` has already picked a config for in this process (its in-memory cache
    holds them, so launching it again for one of them times nothing)."""
    if not hasattr(tuner, "tritonrun_picked"):
        tuner.tritonrun_picked = set()
    return tuner.tritonrun_picked


def _launch(kind: str, grid_of, args: tuple, D: int, dtype: torch.dtype, device: torch.device) -> None:
    """Run KERNELS[kind] with the interpreter config, the table config, or the autotuner.
    `grid_of(BLOCK_M, BLOCK_N)` gives the grid. While a CUDA graph is captured the autotuner runs only for a
    key it already tuned in this process; otherwise the table's config (tritonrun/kernels/tune.py pick_unless_capturing,
    the policy cross-entropy follows too): triton.autotune would time every candidate inside the capture."""
    prec = _dot_precision(dtype)
    if dtype != torch.float32 and autotune_enabled():
        arch = arch_key(torch.cuda.get_device_capability(device))
        tuner = _autotuned(kind, arch, D)
        key = (args[-1], str(dtype))  # T_BUCKET (each kernel's last runtime argument) and dtype: what it tunes by
        how = pick_unless_capturing(device, "autotuner" if key in _picked(tuner) else None, "table",
                                    lambda: "autotuner")
        if how == "autotuner":
            tuner[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, HEAD_DIM=D, DOT_PRECISION=prec)
            _picked(tuner).add(key)
            return
    bm, bn, warps, stages = _table_config(kind, D, dtype, device)
    KERNELS[kind][grid_of(bm, bn)](*args, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=prec,
                                   num_warps=warps, num_stages=stages)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"causal_attention wants q, k, v of one shape (B, H, T, D); got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"causal_attention wants q, k, v all bf16, fp16 or fp32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"causal_attention supports head dim D in {HEAD_DIMS}; got D={q.shape[-1]}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v on different devices: {q.device}, {k.device}, {v.device}")
    if q.device.type != "cuda" and not _interpreting():
        raise RuntimeError("causal_attention on CPU tensors runs only in the Triton interpreter. "
                           "HINT: set TRITON_INTERPRET=1 before importing tritonrun.kernels.attention")


def _forward(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    o = _heads_view(B, H, T, D, q.dtype, q.device)
    lse = _new_output((B, H, T), torch.float32, q.device)
    if T == 0 or B * H == 0:
        return o, lse
    args = (q, k, v, o, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(o),
            H, T, scale * LOG2E, _t_bucket(T))
    _launch("fwd", lambda bm, bn: (triton.cdiv(T, bm), B * H), args, D, q.dtype, q.device)
    return o, lse


def _backward(do, q, k, v, o, lse, scale: float):
    B, H, T, D = q.shape
    dq = _heads_view(B, H, T, D, q.dtype, q.device)
    dk = _heads_view(B, H, T, D, q.dtype, q.device)
    dv = _heads_view(B, H, T, D, q.dtype, q.device)
    if T == 0 or B * H == 0:
        return dq, dk, dv
    do = do.to(q.dtype)
    delta = _new_output((B, H, T), torch.float32, q.device)
    _attn_bwd_delta[(triton.cdiv(T, DELTA_BLOCK), B * H)](
        o, do, delta, *_strides(o), *_strides(do), H, T, HEAD_DIM=D, BLOCK=DELTA_BLOCK)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(do))
    tail = (H, T, scale * LOG2E, scale, _t_bucket(T))
    _launch("bwd_dkdv", lambda bm, bn: (triton.cdiv(T, bn), B * H),
            (q, k, v, do, lse, delta, dk, dv, *common, *_strides(dk), *_strides(dv), *tail), D, q.dtype, q.device)
    _launch("bwd_dq", lambda bm, bn: (triton.cdiv(T, bm), B * H),
            (q, k, v, do, lse, delta, dq, *common, *_strides(dq), *tail), D, q.dtype, q.device)
    return dq, dk, dv


# ------------------------------------------------------------------- custom ops (torch.compile-able)
@torch.library.custom_op("tritonrun::causal_attention", mutates_args=())
def causal_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse): o (B, H, T, D) in q's dtype (a view of (B, T, H, D) memory), lse (B, H, T) fp32."""
    _check(q, k, v)
    return _forward(q, k, v, scale)


@causal_attention_op.register_fake
def _(q, k, v, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("tritonrun::causal_attention_backward", mutates_args=())
def causal_attention_backward_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv), each (B, H, T, D) in q's dtype, views of (B, T, H, D) memory."""
    return _backward(do, q, k, v, o, lse, scale)


@causal_attention_backward_op.register_fake
def _(do, q, k, v, o, lse, scale):
    # What _backward allocates, in its order (a memory estimate under FakeTensorMode sees the peak inside the op):
    # dq, dk, dv, do in q's dtype when it differs, the fp32 delta rows (B, H, T).
    B, H, T, D = q.shape
    grads = tuple(q.new_empty((B, T, H, D)).transpose(1, 2) for _ in range(3))
    if T == 0 or B * H == 0:
        return grads
    do_cast = do.new_empty(do.shape, dtype=q.dtype) if do.dtype != q.dtype else None
    delta = q.new_empty((B, H, T), dtype=torch.float32)
    del do_cast, delta
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _autograd_backward(ctx, do, _dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = causal_attention_backward_op(do, q, k, v, o, lse, ctx.scale)
    return dq, dk, dv, None


causal_attention_op.register_autograd(_autograd_backward, setup_context=_setup_context)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale + causal mask) v on (B, H, T, D) tensors of any strides; scale defaults
    to 1/sqrt(D). Differentiable (FlashAttention-2 backward); traceable by torch.compile."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return causal_attention_op(q, k, v, float(scale))[0]


# --------------------------------------------------------------------------------------- reference
def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """The plain math, in the inputs' dtype (fp64 for the tests' reference): softmax(q k^T * scale
    + causal mask) v, materializing the (T, T) scores."""
    T, D = q.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def attention_flops(B: int, H: int, T: int, D: int, causal: bool = True, mode: str = "fwd") -> float:
    """FLOPs the benchmark divides by (FlashAttention's convention: causal = half of T x T).
    mode "fwd": 2 matmuls (QK^T, PV); "bwd": 5 (QK^T recomputed, dV, dP, dQ, dK) = 2.5x fwd;
    "fwd_bwd": 3.5x fwd."""
    fwd = 4.0 * B * H * T * T * D / (2.0 if causal else 1.0)
    factor = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
    if mode not in factor:
        raise ValueError(f"mode must be one of {sorted(factor)}; got {mode!r}")
    return fwd * factor[mode]


# ------------------------------------------------------------------ compile check (no GPU needed)
_POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ", "LSE", "DELTA"}
_FP32_POINTERS = {"LSE", "DELTA"}


def compile_stats(kind: str, D: int, config: tuple[int, int, int, int], arch: str = "sm_89",
                  dtype: str = "bf16") -> dict:
    """Compile KERNELS[kind] for `arch` without a GPU and report its resources.

    The signature mimics a real launch at T = 1024 on the model's layout: pointers and strides
    16-byte aligned / divisible by 16, the head-dim strides equal to 1 (Triton specializes them).
    Returns {"shared": bytes, "regs", "spill_stores", "spill_loads" (None without ptxas), "mma":
    the tensor-core instructions in the PTX}. Must run with TRITON_INTERPRET unset. The ptxas
    numbers are cached next to the compiled kernel in Triton's cache (same key, same kernel).
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritonrun.kernels.aot import cached_ptxas_stats, mma_instructions

    fn = KERNELS[kind]
    bm, bn, warps, stages = config
    constexprs = {"HEAD_DIM": D, "BLOCK_M": bm, "BLOCK_N": bn,
                  "DOT_PRECISION": _dot_precision(torch.float32 if dtype == "fp32" else torch.bfloat16)}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS:
            signature[name] = "*fp32" if name in _FP32_POINTERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.startswith("stride_") and name.endswith("d"):
            signature[name] = "constexpr"
            constexprs[name] = 1
        elif name in ("qk_scale", "sm_scale"):
            signature[name] = "fp32"
        else:  # strides, T, T_BUCKET are multiples of 16 at T = 1024; H = 12 is not
            signature[name] = "i32"
            if name != "H":
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                            target=GPUTarget("cuda", int(arch.removeprefix("sm_")), 32),
                            options={"num_warps": warps, "num_stages": stages})
    ptx = kernel.asm["ptx"]
    found = cached_ptxas_stats(kernel, int(arch.removeprefix("sm_")))
    return {"shared": kernel.metadata.shared, "regs": found["registers"], "spill_stores": found["spill_stores"],
            "spill_loads": found["spill_loads"], "mma": mma_instructions(ptx)}


def all_configs(arch: str, table_only: bool = False) -> list[tuple[str, int, tuple[int, int, int, int], str]]:
    """Every (kind, D, config, dtype) `arch` can launch: the table, the autotune space (unless
    table_only) and the fp32 fallback (at D = 128, its largest tiles)."""
    out = []
    for kind in KERNELS:
        for D in HEAD_DIMS:
            configs = [CONFIGS[arch][kind][D]] if table_only else [CONFIGS[arch][kind][D], *TUNE_SPACE[arch][kind][D]]
            out += [(kind, D, cfg, "bf16") for cfg in dict.fromkeys(configs)]
        out.append((kind, 128, FP32_CONFIG[kind], "fp32"))
    return out


def _compile_one(job: tuple) -> dict:
    arch, kind, D, cfg, dtype = job
    return {"arch": arch, "kind": kind, "D": D, "config": cfg, "dtype": dtype, "limit": SHARED_LIMIT[arch],
            **compile_stats(kind, D, cfg, arch, dtype)}


if __name__ == "__main__":
    # python -m tritonrun.kernels.attention [ARCH[:table] ...]: compile every config of each arch (":table": the
    # table and fp32 fallback only, no autotune space) without a GPU (TRITON_INTERPRET unset) and
    # print one JSON line per config. Default: every arch, everything.
    import json
    import sys
    from concurrent.futures import ProcessPoolExecutor

    specs = [a.partition(":") for a in sys.argv[1:]] or [(a, "", "") for a in CONFIGS]
    jobs = [(arch, *job) for arch, _, only in specs for job in all_configs(arch, table_only=only == "table")]
    with ProcessPoolExecutor(min(2, os.cpu_count() or 1)) as pool:
        for row in pool.map(_compile_one, jobs):
            print(json.dumps(row), flush=True)
