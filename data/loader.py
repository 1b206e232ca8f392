"""Sequential batch loader over llm.c token shards.

Order (llm.c / build-nanogpt): within the current shard, each batch is the next B*T+1 contiguous tokens at the
current offset; x = chunk[:-1], y = chunk[1:] as (B, T), then the offset moves by B*T (so consecutive batches
share one boundary token). When the next chunk does not fit in the rest of the shard, the tail is skipped and
the loader moves to offset 0 of the next shard; after the last shard it wraps to the first and `epoch` grows.

Data-parallel ranks (llm.c): all ranks share one position; per batch, rank r takes the r-th of world_size
consecutive chunks and the shared offset moves by world_size*B*T. So micro-batch k of a single process is
micro-batch k // world_size of rank k % world_size, and the saved (shard, offset) fixes every rank's position.

Token ids are checked when a shard is opened (data.shards.check_token_ids: ~8 ms per 100M-token shard once read),
once per shard and loader: an id >= vocab_size is a ShardError naming the file and the first bad position, not an
IndexError deep in the embedding. The shard at the loader's position is opened, and so checked, at construction
and at load_state_dict, so a bad val shard or a bad first train shard fails before any step; a later train shard
is checked when the loader reaches it.

Only the current shard is memory-mapped. On CUDA a batch is staged through one of two pinned int32 host
buffers and copied with non_blocking=True; each buffer has a CUDA event, and it is not rewritten until the copy
that last read it has finished. The int32 -> int64 widening then happens on the GPU.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.shards import GPT2_VOCAB, check_token_ids, load_tokens, read_header


class ShardLoader:
    """Yields (x, y) int64 batches of shape (batch_size, seq_len) from a list of shards, in llm.c order."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        batch_size: int,
        seq_len: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = GPT2_VOCAB,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError("ShardLoader got no shard files: check the data directory and split name")
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self._checked: set[int] = set()  # shards whose ids passed check_token_ids
        self.device = torch.device(device)
        need = self.span_tokens
        self.n_tokens: list[int] = []  # per shard, from the validated headers
        for f in self.files:
            n = read_header(f)  # ShardError for a bad file
            if n < need:
                raise ValueError(
                    f"{f}: shard has {n} tokens, fewer than world_size*batch_size*seq_len+1 = {need} needed "
                    f"for one batch; "
                    f"use a smaller batch_size or seq_len"
                )
            self.n_tokens.append(n)

        self.shard = 0  # index into self.files of the current shard
        self.offset = 0  # token offset of the next chunk in the current shard
        self.epoch = 0  # completed passes over all shards
        self._tokens: np.ndarray | None = None  # memmap of the current shard
        self._open_shard(0)

        # CUDA host staging: two pinned buffers, each guarded by the event recorded after its H2D copy
        self._pinned: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        self._slot = 0
        if self.device.type == "cuda":
            self._pinned = [torch.empty(self.chunk_tokens, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._copied = [None, None]

    @property
    def chunk_tokens(self) -> int:
        """Tokens read per batch: B*T inputs plus one more for the last target."""
        return self.batch_size * self.seq_len + 1

    @property
    def span_tokens(self) -> int:
        """Tokens all ranks read together per batch: world_size chunks that overlap by one token."""
        return self.world_size * self.batch_size * self.seq_len + 1

    def _open_shard(self, index: int) -> None:
        """Map shard `index` (dropping the old map) and check its ids the first time; the position goes to its
        start."""
        self.shard = index
        self.offset = 0
        self._tokens = None
        tokens = load_tokens(self.files[index])
        if index not in self._checked:
            check_token_ids(self.files[index], tokens, self.vocab_size)  # ShardError: file and first bad position
            self._checked.add(index)
        self._tokens = tokens

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, both int64 of shape (batch_size, seq_len) on the loader's device."""
        need = self.chunk_tokens
        if self.offset + self.span_tokens > self.n_tokens[self.shard]:
            nxt = self.shard + 1
            if nxt == len(self.files):
                nxt = 0
                self.epoch += 1
            self._open_shard(nxt)
        start = self.offset + self.rank * self.batch_size * self.seq_len
        chunk = self._tokens[start : start + need]
        self.offset += self.world_size * self.batch_size * self.seq_len

        if self.device.type == "cuda":
            buf = self._stage_pinned(chunk)
            dev = buf.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
            self._copied[self._slot] = event
            self._slot ^= 1
            flat = dev.long()  # widened on the GPU, same stream, so after the copy
        else:
            flat = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
        x = flat[:-1].view(self.batch_size, self.seq_len)
        y = flat[1:].view(self.batch_size, self.seq_len)
        return x, y

    def _stage_pinned(self, chunk: np.ndarray) -> torch.Tensor:
        """Copy `chunk` into the next pinned buffer once that buffer's previous H2D copy has completed."""
        pending = self._copied[self._slot]
        if pending is not None:
            pending.synchronize()
        buf = self._pinned[self._slot]
        np.copyto(buf.numpy(), chunk, casting="safe")  # uint16 -> int32
        return buf

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch; token offsets, so it stays valid if batch_size or seq_len change."""
        return {"shard": self.shard, "offset": self.offset, "epoch": self.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at a position from state_dict(); ValueError if it does not fit these shards."""
        missing = {"shard", "offset", "epoch"} - set(state)
        if missing:
            raise ValueError(f"loader state is missing {sorted(missing)}")
        shard, offset, epoch = (int(state[k]) for k in ("shard", "offset", "epoch"))
        if not 0 <= shard < len(self.files):
            raise ValueError(f"loader state shard {shard} out of range: there are {len(self.files)} shards")
        if not 0 <= offset <= self.n_tokens[shard]:
            raise ValueError(
                f"loader state offset {offset} out of range for {self.files[shard]} ({self.n_tokens[shard]} tokens)"
            )
        if epoch < 0:
            raise ValueError(f"loader state epoch {epoch} is negative")
        self._open_shard(shard)
        self.offset = offset
        self.epoch = epoch

    def reset(self) -> None:
        """Back to the start: shard 0, offset 0, epoch 0."""
        self._open_shard(0)
        self.epoch = 0
