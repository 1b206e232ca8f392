"""Batch loaders over llm.c token shards: ShardLoader (dense (B, T) batches) and PackedLoader (one packed
sequence of documents per micro-batch, with its document bounds for a document-masked attention).

ShardLoader order (llm.c / build-nanogpt): within the current shard, each batch is the next B*T+1 contiguous
tokens at the current offset; x = chunk[:-1], y = chunk[1:] as (B, T), then the offset moves by B*T (so
consecutive batches share one boundary token). When the next chunk does not fit in the rest of the shard, the tail
is skipped and the loader moves to offset 0 of the next shard; after the last shard it wraps to the first and
`epoch` grows.

Data-parallel ranks (llm.c): all ranks share one position; per batch, rank r takes the r-th of world_size
consecutive chunks and the shared offset moves by world_size*B*T. So micro-batch k of a single process is
micro-batch k // world_size of rank k % world_size, and the saved (shard, offset) fixes every rank's position.

PackedLoader: see its docstring (document-aligned starts, cu_seqlens from EOT positions, exact DDP interleave).

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

from tritonrun.data.shards import GPT2_VOCAB, check_token_ids, load_tokens, read_header

EOT = 50256  # GPT-2 <|endoftext|> (data.tokenizer.EOT, not imported here to keep tiktoken out of the loader)


class _ShardStream:
    """What both loaders share: the shard list with validated headers, one memory-mapped shard at a time (its ids
    checked the first time it is opened), the shared (shard, offset, epoch) position with state_dict /
    load_state_dict / reset, and the two-slot pinned staging for CUDA."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        need: int,
        need_what: str,
        hint: str,
        staging_ints: int,
        device: str | torch.device,
        rank: int,
        world_size: int,
        vocab_size: int,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.rank, self.world_size = rank, world_size
        self.files = [Path(f) for f in files]
        if not self.files:
            raise ValueError(f"{type(self).__name__} got no shard files: check the data directory and split name")
        self.vocab_size = vocab_size
        self._checked: set[int] = set()  # shards whose ids passed check_token_ids
        self.device = torch.device(device)
        self.n_tokens: list[int] = []  # per shard, from the validated headers
        for f in self.files:
            n = read_header(f)  # ShardError for a bad file
            if n < need:
                raise ValueError(f"{f}: shard has {n} tokens, fewer than {need_what} = {need} needed for one batch; "
                                 f"{hint}")
            self.n_tokens.append(n)

        self.shard = 0  # index into self.files of the current shard
        self.offset = 0  # token offset of the next read in the current shard
        self.epoch = 0  # completed passes over all shards
        self._tokens: np.ndarray | None = None  # memmap of the current shard
        self._open_shard(0)

        # CUDA host staging: two pinned buffers, each guarded by the event recorded after its H2D copy
        self._pinned: list[torch.Tensor] = []
        self._copied: list[torch.cuda.Event | None] = []
        self._slot = 0
        if self.device.type == "cuda":
            self._pinned = [torch.empty(staging_ints, dtype=torch.int32, pin_memory=True) for _ in range(2)]
            self._copied = [None, None]

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

    def _next_shard(self) -> None:
        """Offset 0 of the next shard; after the last one, the first again and `epoch` grows."""
        nxt = self.shard + 1
        if nxt == len(self.files):
            nxt = 0
            self.epoch += 1
        self._open_shard(nxt)

    def _to_device(self, parts: Sequence[np.ndarray]) -> torch.Tensor:
        """CUDA only: `parts` laid end to end in the next pinned int32 buffer (once that buffer's previous H2D copy
        has completed), then one non_blocking copy to the device; returns the int32 device tensor."""
        pending = self._copied[self._slot]
        if pending is not None:
            pending.synchronize()
        buf = self._pinned[self._slot].numpy()
        at = 0
        for part in parts:
            np.copyto(buf[at : at + part.size], part, casting="safe")  # uint16 / int32 -> int32
            at += part.size
        dev = self._pinned[self._slot][:at].to(self.device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._copied[self._slot] = event
        self._slot ^= 1
        return dev

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


class ShardLoader(_ShardStream):
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
        self.batch_size = batch_size
        self.seq_len = seq_len
        need = world_size * batch_size * seq_len + 1
        super().__init__(files, need, "world_size*batch_size*seq_len+1", "use a smaller batch_size or seq_len",
                         batch_size * seq_len + 1, device, rank, world_size, vocab_size)

    @property
    def chunk_tokens(self) -> int:
        """Tokens read per batch: B*T inputs plus one more for the last target."""
        return self.batch_size * self.seq_len + 1

    @property
    def span_tokens(self) -> int:
        """Tokens all ranks read together per batch: world_size chunks that overlap by one token."""
        return self.world_size * self.batch_size * self.seq_len + 1

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y) pair, both int64 of shape (batch_size, seq_len) on the loader's device."""
        need = self.chunk_tokens
        if self.offset + self.span_tokens > self.n_tokens[self.shard]:
            self._next_shard()
        start = self.offset + self.rank * self.batch_size * self.seq_len
        chunk = self._tokens[start : start + need]
        self.offset += self.world_size * self.batch_size * self.seq_len

        if self.device.type == "cuda":
            flat = self._to_device([chunk]).long()  # widened on the GPU, same stream, so after the copy
        else:
            flat = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
        x = flat[:-1].view(self.batch_size, self.seq_len)
        y = flat[1:].view(self.batch_size, self.seq_len)
        return x, y


def doc_bounds(x: np.ndarray, eot: int = EOT) -> np.ndarray:
    """Document bounds of one packed input sequence x (T tokens): int32 [0, every p in 1..T-1 with x[p] == eot,
    T], so document d is x[bounds[d] : bounds[d + 1]]. A document starts AT its EOT token (GPT-2 shards prepend
    EOT to every document), and the bounds are taken on the inputs as in modded-nanogpt's records
    (`docs = (inputs == 50256).cumsum(0)` in 2024-11-19 .. 2024-12-17): the target EOT at y[p-1] (the end of the
    previous document) is predicted inside the previous document. Position 0 is always a start, EOT or not (an
    unaligned sequence begins with the tail of a document). One-token documents (two EOTs in a row) give bounds
    one apart; no EOT after position 0 gives [0, T]. One compare over T tokens and one flatnonzero, on the host."""
    inner = np.flatnonzero(x[1:] == eot)
    bounds = np.empty(inner.size + 2, dtype=np.int32)
    bounds[0] = 0
    bounds[1:-1] = inner + 1
    bounds[-1] = x.size
    return bounds


def doc_slots_for(seq_len: int) -> int:
    """The fixed number of document slots a packed sequence's cu_seqlens is padded to (doc_slots): one per 32 tokens
    (at least 16). Under torch.compile a cu_seqlens whose length changed from one micro-batch to the next would be a
    new input shape; a fixed length keeps one graph. A web document averages far more than 32 tokens (FineWeb's
    are around a thousand), so a sequence with more documents than slots is rare; it widens the padding to the
    next power of two (a shape the trainer's timed_compiles then reports)."""
    return max(16, seq_len // 32)


def pad_bounds(bounds: np.ndarray, slots: int) -> np.ndarray:
    """bounds (n_docs + 1,) padded to slots + 1 entries (or the next power of two above n_docs when it has more)
    by repeating its last entry, T: empty documents at the end, which no position falls in (every consumer finds
    a position's document by searchsorted(bounds, pos, right=True), which the repeated T never changes)."""
    docs = bounds.size - 1
    if docs > slots:
        slots = 1 << (docs - 1).bit_length()
    if docs == slots:
        return bounds
    out = np.full(slots + 1, bounds[-1], dtype=bounds.dtype)
    out[: bounds.size] = bounds
    return out


class PackedLoader(_ShardStream):
    """Yields (x, y, cu_seqlens): one packed sequence of seq_len tokens per micro-batch (B = 1) and its document
    bounds, for document-masked (sliding-window) attention, as modded-nanogpt trains from 2024-11-19 on.

    x, y: int64 (1, seq_len), y the next tokens (y[0, t] = x[0, t + 1]; y's last token is the one after the
    sequence). cu_seqlens: int32 (n_docs + 1,) = doc_bounds(x) (see there: bounds on the inputs, a document begins
    at its EOT, first 0, last seq_len), on the loader's device, the window_attention kernel's input; with doc_slots
    (the trainer passes doc_slots_for(seq_len)) padded to a fixed doc_slots + 1 entries by repeating seq_len
    (pad_bounds), so that its shape never changes under torch.compile.

    Starts (doc_aligned=True, the default). Every sequence starts at a document start, an EOT (50256) position: the
    first is the first EOT at or after the loader's position; each next one is the first EOT at or after the end
    of the previous sequence (previous start + seq_len). A sequence takes seq_len + 1 tokens from its start and
    runs on through as many documents as fit; the document it cuts off at the end is not continued: its
    remaining tokens, up to the next EOT, are skipped (only its first one is seen, as the last target).
    Sequences never overlap as inputs. This is the rule of modded-nanogpt's 2025-07-12 "BosAlign" record
    (records/track_1_short/2025-07-12_BosAlign, find_batch_starts: a start is kept once the next EOT is at least
    the local sequence length after it, and that EOT becomes the next start; the position then moves to the EOT
    after the last rank's sequence). The 2024-11-19 .. 2024-12-17 records did NOT align: they read contiguous
    chunks (rank r at pos + r*seq_len, pos += world_size*seq_len) and masked documents by the EOTs inside;
    doc_aligned=False reproduces that (starts at the position, then every seq_len tokens; x[0] may be
    mid-document), e.g. for a validation loss comparable with those records (BosAlign kept val unaligned too).

    Shard ends. A sequence is read from one shard: a start needs seq_len + 1 tokens after it in its shard. When
    there is no admissible start left (no EOT between the position and n - seq_len - 1), the rest of the shard
    is skipped - the documents that start there, and the part of a document that would run past the shard end -
    and the search goes on at offset 0 of the next shard (after the last, the first again, and `epoch` grows).
    llm.c-format shards split the document at a shard boundary across both files, so a shard usually begins
    mid-document; its first start is its first EOT and that leading piece is skipped as well. A shard with no
    admissible start at all is skipped whole; if no shard has one, ValueError. (BosAlign moves to the next shard
    when pos + 2*batch + 1 >= len(tokens), a coarser margin; this loader skips only what cannot start a sequence.)

    Data-parallel ranks. All ranks hold the same position and walk the same chain of starts from it, opening
    shards in the same order; per micro-batch each rank walks world_size starts and takes the rank-th, and the
    position moves to the end of the last one. So packed sequence k of a single process is micro-batch
    k // world_size of rank k % world_size, exactly, whatever the shard sizes (a step may straddle a shard end;
    ShardLoader instead drops a span that does not fit whole), and state_dict() is the same on every rank.

    State. state_dict() is ShardLoader's {"shard", "offset", "epoch"}: offset is where the next micro-batch's
    first start is searched from (any token offset is valid: the next EOT at or after it is the start), so a run
    resumes exactly, also after a change of seq_len or world_size, or from a ShardLoader position.

    Cost, all on the host, so the trainer never reads anything back from the device: per rank and micro-batch,
    world_size forward EOT searches (one compare + flatnonzero over a slice of max(seq_len, 64K) tokens; a web
    document is far shorter than that, so one slice in practice) and one compare + flatnonzero over the sequence
    for the bounds. On CUDA the seq_len + 1 tokens and the n_docs + 1 bounds travel in one pinned int32 buffer and
    one non_blocking copy (two buffers alternate, each guarded by its copy's event, as ShardLoader); the int64
    widening happens on the GPU.

    Size. seq_len is the tokens per micro-batch: the records use 64K per H100 (2024-11-19 .. 2024-12-17), the
    RTX 4090 reproduction (modded-nanogpt PR #38) half that with twice the accumulation; for a 12 GB card size it
    with bench/memory.py (expected 16K-64K tokens). Attention cost grows with seq_len x window, not seq_len^2."""

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        seq_len: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
        vocab_size: int = GPT2_VOCAB,
        doc_aligned: bool = True,
        doc_slots: int | None = None,
    ) -> None:
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        self.seq_len = seq_len
        self.doc_aligned = doc_aligned
        self.doc_slots = doc_slots  # None: cu_seqlens of each sequence's own length; else padded (pad_bounds)
        super().__init__(files, seq_len + 1, "seq_len+1", "use a smaller seq_len (a packed sequence is read from "
                         "one shard)", 2 * (seq_len + 1), device, rank, world_size, vocab_size)

    def _find_eot(self, lo: int, hi: int) -> int | None:
        """First EOT position in [lo, hi] of the current shard, or None; slices of max(seq_len, 64K) tokens,
        doubling, so a long run without EOT costs a few passes and no whole-shard temporary."""
        size = max(self.seq_len, 1 << 16)
        a = lo
        while a <= hi:
            b = min(a + size, hi + 1)
            hits = np.flatnonzero(self._tokens[a:b] == EOT)
            if hits.size:
                return a + int(hits[0])
            a, size = b, min(2 * size, 1 << 24)
        return None

    def _next_start(self) -> int:
        """The next sequence start at or after the position, moving on to later shards as needed."""
        moves = 0
        while True:
            last = self.n_tokens[self.shard] - self.seq_len - 1  # last start whose seq_len+1 tokens fit
            if self.offset <= last:
                start = self._find_eot(self.offset, last) if self.doc_aligned else self.offset
                if start is not None:
                    return start
            moves += 1
            if moves > len(self.files):
                raise ValueError(
                    f"no shard has a document start (EOT {EOT}) with seq_len+1 = {self.seq_len + 1} tokens after it "
                    f"in the same shard: these are not GPT-2 shards with EOT before every document "
                    f"(tritonrun.data.fineweb writes them so); use a smaller seq_len or doc_aligned=False"
                )
            self._next_shard()

    def survey(self, sequences: int) -> dict:
        """What the next `sequences` packed sequences (of every rank) read and skip, walked from the current position
        without delivering anything (the position is restored): {"sequences", "tokens_read", "tokens_skipped",
        "fraction_skipped"}. Skipped: tokens passed over between sequences (the rest of a document cut by a
        doc-aligned sequence) and shard tails no sequence fits in. Contiguous reading skips only shard tails."""
        state, read, skipped = self.state_dict(), 0, 0
        try:
            for _ in range(sequences):
                shard, offset = self.shard, self.offset
                start = self._next_start()
                skipped += (start - offset) if self.shard == shard else (self.n_tokens[shard] - offset) + start
                read += self.seq_len
                self.offset = start + self.seq_len
        finally:
            self.load_state_dict(state)
        total = read + skipped
        return {"sequences": sequences, "tokens_read": read, "tokens_skipped": skipped,
                "fraction_skipped": skipped / total if total else 0.0}

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next (x, y, cu_seqlens): x, y int64 (1, seq_len), cu_seqlens int32 (n_docs + 1,), all on the
        loader's device."""
        T = self.seq_len
        batch = None
        for i in range(self.world_size):  # every rank walks the same world_size starts
            start = self._next_start()
            if i == self.rank:
                chunk = self._tokens[start : start + T + 1]
                bounds = doc_bounds(chunk[:T])
                batch = self._deliver(chunk, bounds if self.doc_slots is None else pad_bounds(bounds, self.doc_slots))
            self.offset = start + T
        return batch

    def _deliver(self, chunk: np.ndarray, bounds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        T = self.seq_len
        if self.device.type == "cuda":
            dev = self._to_device([chunk, bounds])
            flat, cu_seqlens = dev[: T + 1].long(), dev[T + 1 :]  # widened on the GPU, after the copy
        else:
            flat = torch.from_numpy(np.asarray(chunk, dtype=np.int64))
            cu_seqlens = torch.from_numpy(bounds)
        return flat[:-1].view(1, T), flat[1:].view(1, T), cu_seqlens
