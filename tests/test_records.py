"""Every committed record in bench/results/ is what a clean checkout of a commit on main measured: no record names a
dirty tree (uncommitted changes would make its numbers unreproducible from the commit it names)."""
import json
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _commits(record) -> list[tuple[str, bool]]:
    """(commit, dirty) of every entry of a record: the top level, its env, and each entry of a list record."""
    out = []
    for entry in record if isinstance(record, list) else [record]:
        if not isinstance(entry, dict):
            continue
        for where in (entry, entry.get("env") or {}):
            if isinstance(where, dict) and where.get("commit"):
                out.append((str(where["commit"]), bool(where.get("dirty"))))
    return out


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.name)
def test_no_record_comes_from_a_dirty_tree(path):
    commits = _commits(json.loads(path.read_text()))
    assert commits, f"{path.name} names no commit"
    dirty = sorted({c for c, d in commits if d or c.endswith("-dirty")})
    assert not dirty, f"{path.name} was written from a dirty tree ({dirty}): regenerate it from a clean commit"


def test_ada_records_name_the_host_versions():
    """Ada records name the triton, ptxas, torch and Python that compiled them (from the 2026-12-07 record on)."""
    newest = sorted(RESULTS.glob("ada-2*.json"))[-1]
    for r in json.loads(newest.read_text()):
        assert r["triton"] and r["ptxas"] and r["torch"] and r["python"], newest.name
