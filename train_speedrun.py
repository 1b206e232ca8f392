"""Train GPT-2 on FineWeb to val loss <= 3.28 as fast as possible, llm.c's 124M recipe by default.

    python train_speedrun.py --gpu rtx4070                              # the main job
    python train_speedrun.py --gpu cpu --model tiny --data sample       # CPU smoke run, no download

A preset (--gpu) sets micro-batch, dtype, backend, compile, memory budget and the peak FLOPs used for
MFU; every field can be overridden by its long flag. The clock excludes validation and an untimed
warm-up (compile, autotune) that runs real steps and then restores the initial weights, optimizer
state and data position. The out dir gets train.log, result.json, leaderboard.md and loss.png.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

# `python train_speedrun.py` already has the repo root first on sys.path; be explicit for other launchers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from gpt2 import GPT, MODEL_SIZES  # noqa: E402
from gpt2.ops import BACKENDS, get_ops  # noqa: E402
from runinfo import atomic_write_json, atomic_write_text, env_info  # noqa: E402

DEFAULT_FINEWEB_DIR = "data/fineweb10B"


# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    micro_batch: int  # sequences per forward/backward; grad accumulation makes up total_batch_tokens
    memory_gib: float  # memory budget: the CUDA allocator is capped to it (emulates a smaller card)
    peak_tflops: float | None  # dense bf16 tensor-core peak with fp32 accumulate, for MFU
    backend: str = "triton"
    compile: bool = True
    dtype: str = "bf16"
    model: str = "d12"
    data: str = DEFAULT_FINEWEB_DIR
    seq_len: int = 1024
    total_batch_tokens: int = 524_288  # 2**19, llm.c
    lr: float = 6e-4
    warmup_steps: int = 700
    max_steps: int = 18_865
    val_every: int = 250
    val_tokens: int = 10_485_760
    timing_warmup_steps: int = 3  # untimed real steps before the clock starts (compile, autotune)
    device: str = "cuda"


PRESETS: dict[str, Preset] = {
    # micro-batch sized for the memory with the torch LM head (fp32 logits materialized)
    "rtx4070": Preset(micro_batch=8, memory_gib=12, peak_tflops=58.3),
    "rtx4070ti": Preset(micro_batch=8, memory_gib=12, peak_tflops=80.2),
    "rtx4090": Preset(micro_batch=16, memory_gib=24, peak_tflops=165.2),
    "rtx3090": Preset(micro_batch=16, memory_gib=24, peak_tflops=71.0),
    "a100": Preset(micro_batch=32, memory_gib=40, peak_tflops=312.0),
    "h100": Preset(micro_batch=64, memory_gib=80, peak_tflops=989.0),
    "h200": Preset(micro_batch=64, memory_gib=141, peak_tflops=989.0),
    "cpu": Preset(
        micro_batch=4, memory_gib=0, peak_tflops=None, backend="torch", compile=False, dtype="fp32",
        model="tiny", data="sample", seq_len=128, total_batch_tokens=1024, lr=2e-3, warmup_steps=10,
        max_steps=50, val_every=25, val_tokens=8192, timing_warmup_steps=1, device="cpu",
    ),
}

# Substrings of torch.cuda.get_device_name(), most specific first.
AUTO_NAMES = [("4070 ti", "rtx4070ti"), ("4070", "rtx4070"), ("4090", "rtx4090"), ("3090", "rtx3090"),
              ("a100", "a100"), ("h100", "h100"), ("h200", "h200")]


@dataclass(frozen=True)
class Config:
    """The resolved run configuration: a preset with the user's flags on top."""
    gpu: str
    model: str
    micro_batch: int
    total_batch_tokens: int
    seq_len: int
    lr: float
    final_lr_frac: float
    warmup_steps: int
    max_steps: int
    weight_decay: float
    grad_clip: float
    beta1: float
    beta2: float
    data: str
    out_dir: str
    seed: int
    val_every: int
    val_tokens: int
    target_val_loss: float
    backend: str
    compile: bool
    dtype: str
    memory_gib: float
    peak_tflops: float | None
    timing_warmup_steps: int
    device: str

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def grad_accum(self) -> int:
        return self.total_batch_tokens // self.tokens_per_micro_batch


class UserError(Exception):
    """A mistake the user can fix: printed as one line, exit code 2, no traceback."""


# --------------------------------------------------------------------------------------------- CLI
class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Flags left out take the preset's value.")
    p.add_argument("--gpu", default="auto", choices=[*PRESETS, "auto"],
                   help="preset; auto picks by the CUDA device's name (cpu when there is none)")
    p.add_argument("--model", choices=list(MODEL_SIZES), help="model size (d12 = GPT-2 124M)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    p.add_argument("--total-batch-tokens", type=int, help="tokens per optimizer step (default 524288)")
    p.add_argument("--seq-len", type=int, help="sequence length T")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--final-lr-frac", type=float, default=0.0, help="cosine decays to lr*this (llm.c: 0)")
    p.add_argument("--warmup-steps", type=int, help="linear lr warmup steps")
    p.add_argument("--max-steps", type=int, help="optimizer steps; the cosine reaches its floor here")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW decay on 2-D weights only")
    p.add_argument("--grad-clip", type=float, default=1.0, help="global grad-norm clip (0 = off)")
    p.add_argument("--beta1", type=float, default=0.9)
    p.add_argument("--beta2", type=float, default=0.95)
    p.add_argument("--data", help=f"'sample' (built-in corpus) or a dir of llm.c shards (default {DEFAULT_FINEWEB_DIR})")
    p.add_argument("--out-dir", help="where logs and records go (default runs/<time>-<gpu>-<model>)")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--val-every", type=int, help="validate every N steps (and at the end)")
    p.add_argument("--val-tokens", type=int, help="val loss over the first N tokens of the val shard")
    p.add_argument("--target-val-loss", type=float, default=3.28, help="stop once val <= this")
    p.add_argument("--backend", choices=BACKENDS, help="torch, or triton kernels (torch where not landed)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 autocast (fp32 masters) or fp32")
    p.add_argument("--memory-gib", type=float, help="cap the CUDA allocator at this many GiB (0 = no cap)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOPS for MFU")
    p.add_argument("--timing-warmup-steps", type=int, help="untimed steps before the clock starts")
    return p


def resolve_preset(name: str) -> str:
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "cpu"
    gpu = torch.cuda.get_device_name().lower()
    for needle, preset in AUTO_NAMES:
        if needle in gpu:
            return preset
    raise UserError(f"--gpu auto does not know {torch.cuda.get_device_name()!r}: "
                    f"pass the closest preset, e.g. --gpu rtx4090 --micro-batch 8")


def resolve_config(argv: list[str] | None) -> Config:
    args = build_parser().parse_args(argv)
    gpu = resolve_preset(args.gpu)
    preset = asdict(PRESETS[gpu])
    values = {k: v for k, v in vars(args).items() if v is not None}
    merged = {**preset, **values, "gpu": gpu}
    if "out_dir" not in merged:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        merged["out_dir"] = str(Path("runs") / f"{stamp}-{gpu}-{merged['model']}")
    cfg = Config(**{f.name: merged[f.name] for f in fields(Config)})
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    positive = ["micro_batch", "total_batch_tokens", "seq_len", "max_steps", "val_every", "val_tokens"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["warmup_steps", "timing_warmup_steps", "weight_decay", "grad_clip", "memory_gib"]:
        if getattr(cfg, name) < 0:
            raise UserError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not (cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise UserError(f"--lr must be a positive number, got {cfg.lr}")
    if not 0 <= cfg.final_lr_frac <= 1:
        raise UserError(f"--final-lr-frac must be in [0, 1], got {cfg.final_lr_frac}")
    block = MODEL_SIZES[cfg.model].block_size
    if cfg.seq_len > block:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds model {cfg.model}'s context of {block}: lower --seq-len")
    if cfg.total_batch_tokens % cfg.tokens_per_micro_batch:
        raise UserError(
            f"--total-batch-tokens {cfg.total_batch_tokens} is not a multiple of micro-batch x seq-len = "
            f"{cfg.micro_batch} x {cfg.seq_len} = {cfg.tokens_per_micro_batch}: make it one (e.g. "
            f"{max(1, cfg.total_batch_tokens // cfg.tokens_per_micro_batch) * cfg.tokens_per_micro_batch})")
    if cfg.val_tokens < cfg.tokens_per_micro_batch:
        raise UserError(f"--val-tokens {cfg.val_tokens} is less than one micro-batch "
                        f"({cfg.tokens_per_micro_batch} tokens): raise it or lower --micro-batch")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--gpu {cfg.gpu} needs a CUDA GPU and none is visible; "
                        f"for a CPU smoke run use --gpu cpu --model tiny --data sample")
    if cfg.device == "cpu" and cfg.dtype == "bf16":
        raise UserError("--dtype bf16 is for GPUs; on --gpu cpu use --dtype fp32")


# -------------------------------------------------------------------------------------------- data
def open_data(cfg: Config):
    """Return (train_files, val_file), or raise UserError naming the problem and the fix."""
    from data.shards import ShardError, find_shards, read_header

    if cfg.data == "sample":
        from data.sample import prepare_sample

        data_dir = prepare_sample()
    else:
        data_dir = Path(cfg.data)
        if not data_dir.is_dir():
            raise UserError(f"--data {cfg.data}: no such directory; give a dir of llm.c token shards "
                            f"(fineweb_val_000000.bin, fineweb_train_000001.bin, ...) or use --data sample")
    train, val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    if not train or not val:
        missing = " and ".join(s for s, f in (("*_train_*.bin", train), ("*_val_*.bin", val)) if not f)
        raise UserError(f"--data {data_dir}: no {missing} shards there; put llm.c-format shards in it "
                        f"or use --data sample")
    try:
        val_tokens = read_header(val[0])
        for f in train:
            read_header(f)
    except ShardError as e:
        raise UserError(f"bad shard {e} (re-download or re-tokenize it)") from None
    if val_tokens < cfg.val_tokens + 1:
        raise UserError(f"val shard {val[0]} has {val_tokens} tokens, fewer than --val-tokens "
                        f"{cfg.val_tokens} + 1: lower --val-tokens")
    return train, val[0]


def check_out_dir(path: Path) -> None:
    if (path / "result.json").exists():
        raise UserError(f"--out-dir {path} already holds a run (result.json): pick a new --out-dir "
                        f"or move that run away")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out-dir {path} is not writable ({e.strerror}): pick another --out-dir") from None


# ------------------------------------------------------------------------------------------ output
class RunLog:
    """Writes to train.log and to the terminal: a progress bar on a tty, plain lines otherwise."""

    def __init__(self, path: Path, total_steps: int):
        self.file = open(path, "w", buffering=1)
        self.bar = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)

    def line(self, text: str, console: bool = True) -> None:
        self.file.write(text + "\n")
        if console:
            if self.bar is not None:
                self.bar.write(text)
            else:
                print(text, flush=True)

    def step(self, text: str, postfix: str) -> None:
        if self.bar is not None:
            self.file.write(text + "\n")
            self.bar.update(1)
            self.bar.set_postfix_str(postfix, refresh=False)
        else:
            self.line(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.file.close()


def config_table(cfg: Config, extra: dict) -> str:
    rows = [(f.name, getattr(cfg, f.name)) for f in fields(Config)] + list(extra.items())
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB (process RSS)


def leaderboard_row(cfg: Config, env: dict, result: dict) -> str:
    val = result["final_val_loss"]
    mfu = result["mfu_mean"]
    return (f"| {result['date']} | {cfg.gpu} | {env['device']} | {cfg.model} | {cfg.backend}"
            f"{' +compile' if cfg.compile else ''} | {val:.4f} | {'yes' if result['target_reached'] else 'no'} "
            f"| {result['steps_done']} | {result['tokens_seen'] / 1e9:.3f}B | {result['train_time_s'] / 60:.2f} min "
            f"| {result['tokens_per_s']:,.0f} | {'n/a' if mfu is None else f'{100 * mfu:.1f}%'} "
            f"| {env['commit'][:10]}{'-dirty' if env['dirty'] else ''} |")


LEADERBOARD_HEADER = ("| date | preset | device | model | backend | val loss | target | steps | tokens "
                      "| train time | tok/s | MFU | commit |\n|" + "---|" * 13)


def save_plot(out_dir: Path, result: dict) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(range(1, len(result["train_losses"]) + 1), result["train_losses"], label="train", lw=0.8)
    if result["val"]:
        ax.plot([v["step"] for v in result["val"]], [v["loss"] for v in result["val"]], "o-", label="val")
    ax.axhline(result["target_val_loss"], color="gray", ls="--", lw=0.8, label="target")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------------------- training
def lr_at(cfg: Config, step: int) -> float:
    """llm.c: linear warmup to lr, then cosine to lr * final_lr_frac at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.final_lr_frac
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


class Trainer:
    def __init__(self, cfg: Config, train_files, val_file):
        from data.loader import ShardLoader

        self.cfg = cfg
        self.device = torch.device(cfg.device)
        if self.device.type == "cuda":
            torch.set_float32_matmul_precision("high")
            if cfg.memory_gib:
                total = torch.cuda.get_device_properties(self.device).total_memory
                torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.memory_gib * 2**30 / total), self.device)
        torch.manual_seed(cfg.seed)
        self.ops = get_ops(cfg.backend, self.device)
        # Init on the CPU for the same weights on every device, then move.
        self.model = GPT(MODEL_SIZES[cfg.model], self.ops).to(self.device)
        self.forward = torch.compile(self.model) if cfg.compile else self.model
        self.params = [p for p in self.model.parameters()]
        self.optimizer = self.ops.optimizer(self.model.param_groups(cfg.weight_decay), lr=cfg.lr,
                                            betas=(cfg.beta1, cfg.beta2), eps=1e-8)
        self.train_loader = ShardLoader(train_files, cfg.micro_batch, cfg.seq_len, self.device)
        self.val_loader = ShardLoader([val_file], cfg.micro_batch, cfg.seq_len, self.device)
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                         else contextlib.nullcontext())
        self.flops_per_token = self.model.flops_per_token(cfg.seq_len)
        self.tokens_per_step = cfg.total_batch_tokens

    def train_step(self, step: int) -> tuple[float, float, float]:
        """One optimizer step over grad_accum micro-batches: (loss, grad norm, lr)."""
        cfg = self.cfg
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(cfg.grad_accum):
            x, y = self.train_loader.next_batch()
            with self.autocast:
                loss = self.forward(x, y) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        if cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip, foreach=True)
        else:
            norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.params]))
        lr = lr_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum.item(), norm.item(), lr

    @torch.no_grad()
    def evaluate(self) -> float:
        self.model.eval()
        self.val_loader.reset()
        steps = self.cfg.val_tokens // self.cfg.tokens_per_micro_batch
        total = torch.zeros((), device=self.device)
        for _ in range(steps):
            x, y = self.val_loader.next_batch()
            with self.autocast:
                total += self.forward(x, y).float()
        self.model.train()
        return (total / steps).item()

    def snapshot(self) -> dict:
        return {
            "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "data": self.train_loader.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
        }

    def restore(self, snap: dict) -> None:
        self.model.load_state_dict(snap["model"])
        self.optimizer.load_state_dict(snap["optimizer"])
        self.optimizer.zero_grad(set_to_none=True)
        self.train_loader.load_state_dict(snap["data"])
        torch.set_rng_state(snap["rng"])
        if snap["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(snap["cuda_rng"])

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def run(cfg: Config, out_dir: Path) -> dict:
    train_files, val_file = open_data(cfg)
    env = env_info(torch.device(cfg.device))
    log = RunLog(out_dir / "train.log", cfg.max_steps)
    try:
        return _run(cfg, out_dir, env, train_files, val_file, log)
    finally:
        log.close()


def _run(cfg, out_dir, env, train_files, val_file, log: RunLog) -> dict:
    trainer = Trainer(cfg, train_files, val_file)
    model = trainer.model
    log.line(f"tritonrun {Path(__file__).name}  {datetime.now(timezone.utc).isoformat(timespec='seconds')}")
    log.line(f"commit {env['commit']}{' (dirty: uncommitted changes)' if env['dirty'] else ''}")
    log.line(f"python {env['python']}  torch {env['torch']}  triton {env['triton']}  cuda {env['cuda']}")
    log.line(f"device {env['device']}")
    extra = {
        "grad_accum": cfg.grad_accum,
        "parameters": f"{model.num_parameters(include_padding=False):,} (+{model.num_parameters() - model.num_parameters(False):,} vocab padding)",
        "flops_per_token": f"{trainer.flops_per_token:,}",
        "train_shards": f"{len(train_files)} in {train_files[0].parent}",
        "val_shard": str(val_file),
    }
    log.line("config:\n" + config_table(cfg, extra))
    log.line("ops:\n" + trainer.ops.describe())

    result = {
        "record": "tritonrun.train", "version": 1, "status": "running",
        "date": datetime.now().strftime("%Y-%m-%d"), "env": env, "config": asdict(cfg),
        "grad_accum": cfg.grad_accum, "ops": trainer.ops.placement,
        "parameters": model.num_parameters(include_padding=False), "flops_per_token": trainer.flops_per_token,
        "steps": [], "train_losses": [], "val": [], "tokens_seen": 0, "steps_done": 0, "train_time_s": 0.0,
        "target_val_loss": cfg.target_val_loss, "target_reached": False, "target_reached_step": None,
        "final_val_loss": None, "tokens_per_s": 0.0, "mfu_mean": None, "peak_mem_gib": None,
        "peak_mem_kind": "cuda_max_allocated" if cfg.device == "cuda" else "process_max_rss",
    }
    result_path = out_dir / "result.json"
    atomic_write_json(result_path, result)

    # Untimed warm-up: real steps (compile, autotune, allocator), then back to the initial state.
    if cfg.timing_warmup_steps:
        snap = trainer.snapshot()
        t0 = time.perf_counter()
        for i in range(cfg.timing_warmup_steps):
            trainer.train_step(i)
        trainer.sync()
        trainer.restore(snap)
        del snap
        log.line(f"warm-up: {cfg.timing_warmup_steps} untimed steps in {time.perf_counter() - t0:.1f} s, "
                 f"then weights, optimizer and data position restored")
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)

    train_time = 0.0
    for step in range(cfg.max_steps):
        trainer.sync()
        t0 = time.perf_counter()
        loss, norm, lr = trainer.train_step(step)
        trainer.sync()
        dt = time.perf_counter() - t0
        train_time += dt
        tok_s = trainer.tokens_per_step / dt
        mfu = tok_s * trainer.flops_per_token / (cfg.peak_tflops * 1e12) if cfg.peak_tflops else None
        mem = peak_memory_gib(trainer.device)
        result["steps"].append({"step": step + 1, "loss": loss, "grad_norm": norm, "lr": lr, "ms": dt * 1e3,
                                "tokens_per_s": tok_s, "mfu": mfu, "peak_mem_gib": mem})
        result["train_losses"].append(loss)
        mfu_s = "n/a" if mfu is None else f"{100 * mfu:.1f}%"
        log.step(f"step {step + 1:5d}/{cfg.max_steps} | loss {loss:.6f} | norm {norm:.4f} | lr {lr:.3e} | "
                 f"{dt * 1e3:.1f} ms | {tok_s:,.0f} tok/s | MFU {mfu_s} | mem {mem:.2f} GiB",
                 postfix=f"loss {loss:.4f} {tok_s:,.0f} tok/s MFU {mfu_s}")
        if not math.isfinite(loss):
            log.line(f"warning: non-finite loss {loss} at step {step + 1}")
        last = step + 1 == cfg.max_steps
        if (step + 1) % cfg.val_every == 0 or last:
            val = trainer.evaluate()  # outside the clock
            result["val"].append({"step": step + 1, "tokens": (step + 1) * trainer.tokens_per_step, "loss": val})
            result["final_val_loss"] = val
            log.line(f"val step {step + 1:5d} | val loss {val:.6f} | train time {train_time:.1f} s")
            if val <= cfg.target_val_loss:
                result["target_reached"], result["target_reached_step"] = True, step + 1
                log.line(f"target val loss {cfg.target_val_loss} reached at step {step + 1}: stopping")
        result.update(steps_done=step + 1, tokens_seen=(step + 1) * trainer.tokens_per_step,
                      train_time_s=train_time, peak_mem_gib=mem)
        if result["val"] and result["val"][-1]["step"] == step + 1:
            atomic_write_json(result_path, result)  # a valid record after every validation
        if result["target_reached"]:
            break

    steps = result["steps"]
    result["tokens_per_s"] = result["tokens_seen"] / train_time
    result["mfu_mean"] = (result["tokens_per_s"] * trainer.flops_per_token / (cfg.peak_tflops * 1e12)
                          if cfg.peak_tflops else None)
    result["step_ms_median"] = sorted(s["ms"] for s in steps)[len(steps) // 2]
    result["status"] = "target_reached" if result["target_reached"] else "max_steps"
    row = leaderboard_row(cfg, env, result)
    result["leaderboard_row"] = row
    plot = save_plot(out_dir, result)
    result["plot"] = plot
    atomic_write_json(result_path, result)
    atomic_write_text(out_dir / "leaderboard.md", LEADERBOARD_HEADER + "\n" + row + "\n")
    log.line(f"done: {result['steps_done']} steps, {result['tokens_seen']:,} tokens, train time "
             f"{train_time:.2f} s, final val {result['final_val_loss']:.4f}, target "
             f"{'reached' if result['target_reached'] else 'not reached'}; records in {out_dir}")
    if plot is None:
        log.line("no loss.png: matplotlib is not installed (pip install -e '.[plot]')")
    log.line(row)
    return result


def oom_message(cfg: Config) -> str:
    return (f"CUDA out of memory at --micro-batch {cfg.micro_batch} --seq-len {cfg.seq_len} --model {cfg.model} "
            f"(budget {cfg.memory_gib or 'whole GPU'} GiB): lower --micro-batch (grad accumulation grows to "
            f"keep --total-batch-tokens), --seq-len or --model, or raise --memory-gib if the card has more")


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = resolve_config(argv)
        out_dir = Path(cfg.out_dir)
        check_out_dir(out_dir)
        run(cfg, out_dir)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: {oom_message(cfg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: result.json holds the record up to the last validation", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
