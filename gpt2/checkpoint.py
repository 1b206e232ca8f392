"""Training checkpoints: one torch.save file per step, written atomically, newest K kept.

File `ckpt_<step:08d>.pt` in the run's out dir holds a dict:
  format "tritonrun.checkpoint", version 1,
  model_config   GPTConfig as a dict (enough to rebuild the model without the run config),
  model          model state_dict (fp32 master weights),
  optimizer, rng, data, step, train_time_s, run_config, result  (training state; see train_speedrun.py)
A checkpoint is complete once its final name exists: it is written to a temp file in the same
directory, fsynced, then renamed, so a kill at any moment leaves the previous one loadable.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from gpt2.config import GPTConfig
from gpt2.model import GPT
from runinfo import atomic_file

FORMAT = "tritonrun.checkpoint"
VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not ours; str is one line naming the file."""


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temp files are never matched)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _NAME.match(p.name))


def save_checkpoint(out_dir: Path, step: int, state: dict, keep: int = 0) -> Path:
    """Atomically write `state` (plus format fields) as step's checkpoint; keep the newest `keep` (0 = all)."""
    out_dir = Path(out_dir)
    path = checkpoint_path(out_dir, step)
    for stale in out_dir.glob(".ckpt_*.pt.*.tmp"):  # left by a writer killed mid-save (one writer per dir)
        stale.unlink(missing_ok=True)
    with atomic_file(path, "wb") as f:
        torch.save({"format": FORMAT, "version": VERSION, "step": step, **state}, f)
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated / not a torch file
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a tritonrun checkpoint")
    if ckpt.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {ckpt.get('version')} not supported (expected {VERSION})")
    return ckpt


def read_model_config(path: Path) -> GPTConfig:
    """The GPTConfig stored in a checkpoint, without reading its tensors (torch.load with mmap)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        return GPTConfig(**ckpt["model_config"])
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as e:  # truncated / not a torch file / not ours
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def resolve_checkpoint(path) -> Path:
    """A checkpoint file as given, or the newest complete checkpoint in a run directory."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoints (ckpt_XXXXXXXX.pt) in this run directory")
        return found
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file or run directory")
    return path


def load_model(path: Path, device="cpu", ops=None) -> GPT:
    """Rebuild the GPT stored in a checkpoint (weights only), on `device`, in eval mode."""
    ckpt = load_checkpoint(path, map_location="cpu")
    model = GPT(GPTConfig(**ckpt["model_config"]), ops)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval()
