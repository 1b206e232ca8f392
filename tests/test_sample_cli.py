"""sample.py: deterministic for a fixed seed, greedy == top-k 1, every model source (a speedrun checkpoint too),
one-line user errors."""
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
    m = GPT(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=64)).eval()
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
    # 30 new tokens after a 5-token prompt + EOT: the context is cropped to block_size 16 along the way
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


def test_generate_matches_full_forward_argmax(model):
    """Greedy generation equals argmax of model(idx) at the last position, context cropped to block_size."""
    idx = torch.randint(0, 50257, (2, 5))
    rows = sample_cli.generate(model, idx, 20, temperature=0, stop_token=None)
    ref = idx
    for _ in range(20):
        with torch.no_grad():
            nxt = model(ref[:, -16:])[:, -1].argmax(-1)
        ref = torch.cat([ref, nxt[:, None]], 1)
    assert rows == ref[:, 5:].tolist()


class CountingModel:
    """Stands in for GPT in generate(): the next token is always the last token + 1 (greedy)."""
    config = SimpleNamespace(block_size=4)

    def hidden(self, idx):  # (B, T) -> (B, T, 1)
        return idx.float()[..., None]

    def logits(self, y):  # (B, 1) -> (B, 10): one-hot at last + 1
        return torch.nn.functional.one_hot((y[:, 0].long() + 1) % 10, 10).float()


def test_each_sample_stops_at_its_first_end_of_text():
    rows = sample_cli.generate(CountingModel(), torch.tensor([[0, 1], [0, 5], [0, 8]]), 10, temperature=0,
                               stop_token=9)
    assert rows == [[2, 3, 4, 5, 6, 7, 8, 9], [6, 7, 8, 9], [9]]
    rows = sample_cli.generate(CountingModel(), torch.tensor([[1], [5]]), 3, temperature=0, stop_token=9)
    assert rows == [[2, 3, 4], [6, 7, 8]]  # max_new_tokens reached first


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
    the same text for a seed, another for another seed, through --checkpoint and --init-from ckpt:, context
    cropped to block_size 16 along the way."""
    src = ("--checkpoint", speedrun_dir)
    a, b, c = (sample(capsys, src, "--seed", s, "--max-new-tokens", 20) for s in (1, 2, 1))
    assert a == c and a != b and a.startswith(PROMPT) and len(a) > len(PROMPT) + 20
    assert sample(capsys, ("--init-from", f"ckpt:{speedrun_dir}"), "--seed", 1, "--max-new-tokens", 20) == a
    greedy = sample(capsys, src, "--temperature", 0, "--max-new-tokens", 20)
    assert greedy == sample(capsys, src, "--top-k", 1, "--max-new-tokens", 20, "--seed", 9)
    assert len(set(greedy.split())) > 5  # not one token repeated


def test_speedrun_generate_matches_full_forward_argmax():
    model = tiny_speedrun(block_size=16)
    idx = torch.randint(0, 50257, (2, 5))
    rows = sample_cli.generate(model, idx, 20, temperature=0, stop_token=None)
    ref = idx
    for _ in range(20):
        with torch.no_grad():
            nxt = model(ref[:, -16:])[:, -1].argmax(-1)
        ref = torch.cat([ref, nxt[:, None]], 1)
    assert rows == ref[:, 5:].tolist()
