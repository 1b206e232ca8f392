"""The speedrun model and recipe: modded-nanogpt's 2024-11-10 record (#11, "U-net pattern skip connections &
double lr"; records/track_1_short/2024-11-10_UNetDoubleLr/, 8xH100, 3000 steps x 524,288 tokens = 1.57B
tokens, final val loss 3.2753 on the first 10,485,760 FineWeb val tokens). Written from the record's
description (its log embeds the script); the code is ours.

Top to bottom: SpeedrunConfig (every hyperparameter, its source beside it), the lr and Muon-momentum schedules,
then the model. What differs from GPT-2 (gpt2/model.py):

  embedding   wte lookup (gpt2/embedding.py, deterministic backward under torch.compile, as gpt2/model.py),
              then a weightless RMSNorm; no position embedding (RoPE inside attention).
              x0 = that normalized embedding is kept for the whole forward pass.
  block       x = lambdas[0] * x + lambdas[1] * x0                   learnable, init [1, 0]
              x = x + attn(rms_norm(x));  x = x + mlp(rms_norm(x))    pre-norm, RMSNorm without weight
  attention   separate c_q, c_k, c_v (Muon orthogonalizes each C x C matrix on its own), no biases.
              v = (1 - lamb) * v + lamb * v1, v1 the first block's v (value residual, lamb init 0.5);
              q, k: RMSNorm over each head's D, then RoPE (base 10000, rotation on halves); 6 heads of 128.
  mlp         c_fc (C -> 4C), ReLU^2, c_proj (4C -> C); no biases.
  U-net       the first n_layer/2 blocks are the encoder and keep their outputs; decoder block i first adds
              skip_weights[i] * (the encoder output mirrored to it: the last one first), skip_weights init 1.
  head        final RMSNorm, untied lm_head (zero-init), logits z -> 30 tanh(z / 30) (softcap), fp32 softmax.
  init        output projections (attn and MLP c_proj) and lm_head zero; c_q, c_k, c_v, c_fc nn.Linear's default
              (the record's CastedLinear is an nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))); wte
              nn.Embedding's default N(0, 1).

Every op a Triton kernel can replace goes through `self.ops` (gpt2/ops.py: rms_norm, add_rms_norm, mix_rms_norm
(the x0 mix fused with the attention's input norm: kernels/rmsnorm.py counts the bytes it saves), relu2,
qk_norm_rope, attention, linear_cross_entropy with softcap). The U-net skips are plain torch.

Precision: the record casts the whole model to bf16 and keeps only its CastedLinear weights (c_q ... lm_head) in
fp32, cast to bf16 in each matmul. We keep every parameter in fp32 (master weights) and run under bf16 autocast,
as the GPT-2 track does: the matmuls are bf16 as in the record; wte, the scalars and the residual stream stay fp32.
Likewise the RoPE tables (bf16 in the record) and the softcap's tanh (on bf16 logits in the record) are fp32 here.

Padded vocabulary (50257 -> 50304 rows of wte and lm_head, as the record): padded wte rows are zero and never
looked up; padded lm_head rows are sliced off before the softmax (never receive loss or gradient, never sampled),
the same guarantees as gpt2/model.py. The record instead softmaxes over all 50304 logits (its padded logits enter
the normalizer and get pushed down); we keep the model's guarantee, a deliberate difference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from gpt2.embedding import embedding
from gpt2.ops import Ops, get_ops

# Source key: [script] = the script embedded in the record's log (the class, field or call named); [log] = the
# log's lines; [measured] = checked here against torch. The log: KellerJordan/modded-nanogpt,
# records/track_1_short/2024-11-10_UNetDoubleLr/c87bb826-797b-4f37-98c7-d3a5dad2de74.txt.
RECORD_VAL_LOSS = 3.2753  # [log] step:3000/3000 val_loss:3.2753; first <= 3.28 there (3.2858 at step 2875)
RECORD_NAME = "2024-11-10 U-net pattern skip connections & double lr (modded-nanogpt record #11)"


@dataclass(frozen=True)
class SpeedrunConfig:
    # ---- model [script: GPTConfig, GPT, Block, CausalSelfAttention, MLP, Rotary]
    block_size: int = 1024  # context length; sizes the RoPE tables [Hyperparameters.sequence_length]
    vocab_size: int = 50257  # real GPT-2 vocabulary; classes of the softmax
    padded_vocab_size: int = 50304  # wte and lm_head rows [num_vocab = 50304, "nearest multiple of 128"]
    n_layer: int = 12  # [GPTConfig(n_layer=12)]; even: half encoder, half decoder (U-net)
    n_head: int = 6  # [GPTConfig(n_head=6), "head dim 128"]
    n_embd: int = 768  # [GPTConfig(n_embd=768)]
    mlp_ratio: int = 4  # c_fc width 4 * n_embd [MLP]
    rope_base: float = 10000.0  # [Rotary(dim, base=10000)]
    # F.rms_norm(x, (C,)) with eps=None everywhere [script]: torch then adds the fp32 machine epsilon, for bf16
    # inputs too (its statistic runs in fp32) [measured, torch 2.13: rms_norm(1e-4 * ones) in bf16 = 0.279].
    norm_eps: float = 1.1920928955078125e-07
    logit_softcap: float = 30.0  # logits = 30 * tanh(logits / 30) [GPT.forward]
    value_lamb_init: float = 0.5  # v = (1 - lamb) v + lamb v1 [CausalSelfAttention.lamb]
    block_lambdas_init: tuple[float, float] = (1.0, 0.0)  # x = l0 x + l1 x0 [Block.lambdas]
    skip_weight_init: float = 1.0  # U-net skip weights [GPT.skip_weights = ones(decoder_layers)]
    # ---- optimizers [script: optimizer1..4]; the record builds four, SpeedrunGPT.optimizer_groups() splits alike
    wte_lr: float = 0.6  # Adam on transformer.wte.weight [optimizer1]
    lm_head_lr: float = 0.008  # Adam on lm_head.weight [optimizer2]
    scalar_lr: float = 0.04  # Adam: block lambdas, attn lamb, skip_weights [optimizer4: "neither sensitive nor tuned"]
    adam_betas: tuple[float, float] = (0.9, 0.95)  # all three Adams [betas=(0.9, 0.95)]
    adam_eps: float = 1e-8  # torch.optim.Adam's default (the record passes none)
    weight_decay: float = 0.0  # [Hyperparameters.weight_decay = 0]; plain Adam, no decay anywhere
    muon_lr: float = 0.04  # Muon on every 2-D matrix inside the blocks [optimizer3 = Muon(lr=0.04)]
    muon_momentum: float = 0.95  # [Muon(momentum=0.95)], reached after the warmup below
    muon_momentum_warmup_start: float = 0.85  # momentum = (1-f) 0.85 + f 0.95, f = min(step / 500, 1) [script]
    muon_momentum_warmup_steps: int = 500  # [frac = min(step/500, 1)]
    muon_nesterov: bool = True  # [Muon(nesterov=True) default]: update g + momentum * buf
    muon_ns_steps: int = 5  # Newton-Schulz iterations [backend_steps=5]
    muon_ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)  # quintic (a, b, c) [script]
    muon_ns_eps: float = 1e-7  # X = G / (||G||_F + eps), in bf16 [zeropower_via_newtonschulz5]
    # Muon's update is scaled by max(1, rows / cols) ** 0.5 of each (out, in) weight [Muon.step]: 2 for c_fc.
    # Polar Express (per-step coefficients) is issue 26's option, not the record's.
    muon_orthogonalizer: str = "newton_schulz"  # "newton_schulz" (the record) | "polar_express"
    grad_clip: float = 0.0  # the record clips nothing
    # ---- schedule and batch [script: Hyperparameters, get_lr]
    total_batch_tokens: int = 524288  # batch_size 8*64 sequences x 1024 tokens = 2^19
    device_batch_size: int = 64  # sequences per GPU per micro-step, 8 GPUs, no accumulation [device_batch_size]
    num_iterations: int = 3000  # steps [num_iterations]; 3000 x 524,288 = 1.57B tokens
    warmup_iters: int = 0  # [warmup_iters = 0]: lr starts at full value
    warmdown_iters: int = 900  # linear to 0 over the last 900 steps [warmdown_iters]
    val_every: int = 125  # [val_loss_every]
    val_tokens: int = 10485760  # first 10,485,760 tokens of fineweb_val_000000.bin [val_tokens]

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} is odd: RoPE rotates pairs (x[:D/2], x[D/2:])")
        if self.n_layer < 2 or self.n_layer % 2:
            raise ValueError(f"n_layer {self.n_layer}: the U-net needs an even number of blocks, at least 2")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if not 0 <= self.warmup_iters + self.warmdown_iters <= self.num_iterations:
            raise ValueError(f"warmup_iters {self.warmup_iters} + warmdown_iters {self.warmdown_iters} exceed "
                             f"num_iterations {self.num_iterations}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpeedrunConfig:
        """The inverse of to_dict after a JSON round trip (lists back to the tuple fields)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


# "d12" is the record; "tiny" is for CPU tests and smoke runs (2 blocks = 1 encoder + 1 decoder, head dim 32 as
# the attention kernel supports 32/64/128); everything but the sizes is the record's.
SPEEDRUN_MODELS: dict[str, SpeedrunConfig] = {
    "d12": SpeedrunConfig(),
    "tiny": SpeedrunConfig(block_size=256, n_layer=2, n_head=2, n_embd=64),
}


# ---------------------------------------------------------------------------------------------- schedules


def speedrun_lr_multiplier(step: int, cfg: SpeedrunConfig) -> float:
    """The factor on every group's lr (all four optimizers) at 0-based `step`, as the record's get_lr: linear
    warmup over warmup_iters (none in the record), constant 1, then linear to 0 over the last warmdown_iters:
    (num_iterations - step) / warmdown_iters, which is 1 at step num_iterations - warmdown_iters (2100) and
    1/900 at the last step (2999)."""
    if not 0 <= step <= cfg.num_iterations:
        raise ValueError(f"step {step} outside the schedule's 0..{cfg.num_iterations}")
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if step < cfg.num_iterations - cfg.warmdown_iters:
        return 1.0
    return (cfg.num_iterations - step) / cfg.warmdown_iters


def speedrun_muon_momentum(step: int, cfg: SpeedrunConfig) -> float:
    """Muon's momentum at 0-based `step`: linear from 0.85 at step 0 to 0.95 at step 500, then constant."""
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


# ---------------------------------------------------------------------------------------------- the model


def rope_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of position t times frequency base^(-2i/D), i < D/2: (seq_len, D/2) fp32 (computed in fp64;
    the record computes them in fp32 and stores bf16)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SpeedrunConfig, ops: Ops):
        super().__init__()
        C = config.n_embd
        self.n_head, self.eps, self.ops = config.n_head, config.norm_eps, ops
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, C, bias=False)
        self.c_v = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.c_proj.zero_init = True
        self.lamb = nn.Parameter(torch.tensor(config.value_lamb_init))  # value-residual mix

    def forward(self, x: torch.Tensor, v1: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor):
        """x (B, T, C) normalized input; v1 the first block's values (None in the first block). Returns the
        attention output (B, T, C) and v1."""
        B, T, C = x.shape
        H = self.n_head
        q = self.c_q(x).view(B, T, H, C // H)
        k = self.c_k(x).view(B, T, H, C // H)
        v = self.c_v(x).view(B, T, H, C // H)
        if v1 is None:
            v1 = v  # the first block: the mix below is v itself
        v = (1 - self.lamb) * v + self.lamb * v1
        q, k = self.ops.qk_norm_rope(q, k, cos, sin, self.eps)  # -> (B, H, T, D)
        y = self.ops.attention(q, k, v.transpose(1, 2))  # (B, H, T, D), scale 1/sqrt(D)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)), v1


class MLP(nn.Module):
    def __init__(self, config: SpeedrunConfig, ops: Ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.mlp_ratio * config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.mlp_ratio * config.n_embd, config.n_embd, bias=False)
        self.c_proj.zero_init = True
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.ops.relu2(self.c_fc(x)))


class Block(nn.Module):
    """Parameters in the record's order (attn, mlp, lambdas): Muon's DDP round-robin follows it."""

    def __init__(self, config: SpeedrunConfig, ops: Ops):
        super().__init__()
        self.attn = CausalSelfAttention(config, ops)
        self.mlp = MLP(config, ops)
        self.lambdas = nn.Parameter(torch.tensor(config.block_lambdas_init))  # x = l0 x + l1 x0


class SpeedrunGPT(nn.Module):
    def __init__(self, config: SpeedrunConfig, ops: Ops | None = None):
        super().__init__()
        self.config = config
        self.ops = ops if ops is not None else get_ops("torch")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            h=nn.ModuleList(Block(config, self.ops) for _ in range(config.n_layer)),
        ))
        self.n_encoder = config.n_layer // 2
        self.skip_weights = nn.Parameter(torch.full((config.n_layer - self.n_encoder,), config.skip_weight_init))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.zero_init = True
        cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2) fp32, not in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The record's init: zero for attn/MLP c_proj and lm_head; nn.Linear's default (kaiming-uniform with
        a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) for c_q, c_k, c_v, c_fc; N(0, 1) for wte (padded
        rows zeroed, as gpt2/model.py; they are never looked up); the scalars from the config."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if getattr(module, "zero_init", False):
                    nn.init.zeros_(module.weight)
                else:
                    module.reset_parameters()
            elif isinstance(module, CausalSelfAttention):
                module.lamb.fill_(c.value_lamb_init)
            elif isinstance(module, Block):
                module.lambdas.copy_(torch.tensor(c.block_lambdas_init))
        nn.init.normal_(self.transformer.wte.weight, mean=0.0, std=1.0)
        self.transformer.wte.weight[c.vocab_size:].zero_()
        self.skip_weights.fill_(c.skip_weight_init)

    def num_parameters(self, include_padding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_padding:  # padded rows of wte and of lm_head
            n -= 2 * (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token for MFU: 6 * M + 6 * L * H * D * T.
        M = matmul parameters: every 2-D weight except the wte lookup table, the head counted over its
        vocab_size real rows (padded rows are tiling work, as gpt2/model.py leaves them out); 6 = 2 (multiply-add)
        x 3 (forward, two backward matmuls). Attention: llm.c's / PaLM's 6 * L * C * T term with C = H * D
        (q k^T and p v, 2 * 2 * T * H * D per token forward, x 3 with backward, halved for the causal mask).
        Lookups (wte) and elementwise ops (norms, RoPE, ReLU^2, softcap, scalar mixes) are not counted."""
        c = self.config
        matmul = sum(p.numel() for name, p in self.named_parameters()
                     if p.dim() == 2 and name != "transformer.wte.weight")
        matmul -= (c.padded_vocab_size - c.vocab_size) * c.n_embd  # lm_head's padded rows
        return 6 * matmul + 6 * c.n_layer * c.n_head * c.head_dim * seq_len

    def optimizer_groups(self) -> dict[str, list[dict]]:
        """The record's optimizer split, every parameter exactly once:
          "adam": wte (lr 0.6), lm_head (lr 0.008), scalars = block lambdas, attn lamb, skip_weights (lr 0.04);
                  betas (0.9, 0.95), eps 1e-8, no weight decay (config.adam_betas, adam_eps, weight_decay)
          "muon": every 2-D matrix inside the blocks (c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj), lr 0.04,
                  momentum 0.95 (warmed up from 0.85: speedrun_muon_momentum), in the record's order.
        Each group: {"name", "params", "lr", "weight_decay"} (+ "momentum" for Muon); "lr" is the base lr that
        speedrun_lr_multiplier scales. One Adam over the three groups equals the record's three Adams."""
        c, blocks = self.config, list(self.transformer.h.parameters())
        matrices = [p for p in blocks if p.dim() == 2]
        scalars = [p for p in blocks if p.dim() < 2] + [self.skip_weights]
        wd = c.weight_decay
        return {
            "adam": [
                {"name": "wte", "params": [self.transformer.wte.weight], "lr": c.wte_lr, "weight_decay": wd},
                {"name": "lm_head", "params": [self.lm_head.weight], "lr": c.lm_head_lr, "weight_decay": wd},
                {"name": "scalars", "params": scalars, "lr": c.scalar_lr, "weight_decay": wd},
            ],
            "muon": [
                {"name": "matrices", "params": matrices, "lr": c.muon_lr, "weight_decay": wd,
                 "momentum": c.muon_momentum},
            ],
        }

    # --------------------------------------------------------------------------------- forward
    def hidden(self, idx: torch.Tensor) -> torch.Tensor:
        """Final hidden states rms_norm(x), (B, T, C)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        ops, eps, h = self.ops, self.config.norm_eps, self.transformer.h
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        # x is the residual stream; x0 feeds every block. The lookup's backward stays deterministic under
        # torch.compile (gpt2/embedding.py: Inductor would lower nn.Embedding's to an atomic scatter-add).
        x = x0 = ops.rms_norm(embedding(idx, self.transformer.wte.weight), eps)
        v1, skips = None, []
        for i, block in enumerate(h):
            if i >= self.n_encoder:  # decoder: the mirrored encoder output, the last stored first
                x = x + self.skip_weights[i - self.n_encoder] * skips.pop()
            y, x = ops.mix_rms_norm(x, x0, block.lambdas, eps)  # x = l0 x + l1 x0; y = rms_norm(x) feeds attention
            a, v1 = block.attn(y, v1, cos, sin)
            y, x = ops.add_rms_norm(a, x, eps)  # x = x + attn; y = rms_norm(x) feeds the MLP
            m = block.mlp(y)
            if i + 1 < len(h):
                x = x + m
                if i < self.n_encoder:
                    skips.append(x)
            else:
                y, x = ops.add_rms_norm(m, x, eps)  # the last block: its residual add and the final norm
        return y

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """With targets: the mean cross-entropy loss of the softcapped logits (targets == -1 are ignored).
        Without: softcapped logits over the real vocabulary, (B, T, vocab_size), at least fp32."""
        y = self.hidden(idx)
        if targets is None:
            return self.logits(y)
        c = self.config
        return self.ops.linear_cross_entropy(y.reshape(-1, c.n_embd), self.lm_head.weight, targets.reshape(-1),
                                             -1, c.vocab_size, softcap=c.logit_softcap)

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """LM head over the real vocabulary only (padded rows can never be sampled), softcapped in fp32 (fp64 for
        an fp64 model)."""
        cap = self.config.logit_softcap
        z = y @ self.lm_head.weight[: self.config.vocab_size].T
        return cap * torch.tanh(z.to(torch.promote_types(z.dtype, torch.float32)) / cap)
