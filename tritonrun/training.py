"""The training loop behind train_speedrun.py: steps, validation, checkpoints, DDP, records.

`run(cfg, out_dir)` trains one run described by a resolved config (train_speedrun.Config). It is the
only entry point; train_speedrun.py owns presets, flags and user-error reporting.

- Clock: only training steps are timed. Validation, checkpoint writes and the untimed warm-up (real
  steps, then weights, optimizer, RNG and data position restored) are outside it.
- Checkpoints (tritonrun/gpt2/checkpoint.py): every --checkpoint-every steps, on SIGINT/SIGTERM (at a step
  boundary) and at the end of every finished run (so its weights are there for sample.py, --init-from
  ckpt: and export); they hold everything needed to continue bit for bit on the same device.
- Bad data: a shard with a token id outside the vocabulary is refused when the loader opens it
  (tritonrun/data/loader.py); met mid-run, the run checkpoints at the step boundary before it and stops.
- Records: a leaderboard row only for a finished run (max steps or target reached); an interrupted
  one says how to continue instead.
- Bad steps: a non-finite loss or grad norm skips the update; more than --max-bad-steps in a row stop
  the run (the last good checkpoint stays).
- Recipes (cfg.recipe): "gpt2" builds gpt2.GPT and llm.c's AdamW + cosine schedule (lr_at); "speedrun" (the
  2024-12-17 record) and "speedrun-dense" (2024-11-10) build gpt2.speedrun.SpeedrunGPT and SpeedrunOptimizer (Adam
  groups + Muon, the record's constant-then-cooldown lr and Muon momentum warmup, set on the groups every step).
  "speedrun" reads data/loader.PackedLoader (one packed sequence of seq_len tokens per micro-batch, its document
  bounds cu_seqlens) and passes each step's attention window (gpt2.speedrun.speedrun_window) to the model; the
  others read (micro_batch, seq_len) batches (ShardLoader). Checkpoints name the model ("model_kind") beside its
  config, so --resume and --init-from ckpt: rebuild the right class.
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
from tritonrun.gpt2 import GPT, MODEL_SIZES
from tritonrun.gpt2.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tritonrun.gpt2.ops import GPT2_OPS, SPEEDRUN_DENSE_OPS, SPEEDRUN_OPS, get_ops, parse_op_list
from tritonrun.kernels import tune
from tritonrun.runinfo import atomic_write_json, atomic_write_text, env_info


class InitError(Exception):
    """--init-from could not load its weights; str says why (one line)."""


class TrainingStopped(Exception):
    """The run cannot go on (e.g. repeated non-finite steps); str is the one-line reason with the fix."""


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

        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
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
        self.file = open(path, "a" if append else "w", buffering=1) if path is not None else None
        self.bar = None
        if self.file is not None and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial, unit="step", dynamic_ncols=True)

    def line(self, text: str) -> None:
        if self.file is None:
            return
        self.file.write(text + "\n")
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def step(self, text: str, postfix: str) -> None:
        if self.bar is None:
            self.line(text)
            return
        self.file.write(text + "\n")
        self.bar.update(1)
        self.bar.set_postfix_str(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
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


def memory_fit(peak_reserved: float, memory_gib: float, total_gib: float) -> dict:
    """Whether a run whose peak reserved memory is `peak_reserved` GiB fits a card of `memory_gib` (the budget,
    e.g. rtx4070's 12; the smaller of it and the running card's total): reserved + CUDA_CONTEXT_GIB <= card."""
    card = min(memory_gib, total_gib) if memory_gib else total_gib
    need = peak_reserved + CUDA_CONTEXT_GIB
    return {"rule": "peak reserved + context allowance <= card memory", "card_gib": card,
            "context_allowance_gib": CUDA_CONTEXT_GIB, "peak_reserved_gib": peak_reserved, "needed_gib": need,
            "headroom_gib": card - need, "fits": need <= card}


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ------------------------------------------------------------------------------------ training
def lr_at(cfg, step: int) -> float:
    """llm.c: linear warmup to lr, then cosine to lr * final_lr_frac at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.final_lr_frac
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


SPEEDRUN_RECIPES = ("speedrun", "speedrun-dense")


def speedrun_schedule_config(cfg, model_config):
    """The SpeedrunConfig whose schedules (lr, Muon momentum, window) this run follows: the model's, with the run's
    length, --warmup-steps and the cooldown as the record's fraction of --max-steps (600 of 1490; 900 of 3000)."""
    from dataclasses import replace

    from tritonrun.train import cooldown_steps

    return replace(model_config, num_iterations=cfg.max_steps, warmup_iters=cfg.warmup_steps,
                   warmdown_iters=cooldown_steps(cfg.max_steps, model_config.recipe))


class SpeedrunOptimizer:
    """The speedrun recipe's optimizers as one object the training loop drives: Adam (the seam's `optimizer`,
    AdamW with weight_decay 0 = Adam: torch's or the Triton FusedAdamW) over SpeedrunGPT.optimizer_groups()'s
    "adam" groups (wte, lm_head, scalars) and tritonrun/kernels/muon.py's Muon over its "muon" group (the blocks'
    matrices).

    Each group keeps its base lr in group["base_lr"] (the record's lr x --lr, the multiplier); schedule(step)
    sets group["lr"] = base_lr x speedrun_lr_multiplier(step) on every group and Muon's momentum to
    speedrun_muon_momentum(step), and names the step's attention window (speedrun_window) for the windowed model.
    param_groups lists Adam's groups then Muon's (the same dicts). state_dict() holds both optimizers' state
    ({"adam", "muon"}), so checkpoints, --resume and the warm-up restore carry the Muon momentum buffers with the
    Adam moments."""

    def __init__(self, model, ops, cfg):
        from tritonrun.kernels.muon import Muon

        groups, mc = model.optimizer_groups(), model.config
        for g in groups["adam"] + groups["muon"]:
            g["base_lr"] = g["lr"] = g["lr"] * cfg.lr
        self.adam = ops.optimizer(groups["adam"], lr=groups["adam"][0]["lr"], betas=(cfg.beta1, cfg.beta2),
                                  eps=mc.adam_eps)
        self.muon = Muon(groups["muon"], lr=groups["muon"][0]["lr"], momentum=mc.muon_momentum_warmup_start,
                         nesterov=mc.muon_nesterov, ns_steps=mc.muon_ns_steps, coefficients=cfg.muon_coefficients,
                         ns_dtype=torch.bfloat16, momentum_form=mc.muon_momentum_form)
        self.schedule_config = speedrun_schedule_config(cfg, mc)

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups + self.muon.param_groups

    def schedule(self, step: int) -> dict:
        """Set every group's lr and Muon's momentum for 0-based `step`; returns what was set (with the step's
        attention window for the windowed model). Steps past the end (the untimed warm-up's, near the end of a
        resumed run) get the end's lr, 0, and window."""
        from tritonrun.gpt2.speedrun import speedrun_lr_multiplier, speedrun_muon_momentum

        scale = speedrun_lr_multiplier(min(step, self.schedule_config.num_iterations), self.schedule_config)
        momentum = speedrun_muon_momentum(step, self.schedule_config)
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * scale
        for g in self.muon.param_groups:
            g["momentum"] = momentum
        out = {"lr": self.muon.param_groups[0]["lr"], "lr_scale": scale, "muon_momentum": momentum}
        if self.schedule_config.attention == "window":
            out["window"] = self.window(step)
        return out

    def window(self, step: int) -> int:
        """The attention window (tokens) of 0-based training `step`; the validation after s steps uses window(s)
        as the record's loop does."""
        from tritonrun.gpt2.speedrun import speedrun_window

        return speedrun_window(step, self.schedule_config)

    def step(self) -> None:
        self.adam.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.adam.zero_grad(set_to_none=set_to_none)
        self.muon.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"adam": self.adam.state_dict(), "muon": self.muon.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])
        self.muon.load_state_dict(state["muon"])

    def describe(self, world_size: int) -> str:
        """The Muon line of the log's ops table (Muon is outside the ops seam)."""
        how = f"sharded over {world_size} ranks" if world_size > 1 else "one process"
        coeffs = self.muon.param_groups[0]["coefficients"]
        return f"  muon  torch (tritonrun/kernels/muon.py: bf16 Newton-Schulz, {coeffs}, {how})"


def speedrun_model(cfg, ops):
    """SpeedrunGPT for the run: speedrun_models(cfg.recipe)[cfg.model], or the model of --init-from ckpt:PATH (a
    checkpoint of the same recipe; its weights loaded). Local to the trainer until tritonrun/gpt2/checkpoint.py rebuilds
    either kind."""
    from tritonrun.gpt2.checkpoint import CheckpointError, checkpoint_model_kind, load_checkpoint, resolve_checkpoint
    from tritonrun.gpt2.speedrun import SpeedrunConfig, SpeedrunGPT, speedrun_models

    if not cfg.init_from:
        return SpeedrunGPT(speedrun_models(cfg.recipe)[cfg.model], ops)
    path = cfg.init_from.partition(":")[2]
    try:
        ckpt = load_checkpoint(resolve_checkpoint(path))
    except CheckpointError as e:
        raise InitError(str(e)) from None
    kind = checkpoint_model_kind(ckpt)
    if kind != cfg.recipe:
        raise InitError(f"{path}: a {kind} checkpoint, not a {cfg.recipe} one: use --recipe {kind}")
    model = SpeedrunGPT(SpeedrunConfig.from_dict(ckpt["model_config"]), ops)
    model.load_state_dict(ckpt["model"])
    return model


def build_model(cfg, ops) -> GPT:
    if getattr(cfg, "recipe", "gpt2") in SPEEDRUN_RECIPES:
        return speedrun_model(cfg, ops)
    if cfg.init_from:
        from tritonrun.gpt2.hf import init_from

        try:
            return init_from(cfg.init_from, ops)
        except (ValueError, OSError) as e:  # the loaders' format errors are ValueErrors naming the file
            raise InitError(str(e)) from None
    return GPT(MODEL_SIZES[cfg.model], ops)


class Trainer:
    def __init__(self, cfg, train_files, val_file, dist: Dist):
        from tritonrun.data.loader import PackedLoader, ShardLoader

        self.cfg, self.dist, self.device = cfg, dist, dist.device
        self.recipe = getattr(cfg, "recipe", "gpt2")
        self.speedrun = self.recipe in SPEEDRUN_RECIPES
        self.packed = self.recipe == "speedrun"  # one packed sequence per micro-batch, windowed attention
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            # The cap is process-wide allocator state: set it either way, so a Trainer without one built after a
            # capped one in the same process (bench/train.py builds many) is not left capped.
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(allocator_fraction(cfg.memory_gib, total), self.device)
        B, T, W = cfg.micro_batch, cfg.seq_len, dist.world_size
        # The loaders first: they validate every shard header, so a bad file fails before the model is built.
        if self.packed:  # B = 1. Training starts each sequence at a document start (doc_aligned, the config's
            # choice); validation reads contiguous windows, the record's val tokens exactly (tritonrun/data/loader.py).
            from tritonrun.gpt2.speedrun import speedrun_models

            aligned = speedrun_models(self.recipe)[cfg.model].doc_aligned
            self.train_loader = PackedLoader(train_files, T, self.device, rank=dist.rank, world_size=W,
                                             doc_aligned=aligned)
            self.val_loader = PackedLoader([val_file], T, self.device, rank=dist.rank, world_size=W,
                                           doc_aligned=False)
        else:
            self.train_loader = ShardLoader(train_files, B, T, self.device, rank=dist.rank, world_size=W)
            self.val_loader = ShardLoader([val_file], B, T, self.device, rank=dist.rank, world_size=W)
        torch.manual_seed(cfg.seed)
        self.ops = get_ops(cfg.backend, self.device, parse_op_list(cfg.torch_ops))
        # Built on the CPU (same initial weights on every device and rank), then moved.
        self.model = build_model(cfg, self.ops).to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.ddp = None
        if dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            # The speedrun model's RoPE tables are non-persistent buffers, equal on every rank: nothing to broadcast.
            self.ddp = DistributedDataParallel(
                self.forward, device_ids=[dist.local_rank] if self.device.type == "cuda" else None,
                broadcast_buffers=not self.speedrun)
            self.forward = self.ddp
        self.params = list(self.model.parameters())
        if self.speedrun:
            self.optimizer = SpeedrunOptimizer(self.model, self.ops, cfg)
        else:
            self.optimizer = self.ops.optimizer(self.model.param_groups(cfg.weight_decay), lr=cfg.lr,
                                                betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        self.last_schedule: dict = {}  # speedrun: the lr scale and Muon momentum the last step set
        self.grad_accum = cfg.total_batch_tokens // (B * T * W)  # micro-batches per rank per step
        self.val_steps = cfg.val_tokens // (B * T * W)  # per rank
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                         else contextlib.nullcontext())
        if self.packed:  # the windowed attention's FLOPs averaged over the run's window schedule (one MFU basis)
            windows = [self.optimizer.window(s) for s in range(cfg.max_steps)]
            per_window = {w: self.model.flops_per_token(cfg.seq_len, w) for w in set(windows)}
            self.flops_per_token = round(sum(per_window[w] for w in windows) / len(windows))
        else:
            self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        # the ops this model calls
        self.op_names = SPEEDRUN_OPS if self.packed else SPEEDRUN_DENSE_OPS if self.speedrun else GPT2_OPS

    def train_step(self, step: int) -> tuple[float, float, float, bool]:
        """One optimizer step: (loss, grad norm, lr, applied). A non-finite loss or norm skips the update."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        # The windowed model's window for this step: a Python int (under --compile one recompile at its first
        # change, then a symbolic int: see SpeedrunGPT.hidden).
        window = self.optimizer.window(step) if self.packed else None
        for micro in range(self.grad_accum):
            if self.packed:
                x, y, cu_seqlens = self.train_loader.next_batch()
                args = (x, y, cu_seqlens, window)
            else:
                args = self.train_loader.next_batch()
            if self.ddp is not None:  # all-reduce grads only on the last micro-batch
                self.ddp.require_backward_grad_sync = micro == self.grad_accum - 1
            with self.autocast:
                loss = self.forward(*args) / self.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        self.dist.all_mean(loss_sum)
        if cfg.grad_clip > 0 and hasattr(self.optimizer, "clip_grad_norm_"):
            norm = self.optimizer.clip_grad_norm_(cfg.grad_clip)  # fused: the scale is applied inside step()
        elif cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in self.params]))
        if self.speedrun:  # every group's lr (its base lr x the schedule) and Muon's momentum
            self.last_schedule = self.optimizer.schedule(step)
            lr = self.last_schedule["lr"]
        else:
            lr = lr_at(cfg, step)
        loss_v, norm_v = torch.stack([loss_sum, norm.float()]).tolist()  # one host sync for both
        applied = math.isfinite(loss_v) and math.isfinite(norm_v)
        if applied:
            if not self.speedrun:
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_v, norm_v, lr, applied

    @torch.no_grad()
    def evaluate(self, step: int = 0) -> float:
        """Mean val loss over the first val_tokens tokens; the windowed model with the window of the schedule after
        `step` steps (as the record validates), its documents masked as in training."""
        self.model.eval()
        self.val_loader.reset()
        total = torch.zeros((), device=self.device)
        for _ in range(self.val_steps):
            if self.packed:
                x, y, cu_seqlens = self.val_loader.next_batch()
                args = (x, y, cu_seqlens, self.optimizer.window(step))
            else:
                args = self.val_loader.next_batch()
            with self.autocast:
                total += self.forward(*args).float()
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
        return {"model_kind": self.recipe, "model_config": self.model.config.to_dict(),
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


def _new_result(cfg, env, trainer: Trainer, dist: Dist) -> dict:
    model = trainer.model
    return {
        "record": "tritonrun.train", "version": 1, "status": "running",
        "date": datetime.now().strftime("%Y-%m-%d"), "env": env, "config": asdict(cfg),
        "world_size": dist.world_size, "grad_accum": trainer.grad_accum * dist.world_size, "recipe": trainer.recipe,
        "ops": {k: v for k, v in trainer.ops.placement.items() if k in trainer.op_names},
        "parameters": model.num_parameters(include_padding=False),
        "flops_per_token": trainer.flops_per_token, "steps": [], "train_losses": [], "val": [],
        "tokens_seen": 0, "steps_done": 0, "train_time_s": 0.0, "skipped_steps": 0,
        "target_val_loss": cfg.target_val_loss, "target_reached": False, "target_reached_step": None,
        "final_val_loss": None, "tokens_per_s": 0.0, "mfu_mean": None, "peak_mem_gib": None,
        "peak_mem_kind": "cuda_max_allocated" if cfg.device == "cuda" else "process_max_rss",
        "peak_reserved_gib": None, "memory_fit": None, "mfu_peak": None,
        "resumed_from": [], "hellaswag": [],
    }


def run(cfg, out_dir: Path, train_files: list[Path], val_file: Path, resume_from: Path | None = None,
        eval_only: bool = False) -> dict:
    """Train; returns the result record (also written to out_dir/result.json on rank 0)."""
    dist = Dist(cfg.device)
    finished = False
    try:
        env = env_info(dist.device)
        log = RunLog(out_dir / "train.log" if dist.master else None, cfg.max_steps, append=resume_from is not None)
        try:
            result = _run(cfg, out_dir, env, train_files, val_file, log, dist, resume_from, eval_only)
            finished = True
            return result
        finally:
            log.close()
    finally:
        dist.close(finished)


def _run(cfg, out_dir, env, train_files, val_file, log: RunLog, dist: Dist, resume_from, eval_only=False) -> dict:
    trainer = Trainer(cfg, train_files, val_file, dist)
    model = trainer.model
    tokens_per_step = cfg.total_batch_tokens
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
    log.line(f"recipe {trainer.recipe}")
    log.line("ops:\n" + trainer.ops.describe(trainer.op_names)
             + ("\n" + trainer.optimizer.describe(dist.world_size) if trainer.speedrun else ""))
    from tritonrun.train import mfu_peak_info

    mfu_peak = mfu_peak_info(cfg, env["device"])
    log.line(mfu_peak["text"] if mfu_peak else "MFU: n/a (no peak: pass --peak-tflops)")

    start_step, train_time = 0, 0.0
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        trainer.load_state(ckpt)
        start_step, train_time = ckpt["step"], ckpt["train_time_s"]
        result = ckpt["result"]
        result.update(status="running", env=env, config=asdict(cfg))
        result.setdefault("hellaswag", [])
        result["resumed_from"].append({"step": start_step, "checkpoint": str(resume_from), "env": env})
        del ckpt
        log.line(f"resumed from {resume_from} at step {start_step} (train time so far {train_time:.1f} s)")
    else:
        result = _new_result(cfg, env, trainer, dist)
    result["mfu_peak"] = mfu_peak
    result_path = out_dir / "result.json"
    if dist.master:
        atomic_write_json(result_path, result)

    def checkpoint(step: int) -> Path | None:
        path = None
        if dist.master:
            state = {**trainer.state(), "step": step, "train_time_s": train_time, "run_config": asdict(cfg),
                     "result": result}
            path = save_checkpoint(out_dir, step, state, keep=cfg.keep_checkpoints)
            log.line(f"checkpoint {path.name} written (step {step})")
        dist.barrier()
        return path

    hellaswag_examples = None
    if cfg.hellaswag_every or eval_only:
        if Path(cfg.hellaswag_path).is_file():
            from tritonrun.data.hellaswag import load_examples

            hellaswag_examples = load_examples(Path(cfg.hellaswag_path))
            when = "once" if eval_only else f"every {cfg.hellaswag_every} steps and at the end"
            log.line(f"HellaSwag: {len(hellaswag_examples)} examples from {cfg.hellaswag_path}, {when}")
        else:
            log.line(f"HellaSwag: off ({cfg.hellaswag_path} not found; `python -m tritonrun.data.hellaswag` writes it)")

    def run_hellaswag(step: int) -> None:
        t_hs = time.perf_counter()
        hs = trainer.hellaswag(hellaswag_examples)  # outside the clock
        result["hellaswag"].append({"step": step, **hs})
        log.line(f"hellaswag step {step:5d} | acc {hs['acc']:.4f} | acc_norm {hs['acc_norm']:.4f} "
                 f"| n {hs['n']} | {time.perf_counter() - t_hs:.1f} s")

    if eval_only:  # score the starting weights (--init-from or a checkpoint) without training
        val = trainer.evaluate(start_step)
        result["val"].append({"step": start_step, "tokens": start_step * tokens_per_step, "loss": val})
        result["final_val_loss"] = val
        log.line(f"eval-only: val loss {val:.6f} over the first {cfg.val_tokens:,} val tokens")
        if hellaswag_examples:
            run_hellaswag(start_step)
        result["status"] = "eval_only"
        if dist.master:
            atomic_write_json(result_path, result)
        return result

    # Untimed warm-up: real steps (compile, autotune, allocator), then back to the state before them.
    if cfg.timing_warmup_steps:
        snap = _host_copy(trainer.state())  # in host memory: a device copy would cost 3x the weights on the GPU
        t0 = time.perf_counter()
        for i in range(cfg.timing_warmup_steps):
            trainer.train_step(start_step + i)
        trainer.sync()
        trainer.load_state(snap)
        del snap
        log.line(f"warm-up: {cfg.timing_warmup_steps} untimed steps in {time.perf_counter() - t0:.1f} s, "
                 f"then weights, optimizer, RNG and data position restored")
        picks = tune.picks()
        if picks:
            log.line(f"autotuned tiles: {tune.summary(picks)}")
    if trainer.device.type == "cuda":
        # The warm-up ran the autotuners (their timing buffers: a 256 MB L2 flush among them): hand the cached
        # blocks back before the reset, or peak reserved would start at the warm-up's pool.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(trainer.device)
        total_gib = torch.cuda.get_device_properties(trainer.device).total_memory / 2**30

    bad_in_a_row = 0
    stopped_by = None
    with StopSignals() as signals:
        for step in range(start_step, cfg.max_steps):
            trainer.sync()
            position = trainer.train_loader.state_dict()
            t0 = time.perf_counter()
            try:
                loss, norm, lr, applied = trainer.train_step(step)
            except ShardError as e:  # the loader reached a train shard with bad token ids (every rank does)
                trainer.train_loader.load_state_dict(position)  # back to the step boundary: a valid checkpoint
                trainer.optimizer.zero_grad(set_to_none=True)
                result["status"] = "bad_data"
                if dist.master:
                    atomic_write_json(result_path, result)
                path = checkpoint(step)
                raise TrainingStopped(
                    f"bad shard {e} (re-download or re-tokenize it); stopped before step {step + 1}, "
                    f"{path.name if path else 'a checkpoint'} written: once the shard is fixed, continue with "
                    f"--resume --out-dir {out_dir}") from None
            trainer.sync()
            dt = time.perf_counter() - t0
            train_time += dt
            tok_s = tokens_per_step / dt
            mfu = tok_s * trainer.flops_per_token / (cfg.peak_tflops * 1e12 * dist.world_size) if cfg.peak_tflops else None
            mem, reserved = peak_memory_gib(trainer.device), peak_reserved_gib(trainer.device)
            result["steps"].append({"step": step + 1, "loss": loss, "grad_norm": norm, "lr": lr, "ms": dt * 1e3,
                                    "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_gib": mem,
                                    "peak_reserved_gib": reserved, "skipped": not applied, **trainer.last_schedule})
            result["train_losses"].append(loss)
            mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
            mom, win = trainer.last_schedule.get("muon_momentum"), trainer.last_schedule.get("window")
            log.step(f"step {step + 1:5d}/{cfg.max_steps} | loss {loss:.6f} | norm {norm:.4f} | lr {lr:.3e} | "
                     + ("" if mom is None else f"mom {mom:.4f} | ") + ("" if win is None else f"window {win} | ") +
                     f"{dt * 1e3:.1f} ms | {tok_s:,.0f} tok/s | MFU {mfu_s} | mem {mem:.2f} GiB"
                     + ("" if reserved is None else f" (reserved {reserved:.2f})"),
                     postfix=f"loss {loss:.4f} {tok_s:,.0f} tok/s MFU {mfu_s}")
            result.update(steps_done=step + 1, tokens_seen=(step + 1) * tokens_per_step, train_time_s=train_time,
                          peak_mem_gib=mem, peak_reserved_gib=reserved)
            if reserved is not None:
                result["memory_fit"] = memory_fit(reserved, cfg.memory_gib, total_gib)
            if applied:
                bad_in_a_row = 0
            else:
                bad_in_a_row += 1
                result["skipped_steps"] += 1
                log.line(f"warning: step {step + 1} skipped: non-finite loss {loss} or grad norm {norm} "
                         f"({bad_in_a_row} in a row, the limit is --max-bad-steps {cfg.max_bad_steps})")
                if bad_in_a_row > cfg.max_bad_steps:
                    result["status"] = "diverged"
                    if dist.master:
                        atomic_write_json(result_path, result)
                    last = latest_checkpoint(out_dir)
                    raise TrainingStopped(
                        f"{bad_in_a_row} non-finite steps in a row (last at step {step + 1}): the run diverged; "
                        f"lower --lr or raise --warmup-steps. Last good checkpoint: "
                        f"{last if last else 'none (set --checkpoint-every)'}")

            last_step = step + 1 == cfg.max_steps
            if (step + 1) % cfg.val_every == 0 or last_step:
                val = trainer.evaluate(step + 1)  # outside the clock
                result["val"].append({"step": step + 1, "tokens": (step + 1) * tokens_per_step, "loss": val})
                result["final_val_loss"] = val
                log.line(f"val step {step + 1:5d} | val loss {val:.6f} | train time {train_time:.1f} s")
                if val <= cfg.target_val_loss:
                    result["target_reached"], result["target_reached_step"] = True, step + 1
                    log.line(f"target val loss {cfg.target_val_loss} reached at step {step + 1}: stopping")
                if dist.master:
                    atomic_write_json(result_path, result)  # a valid record after every validation
            if hellaswag_examples and ((step + 1) % cfg.hellaswag_every == 0 or last_step or result["target_reached"]):
                run_hellaswag(step + 1)
                if dist.master:
                    atomic_write_json(result_path, result)
            if result["target_reached"]:
                break
            if dist.any(signals.received is not None):
                stopped_by = signal.Signals(signals.received).name if signals.received else "a signal on another rank"
                checkpoint(step + 1)
                break
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and not last_step:
                checkpoint(step + 1)

    done = result["steps_done"]
    result["tokens_per_s"] = result["tokens_seen"] / result["train_time_s"] if result["train_time_s"] else 0.0
    result["mfu_mean"] = (result["tokens_per_s"] * trainer.flops_per_token / (cfg.peak_tflops * 1e12 * dist.world_size)
                          if cfg.peak_tflops else None)
    ms = sorted(s["ms"] for s in result["steps"][start_step:]) or [0.0]
    result["step_ms_median"] = ms[len(ms) // 2]
    continue_hint = f"continue with --resume --out-dir {out_dir}"
    if stopped_by:
        result["status"] = "interrupted"
        log.line(f"stopped by {stopped_by} after step {done}: checkpoint written; {continue_hint}")
    else:
        result["status"] = "target_reached" if result["target_reached"] else "max_steps"
    result["autotune"] = tune.picks()  # the kernels' tiles, when a Triton kernel was autotuned
    # A leaderboard row only for a finished run: an interrupted one has no final val and would read as a result.
    row = None if stopped_by else leaderboard_row(cfg, env, result)
    result["leaderboard_row"] = row
    if dist.master:
        result["plot"] = save_plot(out_dir, result)
        atomic_write_json(result_path, result)
        if row is not None:
            atomic_write_text(out_dir / "leaderboard.md", LEADERBOARD_HEADER + "\n" + row + "\n")
    if not stopped_by:
        checkpoint(done)  # always: a finished run's weights (sample.py, --init-from ckpt:, export)
    fit = result.get("memory_fit")
    if fit:
        log.line(f"memory: peak allocated {result['peak_mem_gib']:.2f} GiB, reserved {fit['peak_reserved_gib']:.2f} "
                 f"GiB + {fit['context_allowance_gib']} GiB context = {fit['needed_gib']:.2f} of {fit['card_gib']:.2f} "
                 f"GiB: {'fits' if fit['fits'] else 'DOES NOT FIT'}")
    val_s = "n/a" if result["final_val_loss"] is None else f"{result['final_val_loss']:.4f}"
    log.line(f"done: {done} steps, {result['tokens_seen']:,} tokens, train time {result['train_time_s']:.2f} s, "
             f"final val {val_s}, target {'reached' if result['target_reached'] else 'not reached'}; "
             f"records in {out_dir}")
    if dist.master and result.get("plot") is None:
        log.line("no loss.png: matplotlib is not installed (pip install -e '.[plot]')")
    log.line(row if row is not None else f"interrupted at step {done} of {cfg.max_steps}: no leaderboard row "
                                         f"(only finished runs get one); {continue_hint}")
    if stopped_by:
        result["exit_code"] = 128 + int(signals.received or signal.SIGTERM)
    return result
