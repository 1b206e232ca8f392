"""DocPackLoader: record #89's training batches, whole documents from their first token, each cut to a maximum length.

One micro-batch of `tokens` inputs (record #89 train_gpt.py Shard.next_batch, H1737-1760; its stages set tokens and
max_doc_len: 16,384 / 896, then 32,768 / 2,048, then 49,152 / 2,048 per GPU):
  - take the documents that start at the next end-of-text tokens (50256, which begin every document), in order;
  - each contributes from its start up to the next document's start, at most max_doc_len tokens (the rest of a
    longer document is skipped), and the last one only what fills the batch to tokens + 1;
  - x = the tokens[:-1], y = tokens[1:], cu_seqlens = [0, the documents' cumulative lengths] with the last length one
    shorter (the extra token is only a target), padded with `tokens` to a fixed number of slots (pad_bounds);
  - the position moves to the next document start after the last document used; the cut document's remainder is
    skipped.
Data-parallel ranks (the record: rank r takes the r-th of world_size consecutive runs of documents, and the position
moves past them all): here likewise, so packed micro-batch k of one process is micro-batch k // world_size of rank
k % world_size - one GPU with 8 accumulation steps reads exactly what the record's 8 GPUs read in a step.
Shard ends: when the documents left in a shard run out before the batch is full (no further document start), the
rest of the shard is skipped and the batch is built from the next shard's first document start (the record's
StopIteration and reload); after the last shard the first comes again and `epoch` grows (the record stops there).

Skipped tokens are counted (skipped_tokens, read_tokens): document tails past max_doc_len, cut remainders, shard
tails and the piece before a shard's first document. The trainer reports the fraction. State is the shared
(shard, offset, epoch) of the other loaders: offset is where the next document start is searched from.
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from tritonrun.data.loader import EOT, _ShardStream, pad_bounds
from tritonrun.data.shards import GPT2_VOCAB


class DocPackLoader(_ShardStream):
    """Yields (x, y, cu_seqlens) per micro-batch: x, y int64 (1, tokens), cu_seqlens int32 (doc_slots + 1,)."""

    def __init__(self, files: Sequence[str | os.PathLike], tokens: int, max_doc_len: int, doc_slots: int,
                 device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                 vocab_size: int = GPT2_VOCAB) -> None:
        if tokens < 1 or max_doc_len < 1 or doc_slots < 1:
            raise ValueError(f"tokens, max_doc_len and doc_slots must be positive, got {tokens}, {max_doc_len}, "
                             f"{doc_slots}")
        self.tokens, self.max_doc_len, self.doc_slots = tokens, max_doc_len, doc_slots
        self._starts: tuple[int, np.ndarray] | None = None  # (shard, its document starts): the open shard's index
        self.skipped_tokens = self.read_tokens = 0
        super().__init__(files, world_size * (tokens + 1), "world_size x (tokens + 1)",
                         "use fewer tokens per micro-batch", self._staging(tokens, doc_slots), device, rank,
                         world_size, vocab_size)

    @staticmethod
    def _staging(tokens: int, doc_slots: int) -> int:
        """int32 host staging for one batch: tokens + 1 ids and the padded bounds: doc_slots + 1, or past that the
        next power of two above the documents (pad_bounds), of which a batch holds at most tokens + 1."""
        return tokens + 1 + max(doc_slots, 1 << tokens.bit_length()) + 1

    def set_batch(self, tokens: int, max_doc_len: int) -> None:
        """A stage change: tokens per micro-batch and the maximum document length from the next batch on."""
        if tokens < 1 or max_doc_len < 1:
            raise ValueError(f"tokens and max_doc_len must be positive, got {tokens} and {max_doc_len}")
        if self._pinned and self._staging(tokens, self.doc_slots) > self._pinned[0].numel():
            for event in self._copied:
                if event is not None:
                    event.synchronize()
            size = self._staging(tokens, self.doc_slots)
            self._pinned = [torch.empty(size, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._copied = [None, None]
        self.tokens, self.max_doc_len = tokens, max_doc_len

    def _doc_starts(self) -> np.ndarray:
        if self._starts is None or self._starts[0] != self.shard:
            self._starts = (self.shard, np.flatnonzero(np.asarray(self._tokens) == EOT))
        return self._starts[1]

    def _runs(self) -> tuple[list[list[tuple[int, int]]], int] | None:
        """Every rank's (start, end) documents of this micro-batch from the current position, and the index of the
        next document start; None when this shard's document starts run out first (the record's StopIteration)."""
        starts, n_tok = self._doc_starts(), self.n_tokens[self.shard]
        n, idx = len(starts), int(np.searchsorted(starts, self.offset))
        runs = []
        for _ in range(self.world_size):
            run, length = [], 0
            while length <= self.tokens:
                if idx >= n:
                    return None
                cur = int(starts[idx])
                idx += 1
                end = min(int(starts[idx]) if idx < n else n_tok, cur + self.max_doc_len,
                          cur + self.tokens - length + 1)
                run.append((cur, end))
                length += end - cur
            runs.append(run)
        return runs, idx

    def _advance(self) -> list[tuple[int, int]]:
        """Move past the next micro-batch (every rank's documents), counting what is read and skipped; this rank's
        (start, end) documents."""
        tries = 0
        while (found := self._runs()) is None:
            tries += 1
            if tries > len(self.files):
                raise ValueError(f"no shard holds enough documents for one micro-batch of {self.tokens} tokens x "
                                 f"{self.world_size} rank(s) (documents up to {self.max_doc_len} tokens)")
            self.skipped_tokens += self.n_tokens[self.shard] - self.offset
            self.read_tokens += self.n_tokens[self.shard] - self.offset
            self._next_shard()
        runs, idx = found
        starts = self._doc_starts()
        nxt = int(starts[idx]) if idx < len(starts) else self.n_tokens[self.shard]
        span = nxt - self.offset
        self.read_tokens += span
        self.skipped_tokens += span - self.world_size * (self.tokens + 1)
        self.offset = nxt
        return runs[self.rank]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        run = self._advance()
        buf = np.concatenate([np.asarray(self._tokens[a:b]) for a, b in run])
        lengths = np.array([b - a for a, b in run], dtype=np.int64)
        lengths[-1] -= 1  # the last token is only a target
        bounds = pad_bounds(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32), self.doc_slots)
        if self.device.type == "cuda":
            flat = self._to_device([buf, bounds])
            xy, cu = flat[: buf.size].long(), flat[buf.size:]
        else:
            xy, cu = torch.from_numpy(buf.astype(np.int64)), torch.from_numpy(bounds)
        return xy[:-1].view(1, -1), xy[1:].view(1, -1), cu

    def survey(self, batches: int) -> dict:
        """What the next `batches` micro-batches (of every rank) read and skip, walked from the current position without
        delivering anything (position and counters restored): {"sequences", "tokens_read", "tokens_skipped",
        "fraction_skipped"}, the trainer's data line. Skipped: document tails past max_doc_len, cut remainders, shard
        tails."""
        state, counters = self.state_dict(), (self.skipped_tokens, self.read_tokens)
        try:
            for _ in range(batches):
                self._advance()
            skipped, read = self.skipped_tokens - counters[0], self.read_tokens - counters[1]
        finally:
            self.load_state_dict(state)
            self.skipped_tokens, self.read_tokens = counters
        return {"sequences": batches, "tokens_read": read - skipped, "tokens_skipped": skipped,
                "fraction_skipped": skipped / read if read else 0.0,
                "layout": f"whole documents from their start, each cut to {self.max_doc_len} tokens",
                "fix": "this is the record's document rule (documents cut to the stage's maximum length); shards "
                       "of shorter documents skip less"}

    def skipped_fraction(self) -> float:
        """Share of the tokens read past that no batch used (0.0 before any batch)."""
        return self.skipped_tokens / self.read_tokens if self.read_tokens else 0.0
