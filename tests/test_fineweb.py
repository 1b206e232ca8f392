"""tritonrun/data/fineweb.py: tokenizing local files into shards, resuming, and downloading through huggingface_hub.

Everything runs offline. The download and hub-tokenize paths go through the real huggingface_hub client
(hf_hub_download, get_hf_file_metadata, HfApi.list_repo_tree) pointed with --endpoint / HF_ENDPOINT at
tests/hubserver.py, a stand-in for the Hub's resolve and tree routes on 127.0.0.1 that the tests fill with small
shards and parquet files. What this cannot show: the real Hub's redirects to its CDN and Xet storage (the
stand-in serves bytes directly, so huggingface_hub takes its plain-HTTP path), and the real repos' contents.

Disk full is shown twice: with an injected ENOSPC from the shard writer (always), and for real on a tiny tmpfs
mounted in a user+mount namespace (`unshare -rm`), skipped where such namespaces are not allowed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tritonrun.data import fineweb
from tritonrun.data.sample import sample_documents
from tritonrun.data.shards import HEADER_BYTES, find_shards, load_tokens, read_header, write_shard
from tritonrun.data.tokenizer import EOT, gpt2_tokenizer
from tests.hubserver import HubServer

REPO = Path(__file__).resolve().parents[1]
SHARD_TOKENS = 1500
DEADLINE_S = 60  # upper bound for any subprocess or polling loop here


# ------------------------------------------------------------------------------------------- helpers
def _documents() -> list[str]:
    """Real prose of varied length (some documents longer than a shard), plus edge cases."""
    docs = sample_documents()[:14]
    return docs + ["", "héllo wörld — ünïcode 🚀\n", "a literal <|endoftext|> is plain text", "  spaces  "]


def _expected_stream(docs: list[str]) -> np.ndarray:
    enc = gpt2_tokenizer()
    return np.concatenate([np.array([EOT] + enc.encode_ordinary(d), dtype=np.uint16) for d in docs])


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for i, d in enumerate(docs):
            f.write(json.dumps({"id": i, "text": d}) + "\n")
            if i == 1:
                f.write("\n")  # blank lines are not documents
    return path


def _write_parquet(path: Path, docs: list[str], column: str = "text") -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(len(docs))), column: docs})
    pq.write_table(table, path, row_group_size=3)  # several row groups: resume skips whole ones
    return path


def _stream(out: Path) -> np.ndarray:
    files = find_shards(out, "val") + find_shards(out, "train")
    return np.concatenate([np.asarray(load_tokens(p)) for p in files])


def _dir_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))}


def _decode_docs(tokens: np.ndarray) -> list[str]:
    enc = gpt2_tokenizer()
    starts = np.flatnonzero(tokens == EOT).tolist() + [len(tokens)]
    return [enc.decode(tokens[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]


def _tokenize(out: Path, sources: list[Path], *extra: str) -> int:
    return fineweb.main(["--tokenize", "--out-dir", str(out), "--shard-tokens", str(SHARD_TOKENS),
                         "--source", *map(str, sources), *extra])


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A clean environment for the CLI: no user token or cache, no proxy for 127.0.0.1, no progress bars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", PYTHONPATH=str(REPO))
    env.pop(fineweb._TEST_PAUSE_ENV, None)
    env.update(extra)
    return env


def _cli(args: list[str], env: dict[str, str], prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (prefix or []) + [sys.executable, "-m", "tritonrun.data.fineweb", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return _documents()


@pytest.fixture(scope="module")
def sources(tmp_path_factory, docs) -> list[Path]:
    """Three source types in one run: .jsonl, .parquet and .txt (one document per file)."""
    d = tmp_path_factory.mktemp("sources")
    return [_write_jsonl(d / "a.jsonl", docs[:7]), _write_parquet(d / "b.parquet", docs[7:15]),
            *[(d / f"c{i}.txt") for i in range(len(docs) - 15)]]


@pytest.fixture(scope="module")
def txt_docs(sources, docs) -> list[str]:
    for path, text in zip(sources[2:], docs[15:]):
        path.write_text(text, encoding="utf-8")
    return docs[15:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, sources, txt_docs) -> Path:
    """An uninterrupted single-process run: the bytes every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    assert _tokenize(out, sources, "--workers", "1") == 0
    return out


# ---------------------------------------------------------------------------------- tokenize: content
def test_default_train_shards_cover_the_llmc_recipe():
    tokens = 18_865 * 524_288  # llm.c: steps x tokens per step = 9,890,693,120
    assert fineweb.DEFAULT_TRAIN_SHARDS == 99
    assert 98 * 100_000_000 < tokens <= 99 * 100_000_000
    assert fineweb.download_command("data/fineweb10B") == "python -m tritonrun.data.fineweb --out-dir data/fineweb10B"
    assert fineweb.download_command("my dir") == "python -m tritonrun.data.fineweb --out-dir 'my dir'"


def test_tokenized_shards_hold_the_gpt2_stream(reference, docs):
    """Shard names, headers and counts; the tokens are GPT-2's, EOT first, in source order across shards."""
    expected = _expected_stream(docs)  # "" is a document too: just its EOT
    n_shards = -(-len(expected) // SHARD_TOKENS)
    names = [p.name for p in find_shards(reference, "val") + find_shards(reference, "train")]
    assert names == ["fineweb_val_000000.bin"] + [f"fineweb_train_{i:06d}.bin" for i in range(1, n_shards)]
    counts = [read_header(reference / n) for n in names]
    assert counts == [SHARD_TOKENS] * (n_shards - 1) + [len(expected) - SHARD_TOKENS * (n_shards - 1)]
    for n, c in zip(names, counts):
        assert (reference / n).stat().st_size == HEADER_BYTES + 2 * c
    np.testing.assert_array_equal(_stream(reference), expected)
    # some document spans three shards, so the split is exercised beyond a single boundary
    assert max(len(gpt2_tokenizer().encode_ordinary(d)) for d in docs) > 2 * SHARD_TOKENS
    manifest = json.loads((reference / fineweb.MANIFEST_NAME).read_text())
    assert manifest["finished"] and [s["file"] for s in manifest["shards"]] == names


def test_txt_split_modes(tmp_path):
    text = "\n\nfirst block\nstill first\n\n  \t\nsecond block\n\n\n\nthird — ünïcode\n   \n"
    (tmp_path / "notes.txt").write_text(text, encoding="utf-8")
    for mode, expected in [("file", [text]),
                           ("blank-line", ["first block\nstill first", "second block", "third — ünïcode"])]:
        out = tmp_path / mode
        assert fineweb.main(["--tokenize", "--source", str(tmp_path / "notes.txt"), "--out-dir", str(out),
                             "--txt-split", mode, "--workers", "1"]) == 0
        assert _decode_docs(_stream(out)) == expected
        np.testing.assert_array_equal(_stream(out), _expected_stream(expected))


def test_directory_source_expands_in_name_order(tmp_path, docs):
    d = tmp_path / "corpus"
    d.mkdir()
    for i, text in enumerate(docs[:3]):
        (d / f"{2 - i}.txt").write_text(text, encoding="utf-8")  # 2.txt holds docs[0], ... 0.txt docs[2]
    (d / "ignored.csv").write_text("id,text\n")
    assert fineweb.main(["--tokenize", "--source", str(d), "--out-dir", str(tmp_path / "out"),
                         "--workers", "1"]) == 0
    np.testing.assert_array_equal(_stream(tmp_path / "out"), _expected_stream(docs[:3][::-1]))


def test_process_pool_output_equals_single_process(tmp_path, sources, txt_docs, reference, monkeypatch):
    monkeypatch.setattr(fineweb, "BATCH_DOCS", 2)  # many small batches: more than the in-flight window
    out = tmp_path / "pool"
    assert _tokenize(out, sources, "--workers", "2") == 0
    assert _dir_bytes(out) == _dir_bytes(reference)
    assert (out / fineweb.MANIFEST_NAME).read_text() == (reference / fineweb.MANIFEST_NAME).read_text()


# ------------------------------------------------------------------------------------ tokenize: resume
def test_killed_run_resumes_to_identical_bytes(tmp_path, sources, txt_docs, reference, capsys):
    """A real run (2 workers) is SIGKILLed once its first shard is recorded (it ends inside a document); the
    rerun keeps that shard, starts mid-document and finishes with the bytes of an uninterrupted run."""
    out = tmp_path / "killed"
    env = _env(tmp_path, **{fineweb._TEST_PAUSE_ENV: "30"})  # test-only: sleep after each shard
    args = ["--tokenize", "--out-dir", str(out), "--shard-tokens", str(SHARD_TOKENS), "--workers", "2",
            "--source", *map(str, sources)]
    proc = subprocess.Popen([sys.executable, "-m", "tritonrun.data.fineweb", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        recorded = []
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                recorded = json.loads((out / fineweb.MANIFEST_NAME).read_text())["shards"]
            except (OSError, ValueError):
                recorded = []
            if recorded:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
        assert len(recorded) == 1, "the run did not record its first shard in time"
        assert recorded[0]["end"][2] > 0  # the next shard starts inside a document
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its pool workers: the group we started
        proc.wait(timeout=DEADLINE_S)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    kept = {n: (out / n).stat().st_ino for n in ("fineweb_val_000000.bin",)}
    assert sorted(p.name for p in out.glob("*.bin")) == sorted(kept)  # nothing else looks like a shard
    assert _dir_bytes(out) == {n: b for n, b in _dir_bytes(reference).items() if n in kept}

    assert _tokenize(out, sources, "--workers", "2") == 0
    assert "resuming: 1 complete shard kept" in capsys.readouterr().out
    assert _dir_bytes(out) == _dir_bytes(reference)
    assert {n: (out / n).stat().st_ino for n in kept} == kept  # kept, not rewritten
    assert not list(out.glob(".*.tmp"))


def test_damaged_shard_is_tokenized_again(tmp_path, sources, txt_docs, reference, capsys):
    out = tmp_path / "damaged"
    shutil.copytree(reference, out)
    victim = out / "fineweb_train_000002.bin"
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated
    before = (out / "fineweb_train_000001.bin").stat().st_ino
    assert _tokenize(out, sources, "--workers", "1") == 0
    assert "fineweb_train_000002.bin: truncated" in capsys.readouterr().out
    assert _dir_bytes(out) == _dir_bytes(reference)
    assert (out / "fineweb_train_000001.bin").stat().st_ino == before
    # a finished run is left alone
    assert _tokenize(out, sources, "--workers", "1") == 0
    assert "nothing to do" in capsys.readouterr().out


def test_token_ids_are_checked_before_a_shard_is_written(tmp_path, docs, capsys, monkeypatch):
    """The trainer's id check runs on every shard before it is written: a tokenizer that emitted an id outside
    the vocabulary (injected: 50300, in the padding) writes nothing and says which shard and position."""
    real = fineweb._encode_batch

    def bad_encode(texts):
        tokens, lengths = real(texts)
        tokens = tokens.copy()
        tokens[3] = 50300
        return tokens, lengths

    monkeypatch.setattr(fineweb, "_encode_batch", bad_encode)
    src = _write_jsonl(tmp_path / "d.jsonl", docs[:4])
    out = tmp_path / "out"
    assert _tokenize(out, [src], "--workers", "1") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: ")
    assert "fineweb_val_000000.bin: token id 50300 at position 3 " in err[0] and "was not written" in err[0]
    assert not list(out.glob("*.bin"))


def test_rerun_with_other_settings_or_foreign_shards_is_refused(tmp_path, sources, txt_docs, reference, capsys):
    out = tmp_path / "other"
    shutil.copytree(reference, out)
    assert fineweb.main(["--tokenize", "--out-dir", str(out), "--shard-tokens", "5000",
                         "--source", *map(str, sources)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "other settings (shard_tokens differ" in err
    assert _dir_bytes(out) == _dir_bytes(reference)

    foreign = tmp_path / "downloaded"
    foreign.mkdir()
    write_shard(foreign / "fineweb_val_000000.bin", [EOT, 1, 2])
    assert _tokenize(foreign, sources) == 2
    assert "not written by a --tokenize run" in capsys.readouterr().err
    assert read_header(foreign / "fineweb_val_000000.bin") == 3


# ------------------------------------------------------------------------------------ tokenize: errors
@pytest.mark.parametrize("kind", ["parquet", "jsonl"])
def test_source_without_text_column(tmp_path, kind):
    if kind == "parquet":
        src = _write_parquet(tmp_path / "bad.parquet", ["a", "b"], column="content")
    else:
        src = tmp_path / "bad.jsonl"
        src.write_text('{"content": "a"}\n')
    out = tmp_path / "out"
    proc = _cli(["--tokenize", "--source", str(src), "--out-dir", str(out)], _env(tmp_path))
    _assert_one_error_line(proc, str(src), '"text"')
    assert not out.exists()


def test_missing_source(tmp_path):
    out = tmp_path / "out"
    proc = _cli(["--tokenize", "--source", str(tmp_path / "nope.jsonl"), "--out-dir", str(out)], _env(tmp_path))
    _assert_one_error_line(proc, "nope.jsonl", "no such file")
    assert not out.exists()


def test_bad_record_mid_stream_leaves_only_complete_shards(tmp_path, docs, capsys, monkeypatch):
    monkeypatch.setattr(fineweb, "BATCH_DOCS", 2)  # small batches: shards get written before the bad line
    src = _write_jsonl(tmp_path / "late.jsonl", docs[:8])
    with open(src, "a", encoding="utf-8") as f:
        f.write('{"body": "no text here"}\n')
    out = tmp_path / "out"
    assert _tokenize(out, [src], "--workers", "1") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "late.jsonl:10" in err and '"text"' in err
    recorded = json.loads((out / fineweb.MANIFEST_NAME).read_text())["shards"]
    assert recorded and sorted(p.name for p in out.glob("*.bin")) == sorted(s["file"] for s in recorded)
    for s in recorded:
        assert read_header(out / s["file"]) == s["n_tokens"]


def test_disk_full_injected(tmp_path, sources, txt_docs, reference, monkeypatch, capsys):
    """ENOSPC from the shard writer on the third shard (injected): clear error, the two shards before it
    stay recorded and valid, and a rerun with space finishes with identical bytes."""
    real_write = fineweb.write_shard
    calls = []

    def write_until_full(path, tokens):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, tokens)

    monkeypatch.setattr(fineweb, "write_shard", write_until_full)
    out = tmp_path / "full"
    assert _tokenize(out, sources, "--workers", "1") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: disk full in") and "fineweb_train_000002.bin" in err and "GB" in err
    assert "\n" not in err
    recorded = json.loads((out / fineweb.MANIFEST_NAME).read_text())["shards"]
    assert [s["file"] for s in recorded] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    monkeypatch.setattr(fineweb, "write_shard", real_write)
    assert _tokenize(out, sources, "--workers", "1") == 0
    assert _dir_bytes(out) == _dir_bytes(reference)


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k none /tmp && true"],
                           capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


# ------------------------------------------------------------------------------------------ download
DL_REPO = fineweb.DOWNLOAD_REPO


def _shard_bytes(tmp_path: Path, name: str, n_tokens: int, seed: int) -> bytes:
    path = tmp_path / "made" / name
    path.parent.mkdir(exist_ok=True)
    write_shard(path, np.random.default_rng(seed).integers(0, 50257, n_tokens))
    return path.read_bytes()


@pytest.fixture
def hub(tmp_path):
    """The stand-in hub with val + 3 train shards of kjj0/fineweb10B-gpt2 (2,000-ish tokens each)."""
    with HubServer() as server:
        server.shards = {}
        for i in range(4):
            name = fineweb.shard_name(i)
            server.shards[name] = _shard_bytes(tmp_path, name, 2000 + 7 * i, seed=i)
            server.add(DL_REPO, name, server.shards[name])
        yield server


def _download_args(out: Path, hub: HubServer, n_train: int = 2) -> list[str]:
    # the trainer's command, as printed by download_command(), plus test-sized options
    cmd = shlex.split(fineweb.download_command(out))
    assert cmd[:3] == ["python", "-m", "tritonrun.data.fineweb"]
    return cmd[3:] + ["--train-shards", str(n_train), "--endpoint", hub.url]


def test_download_lands_verified_files(tmp_path, hub):
    out = tmp_path / "fineweb10B"
    proc = _cli(_download_args(out, hub), _env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    names = [fineweb.shard_name(i) for i in range(3)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)  # staging dir removed, nothing else
    for n in names:
        assert (out / n).read_bytes() == hub.shards[n]
        assert hub.gets(n) == 1
    assert hub.gets("fineweb_train_000003.bin") == 0
    assert "done: 3 verified shards" in proc.stdout


def test_download_fetches_truncated_files_again(tmp_path, hub):
    out = tmp_path / "fineweb10B"
    out.mkdir()
    val = fineweb.shard_name(0)
    (out / val).write_bytes(hub.shards[val][:3000])  # a truncated file from an earlier, interrupted copy
    hub.truncate_next["fineweb_train_000001.bin"] = 1  # the server serves a damaged copy once
    hub.cut_next["fineweb_train_000002.bin"] = 1  # the connection drops mid-file once (hub resumes)
    proc = _cli(_download_args(out, hub), _env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert f"{val}: truncated" in proc.stdout
    assert "fineweb_train_000001.bin: downloaded file is bad (truncated" in proc.stdout
    for i in range(3):
        assert (out / fineweb.shard_name(i)).read_bytes() == hub.shards[fineweb.shard_name(i)]
    assert [hub.gets(fineweb.shard_name(i)) for i in range(3)] == [1, 2, 2]


def test_download_refuses_a_shard_with_ids_outside_the_vocabulary(tmp_path, hub):
    """A served shard whose header and size are right but whose ids are not GPT-2's (an id in the vocabulary
    padding, as a damaged or foreign file may hold) is verified as the trainer would: fetched again, then
    refused with its name and the first bad position; it never gets its final name."""
    name = "fineweb_train_000001.bin"
    tokens = load_tokens(tmp_path / "made" / name).astype(np.int64)
    tokens[1234] = 50300
    write_shard(tmp_path / "made" / name, tokens)
    hub.add(DL_REPO, name, (tmp_path / "made" / name).read_bytes())
    out = tmp_path / "fineweb10B"
    proc = _cli(_download_args(out, hub), _env(tmp_path))
    line = _assert_one_error_line(proc, name, "still bad after 3 downloads", "token id 50300 at position 1234")
    assert "Traceback" not in proc.stderr, line
    assert hub.gets(name) == fineweb.DOWNLOAD_ATTEMPTS
    assert not (out / name).exists() and (out / fineweb.shard_name(0)).exists()


def test_download_skips_complete_files(tmp_path, hub):
    out = tmp_path / "fineweb10B"
    out.mkdir()
    for i in range(2):
        (out / fineweb.shard_name(i)).write_bytes(hub.shards[fineweb.shard_name(i)])
    proc = _cli(_download_args(out, hub), _env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    touched = {p.rsplit("/", 1)[-1] for _, p in hub.requests}
    assert touched == {"fineweb_train_000002.bin"}  # not even a HEAD for the complete ones
    assert "(2 already complete)" in proc.stdout
    n_requests = len(hub.requests)
    proc = _cli(_download_args(out, hub), _env(tmp_path))
    assert proc.returncode == 0 and "nothing to fetch" in proc.stdout
    assert len(hub.requests) == n_requests  # a complete dir needs no network at all


def test_download_respects_hf_endpoint(tmp_path, hub):
    out = tmp_path / "fineweb10B"
    proc = _cli(["--out-dir", str(out), "--train-shards", "1"], _env(tmp_path, HF_ENDPOINT=hub.url))
    assert proc.returncode == 0, proc.stderr
    assert (out / "fineweb_train_000001.bin").read_bytes() == hub.shards["fineweb_train_000001.bin"]


def test_download_dead_endpoint(tmp_path):
    out = tmp_path / "fineweb10B"
    t0 = time.monotonic()
    proc = _cli(["--out-dir", str(out), "--train-shards", "1", "--endpoint", f"http://127.0.0.1:{_closed_port()}"],
                _env(tmp_path))
    _assert_one_error_line(proc, "cannot reach the Hugging Face Hub", "--endpoint")
    assert time.monotonic() - t0 < 20  # fails fast: no long retry loop
    assert not list(out.glob("*.bin"))


@pytest.mark.parametrize("status", [401, 403])
def test_download_auth_failure(tmp_path, hub, status):
    hub.deny_status = status
    out = tmp_path / "fineweb10B"
    proc = _cli(_download_args(out, hub), _env(tmp_path))
    _assert_one_error_line(proc, f"HTTP {status}", "huggingface-cli login", "HF_TOKEN")
    assert not list(out.glob("*.bin"))


def test_download_disk_full_real(tmp_path, hub):
    """A real ENOSPC: --out-dir is a 64 KiB tmpfs (private mount namespace); one 40 KB shard fits, the
    second does not. Checked inside the namespace, where the tmpfs lives."""
    if not _unshare_works():
        pytest.skip("needs user+mount namespaces (unshare -rm) to mount a real tiny tmpfs")
    for i in range(3):  # bigger shards: 20,000 tokens = 40 KB each
        name = fineweb.shard_name(i)
        hub.shards[name] = _shard_bytes(tmp_path, name, 20_000, seed=10 + i)
        hub.add(DL_REPO, name, hub.shards[name])
    mnt = tmp_path / "small"
    mnt.mkdir()
    check = ("import sys, pathlib; from tritonrun.data.shards import read_header; "
             "[read_header(p) for p in pathlib.Path(sys.argv[1]).glob('*.bin')]; print('ALL-VALID')")
    script = (f"mount -t tmpfs -o size=64k none {shlex.quote(str(mnt))} || exit 99; "
              f"{shlex.quote(sys.executable)} -m tritonrun.data.fineweb --out-dir {shlex.quote(str(mnt))} "
              f"--train-shards 2 --endpoint {hub.url}; echo rc=$?; "
              f"{shlex.quote(sys.executable)} -c {shlex.quote(check)} {shlex.quote(str(mnt))}")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    assert "ALL-VALID" in proc.stdout  # whatever has a shard name there is complete
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: disk full in") and "more is needed" in errors[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------- tokenize from hub
def test_tokenize_from_hub_equals_local_files(tmp_path, docs):
    """--tokenize without --source lists FineWeb's sample/10BT parquet files through the hub client, fetches
    them one by one and gives the same bytes as tokenizing the same files locally."""
    local = [_write_parquet(tmp_path / "000_00000.parquet", docs[:9]),
             _write_parquet(tmp_path / "001_00000.parquet", docs[9:])]
    with HubServer() as server:
        for p in local:
            server.add(fineweb.FINEWEB_REPO, f"sample/10BT/{p.name}", p.read_bytes())
        server.add(fineweb.FINEWEB_REPO, "sample/100BT/000_00000.parquet", b"not this subset")
        server.add(fineweb.FINEWEB_REPO, "README.md", b"# fineweb")
        out = tmp_path / "hub"
        proc = _cli(["--tokenize", "--endpoint", server.url, "--out-dir", str(out),
                     "--shard-tokens", str(SHARD_TOKENS), "--workers", "2"], _env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert "tokenizing 2 parquet files" in proc.stdout
        assert server.gets("100BT/000_00000.parquet") == 0
        assert [server.gets(f"10BT/{p.name}") for p in local] == [1, 1]
        # resume: with the last shard gone, the rerun starts inside the second file and never fetches the first
        shards = sorted(out.glob("fineweb_train_*.bin"))
        shards[-1].unlink()
        proc = _cli(["--tokenize", "--endpoint", server.url, "--out-dir", str(out),
                     "--shard-tokens", str(SHARD_TOKENS), "--workers", "1"], _env(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert "continuing at source 1 (001_00000.parquet)" in proc.stdout
        assert [server.gets(f"10BT/{p.name}") for p in local] == [1, 2]
    assert not (out / fineweb.STAGING_DIR).exists()  # fetched parquet files are deleted once read
    assert _tokenize(tmp_path / "local", local, "--workers", "1") == 0
    assert _dir_bytes(out) == _dir_bytes(tmp_path / "local")
    np.testing.assert_array_equal(_stream(out), _expected_stream(docs))


@pytest.mark.parametrize("fault", ["dead", 401])
def test_tokenize_from_hub_errors(tmp_path, fault):
    if fault == "dead":
        proc = _cli(["--tokenize", "--endpoint", f"http://127.0.0.1:{_closed_port()}", "--out-dir",
                     str(tmp_path / "out")], _env(tmp_path))
        _assert_one_error_line(proc, "cannot reach the Hugging Face Hub")
        return
    with HubServer() as server:
        server.deny_status = fault
        proc = _cli(["--tokenize", "--endpoint", server.url, "--out-dir", str(tmp_path / "out")], _env(tmp_path))
    _assert_one_error_line(proc, "HTTP 401", "huggingface-cli login")
