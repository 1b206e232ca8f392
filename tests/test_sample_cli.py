"""sample.py: deterministic for a fixed seed, greedy == top-k 1, every model source (a speedrun checkpoint too),
one-line user errors; the KV-cached generator equals the uncached forward token for token (GPT-2, the dense and
the windowed speedrun model, documents and window included, and the windowed model sliding past its block_size),
tokens stream as they come, Ctrl-C keeps them, and --max-new-tokens is capped at a non-sliding model's context."""
import dataclasses
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tritonrun import generate as sample_cli  # sample.py's code
from tritonrun.gpt2.checkpoint import save_checkpoint
from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.hf import save_hf
from tritonrun.gpt2.kv_cache import KVCache
from tritonrun.gpt2.llmc import save_llmc
from tritonrun.gpt2.model import GPT
from tests.helpers import ONE_THREAD_ENV, save_speedrun_checkpoint, tiny_speedrun

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_ENV = ONE_THREAD_ENV


pytestmark = pytest.mark.usefixtures("one_torch_thread")
PROMPT = "The quick brown fox"



@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT(GPTConfig(block_size=48, n_layer=2, n_head=4, n_embd=64)).eval()
    with torch.no_grad():  # at plain init a random GPT's greedy text is one token repeated: make it vary
        m.transformer.wpe.weight.mul_(10)
        m.transformer.ln_f.weight.mul_(5)
        for block in m.transformer.h:
            block.attn.c_attn.weight.mul_(10)
    return m


@pytest.fixture(scope="module")
def run_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-run")
    save_checkpoint(out, 3, {"model_config": model.config.to_dict(), "model": model.state_dict()})
    return out


def run_main(capsys, *args):
    """sample.py's main() in this process: (exit code, stdout, stderr)."""
    try:
        code = sample_cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse errors
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def sample(capsys, source, *args):
    code, out, err = run_main(capsys, *source, "--prompt", PROMPT, "--device", "cpu", *args)
    assert code == 0, err
    return out


def test_same_seed_same_text_across_processes(run_dir):
    # 30 new tokens after a 4-token prompt + EOT: within block_size 48
    cmd = [sys.executable, "sample.py", "--checkpoint", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", "30",
           "--num-samples", "2", "--seed", "7", "--device", "cpu"]
    first, second = (subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
                     for _ in range(2))
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.startswith("--- sample 1/2 ---\n" + PROMPT) and "--- sample 2/2 ---" in first.stdout
    assert len(first.stdout) > 2 * len(PROMPT) + 40


def test_seed_changes_text(capsys, run_dir):
    src = ("--checkpoint", run_dir)
    a, b, c = (sample(capsys, src, "--seed", s, "--max-new-tokens", 20) for s in (1, 2, 1))
    assert a == c
    assert a != b
    assert a.startswith(PROMPT)


def test_top_k_1_equals_greedy(capsys, run_dir):
    src = ("--checkpoint", run_dir / "ckpt_00000003.pt")
    greedy = sample(capsys, src, "--temperature", 0, "--max-new-tokens", 20, "--seed", 1)
    assert greedy == sample(capsys, src, "--temperature", 0, "--max-new-tokens", 20, "--seed", 2)  # seed unused
    assert greedy == sample(capsys, src, "--top-k", 1, "--max-new-tokens", 20, "--seed", 3)
    assert greedy == sample(capsys, src, "--top-k", 1, "--temperature", 2.5, "--max-new-tokens", 20, "--seed", 4)
    assert greedy != sample(capsys, src, "--top-k", 0, "--max-new-tokens", 20, "--seed", 5)
    assert len(set(greedy.split())) > 8  # not one token repeated


def _same_as_uncached(model, prompt, n, **kw):
    """stream() (KV cache) and generate_uncached() (the full forward per token) from one seed: the same tokens."""
    a = list(sample_cli.stream(model, prompt, n, generator=torch.Generator().manual_seed(3), stop_token=None, **kw))
    b = sample_cli.generate_uncached(model, prompt, n, generator=torch.Generator().manual_seed(3), stop_token=None,
                                     **kw)
    assert len(a) == n and a == b
    return a


def test_cached_generation_equals_uncached_gpt2(model):
    """fp64 (no argmax tie can flip on summation order): greedy and sampled, up to the context's end."""
    m = GPT(model.config).double().eval()
    m.load_state_dict(model.state_dict())
    prompt = [50256, 464, 2068, 7586]
    _same_as_uncached(m, prompt, 44, temperature=0)
    assert len(set(_same_as_uncached(m, prompt, 44, temperature=1.0, top_k=50))) > 20


@pytest.mark.parametrize("dense", [False, True], ids=["windowed", "dense"])
def test_cached_generation_equals_uncached_speedrun(dense):
    """The windowed model with a final window of 32 tokens and a prompt of two documents (an end-of-text inside):
    the cache's document and window rule is the training forward's (cu_seqlens at each end-of-text, the window),
    and its trimming (every 2 windows) drops only keys no query reaches. The dense 11-10 model: causal."""
    model = tiny_speedrun(block_size=128, dense=dense).double()
    if not dense:
        model.config = dataclasses.replace(model.config, window_start=8, window_end=32, window_block=16)
        assert model.config.final_window == 32
    prompt = [50256, 464, 2068, 7586, 50256, 21831, 18045]
    _same_as_uncached(model, prompt, 100, temperature=0)
    _same_as_uncached(model, prompt, 100, temperature=1.0)


def test_windowed_model_slides_past_its_block_size_with_a_cache_of_one_window():
    """block_size 64, window 32, 150 new tokens: the same tokens as the uncached forward of the same weights with a
    RoPE table long enough (block_size 512), and the cache never holds more than 2 windows."""
    short = tiny_speedrun(block_size=64).double()
    long_ = tiny_speedrun(block_size=512).double()
    for m in (short, long_):
        m.config = dataclasses.replace(m.config, window_start=8, window_end=32, window_block=16)
    long_.load_state_dict(short.state_dict())
    prompt = [50256, 464, 2068]
    assert sample_cli.room_after(short, len(prompt)) is None
    gen = torch.Generator().manual_seed(5)
    cache_sizes = []
    real_end = KVCache.end

    def end(self, T):
        real_end(self, T)
        cache_sizes.append(self.kept)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(KVCache, "end", end)
        slid = list(sample_cli.stream(short, prompt, 150, generator=gen, stop_token=None))
    assert slid == sample_cli.generate_uncached(long_, prompt, 150, generator=torch.Generator().manual_seed(5),
                                                stop_token=None)
    assert max(cache_sizes) <= 2 * 32 and cache_sizes[-1] < 2 * 32


class CountingModel(torch.nn.Module):
    """Stands in for GPT in stream(): the next token is always the last token + 1 (greedy)."""
    config = SimpleNamespace(block_size=64)

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def hidden(self, idx, cache=None):  # (B, T) -> (B, T, 1)
        return idx.float()[..., None]

    def logits(self, y):  # (B, 1) -> (B, 10): one-hot at last + 1
        return torch.nn.functional.one_hot((y[:, 0].long() + 1) % 10, 10).float()


def test_a_sample_stops_at_its_first_end_of_text_or_max_new_tokens():
    def gen(prompt, n):
        return list(sample_cli.stream(CountingModel(), prompt, n, temperature=0, stop_token=9))

    assert gen([0, 1], 10) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert gen([0, 8], 10) == [9]
    assert gen([1], 3) == [2, 3, 4]  # max_new_tokens reached first
    with pytest.raises(ValueError, match="exceed the model's context of 64"):
        gen([1] * 60, 5)


def test_max_new_tokens_is_capped_at_the_context_with_a_note(capsys, run_dir):
    """GPT-2 (block_size 48) cannot slide: 100 new tokens after a 5-token prompt are capped at 43, said on stderr."""
    code, out, err = run_main(capsys, "--checkpoint", run_dir, "--prompt", PROMPT, "--device", "cpu",
                              "--max-new-tokens", 100, "--temperature", 0)
    assert code == 0 and err.strip() == ("note: --max-new-tokens 100 capped at 43: the model's context is 48 tokens, "
                                         "5 of them the prompt")
    assert out.startswith(PROMPT) and len(out) > len(PROMPT) + 43
    code, out, err = run_main(capsys, "--checkpoint", run_dir, "--prompt", "a" * 400, "--device", "cpu")
    assert code == 2 and "shorten --prompt" in err and len(err.strip().splitlines()) == 1


class Recorder:
    """sys.stdout for main(): every write and flush, in order."""

    def __init__(self):
        self.events = []

    def write(self, text):
        self.events.append(("write", text))

    def flush(self):
        self.events.append(("flush", None))

    def text(self):
        return "".join(t for kind, t in self.events if kind == "write")


def test_tokens_stream_as_they_come(monkeypatch, run_dir):
    """Each token is written and flushed as soon as it is sampled (20 tokens: at least 20 flushes before the
    end), and the streamed text is the whole decode of prompt + tokens."""
    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    tokens = []
    real = sample_cli.pick_next

    def pick(*a, **k):
        t = real(*a, **k)
        tokens.append(int(t.item()))
        rec.events.append(("token", None))
        return t

    monkeypatch.setattr(sample_cli, "pick_next", pick)
    assert sample_cli.main(["--checkpoint", str(run_dir), "--prompt", PROMPT, "--device", "cpu",
                            "--max-new-tokens", "20", "--seed", "3"]) == 0
    kinds = [k for k, _ in rec.events]
    # after the i-th token is picked, a flush comes before the (i+1)-th pick
    picks = [i for i, k in enumerate(kinds) if k == "token"]
    assert len(picks) == 20 and all("flush" in kinds[a:b] for a, b in zip(picks, picks[1:]))
    from tritonrun.data.tokenizer import gpt2_tokenizer

    assert rec.text() == gpt2_tokenizer().decode(gpt2_tokenizer().encode(PROMPT) + tokens) + "\n"


def test_ctrl_c_keeps_what_was_printed(monkeypatch, capsys, run_dir):
    """A KeyboardInterrupt at the 6th token: exit 130, the prompt and the 5 tokens before it stay printed, one line
    on stderr says so."""
    real, calls = sample_cli.pick_next, []

    def pick(*a, **k):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sample_cli, "pick_next", pick)
    code, out, err = run_main(capsys, "--checkpoint", run_dir, "--prompt", PROMPT, "--device", "cpu",
                              "--max-new-tokens", 20, "--temperature", 0)
    full = sample(capsys, ("--checkpoint", run_dir), "--max-new-tokens", 5, "--temperature", 0)
    assert code == 130 and out == full
    assert err.strip() == "interrupted: sample 1 stopped after 5 new tokens; what was printed is kept"


def test_other_sources_give_the_same_greedy_text(capsys, model, run_dir, tmp_path):
    args = ("--temperature", 0, "--max-new-tokens", 12)
    ref = sample(capsys, ("--checkpoint", run_dir), *args)
    save_hf(model, tmp_path / "hf")
    save_llmc(model, tmp_path / "m.bin")
    for spec in (f"hf:{tmp_path / 'hf'}", f"llmc:{tmp_path / 'm.bin'}", f"ckpt:{run_dir}"):
        assert sample(capsys, ("--init-from", spec), *args) == ref, spec


def test_zero_new_tokens_prints_prompt(capsys, run_dir):
    assert sample(capsys, ("--checkpoint", run_dir), "--max-new-tokens", 0) == PROMPT + "\n"


def test_user_error_end_to_end(tmp_path):
    r = subprocess.run([sys.executable, "sample.py", "--checkpoint", str(tmp_path / "nope")], cwd=REPO,
                       capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


USER_ERRORS = [
    (("--checkpoint", "{tmp}/nope"), "no such checkpoint"),
    (("--checkpoint", "{tmp}"), "no checkpoints"),
    (("--init-from", "gpt2"), "expected hf:DIR, llmc:FILE.bin or ckpt:RUN_DIR_OR_FILE"),
    (("--init-from", "hf:{tmp}"), "config.json: missing"),
    (("--init-from", "llmc:{tmp}/x.bin"), "no such llm.c model file"),
    (("--checkpoint", "{run}", "--temperature", "-1"), "--temperature must be"),
    (("--checkpoint", "{run}", "--top-k", "-3"), "--top-k must be >= 0"),
    (("--checkpoint", "{run}", "--num-samples", "0"), "--num-samples must be >= 1"),
    (("--checkpoint", "{run}", "--max-new-tokens", "-1"), "--max-new-tokens must be >= 0"),
    (("--checkpoint", "{run}", "--device", "tpu9"), "--device 'tpu9'"),
    (("--checkpoint", "{run}", "--top-k", "many"), "invalid int value"),
    (("--checkpoint", "{run}", "--init-from", "hf:x"), "not allowed with argument"),
    ((), "one of the arguments --checkpoint --init-from is required"),
]
if not torch.cuda.is_available():
    USER_ERRORS.append((("--checkpoint", "{run}", "--device", "cuda"), "no CUDA GPU"))


@pytest.mark.parametrize("args,expected", USER_ERRORS, ids=[" ".join(a) or "no source" for a, _ in USER_ERRORS])
def test_user_errors(capsys, run_dir, tmp_path, args, expected):
    code, out, err = run_main(capsys, *(a.format(tmp=tmp_path, run=run_dir) for a in args))
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


# ------------------------------------------------------------------------------ a speedrun checkpoint


@pytest.fixture(scope="module")
def speedrun_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sample-speedrun")
    save_speedrun_checkpoint(out, 3, tiny_speedrun(block_size=16))
    return out


def test_speedrun_checkpoint_samples_deterministically(capsys, speedrun_dir):
    """A --recipe speedrun checkpoint (SpeedrunGPT: hidden(), logits() over the real vocabulary, softcapped):
    the same text for a seed, another for another seed, through --checkpoint and --init-from ckpt:; the
    windowed model slides on past its block_size 16."""
    src = ("--checkpoint", speedrun_dir)
    a, b, c = (sample(capsys, src, "--seed", s, "--max-new-tokens", 20) for s in (1, 2, 1))
    assert a == c and a != b and a.startswith(PROMPT) and len(a) > len(PROMPT) + 20
    assert sample(capsys, ("--init-from", f"ckpt:{speedrun_dir}"), "--seed", 1, "--max-new-tokens", 20) == a
    greedy = sample(capsys, src, "--temperature", 0, "--max-new-tokens", 20)
    assert greedy == sample(capsys, src, "--top-k", 1, "--max-new-tokens", 20, "--seed", 9)
    assert len(set(greedy.split())) > 5  # not one token repeated
