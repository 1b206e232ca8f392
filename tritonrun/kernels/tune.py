"""Host-side autotuner for kernels whose grid and buffers depend on the config (triton.autotune cannot
size them): time each candidate config on the real inputs, keep the fastest, cache the pick on disk.

    tuner = Tuner("lce", __file__)
    cfg = tuner.pick(device, key, candidates, launch)   # launch(cfg) runs the op once with cfg

Used by tritonrun/kernels/cross_entropy.py (attention's configs only change its grid, so it uses triton.autotune; it
shares the CUDA-graph capture policy below, `pick_unless_capturing`).
Why tune on the user's GPU at all: the tables are compile-checked starting points, and the one GPU this
project is for (an RTX 4070) is not one its authors can time on; the pick made there is what runs there.

- When: the first call per (key, device) in a process, e.g. in the trainer's untimed warm-up. Each
  candidate runs once untimed (it compiles), then is timed with CUDA events (median over samples of
  back-to-back calls; time_ms). A candidate that cannot run here (OutOfResources: shared memory, registers;
  or a ptxas rejection) is skipped; one whose buffers do not fit in the memory left (a run near its cap) is
  skipped too, and then the pick is kept for this process only.
  Picks are cached in memory and in `<Triton cache dir>/tritonrun/<name>-<digest>.json` (digest: device
  name, compute capability, SM count, Triton and torch versions and the kernel file's bytes, so an edited
  kernel re-tunes), written atomically; later processes read them and time nothing.
- Not tuned (the table's config): TRITONRUN_AUTOTUNE=0 (pins every kernel's tiles, attention's too, so
  the summation order no longer depends on a timing) and the Triton interpreter. While a CUDA graph is
  captured nothing is timed: `pick_unless_capturing` reuses a pick made before the capture (`known()`; for
  attention's triton.autotune, a (T bucket, dtype) key it already tuned) or runs the table's config; both
  cross-entropy and attention go through it.
- `decisions()` lists what was picked in this process and how (measured, with every candidate's ms, or
  cached), for benchmark records; `picks()` gathers them from every kernel file.
A different pick changes only the summation order (last-bit differences); every candidate is tested for
correctness (tests/test_cross_entropy.py) and compile-checked for shared memory and spills.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

TUNE_REP_MS = 40  # timed per candidate: 3 to 25 runs of a 0.4-10 ms kernel


def autotune_enabled() -> bool:
    """False when TRITONRUN_AUTOTUNE=0 (every kernel then runs its table's config), or in the interpreter."""
    return os.environ.get("TRITONRUN_AUTOTUNE", "1") != "0" and os.environ.get("TRITON_INTERPRET") != "1"


def capturing(device: torch.device) -> bool:
    """A CUDA graph is being captured on the current stream: nothing may be timed (or synchronized)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def pick_unless_capturing(device: torch.device, known, table, tune: Callable[[], object]):
    """The CUDA-graph capture policy of every autotuned kernel here (cross-entropy's Tuner, attention's
    triton.autotune): `known`, a pick this process made before, is reused, so a captured graph replays what
    eager ran; while a graph is being captured and there is no pick yet, `table` (the config table's entry) runs,
    since timing would record the candidates' launches into the graph and synchronizing would break the capture;
    otherwise `tune()` times the candidates and returns the pick."""
    if known is not None:
        return known
    if capturing(device):
        return table
    return tune()


def cache_dir() -> Path:
    """`tritonrun/` in Triton's cache dir (triton.knobs.cache.dir: $TRITON_CACHE_DIR, else under $TRITON_HOME or
    ~/.triton), where Triton keeps its own autotune picks too."""
    try:
        from triton import knobs

        base = knobs.cache.dir
    except (ImportError, AttributeError):  # a Triton without knobs: its documented default
        base = os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"
    return Path(base) / "tritonrun"


def time_ms(fn: Callable[[], object]) -> float:
    """Median ms per call of fn on the current CUDA stream. One untimed call (it compiles) and one timed alone
    size a sample: k back-to-back calls between two CUDA events (k x the call >= ~2 ms), so the host's launch
    overhead hides behind the queued kernels; samples until TUNE_REP_MS have passed (3 to 25). CUDA events and
    nothing else: unlike triton.testing.do_bench it allocates no L2-flush buffer, so tuning inside a run that
    sits near its memory cap costs no memory beyond the candidate's own buffers (tests replace this function)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def sample(k: int) -> float:
        start.record()
        for _ in range(k):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)

    k = max(1, min(100, math.ceil(2.0 / max(sample(1), 1e-3))))
    times: list[float] = []
    while len(times) < 3 or (len(times) < 25 and sum(times) < TUNE_REP_MS):
        times.append(sample(k))
    return statistics.median(times) / k


def describe(device: torch.device) -> tuple:
    """(name, compute capability, SM count) of a CUDA device: what a pick on it is valid for."""
    props = torch.cuda.get_device_properties(device)
    return props.name, f"{props.major}.{props.minor}", props.multi_processor_count


def _key_text(key: tuple) -> str:
    return "/".join(str(k) for k in key)


def _does_not_fit(exc: BaseException) -> bool:
    """A candidate that cannot run on this GPU: too much shared memory or too many registers (OutOfResources),
    or code this arch's ptxas rejects; triton.autotune skips the same kinds."""
    kinds = []
    for module, name in (("triton.runtime.errors", "OutOfResources"), ("triton.runtime.errors", "PTXASError"),
                         ("triton.compiler.errors", "CompileTimeAssertionFailure")):
        try:
            kinds.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # not in every Triton version
            pass
    return isinstance(exc, tuple(kinds)) or "out of resource" in str(exc).lower()


@contextlib.contextmanager
def _compiled_kernels(out: list):
    """Collects the CompiledKernel of every Triton launch inside the block (JITFunction.run returns it)."""
    from triton.runtime.jit import JITFunction

    real = JITFunction.run

    def run(self, *args, **kwargs):
        kernel = real(self, *args, **kwargs)
        out.append(kernel)
        return kernel

    JITFunction.run = run
    try:
        yield out
    finally:
        JITFunction.run = real


def spills_of_first_launch(launch: Callable[[], object]) -> int:
    """Run `launch` once (it compiles) and return the spilled registers of the kernels it launched, read from the
    compiled kernels (n_spills, set when the binary is loaded for its first launch); 0 where Triton does not say."""
    kernels: list = []
    with _compiled_kernels(kernels):
        launch()
    return sum(int(getattr(k, "n_spills", 0) or 0) for k in kernels if k is not None)


class Tuner:
    def __init__(self, name: str, source_file: str):
        self.name = name
        self.source = Path(source_file)
        self._picks: dict[tuple, dict] = {}  # (device, key) -> config
        self._decisions: list[dict] = []

    def path(self, device: torch.device) -> Path:
        import triton

        digest = hashlib.sha256()
        for part in (*describe(device), triton.__version__, torch.__version__):
            digest.update(f"{part}\n".encode())
        digest.update(self.source.read_bytes())
        return cache_dir() / f"{self.name}-{digest.hexdigest()[:16]}.json"

    def _read(self, path: Path, quiet: bool = False) -> dict:
        try:
            data = json.loads(path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:  # a damaged cache only costs a re-tune
            if not quiet:
                print(f"warning: ignoring unreadable tuning cache {path} ({e}); re-tuning", file=sys.stderr)
            return {}

    def _write(self, path: Path, key_text: str, entry: dict) -> None:
        from tritonrun.runinfo import atomic_write_json

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            data = self._read(path, quiet=True)  # another process may have added keys since
            data[key_text] = entry
            atomic_write_json(path, data)
        except OSError as e:  # read-only cache dir: the pick still holds for this process
            print(f"warning: could not save the tuning cache {path} ({e}); later processes re-tune",
                  file=sys.stderr)

    def pick(self, device: torch.device, key: tuple, candidates: list[dict],
             launch: Callable[[dict], object]) -> dict:
        """The fastest of `candidates` for `key` on `device`: from memory, the disk cache, or by timing each
        with `launch(cfg)`. The caller checks autotune_enabled() first."""
        if (device, key) in self._picks:
            return self._picks[device, key]
        path, key_text = self.path(device), _key_text(key)
        entry = self._read(path).get(key_text)
        if isinstance(entry, dict) and entry.get("config") in candidates:
            how = "cached"
        else:
            how = "measured"
            ms, short_of_memory, spilled = [], False, []
            for cfg in candidates:
                try:
                    # a candidate that spills registers on this GPU (its ptxas, read from the compiled kernel) is
                    # dropped before it is timed: spills cost more than a timing of a few runs shows
                    if len(candidates) > 1 and spills_of_first_launch(lambda cfg=cfg: launch(cfg)) > 0:
                        spilled.append(cfg)
                        ms.append(math.inf)
                        continue
                    ms.append(time_ms(lambda cfg=cfg: launch(cfg)))
                except torch.OutOfMemoryError:  # its buffers did not fit beside the caller's: skipped, and
                    short_of_memory = True  # the pick is not saved (with more memory free it might win)
                    ms.append(math.inf)
                except Exception as e:  # noqa: BLE001 - only "does not fit" is skipped; anything else raises
                    if not _does_not_fit(e):
                        raise
                    ms.append(math.inf)
            best = min(range(len(candidates)), key=ms.__getitem__)
            if math.isinf(ms[best]) and short_of_memory:  # an OOM, for callers that handle OOMs (a smaller
                raise torch.OutOfMemoryError(  # micro-batch, the trainer's one-line error, bench's fits=false)
                    f"{self.name}: no candidate config fits in the free device memory for {key_text}; HINT: "
                    "lower --micro-batch, or free memory")
            if math.isinf(ms[best]) and len(spilled) == len(candidates):  # all spill: the least bad is timed
                ms = [time_ms(lambda cfg=cfg: launch(cfg)) for cfg in candidates]
                best, spilled = min(range(len(candidates)), key=ms.__getitem__), []
            if math.isinf(ms[best]):
                raise RuntimeError(f"{self.name}: no candidate config fits this GPU for {key_text} "
                                   "(each ran out of shared memory, registers or device memory); HINT: "
                                   "TRITONRUN_AUTOTUNE=0 runs the table's config, or free memory")
            entry = copy.deepcopy({"config": candidates[best], "candidates": candidates})  # not the live tables
            entry["ms"] = [None if math.isinf(t) else round(t, 4) for t in ms]
            if spilled:
                entry["spilled"] = copy.deepcopy(spilled)  # dropped before timing
            if short_of_memory:
                how = "measured (not saved: a candidate ran out of device memory)"
            else:
                self._write(path, key_text, entry)
        self._picks[device, key] = entry["config"]
        self._decisions.append({"key": key_text, "how": how, **entry})
        return entry["config"]

    def known(self, device: torch.device, key: tuple) -> dict | None:
        """The pick for `key` this process already made (or read), else None; times and reads nothing."""
        return self._picks.get((device, key))

    def decisions(self) -> list[dict]:
        return copy.deepcopy(self._decisions)

    def forget(self) -> None:
        """Drop the in-memory picks (tests; the disk cache stays)."""
        self._picks.clear()
        self._decisions.clear()


def picks() -> dict[str, list[dict]]:
    """Every autotuner pick this process made, per kernel file (only those already imported), for records."""
    out = {}
    for name in ("attention", "cross_entropy"):
        module = sys.modules.get(f"{__package__}.{name}")  # tritonrun.kernels.<name>
        decisions = module.tuning_decisions() if module is not None else []
        if decisions:
            out[name] = decisions
    return out


def ce_tiles(c: dict) -> str:
    """A cross-entropy config as BLOCK_NxBLOCK_VxBLOCK_K[xBLOCK_C]/w<warps>s<stages>."""
    tiles = "x".join(str(c[k]) for k in ("BLOCK_N", "BLOCK_V", "BLOCK_K", "BLOCK_C") if k in c)
    return f"{tiles}/w{c['num_warps']}s{c['num_stages']}"


def summary(picks_: dict[str, list[dict]]) -> str:
    """One line for logs: each pick as kernel[key]=tiles (how)."""
    items = []
    for d in picks_.get("attention", []):
        items.append(f"attention.{d['kernel']}[D={d['D']}]={'x'.join(map(str, d['config'][:2]))}"
                     f"/w{d['config'][2]}s{d['config'][3]}")
    for d in picks_.get("cross_entropy", []):
        items.append(f"cross_entropy.{d['key']}={ce_tiles(d['config'])} ({d['how'].split()[0]})")
    return ", ".join(items)
