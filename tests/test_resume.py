"""Long runs: bitwise resume after SIGKILL, SIGTERM checkpoints, atomic saves, bad-step handling (CPU)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tritonrun import train as train_speedrun
from tritonrun.gpt2 import GPT
from tritonrun.gpt2.checkpoint import list_checkpoints, load_checkpoint, load_model
from tests.helpers import one_thread_env
from tests.test_train_cli import REPO, SMALL, assert_user_error, run_cli

RUN = [*SMALL, "--max-steps", 8, "--val-every", 4, "--checkpoint-every", 2, "--keep-checkpoints", 0]


def start_cli(*args):
    return subprocess.Popen([sys.executable, "train_speedrun.py", *map(str, args)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=one_thread_env())


def wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    proc = run_cli(*RUN, "--out-dir", out)
    assert proc.returncode == 0, proc.stderr
    return result(out)


def same_run(a: dict, b: dict) -> None:
    assert a["train_losses"] == b["train_losses"]  # bitwise: floats from the same bits print the same
    assert [s["grad_norm"] for s in a["steps"]] == [s["grad_norm"] for s in b["steps"]]
    assert [v["loss"] for v in a["val"]] == [v["loss"] for v in b["val"]]


def test_sigkill_then_resume_is_bitwise_exact(straight, tmp_path):
    proc = start_cli(*RUN, "--out-dir", tmp_path)
    wait_for(lambda: (tmp_path / "ckpt_00000004.pt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = len(list_checkpoints(tmp_path))
    assert killed_at in (2, 3)

    # conflicting run-defining flags are refused, naming the field; nothing is touched
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(run_cli("--resume", "--out-dir", tmp_path, "--lr", "0.5"), "--lr 0.5 conflicts", "0.002")
    assert_user_error(run_cli("--resume", "--out-dir", tmp_path, "--max-steps", "9"), "--max-steps")
    assert sorted(p.name for p in tmp_path.iterdir()) == before

    proc = run_cli("--resume", "--out-dir", tmp_path)  # everything else comes from the checkpoint
    assert proc.returncode == 0, proc.stderr
    resumed = result(tmp_path)
    same_run(resumed, straight)
    assert len(resumed["train_losses"]) == 8 and resumed["status"] == "max_steps"
    assert resumed["resumed_from"][0]["step"] == 2 * killed_at
    log = (tmp_path / "train.log").read_text()
    assert f"resumed from {tmp_path / f'ckpt_{2 * killed_at:08d}.pt'}" in log


def test_sigterm_checkpoints_at_step_boundary_then_resumes(straight, tmp_path):
    proc = start_cli(*RUN, "--checkpoint-every", 0, "--out-dir", tmp_path)
    log = tmp_path / "train.log"
    wait_for(lambda: log.exists() and "step     2/" in log.read_text(), proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    ckpts = list_checkpoints(tmp_path)
    assert len(ckpts) == 1
    rec = result(tmp_path)
    assert rec["status"] == "interrupted"
    step = load_checkpoint(ckpts[0])["step"]
    assert step == rec["steps_done"] >= 2
    assert "continue with --resume" in log.read_text()
    # no leaderboard row for an unfinished run (it read as a result with val "n/a"): how to continue instead
    assert rec["leaderboard_row"] is None and not (tmp_path / "leaderboard.md").exists()
    last = proc.stdout.read().strip().splitlines()[-1]
    assert last.startswith(f"interrupted at step {step} of 8: no leaderboard row") and \
        f"continue with --resume --out-dir {tmp_path}" in last
    proc = run_cli("--resume", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr
    same_run(result(tmp_path), straight)


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """A writer SIGKILLed in the middle of torch.save: the previous checkpoint still loads, the partial
    file is never taken for a checkpoint, and the next save clears it."""
    script = f"""
import sys, time
sys.path.insert(0, {str(REPO)!r})
from tritonrun.gpt2 import GPT, MODEL_SIZES
from tritonrun.gpt2.checkpoint import save_checkpoint
model = GPT(MODEL_SIZES["tiny"])
state = {{"model_config": model.config.to_dict(), "model": model.state_dict()}}
save_checkpoint({str(tmp_path)!r}, 1, state)
import os
def stalled_fsync(fd):  # the bytes are out, the rename has not happened: the kill lands in between
    print("saving", flush=True); time.sleep(60)
os.fsync = stalled_fsync
save_checkpoint({str(tmp_path)!r}, 2, state)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "saving"
    temps = list(tmp_path.glob(".ckpt_00000002.pt.*.tmp"))
    assert len(temps) == 1 and temps[0].stat().st_size > 0
    proc.kill()
    proc.wait()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000001.pt"]
    model = load_model(tmp_path / "ckpt_00000001.pt")
    assert isinstance(model, GPT)
    from tritonrun.gpt2.checkpoint import save_checkpoint

    save_checkpoint(tmp_path, 3, {"model_config": model.config.to_dict(), "model": model.state_dict()}, keep=1)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000003.pt"]


def test_resume_without_checkpoint_is_a_user_error(tmp_path):
    assert_user_error(run_cli("--resume", "--out-dir", tmp_path), "no complete checkpoint", "drop --resume")
    assert_user_error(run_cli("--resume"), "--resume needs the run's --out-dir")


def _nan_forward(monkeypatch, bad_calls):
    """Make GPT.forward return NaN on the given (0-based) call numbers: a stand-in for a diverging step."""
    original = GPT.forward
    calls = {"n": 0}

    def forward(self, idx, targets=None):
        out = original(self, idx, targets)
        n, calls["n"] = calls["n"], calls["n"] + 1
        return out * float("nan") if targets is not None and n in bad_calls else out

    monkeypatch.setattr(GPT, "forward", forward)


def test_bad_steps_are_skipped(monkeypatch, tmp_path):
    # 2 micro-batches per step: calls 2-5 are steps 2 and 3
    _nan_forward(monkeypatch, bad_calls={2, 3, 4, 5})
    args = [*map(str, SMALL), "--max-steps", "6", "--val-every", "100", "--timing-warmup-steps", "0",
            "--out-dir", str(tmp_path)]
    assert train_speedrun.main(args) == 0
    rec = result(tmp_path)
    assert [s["skipped"] for s in rec["steps"]] == [False, True, True, False, False, False]
    assert rec["skipped_steps"] == 2 and rec["status"] == "max_steps"
    assert all(v == v for v in rec["train_losses"][3:])  # finite again: the weights were not touched
    assert "warning: step 2 skipped" in (tmp_path / "train.log").read_text()


def test_repeated_bad_steps_stop_and_keep_last_good_checkpoint(monkeypatch, tmp_path, capsys):
    _nan_forward(monkeypatch, bad_calls=set(range(8, 1000)))  # step 5 onward diverges
    args = [*map(str, SMALL), "--max-steps", "20", "--val-every", "100", "--timing-warmup-steps", "0",
            "--checkpoint-every", "2", "--max-bad-steps", "2", "--out-dir", str(tmp_path)]
    assert train_speedrun.main(args) == 3
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "3 non-finite steps in a row" in err[0] and "lower --lr" in err[0]
    # step 6 is a checkpoint boundary too, but its weights are step 4's: updates were skipped
    good = load_checkpoint(tmp_path / "ckpt_00000004.pt")
    assert str(list_checkpoints(tmp_path)[-1]) in err[0]
    last = load_checkpoint(list_checkpoints(tmp_path)[-1])
    for k, v in good["model"].items():
        assert torch.equal(v, last["model"][k]), k
    assert result(tmp_path)["status"] == "diverged"
