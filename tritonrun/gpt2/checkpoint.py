"""Training checkpoints: one torch.save file per step, written atomically, newest K kept.

File `ckpt_<step:08d>.pt` in the run's out dir holds a dict:
  format "tritonrun.checkpoint", version 1,
  model_kind     "gpt2" (GPT, tritonrun/gpt2/model.py), "speedrun" (SpeedrunGPT, tritonrun/gpt2/speedrun.py: the
                 2024-12-17 windowed model) or "speedrun-dense" (SpeedrunGPT, the 2024-11-10 dense model); absent means
                 "gpt2" (every checkpoint written before the speedrun recipe). "speedrun" with a config that has no
                 "attention" field was written when --recipe speedrun was the 11-10 model: it reads as "speedrun-dense",
  model_config   the model's config as a dict (GPTConfig / SpeedrunConfig.to_dict(): enough to rebuild the
                 model without the run config; build_model_from_config(kind, config, ops) does),
  model          model state_dict (fp32 master weights),
  optimizer, rng, data, step, train_time_s, run_config, result  (training state; see train_speedrun.py)
A checkpoint is complete once its final name exists: it is written to a temp file in the same
directory, fsynced, then renamed, so a kill at any moment leaves the previous one loadable.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.model import GPT
from tritonrun.gpt2.speedrun import SpeedrunConfig, SpeedrunGPT
from tritonrun.runinfo import atomic_file

FORMAT = "tritonrun.checkpoint"
VERSION = 1
MODEL_KINDS = ("gpt2", "speedrun", "speedrun-dense")  # the checkpoint's "model_kind"; absent = "gpt2"
# kinds the trainer writes whose models only train (--resume, --init-from ckpt:): their forward takes the training
# schedule's inputs, which sampling, HellaSwag and export do not build
TRAIN_ONLY_KINDS = ("record89",)
SPEEDRUN_KINDS = ("speedrun", "speedrun-dense")
_NAME = re.compile(r"^ckpt_(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not ours; str is one line naming the file."""


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def checkpoint_step(path: Path) -> int:
    """The step a checkpoint file's name records (ckpt_<step:08d>.pt)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path}: not a checkpoint file name (ckpt_<step>.pt)")
    return int(m.group(1))


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (temp files are never matched)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(p for p in out_dir.iterdir() if _NAME.match(p.name))


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nested state (each storage once): a checkpoint's size less a few kB of pickle."""
    seen: dict[tuple, int] = {}

    def walk(o):
        if isinstance(o, torch.Tensor):
            st = o.untyped_storage()
            seen[(o.device.type, st.data_ptr())] = st.nbytes()
        elif isinstance(o, dict):
            for v in o.values():
                walk(v)
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)

    walk(obj)
    return sum(seen.values())


def save_checkpoint(out_dir: Path, step: int, state: dict, keep: int = 0, fix: str | None = None) -> Path:
    """Atomically write `state` (plus format fields) as step's checkpoint; keep the newest `keep` (0 = all).
    A disk that will not take it raises WriteFailed (its size, the free space, `fix`); the older ones stay."""
    out_dir = Path(out_dir)
    path = checkpoint_path(out_dir, step)
    for stale in out_dir.glob(".ckpt_*.pt.*.tmp"):  # left by a writer killed mid-save (one writer per dir)
        stale.unlink(missing_ok=True)
    with atomic_file(path, "wb", needed=tensor_bytes(state), fix=fix) as f:
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


def read_model_config(path: Path) -> GPTConfig | SpeedrunConfig:
    """The model config stored in a checkpoint (GPTConfig, or SpeedrunConfig for either speedrun kind), without
    reading its tensors (torch.load with mmap)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        if checkpoint_model_kind(ckpt) in SPEEDRUN_KINDS:
            return SpeedrunConfig.from_dict(ckpt["model_config"])
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


def model_kind_of(model) -> str:
    """The "model_kind" a checkpoint of `model` records: "speedrun" / "speedrun-dense" for a SpeedrunGPT (by its
    config), "gpt2" for a GPT."""
    if isinstance(model, SpeedrunGPT):
        return model.config.recipe
    if isinstance(model, GPT):
        return "gpt2"
    raise TypeError(f"not a tritonrun model: {type(model).__name__}")


def build_model_from_config(kind: str, config: dict, ops=None) -> GPT | SpeedrunGPT:
    """A freshly initialized model of `kind` ("gpt2" or "speedrun") from its config dict (a checkpoint's
    model_config, a JSON round trip of it included), its ops from gpt2.ops.get_ops (None: torch). ValueError
    with one line for an unknown kind or a config that does not fit the kind's dataclass."""
    if kind in TRAIN_ONLY_KINDS:
        raise ValueError(f"a {kind} model: sampling, HellaSwag and export do not take it yet (its forward needs the "
                         f"training schedule's windows and rotary tables); it trains on with --resume or --init-from "
                         f"ckpt:")
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(MODEL_KINDS)})")
    speedrun = kind in SPEEDRUN_KINDS
    config_cls = SpeedrunConfig if speedrun else GPTConfig
    try:
        cfg = SpeedrunConfig.from_dict(config) if speedrun else GPTConfig(**config)
    except TypeError as e:  # a missing or unknown field: e.g. a speedrun config labelled gpt2
        raise ValueError(f"model_config does not fit {config_cls.__name__} (model kind {kind!r}): {e}") from None
    if speedrun and cfg.recipe != kind:
        raise ValueError(f"model_config is a {cfg.recipe} model, not the model kind {kind!r}")
    return SpeedrunGPT(cfg, ops) if speedrun else GPT(cfg, ops)


def checkpoint_model_kind(ckpt: dict) -> str:
    """A loaded checkpoint's model kind ("gpt2" when the key is absent: written before the speedrun recipe;
    "speedrun-dense" for a "speedrun" one whose config has no "attention": the 11-10 model, written before the
    2024-12-17 recipe took the name)."""
    kind = ckpt.get("model_kind", "gpt2")
    if kind == "speedrun" and isinstance(ckpt.get("model_config"), dict) and "attention" not in ckpt["model_config"]:
        return "speedrun-dense"
    return kind


def model_from_checkpoint(ckpt: dict, path: Path | str = "checkpoint", ops=None) -> GPT | SpeedrunGPT:
    """The model a loaded checkpoint dict holds (GPT or SpeedrunGPT, by its model_kind), weights loaded, on the
    CPU. CheckpointError naming `path` when the kind, config or weights do not fit."""
    kind = checkpoint_model_kind(ckpt)
    try:
        model = build_model_from_config(kind, ckpt["model_config"], ops)
        model.load_state_dict(ckpt["model"])
    except KeyError as e:
        raise CheckpointError(f"{path}: no {e.args[0]!r} in this checkpoint") from None
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    except RuntimeError as e:  # load_state_dict: a header line, then the missing / unexpected keys and shapes
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path}: weights do not fit the {kind} model its model_config describes "
                              f"({lines[1] if len(lines) > 1 else lines[0]})") from None
    return model


def load_model(path: Path, device="cpu", ops=None) -> GPT | SpeedrunGPT:
    """Rebuild the model stored in a checkpoint (weights only): a GPT, or a SpeedrunGPT for a checkpoint with
    model_kind "speedrun"; on `device`, in eval mode."""
    model = model_from_checkpoint(load_checkpoint(path, map_location="cpu"), path, ops)
    return model.to(device).eval()
