"""Fused LM head + cross-entropy: mean CE of (h @ weight[:vocab_size].T) without ever writing the logits.

    loss = mean over rows i with targets[i] != ignore_index of  lse_i - z_i[targets[i]],
    z_i = h_i @ weight[:vocab_size].T,   lse_i = log sum_v exp(z_iv)

Logit softcap (keyword softcap, default None; modded-nanogpt's speedrun caps its logits at 30):
    z_i = softcap * tanh((h_i @ weight[:vocab_size].T) / softcap),  d z / d z_raw = 1 - tanh^2
applied in fp32 to each recomputed logits tile, in the forward and in both backward kernels (the chain rule's
factor multiplies the dlogits tile before its gradient dot); still one online logsumexp, no logits in memory.
SOFTCAP is a tl.constexpr (0.0 for None), so softcap=None compiles exactly today's kernels (same code, same
registers) and each cap value its own variant. Costs N*V tanh (an exp2 and a division) per kernel.
The max: softcapped logits are bounded by softcap, so for softcap <= 32 the forward uses softcap as a fixed
logsumexp max (no running max, no rescaling of the running sum): each exp2 term is >= e^(-2 softcap) >= 2^-93,
a normal fp32 number, and <= 1, so the sum neither underflows nor overflows. Larger caps keep the running max
(e^(-2 softcap) would reach fp32's subnormals near softcap 44).

Layouts: h (N, C), weight (V_padded, C) (the tied wte; rows >= vocab_size are padding: never loaded,
never in the normalizer, exactly zero gradient), targets (N,) int64. The loss is a 0-d fp32 tensor.
h and weight share one dtype (fp32, fp16 or bf16; under autocast both are cast to the autocast dtype,
as F.linear would). Tiles are loaded in the storage dtype, multiplied with tl.dot in that dtype with an
fp32 accumulator (fp32 inputs: input_precision "ieee", exact fp32, no tf32), softmax math in fp32 base-2.

Algorithm (the Cut-Cross-Entropy trade: recompute the logits instead of storing them)
  forward   grid (row blocks, vocab splits). A program loops over its vocab blocks; each (BLOCK_N,
            BLOCK_V) logits tile is a K-loop of tl.dot(h tile, weight tile^T) kept in registers and folded
            into an online logsumexp (running max m, running sum s, exp2) and the target logit. Writes a
            partial lse and target logit per (split, row); the host combines the splits (logsumexp /
            sum over at most a few splits) and saves lse (N,) fp32 -- the only thing kept for backward.
  backward  dlogits = (softmax - onehot) * g/n_valid on valid rows (0 on ignored rows), recomputed tile
            by tile from h, weight and the saved lse. Two kernels, no atomics, fixed summation order:
    dh      persistent programs over (row block, vocab split) tiles; loop over the split's vocab
            blocks: recompute the tile, dh[rows, c] += dlogits @ weight[cols, c] chunk by chunk of C.
    dweight persistent programs over vocab blocks (all V_padded rows); loop over all row blocks:
            recompute the tile, dW[cols, c] += dlogits^T @ h[rows, c].
            The fp32 running sums of a tile live in a per-program scratch slot (BLOCK, C) fp32 that only
            that program touches (read-modify-write, ordered by a CTA barrier); the last step stores the
            output dtype. Scratch is programs x 64 x C x 4 B with the tables' tiles (below), independent
            of V and N. Vocab splits of dh (more programs when N is small) write fp32 partials (S, N, C)
            that the host sums in a fixed order. `backward_workspace` gives these shapes (the launcher
            sizes its buffers through the same _dh_plan / _dw_plan).
Scratch traffic (issue 24 d; N = 8x1024 and 64x1024 rows, C = 768, V = 50257, padded 50304)
  Per vocab step a dh program runs 2*BN*BV*C FLOPs of dlogits @ W plus 2*BN*BV*C of logits recompute and
  read-modify-writes its fp32 slot, BN*C*4*2 B: 4*BN*BV*C / (8*BN*C) = BV/2 FLOPs per scratch byte (BV/4
  counting the gradient dot alone), whatever BN. dW is the same with rows and columns swapped: BN/2. Per
  pass that is ceil(V/BV)*N*C*8 B for dh and ceil(N/BN)*V_padded*C*8 B for dW, against 4*N*V*C FLOPs each:
                      tiles  FLOP/B  scratch per pass (N 8K / 64K)  slots (46 / 132 SMs)
    before   128 x 128 both      64     19.8 GB / 158 GB             18 MB / 52 MB
    now      dh  64 x 256       128      9.9 GB / 79 GB               9 MB / 26 MB
             dW 256 x  64       128      9.9 GB / 79 GB               9 MB / 26 MB
  Ridge points (REFERENCE.md): RTX 4070 ~116 FLOP/B, H100 ~295. Before, each kernel was bandwidth-bound
  wherever its slots missed L2: at N = 8K a kernel's 1.26 TFLOP takes 21.7 ms on a 4070 at peak against
  39 ms for 19.8 GB at 504 GB/s (1.8x), and 1.3 ms on an H100 against 5.9 ms at 3.35 TB/s (4.6x) -- and
  there the 52 MB of slots, each touched every step, exceed the 50 MB L2, so they did miss. Now: on a 4070
  the kernels are compute-bound even if every scratch byte went to DRAM (128 > 116: 19.7 ms of traffic
  under 21.7 ms of math) and the 9 MB of slots sit well inside its 36 MB L2; on an H100/H200 the 26 MB of
  slots fit its L2, and the traffic (2.95 ms if it were all DRAM) halves, but 128 < 295: there the
  kernels stay compute-bound only as far as L2 serves ~6 TB/s (REFERENCE.md has no L2 bandwidth; a GPU
  record must tell). Other ways considered: a dh accumulator held in registers across the vocab loop (one
  C-chunk per pass, C/BLOCK_C = 12 logits recomputes: 13x the dh FLOPs), or two vocab blocks' dlogits
  held for one RMW (the 128 x 128 backward already takes 232-248 of 255 registers on sm_89: a second
  dlogits tile spills); the tall-skinny tiles give the same FLOPs per scratch byte as the latter with the
  register footprint of 128 x 128 (64 x 256 fp32 logits = 128 x 128), at the cost of half the weight-tile
  reuse in dh (h-tile reuse in dW), which stays in L2: the programs walk the vocab in step. The old
  128 x 128 tiles stay in TUNE_SPACE, so on a GPU the autotuner times both: `python bench/kernels.py --op
  cross_entropy --quick` records the ms of every candidate (the record's "autotune" field, cross_entropy
  dh/... and dw/... keys: 64x256 vs 128x128 side by side) and the cross_entropy triton "bwd" row (rows
  16384); that record confirms or refutes this on the GPU it runs on.

FLOPs (N rows, V = vocab_size, C width; `lce_flops`)
  forward 2NVC;  backward 8NVC = dh kernel (2NVC recompute + 2NVC dlogits@W)
                              + dW kernel (2NVC recompute + 2NVC dlogits^T@h);  total 10NVC executed
  (the model-FLOPs of a materialized version are 6NVC: the fused op spends 4NVC of recompute to avoid
  writing and re-reading N*V logits twice). Plus N*V exp2 in forward and 2*N*V in backward.
Bytes (e = element bytes, BN/BV the tiles; `lce_bytes`)
  compulsory (DRAM, each tensor once per kernel):
    forward   N*C*e + V*C*e + 12N                       (h, weight rows < V, targets, lse)
    backward  2*(N*C*e + V*C*e + 12N) + N*C*e + V_padded*C*e    (both kernels read all; write dh, dW)
  on chip (L2, tiles re-read; `lce_bytes(blocks=get_config(...))`):
    forward   ceil(N/BN)*V*C*e + ceil(V/BV)*N*C*e
    dh        2*ceil(N/BN)*V*C*e + ceil(V/BV)*N*C*e + 8*ceil(V/BV)*N*C   (last: fp32 scratch RMW)
    dW        2*ceil(V_padded/BV)*N*C*e + ceil(N/BN)*V_padded*C*e + 8*ceil(N/BN)*V_padded*C
  i.e. in dh BN FLOPs per weight-tile byte (each tile read twice) and BV/2 per scratch byte (see Scratch
  traffic above; `scratch_flops_per_byte`); dW the same with BN and BV swapped.
  A materialized fp32 path instead moves >= 4 passes over N*V*4 bytes (write logits, softmax read and
  write, grad read) and holds N*V*4 (3.3 GB at N = 16K): here the extra memory is lse (4N), the scratch
  slots (programs x 64 x C x 4, ~9 MB per kernel on a 46-SM GPU) and dh split partials (S x N x C x 4).
When the recompute pays (a roofline model, not a measurement: bench/kernels.py measures). torch.compile's path
  keeps bf16 logits and moves about 6 passes over N*V*2 bytes (write the logits, read them for the logsumexp,
  read them and write dlogits, read dlogits in each gradient GEMM). The 4NVC of recompute costs less than that
  traffic iff 4NVC/F < 12NV/BW, i.e. C < 3F/BW (F tensor FLOP/s, BW DRAM bytes/s, each at its achieved rate).
  At datasheet peaks 3F/BW is ~890 on an H100 SXM (989 TFLOPS, 3.35 TB/s): GPT-2's C = 768 is a predicted win.
  On an RTX 4070 it is ~350 (58.3 TFLOPS, 504 GB/s): a predicted loss of (4C/F - 12/BW) * N * V, ~12 ms per
  8 x 1024 micro-batch at peak rates (~5% of its step at 50% MFU), which the freed logits memory repays only
  if it buys a larger micro-batch. Where a GPU record shows the loss, --torch-ops linear_cross_entropy keeps
  the LM head in torch and the other kernels in Triton.

Configs: CONFIGS[arch] is the per-architecture table; on a GPU each kernel's tiles are autotuned on first
use per shape (tritonrun/kernels/tune.py: every TUNE_SPACE[arch][kernel] candidate timed on the real inputs, the pick
cached on disk; key: kernel, dtype, rows rounded up to a power of two, C, vocab, padded vocab, softcap), because grid
and buffers depend on the tiles (triton.autotune cannot size them). TRITONRUN_AUTOTUNE=0 runs the table;
fp32 inputs and the interpreter always do. `tuning_decisions()` lists the picks.

Ignored rows count neither in the numerator nor in n_valid. All rows ignored: the loss is nan (0/0,
exactly like F.cross_entropy(reduction="mean")) and both gradients are zero (also like torch).
Targets must be ignore_index or in [0, vocab_size); a target outside makes the loss nan (no host sync).

torch.compile: the op is `torch.ops.tritonrun.linear_cross_entropy` (custom_op + register_fake +
register_autograd; the backward is its own custom op), so dynamo/inductor trace through it.
Not built: a plain logits cross-entropy kernel for eval -- only worth it if a GPU measurement shows
F.cross_entropy on materialized eval logits is a bottleneck.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tritonrun.kernels.target import planned as planned_target
from tritonrun.kernels.tune import Tuner, autotune_enabled, ce_tiles, pick_unless_capturing

_LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)
_LN2 = tl.constexpr(0.6931471805599453)  # ln(2): ln(x) = log2(x) * LN2
# Largest softcap whose cap is the forward's fixed logsumexp max (see _lce_fwd_kernel); larger caps keep a running max
_FIXED_MAX_SOFTCAP = 32.0

# ------------------------------------------------------------------------------------------ configs
# Per-architecture tile shapes, as data. BLOCK_N rows x BLOCK_V vocab entries per logits tile, BLOCK_K the
# K step of the logits dot, BLOCK_C the width chunk of the gradient dots. programs_per_sm sizes the
# persistent backward grids (and their scratch); waves is how many programs per SM the forward / dh
# vocab splits aim for when there are too few row blocks. "fp32" overrides apply to fp32 inputs (twice
# the shared memory per tile, and exact fp32 FMA dots without tensor cores: the gradient dot's K extent,
# BLOCK_V for dh and BLOCK_N for dW, must stay small or ptxas spills; training runs bf16 under autocast).
# Every sm_89 entry is compiled for sm_89 in tests/test_cross_entropy.py (shared <= 101,376 B, no
# spills); `python -m tritonrun.kernels.cross_entropy sm_80|sm_89|sm_90 bfloat16|float32 [space]` prints the table
# (and the autotune space). All are compile-checked starting points (spill-free under Triton 3.6 and
# 3.9), not yet timed on a GPU; on one, the autotuner picks among TUNE_SPACE (below).
def _fwd_cfg(bn, bv, bk, warps, stages):
    return dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, num_warps=warps, num_stages=stages, waves=2)


def _bwd_cfg(bn, bv, bk, bc, warps, stages, programs_per_sm=1, dh=False):
    cfg = dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, BLOCK_C=bc, num_warps=warps, num_stages=stages)
    return {**cfg, **({"waves": 2} if dh else {}), "programs_per_sm": programs_per_sm}


_FP32_IEEE = {
    "fwd": dict(BLOCK_N=64, BLOCK_V=64, BLOCK_K=32, num_warps=8, num_stages=2),
    "dh": dict(BLOCK_N=64, BLOCK_V=32, BLOCK_K=32, BLOCK_C=32, num_warps=8, num_stages=2),
    "dw": dict(BLOCK_N=32, BLOCK_V=64, BLOCK_K=32, BLOCK_C=32, num_warps=8, num_stages=2),
}
# Backward tiles are tall-skinny by the scratch arithmetic in the module docstring: dh folds BLOCK_V vocab
# columns, dW folds BLOCK_N rows, into each fp32 scratch read-modify-write, so those are 256 and the other
# side 64 (FLOPs per scratch byte 128, scratch 64 x C x 4 B per program); 128 x 128 (64 FLOP/B, twice the
# scratch) stays in TUNE_SPACE for the autotuner to time against them.
CONFIGS: dict[str, dict[str, dict]] = {
    "sm_80": {  # A100: 163 KB shared per block
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=3, waves=2),
        # BLOCK_K 32 in the backward: at 64, Triton 3.6's ptxas spills 28-32 B (3.9's does not)
        "dh": _bwd_cfg(64, 256, 32, 64, 8, 3, dh=True),
        "dw": _bwd_cfg(256, 64, 32, 64, 8, 3),
        "fp32": _FP32_IEEE,
    },
    "sm_89": {  # Ada (RTX 40xx; also sm_86 and consumer Blackwell): 101,376 B shared per block
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=32, num_warps=8, num_stages=4, waves=2),
        # 2 stages: 81,920 B of shared memory (3 would need 114,688 B); 228 / 240 registers (softcap: 229 / 233)
        "dh": _bwd_cfg(64, 256, 32, 64, 8, 2, dh=True),
        "dw": _bwd_cfg(256, 64, 32, 64, 8, 2),
        "fp32": _FP32_IEEE,
    },
    "sm_90": {  # H100: 227 KB shared per block; tl.dot lowers to wgmma
        "fwd": dict(BLOCK_N=128, BLOCK_V=128, BLOCK_K=64, num_warps=8, num_stages=4, waves=2),
        "dh": _bwd_cfg(64, 256, 32, 64, 8, 3, dh=True),
        "dw": _bwd_cfg(256, 64, 32, 64, 8, 2),  # 3 stages: spills 8 B in the softcap variant
        "fp32": _FP32_IEEE,
    },
    # TRITON_INTERPRET=1 on CPU: numpy executes each tile op, so cost is per loop iteration -- the largest
    # tiles the interpreter allows (2^20 elements) keep a GPT-2 vocab (50304) to ~13 vocab steps. The
    # tests swap in 16/32-wide tiles so their small odd shapes cross many tile edges.
    "interpreter": {
        "fwd": dict(BLOCK_N=256, BLOCK_V=4096, BLOCK_K=64, num_warps=4, num_stages=1, waves=2),
        "dh": dict(BLOCK_N=256, BLOCK_V=4096, BLOCK_K=64, BLOCK_C=64, num_warps=4, num_stages=1,
                   waves=2, programs_per_sm=1),
        "dw": dict(BLOCK_N=256, BLOCK_V=4096, BLOCK_K=64, BLOCK_C=64, num_warps=4, num_stages=1,
                   programs_per_sm=1),
        "fp32": {},
    },
}
# The pruned autotune space (tritonrun/kernels/tune.py times each on the user's GPU and caches the pick): the table
# entry first, then neighbours that compile spill-free within the arch's shared memory under Triton 3.6
# and 3.9 (test_cross_entropy.py::test_sm89_configs_fit and test_ada.py compile every one). Smaller
# tiles / 4 warps: more programs per SM; a wider gradient reduction (BLOCK_V for dh, BLOCK_N for dW):
# fewer fp32 scratch read-modify-writes per FLOP; BLOCK_K 32 vs 64: pipeline depth vs shared memory.
TUNE_SPACE: dict[str, dict[str, list[dict]]] = {
    "sm_80": {
        "fwd": [CONFIGS["sm_80"]["fwd"], _fwd_cfg(128, 128, 32, 8, 4), _fwd_cfg(64, 128, 32, 4, 4),
                _fwd_cfg(64, 256, 32, 8, 3)],
        "dh": [CONFIGS["sm_80"]["dh"], _bwd_cfg(128, 128, 32, 64, 8, 3, dh=True),
               _bwd_cfg(64, 128, 32, 64, 4, 3, dh=True)],
        "dw": [CONFIGS["sm_80"]["dw"], _bwd_cfg(128, 128, 32, 64, 8, 3), _bwd_cfg(128, 64, 32, 64, 4, 3)],
    },
    "sm_89": {
        # (fwd 128x128 and 64x128 at BLOCK_K 64 spill 32-40 B under Triton 3.6's ptxas: left out)
        "fwd": [CONFIGS["sm_89"]["fwd"], _fwd_cfg(64, 128, 32, 4, 4), _fwd_cfg(64, 256, 32, 8, 3)],
        # (dh 128x128 and dW 128x128, 128x64 at BLOCK_K 64 spill 8-32 B in the softcap variant: left out)
        "dh": [CONFIGS["sm_89"]["dh"], _bwd_cfg(128, 128, 32, 64, 8, 3, dh=True),
               _bwd_cfg(64, 128, 32, 64, 4, 3, dh=True)],
        "dw": [CONFIGS["sm_89"]["dw"], _bwd_cfg(128, 128, 32, 64, 8, 3), _bwd_cfg(128, 64, 32, 64, 4, 3),
               _bwd_cfg(256, 64, 64, 64, 8, 2)],
    },
    "sm_90": {
        # (fwd 128x256 and dW 256x128, 256x64 at 3 stages spill 8-48 B in the softcap variant: left out)
        "fwd": [CONFIGS["sm_90"]["fwd"], _fwd_cfg(64, 256, 32, 8, 3), _fwd_cfg(128, 128, 32, 8, 4),
                _fwd_cfg(64, 128, 32, 4, 4)],
        "dh": [CONFIGS["sm_90"]["dh"], _bwd_cfg(128, 128, 64, 64, 8, 3, dh=True),
               _bwd_cfg(128, 128, 32, 64, 8, 3, dh=True), _bwd_cfg(64, 128, 32, 64, 4, 3, 2, dh=True)],
        "dw": [CONFIGS["sm_90"]["dw"], _bwd_cfg(128, 128, 64, 64, 8, 3), _bwd_cfg(128, 128, 32, 64, 8, 3),
               _bwd_cfg(128, 64, 32, 64, 4, 3, 2)],
    },
}
ARCH_SHARED_LIMIT = {"sm_80": 166_912, "sm_89": 101_376, "sm_90": 232_448}  # bytes per block (opt-in max)
_DH_PARTIAL_BYTES = 64 * 2**20  # memory cap for the dh vocab-split partials (S, N, C) fp32
_INTERPRET_SM_COUNT = 2  # the "SM count" the interpreter plans for: small, so splits and persistence loop


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def arch_key(device: torch.device) -> str:
    """CONFIGS key for `device`: the nearest tuned architecture (by shared memory per block)."""
    if device.type != "cuda" or _interpreting():
        return "interpreter"
    major, minor = torch.cuda.get_device_capability(device)
    if major >= 9 and major != 12:
        return "sm_90"  # Hopper and datacenter Blackwell: large shared memory
    if (major, minor) == (8, 0):
        return "sm_80"
    return "sm_89"  # sm_86/87/89, consumer Blackwell (12.x), and older parts: ~100 KB shared or less


def get_config(device: torch.device, dtype: torch.dtype, arch: str | None = None) -> dict[str, dict]:
    table = CONFIGS[arch or arch_key(device)]
    cfg = {k: dict(table[k]) for k in ("fwd", "dh", "dw")}
    if dtype == torch.float32:
        for k, over in table["fp32"].items():
            cfg[k].update(over)
    return cfg


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda" or _interpreting():
        return _INTERPRET_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the op writes is allocated here (the tests patch it to NaN-fill them)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------------ kernels


@triton.jit
def _logits_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_w,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """(BLOCK_N, BLOCK_V) fp32 logits h[rows] @ weight[cols].T; masked rows/cols read as 0 (padded
    weight rows are never loaded, so no value stored there can reach the result)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < C
        h = tl.load(H + rows[:, None] * stride_h + ks[None, :],
                    mask=row_mask[:, None] & kmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        w = tl.load(W + cols[None, :] * stride_w + ks[:, None],
                    mask=col_mask[None, :] & kmask[:, None], other=0.0)  # (BLOCK_K, BLOCK_V)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _tanh(x):
    """tanh in fp32 as 1 - 2 / (exp(2x) + 1): exp2 overflows to inf for x > ~44 (giving 1) and underflows to 0
    below ~-44 (giving -1), no nan; absolute error a few fp32 ulps of 1 (it is scaled by softcap)."""
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * _LOG2E)) + 1.0)


@triton.jit
def _dlogits_tile(logits, cols, col_mask, t, lse2, row_scale, SOFTCAP: tl.constexpr):
    """(softmax - onehot) * row_scale in fp32; 0 on padded columns. lse2 = lse * log2(e). `logits` are the raw
    h @ weight.T; SOFTCAP > 0: softmax of z = SOFTCAP * tanh(raw / SOFTCAP) and the chain rule's 1 - tanh^2."""
    if SOFTCAP > 0:
        th = _tanh(logits * (1.0 / SOFTCAP))
        p = tl.exp2(th * (SOFTCAP * _LOG2E) - lse2[:, None])
    else:
        p = tl.exp2(logits * _LOG2E - lse2[:, None])
    d = tl.where(cols[None, :] == t[:, None], p - 1.0, p)
    if SOFTCAP > 0:
        d = d * (1.0 - th * th)
    return tl.where(col_mask[None, :], d, 0.0) * row_scale[:, None]


@triton.jit
def _lce_fwd_kernel(
    H,  # (N, C) storage dtype, row stride stride_h
    W,  # (V_padded, C) storage dtype, row stride stride_w; rows >= vocab_size never read
    T,  # (N,) int64 targets
    LSE_PART,  # (S, N) fp32: logsumexp of the split's vocab range, natural log
    TGT_PART,  # (S, N) fp32: target logit if the target is in the split's range, else 0
    N, C, vocab_size, stride_h, stride_w, blocks_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,  # 0: plain logits (today's kernel, bit for bit); > 0: z = SOFTCAP * tanh(raw / SOFTCAP)
    FIXED_MAX: tl.constexpr,  # 0 < SOFTCAP <= _FIXED_MAX_SOFTCAP (the host decides: _fixed_max)
):
    # FLOPs 2*BLOCK_N*C per logit column; bytes: h tile + the split's weight rows (L2), 8 B out per row.
    # FIXED_MAX: every z <= SOFTCAP, so SOFTCAP is the logsumexp's max (no running max, no rescale): exp2 of
    # z - SOFTCAP >= 2^(-2 * SOFTCAP * log2 e) >= 2^-93 stays a normal fp32 number.
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    t = tl.load(T + rows, mask=row_mask, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)  # running max of base-2 logits
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)  # running sum of exp2(z2 - m)
    tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    v_begin = split * blocks_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, vocab_size)
    for v0 in range(v_begin, v_end, BLOCK_V):  # every block holds >= 1 real column: m stays finite
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < vocab_size
        logits = _logits_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_w,
                              BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        if SOFTCAP > 0:
            logits = SOFTCAP * _tanh(logits * (1.0 / SOFTCAP))
        tgt += tl.sum(tl.where(cols[None, :] == t[:, None], logits, 0.0), axis=1)
        z2 = tl.where(col_mask[None, :], logits * _LOG2E, float("-inf"))
        if FIXED_MAX:
            s += tl.sum(tl.exp2(z2 - SOFTCAP * _LOG2E), axis=1)
        else:
            m_new = tl.maximum(m, tl.max(z2, axis=1))
            s = s * tl.exp2(m - m_new) + tl.sum(tl.exp2(z2 - m_new[:, None]), axis=1)
            m = m_new
    if FIXED_MAX:
        lse = (SOFTCAP * _LOG2E + tl.log2(s)) * _LN2
    else:
        lse = (m + tl.log2(s)) * _LN2
    tl.store(LSE_PART + split * N + rows, lse, mask=row_mask)
    tl.store(TGT_PART + split * N + rows, tgt, mask=row_mask)


@triton.jit
def _lce_bwd_dh_kernel(
    H,  # (N, C) storage dtype
    W,  # (V_padded, C) storage dtype
    T,  # (N,) int64
    LSE,  # (N,) fp32 natural-log logsumexp from the forward
    SCALE,  # () fp32: grad_loss / n_valid
    DH_OUT,  # (S, N, C) contiguous: dh itself (S == 1, h's dtype) or fp32 split partials
    SCRATCH,  # (programs, BLOCK_N, C) fp32 running sums, one slot per program
    N, C, vocab_size, ignore_index, stride_h, stride_w, num_row_blocks, num_tiles, blocks_per_split,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,  # as in the forward
):
    # FLOPs per tile: 4*BLOCK_N*C per vocab column (recompute + dlogits @ W); bytes (L2): weight rows
    # twice, scratch RMW 8*BLOCK_N*C per vocab block; DRAM: h, weight, dh once.
    pid = tl.program_id(0)
    slot = SCRATCH + pid * BLOCK_N * C
    scale = tl.load(SCALE)
    local = tl.arange(0, BLOCK_N)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        rb = tile % num_row_blocks
        split = tile // num_row_blocks
        rows = rb * BLOCK_N + local
        row_mask = rows < N
        t = tl.load(T + rows, mask=row_mask, other=ignore_index)
        lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * _LOG2E
        row_scale = tl.where(row_mask & (t != ignore_index), scale, 0.0)
        v_begin = split * blocks_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + blocks_per_split * BLOCK_V, vocab_size)
        out = DH_OUT + split * N * C
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_mask = cols < vocab_size
            logits = _logits_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_w,
                                  BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            d = _dlogits_tile(logits, cols, col_mask, t, lse2, row_scale, SOFTCAP).to(W.dtype.element_ty)
            # Column limits instead of scalar booleans (the interpreter mis-types tensor & scalar-bool):
            # read the running sum from step 2 on, keep it in scratch until the last step, then store out.
            prev_lim = tl.minimum(v0 - v_begin, 1) * C
            keep_lim = tl.minimum(tl.maximum(v_end - v0 - BLOCK_V, 0), 1) * C
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                cmask = cs < C
                w = tl.load(W + cols[:, None] * stride_w + cs[None, :],
                            mask=col_mask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_V, BLOCK_C)
                acc = tl.load(slot + local[:, None] * C + cs[None, :],
                              mask=cs[None, :] < prev_lim, other=0.0)
                acc = tl.dot(d, w, acc, input_precision=DOT_PRECISION)
                tl.store(slot + local[:, None] * C + cs[None, :], acc, mask=cs[None, :] < keep_lim)
                tl.store(out + rows[:, None] * C + cs[None, :], acc.to(DH_OUT.dtype.element_ty),
                         mask=row_mask[:, None] & cmask[None, :] & (cs[None, :] >= keep_lim))
            tl.debug_barrier()  # this step's scratch stores are visible to the next step's loads


@triton.jit
def _lce_bwd_dw_kernel(
    H,  # (N, C) storage dtype
    W,  # (V_padded, C) storage dtype
    T,  # (N,) int64
    LSE,  # (N,) fp32
    SCALE,  # () fp32: grad_loss / n_valid
    DW_OUT,  # (V_padded, C) contiguous, weight's dtype; rows >= vocab_size get exactly 0
    SCRATCH,  # (programs, BLOCK_V, C) fp32 running sums, one slot per program
    N, C, vocab_size, V_padded, ignore_index, stride_h, stride_w, num_vocab_blocks,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,  # as in the forward
):
    # FLOPs per tile: 4*BLOCK_V*C per row (recompute + dlogits^T @ h); bytes (L2): h twice, scratch RMW
    # 8*BLOCK_V*C per row block; DRAM: weight and dW once.
    pid = tl.program_id(0)
    slot = SCRATCH + pid * BLOCK_V * C
    scale = tl.load(SCALE)
    local = tl.arange(0, BLOCK_V)
    for vb in range(pid, num_vocab_blocks, tl.num_programs(0)):
        cols = vb * BLOCK_V + local
        col_mask = cols < vocab_size
        out_mask = cols < V_padded
        for r0 in range(0, N, BLOCK_N):
            rows = r0 + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            t = tl.load(T + rows, mask=row_mask, other=ignore_index)
            lse2 = tl.load(LSE + rows, mask=row_mask, other=0.0) * _LOG2E
            row_scale = tl.where(row_mask & (t != ignore_index), scale, 0.0)
            logits = _logits_tile(H, W, rows, cols, row_mask, col_mask, C, stride_h, stride_w,
                                  BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
            d = _dlogits_tile(logits, cols, col_mask, t, lse2, row_scale, SOFTCAP).to(H.dtype.element_ty)
            dt = tl.trans(d)  # (BLOCK_V, BLOCK_N)
            prev_lim = tl.minimum(r0, 1) * C  # as in the dh kernel: 0 on the first step, else C
            keep_lim = tl.minimum(tl.maximum(N - r0 - BLOCK_N, 0), 1) * C  # C except on the last step
            for c0 in range(0, C, BLOCK_C):
                cs = c0 + tl.arange(0, BLOCK_C)
                cmask = cs < C
                h = tl.load(H + rows[:, None] * stride_h + cs[None, :],
                            mask=row_mask[:, None] & cmask[None, :], other=0.0)  # (BLOCK_N, BLOCK_C)
                acc = tl.load(slot + local[:, None] * C + cs[None, :],
                              mask=cs[None, :] < prev_lim, other=0.0)
                acc = tl.dot(dt, h, acc, input_precision=DOT_PRECISION)
                tl.store(slot + local[:, None] * C + cs[None, :], acc, mask=cs[None, :] < keep_lim)
                tl.store(DW_OUT + cols[:, None] * C + cs[None, :], acc.to(DW_OUT.dtype.element_ty),
                         mask=out_mask[:, None] & cmask[None, :] & (cs[None, :] >= keep_lim))
            tl.debug_barrier()  # this step's scratch stores are visible to the next step's loads


# ------------------------------------------------------------------------------------------ launchers


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs


def _softcap_constexpr(softcap: float | None) -> float:
    """The kernels' SOFTCAP constexpr: 0.0 for None (today's kernels, compiled exactly as before), else the cap
    as a float (one compiled variant per distinct cap)."""
    return 0.0 if softcap is None else float(softcap)


def _fixed_max(softcap: float | None) -> bool:
    """The forward's FIXED_MAX constexpr: the cap is the logsumexp's max (see _lce_fwd_kernel)."""
    return softcap is not None and softcap <= _FIXED_MAX_SOFTCAP


def _check(h, weight, targets, vocab_size, softcap=None):
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: h (N, C) and weight (V_padded, C) expected, got "
                         f"{tuple(h.shape)} and {tuple(weight.shape)}")
    if targets.shape != (h.shape[0],):
        raise ValueError(f"linear_cross_entropy: targets must be ({h.shape[0]},), got {tuple(targets.shape)}")
    if h.dtype != weight.dtype or h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"linear_cross_entropy: h and weight must share one of fp32/fp16/bf16, got "
                         f"{h.dtype} and {weight.dtype} (HINT: cast both, or run under torch.autocast)")
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"linear_cross_entropy: softcap must be None or a finite number > 0, got {softcap!r} "
                         "(HINT: softcap=None turns the logit cap off)")
    if not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: vocab_size {vocab_size} not in [1, {weight.shape[0]}]")
    if h.device.type != "cuda" and not _interpreting():
        raise ValueError("linear_cross_entropy: CPU tensors run through the Triton interpreter (HINT: set "
                         "TRITON_INTERPRET=1 before tritonrun.kernels is imported, as tritonrun.gpt2.ops.get_ops does)")
    if max(h.numel(), weight.numel()) >= 2**31:
        raise ValueError("linear_cross_entropy: int32 offsets; h and weight must have < 2^31 elements")


def _splits(n_row_blocks: int, n_vocab_blocks: int, waves: int, sm_count: int, max_splits: int = 16
            ) -> tuple[int, int]:
    """(splits, blocks_per_split): split the vocab only when the row blocks alone underfill the GPU."""
    want = max(1, min(n_vocab_blocks, -(-waves * sm_count // n_row_blocks), max_splits))
    per = -(-n_vocab_blocks // want)
    return -(-n_vocab_blocks // per), per  # no empty split


# Grid sizing shared by the launchers and the fake implementations (register_fake below), so that a memory estimate
# under FakeTensorMode allocates exactly the scratch a real launch does.
def _fwd_grid(N: int, vocab_size: int, cfg: dict, sm_count: int) -> tuple[int, int, int]:
    """(row blocks, vocab splits, vocab blocks per split) of the forward kernel; partials are (splits, N) fp32."""
    n_rb = triton.cdiv(N, cfg["BLOCK_N"])
    return (n_rb, *_splits(n_rb, triton.cdiv(vocab_size, cfg["BLOCK_V"]), cfg["waves"], sm_count))


def _dh_plan(N: int, C: int, vocab_size: int, cfg: dict, sm_count: int) -> dict:
    """Grid and fp32 workspace of the dh kernel: persistent programs over (row block, vocab split) tiles; each
    program owns a (BLOCK_N, C) scratch slot; vocab splits (S > 1, when the row blocks alone underfill the GPU)
    write (S, N, C) partials, at most _DH_PARTIAL_BYTES of them."""
    n_rb = triton.cdiv(N, cfg["BLOCK_N"])
    S, per = _splits(n_rb, triton.cdiv(vocab_size, cfg["BLOCK_V"]), cfg["waves"], sm_count,
                     max_splits=max(1, _DH_PARTIAL_BYTES // max(1, N * C * 4)))
    programs = min(n_rb * S, cfg["programs_per_sm"] * sm_count)
    return dict(row_blocks=n_rb, splits=S, blocks_per_split=per, tiles=n_rb * S, programs=programs,
                scratch=(programs, cfg["BLOCK_N"], C), partials=(S, N, C) if S > 1 else None)


def _dw_plan(C: int, V_padded: int, cfg: dict, sm_count: int) -> dict:
    """Grid and fp32 workspace of the dW kernel: persistent programs over vocab blocks, a (BLOCK_V, C) slot each."""
    n_vb = triton.cdiv(V_padded, cfg["BLOCK_V"])
    programs = min(n_vb, cfg["programs_per_sm"] * sm_count)
    return dict(vocab_blocks=n_vb, programs=programs, scratch=(programs, cfg["BLOCK_V"], C))


def backward_workspace(N: int, C: int, vocab_size: int, V_padded: int, sm_count: int,
                       config: dict | None = None, arch: str = "sm_89", dtype: torch.dtype = torch.bfloat16
                       ) -> dict[str, list[tuple[int, ...]]]:
    """The fp32 buffers each backward kernel allocates beside its output, as shapes: {"dh": [scratch,
    (partials)], "dw": [scratch]}, for `config` ({"dh", "dw"}; default: `arch`'s table for `dtype`) on a GPU with
    `sm_count` SMs. The launcher sizes its buffers with the same plans (_dh_plan, _dw_plan), so a fake
    implementation can allocate exactly these. The two kernels run one after the other: dh's buffers are freed
    before dW's are allocated."""
    cfg = config or get_config(torch.device("cuda"), dtype, arch)
    dh = _dh_plan(N, C, vocab_size, cfg["dh"], sm_count)
    return {"dh": [dh["scratch"]] + ([dh["partials"]] if dh["partials"] else []),
            "dw": [_dw_plan(C, V_padded, cfg["dw"], sm_count)["scratch"]]}


def backward_workspace_bytes(N: int, C: int, vocab_size: int, V_padded: int, sm_count: int, arch: str = "sm_89",
                             dtype: torch.dtype = torch.bfloat16, tuned: bool = True) -> int:
    """Peak fp32 workspace of the backward in bytes: the larger of the two kernels' buffers, over the table's
    config and (tuned=True, 16-bit inputs) every TUNE_SPACE candidate the autotuner may pick or time."""
    table = get_config(torch.device("cuda"), dtype, arch)
    configs = [table]
    if tuned and dtype != torch.float32 and arch in TUNE_SPACE:
        space = TUNE_SPACE[arch]
        configs += [{**table, "dh": dh} for dh in space["dh"]] + [{**table, "dw": dw} for dw in space["dw"]]
    best = 0
    for cfg in configs:
        shapes = backward_workspace(N, C, vocab_size, V_padded, sm_count, cfg)
        best = max(best, *(sum(4 * math.prod(s) for s in bufs) for bufs in shapes.values()))
    return best


def _planned_configs(device: torch.device, dtype: torch.dtype) -> tuple[dict[str, dict], int]:
    """(table configs, SM count) a fake implementation sizes for: the GPU named by kernels.target.planning_for, or
    the device's own. The table entry, not an autotuned pick (a fake cannot time): a pick with other tiles changes
    the scratch by at most a factor of two (BLOCK 64 vs 128), a few MB at GPT-2 shapes."""
    planned = planned_target()
    if planned is not None:
        return get_config(device, dtype, arch=planned.arch), planned.sm_count
    return get_config(device, dtype), _sm_count(device)


_TUNER = Tuner("lce", __file__)


def _choose(kind: str, h: torch.Tensor, weight: torch.Tensor, vocab_size: int, launch,
            softcap: float | None = None) -> dict:
    """The config of kernel `kind` ("fwd", "dh", "dw"): the table's, or on a GPU the autotuner's pick from
    TUNE_SPACE (tritonrun/kernels/tune.py; key: the kernel, dtype, row bucket, C, vocab, padded vocab, softcap: the
    capped kernels are other binaries, with a tanh per logit, so they are timed on their own)."""
    if not _autotuning(h):
        return get_config(h.device, h.dtype)[kind]
    key = (kind, str(h.dtype).removeprefix("torch."), _row_bucket(h.shape[0]), h.shape[1], vocab_size,
           weight.shape[0], _softcap_constexpr(softcap))
    # every call after the first: one dict lookup; under CUDA-graph capture with no pick yet: the table
    return pick_unless_capturing(h.device, _TUNER.known(h.device, key), get_config(h.device, h.dtype)[kind],
                                 lambda: _TUNER.pick(h.device, key, TUNE_SPACE[arch_key(h.device)][kind], launch))


def _autotuning(h: torch.Tensor) -> bool:
    """Tune on a GPU for 16-bit inputs (fp32 runs the small "fp32" tiles only), unless TRITONRUN_AUTOTUNE=0."""
    return h.device.type == "cuda" and h.dtype != torch.float32 and autotune_enabled()


def _row_bucket(N: int) -> int:
    """Rows rounded up to a power of two (>= 1024): one tuning per bucket, not per exact row count."""
    return max(1024, triton.next_power_of_2(N))


def tuning_decisions() -> list[dict]:
    """The autotuner's picks in this process: key, how ("measured" / "cached"), config, ms per candidate."""
    return _TUNER.decisions()


def lce_forward(h, weight, targets, ignore_index: int, vocab_size: int, config=None, sm_count=None,
                softcap: float | None = None):
    """Returns (loss fp32 0-d, lse (N,) fp32). `config`/`sm_count` override the device defaults (tests)."""
    _check(h, weight, targets, vocab_size, softcap)
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets = targets.contiguous()
    N, C = h.shape
    dev = h.device
    sm = sm_count or _sm_count(dev)
    valid = targets != ignore_index
    if N == 0:
        return torch.full((), float("nan"), device=dev), _empty((0,), torch.float32, dev)

    def launch(cfg):
        BN, BV = cfg["BLOCK_N"], cfg["BLOCK_V"]
        n_rb, S, per = _fwd_grid(N, vocab_size, cfg, sm)
        lse_part = _empty((S, N), torch.float32, dev)
        tgt_part = _empty((S, N), torch.float32, dev)
        _lce_fwd_kernel[(n_rb, S)](
            h, weight, targets, lse_part, tgt_part, N, C, vocab_size, h.stride(0), weight.stride(0), per,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=cfg["BLOCK_K"], DOT_PRECISION=_dot_precision(h.dtype),
            SOFTCAP=_softcap_constexpr(softcap), FIXED_MAX=_fixed_max(softcap), num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        if S == 1:
            return lse_part[0], tgt_part[0]
        return torch.logsumexp(lse_part, dim=0), tgt_part.sum(0)  # the splits' epilogue (timed with them)

    lse, tgt = launch(config["fwd"] if config else _choose("fwd", h, weight, vocab_size, launch, softcap))
    row_loss = torch.where(valid, lse - tgt, 0.0)
    bad = valid & ((targets < 0) | (targets >= vocab_size))  # torch raises here; we return nan, no sync
    loss = row_loss.sum() / valid.sum()  # all ignored: 0/0 = nan, like F.cross_entropy
    loss = torch.where(bad.any(), float("nan"), loss)
    return loss, lse


def lce_backward(grad_loss, h, weight, targets, lse, ignore_index: int, vocab_size: int,
                 config=None, sm_count=None, softcap: float | None = None):
    """Returns (dh like h, dweight like weight); padded weight rows get exactly 0."""
    h = h if h.stride(-1) == 1 else h.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    targets, lse = targets.contiguous(), lse.contiguous()
    N, C = h.shape
    V_padded = weight.shape[0]
    dev = h.device
    sm = sm_count or _sm_count(dev)
    n_valid = (targets != ignore_index).sum()
    # 0 when every row is ignored (torch's grads are 0 there too); read by the kernels, no host sync
    scale = torch.where(n_valid > 0, grad_loss.float() / n_valid.clamp(min=1), 0.0).reshape(())
    prec = _dot_precision(h.dtype)
    cap = _softcap_constexpr(softcap)
    if N == 0:
        return h.new_zeros((0, C)), torch.zeros_like(weight)

    def launch_dh(dcfg):  # persistent programs over (row block, vocab split) tiles
        plan = _dh_plan(N, C, vocab_size, dcfg, sm)
        S = plan["splits"]
        out = _empty((N, C), h.dtype, dev) if S == 1 else _empty(plan["partials"], torch.float32, dev)
        scratch = _empty(plan["scratch"], torch.float32, dev)
        _lce_bwd_dh_kernel[(plan["programs"],)](
            h, weight, targets, lse, scale, out, scratch, N, C, vocab_size, ignore_index,
            h.stride(0), weight.stride(0), plan["row_blocks"], plan["tiles"], plan["blocks_per_split"],
            BLOCK_N=dcfg["BLOCK_N"], BLOCK_V=dcfg["BLOCK_V"], BLOCK_K=dcfg["BLOCK_K"], BLOCK_C=dcfg["BLOCK_C"],
            DOT_PRECISION=prec, SOFTCAP=cap, num_warps=dcfg["num_warps"], num_stages=dcfg["num_stages"])
        return out if S == 1 else out.sum(0).to(h.dtype)  # split partials: fixed order, deterministic

    def launch_dw(wcfg):  # persistent programs over vocab blocks of all V_padded rows
        plan = _dw_plan(C, V_padded, wcfg, sm)
        dw = _empty((V_padded, C), weight.dtype, dev)
        scratch = _empty(plan["scratch"], torch.float32, dev)
        _lce_bwd_dw_kernel[(plan["programs"],)](
            h, weight, targets, lse, scale, dw, scratch, N, C, vocab_size, V_padded, ignore_index,
            h.stride(0), weight.stride(0), plan["vocab_blocks"],
            BLOCK_N=wcfg["BLOCK_N"], BLOCK_V=wcfg["BLOCK_V"], BLOCK_K=wcfg["BLOCK_K"], BLOCK_C=wcfg["BLOCK_C"],
            DOT_PRECISION=prec, SOFTCAP=cap, num_warps=wcfg["num_warps"], num_stages=wcfg["num_stages"])
        return dw

    dh = launch_dh(config["dh"] if config else _choose("dh", h, weight, vocab_size, launch_dh, softcap))
    dw = launch_dw(config["dw"] if config else _choose("dw", h, weight, vocab_size, launch_dw, softcap))
    return dh, dw


# ------------------------------------------------------------------------------------------ torch op


@torch.library.custom_op("tritonrun::linear_cross_entropy", mutates_args=())
def _lce_op(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
            vocab_size: int, softcap: Optional[float] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return lce_forward(h, weight, targets, ignore_index, vocab_size, softcap=softcap)


@_lce_op.register_fake
def _(h, weight, targets, ignore_index, vocab_size, softcap=None):
    # What lce_forward allocates, in its order (a memory estimate under FakeTensorMode sees the peak inside the
    # op): the valid-row mask, the (splits, N) fp32 partials (with one split, the lse is the partial's row).
    N = h.shape[0]
    valid = targets.new_empty((N,), dtype=torch.bool)
    if N == 0:
        return h.new_empty((), dtype=torch.float32), h.new_empty((0,), dtype=torch.float32)
    cfgs, sm = _planned_configs(h.device, h.dtype)
    _, S, _ = _fwd_grid(N, vocab_size, cfgs["fwd"], sm)
    lse = h.new_empty((N,), dtype=torch.float32)
    tgt_part = h.new_empty((S, N), dtype=torch.float32)
    if S > 1:
        lse_part = h.new_empty((S, N), dtype=torch.float32)
        del lse_part
    diff = h.new_empty((N,), dtype=torch.float32)  # lse - tgt
    row_loss = h.new_empty((N,), dtype=torch.float32)  # where(valid, lse - tgt, 0)
    del diff
    below, above = valid.new_empty((N,)), valid.new_empty((N,))  # the out-of-range target check
    either = valid.new_empty((N,))
    del below, above
    bad = valid.new_empty((N,))
    del valid, tgt_part, row_loss, either, bad
    return h.new_empty((), dtype=torch.float32), lse


@torch.library.custom_op("tritonrun::linear_cross_entropy_backward", mutates_args=())
def _lce_backward_op(grad_loss: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     lse: torch.Tensor, ignore_index: int, vocab_size: int, softcap: Optional[float] = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    return lce_backward(grad_loss, h, weight, targets, lse, ignore_index, vocab_size, softcap=softcap)


@_lce_backward_op.register_fake
def _(grad_loss, h, weight, targets, lse, ignore_index, vocab_size, softcap=None):
    # What lce_backward allocates, in its order: dh (or its (splits, N, C) fp32 partials) with the dh kernel's
    # per-program fp32 scratch, then dweight with the dW kernel's scratch; the real grads are always contiguous.
    N, C = h.shape
    if N == 0:
        return h.new_empty(h.shape), weight.new_empty(weight.shape)
    valid = targets.new_empty((N,), dtype=torch.bool)  # counted for n_valid
    del valid
    cfgs, sm = _planned_configs(h.device, h.dtype)
    dcfg, wcfg = cfgs["dh"], cfgs["dw"]
    plan = _dh_plan(N, C, vocab_size, dcfg, sm)
    S = plan["splits"]
    out = h.new_empty((N, C)) if S == 1 else h.new_empty(plan["partials"], dtype=torch.float32)
    scratch = h.new_empty(plan["scratch"], dtype=torch.float32)
    del scratch
    if S > 1:  # the host's fixed-order sum of the partials (fp32), then the cast
        summed = h.new_empty((N, C), dtype=torch.float32)
        dh = h.new_empty((N, C))
        del summed
    else:
        dh = out
    del out
    dw = weight.new_empty(weight.shape)
    scratch = h.new_empty(_dw_plan(C, weight.shape[0], wcfg, sm)["scratch"], dtype=torch.float32)
    del scratch
    return dh, dw


def _setup_context(ctx, inputs, output):
    h, weight, targets, ignore_index, vocab_size, softcap = inputs
    ctx.save_for_backward(h, weight, targets, output[1])
    ctx.ignore_index, ctx.vocab_size, ctx.softcap = ignore_index, vocab_size, softcap
    ctx.mark_non_differentiable(output[1])  # lse is an auxiliary output


def _backward(ctx, grad_loss, _grad_lse):
    h, weight, targets, lse = ctx.saved_tensors
    dh, dw = torch.ops.tritonrun.linear_cross_entropy_backward(
        grad_loss, h, weight, targets, lse, ctx.ignore_index, ctx.vocab_size, ctx.softcap)
    return dh, dw, None, None, None, None


_lce_op.register_autograd(_backward, setup_context=_setup_context)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = -1, vocab_size: int = 50257, softcap: float | None = None) -> torch.Tensor:
    """Mean cross-entropy of z = h @ weight[:vocab_size].T (softcap set: z = softcap * tanh(z / softcap)) against
    targets; grads for h and weight."""
    if torch.is_autocast_enabled(h.device.type):  # as F.linear under autocast: both to the autocast dtype
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
    h = h.reshape(-1, h.shape[-1])
    return torch.ops.tritonrun.linear_cross_entropy(h, weight, targets.reshape(-1), ignore_index, vocab_size,
                                                    None if softcap is None else float(softcap))[0]


# ------------------------------------------------------------------------------------------ reference


def linear_cross_entropy_reference(h, weight, targets, ignore_index: int = -1, vocab_size: int = 50257,
                                   compute_dtype: torch.dtype | None = None,
                                   chunk_rows: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Plain PyTorch, materialized logits (tritonrun/gpt2/ops.py semantics). compute_dtype upcasts h and weight
    first (fp64 for test references); otherwise the matmul runs in the input dtype, softmax in >= fp32.

    chunk_rows: the same loss summed over chunks of rows, each chunk's logits recomputed in the backward
    (torch.utils.checkpoint), so memory holds one chunk's logits, not all N x V: the benchmark's reference at
    GPT-2's size, where fp32 logits, their softmax and their grad take 3.3 GB each.

    softcap: the logits become softcap * tanh(logits / softcap) (modded-nanogpt's logit softcap), in >= fp32."""
    if compute_dtype is not None:
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)

    def loss(h, targets, weight, reduction="mean"):
        logits = F.linear(h, weight[:vocab_size])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        if softcap is not None:  # in >= fp32, as the kernels apply it to their fp32 logits
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction=reduction)

    N = h.shape[0]
    if chunk_rows is None or chunk_rows >= N:
        return loss(h, targets, weight)
    from torch.utils.checkpoint import checkpoint

    total = sum(checkpoint(loss, h[i:i + chunk_rows], targets[i:i + chunk_rows], weight, "sum", use_reentrant=False)
                for i in range(0, N, chunk_rows))
    return total / (targets != ignore_index).sum()


# ------------------------------------------------------------------------------------------ cost model


def lce_flops(N: int, V: int, C: int, part: str = "fwd_bwd", executed: bool = True) -> int:
    """Matmul FLOPs. executed=True counts what this op runs (forward 2NVC, backward 8NVC incl. the two
    logits recomputes); executed=False the model FLOPs of a materialized version (2NVC + 4NVC)."""
    fwd, bwd = 2 * N * V * C, (8 if executed else 4) * N * V * C
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[part]


def lce_bytes(N: int, V: int, C: int, elem_bytes: int = 2, part: str = "fwd_bwd", V_padded: int | None = None,
              blocks: dict | None = None) -> int:
    """Bytes moved. blocks=None: compulsory DRAM traffic (each input read once per kernel, outputs written
    once). blocks=get_config(...) (a {"fwd","dh","dw"} dict): on-chip (L2) traffic including the tile
    re-reads of weight/h and the fp32 scratch read-modify-writes."""
    Vp = V_padded or V
    e = elem_bytes
    if blocks is None:
        fwd = N * C * e + V * C * e + 12 * N
        bwd = 2 * (N * C * e + V * C * e + 12 * N) + N * C * e + Vp * C * e
    else:
        cd = lambda a, b: -(-a // b)  # noqa: E731
        f, dh, dw = blocks["fwd"], blocks["dh"], blocks["dw"]
        fwd = cd(N, f["BLOCK_N"]) * V * C * e + cd(V, f["BLOCK_V"]) * N * C * e + 12 * N
        bwd_dh = (2 * cd(N, dh["BLOCK_N"]) * V * C * e + cd(V, dh["BLOCK_V"]) * N * C * e
                  + 8 * cd(V, dh["BLOCK_V"]) * N * C + N * C * e)
        bwd_dw = (2 * cd(Vp, dw["BLOCK_V"]) * N * C * e + cd(N, dw["BLOCK_N"]) * Vp * C * e
                  + 8 * cd(N, dw["BLOCK_N"]) * Vp * C + Vp * C * e)
        bwd = bwd_dh + bwd_dw + 24 * N
    return {"fwd": fwd, "bwd": bwd, "fwd_bwd": fwd + bwd}[part]


def scratch_flops_per_byte(blocks: dict) -> dict[str, float]:
    """FLOPs (recompute + gradient dot) per byte of fp32 scratch read-modify-write of each backward kernel with
    `blocks` ({"dh", "dw"} tiles): BLOCK_V/2 for dh, BLOCK_N/2 for dW. Compare with the GPU's ridge point
    (FLOP per DRAM byte, REFERENCE.md) for the case where the scratch slots miss L2."""
    return {"dh": 4 * blocks["dh"]["BLOCK_V"] / 8, "dw": 4 * blocks["dw"]["BLOCK_N"] / 8}


# ------------------------------------------------------------------------------------------ AOT check
# Pointer dtypes of each kernel ("x": the storage dtype being checked); other non-constexpr args are i32.
_KERNEL_ARGS = {
    "fwd": ("_lce_fwd_kernel", {"H": "x", "W": "x", "T": "*i64", "LSE_PART": "*fp32", "TGT_PART": "*fp32"}),
    "dh": ("_lce_bwd_dh_kernel", {"H": "x", "W": "x", "T": "*i64", "LSE": "*fp32", "SCALE": "*fp32",
                                  "DH_OUT": "x", "SCRATCH": "*fp32"}),
    "dw": ("_lce_bwd_dw_kernel", {"H": "x", "W": "x", "T": "*i64", "LSE": "*fp32", "SCALE": "*fp32",
                                  "DW_OUT": "x", "SCRATCH": "*fp32"}),
}
# Integer args that are multiples of 16 at the GPT-2 shape (C = 768, N = B*1024, V_padded = 50304);
# Triton specializes them as such at launch, which enables vectorized/async loads.
_DIVISIBLE_INTS = {"N", "C", "stride_h", "stride_w", "V_padded"}


def compile_config(kname: str, c: dict, arch: str = "sm_89", dtype: torch.dtype = torch.bfloat16,
                   softcap: float | None = None) -> dict:
    """Compile kernel `kname` ("fwd", "dh" or "dw") with config `c` for `arch` without a GPU (needs
    TRITON_INTERPRET unset in this process); shared bytes, registers, spills (ptxas -v, the ptxas bundled
    with triton) and the mma instructions in the PTX."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from tritonrun.kernels.aot import cached_ptxas_stats, mma_instructions

    cc = int(arch.removeprefix("sm_"))
    ptx_ty = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}[dtype]
    fname, ptrs = _KERNEL_ARGS[kname]
    fn = globals()[fname]
    if not isinstance(fn, triton.runtime.jit.JITFunction):
        raise RuntimeError("compile_config needs TRITON_INTERPRET unset before tritonrun/kernels/ is imported")
    consts = {k: v for k, v in c.items() if k.startswith("BLOCK_")}
    consts["DOT_PRECISION"] = _dot_precision(dtype)
    consts["SOFTCAP"] = _softcap_constexpr(softcap)
    if kname == "fwd":
        consts["FIXED_MAX"] = _fixed_max(softcap)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
            continue
        sig[name] = (ptx_ty if ptrs[name] == "x" else ptrs[name]) if name in ptrs else "i32"
        if name in ptrs or name in _DIVISIBLE_INTS:
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", cc, 32),
                            options=dict(num_warps=c["num_warps"], num_stages=c["num_stages"]))
    ptx = kernel.asm["ptx"]
    try:
        stats = cached_ptxas_stats(kernel, cc)
    except RuntimeError as e:
        raise RuntimeError(f"{kname} ({arch}): {e}") from None
    return dict(kernel=kname, arch=arch, dtype=str(dtype).removeprefix("torch."), softcap=softcap,
                shared=kernel.metadata.shared,
                shared_limit=ARCH_SHARED_LIMIT[arch], mma=mma_instructions(ptx), **stats, config=c)


def compile_configs(arch: str = "sm_89", dtype: torch.dtype = torch.bfloat16, space: bool = False,
                    softcap: float | None = None) -> list[dict]:
    """compile_config for every kernel of `arch`'s table (space=True: and every autotune candidate; 16-bit
    only, fp32 is never tuned), with the logit softcap variant `softcap` (None: without)."""
    cfg = get_config(torch.device("cuda"), dtype, arch)
    report = []
    for kname in _KERNEL_ARGS:
        configs = [cfg[kname]]
        if space and dtype != torch.float32:
            configs += [c for c in TUNE_SPACE[arch][kname] if c != cfg[kname]]
        report += [compile_config(kname, c, arch, dtype, softcap) for c in configs]
    return report


if __name__ == "__main__":  # python -m tritonrun.kernels.cross_entropy [arch] [dtype]: the AOT compile table
    import sys

    _arch = sys.argv[1] if len(sys.argv) > 1 else "sm_89"
    _dt = getattr(torch, sys.argv[2] if len(sys.argv) > 2 else "bfloat16")
    for r in compile_configs(_arch, _dt, space=sys.argv[3:4] == ["space"]):
        mma = " ".join(r["mma"]) or "no mma"
        print(f"{r['arch']} {r['dtype']:>8} {r['kernel']:>3} {ce_tiles(r['config']):>19}: shared "
              f"{r['shared']:>6}/{r['shared_limit']} B, {r['registers']} regs, spills {r['spill_stores']}/"
              f"{r['spill_loads']} B, {mma}")
