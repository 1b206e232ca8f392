"""tritonrun/data/hellaswag.py: scoring (hand-made examples with known losses, the tiny GPT against a per-row fp64
reference), the tokenized file format, and the download / tokenize / eval CLI against a local HTTP server."""

from __future__ import annotations

import copy
import http.server
import json
import math
import socket
import struct
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tritonrun.data.hellaswag import (
    HEADER_BYTES, MAGIC, Example, HellaSwagError, download, ending_losses, evaluate, load_examples, main,
    read_jsonl, write_examples,
)
from tritonrun.data.tokenizer import EOT, gpt2_tokenizer
from tritonrun.gpt2 import GPT, MODEL_SIZES
from tritonrun.gpt2.checkpoint import save_checkpoint
from tests.helpers import save_speedrun_checkpoint, tiny_speedrun

REPO = Path(__file__).resolve().parents[1]
LN = math.log


# ------------------------------------------------------------------------------- a model with known losses
SINK = 31  # takes each row's leftover probability; no ending uses it


class BigramModel(nn.Module):
    """logits[b, t] = log P[idx[b, t]], so the loss of token y after token x is exactly -log P[x, y], whatever
    came before: every ending's token losses can be written down by hand."""

    def __init__(self, probs: dict[tuple[int, int], float], block_size: int = 64, vocab: int = 32):
        super().__init__()
        self.config = SimpleNamespace(block_size=block_size)
        P = torch.zeros(vocab, vocab, dtype=torch.float64)
        for (a, b), p in probs.items():
            P[a, b] = p
        P[:, SINK] += 1 - P.sum(1)
        self.register_buffer("log_p", P.log())  # -inf where P is 0: never a target of a scored token
        self.calls: list[tuple] = []  # (shape, training, grad enabled) of every forward

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.config.block_size, "evaluate fed more than block_size tokens"
        self.calls.append((tuple(idx.shape), self.training, torch.is_grad_enabled()))
        return self.log_p[idx].float()


PROBS = {
    # A: ctx [.., 1], one-token endings 2..5; ending 2 wins both ways
    (1, 2): 0.1, (1, 3): 0.1, (1, 4): 0.5, (1, 5): 0.1,
    # B: ctx [14, 6]; ending 0 = [7, 8, 9, 10] has 4 tokens at ln 2 each (mean ln2 < ln5, sum 4 ln2 > ln5),
    # ending 1 = [11] one token at ln 5: sum picks ending 1, mean picks ending 0
    (6, 7): 0.5, (7, 8): 0.5, (8, 9): 0.5, (9, 10): 0.5, (6, 11): 0.2, (6, 12): 0.05, (6, 13): 0.05,
    (14, 6): 0.001,  # a context transition: costly, and must never be counted
    # tie: four equal endings
    (15, 16): 0.1, (15, 17): 0.1, (15, 18): 0.1, (15, 19): 0.1,
}
A_ENDINGS = [[2], [3], [4], [5]]
B_ENDINGS = [[7, 8, 9, 10], [11], [12], [13]]
A_SUM = [LN(10), LN(10), LN(2), LN(10)]
B_SUM = [4 * LN(2), LN(5), LN(20), LN(20)]
B_MEAN = [LN(2), LN(5), LN(20), LN(20)]


def hand_made_set() -> list[Example]:
    return [
        Example.of([1], A_ENDINGS, 2),  # both right
        Example.of([20, 21, 1], A_ENDINGS, 0),  # both wrong
        Example.of([14, 6], B_ENDINGS, 0),  # acc_norm right, acc wrong
        Example.of([6], B_ENDINGS, 0),  # acc_norm right, acc wrong
        Example.of([14, 6], B_ENDINGS, 1),  # acc right, acc_norm wrong
    ]


def test_losses_are_the_ending_tokens_only():
    sums, means = ending_losses(BigramModel(PROBS), hand_made_set())
    expected_sum = torch.tensor([A_SUM, A_SUM, B_SUM, B_SUM, B_SUM])
    expected_mean = torch.tensor([A_SUM, A_SUM, B_MEAN, B_MEAN, B_MEAN])
    # fp32 cross-entropy of fp32-rounded log P, summed over <= 4 tokens: a few fp32 roundings (measured exact)
    torch.testing.assert_close(sums, expected_sum, rtol=1e-6, atol=0)
    torch.testing.assert_close(means, expected_mean, rtol=1e-6, atol=0)


@pytest.mark.parametrize("examples_per_batch", [1, 2, 5, 100])
def test_acc_picks_lowest_sum_and_acc_norm_lowest_mean(examples_per_batch):
    result = evaluate(BigramModel(PROBS), hand_made_set(), "cpu", examples_per_batch=examples_per_batch)
    # acc right on examples 0 and 4; acc_norm right on 0, 2 and 3
    assert result == {"acc": pytest.approx(2 / 5), "acc_norm": pytest.approx(3 / 5), "n": 5}


def test_limit_and_ties():
    model = BigramModel(PROBS)
    assert evaluate(model, hand_made_set(), limit=1) == {"acc": 1.0, "acc_norm": 1.0, "n": 1}
    # four equal losses: the lowest index wins, for both
    tie = [Example.of([15], [[16], [17], [18], [19]], label) for label in range(4)]
    assert evaluate(model, tie) == {"acc": 0.25, "acc_norm": 0.25, "n": 4}


def test_left_truncation_keeps_the_ending():
    model = BigramModel(PROBS, block_size=3)
    long_ctx = Example.of([20, 21, 22, 23, 24, 25, 26, 1], A_ENDINGS, 2)  # 9 tokens -> 4 kept: [.., 25, 26, 1, e]
    long_end = Example.of([6], B_ENDINGS, 0)  # [6, 7, 8, 9, 10] -> [7, 8, 9, 10]: 8, 9, 10 scored
    sums, means = ending_losses(model, [long_ctx, long_end], examples_per_batch=2)
    # as in test_losses_are_the_ending_tokens_only: a few fp32 roundings (measured exact)
    torch.testing.assert_close(sums, torch.tensor([A_SUM, [3 * LN(2)] + B_SUM[1:]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(means, torch.tensor([A_SUM, B_MEAN]), rtol=1e-6, atol=0)
    assert all(shape[1] <= 3 for shape, _, _ in model.calls)


def test_empty_context_is_eot():
    model = BigramModel({(0, 2): 0.25})
    bigram = model.forward
    model.forward = lambda idx: bigram(torch.where(idx == EOT, 0, idx))  # EOT reads as token 0
    sums, _ = ending_losses(model, [Example.of([], [[2], [3], [4], [5]], 0)])
    assert sums[0, 0].item() == pytest.approx(LN(4), rel=1e-6)  # one fp32 token loss: measured 2.8e-9


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_no_grad_and_mode_restored(training):
    model = BigramModel(PROBS).train(training)
    evaluate(model, hand_made_set())
    assert model.training is training
    assert model.calls and all(not was_training and not grad for _, was_training, grad in model.calls)


def test_bad_examples_rejected():
    with pytest.raises(ValueError, match="4 endings"):
        Example.of([1], [[2], [3], [4]], 0)
    with pytest.raises(ValueError, match="label"):
        Example.of([1], A_ENDINGS, 4)
    with pytest.raises(ValueError, match="at least one token"):
        Example.of([1], [[2], [], [4], [5]], 0)
    with pytest.raises(ValueError, match="no HellaSwag examples"):
        evaluate(BigramModel(PROBS), [])


# ------------------------------------------------------------------------------------- the real tiny GPT
def _reference_losses(model: GPT, examples: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """One fp64 forward per row, plain F.cross_entropy on the ending's own positions."""
    ref = copy.deepcopy(model).double().eval()
    keep = model.config.block_size + 1
    sums, means = [], []
    with torch.no_grad():
        for ex in examples:
            for end in ex.endings:
                seq = torch.tensor(np.concatenate([ex.ctx, end]))[-keep:]
                n = min(len(end), len(seq) - 1)
                logits = ref(seq[None, :-1])[0]  # position t predicts token t + 1
                loss = F.cross_entropy(logits[-n:], seq[-n:], reduction="none")
                sums.append(loss.sum())
                means.append(loss.mean())
    return torch.stack(sums).view(-1, 4), torch.stack(means).view(-1, 4)


def _random_examples(rng, shapes: list[tuple[int, list[int]]]) -> list[Example]:
    return [Example.of(rng.integers(0, 50257, n_ctx), [rng.integers(0, 50257, n) for n in ends], i % 4)
            for i, (n_ctx, ends) in enumerate(shapes)]


@pytest.fixture(scope="module")
def tiny_gpt():
    torch.manual_seed(0)
    return GPT(MODEL_SIZES["tiny"])


def test_tiny_gpt_matches_per_row_cross_entropy(tiny_gpt):
    rng = np.random.default_rng(0)
    examples = _random_examples(rng, [(1, [1, 2, 3, 4]), (7, [5, 1, 9, 2]), (40, [3, 17, 8, 1]), (13, [6, 6, 6, 6])])
    ref_sum, ref_mean = _reference_losses(tiny_gpt, examples)
    # fp32 model vs fp64, token losses ~11 summed over <= 17 tokens: measured <= 9e-8 relative (rtol 1e-5 ~ 80 ulps)
    for per_batch in (1, 3):
        sums, means = ending_losses(tiny_gpt.eval(), examples, examples_per_batch=per_batch)
        torch.testing.assert_close(sums.double(), ref_sum, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(means.double(), ref_mean, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([ex.label for ex in examples])
    result = evaluate(tiny_gpt, examples)
    assert result["n"] == 4
    assert result["acc"] == (ref_sum.argmin(1) == labels).double().mean().item()
    assert result["acc_norm"] == (ref_mean.argmin(1) == labels).double().mean().item()


def test_tiny_gpt_truncation_past_block_size(tiny_gpt):
    block = tiny_gpt.config.block_size  # 256
    rng = np.random.default_rng(1)
    # a context longer than the block, and an ending longer than the block, in one 4-row forward
    examples = _random_examples(rng, [(block + 40, [3, block + 9, 12, 1])])
    ref_sum, ref_mean = _reference_losses(tiny_gpt, examples)
    sums, means = ending_losses(tiny_gpt.eval(), examples)
    # a 265-token sum ~2780: the rtol term (0.028) is the bound; measured 2.9e-4 (1.1e-7 relative)
    torch.testing.assert_close(sums.double(), ref_sum, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(means.double(), ref_mean, rtol=1e-5, atol=1e-5)


def test_tiny_gpt_autocast_forms(tiny_gpt):
    rng = np.random.default_rng(2)
    examples = _random_examples(rng, [(5, [2, 3, 4, 5]), (9, [1, 1, 2, 2])])
    fp32 = ending_losses(tiny_gpt.eval(), examples)[1]
    by_dtype = ending_losses(tiny_gpt, examples, autocast=torch.bfloat16)[1]
    by_context = ending_losses(tiny_gpt, examples, autocast=torch.autocast("cpu", dtype=torch.bfloat16))[1]
    torch.testing.assert_close(by_dtype, by_context)
    assert (by_dtype - fp32).abs().max() < 0.1  # bf16 logits of ~10.8-nat losses: close, not equal


# ------------------------------------------------------------------------------------------- file format
def test_file_round_trip_and_layout(tmp_path):
    examples = hand_made_set()
    path = tmp_path / "hs.bin"
    write_examples(path, examples)
    raw = path.read_bytes()
    n_tok = sum(len(ex.ctx) + sum(len(e) for e in ex.endings) for ex in examples)
    assert len(raw) == HEADER_BYTES + 24 * len(examples) + 2 * n_tok
    assert struct.unpack("<4i", raw[:16]) == (MAGIC, 1, len(examples), n_tok)
    assert struct.unpack("<6i", raw[HEADER_BYTES:HEADER_BYTES + 24]) == (2, 1, 1, 1, 1, 1)
    loaded = load_examples(path)
    assert [(ex.ctx.tolist(), [e.tolist() for e in ex.endings], ex.label) for ex in loaded] == \
        [(ex.ctx.tolist(), [e.tolist() for e in ex.endings], ex.label) for ex in examples]
    assert len(load_examples(path, limit=2)) == 2
    assert evaluate(BigramModel(PROBS), path) == evaluate(BigramModel(PROBS), examples)
    assert [p.name for p in tmp_path.iterdir()] == ["hs.bin"]  # no temp file left


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:-1], "truncated or corrupt"),
    (lambda raw: raw + b"\0\0", "truncated or corrupt"),
    (lambda raw: raw[:100], "shorter than"),
    (lambda raw: b"\1\2\3\4" + raw[4:], "not a tokenized HellaSwag file"),
    (lambda raw: raw[:4] + struct.pack("<i", 7) + raw[8:], "version 7"),
])
def test_damaged_file_rejected(tmp_path, damage, message):
    path = tmp_path / "hs.bin"
    write_examples(path, hand_made_set())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(HellaSwagError, match=message):
        load_examples(path)


def test_missing_file_says_how_to_make_it(tmp_path):
    with pytest.raises(HellaSwagError, match=r"run `python -m tritonrun.data.hellaswag`"):
        load_examples(tmp_path / "nope.bin")


# ---------------------------------------------------------------------------------- jsonl and download
ROWS = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow covering "
     "the window of a car, and a woman wearing winter clothes smiles.", "ctx_b": "then",
     "ctx": "Then, the man writes over the snow covering the window of a car, and a woman wearing winter clothes "
     "smiles. then", "endings": [", the man adds wax to the windshield and cuts it.",
                                 ", a person board a ski lift, while two men supporting the head of the person "
                                 "wearing winter clothes snow as the we girls sled.",
                                 ", the man puts on a christmas coat, knitted with netting.",
                                 ", the man continues removing the snow on his car."],
     "source_id": "activitynet~v_-1IBHYS3L-Y", "split": "val", "split_type": "zeroshot", "label": 3},
    {"ctx": "Ein Café — “quoted” text, tabs\tand émojis 🙂. She", "endings": ["a", "", "  two spaces", "x" * 40],
     "label": 1},
    {"ctx": "A man is sitting on a roof. He", "endings": ["is using wrap to wrap a pair of skis.",
     "is ripping level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "label": 3},
]
JSONL = "".join(json.dumps(r) + "\n" for r in ROWS).encode()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves server.files; paths starting /short promise 1000 bytes more than they send, then hang up."""

    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + (1000 if self.path.startswith("/short") else 0)))
        self.end_headers()
        self.wfile.write(body)  # HTTP/1.0: the connection closes when the handler returns

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.files = {"/hellaswag_val.jsonl": JSONL, "/short.jsonl": JSONL,
                 "/broken.jsonl": JSONL + b'{"ctx": "x", "endings": ["a", "b"], "label": 0}\n'}
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()
    srv.server_close()


def _check_tokens(path: Path, rows: list[dict]) -> None:
    enc = gpt2_tokenizer()
    loaded = load_examples(path)
    assert len(loaded) == len(rows)
    for ex, row in zip(loaded, rows):
        assert ex.ctx.tolist() == enc.encode_ordinary(row["ctx"])
        assert [e.tolist() for e in ex.endings] == [enc.encode_ordinary(" " + e) for e in row["endings"]]
        assert ex.label == row["label"]


def test_download_lands_tokenized(server, tmp_path, capsys):
    out = tmp_path / "hs" / "val.bin"
    assert main(["--url", f"{server.url}/hellaswag_val.jsonl", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["val.bin", "val.jsonl"]
    assert (out.parent / "val.jsonl").read_bytes() == JSONL
    _check_tokens(out, ROWS)
    assert "3 examples" in capsys.readouterr().out
    # a second run finds the file complete and leaves it alone
    before = out.stat().st_mtime_ns
    assert main(["--url", f"{server.url}/hellaswag_val.jsonl", "--out", str(out)]) == 0
    assert out.stat().st_mtime_ns == before and "already there" in capsys.readouterr().out


def test_download_checks_the_count(server, tmp_path):
    dest = tmp_path / "val.jsonl"
    with pytest.raises(HellaSwagError, match="3 examples, expected 10042"):
        download(f"{server.url}/hellaswag_val.jsonl", dest, expected_count=10042)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("path, message", [
    ("/broken.jsonl", "line 4: field 'endings'"),
    ("/missing.jsonl", "HTTP 404"),
    ("/short.jsonl", "cut short"),
])
def test_bad_download_leaves_nothing(server, tmp_path, capsys, path, message):
    out = tmp_path / "val.bin"
    assert main(["--url", server.url + path, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_not_a_url(tmp_path, capsys):
    assert main(["--url", "hellaswag_val.jsonl", "--out", str(tmp_path / "val.bin")]) == 2
    assert "pass an http(s) URL" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tritonrun.data.hellaswag", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def _assert_one_error_line(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_cut_short_download(server, tmp_path):
    proc = _cli("--url", f"{server.url}/short.jsonl", "--out", tmp_path / "val.bin")
    _assert_one_error_line(proc, "cut short", f"{len(JSONL):,} of {len(JSONL) + 1000:,} bytes")
    assert list(tmp_path.iterdir()) == []


def test_cli_dead_port(tmp_path):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens on it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = _cli("--url", f"http://127.0.0.1:{port}/hellaswag_val.jsonl", "--out", tmp_path / "val.bin")
    _assert_one_error_line(proc, "cannot download", "--url", "--jsonl PATH")
    assert list(tmp_path.iterdir()) == []


def test_local_jsonl(tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_bytes(JSONL + b"\n")  # a trailing blank line is fine
    out = tmp_path / "out.bin"
    assert main(["--jsonl", str(src), "--out", str(out)]) == 0
    _check_tokens(out, ROWS)


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2 is not JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"endings": ["a", "b", "c", "d"], "label": 0}', "'ctx'"),
    ('{"ctx": "c", "endings": ["a", "b", "c", 4], "label": 0}', "'endings'"),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": 4}', "'label'"),
    ('{"ctx": "c", "endings": ["a", "b", "c", "d"], "label": "1"}', "'label'"),
])
def test_bad_jsonl_lines(tmp_path, line, message):
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(HellaSwagError, match=message):
        read_jsonl(src)
    src.write_text("")
    with pytest.raises(HellaSwagError, match="no examples"):
        read_jsonl(src)


# ------------------------------------------------------------------------------------------------ eval CLI
def test_cli_eval_checkpoint(tmp_path, tiny_gpt):
    src = tmp_path / "mine.jsonl"
    src.write_bytes(JSONL)
    data = tmp_path / "hs.bin"
    assert main(["--jsonl", str(src), "--out", str(data)]) == 0
    ckpt = save_checkpoint(tmp_path, 7, {"model_config": tiny_gpt.config.to_dict(), "model": tiny_gpt.state_dict()})

    proc = _cli("--eval", "--checkpoint", ckpt, "--data", data, "--limit", 2, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    text_line, json_line = proc.stdout.strip().splitlines()[-2:]
    record = json.loads(json_line)
    expected = evaluate(tiny_gpt, data, "cpu", limit=2)
    assert {k: record[k] for k in ("acc", "acc_norm", "n")} == expected
    assert text_line.startswith(f"hellaswag: acc {expected['acc']:.4f} acc_norm {expected['acc_norm']:.4f} n 2")


def test_cli_eval_user_errors(tmp_path, capsys):
    assert main(["--eval", "--data", str(tmp_path / "none.bin")]) == 2
    assert "--checkpoint" in capsys.readouterr().err
    assert main(["--eval", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path / "none.bin")]) == 2
    assert "python -m tritonrun.data.hellaswag" in capsys.readouterr().err
    write_examples(tmp_path / "hs.bin", hand_made_set())
    assert main(["--eval", "--checkpoint", str(tmp_path / "c.pt"), "--data", str(tmp_path / "hs.bin")]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a speedrun checkpoint
def test_tiny_speedrun_matches_per_row_cross_entropy():
    """evaluate / ending_losses on a SpeedrunGPT (model(idx) gives its softcapped logits over the real
    vocabulary): the same per-row fp64 reference as the GPT-2, truncation past block_size included."""
    model = tiny_speedrun(block_size=32)
    rng = np.random.default_rng(3)
    examples = _random_examples(rng, [(1, [1, 2, 3, 4]), (7, [5, 1, 9, 2]), (40, [3, 17, 8, 1]), (2, [6, 6, 6, 6])])
    ref_sum, ref_mean = _reference_losses(model, examples)
    sums, means = ending_losses(model, examples, examples_per_batch=3)
    # fp32 model vs fp64: measured <= 1.2e-7 relative (rtol 1e-5 ~ 80 ulps), as for the GPT-2 above
    torch.testing.assert_close(sums.double(), ref_sum, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(means.double(), ref_mean, rtol=1e-5, atol=1e-5)
    labels = torch.tensor([ex.label for ex in examples])
    result = evaluate(model, examples)
    assert result["acc"] == (ref_sum.argmin(1) == labels).double().mean().item()
    assert result["acc_norm"] == (ref_mean.argmin(1) == labels).double().mean().item()


def test_cli_eval_speedrun_checkpoint(tmp_path):
    src = tmp_path / "mine.jsonl"
    src.write_bytes(JSONL)
    data = tmp_path / "hs.bin"
    assert main(["--jsonl", str(src), "--out", str(data)]) == 0
    model = tiny_speedrun(block_size=64)
    ckpt = save_speedrun_checkpoint(tmp_path, 7, model)
    proc = _cli("--eval", "--checkpoint", ckpt, "--data", data, "--limit", 2, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {k: record[k] for k in ("acc", "acc_norm", "n")} == evaluate(model, data, "cpu", limit=2)
