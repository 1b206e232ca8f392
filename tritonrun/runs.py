"""Run bookkeeping on disk, beside the training loop: the out dir and its lock, finding the checkpoint to continue
from, the result record (result.json), the leaderboard row and the loss plot. The loop (tritonrun/training.py)
calls these; the CLI (tritonrun/train.py) claims the out dir and resolves --resume with them.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

from tritonrun.errors import UserError
from tritonrun.gpt2.checkpoint import CheckpointError, list_checkpoints, load_checkpoint
from tritonrun.runinfo import atomic_file


# ----------------------------------------------------------------------------------- finding a run to continue
FINISHED = ("max_steps", "target_reached")  # result.json statuses of a run that is over: its record stays as it is


def read_record(out_dir: Path) -> dict | None:
    """The run's result.json, or None when there is none (or it does not parse: then the checkpoint speaks)."""
    try:
        record = json.loads((Path(out_dir) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def newest_loadable_checkpoint(out_dir: Path) -> tuple[Path, dict]:
    """(path, contents) of the newest checkpoint in out_dir that loads. A newer one that does not (a disk that
    filled up, a copy cut short) is skipped with a warning naming both files; UserError when none loads."""
    found = list_checkpoints(out_dir)
    if not found:
        record = read_record(out_dir)
        if record is not None:  # a run is there, but nothing to continue it from
            raise UserError(f"--resume: {out_dir} holds a run (result.json, status {record.get('status')}, step "
                            f"{record.get('steps_done')}) but no checkpoint (ckpt_*.pt) to continue from: "
                            f"start it again with a new --out-dir")
        raise UserError(f"--resume: no complete checkpoint (ckpt_*.pt) in {out_dir}; "
                        f"drop --resume to start a new run there")
    broken = []  # (path, why it does not load), newest first
    for path in reversed(found):
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            broken.append((path, str(e).removeprefix(f"{path}: ")))
            continue
        if "run_config" not in ckpt:
            broken.append((path, "no run_config: not a training checkpoint"))
            continue
        if broken:
            print(f"warning: --resume: {broken[0][0]} does not load ({broken[0][1]}); resuming from {path}, the "
                  f"newest checkpoint that does", file=sys.stderr, flush=True)
        return path, ckpt
    raise UserError(f"--resume: no checkpoint in {out_dir} loads (the newest, {broken[0][0]}: {broken[0][1]}): "
                    f"start it again with a new --out-dir")


def check_not_finished(out_dir: Path, ckpt: dict, base: dict, explicit: dict) -> bool:
    """Refuse to resume a finished run (its record would be rewritten), unless --max-steps was raised past a
    run that stopped at its max steps: True then (the run goes on to the new --max-steps)."""
    record = read_record(out_dir) or ckpt.get("result") or {}
    status, done = record.get("status"), record.get("steps_done", ckpt.get("step"))
    if status not in FINISHED:
        return False
    if status == "target_reached":
        raise UserError(f"--resume: the run in {out_dir} is finished (it reached its target at step "
                        f"{record.get('target_reached_step')}); its record stays as it is: start a new --out-dir "
                        f"(add --init-from ckpt:{out_dir} to start from its weights)")
    raised = explicit.get("max_steps", 0) > base["max_steps"]
    if not raised:
        raise UserError(f"--resume: the run in {out_dir} is finished ({done} of --max-steps {base['max_steps']}); "
                        f"its record stays as it is: raise --max-steps to train it further, or start a new --out-dir")
    if ckpt.get("step") != done:
        raise UserError(f"--resume --max-steps {explicit['max_steps']}: the newest checkpoint of {out_dir} is at "
                        f"step {ckpt.get('step')}, before the run's end at step {done}: start a new --out-dir "
                        f"(--init-from ckpt:{out_dir} starts from its weights)")
    return True


# ----------------------------------------------------------------------------------- the out dir
LOCK_NAME = ".tritonrun.lock"


class OutDirLock:
    """An exclusive flock(2) on <out-dir>/.tritonrun.lock, held for the life of a run (rank 0 under torchrun: the
    only writer). The kernel drops it when the process ends, however it ends (exit, SIGKILL, OOM killer), so a
    lock left by a dead run never blocks the next one; the file's text (pid, host, start) only names the holder
    in the refusal. The file stays after the run: unlinking it would let a run that opened the old file and one
    that creates a new file both hold "the" lock (flock is per inode). A per-host lock: on NFS, Linux maps
    flock to fcntl locks, which the server arbitrates."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise UserError naming the run that holds it."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UserError(self.refusal()) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{datetime.now().isoformat(timespec='seconds')}\n".encode())
        self.fd = fd

    def holder(self) -> str | None:
        """Who holds the lock now ("pid N on HOST since T"), or None when nobody does (no file, or a stale one)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # no lock file (or no such dir): nobody holds it
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        except BlockingIOError:
            return os.read(fd, 200).decode(errors="replace").strip() or "another process"
        finally:
            os.close(fd)

    def refusal(self) -> str:
        holder = self.holder() or "another process"
        return (f"--out-dir {self.path.parent} is in use by a running run ({holder}): wait for it to end, "
                f"or pick another --out-dir")

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the flock
            self.fd = None


def default_out_dir(path: Path) -> Path:
    """Create the default out dir exclusively: runs started in the same second (the name's resolution) get
    <name>-2, <name>-3, ... instead of sharing one directory."""
    for k in range(1, 1000):
        candidate = path if k == 1 else path.with_name(f"{path.name}-{k}")
        try:
            candidate.parent.mkdir(parents=True, exist_ok=True)
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"--out-dir {candidate} is not writable ({e.strerror}): pick another --out-dir") from None
    raise UserError(f"{path}-2 ... {path}-999 all exist: pick an --out-dir")


def finished_advice(record: dict, path: Path) -> str:
    """How to go on from the finished run in `path` (both ways are accepted by the trainer)."""
    if record.get("status") == "target_reached":
        return f"pick a new --out-dir (add --init-from ckpt:{path} to start from its weights)"
    return f"pick a new --out-dir, or train it further with --resume --max-steps above {record.get('steps_done')}"


def check_out_dir(path: Path, resuming: bool) -> None:
    """Refuse an out dir that holds another run (a new run would overwrite its records); the advice leads to
    something that works: --resume only where a checkpoint can continue it."""
    if resuming or not (path / "result.json").exists():
        return
    record = read_record(path)
    what = (f"a run (result.json: {record.get('status')} at step {record.get('steps_done')})" if record
            else "a run (result.json, unreadable)")
    if not list_checkpoints(path):
        raise UserError(f"--out-dir {path} already holds {what} with no checkpoint to continue from: pick a new "
                        f"--out-dir, or remove that one (rm -r {path}) to start over there")
    if record is not None and record.get("status") in FINISHED:
        raise UserError(f"--out-dir {path} already holds {what}, finished: {finished_advice(record, path)}")
    raise UserError(f"--out-dir {path} already holds {what}: continue it with --resume, or pick a new --out-dir")


def claim_out_dir(path: Path, resuming: bool, default_name: bool) -> tuple[Path, OutDirLock | None]:
    """Create (a default name exclusively), lock and check the out dir; returns (the dir, its lock). Under
    torchrun only rank 0 does: it alone writes there; the other ranks take no lock and create nothing."""
    if int(os.environ.get("RANK", "0")) != 0:
        return path, None
    if default_name:
        path = default_out_dir(path)
    lock = OutDirLock(path)
    try:
        if lock.holder() is None:  # a finished or dead run's dir: refused without touching it (a live one: below)
            check_out_dir(path, resuming)
        path.mkdir(parents=True, exist_ok=True)
        lock.acquire()  # and checked again under the lock: two runs started together cannot both pass
        check_out_dir(path, resuming)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        lock.release()
        raise UserError(f"--out-dir {path} is not writable ({e.strerror}): pick another --out-dir") from None
    except UserError:
        lock.release()
        raise
    return path, lock


# ----------------------------------------------------------------------------------- records
def new_result(cfg, env, trainer, dist) -> dict:
    model = trainer.model
    return {
        "record": "tritonrun.train", "version": 1, "status": "running",
        "date": datetime.now().strftime("%Y-%m-%d"), "env": env, "config": asdict(cfg),
        "world_size": dist.world_size, "grad_accum": trainer.grad_accum * dist.world_size, "recipe": cfg.recipe,
        "ops": {k: v for k, v in trainer.ops.placement.items() if k in trainer.op_names},
        "parameters": model.num_parameters(include_padding=False),
        "flops_per_token": trainer.flops_per_token, "steps": [], "train_losses": [], "val": [],
        "tokens_seen": 0, "steps_done": 0, "train_time_s": 0.0, "skipped_steps": 0, "timed_compiles": 0,
        "target_val_loss": cfg.target_val_loss, "target_reached": False, "target_reached_step": None,
        "final_val_loss": None, "tokens_per_s": 0.0, "mfu_mean": None, "peak_mem_gib": None,
        "peak_mem_kind": "cuda_max_allocated" if cfg.device == "cuda" else "process_max_rss",
        "peak_reserved_gib": None, "memory_fit": None, "mfu_peak": None,
        "resumed_from": [], "hellaswag": [],
    }


LEADERBOARD_HEADER = ("| date | preset | device | model (recipe) | backend | val loss | target | steps | tokens "
                      "| train time | tok/s | MFU | commit |\n|" + "---|" * 13)


def human_count(n: float) -> str:
    """9.01B, 51.2K, 999: a token count at the scale it has (a smoke run's 51,200 tokens are not "0.000B")."""
    units = (("", 1.0), ("K", 1e3), ("M", 1e6), ("B", 1e9))
    i = max(j for j, (_, scale) in enumerate(units) if n >= scale or j == 0)
    v = n / units[i][1]
    text = f"{v:.3g}" if v < 99.95 else f"{v:.0f}"
    if text == "1000" and i + 1 < len(units):  # 999,999 rounds up to the next unit
        return "1" + units[i + 1][0]
    return text + units[i][0]


def leaderboard_row(cfg, env: dict, result: dict) -> str:
    val, mfu = result["final_val_loss"], result["mfu_mean"]
    gpus = f"{result['world_size']}× " if result["world_size"] > 1 else ""
    return (f"| {result['date']} | {cfg.gpu} | {gpus}{env['device']} | {cfg.model} ({cfg.recipe}) | {cfg.backend}"
            f"{f' (torch: {cfg.torch_ops})' if cfg.torch_ops else ''}"
            f"{' +compile' if cfg.compile else ''} | {'n/a' if val is None else f'{val:.4f}'} "
            f"| {'yes' if result['target_reached'] else 'no'} | {result['steps_done']} "
            f"| {human_count(result['tokens_seen'])} | {result['train_time_s'] / 60:.2f} min "
            f"| {result['tokens_per_s']:,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} "
            f"| {env['commit'][:10]}{'-dirty' if env['dirty'] else ''} |")


def save_plot(out_dir: Path, result: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([s["step"] for s in result["steps"]], result["train_losses"], label="train", lw=0.8)
    if result["val"]:
        ax.plot([v["step"] for v in result["val"]], [v["loss"] for v in result["val"]], "o-", label="val")
    ax.axhline(result["target_val_loss"], color="gray", ls="--", lw=0.8, label="target")
    c = result["config"]
    ax.set(xlabel="step", ylabel="loss", title=f"{c['model']} ({c.get('recipe', 'gpt2')}) · {c['gpu']}")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    try:
        with atomic_file(path, "wb") as f:  # all or nothing, and a full disk is one line (WriteFailed)
            fig.savefig(f, dpi=120, format="png")
    finally:
        plt.close(fig)
    return str(path)
