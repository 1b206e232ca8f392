"""--dry-run: the plan of a GPU preset's run on a machine without a GPU, building and writing nothing."""
import pytest

from tritonrun import train as train_speedrun
from tritonrun.presets import preset_micro_batch, preset_seq_len
from tritonrun.recipes import RECIPES


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_rtx4070_plan_of_every_recipe_fits_12gb_by_the_estimate(recipe, backend, tmp_path, monkeypatch, capsys):
    """`--gpu rtx4070` resolves here too: the micro-batch (dense) or packed length (packed) the preset gives the
    recipe and backend is the largest that fits the card's budget by the memory estimate (tritonrun/memory.fit)."""
    monkeypatch.chdir(tmp_path)
    assert train_speedrun.main(["--gpu", "rtx4070", "--recipe", recipe, "--backend", backend, "--dry-run"]) == 0
    out = capsys.readouterr().out
    r = RECIPES[recipe]
    mb, seq = preset_micro_batch("rtx4070", backend, "", r), preset_seq_len("rtx4070", backend) if r.packed else 1024
    assert f"batch: {mb} x {seq} tokens per micro-batch" in out
    memory = next(line for line in out.splitlines() if line.startswith("memory: "))
    what, value = ("packed length", seq) if r.packed else ("micro-batch", mb)
    # the estimate's own pick is the preset's: the derivation agrees with the table the memory records sized
    assert f"largest {what} within the 11.0 GiB budget by the estimate: {value} (" in memory, memory
    assert memory.endswith(f"this run's {value}: fits"), memory
    assert list(tmp_path.iterdir()) == []  # no out dir, no data, nothing (the estimate's cache is $TRITONRUN_CACHE)


def test_dry_run_of_the_cpu_smoke_run_and_of_a_bad_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert train_speedrun.main(["--gpu", "cpu", "--model", "tiny", "--data", "sample", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "batch: 4 x 128 tokens per micro-batch x 2 micro-batches = 1,024 tokens per step, 50 steps" in out
    assert "memory:" not in out  # no cap on the CPU: nothing to fit
    assert train_speedrun.main(["--gpu", "rtx4070", "--recipe", "speedrun", "--micro-batch", "2", "--dry-run"]) == 2
    assert "does not apply to --recipe speedrun" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
