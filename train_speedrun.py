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
import math
import os
import sys
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path

# `python train_speedrun.py` already has the repo root first on sys.path; be explicit for other launchers.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from data.fineweb import DEFAULT_OUT_DIR  # noqa: E402 (the default --data: where data/fineweb.py writes)
from data.hellaswag import DEFAULT_PATH as HELLASWAG_PATH  # noqa: E402
from gpt2 import MODEL_SIZES  # noqa: E402
from gpt2.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint  # noqa: E402
from gpt2.ops import BACKENDS, TRITON_OPS, parse_op_list, use_cpu_interpreter  # noqa: E402



# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    micro_batch: int  # sequences per forward/backward; grad accumulation makes up total_batch_tokens
    memory_gib: float  # memory budget: the CUDA allocator is capped to it (emulates a smaller card)
    peak_tflops: float | None  # dense bf16 tensor-core peak with fp32 accumulate, for MFU
    # torch until the Triton kernels have GPU-validated records in bench/results (issue 9); opt in with
    # --backend triton, which already falls back per op where a kernel has not landed.
    backend: str = "torch"
    torch_ops: str = ""  # under --backend triton, these ops (comma list, gpt2/ops.py names) stay torch
    compile: bool = True
    dtype: str = "bf16"
    model: str = "d12"
    data: str = DEFAULT_OUT_DIR
    seq_len: int = 1024
    total_batch_tokens: int = 524_288  # 2**19, llm.c
    lr: float = 6e-4
    warmup_steps: int = 700
    max_steps: int = 18_865
    val_every: int = 250
    val_tokens: int = 10_485_760
    timing_warmup_steps: int = 3  # untimed real steps before the clock starts (compile, autotune)
    device: str = "cuda"
    final_lr_frac: float = 0.0  # cosine floor as a fraction of lr (llm.c: 0)
    weight_decay: float = 0.1  # on 2-D weights only
    grad_clip: float = 1.0  # global grad-norm clip; 0 = off
    beta1: float = 0.9
    beta2: float = 0.95
    seed: int = 1337
    target_val_loss: float = 3.28
    checkpoint_every: int = 500  # steps between checkpoints (0 = only on SIGINT/SIGTERM and at the end: off)
    keep_checkpoints: int = 2  # newest K checkpoints kept (0 = all)
    max_bad_steps: int = 3  # non-finite steps in a row tolerated before the run stops
    init_from: str | None = None  # hf:PATH, llmc:PATH or ckpt:PATH instead of a fresh init
    hellaswag_every: int = 1000  # HellaSwag eval every N steps and at the end, when the file exists (0 = off)
    hellaswag_path: str = str(HELLASWAG_PATH)  # written by `python data/hellaswag.py`
    # micro-batch under --backend triton with the fused LM head (linear_cross_entropy not in --torch-ops): it keeps
    # no (tokens x vocab) fp32 logits, so more sequences fit (see triton_micro_batch_for). None: micro_batch.
    triton_micro_batch: int | None = None


PRESETS: dict[str, Preset] = {
    # micro_batch: the torch LM head (fp32 logits materialized); triton_micro_batch: the fused one. Both fit by
    # bench/memory.py's estimate (bench/results/memory-<preset>-*.json; tests/test_memory.py checks it).
    "rtx4070": Preset(micro_batch=8, memory_gib=12, peak_tflops=58.3, triton_micro_batch=16),
    "rtx4070ti": Preset(micro_batch=8, memory_gib=12, peak_tflops=80.2, triton_micro_batch=16),
    "rtx4090": Preset(micro_batch=16, memory_gib=24, peak_tflops=165.2, triton_micro_batch=32),
    "rtx3090": Preset(micro_batch=16, memory_gib=24, peak_tflops=71.0, triton_micro_batch=32),
    "a100": Preset(micro_batch=32, memory_gib=40, peak_tflops=312.0, triton_micro_batch=64),
    "h100": Preset(micro_batch=64, memory_gib=80, peak_tflops=989.0, triton_micro_batch=128),
    "h200": Preset(micro_batch=64, memory_gib=141, peak_tflops=989.0, triton_micro_batch=256),
    "cpu": Preset(
        micro_batch=4, memory_gib=0, peak_tflops=None, backend="torch", compile=False, dtype="fp32",
        model="tiny", data="sample", seq_len=128, total_batch_tokens=1024, lr=2e-3, warmup_steps=10,
        max_steps=50, val_every=25, val_tokens=8192, timing_warmup_steps=1, device="cpu", checkpoint_every=0,
        hellaswag_every=0,
    ),
}

# Variants that share a preset's memory class and kernels but not its SM count or clocks: the peak for MFU by
# device-name substring (dense bf16, fp32 accumulate). Data-center parts: NVIDIA datasheets' sparse figures
# halved; the SXM parts keep the preset's 989. GeForce parts: SMs x boost clock x 512 FLOP/clock/SM, the rate
# behind the presets' 58.3 (4070: 46 SMs, 2.475 GHz) and 165.2 (4090: 128, 2.52).
VARIANT_PEAK_TFLOPS = {
    "rtx4070": [("4070 super", 71.0)],  # 56 SMs, 2.475 GHz
    "rtx4070ti": [("4070 ti super", 88.2)],  # 66 SMs, 2.61 GHz
    "rtx3090": [("3090 ti", 80.0)],  # 84 SMs, 1.86 GHz
    "h100": [("h100 pcie", 756.0), ("h100 nvl", 835.0)],
    "h200": [("h200 nvl", 835.0)],
}

# Substrings of torch.cuda.get_device_name(), most specific first.
AUTO_NAMES = [("4070 ti", "rtx4070ti"), ("4070", "rtx4070"), ("4090", "rtx4090"), ("3090", "rtx3090"),
              ("a100", "a100"), ("h100", "h100"), ("h200", "h200")]
# Parts whose name matches a desktop preset but whose memory and clocks do not (an RTX 4070 Laptop GPU has 8 GB).
AUTO_REFUSED = ("laptop",)


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
    torch_ops: str
    compile: bool
    dtype: str
    memory_gib: float
    peak_tflops: float | None
    timing_warmup_steps: int
    device: str
    checkpoint_every: int
    keep_checkpoints: int
    max_bad_steps: int
    init_from: str | None
    hellaswag_every: int
    hellaswag_path: str

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
                epilog="Flags left out take the preset's value (with --resume: the checkpoint's).")
    p.add_argument("--gpu", choices=[*PRESETS, "auto"],
                   help="preset (default auto: picked by the CUDA device's name, cpu when there is none)")
    p.add_argument("--model", choices=list(MODEL_SIZES), help="model size (d12 = GPT-2 124M)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward")
    p.add_argument("--total-batch-tokens", type=int, help="tokens per optimizer step (default 524288)")
    p.add_argument("--seq-len", type=int, help="sequence length T")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--final-lr-frac", type=float, help="cosine decays to lr*this (llm.c: 0)")
    p.add_argument("--warmup-steps", type=int, help="linear lr warmup steps")
    p.add_argument("--max-steps", type=int, help="optimizer steps; the cosine reaches its floor here")
    p.add_argument("--weight-decay", type=float, help="AdamW decay on 2-D weights only (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="global grad-norm clip, 0 = off (default 1.0)")
    p.add_argument("--beta1", type=float, help="AdamW beta1 (default 0.9)")
    p.add_argument("--beta2", type=float, help="AdamW beta2 (default 0.95)")
    p.add_argument("--data", help=f"'sample' (built-in corpus) or a dir of llm.c shards (default {DEFAULT_OUT_DIR})")
    p.add_argument("--out-dir", help="where logs, records and checkpoints go (default runs/<time>-<gpu>-<model>)")
    p.add_argument("--seed", type=int, help="init seed (default 1337)")
    p.add_argument("--val-every", type=int, help="validate every N steps (and at the end)")
    p.add_argument("--val-tokens", type=int, help="val loss over the first N tokens of the val shard")
    p.add_argument("--target-val-loss", type=float, help="stop once val <= this (default 3.28)")
    p.add_argument("--backend", choices=BACKENDS, help="torch, or triton kernels (torch where not landed)")
    p.add_argument("--torch-ops", metavar="OP[,OP...]",
                   help=f"with --backend triton: keep these ops in torch ({', '.join(TRITON_OPS)})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the model")
    p.add_argument("--dtype", choices=["bf16", "fp32"], help="bf16 autocast (fp32 masters) or fp32")
    p.add_argument("--memory-gib", type=float, help="cap the CUDA allocator at this many GiB (0 = no cap)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOPS for MFU")
    p.add_argument("--timing-warmup-steps", type=int, help="untimed steps before the clock starts")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (0 = off; default 500 on GPUs)")
    p.add_argument("--keep-checkpoints", type=int, help="keep the newest K checkpoints, 0 = all (default 2)")
    p.add_argument("--max-bad-steps", type=int, help="non-finite steps in a row before the run stops (default 3)")
    p.add_argument("--init-from", help="start from weights: hf:PATH (Hugging Face GPT-2), llmc:PATH, ckpt:PATH")
    p.add_argument("--hellaswag-every", type=int, help="HellaSwag eval every N steps, 0 = off (default 1000 on GPUs)")
    p.add_argument("--hellaswag-path", help="tokenized HellaSwag val file (python data/hellaswag.py writes it)")
    p.add_argument("--resume", action="store_true", help="continue the newest complete checkpoint in --out-dir")
    p.add_argument("--eval-only", action="store_true",
                   help="score the starting weights (--init-from / --resume) on val and HellaSwag, no training")
    p.add_argument("--download", action="store_true",
                   help="if --data has no shards, download FineWeb into it first (python data/fineweb.py)")
    return p


# Fields that change the math of a run: a resumed run may not change them (it would not be the same run).
# The rest (hardware, batching split, logging, target) may differ on resume.
RUN_DEFINING = ("model", "total_batch_tokens", "seq_len", "lr", "final_lr_frac", "warmup_steps", "max_steps",
                "weight_decay", "grad_clip", "beta1", "beta2", "data", "seed", "dtype", "init_from")
HARDWARE = ("micro_batch", "memory_gib", "peak_tflops", "backend", "torch_ops", "compile", "timing_warmup_steps",
            "device")


def resolve_preset(name: str) -> str:
    if name != "auto":
        return name
    if not torch.cuda.is_available():
        return "cpu"
    gpu = torch.cuda.get_device_name().lower()
    if any(word in gpu for word in AUTO_REFUSED):
        raise UserError(f"--gpu auto has no preset for {torch.cuda.get_device_name()!r} (a laptop part: less memory "
                        f"and lower clocks than the desktop card): pass the closest preset with your card's "
                        f"figures, e.g. --gpu rtx4070 --micro-batch 4 --memory-gib 8 --peak-tflops 40")
    for needle, preset in AUTO_NAMES:
        if needle in gpu:
            return preset
    raise UserError(f"--gpu auto does not know {torch.cuda.get_device_name()!r}: "
                    f"pass the closest preset, e.g. --gpu rtx4090 --micro-batch 8")


def peak_tflops_for(preset: str, device_name: str | None = None) -> float | None:
    """The MFU peak of `preset` on this machine's GPU (or `device_name`): the variant's where the name says so
    (an H100 PCIe peaks at 756, not the SXM's 989; an RTX 4070 SUPER at 71.0, not the 4070's 58.3), else the
    preset's."""
    if device_name is None and preset in VARIANT_PEAK_TFLOPS and torch.cuda.is_available():
        device_name = torch.cuda.get_device_name()
    name = (device_name or "").lower()
    for needle, peak in VARIANT_PEAK_TFLOPS.get(preset, []):
        if needle in name:
            return peak
    return PRESETS[preset].peak_tflops


def preset_of_device(device_name: str) -> str | None:
    """The preset `--gpu auto` would pick for a device name (None: a laptop part, or no preset knows it)."""
    name = device_name.lower()
    if any(word in name for word in AUTO_REFUSED):
        return None
    return next((preset for needle, preset in AUTO_NAMES if needle in name), None)


def mfu_peak_info(cfg: Config, device_name: str) -> dict | None:
    """Which peak the run's MFU divides by, for the log and the record: the preset's (say rtx4070's 58.3, also
    when an H200 runs --gpu rtx4070) or --peak-tflops, with the device that runs and, when that device is not the
    preset's GPU, its own peak. None without a peak (the cpu preset)."""
    if cfg.peak_tflops is None:
        return None
    source = "preset" if cfg.peak_tflops in automatic_peaks(cfg.gpu) else "--peak-tflops"
    own_preset = preset_of_device(device_name)
    own_peak = peak_tflops_for(own_preset, device_name) if own_preset else None
    text = (f"MFU vs {cfg.gpu} peak {cfg.peak_tflops:g} TFLOPS (preset)" if source == "preset"
            else f"MFU vs {cfg.peak_tflops:g} TFLOPS (--peak-tflops)") + f", device {device_name}"
    if source == "preset" and own_preset != cfg.gpu:
        text += (f": not this device's peak ({own_preset} {own_peak:g} TFLOPS: --peak-tflops {own_peak:g} measures "
                 f"against it)" if own_peak else ": not this device's peak (pass --peak-tflops for it)")
    return {"peak_tflops": cfg.peak_tflops, "source": source, "preset": cfg.gpu, "device": device_name,
            "device_preset": own_preset, "device_peak_tflops": own_peak, "text": text}


def automatic_peaks(preset: str) -> set[float | None]:
    """Every peak `peak_tflops_for` can pick for `preset`: the preset's own and its variants'."""
    return {PRESETS[preset].peak_tflops, *(peak for _, peak in VARIANT_PEAK_TFLOPS.get(preset, []))}


def preset_micro_batch(preset: str, backend: str, torch_ops: str = "") -> int:
    """The preset's micro-batch for this backend: triton_micro_batch when the fused LM head runs (--backend triton,
    linear_cross_entropy not in --torch-ops), else micro_batch. Both from bench/memory.py's estimate
    (bench/results/memory-<preset>-*.json): the reserved peak of an eager step within the card's memory - 1 GiB."""
    p = PRESETS[preset]
    fused_head = backend == "triton" and "linear_cross_entropy" not in parse_op_list(torch_ops)
    return p.triton_micro_batch if fused_head and p.triton_micro_batch else p.micro_batch


def resolve_config(argv: list[str] | None) -> tuple[Config, Path | None]:
    """(config, checkpoint to resume from or None). Preset < checkpoint (with --resume) < explicit flags."""
    args = build_parser().parse_args(argv)
    return _resolve(args)


def _resolve(args: argparse.Namespace) -> tuple[Config, Path | None]:
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "download", "eval_only")}
    resume_path = None
    preset_hardware = True  # the hardware fields are the preset's (not a resumed run's own)
    if args.resume:
        if "out_dir" not in explicit:
            raise UserError("--resume needs the run's --out-dir")
        resume_path = latest_checkpoint(Path(explicit["out_dir"]))
        if resume_path is None:
            raise UserError(f"--resume: no complete checkpoint (ckpt_*.pt) in {explicit['out_dir']}; "
                            f"drop --resume to start a new run there")
        try:
            base = dict(load_checkpoint(resume_path)["run_config"])
        except (CheckpointError, KeyError) as e:
            raise UserError(f"--resume: {e}") from None
        for name, value in asdict(PRESETS[base["gpu"]]).items():  # fields newer than the checkpoint: the preset's
            base.setdefault(name, value)
        for name, value in explicit.items():
            if name in RUN_DEFINING and base.get(name) != value:
                raise UserError(f"--resume: --{name.replace('_', '-')} {value} conflicts with the checkpoint's "
                                f"{base.get(name)} ({resume_path.name}); drop the flag, or start a new --out-dir")
        # other hardware: take its preset's fields (`--gpu auto` on the checkpoint's own GPU is not other hardware)
        preset_hardware = "gpu" in explicit and resolve_preset(explicit["gpu"]) != base["gpu"]
        if preset_hardware:
            preset = asdict(PRESETS[resolve_preset(explicit["gpu"])])
            base.update({k: preset[k] for k in HARDWARE})
        merged = {**base, **explicit}
        merged["gpu"] = resolve_preset(merged["gpu"])
    else:
        gpu = resolve_preset(explicit.get("gpu", "auto"))
        merged = {**asdict(PRESETS[gpu]), **explicit, "gpu": gpu}
        if "out_dir" not in merged:
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            merged["out_dir"] = str(Path("runs") / f"{stamp}-{gpu}-{merged['model']}")
    # The running GPU's peak, also after a resume, where the checkpoint may hold another variant's (an H100
    # PCIe run's 756 resumed on an SXM part must become 989). A peak the user set keeps its value, unless it
    # equals one of the automatic ones (the checkpoint does not say which it was).
    if "peak_tflops" not in explicit and merged["peak_tflops"] in automatic_peaks(merged["gpu"]):
        merged["peak_tflops"] = peak_tflops_for(merged["gpu"])
    try:
        merged["torch_ops"] = ",".join(parse_op_list(merged["torch_ops"]))
    except ValueError as e:
        raise UserError(f"--torch-ops: {e}") from None
    if merged["backend"] == "torch" and merged["torch_ops"]:
        if explicit.get("torch_ops"):
            raise UserError(f"--torch-ops {merged['torch_ops']} applies to --backend triton (under --backend torch "
                            f"every op is torch already): add --backend triton, or drop --torch-ops")
        merged["torch_ops"] = ""  # a resumed triton run switched to --backend torch: nothing left to keep
    if preset_hardware and "micro_batch" not in explicit:  # the preset's, for the backend that runs
        merged["micro_batch"] = preset_micro_batch(merged["gpu"], merged["backend"], merged["torch_ops"])
    cfg = Config(**{f.name: merged[f.name] for f in fields(Config)})
    validate(cfg)
    return cfg, resume_path


def validate(cfg: Config) -> None:
    positive = ["micro_batch", "total_batch_tokens", "seq_len", "max_steps", "val_every", "val_tokens"]
    for name in positive:
        if getattr(cfg, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ["warmup_steps", "timing_warmup_steps", "weight_decay", "grad_clip", "memory_gib",
                 "checkpoint_every", "keep_checkpoints", "max_bad_steps", "hellaswag_every"]:
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.total_batch_tokens % (cfg.tokens_per_micro_batch * world):
        raise UserError(f"--total-batch-tokens {cfg.total_batch_tokens} does not split over {world} ranks of "
                        f"micro-batch x seq-len = {cfg.tokens_per_micro_batch}: make it a multiple of "
                        f"{cfg.tokens_per_micro_batch * world}")
    if cfg.init_from and cfg.init_from.split(":", 1)[0] not in ("hf", "llmc", "ckpt"):
        raise UserError(f"--init-from {cfg.init_from}: use hf:PATH, llmc:PATH or ckpt:PATH")
    if cfg.val_tokens < cfg.tokens_per_micro_batch:
        raise UserError(f"--val-tokens {cfg.val_tokens} is less than one micro-batch "
                        f"({cfg.tokens_per_micro_batch} tokens): raise it or lower --micro-batch")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--gpu {cfg.gpu} needs a CUDA GPU and none is visible; "
                        f"for a CPU smoke run use --gpu cpu --model tiny --data sample")
    if cfg.device == "cpu" and cfg.dtype == "bf16":
        raise UserError("--dtype bf16 is for GPUs; on --gpu cpu use --dtype fp32")


# -------------------------------------------------------------------------------------------- data
def open_data(cfg: Config, download: bool = False):
    """Return (train_files, val_file), or raise UserError naming the problem and the fix."""
    from data.fineweb import download_command
    from data.shards import ShardError, find_shards, read_header

    if cfg.data == "sample":
        from data.sample import prepare_sample

        data_dir = prepare_sample()
    else:
        data_dir = Path(cfg.data)
        if download and not (find_shards(data_dir, "train") and find_shards(data_dir, "val")):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError(f"--download under torchrun: fetch the shards first with "
                                f"`{download_command(data_dir)}`, then launch the ranks")
            from data import fineweb

            print(f"--download: {download_command(data_dir)}", flush=True)
            if fineweb.main(["--out-dir", str(data_dir)]) != 0:
                raise UserError(f"--download into {data_dir} failed (see the line above); "
                                f"rerun `{download_command(data_dir)}` once it is fixed")
        if not data_dir.is_dir():
            raise UserError(f"--data {cfg.data}: no such directory; fetch FineWeb shards into it with "
                            f"`{download_command(data_dir)}` (or add --download), or use --data sample")
    train, val = find_shards(data_dir, "train"), find_shards(data_dir, "val")
    if not train or not val:
        missing = " and ".join(s for s, f in (("*_train_*.bin", train), ("*_val_*.bin", val)) if not f)
        raise UserError(f"--data {data_dir}: no {missing} shards there; fetch them with "
                        f"`{download_command(data_dir)}` (or add --download), or use --data sample")
    try:
        val_tokens = read_header(val[0])  # every train header is checked by the loader (ShardLoader)
    except ShardError as e:
        raise UserError(bad_shard_message(e)) from None
    if val_tokens < cfg.val_tokens + 1:
        raise UserError(f"val shard {val[0]} has {val_tokens} tokens, fewer than --val-tokens "
                        f"{cfg.val_tokens} + 1: lower --val-tokens")
    return train, val[0]


def bad_shard_message(e) -> str:
    return f"bad shard {e} (re-download or re-tokenize it)"


def check_out_dir(path: Path, resuming: bool) -> None:
    rank0 = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 soon writes result.json itself
    if rank0 and not resuming and (path / "result.json").exists():
        raise UserError(f"--out-dir {path} already holds a run (result.json): continue it with --resume, "
                        f"or pick a new --out-dir")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out-dir {path} is not writable ({e.strerror}): pick another --out-dir") from None


def oom_message(cfg: Config) -> str:
    return (f"CUDA out of memory at --micro-batch {cfg.micro_batch} --seq-len {cfg.seq_len} --model {cfg.model} "
            f"(budget {cfg.memory_gib or 'whole GPU'} GiB): lower --micro-batch (grad accumulation grows to "
            f"keep --total-batch-tokens), --seq-len or --model, or raise --memory-gib if the card has more")


def main(argv: list[str] | None = None) -> int:
    import training
    from data.shards import ShardError

    cfg = None
    try:
        args = build_parser().parse_args(argv)
        if args.eval_only and args.resume:
            raise UserError("--eval-only with --resume would rewrite that run's record: score a run's weights "
                            "with --init-from ckpt:RUN_DIR --eval-only --out-dir NEW_DIR")
        cfg, resume_path = _resolve(args)
        out_dir = Path(cfg.out_dir)
        check_out_dir(out_dir, resuming=resume_path is not None)
        if cfg.device == "cpu" and cfg.backend == "triton":
            try:
                use_cpu_interpreter()  # before anything imports triton
            except RuntimeError as e:
                raise UserError(str(e)) from None
        train_files, val_file = open_data(cfg, download=args.download)
        result = training.run(cfg, out_dir, train_files, val_file, resume_from=resume_path,
                              eval_only=args.eval_only)
        return result.get("exit_code", 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ShardError as e:  # raised by the loaders, which validate every shard header
        print(f"error: {bad_shard_message(e)}", file=sys.stderr)
        return 2
    except training.InitError as e:
        print(f"error: --init-from {cfg.init_from}: {e}", file=sys.stderr)
        return 2
    except torch.OutOfMemoryError:
        print(f"error: {oom_message(cfg)}", file=sys.stderr)
        return 2
    except training.TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted: result.json holds the record up to the last validation", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
