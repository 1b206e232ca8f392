"""The GPU the kernels' fake (shape-only) implementations plan for when the real one is absent.

bench/memory.py estimates a training step's peak memory on a machine without a GPU: the real model and optimizer
run under FakeTensorMode, so no Triton kernel launches and each op's `register_fake` decides what is allocated.
The real launchers size their scratch from the device (SM count, arch config table); inside `planning_for(...)`
the fakes size it for the named GPU instead, through the same sizing helpers the launchers call. Outside it (a
real GPU, torch.compile tracing there) the fakes ask the device, as the launchers do.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass


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
