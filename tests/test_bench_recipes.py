"""bench/recipes.py: the gpt2-vs-speedrun A/B. A smoke run (a few steps per training, one sweep) writes a marked
record with both recipes' val curves at equal tokens; bad flags give one error line; an interrupt keeps the
finished runs."""
import json
import subprocess
import sys

import pytest

from tests.helpers import load_script, one_thread_env
from tests.test_train_cli import REPO


def bench(*args, timeout=300):
    return subprocess.run([sys.executable, "bench/recipes.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=one_thread_env())


def test_smoke_record_has_both_curves_at_equal_tokens(tmp_path):
    # two speedrun lrs: the sweep path runs too (2 steps each), then 4-step A/B runs of both recipes
    proc = bench("--smoke", "--lrs-speedrun", "0.5,1", "--out-dir", tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [path] = tmp_path.glob("recipes-smoke-cpu-*.json")
    rec = json.loads(path.read_text())
    assert rec["kind"] == "recipes" and rec["smoke"] is True and rec["complete"] is True and rec["commit"]
    c = rec["config"]
    assert c["model"] == "tiny" and c["data"] == "sample" and c["steps"] == 4 and c["sweep_steps"] == 2
    assert [s["lr"] for s in rec["sweep"]["speedrun"]] == [0.5, 1.0] and rec["sweep"]["gpt2"] == []
    best = min(rec["sweep"]["speedrun"], key=lambda s: s["final_val_loss"])["lr"]
    ab = rec["ab"]
    assert set(ab) == {"gpt2", "speedrun"} and ab["speedrun"]["lr"] == best and ab["gpt2"]["lr"] == 2e-3
    assert ab["gpt2"]["tokens"] == ab["speedrun"]["tokens"] == 4 * c["total_batch_tokens"]
    for recipe, run in ab.items():
        assert run["config"]["recipe"] == {"gpt2": "gpt2", "speedrun": "speedrun-dense"}[recipe]
        assert run["config"]["model"] == "tiny"
        assert [v["step"] for v in run["val"]] == [2, 4]
        assert run["final_val_loss"] == run["val"][-1]["loss"] and len(run["train_losses"]) == 4
    assert ab["gpt2"]["parameters"] != ab["speedrun"]["parameters"]  # two different models of the same size class
    r = rec["result"]
    assert r["equal_tokens"] is True
    assert r["speedrun_minus_gpt2"] == pytest.approx(ab["speedrun"]["final_val_loss"] - ab["gpt2"]["final_val_loss"])
    assert r["winner"] == ("speedrun" if r["speedrun_minus_gpt2"] < 0 else "gpt2")
    assert "| speedrun |" in proc.stdout and "winner:" in proc.stdout


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "--steps 0"),
    (["--lrs-gpt2", "abc"], "comma-separated"),
    (["--lrs-speedrun", "-1"], "lrs > 0"),
    (["--seq-len", "100"], "not a multiple of --seq-len"),
    (["--smoke", "--out-dir", "bench/results"], "smoke runs never write into bench/results"),
    (["--data", "/nonexistent/shards"], "no such directory"),
    (["--smoke", "--model", "huge"], "--model"),  # the trainer's refusal, passed on as one line
])
def test_bad_flags_one_error_line_exit_2(flags, words):
    proc = bench(*flags, timeout=60)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_interrupt_keeps_finished_runs(tmp_path, monkeypatch, capsys):
    mod = load_script("bench/recipes.py", "bench_recipes_under_test")
    calls = []

    def fake_training(argv):  # gpt2's A/B run finishes, then the user presses Ctrl-C during speedrun's
        calls.append(argv)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return {"steps_done": 4, "tokens_seen": 512, "final_val_loss": 9.5, "train_losses": [10.0] * 4,
                "val": [{"step": 4, "tokens": 512, "loss": 9.5}], "train_time_s": 1.0, "parameters": 1,
                "flops_per_token": 1, "config": {"recipe": "gpt2"}}

    monkeypatch.setattr(mod, "run_training", fake_training)
    assert mod.main(["--smoke", "--out-dir", str(tmp_path)]) == 130
    [path] = tmp_path.glob("recipes-smoke-cpu-*.json")
    rec = json.loads(path.read_text())
    assert rec["complete"] is False and list(rec["ab"]) == ["gpt2"] and rec["result"] is None
    assert rec["ab"]["gpt2"]["final_val_loss"] == 9.5
    assert "interrupted: A/B runs finished: gpt2" in capsys.readouterr().err
    assert "--recipe" in calls[1] and calls[1][calls[1].index("--recipe") + 1] == "speedrun-dense"
