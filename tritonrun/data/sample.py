"""The `--data sample` corpus: a small dataset that needs no download.

Source: `pydoc_data.topics.topics`, the help-topic texts that ship with CPython (~79 topics, ~465K characters;
the exact text depends on the Python version). Each topic is one document, taken in sorted key order and
tokenized llm.c-style (EOT prepended). The first whole documents holding about 10% of the tokens form the val
shard, the rest the train shard:

    <cache_dir>/sample/sample_val_000000.bin
    <cache_dir>/sample/sample_train_000001.bin
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tritonrun.data.shards import ShardError, load_tokens, write_shard
from tritonrun.data.tokenizer import encode_document

VAL_FRACTION = 0.1
VAL_NAME = "sample_val_000000.bin"
TRAIN_NAME = "sample_train_000001.bin"
README = """\
tritonrun sample corpus: CPython's pydoc_data.topics help texts, one document per topic in sorted key order,
GPT-2 tokenized with <|endoftext|> (50256) prepended to each document. llm.c shard format.
{val}: first whole documents, about 10% of the tokens ({n_val} tokens)
{train}: the remaining documents ({n_train} tokens)
Written by tritonrun/data/sample.py:prepare_sample; safe to delete (it is rebuilt on demand).
"""


def default_cache_dir() -> Path:
    """$TRITONRUN_CACHE, else ~/.cache/tritonrun."""
    env = os.environ.get("TRITONRUN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tritonrun"


def sample_documents() -> list[str]:
    """The corpus: one string per pydoc help topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def sample_tokens() -> tuple[np.ndarray, np.ndarray]:
    """(val, train) uint16 token streams; val is the shortest prefix of whole documents with >= 10% of tokens."""
    docs = [encode_document(text) for text in sample_documents()]
    total = sum(len(d) for d in docs)
    n_val_docs, n_val = 0, 0
    while n_val < VAL_FRACTION * total:
        n_val += len(docs[n_val_docs])
        n_val_docs += 1
    return np.concatenate(docs[:n_val_docs]), np.concatenate(docs[n_val_docs:])


def _holds(path: Path, expected: np.ndarray) -> bool:
    """True if `path` is a valid shard whose tokens equal `expected`."""
    try:
        return np.array_equal(load_tokens(path), expected)
    except (ShardError, OSError):
        return False


def prepare_sample(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the sample shards and return their directory, `<cache_dir>/sample`.

    Files that already exist, validate and hold exactly the expected tokens are left untouched; anything
    missing, corrupt or stale (e.g. made from another Python version's topics) is rewritten atomically.
    """
    out = Path(cache_dir if cache_dir is not None else default_cache_dir()) / "sample"
    out.mkdir(parents=True, exist_ok=True)
    val, train = sample_tokens()
    for name, tokens in ((VAL_NAME, val), (TRAIN_NAME, train)):
        if not _holds(out / name, tokens):
            write_shard(out / name, tokens)
    readme = README.format(val=VAL_NAME, train=TRAIN_NAME, n_val=len(val), n_train=len(train))
    readme_path = out / "README.txt"
    if not readme_path.is_file() or readme_path.read_text() != readme:
        readme_path.write_text(readme)
    return out
