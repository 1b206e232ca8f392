"""What every record carries: code version, library versions, device. Shared by the trainer and
the benchmarks so that logs and bench/results/*.json describe a run the same way."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import subprocess
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]  # the checkout (train_speedrun.py, bench/) this package runs from
RESULTS_DIR = REPO / "bench" / "results"  # committed benchmark records: README figures come from here


def git_commit() -> tuple[str, bool]:
    """(commit hash or "unknown", dirty flag) of the checkout this code runs from. A copy of the tree without
    its .git (a GPU machine that gets the files only) takes the hash from $TRITONRUN_COMMIT, set by whoever
    copied a committed, clean tree there; it is not checked."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO, capture_output=True, text=True, timeout=10, check=True,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("TRITONRUN_COMMIT") or "unknown", False


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def env_info(device) -> dict:
    import torch

    # the version from package metadata: importing triton here would freeze its interpreter mode
    # (TRITON_INTERPRET is read when triton's own @jit helpers are defined, at import)
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_version = version("triton")
    except PackageNotFoundError:
        triton_version = None
    commit, dirty = git_commit()
    return {
        "commit": commit,
        "dirty": dirty,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "device": device_name(device),
    }


def record_stem(kind: str, device: str, smoke: bool, when) -> str:
    """The file name (without suffix) of a benchmark record: kind-[smoke-]device-YYYYmmdd-HHMMSS."""
    device_slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    return f"{kind}-{'smoke-' if smoke else ''}{device_slug}-{when.strftime('%Y%m%d-%H%M%S')}"


def record_dir(out_dir: Path | None, smoke: bool) -> Path | None:
    """Where a benchmark writes its record: --out-dir when given, else bench/results for a measurement and
    nowhere for a smoke run. Raises ValueError (the user's error line) for a smoke run aimed at bench/results."""
    if smoke and out_dir is not None and Path(out_dir).resolve() == RESULTS_DIR.resolve():
        raise ValueError("smoke runs never write into bench/results (README figures come from GPU records only)")
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise ValueError(f"--out-dir {out_dir} is a file, not a directory: give a directory for the record")
    return out_dir if out_dir is not None else (None if smoke else RESULTS_DIR)


def temp_path_for(path: Path) -> Path:
    """A unique hidden name beside `path` (`.<name>.<pid>.<rand>.tmp`) that no reader takes for the file."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(directory: Path) -> None:
    """Make a rename in `directory` durable (best effort: not every platform can fsync a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb"):
    """Write `path` all or nothing: the body writes a temp file beside it, which is fsynced and renamed over
    `path` only if the body succeeds (and removed otherwise). A kill at any moment leaves either the old file
    or the new one under the final name, never half of one. The only way this project writes results."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # x: never clobber another writer's temp
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path, "w") as f:
        f.write(text)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
