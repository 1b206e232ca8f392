"""The GPU the kernels' fake (shape-only) implementations plan for when the real one is absent.

bench/memory.py estimates a training step's peak memory on a machine without a GPU: the real model and optimizer
run under FakeTensorMode, so no Triton kernel launches and each op's `register_fake` decides what is allocated.
The real launchers size their scratch from the device (SM count, arch config table); inside `planning_for(...)`
the fakes size it for the named GPU instead, through the same sizing helpers the launchers call. Outside it (a
real GPU, torch.compile tracing there) the fakes ask the device, as the launchers do.
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass


def arch_key(capability: tuple[int, int]) -> str:
    """Map a CUDA compute capability to a config table: sm_80 (A100), sm_90 (H100/H200), sm_89 for
    everything else (Ada, consumer Ampere, Blackwell): its 101,376 B shared-memory budget is the
    smallest of any part since sm_80, so its configs fit wherever they are used (untuned there)."""
    major, minor = capability
    if (major, minor) == (8, 0):
        return "sm_80"
    if major == 9:
        return "sm_90"
    return "sm_89"


def interpreting() -> bool:
    """Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1: the CPU tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=None)
def device_arch(device) -> str:
    """A kernel file's config-table key for the tensors' device: "interpreter" on CPU or under the interpreter, else
    "sm_XY" of the GPU (each file maps keys it has no entry for to its "default")."""
    if device.type != "cuda" or interpreting():
        return "interpreter"
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def capability_of(arch: str) -> tuple[int, int]:
    """"sm_86" -> (8, 6)."""
    digits = arch.removeprefix("sm_")
    return int(digits[:-1]), int(digits[-1])


@dataclass(frozen=True)
class Target:
    name: str  # e.g. "rtx4070"
    arch: str  # the kernels' config-table key: "sm_80", "sm_89", "sm_90"
    sm_count: int  # streaming multiprocessors: persistent grids and their scratch scale with it


_current: Target | None = None


def planned() -> Target | None:
    """The GPU the fakes plan for, or None: then they use the tensors' own device."""
    return _current


@contextlib.contextmanager
def planning_for(target: Target):
    """Within this block the kernels' fake implementations size their scratch for `target`."""
    global _current
    saved, _current = _current, target
    try:
        yield target
    finally:
        _current = saved
