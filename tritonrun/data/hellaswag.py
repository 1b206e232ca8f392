"""HellaSwag validation: download, tokenize, and score a GPT by acc and acc_norm.

    python -m tritonrun.data.hellaswag                               # download + tokenize the val set (10,042 examples)
    python -m tritonrun.data.hellaswag --jsonl hellaswag_val.jsonl   # tokenize a local copy instead (no network)
    python -m tritonrun.data.hellaswag --eval --checkpoint runs/x/ckpt_00001000.pt [--limit N] [--device cpu|cuda]

Each example is a context and 4 endings, one of them right (`label`). The context is the jsonl `ctx` field;
each ending is encoded as " " + ending (GPT-2 convention). The model reads ctx + ending and every ending is
scored by the cross-entropy of its own tokens only: acc picks the ending with the lowest summed loss,
acc_norm the lowest mean loss per token (ties go to the lower index). GPT-2 124M scores acc_norm 0.2955.

Download: the jsonl is streamed into a hidden temp file beside the target, its byte count checked against
Content-Length, every line parsed and checked (ctx, 4 endings, label 0..3; 10,042 lines from the default URL),
and only then renamed to `<out>.jsonl`; the tokenized file is written the same way (temp, fsync, rename).
A failed or interrupted run leaves no file under a final name.

Tokenized file (default data/hellaswag/hellaswag_val.bin), all little-endian:
    header: 256 int32 = [MAGIC, VERSION 1, n_examples, n_tokens, 0, ..., 0]              (1024 bytes)
    table:  n_examples x 6 int32 = [label, len(ctx), len(ending 0), ..., len(ending 3)]  (24 bytes each)
    tokens: n_tokens uint16: for each example, its ctx tokens then endings 0..3, back to back
The file size must be exactly 1024 + 24 * n_examples + 2 * n_tokens.

Long rows are cut from the left: at most block_size + 1 tokens of ctx + ending are kept (the model reads
all but the last), so the ending keeps its predictions; an ending longer than block_size is scored on its
last block_size tokens. An empty ctx is replaced by EOT (50256) so the first ending token is predicted.
"""
from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file, its folder would lead sys.path and shadow real packages
    print(f"error: run it as a module: python -m tritonrun.data.hellaswag {' '.join(sys.argv[1:])}".rstrip(),
          file=sys.stderr)
    sys.exit(2)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from tritonrun.data.tokenizer import EOT, gpt2_tokenizer  # noqa: E402
from tritonrun.runinfo import atomic_file, make_dir, reports_write_failures, temp_path_for  # noqa: E402

DEFAULT_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
DEFAULT_PATH = Path("data/hellaswag/hellaswag_val.bin")
VAL_EXAMPLES = 10_042  # lines in the default URL's file; checked only for that URL

MAGIC = 0x48535756  # "HSWV"
VERSION = 1
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TABLE_COLS = 6  # label, len(ctx), len(ending 0..3)
N_ENDINGS = 4
TOKEN_DTYPE = np.dtype("<u2")


class HellaSwagError(RuntimeError):
    """A problem the user can fix: str is one line saying what is wrong and what to do."""


@dataclass(frozen=True, eq=False)
class Example:
    """One tokenized example: ctx tokens, 4 ending tokens (each already " " + ending), the right ending."""

    ctx: np.ndarray  # (n_ctx,) int token ids
    endings: tuple[np.ndarray, ...]  # 4 x (n_end,), each non-empty
    label: int  # 0..3

    @classmethod
    def of(cls, ctx: Sequence[int], endings: Sequence[Sequence[int]], label: int) -> Example:
        """Build from plain lists, checking the shape."""
        if len(endings) != N_ENDINGS:
            raise ValueError(f"an example needs {N_ENDINGS} endings, got {len(endings)}")
        if not 0 <= int(label) < N_ENDINGS:
            raise ValueError(f"label must be 0..{N_ENDINGS - 1}, got {label}")
        ends = tuple(np.asarray(e, dtype=np.int64).reshape(-1) for e in endings)
        if any(e.size == 0 for e in ends):
            raise ValueError("every ending needs at least one token")
        return cls(np.asarray(ctx, dtype=np.int64).reshape(-1), ends, int(label))


# ------------------------------------------------------------------------------------ jsonl -> tokens
def read_jsonl(path: Path, expected_count: int | None = None, name: str | None = None) -> list[dict]:
    """Parse and check a HellaSwag jsonl file: every non-blank line a JSON object with a str `ctx`, a list of
    4 str `endings` and an int `label` in 0..3; `expected_count` lines when given. Errors call the file
    `name` (default its path)."""
    path = Path(path)
    name = name or str(path)
    hint = "not a complete HellaSwag jsonl file (fields ctx, endings[4], label)"
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise HellaSwagError(f"{name}: line {lineno} is not JSON ({e.msg}): {hint}") from None
                problem = _row_problem(row)
                if problem:
                    raise HellaSwagError(f"{name}: line {lineno}: {problem}: {hint}")
                rows.append(row)
    except FileNotFoundError:
        raise HellaSwagError(f"{path}: no such file: pass the path of hellaswag_val.jsonl to --jsonl") from None
    except UnicodeDecodeError as e:
        raise HellaSwagError(f"{name}: not UTF-8 text ({e.reason}): {hint}") from None
    except OSError as e:
        raise HellaSwagError(f"cannot read {path}: {e.strerror}") from None
    if not rows:
        raise HellaSwagError(f"{name}: no examples: {hint}")
    if expected_count is not None and len(rows) != expected_count:
        raise HellaSwagError(f"{name}: {len(rows)} examples, expected {expected_count}: the download is "
                             f"incomplete or the upstream file changed; run again, or use --jsonl PATH on a "
                             f"copy you trust")
    return rows


def _row_problem(row) -> str | None:
    if not isinstance(row, dict):
        return "not a JSON object"
    if not isinstance(row.get("ctx"), str):
        return "field 'ctx' missing or not a string"
    endings = row.get("endings")
    if not isinstance(endings, list) or len(endings) != N_ENDINGS or not all(isinstance(e, str) for e in endings):
        return f"field 'endings' missing or not a list of {N_ENDINGS} strings"
    label = row.get("label")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < N_ENDINGS:
        return f"field 'label' missing or not an integer 0..{N_ENDINGS - 1}"
    return None


def tokenize_rows(rows: Sequence[dict]) -> list[Example]:
    """GPT-2 tokens of checked jsonl rows: ctx as is, each ending as " " + ending."""
    enc = gpt2_tokenizer()
    ctxs = enc.encode_ordinary_batch([r["ctx"] for r in rows])
    ends = enc.encode_ordinary_batch([" " + e for r in rows for e in r["endings"]])
    return [Example.of(ctx, ends[N_ENDINGS * i: N_ENDINGS * (i + 1)], r["label"])
            for i, (ctx, r) in enumerate(zip(ctxs, rows))]


# ------------------------------------------------------------------------------------ tokenized file
def write_examples(path: Path, examples: Sequence[Example]) -> None:
    """Write examples in the tokenized format, atomically (hidden temp beside `path`, fsync, rename)."""
    path = Path(path)
    table = np.array([[ex.label, len(ex.ctx), *(len(e) for e in ex.endings)] for ex in examples],
                     dtype="<i4").reshape(-1, TABLE_COLS)
    parts = [p for ex in examples for p in (ex.ctx, *ex.endings)]
    tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError("token ids must be in [0, 65536)")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = (MAGIC, VERSION, len(examples), tokens.size)
    _atomic_write(path, [header.tobytes(), table.tobytes(), tokens.astype(TOKEN_DTYPE).tobytes()])


def load_examples(path: Path, limit: int | None = None) -> list[Example]:
    """Read a tokenized file (checking header and size); the first `limit` examples when given."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise HellaSwagError(f"{path}: not found: run `python -m tritonrun.data.hellaswag` to download and tokenize "
                             f"the HellaSwag val set (or --jsonl PATH for a local copy)") from None
    except OSError as e:
        raise HellaSwagError(f"cannot read {path}: {e.strerror}") from None
    redo = f"rebuild it with `python -m tritonrun.data.hellaswag --force --out {path}`"
    if len(raw) < HEADER_BYTES:
        raise HellaSwagError(f"{path}: {len(raw)} bytes, shorter than the {HEADER_BYTES}-byte header: {redo}")
    magic, version, n_ex, n_tok = np.frombuffer(raw, dtype="<i4", count=4).tolist()
    if magic != MAGIC:
        raise HellaSwagError(f"{path}: not a tokenized HellaSwag file (magic {magic:#x}, expected {MAGIC:#x})")
    if version != VERSION:
        raise HellaSwagError(f"{path}: version {version} not supported (expected {VERSION}): {redo}")
    expected = HEADER_BYTES + 4 * TABLE_COLS * n_ex + 2 * n_tok
    if n_ex < 0 or n_tok < 0 or len(raw) != expected:
        raise HellaSwagError(f"{path}: {len(raw)} bytes, header says {expected}: truncated or corrupt: {redo}")
    table = np.frombuffer(raw, dtype="<i4", count=TABLE_COLS * n_ex, offset=HEADER_BYTES).reshape(n_ex, TABLE_COLS)
    lens = table[:, 1:].astype(np.int64)
    if (lens < 0).any() or (lens[:, 1:] == 0).any() or lens.sum() != n_tok or \
            ((table[:, 0] < 0) | (table[:, 0] >= N_ENDINGS)).any():
        raise HellaSwagError(f"{path}: inconsistent example table: {redo}")
    tokens = np.frombuffer(raw, dtype=TOKEN_DTYPE, count=n_tok, offset=HEADER_BYTES + 4 * TABLE_COLS * n_ex)
    tokens = tokens.astype(np.int64)
    n = n_ex if limit is None else min(limit, n_ex)
    bounds = np.concatenate([[0], np.cumsum(lens[:n].reshape(-1))])
    pieces = [tokens[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    return [Example(pieces[5 * i], tuple(pieces[5 * i + 1: 5 * i + 5]), int(table[i, 0])) for i in range(n)]


def _atomic_write(path: Path, chunks: Iterable[bytes]) -> None:
    fix = "free space there, or pass --out PATH elsewhere"
    make_dir(path.parent, fix=fix)
    with atomic_file(path, "wb", fix=fix) as f:
        for c in chunks:
            f.write(c)


# ------------------------------------------------------------------------------------------ download
_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, socket.timeout)


def download(url: str, dest: Path, expected_count: int | None = None, timeout: float = 60.0) -> list[dict]:
    """Stream `url` to `dest` (a .jsonl path), check it and return its rows. The bytes go to a temp file
    that is renamed to `dest` only after the byte count and every line check out."""
    dest = Path(dest)
    fix = ("check the network or pass --url URL; or fetch the file yourself and run "
           "`python -m tritonrun.data.hellaswag --jsonl PATH`")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise HellaSwagError(f"cannot create {dest.parent}: {e.strerror}: pass --out PATH elsewhere") from None
    tmp = temp_path_for(dest)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            got = 0
            with open(tmp, "xb") as f, _progress(total, f"hellaswag {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
                f.flush()
                os.fsync(f.fileno())
        if total is not None and got != total:
            raise HellaSwagError(f"download of {url} cut short: {got:,} of {total:,} bytes arrived; run the "
                                 f"command again, or {fix}")
        rows = read_jsonl(tmp, expected_count, name=f"download of {url}")
        os.replace(tmp, dest)
        return rows
    except HellaSwagError:
        _unlink(tmp)
        raise
    except urllib.error.HTTPError as e:
        _unlink(tmp)
        raise HellaSwagError(f"cannot download {url}: HTTP {e.code} {e.reason}: {fix}") from None
    except _NETWORK_ERRORS as e:
        _unlink(tmp)
        reason = getattr(e, "reason", None) or e
        raise HellaSwagError(f"cannot download {url}: {reason}: {fix}") from None
    except ValueError as e:  # urllib: not a URL it can open
        _unlink(tmp)
        raise HellaSwagError(f"cannot download {url}: {e}: pass an http(s) URL to --url") from None
    except OSError as e:  # local: disk full, permissions
        _unlink(tmp)
        raise HellaSwagError(f"cannot write {tmp.parent}: {e.strerror}: free space or pass --out PATH "
                             f"elsewhere") from None
    except BaseException:
        _unlink(tmp)
        raise


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def _progress(total: int | None, desc: str, unit: str = "B"):
    """A tqdm bar on an interactive stderr, nothing otherwise."""
    if not sys.stderr.isatty():
        yield _NoBar()
        return
    from tqdm import tqdm

    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", dynamic_ncols=True) as bar:
        yield bar


def prepare(out: Path = DEFAULT_PATH, url: str = DEFAULT_URL, jsonl: Path | None = None,
            force: bool = False) -> Path:
    """Make sure the tokenized file `out` exists: tokenize `jsonl` when given, else download `url` to
    `out` with suffix .jsonl (kept, reused unless `force`) and tokenize that. Returns `out`."""
    out = Path(out)
    if jsonl is not None:
        rows = read_jsonl(Path(jsonl))
        source = str(jsonl)
    else:
        if out.exists() and not force:
            n = len(load_examples(out))
            print(f"{out}: already there ({n:,} examples); --force downloads and tokenizes again")
            return out
        raw = out.with_suffix(".jsonl")
        expected = VAL_EXAMPLES if url == DEFAULT_URL else None
        if raw.exists() and not force:  # only ever renamed into place after its checks passed
            print(f"{raw}: already downloaded; tokenizing it")
            rows = read_jsonl(raw, expected)
        else:
            print(f"downloading {url} -> {raw}")
            rows = download(url, raw, expected)
        source = str(raw)
    examples = tokenize_rows(rows)
    try:
        write_examples(out, examples)
    except OSError as e:
        raise HellaSwagError(f"cannot write {out}: {e.strerror}: free space or pass --out PATH elsewhere") from None
    n_tok = sum(len(ex.ctx) + sum(len(e) for e in ex.endings) for ex in examples)
    print(f"{out}: {len(examples):,} examples, {n_tok:,} tokens (from {source})")
    return out


# ----------------------------------------------------------------------------------------- scoring
@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _autocast(autocast, device: torch.device):
    """None or fp32: no autocast; a torch.dtype: torch.autocast(device, dtype); else a context manager as is
    (e.g. the trainer's own torch.autocast object)."""
    if autocast is None or autocast == torch.float32:
        return contextlib.nullcontext()
    if isinstance(autocast, torch.dtype):
        return torch.autocast(device.type, dtype=autocast)
    return autocast


def _rows(examples: Sequence[Example], block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs and targets for 4 rows per example, (4·len(examples), T) int64, right-padded; targets are
    -1 except at the positions that predict an ending token."""
    keep = block_size + 1  # the model reads keep - 1 tokens and predicts the last keep - 1
    seqs, n_scored = [], []
    for ex in examples:
        ctx = ex.ctx if len(ex.ctx) else np.array([EOT], dtype=np.int64)
        for end in ex.endings:
            seq = np.concatenate([ctx, end])[-keep:]
            seqs.append(seq)
            n_scored.append(min(len(end), len(seq) - 1))
    T = max(len(s) for s in seqs) - 1
    idx = np.zeros((len(seqs), T), dtype=np.int64)
    tgt = np.full((len(seqs), T), -1, dtype=np.int64)
    for r, (seq, n) in enumerate(zip(seqs, n_scored)):
        L = len(seq) - 1
        idx[r, :L] = seq[:-1]
        tgt[r, L - n: L] = seq[-n:]
    return idx, tgt


@torch.no_grad()
def ending_losses(model: torch.nn.Module, examples: Sequence[Example], device="cpu", autocast=None,
                  examples_per_batch: int = 4, progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed, mean) cross-entropy of each ending's tokens, each (len(examples), 4) fp32 on the CPU.
    The model, already on `device`, runs as given (call it in eval mode); `examples_per_batch` examples (4 rows each) share a
    forward pass, padded to the longest row."""
    device = torch.device(device)
    block_size = model.config.block_size
    sums, means = [], []
    bar_cm = _progress(len(examples), "hellaswag", "ex") if progress else contextlib.nullcontext(_NoBar())
    with bar_cm as bar:
        for start in range(0, len(examples), examples_per_batch):
            chunk = examples[start: start + examples_per_batch]
            idx_np, tgt_np = _rows(chunk, block_size)
            idx = torch.from_numpy(idx_np).to(device)
            tgt = torch.from_numpy(tgt_np).to(device)
            with _autocast(autocast, device):
                logits = model(idx)  # (rows, T, vocab)
            scored = tgt >= 0
            token_loss = torch.zeros(tgt.shape, dtype=torch.float32, device=device)
            token_loss[scored] = F.cross_entropy(logits[scored].float(), tgt[scored], reduction="none")
            s = token_loss.sum(1)
            m = s / scored.sum(1)
            sums.append(s.view(-1, N_ENDINGS).cpu())
            means.append(m.view(-1, N_ENDINGS).cpu())
            bar.update(len(chunk))
    if not sums:
        return torch.zeros(0, N_ENDINGS), torch.zeros(0, N_ENDINGS)
    return torch.cat(sums), torch.cat(means)


def evaluate(model: torch.nn.Module, path_or_examples, device="cpu", autocast=None, limit: int | None = None,
             examples_per_batch: int = 4, progress: bool = False) -> dict:
    """Score `model` on HellaSwag: {"acc", "acc_norm", "n"}. `path_or_examples` is a tokenized file or a list
    of Example; `autocast` None (fp32), a dtype (torch.bfloat16) or a context manager. The model runs under
    no_grad in eval mode; its training flag is restored afterwards."""
    if isinstance(path_or_examples, (str, os.PathLike)):
        examples = load_examples(Path(path_or_examples), limit)
    else:
        examples = list(path_or_examples)[:limit]
    if not examples:
        raise ValueError("no HellaSwag examples to score")
    with _eval_mode(model):
        sums, means = ending_losses(model, examples, device, autocast, examples_per_batch, progress)
    labels = torch.tensor([ex.label for ex in examples])
    return {
        "acc": (sums.argmin(1) == labels).float().mean().item(),
        "acc_norm": (means.argmin(1) == labels).float().mean().item(),
        "n": len(examples),
    }


# --------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise HellaSwagError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--out", "--data", dest="path", type=Path, default=DEFAULT_PATH,
                   help=f"tokenized file: written by the download / --jsonl, read by --eval (default {DEFAULT_PATH})")
    p.add_argument("--url", default=DEFAULT_URL, help="where to fetch hellaswag_val.jsonl (default rowanz's GitHub)")
    p.add_argument("--jsonl", type=Path, help="tokenize this local jsonl instead of downloading")
    p.add_argument("--force", action="store_true", help="download and tokenize again even if the files exist")
    p.add_argument("--eval", action="store_true", help="score --checkpoint on the tokenized file")
    p.add_argument("--checkpoint", type=Path, help="training checkpoint (ckpt_*.pt) to score with --eval")
    p.add_argument("--limit", type=int, help="score only the first N examples")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default cuda when present, else cpu")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="autocast dtype (default bf16 on cuda, fp32 on cpu)")
    p.add_argument("--examples-per-batch", type=int, default=4, help="examples (4 rows each) per forward pass")
    return p


def run_eval(args) -> dict:
    from tritonrun.gpt2.checkpoint import CheckpointError, load_model

    if args.checkpoint is None:
        raise HellaSwagError("--eval needs --checkpoint PATH (a ckpt_*.pt from a training run)")
    if args.limit is not None and args.limit < 1:
        raise HellaSwagError(f"--limit must be >= 1, got {args.limit}")
    if args.examples_per_batch < 1:
        raise HellaSwagError(f"--examples-per-batch must be >= 1, got {args.examples_per_batch}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise HellaSwagError("--device cuda but no CUDA GPU is visible: use --device cpu")
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    examples = load_examples(args.path, args.limit)
    try:
        model = load_model(args.checkpoint, device)
    except CheckpointError as e:
        raise HellaSwagError(str(e)) from None
    t0 = time.perf_counter()
    try:
        result = evaluate(model, examples, device, torch.bfloat16 if dtype == "bf16" else None,
                          examples_per_batch=args.examples_per_batch, progress=sys.stderr.isatty())
    except torch.OutOfMemoryError:
        raise HellaSwagError(f"CUDA out of memory at --examples-per-batch {args.examples_per_batch}: "
                             f"lower it (1 runs one example's 4 rows at a time)") from None
    seconds = time.perf_counter() - t0
    print(f"hellaswag: acc {result['acc']:.4f} acc_norm {result['acc_norm']:.4f} n {result['n']} "
          f"({args.checkpoint}, {device}, {dtype}, {seconds:.1f} s)")
    record = {**result, "checkpoint": str(args.checkpoint), "data": str(args.path), "device": device,
              "dtype": dtype, "seconds": round(seconds, 3)}
    print(json.dumps(record))
    return record


@reports_write_failures  # a tokenized file the disk refuses: one line, as every CLI's
def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.eval:
            run_eval(args)
        else:
            prepare(args.path, args.url, args.jsonl, args.force)
        return 0
    except HellaSwagError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial file was left under a final name", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
