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


def test_smoke_record_has_every_curve_at_equal_tokens(tmp_path):
    # two speedrun-dense lrs: the sweep path runs too (2 steps each), then 4-step A/B runs of the three recipes
    proc = bench("--smoke", "--lrs", "speedrun-dense=0.5,1", "--extend", "0", "--out-dir", tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    [path] = tmp_path.glob("recipes-smoke-cpu-*.json")
    rec = json.loads(path.read_text())
    assert rec["kind"] == "recipes" and rec["smoke"] is True and rec["complete"] is True and rec["commit"]
    c = rec["config"]
    assert c["model"] == "tiny" and c["data"] == "sample" and c["steps"] == 4 and c["sweep_steps"] == 2
    sweep = rec["sweep"]
    assert [s["lr"] for s in sweep["speedrun-dense"]] == [0.5, 1.0] and sweep["gpt2"] == sweep["speedrun"] == []
    assert not any(s["extension"] for s in sweep["speedrun-dense"])
    best = min(sweep["speedrun-dense"], key=lambda s: s["final_val_loss"])["lr"]
    ab = rec["ab"]
    assert list(ab) == ["gpt2", "speedrun-dense", "speedrun"]
    assert ab["speedrun-dense"]["lr"] == best and ab["gpt2"]["lr"] == 2e-3 and ab["speedrun"]["lr"] == 1.0
    assert {run["tokens"] for run in ab.values()} == {4 * c["total_batch_tokens"]}
    for recipe, run in ab.items():
        assert run["config"]["recipe"] == recipe and run["config"]["model"] == "tiny"
        assert [v["step"] for v in run["val"]] == [2, 4]
        assert run["final_val_loss"] == run["val"][-1]["loss"] and len(run["train_losses"]) == 4
    # the packed recipe trains on one sequence of --packed-seq-len per micro-batch, the others on --seq-len rows
    assert ab["speedrun"]["config"]["seq_len"] == c["packed_seq_len"] == 128
    assert ab["speedrun-dense"]["config"]["seq_len"] == ab["gpt2"]["config"]["seq_len"] == c["seq_len"] == 64
    assert len({run["parameters"] for run in ab.values()}) == 3  # three different models of the same size class
    r = rec["result"]
    assert r["equal_tokens"] is True and sorted(r["ranking"]) == sorted(ab)
    for recipe in ("speedrun-dense", "speedrun"):
        diff = r["minus_gpt2"][recipe]
        assert diff == pytest.approx(ab[recipe]["final_val_loss"] - ab["gpt2"]["final_val_loss"])
    assert r["winner"] == r["ranking"][0] == min(ab, key=lambda k: ab[k]["final_val_loss"])
    assert "| speedrun-dense " in proc.stdout and "winner:" in proc.stdout


def test_recipes_named_as_the_trainer_names_them():
    """The A/B trains every recipe at one shape (default mini): it holds the trainer's recipes that have it (record89's
    model has the record's fixed topology, tiny and d12 only)."""
    mod = load_script("bench/recipes.py", "bench_recipes_names")
    from tritonrun.train import RECIPES

    assert sorted(mod.RECIPES) == sorted(n for n, r in RECIPES.items() if "mini" in r.sizes())
    assert mod.RECIPES[0] == "gpt2"


@pytest.mark.parametrize("tried, expected", [
    ([(1e-3, 9.0), (2e-3, 8.0), (4e-3, 7.0)], 8e-3),  # best at the top: one more doubling
    ([(0.5, 5.0), (1.0, 5.5), (2.0, 6.0)], 0.25),  # best at the bottom: one more halving
    ([(0.5, 6.0), (1.0, 5.0), (2.0, 5.5)], None),  # best inside: tuned
    ([(4e-3, 7.0), (1e-3, 9.0), (2e-3, 8.0), (8e-3, 7.5)], None),  # an extension that lost: the old top is inside
    ([(1.0, 5.0)], None),  # one lr: nothing to extend from
])
def test_sweep_goes_on_past_a_winning_end(tried, expected):
    mod = load_script("bench/recipes.py", "bench_recipes_next_lr")
    got = mod.next_lr([{"lr": lr, "final_val_loss": loss} for lr, loss in tried])
    assert got == (None if expected is None else pytest.approx(expected))


def test_extension_runs_the_next_lr_and_stops_at_the_limit(tmp_path, monkeypatch):
    mod = load_script("bench/recipes.py", "bench_recipes_extend")
    runs = []

    def fake_training(argv):  # val loss falls with lr for ever: the sweep extends exactly --extend times
        lr = float(argv[argv.index("--lr") + 1])
        steps = int(argv[argv.index("--max-steps") + 1])
        runs.append((argv[argv.index("--recipe") + 1], lr, steps))
        loss = 10.0 - lr
        return {"steps_done": steps, "tokens_seen": 128 * steps, "final_val_loss": loss, "train_losses": [loss],
                "val": [{"step": steps, "tokens": 128 * steps, "loss": loss}], "train_time_s": 1.0, "parameters": 1,
                "flops_per_token": 1, "config": {}}

    monkeypatch.setattr(mod, "run_training", fake_training)
    assert mod.main(["--smoke", "--recipes", "speedrun", "--lrs", "speedrun=0.5,1", "--extend", "2",
                     "--out-dir", str(tmp_path)]) == 0
    assert runs == [("speedrun", 0.5, 2), ("speedrun", 1.0, 2), ("speedrun", 2.0, 2), ("speedrun", 4.0, 2),
                    ("speedrun", 4.0, 4)]
    [path] = tmp_path.glob("recipes-smoke-cpu-*.json")
    rec = json.loads(path.read_text())
    assert [s["extension"] for s in rec["sweep"]["speedrun"]] == [False, False, True, True]
    assert rec["ab"]["speedrun"]["lr"] == 4.0 and rec["result"]["winner"] == "speedrun"
    assert "minus_gpt2" not in rec["result"]


@pytest.mark.parametrize("flags, words", [
    (["--steps", "0"], "--steps 0"),
    (["--lrs", "gpt2=abc"], "comma-separated"),
    (["--lrs", "speedrun=-1"], "lrs > 0"),
    (["--lrs", "1e-3"], "RECIPE=LR"),
    (["--recipes", "gpt2,gpt3"], "the recipes are"),
    (["--recipes", "speedrun", "--lrs", "gpt2=1e-3"], "not among the recipes compared"),
    (["--extend", "-1"], "--extend -1"),
    (["--jobs", "0"], "--jobs 0"),
    (["--packed-seq-len", "768"], "not a multiple of --packed-seq-len"),
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


def test_full_budget_sweep_is_the_ab_run(tmp_path, monkeypatch):
    """With --sweep-steps = --steps (the default outside --smoke) the sweep's best run is the A/B run: nothing is
    trained twice, and the record says where the A/B came from."""
    mod = load_script("bench/recipes.py", "bench_recipes_full_sweep")
    runs = []

    def fake_training(argv):  # the middle lr wins
        lr = float(argv[argv.index("--lr") + 1])
        steps = int(argv[argv.index("--max-steps") + 1])
        runs.append((lr, steps))
        loss = 5.0 + abs(lr - 1.0)
        return {"steps_done": steps, "tokens_seen": 128 * steps, "final_val_loss": loss, "train_losses": [loss],
                "val": [{"step": steps, "tokens": 128 * steps, "loss": loss}], "train_time_s": 1.0, "parameters": 1,
                "flops_per_token": 1, "config": {}}

    monkeypatch.setattr(mod, "run_training", fake_training)
    assert mod.main(["--smoke", "--recipes", "speedrun", "--lrs", "speedrun=0.5,1,2", "--steps", "4",
                     "--sweep-steps", "4", "--out-dir", str(tmp_path)]) == 0
    assert runs == [(0.5, 4), (1.0, 4), (2.0, 4)]
    [path] = tmp_path.glob("recipes-smoke-cpu-*.json")
    ab = json.loads(path.read_text())["ab"]["speedrun"]
    assert ab["lr"] == 1.0 and ab["from_sweep"] is True and ab["final_val_loss"] == 5.0
    assert mod.parse_args([]).sweep_steps == mod.parse_args([]).steps == 150  # the default: full-budget sweeps


def _tuned_in(rec: dict, recipe: str, run: dict) -> bool:
    """`run`'s lr is the interior best of a sweep of the same model (parameter count) in the record `rec`."""
    for name, other in rec["ab"].items():
        sweep = rec["sweep"].get(name) or []
        lrs = sorted(s["lr"] for s in sweep)
        if other["parameters"] == run["parameters"] and other["lr"] == run["lr"] and len(lrs) >= 3 and \
                lrs[0] < run["lr"] < lrs[-1] and other["final_val_loss"] == min(s["final_val_loss"] for s in sweep):
            return True
    return False


def test_committed_cpu_records_compare_at_tuned_lrs_and_dense_speedrun_beats_gpt2():
    """The committed CPU A/Bs (README's figures): complete, equal tokens, each recipe at a tuned lr: the interior
    best of its own sweep, or (an lr pinned by --lrs) of a sweep of the same model in an earlier committed record;
    the 2024-11-10 recipe (speedrun-dense; "speedrun" in records before 2024-12-17's took the name) ends below
    gpt2, and README quotes every final val of the newest record."""
    paths = sorted((REPO / "bench" / "results").glob("recipes-cpu-*.json"))
    assert paths, "no bench/results/recipes-cpu-*.json: run python bench/recipes.py and commit its record"
    records = [json.loads(p.read_text()) for p in paths]
    for i, rec in enumerate(records):
        assert rec["complete"] and not rec["smoke"] and not rec["dirty"] and rec["result"]["equal_tokens"]
        assert rec["config"]["model"] in ("tiny", "mini") and rec["config"]["data"] == "sample"
        for recipe, run in rec["ab"].items():
            assert _tuned_in(rec, recipe, run) or any(_tuned_in(r, recipe, run) for r in records[:i]), \
                f"{paths[i].name}: {recipe} at lr {run['lr']} is not a tuned lr"
        dense = "speedrun-dense" if "speedrun-dense" in rec["ab"] else "speedrun"
        assert rec["ab"][dense]["final_val_loss"] < rec["ab"]["gpt2"]["final_val_loss"]
    readme = (REPO / "README.md").read_text()
    assert paths[-1].name in readme
    for recipe, run in records[-1]["ab"].items():
        assert f"{run['final_val_loss']:.4f}" in readme, recipe


def test_jobs_run_trainings_side_by_side_and_keep_the_record_in_order(tmp_path, monkeypatch):
    """--jobs 2: two trainings at once (measured by overlapping fake runs), the sweeps and the A/B in the record in
    recipe and lr order as with --jobs 1, and the same verdict."""
    import threading
    import time

    mod = load_script("bench/recipes.py", "bench_recipes_jobs")
    lock, running, peak = threading.Lock(), [0], [0]

    def fake_training(argv):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.05)
        with lock:
            running[0] -= 1
        recipe, lr = argv[argv.index("--recipe") + 1], float(argv[argv.index("--lr") + 1])
        steps = int(argv[argv.index("--max-steps") + 1])
        loss = {"gpt2": 6.0, "speedrun-dense": 5.0, "speedrun": 4.0}[recipe] + abs(lr - 1.0)
        return {"steps_done": steps, "tokens_seen": 128 * steps, "final_val_loss": loss, "train_losses": [loss],
                "val": [{"step": steps, "tokens": 128 * steps, "loss": loss}], "train_time_s": 1.0, "parameters": 1,
                "flops_per_token": 1, "config": {}}

    monkeypatch.setattr(mod, "run_training", fake_training)
    lrs = ["--lrs", "gpt2=0.5,1,2", "--lrs", "speedrun-dense=0.5,1,2", "--lrs", "speedrun=2,1,0.5"]
    assert mod.main(["--smoke", *lrs, "--steps", "4", "--sweep-steps", "4", "--jobs", "2",
                     "--out-dir", str(tmp_path)]) == 0
    assert peak[0] == 2
    [path] = tmp_path.glob("recipes-smoke-cpu-*.json")
    rec = json.loads(path.read_text())
    assert list(rec["ab"]) == ["gpt2", "speedrun-dense", "speedrun"] and rec["config"]["jobs"] == 2
    assert [s["lr"] for s in rec["sweep"]["speedrun"]] == [2.0, 1.0, 0.5]  # the order given
    assert all(run["lr"] == 1.0 and run["from_sweep"] for run in rec["ab"].values())
    assert rec["result"]["ranking"] == ["speedrun", "speedrun-dense", "gpt2"]
