"""The bundled sample corpus: valid shards of whole pydoc topics, built once and rebuilt when damaged."""

from __future__ import annotations

import numpy as np
import pytest
from pydoc_data.topics import topics

from tritonrun.data.sample import TRAIN_NAME, VAL_NAME, prepare_sample
from tritonrun.data.shards import find_shards, load_tokens, read_header
from tritonrun.data.tokenizer import EOT, gpt2_tokenizer


def _documents(tokens: np.ndarray) -> list[str]:
    """Split a stream at its EOT tokens (each document starts with one) and decode every document."""
    assert tokens[0] == EOT
    starts = np.flatnonzero(tokens == EOT).tolist() + [len(tokens)]
    enc = gpt2_tokenizer()
    return [enc.decode(tokens[a + 1 : b].tolist()) for a, b in zip(starts, starts[1:])]


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory):
    return prepare_sample(tmp_path_factory.mktemp("cache"))


def test_files_and_headers(sample_dir):
    assert sample_dir.name == "sample"
    assert [p.name for p in find_shards(sample_dir, "val")] == [VAL_NAME]
    assert [p.name for p in find_shards(sample_dir, "train")] == [TRAIN_NAME]
    n_val, n_train = read_header(sample_dir / VAL_NAME), read_header(sample_dir / TRAIN_NAME)
    assert 0.1 <= n_val / (n_val + n_train) < 0.15  # about 10%, rounded up to a whole document
    assert n_train > 50_000


def test_tokens(sample_dir):
    val, train = load_tokens(sample_dir / VAL_NAME), load_tokens(sample_dir / TRAIN_NAME)
    assert val[0] == EOT and train[0] == EOT
    assert int(val.max()) < 50257 and int(train.max()) < 50257


def test_documents_are_the_sorted_pydoc_topics(sample_dir):
    val = _documents(load_tokens(sample_dir / VAL_NAME))
    train = _documents(load_tokens(sample_dir / TRAIN_NAME))
    assert val + train == [topics[k] for k in sorted(topics)]
    first_train_topic = sorted(topics)[len(val)]
    assert train[0].startswith(topics[first_train_topic][:200])


def test_second_call_does_not_rewrite(tmp_path):
    out = prepare_sample(tmp_path)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()}
    assert prepare_sample(tmp_path) == out
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in out.iterdir()} == before


@pytest.mark.parametrize("damage", ["truncate", "flip_token", "delete"])
def test_damaged_file_is_rewritten(tmp_path, damage):
    out = prepare_sample(tmp_path)
    good = {name: (out / name).read_bytes() for name in (VAL_NAME, TRAIN_NAME)}
    val_stat = (out / VAL_NAME).stat()
    path = out / TRAIN_NAME
    if damage == "truncate":
        path.write_bytes(good[TRAIN_NAME][:5000])
    elif damage == "flip_token":
        raw = bytearray(good[TRAIN_NAME])
        raw[2000] ^= 0xFF  # header still valid, one token changed
        path.write_bytes(bytes(raw))
    else:
        path.unlink()

    prepare_sample(tmp_path)
    assert path.read_bytes() == good[TRAIN_NAME]
    assert (out / VAL_NAME).stat().st_mtime_ns == val_stat.st_mtime_ns  # the intact shard is left alone
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_default_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITONRUN_CACHE", str(tmp_path / "c"))
    assert prepare_sample() == tmp_path / "c" / "sample"
    assert (tmp_path / "c" / "sample" / VAL_NAME).is_file()


def test_prints_nothing(tmp_path, capsys):
    prepare_sample(tmp_path)
    prepare_sample(tmp_path)
    assert capsys.readouterr() == ("", "")
