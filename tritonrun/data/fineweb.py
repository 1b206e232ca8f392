"""FineWeb for the trainer: download GPT-2 token shards, or tokenize raw text into them yourself.

    python -m tritonrun.data.fineweb                        # val + 99 train shards (llm.c's ~9.9B-token recipe), ~20 GB
    python -m tritonrun.data.fineweb --train-shards 8       # quick start: val + 0.8B train tokens, ~1.8 GB
    python -m tritonrun.data.fineweb --tokenize             # tokenize HuggingFaceFW/fineweb sample-10BT here instead
    python -m tritonrun.data.fineweb --tokenize --source corpus.parquet more.jsonl notes/*.txt --out-dir data/mine

Run it from the repo root. Shards land in --out-dir (default data/fineweb10B, the trainer's default --data) in
llm.c's format (tritonrun/data/shards.py): `fineweb_val_000000.bin`, then `fineweb_train_000001.bin`, ...

Download (the default mode). The val shard and the first --train-shards train shards of the Hugging Face dataset
repo kjj0/fineweb10B-gpt2 (100M GPT-2 tokens each) are fetched with huggingface_hub from --endpoint (default
$HF_ENDPOINT, else https://huggingface.co). The default, 99 train shards, is the smallest count that covers llm.c's
124M recipe: 18,865 steps x 524,288 tokens = 9,890,693,120 tokens -> ceil(98.9) = 99 shards. A shard already in
--out-dir whose header and size check out (data.shards.read_header) is skipped without any network traffic.
Everything else is downloaded into the hidden staging dir <out-dir>/.download (huggingface_hub writes a temp file
and renames it when the byte count matches the server's), verified there (header + size, size equal to what
the server announced, every token id below 50257 as the trainer checks it), and only then renamed into <out-dir>.
A file that fails verification is fetched again, up to 3 times. So a file with its final name in <out-dir> is
always complete; an interrupted run just runs again.

Tokenize (--tokenize). Documents come from HuggingFaceFW/fineweb, subset sample-10BT (the parquet files under
sample/10BT/, listed with huggingface_hub and fetched one at a time into <out-dir>/.download, deleted once read),
or from --source PATH... (local files, in the order given; a directory means its supported files in name order):
  .parquet  one document per row of the string column "text" (read in record batches with pyarrow)
  .jsonl    one document per non-blank line, a JSON object with a string field "text"
  .txt      --txt-split file (default): the whole file is one document (an empty file is none);
            --txt-split blank-line: every run of non-blank lines is a document (lines joined with "\\n"; a line
            holding only whitespace counts as blank)
Every document becomes [EOT 50256] + its GPT-2 tokens (data.tokenizer.encode_document), as in llm.c. The token
stream is cut into shards of --shard-tokens tokens (default 100,000,000; the last one holds the rest): shard 0 is
the val shard, the rest are train shards, and a document that does not fit is split across the boundary (llm.c).
A pool of --workers processes tokenizes batches of documents; at most 2 x workers batches are in flight and their
results are consumed in submission order, so memory stays bounded (one preallocated uint16 shard buffer plus the
batches in flight) and the bytes are identical to a --workers 1 run.

Resume (tokenize). <out-dir>/tokenize_manifest.json records the run's settings (sources with their sizes, shard
size, txt split) and, for every finished shard, its token count and where it starts and ends in the document
stream as [source index, document index, token offset within that document]. A shard's ids are checked as the
trainer checks them (all below 50257), then it is written atomically (data.shards.write_shard) and only then added
to the manifest (also replaced atomically). A rerun checks the listed shards (header + size + count), keeps the
leading run of good ones and restarts at the end of the last good one: sources before it are not read (not even
downloaded), documents before it in its source are skipped without tokenizing, and the first document's leading
tokens are dropped. The output is byte-identical to an uninterrupted run. A manifest with
other settings, or shards in --out-dir without a manifest, is an error.

Failures (unreachable hub, refused credentials, disk full, a source without "text", a missing source) print one
`error: ...` line that says how to fix it and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file, its folder would lead sys.path and shadow real packages
    print(f"error: run it as a module: python -m tritonrun.data.fineweb {' '.join(sys.argv[1:])}".rstrip(),
          file=sys.stderr)
    sys.exit(2)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from tritonrun.data.shards import (HEADER_BYTES, ShardError, check_token_ids, load_tokens, read_header,  # noqa: E402
                                   write_shard)
from tritonrun.runinfo import atomic_file, fsync_dir  # noqa: E402
from tritonrun.data.tokenizer import encode_document, gpt2_tokenizer  # noqa: E402

# ------------------------------------------------------------------------------------------ constants
DEFAULT_OUT_DIR = "data/fineweb10B"  # the trainer's default --data
DOWNLOAD_REPO = "kjj0/fineweb10B-gpt2"  # dataset repo of llm.c-format GPT-2 shards
AVAILABLE_TRAIN_SHARDS = 103  # fineweb_train_000001.bin ... fineweb_train_000103.bin
SHARD_TOKENS = 100_000_000  # tokens per shard, in that repo and by default here
LLMC_STEPS = 18_865  # llm.c 124M recipe: steps ...
LLMC_BATCH_TOKENS = 524_288  # ... x tokens per step
RECIPE_TOKENS = LLMC_STEPS * LLMC_BATCH_TOKENS  # 9,890,693,120
DEFAULT_TRAIN_SHARDS = math.ceil(RECIPE_TOKENS / SHARD_TOKENS)  # 99
SHARD_BYTES = HEADER_BYTES + 2 * SHARD_TOKENS  # 200,001,024

FINEWEB_REPO = "HuggingFaceFW/fineweb"
SUBSETS = {"sample-10BT": "sample/10BT", "sample-100BT": "sample/100BT", "sample-350BT": "sample/350BT"}
DEFAULT_SUBSET = "sample-10BT"

PREFIX = "fineweb"  # shard names: fineweb_val_000000.bin, fineweb_train_000001.bin, ...
MANIFEST_NAME = "tokenize_manifest.json"
MANIFEST_FORMAT = 1
STAGING_DIR = ".download"  # inside --out-dir; removed when a download run completes
SOURCE_SUFFIXES = (".parquet", ".jsonl", ".txt")
TXT_SPLITS = ("file", "blank-line")

DOWNLOAD_ATTEMPTS = 3  # per file: downloads that fail verification are retried this many times in all
BATCH_DOCS = 512  # documents per tokenizer task ...
BATCH_CHARS = 4_000_000  # ... or fewer, so that one task holds at most ~4 MB of text
INFLIGHT_PER_WORKER = 2  # tasks in flight per worker: keeps workers busy, bounds memory

# TEST-ONLY hook: seconds to sleep after each shard is written and recorded in the manifest, so the tests can
# SIGKILL a run between two shards deterministically. Never set it for real runs.
_TEST_PAUSE_ENV = "TRITONRUN_TEST_FINEWEB_PAUSE_AFTER_SHARD_S"


class FinewebError(Exception):
    """A problem the user can fix: main() prints `error: <message>` (one line) and returns 2."""


def shard_name(index: int) -> str:
    """Shard 0 is the val shard, the rest are train shards (llm.c naming)."""
    split = "val" if index == 0 else "train"
    return f"{PREFIX}_{split}_{index:06d}.bin"


def download_command(out_dir: str | os.PathLike = DEFAULT_OUT_DIR) -> str:
    """The shell command (run from the repo root) that downloads the default shards into `out_dir`."""
    return f"python -m tritonrun.data.fineweb --out-dir {shlex.quote(str(out_dir))}"


def _say(msg: str) -> None:
    tqdm.write(msg, file=sys.stdout)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(p).free
    return None


@contextlib.contextmanager
def _disk_guard(where: Path, need_bytes: int, what: str) -> Iterator[None]:
    """Turn "no space left" (ENOSPC, EDQUOT) into a FinewebError saying how much space is needed."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = _free_bytes(where)
        have = f", {_gb(free)} free now" if free is not None else ""
        raise FinewebError(
            f"disk full in {where} while {what}: about {_gb(need_bytes)} more is needed{have}; "
            f"free some space or choose another --out-dir, then run the same command again (it resumes)"
        ) from None


def _shard_ok(path: Path, n_tokens: int | None = None, check_ids: bool = False) -> str | None:
    """None if `path` is a valid shard (of `n_tokens` tokens, when given), else what is wrong with it. With
    `check_ids`, every token id is checked too (data.shards.check_token_ids: ~8 ms per 100M-token shard once
    read), as the trainer does when it opens a shard; without, only header and size (a rerun's quick skip)."""
    try:
        n = read_header(path)
        if check_ids:
            check_token_ids(path, load_tokens(path))
    except ShardError as e:
        return e.problem
    if n_tokens is not None and n != n_tokens:
        return f"holds {n} tokens, expected {n_tokens}"
    return None


# ---------------------------------------------------------------------------------- hub error handling
def _connection_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "could not talk to the server", for whichever HTTP client the hub uses."""
    import socket

    types: list[type[BaseException]] = [ConnectionError, TimeoutError, socket.gaierror]
    for mod_name in ("httpx2", "httpx"):
        with contextlib.suppress(ImportError):
            mod = __import__(mod_name)
            types += [mod.TransportError]  # connect/read/write errors, timeouts, dropped connections
    with contextlib.suppress(ImportError):
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    return tuple(types)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _auth_message(repo: str, endpoint: str, status: int | str) -> str:
    return (
        f"{endpoint} refused access to dataset {repo} (HTTP {status}: not logged in, bad token, or a gated "
        f"dataset whose terms are not accepted); log in with `huggingface-cli login` (or `hf auth login`) or set "
        f"HF_TOKEN=<your token>, and accept the terms on the dataset's page if it is gated"
    )


def _hub_error(exc: BaseException, repo: str, endpoint: str, what: str) -> FinewebError | None:
    """A one-line FinewebError for a hub/network failure, or None if `exc` is something else."""
    from huggingface_hub.errors import FileMetadataError, GatedRepoError, HfHubHTTPError

    conn_types = _connection_error_types()
    for e in _chain(exc):
        if isinstance(e, GatedRepoError):
            return FinewebError(_auth_message(repo, endpoint, getattr(e.response, "status_code", "403")))
        if isinstance(e, HfHubHTTPError) and getattr(e, "response", None) is not None:
            status = e.response.status_code
            if status in (401, 403):
                return FinewebError(_auth_message(repo, endpoint, status))
            if status == 404:
                return FinewebError(
                    f"{what}: not found at {endpoint} (HTTP 404); check --endpoint / HF_ENDPOINT and --revision"
                )
            return FinewebError(
                f"{what}: {endpoint} answered HTTP {status}; try again later, or use another --endpoint"
            )
        if isinstance(e, FileMetadataError):
            return FinewebError(
                f"{what}: {endpoint} does not look like a Hugging Face Hub endpoint ({_one_line(e)}); "
                f"fix --endpoint / HF_ENDPOINT"
            )
        if isinstance(e, conn_types):
            return FinewebError(
                f"cannot reach the Hugging Face Hub at {endpoint} ({_one_line(e)}); check your network "
                f"connection, or point --endpoint / HF_ENDPOINT at a reachable mirror"
            )
    return None


@contextlib.contextmanager
def _hub_errors(repo: str, endpoint: str, what: str) -> Iterator[None]:
    try:
        yield
    except FinewebError:
        raise
    except Exception as e:
        err = _hub_error(e, repo, endpoint, what)
        if err is None:
            raise
        raise err from None


def _resolve_endpoint(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


# ------------------------------------------------------------------------------------------- download
def download(
    out_dir: str | os.PathLike = DEFAULT_OUT_DIR,
    train_shards: int = DEFAULT_TRAIN_SHARDS,
    endpoint: str | None = None,
    revision: str = "main",
) -> list[Path]:
    """Make `out_dir` hold the val shard and the first `train_shards` train shards of kjj0/fineweb10B-gpt2, each
    verified. Returns their paths. Raises FinewebError for problems the user can fix."""
    if not 0 <= train_shards <= AVAILABLE_TRAIN_SHARDS:
        raise FinewebError(f"--train-shards must be in [0, {AVAILABLE_TRAIN_SHARDS}], got {train_shards}")
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinewebError(f"cannot create --out-dir {out} ({e.strerror})") from None
    names = [shard_name(i) for i in range(train_shards + 1)]
    todo = []
    for name in names:
        problem = _shard_ok(out / name)
        if problem is None:
            continue
        if (out / name).exists():
            _say(f"{name}: {problem}; fetching it again")
        todo.append(name)
    if not todo:
        _say(f"all {len(names)} shards present and valid in {out} (val + {train_shards} train); nothing to fetch")
        return [out / n for n in names]

    endpoint = _resolve_endpoint(endpoint)
    need = len(todo) * SHARD_BYTES
    free = _free_bytes(out)
    _say(f"fetching {len(todo)} of {len(names)} shards from {endpoint}/datasets/{DOWNLOAD_REPO} into {out} "
         f"({len(names) - len(todo)} already complete), about {_gb(need)}")
    if free is not None and free < need:
        print(f"warning: {out} has {_gb(free)} free, the {len(todo)} shards need about {_gb(need)}",
              file=sys.stderr)
    staging = out / STAGING_DIR
    with tqdm(total=len(todo), unit="file", desc="shards", disable=None) as bar:
        for k, name in enumerate(todo):
            _fetch_shard(name, out, staging, endpoint, revision, remaining=len(todo) - k)
            bar.update(1)
            if bar.disable:
                _say(f"ready: {name} [{k + 1}/{len(todo)}]")
    shutil.rmtree(staging, ignore_errors=True)
    _say(f"done: {len(names)} verified shards in {out}")
    return [out / n for n in names]


def _fetch_shard(name: str, out: Path, staging: Path, endpoint: str, revision: str, remaining: int) -> None:
    """Download one shard into the staging dir, verify it, rename it into `out`."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url

    url = hf_hub_url(DOWNLOAD_REPO, name, repo_type="dataset", revision=revision, endpoint=endpoint)
    what = f"{DOWNLOAD_REPO}/{name}"
    problem = ""
    for attempt in range(DOWNLOAD_ATTEMPTS):
        with _hub_errors(DOWNLOAD_REPO, endpoint, what):
            # our own HEAD first: it fails fast (no retries) on a dead endpoint or refused credentials, and
            # tells us the size the server promises
            meta = get_hf_file_metadata(url, endpoint=endpoint)
        need = (meta.size or SHARD_BYTES) * remaining
        try:
            with _hub_errors(DOWNLOAD_REPO, endpoint, what), _disk_guard(out, need, f"downloading {name}"):
                staged = Path(hf_hub_download(
                    DOWNLOAD_REPO, name, repo_type="dataset", revision=revision, endpoint=endpoint,
                    local_dir=staging, force_download=attempt > 0,
                ))
        except FinewebError:
            raise
        except OSError as e:
            if e.errno is not None:  # permissions & co: not a transfer problem, main() reports it
                raise
            # huggingface_hub's "Consistency check failed": the bytes received differ from the announced size
            problem = _one_line(e)
            _say(f"{name}: download failed ({problem}); retrying [{attempt + 1}/{DOWNLOAD_ATTEMPTS}]")
            continue
        problem = _shard_ok(staged, check_ids=True)
        if problem is None and meta.size is not None and staged.stat().st_size != meta.size:
            problem = f"file has {staged.stat().st_size} bytes, the server announced {meta.size}"
        if problem is None:
            os.replace(staged, out / name)
            fsync_dir(out)
            return
        _say(f"{name}: downloaded file is bad ({problem}); fetching again [{attempt + 1}/{DOWNLOAD_ATTEMPTS}]")
        staged.unlink(missing_ok=True)
    raise FinewebError(
        f"{name}: still bad after {DOWNLOAD_ATTEMPTS} downloads ({problem}); the endpoint {endpoint} may be "
        f"serving a damaged file: try again later or use another --endpoint"
    )


# ------------------------------------------------------------------------------------- document sources
@dataclass
class Source:
    """One input file: a local path, or a parquet file in the hub repo (fetched on first use)."""

    name: str  # identity recorded in the manifest: absolute local path, or hf://datasets/<repo>/<path>
    size: int  # bytes: a changed size means a changed source
    kind: str  # "parquet" | "jsonl" | "txt"
    path: Path | None = None  # local file (None for a hub file until fetched)
    hub_path: str | None = None  # path inside FINEWEB_REPO for hub files


def local_sources(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """Sources for --source, in the order given (a directory expands to its supported files by name).
    Checks up front that every file exists, has a supported type and has a "text" column/field."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in SOURCE_SUFFIXES)
            if not found:
                raise FinewebError(f"--source {p}: directory holds no {'/'.join(SOURCE_SUFFIXES)} files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FinewebError(f"--source {p}: no such file or directory; check the path")
    sources = []
    for f in files:
        kind = f.suffix.lower().lstrip(".")
        if "." + kind not in SOURCE_SUFFIXES:
            raise FinewebError(f"--source {f}: unsupported file type; use .parquet, .jsonl or .txt files")
        src = Source(name=os.path.abspath(f), size=f.stat().st_size, kind=kind, path=f)
        _check_text_field(src)
        sources.append(src)
    return sources


def _require_pyarrow():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise FinewebError("reading .parquet needs pyarrow: pip install pyarrow") from None
    return pq


def _check_text_field(src: Source) -> None:
    """Fail early when a source has no "text" column (parquet) or its first record has no "text" (jsonl)."""
    assert src.path is not None
    if src.kind == "parquet":
        pq = _require_pyarrow()
        try:
            schema = pq.read_schema(src.path)
        except Exception as e:  # pyarrow raises ArrowInvalid & co for a file that is not parquet
            raise FinewebError(f"{src.path}: cannot read as parquet ({_one_line(e)})") from None
        if "text" not in schema.names:
            raise FinewebError(
                f"{src.path}: no \"text\" column (columns: {', '.join(schema.names)}); "
                f"--source needs the documents in a string column named \"text\""
            )
        import pyarrow as pa

        typ = schema.field("text").type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
            raise FinewebError(f"{src.path}: column \"text\" has type {typ}, expected strings")
    elif src.kind == "jsonl":
        for _ in _iter_jsonl(src.path, 0):
            break  # the first record parses and has a string "text"


def _iter_jsonl(path: Path, start: int) -> Iterator[str]:
    index = 0
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if index >= start:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise FinewebError(f"{path}:{lineno}: not valid JSON ({e.msg}); .jsonl needs one object per "
                                       f"line") from None
                text = record.get("text") if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise FinewebError(f"{path}:{lineno}: no string field \"text\"; every .jsonl line must be an "
                                       f"object with a \"text\" field")
                yield text
            index += 1


def _txt_documents(path: Path, split: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if split == "file":
        return [text] if text else []
    docs, block = [], []
    for line in text.splitlines():
        if line.strip():
            block.append(line)
        elif block:
            docs.append("\n".join(block))
            block = []
    if block:
        docs.append("\n".join(block))
    return docs


def _iter_parquet(path: Path, start: int) -> Iterator[str]:
    pq = _require_pyarrow()
    pf = pq.ParquetFile(path)
    if "text" not in pf.schema_arrow.names:
        raise FinewebError(f"{path}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
    # skip whole row groups before `start` using the footer's row counts (no decoding)
    first_group, skipped = 0, 0
    while first_group < pf.num_row_groups and skipped + pf.metadata.row_group(first_group).num_rows <= start:
        skipped += pf.metadata.row_group(first_group).num_rows
        first_group += 1
    row = skipped
    groups = list(range(first_group, pf.num_row_groups))
    if not groups:
        return
    for batch in pf.iter_batches(batch_size=1024, columns=["text"], row_groups=groups):
        for text in batch.column(0).to_pylist():
            if row >= start:
                if text is None:
                    raise FinewebError(f"{path}: row {row} has a null \"text\"; every document needs a string")
                yield text
            row += 1


def iter_documents(src: Source, start: int, txt_split: str) -> Iterator[str]:
    """The documents of one source from document index `start` on (earlier ones are skipped, not tokenized)."""
    assert src.path is not None
    try:
        if src.kind == "parquet":
            yield from _iter_parquet(src.path, start)
        elif src.kind == "jsonl":
            yield from _iter_jsonl(src.path, start)
        else:
            yield from _txt_documents(src.path, txt_split)[start:]
    except UnicodeDecodeError as e:
        raise FinewebError(f"{src.path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def hub_sources(subset: str, endpoint: str, revision: str) -> list[Source]:
    """The parquet files of FineWeb's `subset`, in name order, listed with huggingface_hub."""
    from huggingface_hub import HfApi

    folder = SUBSETS[subset]
    what = f"{FINEWEB_REPO}/{folder}"
    _probe(endpoint, what)
    with _hub_errors(FINEWEB_REPO, endpoint, what):
        entries = list(HfApi(endpoint=endpoint).list_repo_tree(
            FINEWEB_REPO, path_in_repo=folder, repo_type="dataset", revision=revision))
    files = sorted((e for e in entries if e.path.endswith(".parquet") and hasattr(e, "size")),
                   key=lambda e: e.path)
    if not files:
        raise FinewebError(f"no .parquet files under {folder} in {FINEWEB_REPO} at {endpoint}; check --subset "
                           f"and --endpoint")
    return [Source(name=f"hf://datasets/{FINEWEB_REPO}/{e.path}", size=int(e.size), kind="parquet",
                   hub_path=e.path) for e in files]


def _probe(endpoint: str, what: str) -> None:
    """One plain request without retries, so that a dead endpoint fails at once (the hub's listing call would
    retry connection errors for ~20 s). Any HTTP answer counts as reachable."""
    from huggingface_hub.utils import get_session

    with _hub_errors(FINEWEB_REPO, endpoint, what):
        get_session().head(endpoint + "/", timeout=10)


# ----------------------------------------------------------------------------------------- tokenization
def _init_worker() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the parent, which stops the pool
    gpt2_tokenizer()  # build the BPE once per worker


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """All documents of a batch, each [EOT] + tokens, concatenated as uint16, and their lengths."""
    docs = [encode_document(t) for t in texts]
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    return (np.concatenate(docs) if docs else np.zeros(0, np.uint16)), lengths


def _doc_batches(sources: list[Source], start: tuple[int, int], txt_split: str,
                 fetch: Callable[[Source], None], release: Callable[[Source], None],
                 ) -> Iterator[tuple[tuple[int, int], list[str]]]:
    """((source index, index of the batch's first document), texts), from document `start` on. A batch never
    spans two sources; it holds at most BATCH_DOCS documents or about BATCH_CHARS characters."""
    start_src, start_doc = start
    for si in range(start_src, len(sources)):
        src = sources[si]
        fetch(src)
        doc = start_doc if si == start_src else 0
        texts: list[str] = []
        chars = 0
        for text in iter_documents(src, doc, txt_split):
            texts.append(text)
            chars += len(text)
            if len(texts) >= BATCH_DOCS or chars >= BATCH_CHARS:
                yield (si, doc), texts
                doc += len(texts)
                texts, chars = [], 0
        if texts:
            yield (si, doc), texts
        release(src)


def _encoded(batches: Iterator, pool, workers: int,
             ) -> Iterator[tuple[tuple[int, int], tuple[np.ndarray, np.ndarray]]]:
    """Tokenize batches in order: in this process when `pool` is None, else in the pool with at most
    INFLIGHT_PER_WORKER batches per worker submitted ahead. (Pool.imap would keep the order too, but its feeder
    thread drains the whole input iterator as fast as it can, so memory would grow with the corpus.)"""
    if pool is None:
        for key, texts in batches:
            yield key, _encode_batch(texts)
        return
    pending: deque = deque()
    exhausted = False
    while True:
        while not exhausted and len(pending) < INFLIGHT_PER_WORKER * workers:
            try:
                key, texts = next(batches)
            except StopIteration:
                exhausted = True
                break
            pending.append((key, pool.apply_async(_encode_batch, (texts,))))
        if not pending:
            return
        key, result = pending.popleft()
        yield key, result.get()


def _manifest_text(manifest: dict) -> str:
    """JSON with one line per source and per shard, so that a person can read it."""
    head = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest.items() if k not in ("sources", "shards")]
    sources = ",\n".join(f"  {json.dumps(s)}" for s in manifest["sources"])
    shards = ",\n".join(f"  {json.dumps(s)}" for s in manifest["shards"])
    return "{\n" + ",\n".join(head + [f' "sources": [\n{sources}\n ]', f' "shards": [\n{shards}\n ]']) + "\n}\n"


def _write_manifest(path: Path, manifest: dict) -> None:
    """Replace the manifest atomically (temp file, fsync, rename)."""
    with atomic_file(path, "w") as f:
        f.write(_manifest_text(manifest))


def _settings(sources: list[Source], shard_tokens: int, txt_split: str) -> dict:
    return {
        "shard_tokens": shard_tokens,
        "txt_split": txt_split,
        "sources": [{"name": s.name, "size": s.size} for s in sources],
    }


def _resume_point(out: Path, settings: dict) -> tuple[dict, bool]:
    """Load or start the manifest. Returns (manifest, finished); manifest["shards"] keeps only the leading run
    of shards that are still valid on disk."""
    path = out / MANIFEST_NAME
    if not path.exists():
        foreign = sorted(p.name for p in (*out.glob("*_val_*.bin"), *out.glob("*_train_*.bin")))
        if foreign:
            raise FinewebError(
                f"--out-dir {out} already holds token shards ({foreign[0]}, ...) not written by a --tokenize run "
                f"(no {MANIFEST_NAME}); choose an empty --out-dir"
            )
        return {"format": MANIFEST_FORMAT, **settings, "shards": [], "finished": False}, False
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        recorded = {k: manifest[k] for k in settings}
        shards = manifest["shards"]
        ok_format = manifest.get("format") == MANIFEST_FORMAT
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise FinewebError(f"{path}: unreadable manifest ({_one_line(e)}); delete it and the shards beside it "
                           f"to start over") from None
    if not ok_format or recorded != settings:
        diff = [k for k in settings if recorded.get(k) != settings[k]]
        raise FinewebError(
            f"--out-dir {out} holds shards of a tokenize run with other settings ({', '.join(diff) or 'format'} "
            f"differ, see {MANIFEST_NAME}); rerun with the same sources and flags to resume, or use another "
            f"--out-dir (or delete that dir's shards and manifest) to start over"
        )
    good = []
    for k, entry in enumerate(shards):
        problem = _shard_ok(out / entry["file"], entry["n_tokens"])
        if entry["file"] != shard_name(k) or problem is not None:
            _say(f"{entry['file']}: {problem or 'out of order'}; tokenizing again from there")
            break
        good.append(entry)
    finished = bool(manifest.get("finished")) and len(good) == len(shards)
    manifest = {"format": MANIFEST_FORMAT, **settings, "shards": good, "finished": finished}
    return manifest, finished


def tokenize(
    sources: list[Source],
    out_dir: str | os.PathLike,
    shard_tokens: int = SHARD_TOKENS,
    workers: int | None = None,
    txt_split: str = "file",
    fetch: Callable[[Source], None] | None = None,
    release: Callable[[Source], None] | None = None,
) -> list[Path]:
    """Tokenize `sources` into shards in `out_dir`, resuming a previous run of the same settings (see the module
    docstring). `fetch`/`release` make a hub source's file available / drop it. Returns the shard paths."""
    if shard_tokens < 1 or shard_tokens >= 2**31:
        raise FinewebError(f"--shard-tokens must be in [1, 2**31), got {shard_tokens}")
    if txt_split not in TXT_SPLITS:
        raise FinewebError(f"--txt-split must be one of {', '.join(TXT_SPLITS)}, got {txt_split!r}")
    workers = workers or os.cpu_count() or 1
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FinewebError(f"cannot create --out-dir {out} ({e.strerror})") from None
    shard_bytes = HEADER_BYTES + 2 * shard_tokens
    manifest, finished = _resume_point(out, _settings(sources, shard_tokens, txt_split))
    shards = manifest["shards"]
    if finished:
        _say(f"all {len(shards)} shards already complete in {out}; nothing to do")
        return [out / s["file"] for s in shards]
    start = tuple(shards[-1]["end"]) if shards else (0, 0, 0)
    if shards:
        _say(f"resuming: {len(shards)} complete shard{'s' * (len(shards) != 1)} kept; continuing at source {start[0]} "
             f"({Path(sources[start[0]].name).name if start[0] < len(sources) else 'end'}), document {start[1]}, "
             f"token {start[2]}")
    with _disk_guard(out, shard_bytes, f"writing {MANIFEST_NAME}"):
        _write_manifest(out / MANIFEST_NAME, manifest)

    pause = float(os.environ.get(_TEST_PAUSE_ENV, "0") or 0)  # TEST-ONLY (see _TEST_PAUSE_ENV)
    buf = np.empty(shard_tokens, dtype=np.uint16)  # the one shard-sized buffer
    fill = 0
    shard_start = list(start)

    def emit(end: list[int] | None) -> None:
        nonlocal fill, shard_start
        k = len(shards)
        name = shard_name(k)
        try:  # the trainer's check, before the shard exists: an id >= 50257 here is a tokenizer bug
            check_token_ids(out / name, buf[:fill])
        except ShardError as e:
            raise FinewebError(f"{e}; {name} was not written (a tokenizer bug: please report it)") from None
        with _disk_guard(out, shard_bytes, f"writing {name} ({shard_bytes:,} bytes per shard)"):
            write_shard(out / name, buf[:fill])
            shards.append({"file": name, "n_tokens": fill, "start": shard_start, "end": end})
            manifest["finished"] = end is None
            _write_manifest(out / MANIFEST_NAME, manifest)
        bar.set_postfix_str(f"{k + 1} shards")
        if bar.disable:
            _say(f"wrote {name} ({fill:,} tokens)")
        shard_start = end
        fill = 0
        if pause > 0:
            time.sleep(pause)

    skip = start[2]  # leading tokens of the first document already in the previous shard
    batches = _doc_batches(sources, (start[0], start[1]), txt_split,
                           fetch or (lambda s: None), release or (lambda s: None))
    gpt2_tokenizer()  # build (and hash-check) the BPE once, before any worker is forked
    with contextlib.ExitStack() as stack:
        # the pool first: fork before the progress bar starts its monitor thread
        pool = stack.enter_context(multiprocessing.get_context().Pool(workers, initializer=_init_worker)
                                   ) if workers > 1 else None
        bar = stack.enter_context(tqdm(unit="tok", unit_scale=True, desc="tokens", disable=None))
        for (si, first_doc), (tokens, lengths) in _encoded(batches, pool, workers):
            # copy the batch's tokens into the shard buffer in as few slices as the shard boundaries allow
            ends = np.cumsum(lengths)  # ends[j]: index in `tokens` just past document first_doc + j
            pos, skip = skip, 0
            while pos < len(tokens):
                n = min(len(tokens) - pos, shard_tokens - fill)
                buf[fill:fill + n] = tokens[pos:pos + n]
                fill += n
                pos += n
                if fill == shard_tokens:  # the next shard starts at token `pos` of the batch: which document?
                    j = int(np.searchsorted(ends, pos, side="right"))
                    offset = pos - int(ends[j] - lengths[j]) if j < len(lengths) else 0
                    emit([si, first_doc + j, offset])
            bar.update(len(tokens))
        if fill:
            emit(None)
        elif shards:
            manifest["finished"] = True
            with _disk_guard(out, shard_bytes, f"writing {MANIFEST_NAME}"):
                _write_manifest(out / MANIFEST_NAME, manifest)
    if not shards:
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        raise FinewebError("the sources hold no documents; nothing was written")
    _say(f"done: {len(shards)} shards ({sum(s['n_tokens'] for s in shards):,} tokens) in {out}")
    return [out / s["file"] for s in shards]


def tokenize_hub(out_dir: str | os.PathLike, subset: str = DEFAULT_SUBSET, endpoint: str | None = None,
                 revision: str = "main", **kwargs) -> list[Path]:
    """tokenize() over FineWeb's parquet files, each fetched into <out_dir>/.download when reached and deleted
    once read."""
    from huggingface_hub import hf_hub_download

    endpoint = _resolve_endpoint(endpoint)
    sources = hub_sources(subset, endpoint, revision)
    out = Path(out_dir)
    staging = out / STAGING_DIR
    _say(f"tokenizing {len(sources)} parquet files of {FINEWEB_REPO} {subset} from {endpoint}")

    def fetch(src: Source) -> None:
        what = f"{FINEWEB_REPO}/{src.hub_path}"
        need = src.size + 2 * src.size  # the parquet file plus roughly its shards
        with _hub_errors(FINEWEB_REPO, endpoint, what), _disk_guard(out, need, f"downloading {src.hub_path}"):
            path = Path(hf_hub_download(FINEWEB_REPO, src.hub_path, repo_type="dataset", revision=revision,
                                        endpoint=endpoint, local_dir=staging))
        if path.stat().st_size != src.size:
            path.unlink(missing_ok=True)
            raise FinewebError(f"{what}: downloaded {path.stat().st_size} bytes, the listing says {src.size}; "
                               f"run the command again")
        src.path = path
        _check_text_field(src)

    def release(src: Source) -> None:
        if src.path is not None:
            src.path.unlink(missing_ok=True)
            src.path = None

    paths = tokenize(sources, out, fetch=fetch, release=release, **kwargs)
    shutil.rmtree(staging, ignore_errors=True)
    return paths


# ------------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise FinewebError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    doc = __doc__.split("\n\n")
    p = _Parser(prog="python -m tritonrun.data.fineweb", description="\n\n".join(doc[:3]),
                epilog="\n\n".join(doc[3:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR, help=f"where shards go (default {DEFAULT_OUT_DIR})")
    p.add_argument("--endpoint", help="Hugging Face Hub endpoint (default $HF_ENDPOINT, else https://huggingface.co)")
    p.add_argument("--revision", default="main", help="repo revision: branch, tag or commit (default main)")
    g = p.add_argument_group("download (default mode)")
    g.add_argument("--train-shards", type=int, help=f"train shards of {DOWNLOAD_REPO} to fetch besides the val "
                   f"shard, 0..{AVAILABLE_TRAIN_SHARDS} (default {DEFAULT_TRAIN_SHARDS}: llm.c's {LLMC_STEPS:,} "
                   f"steps x {LLMC_BATCH_TOKENS:,} tokens)")
    t = p.add_argument_group("tokenize")
    t.add_argument("--tokenize", action="store_true", help=f"tokenize raw text: {FINEWEB_REPO} (--subset) or "
                   "--source files")
    t.add_argument("--source", nargs="+", metavar="PATH", help="local .parquet/.jsonl/.txt files or dirs, in order, "
                   "instead of the hub")
    t.add_argument("--subset", choices=sorted(SUBSETS), help=f"FineWeb subset (default {DEFAULT_SUBSET})")
    t.add_argument("--txt-split", choices=TXT_SPLITS, help="a .txt file is one document (file, the default) or "
                   "one per block of non-blank lines (blank-line)")
    t.add_argument("--shard-tokens", type=int, help=f"tokens per shard (default {SHARD_TOKENS:,})")
    t.add_argument("--workers", type=int, help="tokenizer processes (default: all CPUs)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.tokenize:
            if args.train_shards is not None:
                raise FinewebError("--train-shards is for downloading; --tokenize writes every shard of its input")
            if args.workers is not None and args.workers < 1:
                raise FinewebError(f"--workers must be >= 1, got {args.workers}")
            shard_tokens = SHARD_TOKENS if args.shard_tokens is None else args.shard_tokens
            if not 1 <= shard_tokens < 2**31:  # before any file or network is touched
                raise FinewebError(f"--shard-tokens must be in [1, 2**31), got {shard_tokens}")
            kwargs = dict(shard_tokens=shard_tokens, workers=args.workers, txt_split=args.txt_split or "file")
            if args.source:
                if args.subset:
                    raise FinewebError("--subset picks hub files; it cannot be combined with --source")
                tokenize(local_sources(args.source), args.out_dir, **kwargs)
            else:
                tokenize_hub(args.out_dir, subset=args.subset or DEFAULT_SUBSET, endpoint=args.endpoint,
                             revision=args.revision, **kwargs)
        else:
            extra = [f for f in ("source", "subset", "txt_split", "shard_tokens", "workers")
                     if getattr(args, f) is not None]
            if extra:
                raise FinewebError(f"--{extra[0].replace('_', '-')} needs --tokenize")
            download(args.out_dir, DEFAULT_TRAIN_SHARDS if args.train_shards is None else args.train_shards,
                     endpoint=args.endpoint, revision=args.revision)
        return 0
    except FinewebError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unwritable dir, unreadable source, ...: the environment, not a bug
        where = f"{e.filename}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume (complete shards are kept)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
