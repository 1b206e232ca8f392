"""llm.c / modded-nanogpt token shards.

Layout of one `.bin` file, all little-endian:
    header: 256 int32 = [MAGIC 20240520, VERSION 1, n_tokens, 0, ..., 0]   (1024 bytes)
    body:   n_tokens uint16 token ids                                       (2 * n_tokens bytes)
The file size must be exactly 1024 + 2 * n_tokens. Names follow `<dataset>_<split>_<index:06d>.bin`,
e.g. `fineweb_val_000000.bin`, `fineweb_train_000001.bin`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tritonrun.runinfo import atomic_file

MAGIC = 20240520
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4  # 1024
TOKEN_DTYPE = np.dtype("<u2")
SPLITS = ("train", "val")
GPT2_VOCAB = 50257  # token ids a shard may hold: 0..50256 (50256 is <|endoftext|>)
_CHECK_CHUNK = 1 << 24  # tokens per max() pass: a 32 MB slice, so no 100M-element temporary is ever made


class ShardError(ValueError):
    """A file that is not a valid token shard. str(err) is one line: "<path>: <what is wrong>"."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def write_shard(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray, fix: str | None = None) -> None:
    """Write `tokens` as a shard at `path`, atomically: a temp file in the same directory is written, fsynced
    and renamed over `path`, so `path` is either absent, the old file, or the complete new one. A disk that will
    not take it raises WriteFailed (its size, the free space, `fix`)."""
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= 2**16):
        raise ValueError(f"token ids must be in [0, 65536), got min {int(arr.min())} max {int(arr.max())}")
    if arr.size >= 2**31:
        raise ValueError(f"{arr.size} tokens do not fit the int32 count in the shard header")
    body = arr.astype(TOKEN_DTYPE, copy=False)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, body.size)

    needed = HEADER_INTS * 4 + body.nbytes
    with atomic_file(path, "wb", needed=needed, fix=fix) as f:  # temp + fsync + rename: never a partial shard
        f.write(header.tobytes())
        f.write(body.tobytes())


def read_header(path: str | os.PathLike) -> int:
    """Validate the header of the shard at `path` against its file size and return n_tokens."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except OSError as e:
        raise ShardError(path, f"cannot read ({e.strerror})") from None
    if size < HEADER_BYTES:
        raise ShardError(path, f"file is {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    header = np.frombuffer(raw, dtype="<i4")
    magic, version, n_tokens = (int(v) for v in header[:3])
    if magic != MAGIC:
        raise ShardError(path, f"bad magic {magic} (expected {MAGIC}): not a token shard")
    if version != VERSION:
        raise ShardError(path, f"version {version} not supported (expected {VERSION})")
    if n_tokens < 0:
        raise ShardError(path, f"header says {n_tokens} tokens")
    expected = HEADER_BYTES + 2 * n_tokens
    if size < expected:
        raise ShardError(
            path, f"truncated: header says {n_tokens} tokens ({expected} bytes) but file has {size} bytes"
        )
    if size > expected:
        raise ShardError(
            path, f"size mismatch: header says {n_tokens} tokens ({expected} bytes) but file has {size} bytes"
        )
    return n_tokens


def load_tokens(path: str | os.PathLike) -> np.ndarray:
    """The tokens of a validated shard as a read-only uint16 memmap (nothing is read until sliced)."""
    n_tokens = read_header(path)
    if n_tokens == 0:  # np.memmap refuses zero-length maps
        return np.zeros(0, dtype=np.uint16)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


def check_token_ids(path: str | os.PathLike, tokens: np.ndarray, vocab_size: int = GPT2_VOCAB) -> None:
    """ShardError naming `path` and the first position (0-based, in tokens after the header) whose id is not
    below `vocab_size`. Vectorized: one max() per 16M-token slice, and a search only in a slice that fails.
    Cost: about 8 ms per 100M-token shard once its 200 MB are in the page cache (measured on this project's
    2-core CPU machine, numpy max over uint16 at ~25 GB/s); a shard not yet cached costs the read of its
    200 MB from disk, which the training loop would pay anyway."""
    for start in range(0, tokens.size, _CHECK_CHUNK):
        part = tokens[start : start + _CHECK_CHUNK]
        if int(part.max()) >= vocab_size:
            i = start + int(np.argmax(part >= vocab_size))
            raise ShardError(path, f"token id {int(tokens[i])} at position {i} is outside the GPT-2 vocabulary "
                                   f"(ids 0..{vocab_size - 1}): not GPT-2 tokens, or a corrupted file")


def find_shards(data_dir: str | os.PathLike, split: str) -> list[Path]:
    """Shards of one split (`*_{split}_*.bin`) in `data_dir`, sorted by file name."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return sorted(Path(data_dir).glob(f"*_{split}_*.bin"), key=lambda p: p.name)
