"""modded-nanogpt's record #89 (2026-07-17, "MLP down projection in FP8 with efficient delayed scaling metric"):
its training schedule, written from the record's facts; the code is ours. The model and the recipe module follow
(issue 35); this file holds what a run's loop asks at every step.

Which code is "the record". The 13 timed runs in records/track_1_short/2026-07-17_FP8DownProjection/this_pr/ embed a
trainer built on master of 2026-06-19 (1,380 + 10 steps, a 754,560 x 192 bigram table, no DC MHA, no prefix-token
loss). The record was merged into the repo's top-level train_gpt.py on 2026-08-01/02 on top of records #85-#88:
that file (KellerJordan/modded-nanogpt at f411b3d3) has every technique the record table lists (DC MHA, the prefix
loss, the 377,280 x 768 bigram table, 640.6M parameters) and is what this module follows: "[H1890]" below is
train_gpt.py's line 1890 there. Its val loss is not measured in the repo (the 13-run mean 3.27837 is the older
code's); LOG_SCHEDULE gives the logged runs' schedule for comparison.

The schedule [H1909-2007, TrainingSchedule, TRAINING_STAGES, get_muon_momentum]:
  stages        three of 1/3 of the scheduled steps each, then an extension; stage i covers steps
                [round(F_i x N), round(F_{i+1} x N)) with F the cumulative fractions, N = 1,270 scheduled steps:
                [0, 423), [423, 847), [847, 1270), extension [1270, 1285).
  per stage     global batch 131,072 / 262,144 / 393,216 / 393,216 tokens (8 / 16 / 24 / 24 sequences of 2,048 x 8
                GPUs), maximum document length 896 / 2,048 / 2,048 / 2,048, attention windows (short, long) in
                128-token blocks (1, 3) / (3, 7) / (5, 11) / (6, 13), lr multiplier 1.0 / 1.52 / 1.73 (the extension's
                is never used), multi-token-prediction weights and the prefix-token loss weight, each linear from
                the stage's start value to its end value over the stage: t = (step - start) / (end - start).
  lr            the stage's multiplier until cd_start = int(N x (1 - 0.60)) = 508, then lr_mul (1 - t) + 0.15 t with
                t = min(1, (step - cd_start) / (N - cd_start)): it still jumps at stage boundaries and is 0.15 in the
                extension.
  momentum      Muon (NorMuon) momentum 0.85 -> 0.95 linearly over steps 0-300, 0.95, then linearly back toward
                0.85 over the last 50 steps (step > 1,285 - 50).
  untie         embed and LM head split at the first step of stage 2, made odd (Adam steps on odd steps): 847.
  final window  the last validation uses a long window of 20 blocks (2,560 tokens).
  FP8 bootstrap the MLP down projection's weight scale is not delayed for optimizer steps < 16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule [H1909 TrainingStage]. fraction None: the extension."""
    fraction: float | None  # of the scheduled steps [duration]
    batch_tokens: int  # global tokens per step [batch_size]
    max_doc_len: int  # documents are cut to this many tokens [train_max_seq_len]
    windows: tuple[int, int]  # (short, long) attention windows in window_block-token blocks [window_sizes]
    lr_mul: float  # [lr_mul]
    mtp_start: tuple[float, ...]  # multi-token-prediction loss weights at the stage's start [mtp_weights_start]
    mtp_end: tuple[float, ...]  # ... and at its end [mtp_weights_end]
    prefix_start: float = 0.0  # prefix-token auxiliary loss weight [prefix_weight_start]
    prefix_end: float = 0.0  # [prefix_weight_end]


# [H1979-1989 TRAINING_STAGES]
STAGES: tuple[Stage, ...] = (
    Stage(1 / 3, 8 * 2048 * 8, 896, (1, 3), 1.0, (1.0, 0.5, 0.25), (1.0, 0.5, 0.0), 0.25, 0.25),
    Stage(1 / 3, 16 * 2048 * 8, 2048, (3, 7), 1.52, (1.0, 0.5), (1.0, 0.0), 0.25, 0.0),  # 1.52 ~ (16/8)^0.6
    Stage(1 / 3, 24 * 2048 * 8, 2048, (5, 11), 1.73, (1.0,), (1.0,), 0.0, 0.0),  # 1.73 ~ (24/8)^0.5
    Stage(None, 24 * 2048 * 8, 2048, (6, 13), 1.0, (1.0,), (1.0,), 0.0, 0.0),  # the extension; lr_mul unused
)


@dataclass(frozen=True)
class Schedule89:
    """Record #89's schedule; every number beside its source line in train_gpt.py (module docstring)."""
    scheduled_steps: int = 1270  # [H1890 num_scheduled_iterations]
    extension_steps: int = 15  # [H1891 num_extension_iterations]
    cooldown_frac: float = 0.60  # [H1992 TrainingSchedule(..., cooldown_frac=0.60)]
    lr_floor: float = 0.15  # [H1975 lr * (1 - t) + 0.15 * t]
    split_embed_stage: int = 2  # [H1933 split_embed_stage=2]
    final_long_window: int = 20  # blocks, the final validation's long window [H1933 ws_post_yarn_ext=20]
    window_block: int = 128  # tokens per window block [H2021 block_size = 128]
    momentum_min: float = 0.85  # [H1995 get_muon_momentum(momentum_min=0.85)]
    momentum_max: float = 0.95  # [momentum_max=0.95]
    momentum_warmup_steps: int = 300  # [muon_warmup_steps=300]
    momentum_cooldown_steps: int = 50  # [muon_cooldown_steps=50]
    fp8_bootstrap_steps: int = 16  # [H2365 quantize_mlp_fp8(bootstrap_down=(step < 16))]
    val_every: int = 250  # [H1898 val_loss_every]
    stages: tuple[Stage, ...] = field(default=STAGES)

    def __post_init__(self) -> None:
        if self.stages[-1].fraction is not None or any(s.fraction is None for s in self.stages[:-1]):
            raise ValueError("stages: scheduled stages with a fraction each, then one extension stage (fraction None)")
        for s in self.stages:
            if len(s.mtp_start) != len(s.mtp_end):
                raise ValueError(f"stage {s}: mtp_start and mtp_end differ in length")
        if abs(sum(s.fraction for s in self.stages[:-1]) - 1) > 1e-9:
            raise ValueError("the scheduled stages' fractions must sum to 1")

    @property
    def total_steps(self) -> int:
        return self.scheduled_steps + self.extension_steps

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """[start, end) of each stage, the extension last [H1942-1945: round() of the cumulative fractions]."""
        cuts, acc = [0], 0.0
        for s in self.stages[:-2]:
            acc += s.fraction
            cuts.append(round(acc * self.scheduled_steps))
        cuts += [self.scheduled_steps, self.total_steps]
        return list(zip(cuts, cuts[1:]))

    def stage(self, step: int) -> tuple[int, float]:
        """(stage index, fraction of the way through it) at 0-based `step`; past the end: the extension, 1.0
        [H1960 lookup]."""
        for i, (start, end) in enumerate(self.bounds):
            if step < end:
                return i, (step - start) / (end - start)
        return len(self.stages) - 1, 1.0

    @property
    def untie_step(self) -> int:
        """The step embed and LM head split: the first of stage split_embed_stage, made odd [H1948]."""
        return self.bounds[self.split_embed_stage][0] | 1

    def lr_multiplier(self, step: int) -> float:
        """Every group's lr factor at `step` [H1969-1976 get_lr]."""
        i, _ = self.stage(step)
        lr = self.stages[i].lr_mul
        cd_start = int(self.scheduled_steps * (1 - self.cooldown_frac))
        if step >= cd_start:
            t = min(1.0, (step - cd_start) / (self.scheduled_steps - cd_start))
            lr = lr * (1 - t) + self.lr_floor * t
        return lr

    def muon_momentum(self, step: int) -> float:
        """NorMuon's momentum at `step` [H1995-2007 get_muon_momentum]."""
        lo, hi = self.momentum_min, self.momentum_max
        cd_start = self.total_steps - self.momentum_cooldown_steps
        if step < self.momentum_warmup_steps:
            return lo + step / self.momentum_warmup_steps * (hi - lo)
        if step > cd_start:
            return hi - (step - cd_start) / self.momentum_cooldown_steps * (hi - lo)
        return hi

    def mtp_weights(self, step: int) -> tuple[float, ...]:
        """Multi-token-prediction loss weights (next token first) at `step` [H1952-1955]."""
        i, t = self.stage(step)
        s = self.stages[i]
        return tuple(a + (b - a) * t for a, b in zip(s.mtp_start, s.mtp_end))

    def prefix_weight(self, step: int) -> float:
        """The prefix-token auxiliary loss weight at `step` [H1956-1957]."""
        i, t = self.stage(step)
        s = self.stages[i]
        return s.prefix_start + (s.prefix_end - s.prefix_start) * t

    def windows(self, step: int, final: bool = False) -> tuple[int, int]:
        """(short, long) attention windows in tokens at `step`; final: the last validation's (long 20 blocks)."""
        short, long_ = self.stages[self.stage(step)[0]].windows
        if final:
            long_ = self.final_long_window
        return short * self.window_block, long_ * self.window_block

    def batch_tokens(self, step: int) -> int:
        return self.stages[self.stage(step)[0]].batch_tokens

    def max_doc_len(self, step: int) -> int:
        return self.stages[self.stage(step)[0]].max_doc_len

    def tokens(self, steps: int | None = None) -> int:
        """Training tokens of the first `steps` steps (default: the whole run): 338,821,120 for the record."""
        n = self.total_steps if steps is None else steps
        return sum(self.batch_tokens(s) for s in range(n))


# The logged runs' schedule (records/track_1_short/2026-07-17_FP8DownProjection/this_pr/*.txt, the embedded code:
# num_scheduled_iterations 1380, num_extension_iterations 10 [L1763-1764]; the same stages without the prefix-token
# loss, which that code does not have [L1847-1857]): 365,690,880 tokens.
LOG_SCHEDULE = Schedule89(scheduled_steps=1380, extension_steps=10,
                          stages=tuple(Stage(s.fraction, s.batch_tokens, s.max_doc_len, s.windows, s.lr_mul,
                                             s.mtp_start, s.mtp_end) for s in STAGES))


# ---------------------------------------------------------------------------------------- state memory
# Record #89's parameters as one GPU instantiates them (train_gpt.py GPT.__init__, H1216-1350: banks without the
# 8-GPU padding of qk / vo; the MLP bank keeps its unused 12th layer), with their storage dtype and optimizer.
# (name, elements, bytes per element, optimizer, table): tables are the lookups whose Adam state dominates.
PARAMS: tuple[tuple[str, int, int, str, bool], ...] = (
    ("lm_head", 768 * 50_304, 2, "adam", False),  # [H970 CastedLinearT(768, 50304), bf16]
    ("embed", 50_304 * 768, 2, "adam", False),  # [H1228 nn.Embedding(50304, 768), bf16]
    ("value_embeds", 5 * 50_304 * 768, 2, "adam", True),  # [H1261 (5 x 50304, 768) bf16]
    ("bigram_embed", 377_280 * 768, 2, "adam", True),  # [H1329 nn.Embedding(50304 * 15 // 2, 768) bf16]
    ("qk_bank", 60 * 256 * 768, 2, "normuon", False),  # [H1272 10 layers x 6 head-pair blocks of 256 x 768]
    ("vo_bank", 20 * 768 * 768, 2, "normuon", False),  # [H1280 10 layers x (V, O)]
    ("mlp_bank", 12 * 2 * 3072 * 768, 2, "normuon", False),  # [H1296 (12, 2, 3072, 768): layer 11 unused]
    ("mudd", 2 * 64 * 768 + 2 * 14 * 64 + 2 * 14, 2, "adam", False),  # [H1352-1401 w1, w2, b2]
    ("mudd_gate", 2 * 64 * 768 + 2 * 41 * 64 + 2 * 41, 2, "adam", False),  # [H1436-1484]
    ("small_bf16", 5 * 6 * 12 + 12, 2, "adam", False),  # ve_gate_bank, smear_gate [H1264, H1326]
    ("small_fp32", 24 + 22 + 22 + 1, 4, "adam", False),  # scalars, post / resid lambdas, gate scale [H1334-1350]
)


def parameter_count() -> int:
    """640,605,607 on one GPU (the issue's 640.6M; 643,751,335 with the 8-GPU bank padding)."""
    return sum(n for _, n, _, _, _ in PARAMS)


def state_bytes(table_moments: str = "fp32", table_state_on_host: bool = False) -> dict[str, int]:
    """Device bytes of parameters, gradients (the param's dtype) and optimizer state, stored as the record stores
    them: Adam fp32 moments (8 B / element), NorMuon an fp32 momentum and a uint16 mantissa (6 B; its second moment is
    one value per row or column, ~0.1 %). The memory plan's options for the lookup tables (value embeddings + bigram,
    482.9M elements): "bf16" moments (4 B), or their Adam state in host memory (0 on the device)."""
    out = {"params": 0, "grads": 0, "optimizer": 0}
    for _, n, size, opt, table in PARAMS:
        out["params"] += n * size
        out["grads"] += n * size
        if opt == "normuon":
            out["optimizer"] += n * 6
        elif table and table_state_on_host:
            continue
        else:
            out["optimizer"] += n * (4 if table and table_moments == "bf16" else 8)
    out["total"] = sum(out.values())
    return out


# ---------------------------------------------------------------------------------------- rotary + YaRN
# [H988-1055 Yarn]: half-truncated RoPE on adjacent pairs, softmax scale 0.1, YaRN at each long-window change.
ROPE_BASE = 1024.0  # frequencies (1/1024)^linspace(0, 1, D/4) [H1006]
ATTN_SCALE = 0.1  # the softmax scale (not 1/sqrt(D)) [H1035]
YARN_ALPHA, YARN_BETA = 1, 32  # [H1037 apply(alpha=1, beta=32)]


def rotary_frequencies(head_dim: int) -> torch.Tensor:
    """(D,) fp32 angular frequency of each dimension: D/4 values from 1 down to 1/1024, each for a pair of adjacent
    dimensions, then D/2 zeros (those dimensions are not rotated) [H1006-1009]."""
    f = (1 / ROPE_BASE) ** torch.linspace(0, 1, steps=head_dim // 4, dtype=torch.float32)
    return torch.cat([f.repeat_interleave(2), f.new_zeros(head_dim // 2)])


def yarn_update(freq: torch.Tensor, old_window: int, new_window: int) -> tuple[torch.Tensor, float]:
    """YaRN when the long window grows from old_window to new_window tokens: each frequency moves toward
    freq x old / new as its rotations over the old window grow past YARN_ALPHA, fully past YARN_BETA; the softmax
    scale is multiplied by 1 + 0.2 ln(new / old). Returns (new frequencies, scale factor) [H1037-1055]."""
    rotations = old_window * freq / (2 * torch.pi)
    ratio = old_window / new_window
    w = torch.clamp((rotations - YARN_ALPHA) / (YARN_BETA - YARN_ALPHA), 0, 1)
    return freq * (ratio + w * (1 - ratio)), 0.2 * math.log(new_window / old_window) + 1


def yarn_at(schedule: Schedule89, step: int, head_dim: int = 128) -> tuple[torch.Tensor, float]:
    """(frequencies, softmax scale) the model attends with at `step`: every long-window change of the stages up to
    `step`'s, applied in order [H2111-2116 advance_schedule] (0.1 -> 0.1169 -> 0.1275 -> 0.1318 at d12)."""
    freq, scale = rotary_frequencies(head_dim), ATTN_SCALE
    long_ = schedule.stages[0].windows[1]
    for i in range(1, schedule.stage(step)[0] + 1):
        new = schedule.stages[i].windows[1]
        if new != long_:
            freq, factor = yarn_update(freq, long_ * schedule.window_block, new * schedule.window_block)
            scale *= factor
            long_ = new
    return freq, scale


def rotary_tables(freq: torch.Tensor, positions: int, paired: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 (positions, D) cos and signed sin for rotary(); paired (the paired-head layers: two heads share a position
    pair): (positions, 2D), the first D at position 2t, the second at 2t + 1 [H1010-1033]."""
    t = torch.arange(positions, dtype=torch.float32)
    if paired:
        a, b = torch.outer(2 * t, freq), torch.outer(2 * t + 1, freq)
        cos, sin = torch.cat((a.cos(), b.cos()), dim=-1), torch.cat((a.sin(), b.sin()), dim=-1)
    else:
        theta = torch.outer(t, freq)
        cos, sin = theta.cos(), theta.sin()
    cos, sin = cos.to(torch.bfloat16), sin.to(torch.bfloat16)
    sin[..., 1::2] *= -1
    return cos, sin


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, D) rotated on adjacent pairs (2j, 2j+1): cos x + sin' swap(x), tables (>= T, D) [H996-1003]."""
    T = x.size(-3)
    swapped = x.view(*x.shape[:-1], x.shape[-1] // 2, 2).flip(-1).view(x.shape)
    return cos[None, :T, None, :] * x + sin[None, :T, None, :] * swapped


# ------------------------------------------------------------------------- the head's loss (the reference)
# [H1683-1692; the fused kernel HK914-1180 FusedSoftcappedCrossEntropy]: logits z = 23 sigmoid((l + 5) / 7.5), bounded
# in (0, 23) and asymmetric ("asymmetric logit rescale and softcap"), over all 50,304 columns of the LM head.
LOGIT_A, LOGIT_B, LOGIT_C = 23.0, 5.0, 7.5


def mtp_target_matrix(targets: torch.Tensor, k: int) -> torch.Tensor:
    """(N, k) int64: row i's multi-token-prediction targets targets[i], ..., targets[i + k - 1], -1 past the end."""
    n = targets.shape[0]
    idx = torch.arange(n, device=targets.device)[:, None] + torch.arange(k, device=targets.device)[None, :]
    return torch.where(idx < n, targets[idx.clamp(max=n - 1)], -1)


def mtp_rows(logits: torch.Tensor, target_matrix: torch.Tensor, mtp_weights: torch.Tensor,
             prefix_targets: torch.Tensor, prefix_weight) -> tuple[torch.Tensor, torch.Tensor]:
    """mtp_loss_reference on a block of rows, their targets given as mtp_target_matrix's rows (so blocks of a long
    sequence can be taken one at a time): (losses, d(sum of losses)/d logits), fp32."""
    N, V = logits.shape
    w = torch.as_tensor(mtp_weights, dtype=torch.float32, device=logits.device)
    p = torch.as_tensor(prefix_weight, dtype=torch.float32, device=logits.device)
    u = torch.sigmoid((logits.float() + LOGIT_B) / LOGIT_C).bfloat16().float()
    z = LOGIT_A * u
    lse = torch.logsumexp(z, dim=1)
    rows = torch.arange(N, device=logits.device)
    losses = torch.zeros(N, dtype=torch.float32, device=logits.device)
    hit = torch.zeros(N, V, dtype=torch.float32, device=logits.device)
    for k in range(target_matrix.shape[1]):
        t = target_matrix[:, k]
        ok = (t >= 0) & (t < V)
        tc = t.clamp(min=0, max=V - 1)
        losses += torch.where(ok, w[k] * (lse - z[rows, tc]), 0.0)
        # index_put_ (rows are distinct: no accumulation order) rather than a boolean mask: no data-dependent
        # shape, so FakeTensorMode (the memory estimate) can trace it
        hit.index_put_((rows, tc), torch.where(ok, w[k], 0.0), accumulate=True)
    p_ok = (prefix_targets >= 0) & (prefix_targets < V)
    pc = prefix_targets.clamp(min=0, max=V - 1)
    losses += torch.where(p_ok, p * (lse - z[rows, pc]), 0.0)
    hit.index_put_((rows, pc), torch.where(p_ok, p, 0.0), accumulate=True)
    s_w = w.sum() + torch.where(p_ok, p, 0.0)
    dz = s_w[:, None] * torch.softmax(z, dim=1) - hit
    return losses, dz * (LOGIT_A / LOGIT_C) * u * (1 - u)


def mtp_loss_reference(logits: torch.Tensor, targets: torch.Tensor, mtp_weights, prefix_targets: torch.Tensor,
                       prefix_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token losses (N,), d(sum of losses)/d logits (N, V)) of record #89's training head, the fused kernel's
    math in fp32 (the contract our fused head must meet; it adds grad_scale and the e5m2 rounding of the gradient):

        u = bf16(sigmoid((l + 5) / 7.5)),  z = 23 u,  lse = log sum_v exp z_v          (all V columns)
        loss_i = sum_k w_k (lse_i - z_i[t_{i+k}])   over k with i + k < N (multi-token prediction: the same logits
                 + p (lse_i - z_i[prefix_i])        predict the next K tokens)  when prefix_i >= 0 (prefix loss)
        dz_i   = S_w softmax(z_i) - sum of the weights whose target is that column,
                 S_w = sum of ALL K weights (+ p when prefix_i >= 0): the kernel counts a future target past the
                 sequence's end in the normalizer though not in the loss (its last K - 1 rows; kept as it is)
        dl     = dz * (23 / 7.5) u (1 - u)
    """
    w = torch.tensor([float(x) for x in mtp_weights], dtype=torch.float32)
    return mtp_rows(logits, mtp_target_matrix(targets, len(w)), w, prefix_targets, prefix_weight)


HEAD_CHUNK_ROWS = 1024  # mtp_head_torch's rows per block: 1,024 x 50,304 fp32 logits = 206 MB per temporary


class _MtpHeadTorch(torch.autograd.Function):
    """The training head in torch, block by block of rows (the logits recomputed in the backward, never all held):
    forward losses from mtp_rows; backward dl = g_i * mtp_rows' gradient (the record's kernel gradient, its
    normalizer included), dh = dl W^T, dW = h^T dl, the matmuls in h's dtype."""

    @staticmethod
    def forward(ctx, h, weight, targets, mtp_weights, prefix_targets, prefix_weight):
        tm = mtp_target_matrix(targets, mtp_weights.numel())
        losses = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        for a in range(0, h.shape[0], HEAD_CHUNK_ROWS):
            b = a + HEAD_CHUNK_ROWS
            losses[a:b] = mtp_rows(h[a:b] @ weight, tm[a:b], mtp_weights, prefix_targets[a:b], prefix_weight)[0]
        ctx.save_for_backward(h, weight, tm, mtp_weights, prefix_targets, torch.as_tensor(prefix_weight))
        return losses

    @staticmethod
    def backward(ctx, g):
        h, weight, tm, w, prefix, p = ctx.saved_tensors
        dh = torch.empty_like(h)
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for a in range(0, h.shape[0], HEAD_CHUNK_ROWS):
            b = a + HEAD_CHUNK_ROWS
            dl = (mtp_rows(h[a:b] @ weight, tm[a:b], w, prefix[a:b], p)[1] * g[a:b, None].float()).to(h.dtype)
            dh[a:b] = dl @ weight.t()
            dw += (h[a:b].t() @ dl).float()
        return dh, dw.to(weight.dtype), None, None, None, None


def mtp_head_torch(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor,
                   prefix_targets: torch.Tensor, prefix_weight) -> torch.Tensor:
    """Per-token losses (N,) of the training head for h (N, C), weight (C, V) (the ops seam's torch mtp_head)."""
    w = torch.as_tensor(mtp_weights, dtype=torch.float32, device=h.device)
    return _MtpHeadTorch.apply(h, weight, targets, w, prefix_targets, prefix_weight)


# The record's FP8 LM head (training only) [H1225 CastedLinearT(..., x_s=100/448, w_s=1.6/448,
# grad_s=grad_scale * 0.75/448); its FusedSoftcappedCrossEntropy and mm_t ops]: h and the weight in e4m3 at fixed
# scales, the logits the scaled matmul's bf16, the logits' gradient in e5m2.
FP8_HEAD_X_S, FP8_HEAD_W_S, FP8_HEAD_GRAD_S = 100 / 448, 1.6 / 448, 0.75 / 448


class _MtpHeadFp8Reference(torch.autograd.Function):
    """mtp_rows on the logits of kernels/fp8.reference_fp8_linear (the head's FP8 rule, its forward and backward)."""

    @staticmethod
    def forward(ctx, h, weight, targets, mtp_weights, prefix_targets, prefix_weight):
        from tritonrun.kernels.fp8 import reference_fp8_linear

        w = weight.t().float()  # (V, C): reference_fp8_linear's (out, in)
        logits = reference_fp8_linear(h.float(), w, FP8_HEAD_X_S, FP8_HEAD_W_S, 1.0)
        losses, dl = mtp_rows(logits, mtp_target_matrix(targets, mtp_weights.numel()), mtp_weights, prefix_targets,
                              prefix_weight)
        ctx.save_for_backward(h, w, dl)
        ctx.dtypes = (h.dtype, weight.dtype)
        return losses

    @staticmethod
    def backward(ctx, g):
        from tritonrun.kernels.fp8 import reference_fp8_linear

        h, w, dl = ctx.saved_tensors
        scale = float(g.float().abs().max().clamp(min=1e-30)) * FP8_HEAD_GRAD_S  # the record's grad_scale x 0.75 / 448
        _, dh, dw = reference_fp8_linear(h.float(), w, FP8_HEAD_X_S, FP8_HEAD_W_S, scale, dy=dl * g.float()[:, None])
        return dh.to(ctx.dtypes[0]), dw.t().to(ctx.dtypes[1]), None, None, None, None


def mtp_head_fp8_reference(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor,
                           prefix_targets: torch.Tensor, prefix_weight) -> torch.Tensor:
    """The record's training head with its FP8 rule, in torch (fp64-free emulation through torch's fp8 casts; all rows
    at once: small shapes): h (N, C) and weight (C, V) to e4m3 at FP8_HEAD_X_S / FP8_HEAD_W_S, logits = the bf16 of
    their scaled product, losses and gradient as mtp_rows; backward: the gradient to e5m2 at the record's scale
    (0.75 / 448 x the loss scale), dh in bf16, dW in fp32, from the quantized operands. Ours runs the head in bf16
    (a deviation: bench/record89_head.py compares the two in training); this is the contract an FP8 head would meet."""
    w = torch.as_tensor(mtp_weights, dtype=torch.float32, device=h.device)
    return _MtpHeadFp8Reference.apply(h, weight, targets, w, prefix_targets, prefix_weight)

