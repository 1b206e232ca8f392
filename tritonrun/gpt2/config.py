"""GPT-2 model sizes as plain data."""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # max context length; sizes the learned position embedding wpe
    vocab_size: int = 50257  # real GPT-2 vocabulary (tokens 0..50256; 50256 is <|endoftext|>)
    padded_vocab_size: int = 50304  # wte rows; a multiple of 128 so the LM-head matmul tiles well
    n_layer: int = 12  # transformer blocks
    n_head: int = 12  # attention heads; head dim = n_embd // n_head
    n_embd: int = 768  # residual stream width C
    ln_eps: float = 1e-5  # LayerNorm epsilon, as GPT-2

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}")
        if self.padded_vocab_size < self.vocab_size:
            raise ValueError(f"padded_vocab_size {self.padded_vocab_size} < vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


# n_layer / n_head / n_embd from GPT-2's release; "tiny" is for CPU tests and smoke runs.
MODEL_SIZES: dict[str, GPTConfig] = {
    "d12": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "d24": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "d36": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "d48": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    "tiny": GPTConfig(block_size=256, n_layer=2, n_head=2, n_embd=64),  # head dim 32, as the kernels support
    # bench/recipes.py's CPU A/B: one shape for every recipe (4 blocks of 128, 2 heads of 64: window attention
    # takes head dim 64 or 128, and the 2024-12-17 U-net value pattern needs 4 blocks)
    "mini": GPTConfig(block_size=1024, n_layer=4, n_head=2, n_embd=128),
}
