"""tritonrun/memory.fit: the largest micro-batch (or packed length) whose estimated peak fits a card, cached.

The committed memory records (bench/results/memory-*.json, written by bench/memory.py --max) are what sized the
presets; fit must pick what they picked: replayed on every record's own search, and recomputed for real on the
rtx4070 (the target card) for each recipe kind."""
import json
from pathlib import Path

import pytest

from tritonrun import memory as est

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _records():
    out = []
    for path in sorted(RESULTS.glob("memory-*.json")):
        rec = json.loads(path.read_text())
        for search in ("max_micro_batch", "max_seq_len"):
            for backend, found in rec.get(search, {}).items():
                out.append(pytest.param(path.name, rec, search, backend, found, id=f"{path.stem}-{backend}"))
    return out


def _setup_of(rec: dict) -> est.Setup:
    return est.Setup(rec["preset"], rec["model"], rec["seq_len"], rec["total_batch_tokens"], rec["gpu"]["memory_gib"],
                     est.GPUS[rec["preset"]], recipe=rec.get("recipe", "gpt2"))


@pytest.mark.parametrize("name, rec, search, backend, found", _records())
def test_fit_picks_what_every_committed_record_picked(name, rec, search, backend, found, tmp_path):
    """Replaying a record's own fits/does-not-fit answers, fit asks only what the record's search asked and picks the
    record's answer: the same candidates (divisors of the batch, or powers of two up to the context) and rule."""
    answers = {value: fits for value, fits in ((t[search.removeprefix("max_")], t["fits"]) for t in found["tried"])}
    asked = []

    def replay(setup, backend_, micro_batch):
        value = setup.seq_len if search == "max_seq_len" else micro_batch
        assert backend_ == backend and value in answers, (name, value, sorted(answers))
        asked.append(value)
        return {"fits": answers[value], "peak_reserved_estimate_bytes": 0}

    setup = _setup_of(rec)
    assert setup.budget_bytes == rec["budget_bytes"]
    got = est.fit(setup, backend, cache_dir=tmp_path, estimate_fn=replay)
    key = search.removeprefix("max_")
    assert got[key] == found[key] and got["searched"] == key
    assert sorted(asked) == sorted(answers)


@pytest.mark.parametrize("recipe, backend, seq_len, expected", [
    ("gpt2", "torch", 1024, ("micro_batch", 8)),
    ("speedrun-dense", "triton", 1024, ("micro_batch", 16)),
    ("speedrun", "triton", 4096, ("seq_len", 8192)),
])
def test_fit_recomputes_the_rtx4070_records(recipe, backend, seq_len, expected, tmp_path):
    """The real estimate on today's code: the rtx4070 picks of the committed records, and the pick's reserved estimate
    equals the record's (the estimator is deterministic: fake tensors, no timing)."""
    setup = est.Setup("rtx4070", "d12", seq_len, 524288, 12, est.GPUS["rtx4070"], recipe=recipe)
    got = est.fit(setup, backend, cache_dir=tmp_path)
    key, value = expected
    assert got[key] == value and not got["cached"]
    prefix = {"gpt2": "memory-rtx4070-", "speedrun-dense": "memory-speedrun-dense-rtx4070-",
              "speedrun": "memory-speedrun-packed-rtx4070-"}[recipe]
    rec = json.loads(sorted(RESULTS.glob(f"{prefix}*.json"))[-1].read_text())
    mb, t = (1, value) if key == "seq_len" else (value, seq_len)
    recorded = [e for e in rec["estimates"] if (e["backend"], e["micro_batch"], e["seq_len"]) == (backend, mb, t)]
    assert recorded and got["reserved_gib"] == round(recorded[0]["peak_reserved_estimate_bytes"] / 2**30, 4)
    again = est.fit(setup, backend, cache_dir=tmp_path, estimate_fn=lambda *a: pytest.fail("not cached"))
    assert again["cached"] and again[key] == value


def test_fit_cache_keys_on_what_changes_the_step(tmp_path):
    """A second fit of the same step is read from the cache; another backend, --torch-ops or budget is a new fit; a
    damaged cache file is estimated again."""
    calls = []

    def fake(setup, backend, micro_batch):
        calls.append((backend, setup.torch_ops, micro_batch))
        return {"fits": micro_batch <= 4, "peak_reserved_estimate_bytes": micro_batch * 2**30}

    setup = est.Setup("rtx4070", "tiny", 128, 1024, 12, est.GPUS["rtx4070"], recipe="gpt2")
    first = est.fit(setup, "triton", cache_dir=tmp_path, estimate_fn=fake)
    assert (first["micro_batch"], first["reserved_gib"], first["cached"]) == (4, 4.0, False) and calls
    n = len(calls)
    assert est.fit(setup, "triton", cache_dir=tmp_path, estimate_fn=fake)["cached"] and len(calls) == n
    for other in ([setup, "torch"], [est.Setup(**{**setup.__dict__, "torch_ops": "attention"}), "triton"],
                  [est.Setup(**{**setup.__dict__, "budget_gib": 5.0}), "triton"]):
        assert not est.fit(*other, cache_dir=tmp_path, estimate_fn=fake)["cached"]
    for path in tmp_path.glob("fit-*.json"):
        path.write_text("{not json")
    assert not est.fit(setup, "triton", cache_dir=tmp_path, estimate_fn=fake)["cached"]
    nothing = est.fit(setup, "triton", cache_dir=tmp_path / "none", estimate_fn=lambda *a: {"fits": False})
    assert nothing["micro_batch"] is None and nothing["reserved_gib"] is None
