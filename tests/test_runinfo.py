"""runinfo: the commit a record names, also where the tree was copied without its .git."""
import importlib.util
import shutil
import subprocess
from pathlib import Path

from tritonrun import runinfo

REPO = Path(__file__).resolve().parent.parent


def test_commit_of_this_checkout():
    commit, dirty = runinfo.git_commit()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
    assert commit == head.stdout.strip() and isinstance(dirty, bool)


def test_copy_without_git_takes_the_commit_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "tritonrun").mkdir()  # a copy of the tree with no .git beside it
    shutil.copy(REPO / "tritonrun" / "runinfo.py", tmp_path / "tritonrun" / "runinfo.py")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))  # git must not find a repo above it
    spec = importlib.util.spec_from_file_location("runinfo_copy", tmp_path / "tritonrun" / "runinfo.py")
    copy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(copy)
    monkeypatch.delenv("TRITONRUN_COMMIT", raising=False)
    assert copy.git_commit() == ("unknown", False)
    monkeypatch.setenv("TRITONRUN_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert copy.git_commit() == ("0123456789abcdef0123456789abcdef01234567", False)
