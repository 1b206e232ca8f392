"""Each recipe's first CPU steps at a fixed seed, pinned: recorded by tests/fixtures/pinned/make_pinned.py before the
recipe-module redesign (issue 31), replayed here through the CLI. A refactor that moves recipe code must leave
every loss, grad norm, lr and val loss as it was: bitwise on a machine like the recording's."""
import hashlib
import json
from pathlib import Path

import pytest

from tests.helpers import NEEDS_INTERPRETER, assert_same_numbers

PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned" / "losses.json").read_text())


def _sample_digest() -> str:
    from tritonrun.data.sample import sample_tokens

    train, val = sample_tokens()
    return hashlib.sha256(train.tobytes() + val.tobytes()).hexdigest()


@pytest.mark.parametrize("name", [pytest.param(n, marks=NEEDS_INTERPRETER) if n.endswith("triton") else n
                                  for n in PINNED["runs"]])
def test_recipe_curve_is_the_pinned_one(name, tmp_path, one_torch_thread):
    if _sample_digest() != PINNED["sample_sha256"]:
        pytest.skip(f"the --data sample corpus differs from the recording's (Python {PINNED['python']}'s help "
                    f"topics): the pinned curves are of other tokens")
    from tritonrun import train as train_speedrun

    run = PINNED["runs"][name]
    # recorded when packed training sequences started at document starts by default: --doc-aligned is that order
    aligned = ["--doc-aligned"] if run["argv"][run["argv"].index("--recipe") + 1] == "speedrun" else []
    assert train_speedrun.main([*run["argv"], *aligned, "--out-dir", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    got = {"steps": [[s["step"], s["loss"], s["grad_norm"], s["lr"]] for s in result["steps"]],
           "val": [[v["step"], v["loss"]] for v in result["val"]]}
    assert [s[0] for s in got["steps"]] == [s[0] for s in run["steps"]]
    assert [v[0] for v in got["val"]] == [v[0] for v in run["val"]]
    assert [s[3] for s in got["steps"]] == [s[3] for s in run["steps"]]  # the lr schedule: Python floats, exact
    flat = lambda c: [x for s in c["steps"] for x in s[1:3]] + [v[1] for v in c["val"]]  # noqa: E731
    assert_same_numbers(flat(got), flat(run), PINNED)
