"""llm.c token-shard format: exact bytes, validation errors, atomic writes, shard discovery."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tritonrun.data import shards as shards
from tritonrun.data.shards import (
    GPT2_VOCAB, HEADER_BYTES, MAGIC, VERSION, ShardError, check_token_ids, find_shards, load_tokens, read_header,
    write_shard,
)


def _raw_shard(path: Path, header: list[int], n_body_tokens: int) -> Path:
    """A shard written by hand (bypassing write_shard) with any header and body length."""
    ints = header + [0] * (256 - len(header))
    path.write_bytes(struct.pack("<256i", *ints) + b"\x01\x00" * n_body_tokens)
    return path


def test_constants():
    assert (MAGIC, VERSION, HEADER_BYTES) == (20240520, 1, 1024)


@pytest.mark.parametrize("n", [0, 1, 2, 7, 1023, 65537])
def test_round_trip(tmp_path, n):
    rng = np.random.default_rng(n)
    tokens = rng.integers(0, 2**16, size=n, dtype=np.int64)
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, tokens)

    raw = path.read_bytes()
    assert len(raw) == HEADER_BYTES + 2 * n
    assert struct.unpack("<3i", raw[:12]) == (20240520, 1, n)
    assert raw[12:HEADER_BYTES] == bytes(HEADER_BYTES - 12)
    assert raw[HEADER_BYTES:] == tokens.astype("<u2").tobytes()

    assert read_header(path) == n
    loaded = load_tokens(path)
    assert loaded.dtype == np.uint16 and loaded.shape == (n,)
    np.testing.assert_array_equal(loaded, tokens)


def test_memmap_is_read_only(tmp_path):
    write_shard(tmp_path / "a.bin", [1, 2, 3])
    tokens = load_tokens(tmp_path / "a.bin")
    assert isinstance(tokens, np.memmap)
    with pytest.raises(ValueError):
        tokens[0] = 5


@pytest.mark.parametrize("tokens", [[0, 65535, 50256], (1, 2, 3), range(10), np.array([5, 6], dtype=np.uint8)])
def test_accepts_integer_sequences(tmp_path, tokens):
    write_shard(tmp_path / "a.bin", tokens)
    assert load_tokens(tmp_path / "a.bin").tolist() == list(tokens)


@pytest.mark.parametrize("bad", [[1, 65536], [-1, 3], np.array([70000], dtype=np.int32), [1.5, 2.0], [[1, 2]]])
def test_rejects_bad_tokens(tmp_path, bad):
    path = tmp_path / "a.bin"
    with pytest.raises(ValueError):
        write_shard(path, bad)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temp file


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "s_val_000000.bin"
    write_shard(path, [1, 2, 3])
    write_shard(path, np.arange(100))
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert load_tokens(path).tolist() == list(range(100))


def test_failed_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "s_val_000000.bin"
    write_shard(path, [1, 2, 3])

    def broken_fsync(fd):
        raise OSError("disk on fire")

    monkeypatch.setattr("tritonrun.data.shards.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk on fire"):
        write_shard(path, np.arange(100))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert load_tokens(path).tolist() == [1, 2, 3]


@pytest.mark.parametrize(
    "header, n_body, message",
    [
        ([12345, 1, 4], 4, "bad magic 12345 (expected 20240520): not a token shard"),
        ([MAGIC, 7, 4], 4, "version 7 not supported (expected 1)"),
        ([MAGIC, 1, 1000], 988, "truncated: header says 1000 tokens (3024 bytes) but file has 3000 bytes"),
        ([MAGIC, 1, 4], 5, "size mismatch: header says 4 tokens (1032 bytes) but file has 1034 bytes"),
        ([MAGIC, 1, -3], 0, "header says -3 tokens"),
    ],
)
def test_header_errors(tmp_path, header, n_body, message):
    path = _raw_shard(tmp_path / "bad_train_000001.bin", header, n_body)
    for fn in (read_header, load_tokens):
        with pytest.raises(ShardError) as info:
            fn(path)
        assert str(info.value) == f"{path}: {message}"
        assert info.value.path == path


def test_shorter_than_header(tmp_path):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"abc")
    with pytest.raises(ShardError) as info:
        read_header(path)
    assert str(info.value) == f"{path}: file is 3 bytes, shorter than the 1024-byte header"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.bin"
    with pytest.raises(ShardError) as info:
        read_header(path)
    assert str(info.value).startswith(f"{path}: cannot read")


def test_shard_error_is_value_error_and_one_line(tmp_path):
    path = _raw_shard(tmp_path / "a.bin", [1, 1, 0], 0)
    with pytest.raises(ValueError) as info:
        read_header(path)
    assert "\n" not in str(info.value)


def test_find_shards(tmp_path):
    for name in [
        "fineweb_train_000002.bin", "fineweb_val_000000.bin", "fineweb_train_000010.bin",
        "fineweb_train_000001.bin", "notes.txt", "fineweb_train_000003.tmp", "train.bin",
    ]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "fineweb_train_000000.bin").write_bytes(b"")

    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_train_000010.bin",
    ]
    assert [p.name for p in find_shards(str(tmp_path), "val")] == ["fineweb_val_000000.bin"]
    assert find_shards(tmp_path / "sub" / "missing", "val") == []
    with pytest.raises(ValueError, match="split"):
        find_shards(tmp_path, "test")


@pytest.mark.parametrize("bad_at, bad_id", [(0, 50257), (4999, 65535), (1234, 50300), (2 * 1024 + 3, 50303)])
def test_token_ids_outside_the_vocabulary_are_named(tmp_path, monkeypatch, bad_at, bad_id):
    """An id >= 50257 (50300: inside the vocabulary padding, which the loss would otherwise index) names the
    file, the first bad position and the id; slices of 1024 tokens here so that a bad id in a later slice, and
    two bad ids in different slices, are exercised."""
    monkeypatch.setattr(shards, "_CHECK_CHUNK", 1024)
    tokens = np.random.default_rng(bad_at).integers(0, GPT2_VOCAB, 5000)
    tokens[[0, 4999]] = GPT2_VOCAB - 1  # <|endoftext|> is a valid id
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, tokens)
    check_token_ids(path, load_tokens(path))  # clean: no error
    tokens[bad_at] = bad_id
    if bad_at + 1500 < 5000:
        tokens[bad_at + 1500] = 60000  # a second bad id later: the first one is reported
    write_shard(path, tokens)
    with pytest.raises(ShardError) as info:
        check_token_ids(path, load_tokens(path))
    assert str(info.value).startswith(f"{path}: token id {bad_id} at position {bad_at} ")
    assert "\n" not in str(info.value)
