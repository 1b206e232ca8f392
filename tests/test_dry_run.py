"""--dry-run, and the batch derived from the card's memory: a GPU preset's plan on a machine without a GPU, building
and writing nothing. The micro-batch (dense recipes) or packed length (packed) comes from the memory estimate at
startup (tritonrun/train.py size_batch -> tritonrun.memory.fit_preset); the committed memory records
(bench/results/memory-*.json, bench/memory.py --max) hold it to what their searches found."""
import json
from pathlib import Path

import pytest

from tritonrun import train as train_speedrun
from tritonrun.recipes import RECIPES

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
RECORD_PREFIX = {"gpt2": "memory-", "speedrun-dense": "memory-speedrun-dense-", "speedrun": "memory-speedrun-packed-",
                 "record89": "memory-record89-"}


def recorded_pick(recipe: str, backend: str, preset: str = "rtx4070") -> int:
    """What the newest committed memory record of `recipe` on `preset` found to be the largest that fits."""
    paths = sorted(RESULTS.glob(f"{RECORD_PREFIX[recipe]}{preset}-2*.json"))
    assert paths, f"no {RECORD_PREFIX[recipe]}{preset}-*.json: run bench/memory.py --gpu {preset} --recipe {recipe} " \
                  f"--max --record"
    rec = json.loads(paths[-1].read_text())
    if RECIPES[recipe].packed:
        return rec["max_seq_len"][backend]["seq_len"]
    return rec["max_micro_batch"][backend]["micro_batch"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_rtx4070_batch_is_derived_and_equals_the_memory_records(recipe, backend, tmp_path, monkeypatch, capsys):
    """`--gpu rtx4070` resolves here too: the micro-batch (dense) or packed length (packed) of each recipe and
    backend is derived from the 12 GB card's memory, is what the committed memory record's search picked, and the
    plan prints the estimate it chose by."""
    monkeypatch.chdir(tmp_path)
    assert train_speedrun.main(["--gpu", "rtx4070", "--recipe", recipe, "--backend", backend, "--dry-run"]) == 0
    out = capsys.readouterr().out
    pick = recorded_pick(recipe, backend)
    r = RECIPES[recipe]
    mb, seq = (1, pick) if r.packed else (pick, 1024)
    assert f"batch: {mb} x {seq} tokens per micro-batch" in out
    memory = next(line for line in out.splitlines() if line.startswith("memory: "))
    what, flag = ("packed length", "--seq-len") if r.packed else ("micro-batch", "--micro-batch")
    assert memory.startswith(f"memory: {what} {pick}: the largest whose step fits rtx4070's 11.0 GiB budget"), memory
    assert f"for --recipe {recipe} --model d12 --backend {backend}" in memory and f"{flag} overrides" in memory
    assert list(tmp_path.iterdir()) == []  # no out dir, no data, nothing (the estimate's cache is $TRITONRUN_CACHE)


def test_a_given_batch_is_checked_against_the_estimate(tmp_path, monkeypatch, capsys):
    """--micro-batch overrides the derivation; the plan says whether it fits by the same estimate."""
    monkeypatch.chdir(tmp_path)
    base = ["--gpu", "rtx4070", "--recipe", "gpt2", "--backend", "torch", "--dry-run"]
    pick = recorded_pick("gpt2", "torch")
    assert train_speedrun.main([*base, "--micro-batch", str(pick // 2)]) == 0
    out = capsys.readouterr().out
    assert f"batch: {pick // 2} x 1024" in out and out.count("memory: ") == 1
    assert f"largest micro-batch within the 11.0 GiB budget by the estimate: {pick} (" in out
    assert f"this run's {pick // 2}: fits" in out
    assert train_speedrun.main([*base, "--micro-batch", str(pick * 2)]) == 0
    assert f"this run's {pick * 2}: DOES NOT FIT" in capsys.readouterr().out


def test_memory_gib_sizes_for_a_smaller_card_and_nothing_fitting_is_one_line(tmp_path, monkeypatch, capsys):
    """--memory-gib sizes the batch for that budget (a laptop part, a shared card); when not even one sequence fits,
    one line says so and how to fix it, exit 2."""
    monkeypatch.chdir(tmp_path)
    base = ["--gpu", "rtx4070", "--recipe", "gpt2", "--model", "tiny", "--seq-len", "128", "--backend", "torch",
            "--dry-run"]
    assert train_speedrun.main([*base, "--memory-gib", "2"]) == 0
    out = capsys.readouterr().out
    assert "fits rtx4070's 1.0 GiB budget" in out
    assert train_speedrun.main([*base, "--memory-gib", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no micro-batch of --recipe gpt2 --model tiny --backend torch fits rtx4070's 0.0 GiB" \
        in err[0] and "--memory-gib" in err[0], err


def test_dry_run_of_the_cpu_smoke_run_and_of_a_bad_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_speedrun.main(["--gpu", "cpu", "--model", "tiny", "--data", "sample", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch: 4 x 128 tokens per micro-batch x 2 micro-batches = 1,024 tokens per step, 50 steps" in out
    assert "memory:" not in out  # no GPU memory on the CPU: nothing to size by
    assert train_speedrun.main(["--gpu", "rtx4070", "--recipe", "speedrun", "--micro-batch", "2", "--dry-run"]) == 2
    assert "does not apply to --recipe speedrun" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_readme_batch_table_is_the_memory_records_picks():
    """README's table of derived batch sizes quotes, per preset, what the committed memory records' searches
    picked for each recipe with the torch and the fused LM head (the derivation equals them: tests above and
    tests/test_memory_fit.py)."""
    readme = (RESULTS.parents[1] / "README.md").read_text()
    header = "| preset | `speedrun`: packed tokens per micro-batch |"
    rows = readme.split(header, 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    checked = set()
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        if cells[0].startswith("cpu"):  # no memory to size by: the smoke run's fixed values
            from tritonrun.defaults import SMOKE_DEFAULTS

            packed = RECIPES["speedrun"].defaults(on_gpu=False)["seq_len"]
            dense = f"{SMOKE_DEFAULTS['micro_batch']} × {SMOKE_DEFAULTS['seq_len']}"
            packed89 = RECIPES["record89"].defaults(on_gpu=False)["seq_len"]
            assert cells[1:] == [f"{packed}", dense, dense, f"{packed89}"], cells
            checked.add("cpu")
            continue
        for preset in (p.strip() for p in cells[0].split(",")):
            for recipe, cell in zip(("speedrun", "gpt2", "speedrun-dense", "record89"), cells[1:], strict=True):
                torch_head, fused = (int(v.split("×")[0].replace(",", "")) for v in cell.split("/"))
                assert (torch_head, fused) == (recorded_pick(recipe, "torch", preset),
                                               recorded_pick(recipe, "triton", preset)), (preset, recipe, cell)
            checked.add(preset)
    from tritonrun.presets import PRESETS
    assert checked == set(PRESETS)


def test_the_line_the_batch_was_sized_by_goes_to_the_log_and_the_record(tmp_path, one_torch_thread):
    """What size_batch chose the batch by reaches train.log and result.json's batch_sizing (a CPU run stands in
    for the GPU run that sizes: the run itself takes the sizing it is given)."""
    from tritonrun import training

    cfg, _ = train_speedrun.resolve_config(["--gpu", "cpu", "--model", "tiny", "--data", "sample", "--seq-len", "64",
                                            "--total-batch-tokens", "256", "--max-steps", "2", "--val-every", "2",
                                            "--val-tokens", "256", "--out-dir", str(tmp_path)])
    sizing = {"field": "micro_batch", "value": cfg.micro_batch, "reserved_gib": 1.23, "budget_gib": 11.0,
              "cached": True, "seconds": 0.01, "text": "micro-batch 4: the largest whose step fits (a test's line)"}
    train, val = train_speedrun.open_data(cfg)
    training.run(cfg, tmp_path, train, val, sizing=sizing)
    assert "memory: micro-batch 4: the largest whose step fits (a test's line)" in (tmp_path / "train.log").read_text()
    assert json.loads((tmp_path / "result.json").read_text())["batch_sizing"] == sizing
