"""The speedrun models and recipes, modded-nanogpt records (KellerJordan/modded-nanogpt, 8xH100), written from the
records' descriptions (each log embeds its script); the code is ours. One config class and one model class hold both:

  --recipe speedrun        the 2024-12-17 record (#17, "Sparsify value embeddings, improve rotary embeddings, drop an
                           attn layer"; records/track_1_short/2024-12-17_SparsifyEmbeds/, 1490 steps x 524,288 tokens
                           = 0.78B tokens, final val loss 3.2794): SpeedrunConfig()'s defaults, SPEEDRUN_MODELS.
  --recipe speedrun-dense  the 2024-11-10 record (#11, "U-net pattern skip connections & double lr";
                           records/track_1_short/2024-11-10_UNetDoubleLr/, 3000 steps x 524,288 tokens = 1.57B,
                           val 3.2753): SpeedrunConfig(**DENSE_1110), SPEEDRUN_DENSE_MODELS. The last dense T = 1024
                           record; a checkpoint of it written before the 12-17 recipe (no "attention" field in its
                           config) loads as this one (SpeedrunConfig.from_dict).

Top to bottom: SpeedrunConfig (every hyperparameter, its source beside it), DENSE_1110, the lr, Muon-momentum and
window schedules, then the model. What differs from GPT-2 (tritonrun/gpt2/model.py), both records:

  embedding   wte lookup (tritonrun/gpt2/embedding.py, deterministic backward under torch.compile, as
              tritonrun/gpt2/model.py), then a weightless RMSNorm; no position embedding (RoPE inside attention).
              x0 = that normalized embedding is kept for the whole forward pass.
  block       x = lambdas[0] * x + lambdas[1] * x0                   learnable, init [1, 0]
              x = x + attn(rms_norm(x));  x = x + mlp(rms_norm(x))    pre-norm, RMSNorm without weight
  attention   separate c_q, c_k, c_v (Muon orthogonalizes each C x C matrix on its own), no biases;
              q, k: RMSNorm over each head's D, then RoPE (rotation on halves); 6 heads of 128, scale 1/sqrt(D).
  mlp         c_fc (C -> 4C), ReLU^2, c_proj (4C -> C); no biases.
  U-net       the first n_layer/2 blocks are the encoder and keep their outputs; decoder block i first adds
              skip_weights[i] * (the encoder output mirrored to it: the last one first), skip_weights init 1.
  head        final RMSNorm, untied lm_head (zero-init), logits z -> 30 tanh(z / 30) (softcap), fp32 softmax.
  init        output projections (attn and MLP c_proj) and lm_head zero; c_q, c_k, c_v, c_fc nn.Linear's default
              (the records' CastedLinear is an nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))); wte and the value
              embeddings nn.Embedding's default N(0, 1).

What the 2024-12-17 record changes (attention = "window", value_embeds = 3):
  data        one packed sequence of 64K tokens per GPU per step (B = 1), documents delimited by EOT; here
              data/loader.PackedLoader (doc_aligned: see the field), cu_seqlens from the EOT positions.
  attention   document-masked sliding window (ops.window_attention: tritonrun/kernels/window_attention.py under triton):
              query i sees key j iff same document and 0 <= i - j < window. The window grows with the step in
              blocks of 128 tokens, 128 -> 1,792 (speedrun_window). The record's mask is block-granular (FlexAttention
              block mask: q_block - kv_block < n, token-causal and document mask inside); ours is the token-exact
              window of n * 128 tokens, so a query sees up to n * 128 keys where the record's sees
              128 (n - 1) + 1 + (i mod 128), 63.5 fewer on average: a deliberate difference (the kernel's rule).
  values      3 value-embedding tables (vocab x C lookups); layers 0, 1, 2 use tables 0, 1, 2 and layers 9, 10, 11
              (n_layer - 3 ..) use them again in the same order (the U-net pattern); layers 3..8 get none.
              v = lambdas[0] * v + lambdas[1] * ve (lambdas[0] * v where none), lambdas init [0.5, 0.5]; the 11-10
              value residual (mix with block 0's v) is gone.
  layers      block 7 has no attention (x = x + mlp(rms_norm(x)) only).
  rotary      D/4 frequencies (1/1024)^linspace(0, 1, D/4) and D/4 zero frequencies (those pairs are not rotated),
              on the same halves rotation; the 11-10 record: 10000^(-2i/D), i < D/2.
  embeddings  wte and the value tables have vocab_size (50257) rows, unpadded; lm_head keeps 50304.
  optimizers  value embeddings join wte's Adam (lr 0.6); Adam betas (0.8, 0.95); Muon lr 0.05, momentum as an
              EMA (buf = lerp(buf, g, 1 - mu), Nesterov lerp(g, buf, mu)) warmed 0.85 -> 0.95 over 300 steps.
  schedule    1490 steps, no warmup, linear cooldown to 0 over the last 600.

Every op a Triton kernel can replace goes through `self.ops` (tritonrun/gpt2/ops.py: rms_norm, add_rms_norm,
mix_rms_norm (the x0 mix fused with the attention's input norm: tritonrun/kernels/rmsnorm.py counts the bytes it saves),
relu2, qk_norm_rope, attention or window_attention, linear_cross_entropy with softcap). U-net skips and value mixes are
plain torch.

Precision: the records cast the whole model to bf16 and keep only their CastedLinear weights (c_q ... lm_head) in
fp32, cast to bf16 in each matmul. We keep every parameter in fp32 (master weights) and run under bf16 autocast,
as the GPT-2 track does: the matmuls are bf16 as in the records; wte, the value tables, the scalars and the
residual stream stay fp32 (a value embedding is cast to v's dtype before the mix). Likewise the RoPE tables
(bf16 in the records) and the softcap's tanh (on bf16 logits in the records) are fp32 here.

Padded vocabulary (lm_head 50257 -> 50304 rows, as the records; wte too in the 11-10 record): padded rows are zero
and never looked up; padded lm_head rows are sliced off before the softmax (never receive loss or gradient, never
sampled), the same guarantees as tritonrun/gpt2/model.py. The records instead softmax over all 50304 logits (their
padded logits enter the normalizer and get pushed down); we keep the model's guarantee, a deliberate difference.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from tritonrun.gpt2.embedding import embedding
from tritonrun.gpt2.ops import Ops, get_ops, torch_window_attention, torch_window_mask

# Source key: [script] = the script embedded in the record's log (the class, field or call named); [log] = the
# log's lines; [measured] = checked here against torch. The logs: KellerJordan/modded-nanogpt,
# records/track_1_short/2024-12-17_SparsifyEmbeds/165384d5-5a41-4fba-9b79-8ecc372616ea.txt (SpeedrunConfig's
# defaults) and records/track_1_short/2024-11-10_UNetDoubleLr/c87bb826-797b-4f37-98c7-d3a5dad2de74.txt (DENSE_1110).
RECORD_VAL_LOSS = 3.2794  # [log] step:1490/1490 val_loss:3.2794; first <= 3.28 there (3.3016 at step 1375)
RECORD_NAME = ("2024-12-17 Sparsify value embeddings, improve rotary embeddings, drop an attn layer "
               "(modded-nanogpt record #17)")
DENSE_RECORD_VAL_LOSS = 3.2753  # [11-10 log] step:3000/3000 val_loss:3.2753; first <= 3.28 there (3.2858 at 2875)
DENSE_RECORD_NAME = "2024-11-10 U-net pattern skip connections & double lr (modded-nanogpt record #11)"

ATTENTION_KINDS = ("window", "dense")
ROPE_KINDS = ("half", "standard")
MUON_MOMENTUM_FORMS = ("ema", "sum")


@dataclass(frozen=True)
class SpeedrunConfig:
    """The 2024-12-17 record by default ([script] / [log] below are that record's); DENSE_1110 gives the 11-10."""
    # ---- model [script: GPTConfig, GPT, Block, CausalSelfAttention, MLP, Rotary, ValueEmbedding]
    block_size: int = 65536  # longest sequence; sizes the RoPE tables [Rotary(max_seq_len=65536);
    #                          Hyperparameters.sequence_length = 64*1024]
    vocab_size: int = 50257  # real GPT-2 vocabulary; classes of the softmax [GPTConfig(vocab_size=50257)]
    padded_vocab_size: int = 50304  # lm_head rows [lm_head = CastedLinear(768, vocab_size_next_multiple_of(128))]
    pad_embeddings: bool = False  # wte / value tables with padded_vocab_size rows? [embed = nn.Embedding(vocab_size)]
    n_layer: int = 12  # [GPTConfig(num_layers=12)]; even: half encoder, half decoder (U-net)
    n_head: int = 6  # [GPTConfig(num_heads=6), "head dim 128"]
    n_embd: int = 768  # [GPTConfig(model_dim=768)]
    mlp_ratio: int = 4  # c_fc width 4 * n_embd [MLP]
    rope_kind: str = "half"  # D/4 frequencies (1/base)^linspace(0, 1, D/4) + D/4 zeros [Rotary]; "standard" 11-10's
    rope_base: float = 1024.0  # [Rotary: inv_freq = (1 / 1024) ** torch.linspace(0.0, 1.0, steps=dim // 4)]
    # F.rms_norm(x, (C,)) with eps=None everywhere [script: norm]: torch then adds the fp32 machine epsilon, for
    # bf16 inputs too (its statistic runs in fp32) [measured, torch 2.13: rms_norm(1e-4 * ones) in bf16 = 0.279].
    norm_eps: float = 1.1920928955078125e-07
    logit_softcap: float = 30.0  # logits = 30 * tanh(logits / 30) [GPT.forward]
    attention: str = "window"  # document-masked sliding window [flex_attention(block_mask=...)]; "dense": causal
    no_attention_layers: tuple[int, ...] = (7,)  # blocks without attention [Block: `if layer_idx != 7`]
    value_embeds: int = 3  # value-embedding tables [ValueEmbedding: 3 x nn.Embedding]; layers 0..k-1 take tables
    #                        0..k-1, the last k layers the same in order, the rest none [ve[0], ve[1], ve[2], None x 6,
    #                        ve[0], ve[1], ve[2]]; 0: the 11-10 value residual (v mixed with block 0's v, value_lamb)
    attn_lambdas_init: tuple[float, float] = (0.5, 0.5)  # v = l0 v + l1 ve [CausalSelfAttention.lambdas]
    value_lamb_init: float = 0.5  # value_embeds 0 only: v = (1 - lamb) v + lamb v1 [11-10 CausalSelfAttention.lamb]
    block_lambdas_init: tuple[float, float] = (1.0, 0.0)  # x = l0 x + l1 x0 [Block.lambdas]
    skip_weight_init: float = 1.0  # U-net skip weights [GPT.skip_weights = ones(num_decoder_layers)]
    # ---- the window schedule [script: training loop, create_doc_swc_block_mask], attention "window" only:
    # blocks = int(((1 - f) * 64 + f * 1792 + 64) // 128), f = step / num_iterations; window = blocks * 128 tokens
    window_block: int = 128  # [BLOCK_SIZE = 128]
    window_start: int = 64  # tokens at f = 0 [(1 - frac_done) * 64]: 1 block
    window_end: int = 1792  # tokens at f = 1 [frac_done * 1792]: 14 blocks
    # The data order is the run's, not the model's: --doc-aligned (tritonrun/train.py; default off, the 12-17 record's
    # contiguous 64K windows [DistributedDataLoader]; on: every sequence starts at a document, the 2025-07-12
    # BosAlign rule). This field is no longer read; it stays so that checkpoints written with it load.
    doc_aligned: bool = True
    # ---- optimizers [script: optimizer1..4]; SpeedrunGPT.optimizer_groups() splits alike
    wte_lr: float = 0.6  # Adam on wte AND the value-embedding tables [optimizer1 = Adam(embed_params, lr=0.6)]
    lm_head_lr: float = 0.008  # Adam on lm_head.weight [optimizer2, lr=0.008]
    scalar_lr: float = 0.04  # Adam: block lambdas, attn lambdas, skip_weights [optimizer4, lr=0.04]
    adam_betas: tuple[float, float] = (0.8, 0.95)  # all three Adams [betas=(0.8, 0.95)]
    adam_eps: float = 1e-8  # torch.optim.Adam's default (the record passes none)
    weight_decay: float = 0.0  # [Hyperparameters.weight_decay = 0]; plain Adam, no decay anywhere
    muon_lr: float = 0.05  # Muon on every 2-D matrix inside the blocks [optimizer3 = Muon(lr=0.05)]
    muon_momentum: float = 0.95  # [Muon(momentum=0.95)], reached after the warmup below
    muon_momentum_warmup_start: float = 0.85  # momentum = (1-f) 0.85 + f 0.95, f = min(step / 300, 1) [script]
    muon_momentum_warmup_steps: int = 300  # [frac = min(step/300, 1)]
    # "ema": buf = lerp(buf, g, 1 - mu), Nesterov update lerp(g, buf, mu) [Muon.step: buf.lerp_(g, 1 - momentum);
    # g.lerp_(buf, momentum)]; "sum": buf = mu buf + g, update g + mu buf (the 11-10 record). Newton-Schulz
    # normalizes the update, so the two differ only while mu changes (the warmup).
    muon_momentum_form: str = "ema"
    muon_nesterov: bool = True  # [Muon(nesterov=True) default]
    muon_ns_steps: int = 5  # Newton-Schulz iterations [Muon(ns_steps=5)]
    muon_ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)  # quintic (a, b, c) [script]
    muon_ns_eps: float = 1e-7  # X = G / (||G||_F + eps), in bf16 [zeropower_via_newtonschulz5]
    # Muon's update is scaled by max(1, rows / cols) ** 0.5 of each (out, in) weight [Muon.step]: 2 for c_fc.
    # Polar Express (per-step coefficients) is issue 26's option, not the record's.
    muon_orthogonalizer: str = "newton_schulz"  # "newton_schulz" (the record) | "polar_express"
    grad_clip: float = 0.0  # the record clips nothing
    # ---- schedule and batch [script: Hyperparameters, get_lr]
    total_batch_tokens: int = 524288  # batch_size 8 sequences x sequence_length 64*1024 [Hyperparameters]
    device_batch_size: int = 1  # sequences per GPU per micro-step [assert B == 1, "for FlexAttention"]
    record_gpus: int = 8  # 8 GPUs x 1 x 65,536 tokens, no accumulation [train_accumulation_steps = 8 // 8; log]
    num_iterations: int = 1490  # steps [num_iterations]; 1490 x 524,288 = 0.78B tokens
    warmup_iters: int = 0  # [warmup_iters = 0]: lr starts at full value
    warmdown_iters: int = 600  # linear to 0 over the last 600 steps [cooldown_iters = 600]: 40.3 % of the run
    val_every: int = 125  # [val_loss_every]
    val_tokens: int = 10485760  # first 10,485,760 tokens of fineweb_val_000000.bin [val_tokens]

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"head dim {self.head_dim} is odd: RoPE rotates pairs (x[:D/2], x[D/2:])")
        if self.rope_kind == "half" and self.head_dim % 4:
            raise ValueError(f"head dim {self.head_dim} is not a multiple of 4: rope_kind 'half' rotates D/4 pairs")
        if self.n_layer < 2 or self.n_layer % 2:
            raise ValueError(f"n_layer {self.n_layer}: the U-net needs an even number of blocks, at least 2")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")
        if not 0 <= self.warmup_iters + self.warmdown_iters <= self.num_iterations:
            raise ValueError(f"warmup_iters {self.warmup_iters} + warmdown_iters {self.warmdown_iters} exceed "
                             f"num_iterations {self.num_iterations}")
        for name, value, known in (("attention", self.attention, ATTENTION_KINDS),
                                   ("rope_kind", self.rope_kind, ROPE_KINDS),
                                   ("muon_momentum_form", self.muon_momentum_form, MUON_MOMENTUM_FORMS)):
            if value not in known:
                raise ValueError(f"{name} {value!r}: choose one of {', '.join(known)}")
        if not 0 <= 2 * self.value_embeds <= self.n_layer:
            raise ValueError(f"value_embeds {self.value_embeds}: the first and the last value_embeds layers take "
                             f"the tables, 2 x {self.value_embeds} > n_layer {self.n_layer}")
        if any(not 0 <= i < self.n_layer for i in self.no_attention_layers):
            raise ValueError(f"no_attention_layers {self.no_attention_layers} outside 0..{self.n_layer - 1}")
        if self.value_embeds == 0 and 0 in self.no_attention_layers:
            raise ValueError("value_embeds 0 mixes every block's v with block 0's: block 0 needs its attention")
        if self.window_block < 1 or not 1 <= self.window_start <= self.window_end:
            raise ValueError(f"window schedule: window_block {self.window_block} >= 1 and 1 <= window_start "
                             f"{self.window_start} <= window_end {self.window_end} needed")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def embedding_rows(self) -> int:
        """Rows of wte and of each value-embedding table."""
        return self.padded_vocab_size if self.pad_embeddings else self.vocab_size

    @property
    def value_embed_layers(self) -> tuple[int | None, ...]:
        """Per block: the value-embedding table it mixes into v, or None: (0, 1, 2, None x 6, 0, 1, 2) at d12."""
        k, L = self.value_embeds, self.n_layer
        return tuple(i if i < k else i - (L - k) if i >= L - k else None for i in range(L))

    @property
    def attention_layers(self) -> int:
        return self.n_layer - len(set(self.no_attention_layers))

    @property
    def recipe(self) -> str:
        """The trainer's --recipe for this config: "speedrun" (windowed, 12-17) or "speedrun-dense" (11-10)."""
        return "speedrun" if self.attention == "window" else "speedrun-dense"

    @property
    def final_window(self) -> int:
        """The window at the end of the schedule (1,792 tokens): sampling and evaluation outside training use it."""
        return speedrun_window(self.num_iterations, self)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> SpeedrunConfig:
        """The inverse of to_dict after a JSON round trip (lists back to the tuple fields). A dict without
        "attention" is a 2024-11-10 config from before the 12-17 recipe: the fields it lacks take DENSE_1110's
        values (its own fields keep theirs)."""
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "attention" not in d:
            d = {**DENSE_1110, **d}
        return cls(**d)


# The 2024-11-10 record (#11): what differs from the defaults above. [11-10 script / log]
DENSE_1110: dict = dict(
    block_size=1024,  # context length [Hyperparameters.sequence_length = 1024]
    pad_embeddings=True,  # wte has 50304 rows too [embed = nn.Embedding(num_vocab = 50304)]
    rope_kind="standard",  # base^(-2i/D), i < D/2 [Rotary(dim, base=10000)]
    rope_base=10000.0,
    attention="dense",  # causal over each 1024-token sequence [F.scaled_dot_product_attention(is_causal=True)]
    no_attention_layers=(),  # every block has attention
    value_embeds=0,  # no value embeddings; v = (1 - lamb) v + lamb v1 [CausalSelfAttention.lamb = 0.5]
    adam_betas=(0.9, 0.95),  # [betas=(0.9, 0.95)]
    muon_lr=0.04,  # [Muon(lr=0.04)]
    muon_momentum_warmup_steps=500,  # [frac = min(step/500, 1)]
    muon_momentum_form="sum",  # [buf.mul_(momentum).add_(g); g = g.add(buf, alpha=momentum)]
    device_batch_size=64,  # sequences per GPU per micro-step [device_batch_size = 64], 8 GPUs
    num_iterations=3000,  # [num_iterations = 3000]: 1.57B tokens
    warmdown_iters=900,  # [warmdown_iters = 900]: 30 % of the run
)

# "d12" is the record; "tiny" is for CPU tests and smoke runs; everything but the sizes is the record's.
# 12-17 tiny: 4 blocks (2 encoder + 2 decoder) so the U-net value pattern (table 0 in the first and last block) and a
# block without attention (block 2, a decoder block without a value table, as the record's block 7) both appear;
# head dim 64 (tritonrun/kernels/window_attention.py takes 64 and 128); context 1024 for CPU runs of --seq-len 256-1024.
SPEEDRUN_MODELS: dict[str, SpeedrunConfig] = {
    "d12": SpeedrunConfig(),
    "tiny": SpeedrunConfig(block_size=1024, n_layer=4, n_head=2, n_embd=128, value_embeds=1,
                           no_attention_layers=(2,)),
}
SPEEDRUN_MODELS["mini"] = SPEEDRUN_MODELS["tiny"]  # the recipes A/B's shared shape (gpt2.config "mini") is this one
# 11-10 tiny: 2 blocks = 1 encoder + 1 decoder, head dim 32 (tritonrun/kernels/attention.py supports 32/64/128).
SPEEDRUN_DENSE_MODELS: dict[str, SpeedrunConfig] = {
    "d12": SpeedrunConfig(**DENSE_1110),
    "tiny": SpeedrunConfig(**{**DENSE_1110, "block_size": 256}, n_layer=2, n_head=2, n_embd=64),
    # the recipes A/B's shared shape (gpt2.config "mini"): 4 blocks of 128, 2 heads of 64
    "mini": SpeedrunConfig(**{**DENSE_1110, "block_size": 1024}, n_layer=4, n_head=2, n_embd=128),
}


# ---------------------------------------------------------------------------------------------- schedules


def speedrun_lr_multiplier(step: int, cfg: SpeedrunConfig) -> float:
    """The factor on every group's lr (all four optimizers) at 0-based `step`, as the records' get_lr: linear
    warmup over warmup_iters (none in the records), constant 1, then linear to 0 over the last warmdown_iters:
    (num_iterations - step) / warmdown_iters, which is 1 at step num_iterations - warmdown_iters (890 of 1490)
    and 1/600 at the last step (1489)."""
    if not 0 <= step <= cfg.num_iterations:
        raise ValueError(f"step {step} outside the schedule's 0..{cfg.num_iterations}")
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    if step < cfg.num_iterations - cfg.warmdown_iters:
        return 1.0
    return (cfg.num_iterations - step) / cfg.warmdown_iters


def speedrun_muon_momentum(step: int, cfg: SpeedrunConfig) -> float:
    """Muon's momentum at 0-based `step`: linear from 0.85 at step 0 to 0.95 at step 300 (500: 11-10), then
    constant."""
    frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps else 1.0
    return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum


def speedrun_window(step: int, cfg: SpeedrunConfig) -> int:
    """The attention window in tokens at 0-based `step` (its training step, and the validation after `step` steps):
    a whole number of blocks, blocks = int(((1 - f) * 64 + f * 1792 + 64) // 128), f = step / num_iterations, the
    record's float formula (window_start, window_end, window_block): 1 block at step 0, 7 at 745, 14 (1,792
    tokens) at 1490. Steps past the end keep the end's window."""
    f = min(step, cfg.num_iterations) / cfg.num_iterations
    b = cfg.window_block
    blocks = int(((1 - f) * cfg.window_start + f * cfg.window_end + b // 2) // b)
    return max(1, blocks) * b


# ---------------------------------------------------------------------------------------------- the model


def rope_tables(seq_len: int, head_dim: int, base: float, kind: str = "standard",
                start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of position t times each pair's frequency, (seq_len, D/2) fp32 (computed in fp64; the records
    compute them in fp32 and store bf16), for positions start .. start + seq_len - 1 (the same values as the
    full table's rows there). kind "standard": base^(-2i/D), i < D/2 (11-10); "half": the first D/4
    pairs (1/base)^(j / (D/4 - 1)), j < D/4 (torch.linspace(0, 1, D/4)), the last D/4 pairs frequency 0
    (cos 1, sin 0: not rotated) (12-17)."""
    if kind == "half":
        n = head_dim // 4
        inv_freq = (1.0 / base) ** torch.linspace(0.0, 1.0, n, dtype=torch.float64)
        inv_freq = torch.cat([inv_freq, torch.zeros(head_dim // 2 - n, dtype=torch.float64)])
    else:
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(start, start + seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: SpeedrunConfig, ops: Ops):
        super().__init__()
        C = config.n_embd
        self.n_head, self.eps, self.ops, self.kind = config.n_head, config.norm_eps, ops, config.attention
        self.c_q = nn.Linear(C, C, bias=False)
        self.c_k = nn.Linear(C, C, bias=False)
        self.c_v = nn.Linear(C, C, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.c_proj.zero_init = True
        if config.value_embeds:  # 12-17: v = l0 v + l1 ve
            self.lambdas = nn.Parameter(torch.tensor(config.attn_lambdas_init))
        else:  # 11-10: value residual
            self.lamb = nn.Parameter(torch.tensor(config.value_lamb_init))

    def forward(self, x: torch.Tensor, v1: torch.Tensor | None, ve: torch.Tensor | None, cos: torch.Tensor,
                sin: torch.Tensor, cu_seqlens: torch.Tensor | None, window: int | None, mask=None, cache=None,
                layer: int = 0):
        """x (B, T, C) normalized input; v1 the first block's values (11-10; None in the first block); ve this
        block's value embedding (B, T, C) or None (12-17). Returns the attention output (B, T, C) and v1. With a
        KVCache (tritonrun/gpt2/kv_cache.py: sample.py) the attention runs over the cached keys under its rule."""
        B, T, C = x.shape
        H = self.n_head
        q = self.c_q(x).view(B, T, H, C // H)
        k = self.c_k(x).view(B, T, H, C // H)
        v = self.c_v(x).view(B, T, H, C // H)
        if hasattr(self, "lambdas"):
            v = self.lambdas[0] * v if ve is None else self.lambdas[0] * v + self.lambdas[1] * ve.view_as(v).to(v.dtype)
        else:
            if v1 is None:
                v1 = v  # the first block: the mix below is v itself
            v = (1 - self.lamb) * v + self.lamb * v1
        q, k = self.ops.qk_norm_rope(q, k, cos, sin, self.eps)  # -> (B, H, T, D)
        if cache is not None:
            y = cache.attend(layer, q, k, v.transpose(1, 2))
        elif self.kind == "window":  # (B, H, T, D), document-masked sliding window, scale 1/sqrt(D)
            extra = {} if mask is None else {"mask": mask}  # the torch op's mask, built once per forward
            y = self.ops.window_attention(q, k, v.transpose(1, 2), cu_seqlens, window, **extra)
        else:  # causal, scale 1/sqrt(D)
            y = self.ops.attention(q, k, v.transpose(1, 2))
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
    """Parameters in the record's order (attn, mlp, lambdas): Muon's DDP round-robin follows it. attn is None in
    the blocks of config.no_attention_layers."""

    def __init__(self, config: SpeedrunConfig, ops: Ops, layer: int):
        super().__init__()
        self.attn = None if layer in config.no_attention_layers else CausalSelfAttention(config, ops)
        self.mlp = MLP(config, ops)
        self.lambdas = nn.Parameter(torch.tensor(config.block_lambdas_init))  # x = l0 x + l1 x0


class SpeedrunGPT(nn.Module):
    def __init__(self, config: SpeedrunConfig, ops: Ops | None = None):
        super().__init__()
        self.config = config
        self.ops = ops if ops is not None else get_ops("torch")
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.embedding_rows, config.n_embd),
            h=nn.ModuleList(Block(config, self.ops, i) for i in range(config.n_layer)),
        ))
        # value-embedding tables (12-17): lookups, Adam at wte's lr; none (an empty list) in the 11-10 model
        self.value_embeds = nn.ModuleList(nn.Embedding(config.embedding_rows, config.n_embd)
                                          for _ in range(config.value_embeds))
        self.n_encoder = config.n_layer // 2
        self.skip_weights = nn.Parameter(torch.full((config.n_layer - self.n_encoder,), config.skip_weight_init))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.zero_init = True
        cos, sin = rope_tables(config.block_size, config.head_dim, config.rope_base, config.rope_kind)
        self.register_buffer("rope_cos", cos, persistent=False)  # (block_size, D/2) fp32, not in checkpoints
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The records' init: zero for attn/MLP c_proj and lm_head; nn.Linear's default (kaiming-uniform with
        a = sqrt(5), i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))) for c_q, c_k, c_v, c_fc; N(0, 1) for wte and the
        value tables (padded rows zeroed, as tritonrun/gpt2/model.py; they are never looked up); the scalars from the
        config."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                if getattr(module, "zero_init", False):
                    nn.init.zeros_(module.weight)
                else:
                    module.reset_parameters()
            elif isinstance(module, CausalSelfAttention):
                if hasattr(module, "lambdas"):
                    module.lambdas.copy_(torch.tensor(c.attn_lambdas_init))
                else:
                    module.lamb.fill_(c.value_lamb_init)
            elif isinstance(module, Block):
                module.lambdas.copy_(torch.tensor(c.block_lambdas_init))
        for table in [self.transformer.wte, *self.value_embeds]:
            nn.init.normal_(table.weight, mean=0.0, std=1.0)
            table.weight[c.vocab_size:].zero_()
        self.skip_weights.fill_(c.skip_weight_init)

    def padding_parameters(self) -> int:
        """Parameters in padded vocabulary rows (lm_head's, and wte's / the value tables' when padded)."""
        c = self.config
        tables = 1 + c.value_embeds if c.pad_embeddings else 0
        return (1 + tables) * (c.padded_vocab_size - c.vocab_size) * c.n_embd

    def num_parameters(self, include_padding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if include_padding else n - self.padding_parameters()

    def flops_per_token(self, seq_len: int, window: int | None = None) -> int:
        """Training FLOPs per token for MFU: 6 * M + attention.
        M = matmul parameters: every 2-D weight except the lookup tables (wte, the value embeddings), the head
        counted over its vocab_size real rows (padded rows are tiling work, as tritonrun/gpt2/model.py leaves them out);
        6 = 2 (multiply-add) x 3 (forward, two backward matmuls). Attention, per layer that has it: 12 * H * D
        per attended (query, key) pair per token (q k^T and p v, 2 * 2 * H * D forward, x 3 with backward):
          dense (11-10): T / 2 keys per query, llm.c's / PaLM's 6 * L * C * T term with C = H * D;
          window (12-17): allowed pairs / T of one T-token document at `window` (default: the final window) -
            sum_i min(i + 1, window) / T, kernels/window_attention.allowed_pairs; documents only remove pairs, so
            this is the bound the window sets. The trainer averages it over the run's window schedule.
        Lookups (wte, value embeddings) and elementwise ops (norms, RoPE, ReLU^2, softcap, scalar mixes) are not
        counted."""
        c = self.config
        matmul = sum(p.numel() for name, p in self.named_parameters()
                     if p.dim() == 2 and name != "transformer.wte.weight" and not name.startswith("value_embeds."))
        matmul -= (c.padded_vocab_size - c.vocab_size) * c.n_embd  # lm_head's padded rows
        HD = c.n_head * c.head_dim
        if c.attention == "dense":
            return 6 * matmul + 6 * c.attention_layers * HD * seq_len
        w = min(c.final_window if window is None else int(window), seq_len)
        pairs = w * (w + 1) // 2 + (seq_len - w) * w  # kernels.window_attention.allowed_pairs([seq_len], w)
        return 6 * matmul + round(12 * c.attention_layers * HD * pairs / seq_len)

    def optimizer_groups(self) -> dict[str, list[dict]]:
        """The record's optimizer split, every parameter exactly once:
          "adam": wte + the value-embedding tables (lr 0.6), lm_head (lr 0.008), scalars = block lambdas, attn
                  lambdas (lamb in 11-10), skip_weights (lr 0.04); betas config.adam_betas, eps 1e-8, no decay
          "muon": every 2-D matrix inside the blocks (c_q, c_k, c_v, attn c_proj, c_fc, mlp c_proj), lr 0.05
                  (0.04: 11-10), momentum 0.95 (warmed up from 0.85: speedrun_muon_momentum), in the record's order.
        Each group: {"name", "params", "lr", "weight_decay"} (+ "momentum" for Muon); "lr" is the base lr that
        speedrun_lr_multiplier scales. One Adam over the three groups equals the record's three Adams."""
        c, blocks = self.config, list(self.transformer.h.parameters())
        matrices = [p for p in blocks if p.dim() == 2]
        scalars = [p for p in blocks if p.dim() < 2] + [self.skip_weights]
        tables = [self.transformer.wte.weight] + [t.weight for t in self.value_embeds]
        wd = c.weight_decay
        return {
            "adam": [
                {"name": "wte", "params": tables, "lr": c.wte_lr, "weight_decay": wd},
                {"name": "lm_head", "params": [self.lm_head.weight], "lr": c.lm_head_lr, "weight_decay": wd},
                {"name": "scalars", "params": scalars, "lr": c.scalar_lr, "weight_decay": wd},
            ],
            "muon": [
                {"name": "matrices", "params": matrices, "lr": c.muon_lr, "weight_decay": wd,
                 "momentum": c.muon_momentum},
            ],
        }

    # --------------------------------------------------------------------------------- forward
    def hidden(self, idx: torch.Tensor, cu_seqlens: torch.Tensor | None = None,
               window: int | None = None, cache=None) -> torch.Tensor:
        """Final hidden states rms_norm(x), (B, T, C). Windowed model: cu_seqlens int32 (n_docs + 1,) the document
        bounds along T shared by the batch rows (None: one document per row, [0, T]), window the attention window
        in tokens (None: config.final_window). Both are ignored by the dense model. Under torch.compile a window
        that changes is a Python int that Dynamo first specializes, then (automatic dynamic) turns into a symbol:
        one recompile at the schedule's first change, none after. With a KVCache (sample.py), idx holds the
        tokens after those the cache has seen; the cache's rule replaces cu_seqlens and window."""
        B, T = idx.shape
        c = self.config
        if cache is not None:
            return self._hidden(idx, None, None, None, *self.rope_at(cache.pos, T), cache)
        if T > c.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {c.block_size}")
        if c.attention == "window":
            if cu_seqlens is None:
                cu_seqlens = torch.arange(0, 2 * T, T, dtype=torch.int32, device=idx.device)  # [0, T], no host copy
            if window is None:
                window = c.final_window
        ops = self.ops
        mask = None  # the torch attention's mask: one per forward for every layer, not one per layer
        if c.attention == "window" and ops.window_attention is torch_window_attention:
            mask = torch_window_mask(cu_seqlens, window, T, idx.device)
        return self._hidden(idx, cu_seqlens, window, mask, self.rope_cos[:T], self.rope_sin[:T])

    def rope_at(self, start: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin for positions start .. start + T - 1: the tables' rows, or past block_size (a windowed
        model sliding on in sample.py) the same formula computed for those positions."""
        if start + T <= self.config.block_size:
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        c = self.config
        cos, sin = rope_tables(T, c.head_dim, c.rope_base, c.rope_kind, start=start)
        return cos.to(self.rope_cos), sin.to(self.rope_sin)

    def _hidden(self, idx, cu_seqlens, window, mask, cos, sin, cache=None) -> torch.Tensor:
        c = self.config
        ops, eps, h = self.ops, c.norm_eps, self.transformer.h
        if cache is not None:
            cache.begin(idx)
        # x is the residual stream; x0 feeds every block. The lookups' backward stays deterministic under
        # torch.compile (tritonrun/gpt2/embedding.py: Inductor would lower nn.Embedding's to an atomic scatter-add).
        x = x0 = ops.rms_norm(embedding(idx, self.transformer.wte.weight), eps)
        ve = [embedding(idx, t.weight) for t in self.value_embeds]
        v1, skips = None, []
        for i, (block, table) in enumerate(zip(h, c.value_embed_layers)):
            if i >= self.n_encoder:  # decoder: the mirrored encoder output, the last stored first
                x = x + self.skip_weights[i - self.n_encoder] * skips.pop()
            y, x = ops.mix_rms_norm(x, x0, block.lambdas, eps)  # x = l0 x + l1 x0; y = rms_norm(x)
            if block.attn is not None:
                a, v1 = block.attn(y, v1, None if table is None else ve[table], cos, sin, cu_seqlens, window, mask,
                                   cache, i)
                y, x = ops.add_rms_norm(a, x, eps)  # x = x + attn; y = rms_norm(x) feeds the MLP
            m = block.mlp(y)
            if i + 1 < len(h):
                x = x + m
                if i < self.n_encoder:
                    skips.append(x)
            else:
                y, x = ops.add_rms_norm(m, x, eps)  # the last block: its residual add and the final norm
        if cache is not None:
            cache.end(idx.shape[1])
        return y

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                window: int | None = None):
        """With targets: the mean cross-entropy loss of the softcapped logits (targets == -1 are ignored).
        Without: softcapped logits over the real vocabulary, (B, T, vocab_size), at least fp32. cu_seqlens and
        window: see hidden()."""
        y = self.hidden(idx, cu_seqlens, window)
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
