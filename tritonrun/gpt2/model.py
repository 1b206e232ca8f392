"""GPT-2, exactly: pre-LN blocks, learned position embedding, tanh-GELU, LM head tied to wte.

Every op a Triton kernel can replace goes through `self.ops` (tritonrun/gpt2/ops.py). The residual adds are
fused with the LayerNorm that follows them (`add_layer_norm`), as llm.c does: block i's attention
output is added to the residual stream and normalized by ln_2 in one op, and its MLP output is added
and normalized by the next block's ln_1 (or ln_f after the last block).

The vocabulary is padded from 50257 to 50304 rows of wte. Padded rows start at zero, are never looked
up (no token id reaches them), are sliced off before the softmax (never receive loss) and are removed
from returned logits (never sampled).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.embedding import embedding
from tritonrun.gpt2.ops import Ops, get_ops


class LayerNorm(nn.Module):
    """Parameters only: the math runs in ops.layer_norm / ops.add_layer_norm."""

    def __init__(self, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.residual_scaled_init = True
        self.ops = ops

    def forward(self, x: torch.Tensor, cache=None, layer: int = 0) -> torch.Tensor:
        """x (B, T, C); with a KVCache (tritonrun/gpt2/kv_cache.py) x holds only the tokens it has not seen."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = self.ops.attention(q, k, v) if cache is None else cache.attend(layer, q, k, v)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.residual_scaled_init = True
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.ops.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, ops)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = MLP(config, ops)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, ops: Ops | None = None):
        super().__init__()
        self.config = config
        self.ops = ops if ops is not None else get_ops("torch")
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList(Block(config, self.ops) for _ in range(config.n_layer)),
                ln_f=LayerNorm(config.n_embd),
            )
        )
        # The LM head is wte itself (tied), applied inside ops.linear_cross_entropy / logits().
        self.reset_parameters()

    # ------------------------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 / llm.c init: N(0, 0.02) everywhere, residual projections N(0, 0.02/sqrt(2L)),
        biases 0, LayerNorm weight 1. Padded vocab rows are zero."""
        std_resid = 0.02 / math.sqrt(2 * self.config.n_layer)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                std = std_resid if getattr(module, "residual_scaled_init", False) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        self.transformer.wte.weight[self.config.vocab_size :].zero_()

    def num_parameters(self, include_padding: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())  # wte counted once (tied)
        if not include_padding:
            n -= (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd
        return n

    def flops_per_token(self, seq_len: int) -> int:
        """Training FLOPs per token, llm.c's formula: 6N + 6·L·C·T."""
        c = self.config
        return 6 * self.num_parameters(include_padding=False) + 6 * c.n_layer * c.n_embd * seq_len

    def param_groups(self, weight_decay: float) -> list[dict]:
        """2-D tensors (matmul weights and embeddings) decay; biases and LayerNorm params do not."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # --------------------------------------------------------------------------------- forward
    def hidden(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        """Final hidden states ln_f(x), (B, T, C). With a KVCache (sample.py), idx holds the tokens after those
        the cache has seen, at positions cache.pos onwards."""
        B, T = idx.shape
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
        ops, tr, eps = self.ops, self.transformer, self.config.ln_eps
        if cache is None:
            pos = torch.arange(T, device=idx.device)
        else:
            cache.begin(idx)  # refuses past block_size: the position table ends there
            pos = cache.positions(T, idx.device)
        # residual stream; the lookups' backward stays deterministic under torch.compile (tritonrun/gpt2/embedding.py)
        x = embedding(idx, tr.wte.weight) + embedding(pos, tr.wpe.weight)
        h = tr.h
        y = ops.layer_norm(x, h[0].ln_1.weight, h[0].ln_1.bias, eps)
        for i, block in enumerate(h):
            a = block.attn(y, cache, i)
            y, x = ops.add_layer_norm(a, x, block.ln_2.weight, block.ln_2.bias, eps)
            m = block.mlp(y)
            ln_next = h[i + 1].ln_1 if i + 1 < len(h) else tr.ln_f
            y, x = ops.add_layer_norm(m, x, ln_next.weight, ln_next.bias, eps)
        if cache is not None:
            cache.end(T)
        return y

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """With targets: the mean cross-entropy loss (targets == -1 are ignored).
        Without: logits over the real vocabulary, (B, T, vocab_size)."""
        y = self.hidden(idx)
        if targets is None:
            return self.logits(y)
        c = self.config
        return self.ops.linear_cross_entropy(
            y.reshape(-1, c.n_embd), self.transformer.wte.weight, targets.reshape(-1), -1, c.vocab_size
        )

    def logits(self, y: torch.Tensor) -> torch.Tensor:
        """LM head over the real vocabulary only: padded rows can never be sampled."""
        return y @ self.transformer.wte.weight[: self.config.vocab_size].T
