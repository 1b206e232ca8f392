"""What every record carries: code version, library versions, device. Shared by the trainer and
the benchmarks so that logs and bench/results/*.json describe a run the same way."""
from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

from tritonrun.errors import WriteFailed

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


# The errors that mean "this disk will not take the file": the user frees space or picks another place.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                         errno.ENOTDIR})


def human_bytes(n: int | float) -> str:
    """Bytes as the user reads them: 1.49 GB, 312 MB, 18 kB (powers of 1000, as df -H and shells show)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GB" else f"{n / size:.0f} {unit}"
    return f"{int(n)} B"


def free_bytes(path: Path) -> int | None:
    """Free bytes for an unprivileged writer on the file system holding `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def write_failed(path: Path, e: OSError, needed: int | None = None, fix: str | None = None) -> WriteFailed:
    """The one line for a write that failed on the disk's side (DISK_ERRNOS), as a WriteFailed to raise."""
    free = free_bytes(Path(path).parent)
    sizes = ", ".join(x for x in (f"needs about {human_bytes(needed)}" if needed else "",
                                   f"{human_bytes(free)} free there" if free is not None else "") if x)
    why = e.strerror or type(e).__name__
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        why = f"{why}: a file stands where a directory is needed"
    fix = fix or ("free space on that disk, or make it writable, or write somewhere else" if e.errno in
                  (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable, or write somewhere else")
    return WriteFailed(f"cannot write {path}: {why}{f' ({sizes})' if sizes else ''}: {fix}; nothing half-written "
                       f"was left under its name")


def disk_error(e: BaseException | None) -> OSError | None:
    """The disk-side OSError (DISK_ERRNOS) behind `e`, if any: `e` itself or one it was raised during (torch.save
    reports a full disk as RuntimeError "unexpected pos", raised while the file's OSError was being handled)."""
    seen = 0
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in DISK_ERRNOS:
            return e
        e, seen = e.__cause__ or e.__context__, seen + 1
    return None


def reports_write_failures(main):
    """Decorate a CLI's main(argv) -> int: a WriteFailed from anywhere in it (a record, a cache, an export) is
    printed as its one `error:` line, exit code 2, instead of a traceback."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except WriteFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    return wrapped


def make_dir(path: Path, fix: str | None = None) -> Path:
    """mkdir -p `path`, or WriteFailed (one line with the fix) when a read-only disk or a file is in the way."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if not path.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path))
    except OSError as e:
        if e.errno in DISK_ERRNOS or e.errno == errno.EEXIST:  # EEXIST: mkdir met a file of that name
            raise write_failed(path, e, fix=fix) from None
        raise
    return path


@contextlib.contextmanager
def atomic_file(path: Path, mode: str = "wb", needed: int | None = None, fix: str | None = None):
    """Write `path` all or nothing: the body writes a temp file beside it, which is fsynced and renamed over
    `path` only if the body succeeds (and removed otherwise). A kill at any moment leaves either the old file
    or the new one under the final name, never half of one. The only way this project writes results.
    A full disk, a read-only file system or a missing permission raises WriteFailed (errors.py): one line naming
    `path`, the bytes it `needed` (when the caller knows), the free space, and `fix` (default: free space)."""
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        with open(tmp, mode.replace("w", "x")) as f:  # x: never clobber another writer's temp
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        disk = disk_error(e)
        if disk is not None:
            raise write_failed(path, disk, needed, fix) from None
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str, fix: str | None = None) -> None:
    with atomic_file(path, "w", needed=len(text.encode()), fix=fix) as f:
        f.write(text)


def atomic_write_json(path: Path, obj, fix: str | None = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n", fix=fix)
