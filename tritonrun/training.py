"""The training loop behind train_speedrun.py: a Trainer (one optimizer step at a time) and a run in phases (set
up, warm up, train, finish; validation, HellaSwag and checkpoints between steps).

`run(cfg, out_dir, ...)` trains one run described by a resolved config (tritonrun/train.py Config). The recipe
(cfg.recipe, tritonrun/recipes/) builds the model, optimizer, schedule and data loaders; the loop asks it and never
tests which recipe it has. Run bookkeeping on disk (result record, leaderboard row, plot) is tritonrun/runs.py's;
presets, run defaults and flags are tritonrun/presets.py's, tritonrun/defaults.py's and tritonrun/train.py's.

- Clock: only training steps are timed. Validation, checkpoint writes and the untimed warm-up (real
  steps, then weights, optimizer, RNG and data position restored) are outside it.
- Checkpoints (tritonrun/gpt2/checkpoint.py): every --checkpoint-every steps, on SIGINT/SIGTERM (at a step
  boundary) and at the end of every finished run (so its weights are there for sample.py, --init-from
  ckpt: and export); they hold everything needed to continue bit for bit on the same device, and name the model
  ("model_kind") beside its config, so --resume and --init-from ckpt: rebuild the right class.
- Bad data: a shard with a token id outside the vocabulary is refused when the loader opens it
  (tritonrun/data/loader.py); met mid-run, the run checkpoints at the step boundary before it and stops.
- Records: a leaderboard row only for a finished run (max steps or target reached); an interrupted
  one says how to continue instead.
- Bad steps: a non-finite loss or grad norm skips the update; more than --max-bad-steps in a row stop
  the run (the last good checkpoint stays).
- DDP under torchrun: each rank runs grad_accum / world_size micro-batches per step; rank r takes the
  r-th of every world_size consecutive micro-batches (tritonrun/data/loader.py), so the step sees the same tokens
  as a single process. Rank 0 writes logs, records and checkpoints. A single process never touches
  torch.distributed.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import asdict, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from tritonrun.data.shards import ShardError
from tritonrun.errors import InitError, TrainingStopped, WriteFailed  # noqa: F401  (InitError: what build_model raises)
from tritonrun.gpt2.checkpoint import (checkpoint_step, latest_checkpoint, load_checkpoint, save_checkpoint,
                                       tensor_bytes)
from tritonrun.gpt2.ops import configure_flex, get_ops, load_triton_op, parse_op_list, torch_window_attention
from tritonrun.kernels import tune
from tritonrun.presets import mfu_peak_info
from tritonrun.recipes import get_recipe
from tritonrun.runinfo import (atomic_write_json, atomic_write_text, disk_error, env_info, free_bytes, human_bytes,
                               write_failed)
from tritonrun.runs import LEADERBOARD_HEADER, leaderboard_row, new_result, save_plot


# --------------------------------------------------------------------------------- distributed
class Dist:
    """Process-group facts; a plain single-process run has world_size 1 and never calls torch.distributed."""

    def __init__(self, device_kind: str):
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            import torch.distributed as dist

            self.rank, self.world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
            if device_kind == "cuda":
                torch.cuda.set_device(self.local_rank)
            if self.world_size > 1 and not dist.is_initialized():
                dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
        self.device = torch.device(f"cuda:{self.local_rank}" if device_kind == "cuda" else "cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def master(self) -> bool:
        return self.rank == 0

    def all_mean(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            t /= self.world_size
        return t

    def any(self, flag: bool) -> bool:
        if not self.enabled:
            return flag
        import torch.distributed as dist

        t = torch.full((1,), 1.0 if flag else 0.0, device=self.device)  # filled on the device: no host copy
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self, finished: bool = False) -> None:
        """Destroy the process group; after a run every rank finished, behind a barrier, so that no rank tears
        its connections down while rank 0 is still writing records and may yet use them. (Without it, a CPU
        test once saw rank 1 abort in teardown under torch 2.11, "terminate called without an active
        exception", while rank 0 plotted; not reproduced in 40 reruns, so the barrier is a precaution.)"""
        if self.enabled:
            import torch.distributed as dist

            if dist.is_initialized():
                if finished:
                    dist.barrier()
                dist.destroy_process_group()


# -------------------------------------------------------------------------------------- output
class RunLog:
    """train.log plus the terminal: a progress bar on a tty, plain lines otherwise. Silent off rank 0."""

    def __init__(self, path: Path | None, total_steps: int, initial: int = 0, append: bool = False):
        self.path = path
        try:
            self.file = open(path, "a" if append else "w", buffering=1) if path is not None else None
        except OSError as e:
            self._failed(e)
        self.bar = None
        if self.file is not None and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def _failed(self, e: OSError):
        """A train.log write the disk refused: WriteFailed (one line); other OSErrors as they are."""
        disk = disk_error(e)
        if disk is None:
            raise e
        raise write_failed(self.path, disk, fix="free space there, or pick an --out-dir on another disk")

    def _write(self, text: str) -> None:
        try:
            self.file.write(text + "\n")
        except OSError as e:
            self._failed(e)

    def line(self, text: str) -> None:
        if self.file is None:
            return
        self._write(text)
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, text: str, postfix: str) -> None:
        if self.bar is None:
            self.line(text)
            return
        self._write(text)
        self.bar.update(1)
        self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            with contextlib.suppress(OSError):  # a full disk: the error that ended the run was already raised
                self.file.close()


def config_table(cfg, extra: dict) -> str:
    rows = [(f.name, getattr(cfg, f.name)) for f in fields(cfg)] + list(extra.items())
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (process RSS)


def peak_reserved_gib(device: torch.device) -> float | None:
    """The CUDA caching allocator's peak reserved memory (what the card must hold: allocated + cached blocks +
    fragmentation); None off CUDA."""
    return torch.cuda.max_memory_reserved(device) / 2**30 if device.type == "cuda" else None


# The CUDA context (and what else the driver maps outside PyTorch's allocator): 0.3-0.5 GiB on current cards;
# the high end is taken. A card of M GiB fits a run whose peak RESERVED memory plus this stays within M.
CUDA_CONTEXT_GIB = 0.5


def allocator_fraction(memory_gib: float, total_bytes: int) -> float:
    """set_per_process_memory_fraction for a memory budget (--memory-gib) on a card of total_bytes: the budget
    minus the context allowance, as a share of the card (1.0 without a budget). The fraction bounds only
    PyTorch's allocator, so the context must come off it for a capped run to OOM where the real card would."""
    if not memory_gib:
        return 1.0
    return max(0.0, min(1.0, (memory_gib - CUDA_CONTEXT_GIB) * 2**30 / total_bytes))


RUNAWAY_NATS = 5.0  # a loss this far above max(ln(vocab), the first loss) is a diverged run, not noise


def is_resource_error(e: BaseException) -> bool:
    """Triton's OutOfResources (shared memory, registers), raised directly or wrapped by Inductor's compile."""
    seen = 0
    while e is not None and seen < 8:
        if type(e).__name__ == "OutOfResources" or "out of resource" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def dynamo_compiles() -> int:
    """Graphs torch.compile (Dynamo) has compiled in this process so far: a change across a step counts the
    (re)compiles inside it."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def memory_fit(peak_reserved: float, memory_gib: float, total_gib: float) -> dict:
    """Whether a run whose peak reserved memory is `peak_reserved` GiB fits a card of `memory_gib` (the budget,
    e.g. rtx4070's 12; the smaller of it and the running card's total): reserved + CUDA_CONTEXT_GIB <= card."""
    card = min(memory_gib, total_gib) if memory_gib else total_gib
    need = peak_reserved + CUDA_CONTEXT_GIB
    return {"rule": "peak reserved + context allowance <= card memory", "card_gib": card,
            "context_allowance_gib": CUDA_CONTEXT_GIB, "peak_reserved_gib": peak_reserved, "needed_gib": need,
            "headroom_gib": card - need, "fits": need <= card}


# ------------------------------------------------------------------------------------ training
class Trainer:
    """One model, its optimizer, schedule and data, as the run's recipe (tritonrun/recipes/) builds them; one
    optimizer step at a time."""

    def __init__(self, cfg, train_files, val_file, dist: Dist):
        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.recipe = get_recipe(cfg.recipe)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            # The cap is process-wide allocator state: set it either way, so a Trainer without one built after a
            # capped one in the same process (bench/train.py builds many) is not left capped.
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(allocator_fraction(cfg.memory_gib, total), self.device)
        B, T, W = cfg.micro_batch, cfg.seq_len, dist.world_size
        # The loaders first: they validate every shard header, so a bad file fails before the model is built.
        self.train_loader, self.val_loader = self.recipe.loaders(cfg, train_files, val_file, self.device,
                                                                 dist.rank, W)
        torch.manual_seed(cfg.seed)
        self.ops = get_ops(cfg.backend, self.device, parse_op_list(cfg.torch_ops))
        configure_flex(self.device)  # FlexAttention's tiles for this GPU's shared memory (before compile traces)
        # Built on the CPU (same initial weights on every device and rank), then moved.
        self.model = self.recipe.build_model(cfg, self.ops).to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.ddp = None
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                self.forward, device_ids=[dist.local_rank] if self.device.type == "cuda" else None,
                broadcast_buffers=self.recipe.ddp_broadcast_buffers)
            self.forward = self.ddp
        self.params = list(self.model.parameters())
        self.optimizer = self.recipe.build_optimizer(self.model, self.ops, cfg)
        self.schedule = self.recipe.schedule(cfg, self.model)
        self.last_schedule: dict = {}  # what the last step's schedule set (lr, and the recipe's others)
        self.grad_accum = cfg.total_batch_tokens // (B * T * W)  # micro-batches per rank per step
        self.val_steps = cfg.val_tokens // (B * T * W)  # per rank
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                         if cfg.dtype == "bf16" and self.recipe.autocast else contextlib.nullcontext())
        self.flops_per_token = self.recipe.flops_per_token(self.model, cfg)
        self.op_names = self.recipe.op_names  # the ops this model calls
        self.tried_paths: set[str] = set()  # window attention's fallbacks so far (fall_back_window_attention)
        self._cumulative = [0]  # tokens_through's memo

    def step_tokens(self, step: int) -> int:
        """Training tokens of 0-based `step`, all ranks: total_batch_tokens, or a staged recipe's stage batch."""
        cfg = self.cfg
        return (self.schedule.micro_batches(step, self.grad_accum) * cfg.micro_batch * cfg.seq_len
                * self.dist.world_size)

    def tokens_through(self, steps: int) -> int:
        """Training tokens of the first `steps` steps."""
        while len(self._cumulative) <= steps:
            self._cumulative.append(self._cumulative[-1] + self.step_tokens(len(self._cumulative) - 1))
        return self._cumulative[steps]

    def _inputs(self, loader, window: int | None) -> tuple:
        """The model's arguments for the next micro-batch: (x, y), or a packed recipe's (x, y, cu_seqlens, window)."""
        batch = loader.next_batch()
        return batch if window is None else (*batch, window)

    def train_step(self, step: int) -> tuple[float, float, float, bool]:
        """One optimizer step: (loss, grad norm, lr, applied). A non-finite loss or norm skips the update."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        # The windowed model's window for this step: a Python int (under --compile one recompile at its first
        # change, then a symbolic int: see SpeedrunGPT.hidden).
        window = self.schedule.window(step)
        # A staged recipe's batch: its micro-batches this step, the loader told the stage, the record's gradient scale
        n = self.schedule.micro_batches(step, self.grad_accum)
        self.schedule.begin_step(step, self.train_loader)
        scale = self.schedule.grad_scale(step, n * cfg.micro_batch * cfg.seq_len * self.dist.world_size)
        for micro in range(n):
            args = self._inputs(self.train_loader, window)
            if self.ddp is not None:  # all-reduce grads only on the last micro-batch
                self.ddp.require_backward_grad_sync = micro == n - 1
            with self.autocast:
                loss = self.forward(*args) / n
            (loss if scale == 1.0 else loss * scale).backward()
            loss_sum += loss.detach()
        self.dist.all_mean(loss_sum)
        if cfg.grad_clip > 0 and hasattr(self.optimizer, "clip_grad_norm_"):
            norm = self.optimizer.clip_grad_norm_(cfg.grad_clip)  # fused: the scale is applied inside step()
        elif cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params
                                                         if p.grad is not None]))
        self.last_schedule = self.schedule.apply(self.optimizer, step)  # every group's lr (and the recipe's others)
        loss_v, norm_v = torch.stack([loss_sum, norm.float()]).tolist()  # one host sync for both
        applied = math.isfinite(loss_v) and math.isfinite(norm_v)
        if applied:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_v, norm_v, self.last_schedule["lr"], applied

    def window_attention_path(self) -> str:
        """Which window attention runs: "triton" (the kernel), "flex" (FlexAttention: torch under --compile on
        CUDA), "flex-small" (its fallback tiles) or "dense" (torch's SDPA with the dense mask)."""
        if self.ops.placement.get("window_attention", "torch").startswith("triton"):
            return "triton"
        if self.device.type == "cuda" and self.cfg.compile:
            return "flex-small" if "flex-small" in self.tried_paths else "flex"
        return "dense"

    def fall_back_window_attention(self) -> str | None:
        """After an out-of-resources failure: the next window-attention path (FlexAttention -> FlexAttention with
        smaller tiles -> the Triton kernel; the kernel -> torch's), switched in place (the model calls the same
        Ops), compiled graphs dropped. Returns what it switched to, or None when nothing is left to try."""
        path = self.window_attention_path()
        if path == "triton":
            self.tried_paths.add("triton")  # the kernel failed: never back to it
        if path == "flex":
            configure_flex(self.device, shrink=1)
            to, key = "FlexAttention with smaller tiles", "flex-small"
        elif path in ("flex", "flex-small", "dense") and "triton" not in self.tried_paths:
            try:
                self.ops.window_attention = load_triton_op("window_attention")
            except RuntimeError:  # no GPU and no interpreter: nothing left to try
                return None
            self.ops.placement["window_attention"] = "triton (fallback)"
            to, key = "the Triton window_attention kernel", "triton"
        elif path == "triton" and "torch" not in self.tried_paths:
            self.ops.window_attention = torch_window_attention
            self.ops.placement["window_attention"] = "torch (fallback)"
            to, key = "torch's window attention (FlexAttention under --compile on CUDA)", "torch"
        else:
            return None
        self.tried_paths.add(key)
        torch._dynamo.reset()  # the compiled graphs captured the old path
        return to

    @torch.no_grad()
    def evaluate(self, step: int = 0) -> float:
        """Mean val loss over the first val_tokens tokens; the windowed model with the window of the schedule after
        `step` steps (as the record validates), its documents masked as in training."""
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        window = self.schedule.window(step)
        for _ in range(self.val_steps):
            with self.autocast:
                total += self.forward(*self._inputs(self.val_loader, window)).float()
        self.model.train()
        return self.dist.all_mean(total / self.val_steps).item()

    def hellaswag(self, examples) -> dict:
        """acc / acc_norm over `examples`, split across ranks (uncompiled model: rows vary in length)."""
        from tritonrun.data.hellaswag import evaluate

        mine = examples[self.dist.rank :: self.dist.world_size]
        r = evaluate(self.model, mine, self.device, autocast=self.autocast)
        counts = torch.tensor([r["acc"] * r["n"], r["acc_norm"] * r["n"], r["n"]], dtype=torch.float64,
                              device=self.device)
        if self.dist.enabled:
            import torch.distributed as dist

            dist.all_reduce(counts)
        acc, acc_norm, n = counts.tolist()
        return {"acc": acc / n, "acc_norm": acc_norm / n, "n": int(round(n))}

    def rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
                # this device's generator only: a resume may see a different number of GPUs
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    def set_rng_state(self, s: dict) -> None:
        torch.set_rng_state(s["torch"])
        random.setstate(s["python"])
        np.random.set_state(s["numpy"])
        if s.get("cuda") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(s["cuda"], self.device)

    def state(self) -> dict:
        """Everything that determines the next steps (tensors are references: copy before mutating)."""
        return {"model_kind": self.recipe.model_kind, "model_config": self.model.config.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "data": self.train_loader.state_dict(),
                "rng": self.rng_state(), "schedule": dict(self.last_schedule)}

    def load_state(self, s: dict) -> None:
        self.model.load_state_dict(s["model"])
        self.optimizer.load_state_dict(s["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.train_loader.load_state_dict(s["data"])
        self.set_rng_state(s["rng"])
        # what the last step set (lr, momentum, window): recomputed from the step by the next one; kept for the log
        self.last_schedule = dict(s.get("schedule", {}))

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _host_copy(obj):
    """Deep copy with every tensor moved to host memory (optimizer/model state for the warm-up restore)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return copy.deepcopy(obj)


def checkpoint_bytes(trainer) -> int:
    """A checkpoint's size before the optimizer has state: the model's tensors plus the optimizer state its step
    will create, per param: Adam 2 fp32 moments (+ an fp32 master for a low-precision param, FusedAdamW),
    Muon/SGD/NorMuon 1 momentum in the param's dtype (NorMuon's fp32 momentum, mantissa and second moment are more:
    an estimate below the truth until the state exists). Exact once the state exists (a resumed run)."""
    model = tensor_bytes(trainer.model.state_dict())
    opt = trainer.optimizer
    parts = [getattr(opt, name, None) for name in ("adam", "muon", "normuon")]
    optimizers = [o for o in parts if o is not None] or [opt]
    state = 0
    for o in optimizers:
        held = o.state_dict()["state"]
        if held:
            state += tensor_bytes(held)
            continue
        for g in o.param_groups:
            for p in g["params"]:
                if "betas" in g:
                    state += 8 * p.numel() + (4 * p.numel() if p.dtype != torch.float32 else 0)
                else:
                    state += p.numel() * p.element_size()
    return model + state


class StopSignals:
    """SIGINT/SIGTERM ask for a checkpoint at the next step boundary; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


# ------------------------------------------------------------------------------------ the run, in phases
def run(cfg, out_dir: Path, train_files: list[Path], val_file: Path, resume_from: Path | None = None,
        eval_only: bool = False, sizing: dict | None = None) -> dict:
    """Train; returns the result record (also written to out_dir/result.json on rank 0). `sizing`: how the CLI
    sized the batch for the card (tritonrun/train.py size_batch), logged and recorded."""
    dist = Dist(cfg.device)
    finished = False
    try:
        env = env_info(dist.device)
        log = RunLog(out_dir / "train.log" if dist.master else None, cfg.max_steps, append=resume_from is not None)
        try:
            phases = TrainingRun(cfg, out_dir, env, log, dist, sizing)
            result = phases.execute(train_files, val_file, resume_from, eval_only)
            finished = True
            return result
        finally:
            log.close()
    finally:
        dist.close(finished)


class TrainingRun:
    """One run's phases: set up, (evaluate only,) warm up, train, finish; evaluation, HellaSwag, checkpoints and
    record writes between steps. Rank 0 writes; every rank computes."""

    def __init__(self, cfg, out_dir: Path, env: dict, log: RunLog, dist: Dist, sizing: dict | None = None):
        self.cfg, self.out_dir, self.env, self.log, self.dist = cfg, out_dir, env, log, dist
        self.sizing = sizing
        self.result_path = out_dir / "result.json"
        self.start_step, self.train_time = 0, 0.0
        self.hellaswag_examples = None
        self.total_gib = None  # the CUDA card's memory, for memory_fit
        self.trainer: Trainer | None = None
        self.result: dict = {}

    def execute(self, train_files, val_file, resume_from, eval_only: bool) -> dict:
        try:
            self.set_up(train_files, val_file, resume_from)
            self.load_hellaswag(eval_only)
            if eval_only:  # score the starting weights (--init-from or a checkpoint) without training
                return self.evaluate_only()
            self.check_free_space()
            self.warm_up()
            stopped_by, signal_received = self.train()
            return self.finish(stopped_by, signal_received)
        except BaseException as e:
            self.record_failure(e)
            raise

    def record_failure(self, e: BaseException) -> None:
        """A run that ends by an exception leaves a record that says so, never "running" (nor "max_steps" for a
        run whose final checkpoint failed): status write_failed / out_of_memory / interrupted / crashed, unless a
        stop already named one (diverged, bad_data), plus the error's first line. Best effort: a disk that took
        nothing keeps the last record written."""
        if not self.result or not self.dist.master:
            return
        if isinstance(e, WriteFailed):
            status = "write_failed"
        elif isinstance(e, torch.OutOfMemoryError):
            status = "out_of_memory"
        elif isinstance(e, KeyboardInterrupt):
            status = "interrupted"
        elif isinstance(e, TrainingStopped) and self.result.get("status") not in ("running", None):
            status = self.result["status"]
        else:
            status = "crashed"
        text = str(e).strip().splitlines()[0][:500] if str(e).strip() else type(e).__name__
        self.result.update(status=status, error=f"{type(e).__name__}: {text}", leaderboard_row=None)
        with contextlib.suppress(Exception):
            atomic_write_json(self.result_path, self.result)
        if status != "interrupted":
            with contextlib.suppress(OSError):  # a finished-looking leaderboard row must not outlive the failure
                (self.out_dir / "leaderboard.md").unlink(missing_ok=True)

    # ---------------------------------------------------------------------------------------- set up
    def set_up(self, train_files, val_file, resume_from) -> None:
        """Build the trainer, log what runs where, and start the record (or take the checkpoint's)."""
        cfg, dist, env, log = self.cfg, self.dist, self.env, self.log
        self.trainer = trainer = Trainer(cfg, train_files, val_file, dist)
        model = trainer.model
        log.line(f"tritonrun train_speedrun.py  {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
        log.line(f"commit {env['commit']}{' (dirty: uncommitted changes)' if env['dirty'] else ''}")
        log.line(f"python {env['python']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}")
        log.line(f"device {env['device']}" + (f"  x {dist.world_size} ranks" if dist.enabled else ""))
        extra = {
            "world_size": dist.world_size,
            "grad_accum": f"{trainer.grad_accum} per rank" if dist.enabled else trainer.grad_accum,
            "parameters": f"{model.num_parameters(include_padding=False):,} "
                          f"(+{model.num_parameters() - model.num_parameters(False):,} vocab padding)",
            "flops_per_token": f"{trainer.flops_per_token:,}",
            "train_shards": f"{len(train_files)} in {train_files[0].parent}",
            "val_shard": str(val_file),
        }
        log.line("config:\n" + config_table(cfg, extra))
        self.data_survey = self.survey_data()
        log.line(f"recipe {cfg.recipe}")
        if self.sizing is not None:
            log.line(f"memory: {self.sizing['text']}")
        extra_op = trainer.recipe.describe_optimizer(trainer.optimizer, dist.world_size)
        log.line("ops:\n" + trainer.ops.describe(trainer.op_names) + ("" if extra_op is None else "\n" + extra_op))
        mfu_peak = mfu_peak_info(cfg, env["device"])
        log.line(mfu_peak["text"] if mfu_peak else "MFU: n/a (no peak: pass --peak-tflops)")
        if resume_from is not None:
            ckpt = load_checkpoint(resume_from)
            trainer.load_state(ckpt)
            self.start_step, self.train_time = ckpt["step"], ckpt["train_time_s"]
            self.result = ckpt["result"]
            self.result.update(status="running", env=env, config=asdict(cfg))
            self.result.setdefault("hellaswag", [])
            self.result["resumed_from"].append({"step": self.start_step, "checkpoint": str(resume_from), "env": env,
                                                "batch_sizing": self.sizing})
            del ckpt
            log.line(f"resumed from {resume_from} at step {self.start_step} "
                     f"(train time so far {self.train_time:.1f} s)")
        else:
            self.result = new_result(cfg, env, trainer, dist)
            self.result["batch_sizing"] = self.sizing  # how the micro-batch / packed length was sized (None: flags)
        self.result["data_survey"] = self.data_survey
        self.result["mfu_peak"] = mfu_peak
        self.write_result()

    def survey_data(self) -> dict | None:
        """A packed loader's share of the tokens it reads that the run will see, over the sequences the run reads
        (at most 512 walked): logged, recorded (result.json data_survey), and warned about above 10 % skipped. None
        for a dense loader (it reads every token in order)."""
        cfg, loader = self.cfg, self.trainer.train_loader
        if not hasattr(loader, "survey"):
            return None
        per_step = cfg.total_batch_tokens // cfg.seq_len
        survey = loader.survey(min(512, per_step * max(1, cfg.max_steps - self.start_step)))
        pct = 100 * survey["fraction_skipped"]
        how = survey.get("layout") or ("each at a document start (--doc-aligned)" if cfg.doc_aligned
                                       else "contiguous chunks")
        self.log.line(f"data: {survey['sequences']} packed sequences of {cfg.seq_len} tokens, {how}: "
                      f"{pct:.1f} % of the tokens passed over are skipped ({survey['tokens_skipped']:,} of "
                      f"{survey['tokens_read'] + survey['tokens_skipped']:,})")
        if survey["fraction_skipped"] > 0.10:
            fix = survey.get("fix") or ("drop --doc-aligned (contiguous chunks, the 2024-12-17 record's order) or "
                                        "raise --seq-len" if cfg.doc_aligned
                                        else "use longer shards (their tails are skipped) or a shorter --seq-len")
            self.log.line(f"warning: the run would skip {pct:.0f} % of the training tokens it passes over "
                          f"(documents longer than --seq-len are cut and their rest skipped): {fix}")
        return survey

    def load_hellaswag(self, eval_only: bool) -> None:
        cfg = self.cfg
        if not (cfg.hellaswag_every or eval_only):
            return
        if Path(cfg.hellaswag_path).is_file():
            from tritonrun.data.hellaswag import load_examples

            self.hellaswag_examples = load_examples(Path(cfg.hellaswag_path))
            when = "once" if eval_only else f"every {cfg.hellaswag_every} steps and at the end"
            self.log.line(f"HellaSwag: {len(self.hellaswag_examples)} examples from {cfg.hellaswag_path}, {when}")
        else:
            self.log.line(f"HellaSwag: off ({cfg.hellaswag_path} not found; "
                          f"`python -m tritonrun.data.hellaswag` writes it)")

    # ---------------------------------------------------------------------------------------- between steps
    def write_result(self) -> None:
        if self.dist.master:
            atomic_write_json(self.result_path, self.result)

    def checkpoint(self, step: int) -> Path | None:
        """Write step's checkpoint (rank 0). A disk that will not take it stops the run (WriteFailed: the path,
        its size, the free space, the flags that need less, and where the run can continue from)."""
        path = None
        if self.dist.master:
            state = {**self.trainer.state(), "step": step, "train_time_s": self.train_time,
                     "run_config": asdict(self.cfg), "result": self.result}
            fix = (f"free space there, keep fewer checkpoints (--keep-checkpoints, now {self.cfg.keep_checkpoints}), "
                   f"or pick an --out-dir on a bigger disk")
            try:
                path = save_checkpoint(self.out_dir, step, state, keep=self.cfg.keep_checkpoints, fix=fix)
            except WriteFailed as e:
                last = latest_checkpoint(self.out_dir)
                where = (f"then continue from step {checkpoint_step(last)} with --resume --out-dir {self.out_dir}"
                         if last else "no checkpoint of this run was kept")
                raise WriteFailed(f"{e}; the run stopped after step {step}: {where}") from None
            self.log.line(f"checkpoint {path.name} written (step {step})")
        self.dist.barrier()
        return path

    def check_free_space(self) -> None:
        """Before training: the checkpoints this run will hold at once (--checkpoint-every, --keep-checkpoints, the
        final one), at the model's and optimizer's bytes, against the out dir's free space. Refused (UserError)
        when not even one fits; a warning with the numbers and the fix when the whole run's do not."""
        cfg = self.cfg
        every = cfg.checkpoint_every
        # checkpoints land on the multiples of --checkpoint-every after the start, before the last step
        writes = (len(range((self.start_step // every + 1) * every, cfg.max_steps, every)) if every else 0) \
            + int(cfg.final_checkpoint)
        free = free_bytes(self.out_dir) if self.dist.master and writes else None
        one = checkpoint_bytes(self.trainer) if free is not None else 0
        refuse = self.dist.any(free is not None and one > free)  # every rank stops, not only the one that writes
        if refuse and not self.dist.master:
            raise TrainingStopped("rank 0 refused to start: the out dir cannot hold one checkpoint (see its line)")
        if free is None:
            return
        held = writes if cfg.keep_checkpoints <= 0 else min(writes, cfg.keep_checkpoints + 1)  # +1: before pruning
        need = one * held
        fix = ("free space there, keep fewer (--keep-checkpoints 1 holds at most 2 at once), write fewer "
               "(--checkpoint-every, --no-final-checkpoint) or pick an --out-dir on a bigger disk")
        line = (f"{held} checkpoint{'s' if held > 1 else ''} of about {human_bytes(one)} at once need about "
                f"{human_bytes(need)}, and {self.out_dir} has {human_bytes(free)} free")
        self.result["disk_plan"] = {"checkpoint_bytes": one, "held_at_once": held, "free_bytes": free,
                                    "fits": need <= free}
        if one > free:
            raise WriteFailed(f"not even one checkpoint fits: {line}: {fix}")
        if need > free:
            self.log.line(f"warning: {line}: the run will stop when the disk fills; {fix}")
        else:
            self.log.line(f"disk: {line}")

    def run_hellaswag(self, step: int) -> None:
        t_hs = time.perf_counter()
        hs = self.trainer.hellaswag(self.hellaswag_examples)  # outside the clock
        self.result["hellaswag"].append({"step": step, **hs})
        self.log.line(f"hellaswag step {step:5d} | acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f} "
                      f"| n {hs['n']} | {time.perf_counter() - t_hs:.1f} s")

    def validate(self, step: int) -> float:
        """Val loss after `step` steps (outside the clock), recorded and logged."""
        val = self.trainer.evaluate(step)
        self.result["val"].append({"step": step, "tokens": self.trainer.tokens_through(step), "loss": val})
        self.result["final_val_loss"] = val
        return val

    def evaluate_only(self) -> dict:
        val = self.validate(self.start_step)
        self.log.line(f"eval-only: val loss {val:.6f} over the first {self.cfg.val_tokens:,} val tokens")
        if self.hellaswag_examples:
            self.run_hellaswag(self.start_step)
        self.result["status"] = "eval_only"
        self.write_result()
        return self.result

    # ---------------------------------------------------------------------------------------- warm up
    def warm_up(self) -> None:
        """Untimed real steps (compile, autotune, allocator), then back to the state before them."""
        cfg, trainer = self.cfg, self.trainer
        if cfg.timing_warmup_steps:
            snap = _host_copy(trainer.state())  # in host memory: a device copy would cost 3x the weights on the GPU
            t0 = time.perf_counter()
            steps = trainer.schedule.warmup_steps(self.start_step, cfg.timing_warmup_steps, cfg.max_steps)
            while True:
                try:
                    for step in steps:
                        trainer.train_step(step)
                    break
                except Exception as e:  # noqa: BLE001 - only an out-of-resources failure is handled
                    trainer.load_state(snap)
                    if not self.fall_back(e):
                        raise
            trainer.sync()
            trainer.load_state(snap)
            del snap
            extra = steps[cfg.timing_warmup_steps:]
            windows = (f" (+{len(extra)} at the window{'s' if len(extra) > 1 else ''} of step"
                       f"{'s' if len(extra) > 1 else ''} {', '.join(str(s + 1) for s in extra)}, so that no window "
                       f"change compiles in the clock)" if extra else "")
            self.log.line(f"warm-up: {cfg.timing_warmup_steps} untimed steps{windows} in "
                          f"{time.perf_counter() - t0:.1f} s, then weights, optimizer, RNG and data position restored")
            picks = tune.picks()
            if picks:
                self.log.line(f"autotuned tiles: {tune.summary(picks)}")
        if trainer.device.type == "cuda":
            # The warm-up ran the autotuners (their timing buffers: a 256 MB L2 flush among them): hand the cached
            # blocks back before the reset, or peak reserved would start at the warm-up's pool.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(trainer.device)
            self.total_gib = torch.cuda.get_device_properties(trainer.device).total_memory / 2**30

    def fall_back(self, e: Exception) -> bool:
        """A compile or launch of the window attention that failed for resources (shared memory, registers) in the
        warm-up: switch to the next path (Trainer.fall_back_window_attention), say so in one line, record it in
        result.json (window_attention_fallback). False for any other error, or with no path left."""
        text = f"{type(e).__name__}: {e}"
        if "window_attention" not in self.trainer.op_names or not is_resource_error(e):
            return False
        was = self.trainer.window_attention_path()
        to = self.trainer.fall_back_window_attention()
        if to is None:
            return False
        first = text.strip().splitlines()[0][:300]
        self.result.setdefault("window_attention_fallback", []).append({"from": was, "to": to, "error": first})
        self.result["ops"] = {k: v for k, v in self.trainer.ops.placement.items() if k in self.trainer.op_names}
        self.log.line(f"warning: window attention ({was}) failed in the warm-up for resources ({first}): falling "
                      f"back to {to} (result.json window_attention_fallback)")
        self.write_result()
        return True

    # ---------------------------------------------------------------------------------------- train
    def train(self) -> tuple[str | None, int | None]:
        """The step loop: (what stopped it early, the signal number), (None, None) when it ran to its end."""
        cfg = self.cfg
        bad_in_a_row = 0
        with StopSignals() as signals:
            for step in range(self.start_step, cfg.max_steps):
                applied = self.timed_step(step)
                runaway = applied and self.runaway_loss()
                bad_in_a_row = 0 if applied and not runaway else self.count_bad_step(step, bad_in_a_row + 1)
                last_step = step + 1 == cfg.max_steps
                self.between_steps(step + 1, last_step)
                if self.result["target_reached"]:
                    break
                if self.dist.any(signals.received is not None):
                    self.checkpoint(step + 1)
                    by = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
                    return by, signals.received
                if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last_step:
                    self.checkpoint(step + 1)
        return None, None

    def timed_step(self, step: int) -> bool:
        """One timed optimizer step, recorded and logged; whether its update was applied."""
        cfg, trainer, result = self.cfg, self.trainer, self.result
        trainer.sync()
        position = trainer.train_loader.state_dict()
        compiles = dynamo_compiles()
        t0 = time.perf_counter()
        try:
            loss, norm, lr, applied = trainer.train_step(step)
        except ShardError as e:  # the loader reached a train shard with bad token ids (every rank does)
            self.stop_on_bad_shard(step, position, e)
        trainer.sync()
        dt = time.perf_counter() - t0
        self.count_timed_compiles(step, dynamo_compiles() - compiles)
        self.train_time += dt
        tok_s = trainer.step_tokens(step) / dt
        mfu = (tok_s * trainer.flops_per_token / (cfg.peak_tflops * 1e12 * self.dist.world_size) if cfg.peak_tflops
               else None)
        mem, reserved = peak_memory_gib(trainer.device), peak_reserved_gib(trainer.device)
        result["steps"].append({"step": step + 1, "loss": loss, "grad_norm": norm, "lr": lr, "ms": dt * 1e3,
                                "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_gib": mem,
                                "peak_reserved_gib": reserved, "skipped": not applied, **trainer.last_schedule})
        result["train_losses"].append(loss)
        mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        mom, win = trainer.last_schedule.get("muon_momentum"), trainer.last_schedule.get("window")
        self.log.step(f"step {step + 1:5d}/{cfg.max_steps} | loss {loss:.6f} | norm {norm:.4f} | lr {lr:.3e} | "
                      + ("" if mom is None else f"mom {mom:.4f} | ") + ("" if win is None else f"window {win} | ") +
                      f"{dt * 1e3:.1f} ms | {tok_s:,.0f} tok/s | MFU {mfu_s} | mem {mem:.2f} GiB"
                      + ("" if reserved is None else f" (reserved {reserved:.2f})"),
                      postfix=f"loss {loss:.4f} {tok_s:,.0f} tok/s MFU {mfu_s}")
        result.update(steps_done=step + 1, tokens_seen=trainer.tokens_through(step + 1),
                      train_time_s=self.train_time, peak_mem_gib=mem, peak_reserved_gib=reserved)
        if reserved is not None:
            result["memory_fit"] = memory_fit(reserved, cfg.memory_gib, self.total_gib)
        return applied

    def count_timed_compiles(self, step: int, n: int) -> None:
        """torch.compile graphs compiled inside a timed step: its time (and MFU) includes compiling. 0 on a run whose
        warm-up reached every graph; otherwise the record says which steps and the log warns."""
        result = self.result
        result["timed_compiles"] = result.get("timed_compiles", 0) + n
        if n:
            result.setdefault("timed_compile_steps", []).append(step + 1)
            self.log.line(f"warning: {n} torch.compile graph(s) compiled inside timed step {step + 1}: its time and "
                          f"MFU include compiling (a shape or value the warm-up did not reach; see result.json "
                          f"timed_compile_steps)")

    def stop_on_bad_shard(self, step: int, position: dict, e: ShardError):
        """Back to the step boundary (a valid checkpoint), checkpoint, and stop with how to continue."""
        trainer = self.trainer
        trainer.train_loader.load_state_dict(position)
        trainer.optimizer.zero_grad(set_to_none=True)
        self.result["status"] = "bad_data"
        self.write_result()
        path = self.checkpoint(step)
        raise TrainingStopped(
            f"bad shard {e} (re-download or re-tokenize it); stopped before step {step + 1}, "
            f"{path.name if path else 'a checkpoint'} written: once the shard is fixed, continue with "
            f"--resume --out-dir {self.out_dir}") from None

    def runaway_loss(self) -> bool:
        """The last step's loss is finite but far worse than guessing: above ln(vocab) (a uniform prediction's loss,
        what an initialized model starts near) and above the run's first loss, by RUNAWAY_NATS. A run whose loss
        climbs there has diverged (e.g. --lr 1e30: loss 37 with grad norm 0 every step) though nothing is NaN."""
        steps = self.result["steps"]
        vocab = getattr(getattr(self.trainer.model, "config", None), "vocab_size", 50257)
        start = steps[0]["loss"] if steps else 0.0
        return steps[-1]["loss"] > max(math.log(vocab), start) + RUNAWAY_NATS

    def count_bad_step(self, step: int, bad_in_a_row: int) -> int:
        """A skipped (non-finite) or runaway step: warn, and stop the run past --max-bad-steps in a row."""
        cfg, result = self.cfg, self.result
        loss, norm = result["steps"][-1]["loss"], result["steps"][-1]["grad_norm"]
        finite = math.isfinite(loss) and math.isfinite(norm)
        if finite:
            what = (f"loss {loss:.4f} is more than {RUNAWAY_NATS} nats above both ln(vocab) and the run's first loss "
                    f"{result['steps'][0]['loss']:.4f}")
        else:
            result["skipped_steps"] += 1
            what = f"skipped: non-finite loss {loss} or grad norm {norm}"
        self.log.line(f"warning: step {step + 1} {what} ({bad_in_a_row} in a row, the limit is --max-bad-steps "
                      f"{cfg.max_bad_steps})")
        if bad_in_a_row > cfg.max_bad_steps:
            result["status"] = "diverged"
            self.write_result()
            last = latest_checkpoint(self.out_dir)
            kind = "runaway (loss far above its start)" if finite else "non-finite"
            raise TrainingStopped(
                f"{bad_in_a_row} {kind} steps in a row (last at step {step + 1}, loss {loss:.4g}): the run diverged; "
                f"lower --lr (now {cfg.lr:g}) or raise --warmup-steps. Last good checkpoint: "
                f"{last if last else 'none (set --checkpoint-every)'}")
        return bad_in_a_row

    def between_steps(self, done: int, last_step: bool) -> None:
        """After `done` steps: validation (and the target), HellaSwag, each followed by a record write."""
        cfg, result = self.cfg, self.result
        if done % cfg.val_every == 0 or last_step:
            val = self.validate(done)
            self.log.line(f"val step {done:5d} | val loss {val:.6f} | train time {self.train_time:.1f} s")
            if val <= cfg.target_val_loss:
                result["target_reached"], result["target_reached_step"] = True, done
                self.log.line(f"target val loss {cfg.target_val_loss} reached at step {done}: stopping")
            self.write_result()  # a valid record after every validation
        if self.hellaswag_examples and (done % cfg.hellaswag_every == 0 or last_step or result["target_reached"]):
            self.run_hellaswag(done)
            self.write_result()

    # ---------------------------------------------------------------------------------------- finish
    def finish(self, stopped_by: str | None, signal_received: int | None) -> dict:
        """Final figures, status, leaderboard row, plot, the final checkpoint and the closing lines."""
        cfg, result, log = self.cfg, self.result, self.log
        done = result["steps_done"]
        result["tokens_per_s"] = result["tokens_seen"] / result["train_time_s"] if result["train_time_s"] else 0.0
        result["mfu_mean"] = (result["tokens_per_s"] * self.trainer.flops_per_token
                              / (cfg.peak_tflops * 1e12 * self.dist.world_size) if cfg.peak_tflops else None)
        ms = sorted(s["ms"] for s in result["steps"][self.start_step:]) or [0.0]
        result["step_ms_median"] = ms[len(ms) // 2]
        continue_hint = f"continue with --resume --out-dir {self.out_dir}"
        if stopped_by:
            result["status"] = "interrupted"
            log.line(f"stopped by {stopped_by} after step {done}: checkpoint written; {continue_hint}")
        else:
            result["status"] = "target_reached" if result["target_reached"] else "max_steps"
        result["autotune"] = tune.picks()  # the kernels' tiles, when a Triton kernel was autotuned
        # A leaderboard row only for a finished run: an interrupted one has no final val and would read as a result.
        row = None if stopped_by else leaderboard_row(cfg, self.env, result)
        result["leaderboard_row"] = row
        # The final checkpoint before any record says "finished": if the disk refuses it, record_failure writes
        # status write_failed and no leaderboard row is left.
        if not stopped_by and cfg.final_checkpoint:
            self.checkpoint(done)  # a finished run's weights (sample.py, --init-from ckpt:, export)
        elif not stopped_by:
            log.line("no final checkpoint (--no-final-checkpoint): this run's weights are not kept")
        if self.dist.master:
            result["plot"] = save_plot(self.out_dir, result)
            atomic_write_json(self.result_path, result)
            if row is not None:
                atomic_write_text(self.out_dir / "leaderboard.md", LEADERBOARD_HEADER + "\n" + row + "\n")
        self.closing_lines(row, continue_hint)
        if stopped_by:
            result["exit_code"] = 128 + int(signal_received or signal.SIGTERM)
        return result

    def closing_lines(self, row: str | None, continue_hint: str) -> None:
        result, log = self.result, self.log
        done = result["steps_done"]
        fit = result.get("memory_fit")
        if fit:
            log.line(f"memory: peak allocated {result['peak_mem_gib']:.2f} GiB, reserved "
                     f"{fit['peak_reserved_gib']:.2f} GiB + {fit['context_allowance_gib']} GiB context = "
                     f"{fit['needed_gib']:.2f} of {fit['card_gib']:.2f} GiB: "
                     f"{'fits' if fit['fits'] else 'DOES NOT FIT'}")
        val_s = "n/a" if result["final_val_loss"] is None else f"{result['final_val_loss']:.4f}"
        log.line(f"done: {done} steps, {result['tokens_seen']:,} tokens, train time {result['train_time_s']:.2f} s, "
                 f"final val {val_s}, target {'reached' if result['target_reached'] else 'not reached'}; "
                 f"records in {self.out_dir}")
        if self.dist.master and result.get("plot") is None:
            log.line("no loss.png: matplotlib is not installed (pip install -e '.[plot]')")
        log.line(row if row is not None else f"interrupted at step {done} of {self.cfg.max_steps}: no leaderboard "
                                             f"row (only finished runs get one); {continue_hint}")
