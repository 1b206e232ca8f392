"""A key/value cache for incremental decoding (sample.py): each new token runs the model once, attending to the
cached keys and values of the tokens before it, instead of re-reading the whole context.

The models take it as `hidden(idx, cache=KVCache(...))`: idx (B, T) holds only the tokens the cache has not seen,
at positions cache.pos .. cache.pos + T - 1 (GPT-2's position embedding, the speedrun models' RoPE angles), and
every attention layer calls `cache.attend(layer, q, k, v)` in place of its attention op. The math of every other op
is the model's own (its ops table); only the attention runs here, as SDPA over the cached keys under the same rule
as training:

  GPT-2, the 2024-11-10 speedrun model    causal over everything seen; the context is the model's block_size
                                          (its position table / RoPE table), so generation stops there.
  the 2024-12-17 windowed speedrun model  query i sees key j iff same document and 0 <= i - j < window (window:
                                          the config's final_window, what evaluation uses); documents start at
                                          each end-of-text token, as the packed loader's cu_seqlens. Nothing
                                          older than the window is ever read again, so the cache keeps only the
                                          last `window` keys and the model slides past its block_size: RoPE
                                          angles are computed for any position (relative in effect: q.k depends
                                          on i - j only).

Checked against the uncached forward token for token (tests/test_sample_cli.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class KVCache:
    """Cached keys and values per attention layer (B, H, T_kept, D), with each kept key's absolute position and
    document id."""

    def __init__(self, window: int | None = None, doc_token: int | None = None, limit: int | None = None):
        self.window, self.doc_token = window, doc_token
        self.limit = limit  # tokens the model can take in all (block_size), None: it slides (window)
        self.pos = 0  # tokens seen so far: the next token's position
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.key_pos: torch.Tensor | None = None  # (T_kept,) absolute positions of the kept keys
        self.key_doc: torch.Tensor | None = None  # (B, T_kept) document ids (windowed model)
        self._new: tuple | None = None  # this forward's (positions, document ids, mask)

    @classmethod
    def for_model(cls, model) -> KVCache:
        """The cache and its rule for `model` (GPT or SpeedrunGPT), from its config."""
        c = model.config
        if getattr(c, "attention", "dense") == "window":
            from tritonrun.data.tokenizer import EOT

            return cls(window=c.final_window, doc_token=EOT)
        return cls(limit=c.block_size)

    @property
    def slides(self) -> bool:
        return self.limit is None

    def positions(self, T: int, device) -> torch.Tensor:
        return torch.arange(self.pos, self.pos + T, device=device)

    def begin(self, idx: torch.Tensor) -> None:
        """Start a forward over the new tokens idx (B, T): their positions, documents and attention mask."""
        B, T = idx.shape
        if self.limit is not None and self.pos + T > self.limit:
            raise ValueError(f"{self.pos + T} tokens exceed the model's context of {self.limit}")
        qpos = self.positions(T, idx.device)
        kpos = qpos if self.key_pos is None else torch.cat([self.key_pos, qpos])
        mask = kpos[None, :] <= qpos[:, None]  # (T, T_keys): causal
        qdoc = None
        if self.window is not None:
            mask &= qpos[:, None] - kpos[None, :] < self.window
            last = (torch.zeros(B, 1, dtype=torch.long, device=idx.device) if self.key_doc is None
                    else self.key_doc[:, -1:])
            qdoc = last + torch.cumsum((idx == self.doc_token).long(), dim=1)
            kdoc = qdoc if self.key_doc is None else torch.cat([self.key_doc, qdoc], dim=1)
            mask = mask[None] & (qdoc[:, :, None] == kdoc[:, None, :])  # (B, T, T_keys)
            mask = mask[:, None]  # (B, 1, T, T_keys) over heads
        self._new = (qpos, qdoc, mask, kpos)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (B, H, T, D) of the new tokens: append k, v to the layer's cache and return the attention output
        (B, H, T, D), scale 1/sqrt(D), under the rule above."""
        _, _, mask, _ = self._new
        if layer in self.layers:
            k_old, v_old = self.layers[layer]
            k, v = torch.cat([k_old, k], dim=2), torch.cat([v_old, v], dim=2)
        self.layers[layer] = (k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def end(self, T: int) -> None:
        """The forward is done: the new tokens are seen; drop keys no later query can reach (windowed model)."""
        qpos, qdoc, _, kpos = self._new
        self.key_pos = kpos
        if qdoc is not None:
            self.key_doc = qdoc if self.key_doc is None else torch.cat([self.key_doc, qdoc], dim=1)
        self.pos += T
        self._new = None
        if self.window is not None and self.key_pos.numel() > 2 * self.window:  # trim in amortized O(1)
            # the next query (position pos) reaches keys pos - window + 1 .. pos - 1 at most
            start = self.key_pos.numel() - (self.window - 1)
            self.key_pos = self.key_pos[start:]
            self.key_doc = self.key_doc[:, start:]
            self.layers = {i: (k[:, :, start:], v[:, :, start:]) for i, (k, v) in self.layers.items()}

    @property
    def kept(self) -> int:
        """Keys held per layer now."""
        return 0 if self.key_pos is None else int(self.key_pos.numel())
