"""Train a GPT on FineWeb to val loss <= 3.28 as fast as possible, under one of three recipes.

    python train_speedrun.py --gpu rtx4070                              # the main job (--recipe speedrun)
    python train_speedrun.py --gpu rtx4070 --recipe gpt2                # llm.c's GPT-2 124M recipe
    python train_speedrun.py --gpu cpu --model tiny --data sample       # CPU smoke run, no download

Recipes (--recipe; GPU presets default to speedrun, the cpu preset to gpt2):
  gpt2      GPT-2 (tritonrun/gpt2/model.py) with llm.c's recipe: AdamW (--lr peak, --beta1/--beta2, --weight-decay on
            2-D weights), --warmup-steps linear warmup, cosine to --lr x --final-lr-frac at --max-steps, --grad-clip.
  speedrun  modded-nanogpt's 2024-12-17 record (tritonrun/gpt2/speedrun.py, 0.78B tokens to 3.28): each micro-batch is
            ONE packed sequence of --seq-len tokens (data/loader.PackedLoader, starts at document starts; --micro-batch
            is 1), document-masked sliding-window attention whose window grows with the step in blocks of 128
            tokens, 128 -> 1,792; 3 U-net value-embedding tables, block 7 without attention. Adam on wte and the
            value tables (lr 0.6), lm_head (0.008) and the scalars (0.04), betas --beta1/--beta2 (0.8, 0.95), no
            decay; Muon (tritonrun/kernels/muon.py, lr 0.05, Nesterov, EMA momentum 0.85 -> 0.95 over 300 steps,
            --muon-coefficients) on the blocks' matrices. --lr is a MULTIPLIER on every group's base lr (default
            1.0 = the record's lrs). Schedule: --warmup-steps linear warmup (default 0), constant, then linear to 0
            over the last 600/1490 of --max-steps. GPU preset defaults become the record's: --max-steps 1490,
            --val-every 125, --grad-clip 0 (off), --total-batch-tokens 524288 (the record's 8 GPUs x 65,536) by
            gradient accumulation over --seq-len micro-batches (the preset's, sized for its memory).
  speedrun-dense  the 2024-11-10 record (dense causal T = 1024, 1.57B tokens): as speedrun without the packing,
            window and value embeddings; its own values: --micro-batch sequences of 1024, betas (0.9, 0.95), Muon
            lr 0.04 with momentum warmup over 500 steps, --max-steps 3000, cooldown the last 900/3000.
  Under both speedrun recipes --weight-decay and --final-lr-frac do not apply and are refused; --init-from takes
  only ckpt: of a run of the same recipe. --model is tiny or d12 (the record's 12 x 768, 6 heads of 128).

A preset (--gpu) sets micro-batch, dtype, backend, compile, memory budget and the peak FLOPs used for
MFU; every field can be overridden by its long flag. The clock excludes validation and an untimed
warm-up (compile, autotune) that runs real steps and then restores the initial weights, optimizer
state and data position. The out dir gets train.log, result.json, leaderboard.md (finished runs),
loss.png and checkpoints (the last at the end); a run holds a lock on it while it lives.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import math
import os
import socket
import sys
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path

import torch

from tritonrun.data.fineweb import DEFAULT_OUT_DIR  # (the default --data: where tritonrun.data.fineweb writes)
from tritonrun.data.hellaswag import DEFAULT_PATH as HELLASWAG_PATH
from tritonrun.gpt2 import MODEL_SIZES
from tritonrun.gpt2.checkpoint import CheckpointError, checkpoint_model_kind, list_checkpoints, load_checkpoint
from tritonrun.gpt2.ops import BACKENDS, TRITON_OPS, parse_op_list, use_cpu_interpreter



# ----------------------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    micro_batch: int  # sequences per forward/backward; grad accumulation makes up total_batch_tokens
    memory_gib: float  # memory budget: the CUDA allocator is capped to it (emulates a smaller card)
    peak_tflops: float | None  # dense bf16 tensor-core peak with fp32 accumulate, for MFU
    # torch until the Triton kernels have GPU-validated records in bench/results (issue 9); opt in with
    # --backend triton, which already falls back per op where a kernel has not landed.
    backend: str = "torch"
    torch_ops: str = ""  # under --backend triton, these ops (comma list, tritonrun/gpt2/ops.py names) stay torch
    compile: bool = True
    dtype: str = "bf16"
    model: str = "d12"
    data: str = DEFAULT_OUT_DIR
    recipe: str = "speedrun"  # see RECIPES; --recipe gpt2 is llm.c's (the cpu preset's default)
    seq_len: int = 1024
    total_batch_tokens: int = 524_288  # 2**19, llm.c and the speedrun record
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
    checkpoint_every: int = 500  # steps between checkpoints (0 = none; the end and SIGINT/SIGTERM still write one)
    keep_checkpoints: int = 2  # newest K checkpoints kept (0 = all)
    max_bad_steps: int = 3  # non-finite steps in a row tolerated before the run stops
    init_from: str | None = None  # hf:PATH, llmc:PATH or ckpt:PATH instead of a fresh init
    hellaswag_every: int = 1000  # HellaSwag eval every N steps and at the end, when the file exists (0 = off)
    hellaswag_path: str = str(HELLASWAG_PATH)  # written by `python -m tritonrun.data.hellaswag`
    # micro-batch under --backend triton with the fused LM head (linear_cross_entropy not in --torch-ops): it keeps
    # no (tokens x vocab) fp32 logits, so more sequences fit (see triton_micro_batch_for). None: micro_batch.
    triton_micro_batch: int | None = None
    # micro-batch of the speedrun recipe with the torch LM head (its fp32 softcapped logits and the torch ops' saved
    # tensors take more than GPT-2's: bench/results/memory-speedrun-dense-<preset>-*.json). None: micro_batch.
    speedrun_micro_batch: int | None = None
    muon_coefficients: str = "quintic"  # speedrun: Newton-Schulz coefficients (the record's quintic, polar_express)
    # --recipe speedrun: tokens per packed micro-batch (--seq-len; --micro-batch is 1) with the torch LM head, and
    # with the fused one (--backend triton): the largest power of two bench/memory.py --recipe speedrun --max found
    # to fit (bench/results/memory-speedrun-packed-<preset>-*.json), at most the record's 65,536 per H100.
    speedrun_seq_len: int | None = None
    triton_speedrun_seq_len: int | None = None


PRESETS: dict[str, Preset] = {
    # micro_batch: the torch LM head (fp32 logits materialized); triton_micro_batch: the fused one (gpt2 and
    # speedrun-dense); speedrun_micro_batch: the torch LM head under --recipe speedrun-dense. All fit by
    # bench/memory.py's estimate (bench/results/memory-<preset>-*, memory-speedrun-dense-*; tests/test_memory.py
    # checks it).
    # speedrun_seq_len / triton_speedrun_seq_len: --recipe speedrun's packed length with the torch / fused LM head,
    # the largest power of two `bench/memory.py --gpu <preset> --recipe speedrun --max` finds within memory - 1 GiB
    # (eager; 12 GB cards: 4,096 / 8,192 tokens, 16,384 needs 11.81 GiB reserved with the fused head).
    "rtx4070": Preset(micro_batch=8, memory_gib=12, peak_tflops=58.3, triton_micro_batch=16, speedrun_micro_batch=4,
                      speedrun_seq_len=4096, triton_speedrun_seq_len=8192),
    "rtx4070ti": Preset(micro_batch=8, memory_gib=12, peak_tflops=80.2, triton_micro_batch=16, speedrun_micro_batch=4,
                        speedrun_seq_len=4096, triton_speedrun_seq_len=8192),
    "rtx4090": Preset(micro_batch=16, memory_gib=24, peak_tflops=165.2, triton_micro_batch=32, speedrun_micro_batch=8,
                      speedrun_seq_len=8192, triton_speedrun_seq_len=32768),
    "rtx3090": Preset(micro_batch=16, memory_gib=24, peak_tflops=71.0, triton_micro_batch=32, speedrun_micro_batch=8,
                      speedrun_seq_len=8192, triton_speedrun_seq_len=32768),
    "a100": Preset(micro_batch=32, memory_gib=40, peak_tflops=312.0, triton_micro_batch=64, speedrun_micro_batch=16,
                   speedrun_seq_len=16384, triton_speedrun_seq_len=65536),
    "h100": Preset(micro_batch=64, memory_gib=80, peak_tflops=989.0, triton_micro_batch=128, speedrun_micro_batch=32,
                   speedrun_seq_len=32768, triton_speedrun_seq_len=65536),
    "h200": Preset(micro_batch=64, memory_gib=141, peak_tflops=989.0, triton_micro_batch=256, speedrun_micro_batch=64,
                   speedrun_seq_len=65536, triton_speedrun_seq_len=65536),
    "cpu": Preset(
        micro_batch=4, memory_gib=0, peak_tflops=None, backend="torch", compile=False, dtype="fp32",
        model="tiny", recipe="gpt2", data="sample", seq_len=128, total_batch_tokens=1024, lr=2e-3, warmup_steps=10,
        max_steps=50, val_every=25, val_tokens=8192, timing_warmup_steps=1, device="cpu", checkpoint_every=0,
        hellaswag_every=0, speedrun_seq_len=256,
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

# ----------------------------------------------------------------------------------------- recipes
RECIPES = ("gpt2", "speedrun", "speedrun-dense")
SPEEDRUN_RECIPES = ("speedrun", "speedrun-dense")  # tritonrun/gpt2/speedrun.py's two records (SpeedrunConfig.recipe)
# The speedrun recipes' fields over any preset (the record's, tritonrun/gpt2/speedrun.py SpeedrunConfig): --lr is a
# multiplier on each optimizer group's base lr, no warmup, no decay, no clipping, cooldown to 0; the Adam betas
# are the record's (speedrun_defaults adds them).
SPEEDRUN_DEFAULTS = {"lr": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "final_lr_frac": 0.0}
# Flags with no meaning under speedrun: refused with the reason when given.
SPEEDRUN_REFUSED = {"weight_decay": "the record decays nothing (Adam and Muon without weight decay)",
                    "final_lr_frac": "its cooldown goes linearly to 0 over the record's last fraction of --max-steps"}
GPT2_REFUSED = {"muon_coefficients": "gpt2 trains with AdamW only (no Muon)"}
# tritonrun/kernels/muon.py COEFFICIENTS (not imported: it loads kernels)
MUON_COEFFICIENTS = ("quintic", "polar_express")


def record_config(recipe: str):
    """The speedrun record's SpeedrunConfig (its d12) for a speedrun recipe."""
    from tritonrun.gpt2.speedrun import speedrun_models

    return speedrun_models(recipe)["d12"]


def recipe_defaults(recipe: str, gpu: str) -> dict:
    """The fields a recipe sets over preset `gpu`'s (none for gpt2: the presets are llm.c's). GPU presets (not the
    cpu preset's short smoke run) also take the record's length and val cadence; --recipe speedrun takes the
    preset's packed sequence length and one sequence per micro-batch."""
    if recipe not in SPEEDRUN_RECIPES:
        return {}
    rc = record_config(recipe)
    out = {**SPEEDRUN_DEFAULTS, "beta1": rc.adam_betas[0], "beta2": rc.adam_betas[1]}
    if gpu != "cpu":
        out.update(max_steps=rc.num_iterations, val_every=rc.val_every)
    if recipe == "speedrun":
        out.update(seq_len=PRESETS[gpu].speedrun_seq_len, micro_batch=1)
    return out


def cooldown_steps(max_steps: int, recipe: str = "speedrun") -> int:
    """Steps of the speedrun's linear cooldown: the record's fraction of any run (600 of 1490; speedrun-dense: 900
    of 3000)."""
    rc = record_config(recipe)
    return round(max_steps * rc.warmdown_iters / rc.num_iterations)


def model_sizes(recipe: str) -> dict:
    """--model's names for a recipe: gpt2.MODEL_SIZES (GPTConfig) or gpt2.speedrun's SPEEDRUN_MODELS /
    SPEEDRUN_DENSE_MODELS."""
    if recipe in SPEEDRUN_RECIPES:
        from tritonrun.gpt2.speedrun import speedrun_models

        return speedrun_models(recipe)
    return MODEL_SIZES


@dataclass(frozen=True)
class Config:
    """The resolved run configuration: a preset with the user's flags on top."""
    gpu: str
    model: str
    recipe: str
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
    muon_coefficients: str

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
                epilog=next(par for par in __doc__.split("\n\n") if par.startswith("Recipes"))
                + "\n\nFlags left out take the preset's value (with --resume: the checkpoint's).")
    p.add_argument("--gpu", choices=[*PRESETS, "auto"],
                   help="preset (default auto: picked by the CUDA device's name, cpu when there is none)")
    p.add_argument("--model", choices=list(MODEL_SIZES),
                   help="model size (d12 = GPT-2 124M; under the speedrun recipes: tiny or d12, the record's model)")
    p.add_argument("--recipe", choices=RECIPES,
                   help="gpt2 (llm.c), speedrun (modded-nanogpt 2024-12-17, packed windowed) or speedrun-dense "
                        "(2024-11-10, T = 1024); default speedrun on GPU presets, gpt2 on cpu (see above)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward (speedrun: 1 packed sequence)")
    p.add_argument("--total-batch-tokens", type=int, help="tokens per optimizer step (default 524288)")
    p.add_argument("--seq-len", type=int, help="sequence length T (speedrun: tokens per packed micro-batch)")
    p.add_argument("--lr", type=float, help="gpt2: peak learning rate; speedrun: multiplier on every group's "
                                            "base lr (default 1.0)")
    p.add_argument("--final-lr-frac", type=float, help="gpt2: cosine decays to lr*this (llm.c: 0)")
    p.add_argument("--warmup-steps", type=int, help="linear lr warmup steps (speedrun default 0)")
    p.add_argument("--max-steps", type=int, help="optimizer steps; the schedule (lr, window) ends here (speedrun "
                                                 "default 1490, speedrun-dense 3000)")
    p.add_argument("--weight-decay", type=float, help="gpt2: AdamW decay on 2-D weights only (default 0.1)")
    p.add_argument("--grad-clip", type=float, help="global grad-norm clip, 0 = off (gpt2 1.0, speedrun 0)")
    p.add_argument("--beta1", type=float, help="AdamW / the speedrun's Adam groups' beta1 (default 0.9; speedrun 0.8)")
    p.add_argument("--beta2", type=float, help="AdamW / the speedrun's Adam groups' beta2 (default 0.95)")
    p.add_argument("--muon-coefficients", choices=MUON_COEFFICIENTS,
                   help="speedrun: Muon's Newton-Schulz coefficients (default quintic, the record's)")
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
    p.add_argument("--checkpoint-every", type=int,
                   help="checkpoint every N steps (default 500 on GPUs); the end and SIGINT/SIGTERM always write one")
    p.add_argument("--keep-checkpoints", type=int, help="keep the newest K checkpoints, 0 = all (default 2)")
    p.add_argument("--max-bad-steps", type=int, help="non-finite steps in a row before the run stops (default 3)")
    p.add_argument("--init-from", help="start from weights: hf:PATH (Hugging Face GPT-2), llmc:PATH, ckpt:PATH")
    p.add_argument("--hellaswag-every", type=int, help="HellaSwag eval every N steps, 0 = off (default 1000 on GPUs)")
    p.add_argument("--hellaswag-path",
                   help="tokenized HellaSwag val file (python -m tritonrun.data.hellaswag writes it)")
    p.add_argument("--resume", action="store_true", help="continue the newest complete checkpoint in --out-dir")
    p.add_argument("--eval-only", action="store_true",
                   help="score the starting weights (--init-from / --resume) on val and HellaSwag, no training")
    p.add_argument("--download", action="store_true",
                   help="if --data has no shards, download FineWeb into it first (python -m tritonrun.data.fineweb)")
    return p


# Fields that change the math of a run: a resumed run may not change them (it would not be the same run).
# The rest (hardware, batching split, logging, target) may differ on resume.
RUN_DEFINING = ("model", "recipe", "muon_coefficients", "total_batch_tokens", "seq_len", "lr", "final_lr_frac",
                "warmup_steps", "max_steps",
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


def preset_seq_len(preset: str, backend: str, torch_ops: str = "") -> int:
    """The preset's packed sequence length under --recipe speedrun: triton_speedrun_seq_len when the fused LM head
    runs (--backend triton, linear_cross_entropy not in --torch-ops), else speedrun_seq_len (bench/memory.py's
    estimate, as preset_micro_batch)."""
    p = PRESETS[preset]
    fused_head = backend == "triton" and "linear_cross_entropy" not in parse_op_list(torch_ops)
    return p.triton_speedrun_seq_len if fused_head and p.triton_speedrun_seq_len else p.speedrun_seq_len


def preset_micro_batch(preset: str, backend: str, torch_ops: str = "", recipe: str = "gpt2") -> int:
    """The preset's micro-batch for this backend and recipe: 1 under --recipe speedrun (one packed sequence; its
    size is speedrun_seq_len); triton_micro_batch when the fused LM head runs (--backend triton,
    linear_cross_entropy not in --torch-ops; it fits gpt2 and speedrun-dense), else speedrun_micro_batch under
    --recipe speedrun-dense, else micro_batch. All from bench/memory.py's estimate
    (bench/results/memory-[speedrun-]<preset>-*.json): the reserved peak of an eager step within the card's memory
    - 1 GiB."""
    if recipe == "speedrun":
        return 1
    p = PRESETS[preset]
    fused_head = backend == "triton" and "linear_cross_entropy" not in parse_op_list(torch_ops)
    if fused_head and p.triton_micro_batch:
        return p.triton_micro_batch
    if recipe == "speedrun-dense" and p.speedrun_micro_batch:
        return p.speedrun_micro_batch
    return p.micro_batch


def resolve_config(argv: list[str] | None) -> tuple[Config, Path | None]:
    """(config, checkpoint to resume from or None). Preset < checkpoint (with --resume) < explicit flags."""
    args = build_parser().parse_args(argv)
    return _resolve(args)


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


def _resolve(args: argparse.Namespace) -> tuple[Config, Path | None]:
    explicit = {k: v for k, v in vars(args).items() if v is not None and k not in ("resume", "download", "eval_only")}
    resume_path = None
    preset_hardware = True  # the hardware fields are the preset's (not a resumed run's own)
    if args.resume:
        if "out_dir" not in explicit:
            raise UserError("--resume needs the run's --out-dir")
        out_dir = Path(explicit["out_dir"])
        resume_path, ckpt = newest_loadable_checkpoint(out_dir)
        base = dict(ckpt["run_config"])
        base.setdefault("recipe", "gpt2")  # checkpoints from before --recipe: gpt2 was the only one
        if base["recipe"] == "speedrun" and checkpoint_model_kind(ckpt) == "speedrun-dense":
            base["recipe"] = "speedrun-dense"  # a run from before the 2024-12-17 recipe took the name speedrun
        for name, value in asdict(PRESETS[base["gpu"]]).items():  # fields newer than the checkpoint: the preset's
            base.setdefault(name, value)
        extending = check_not_finished(out_dir, ckpt, base, explicit)
        del ckpt
        for name, value in explicit.items():
            if name == "max_steps" and extending:
                continue
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
        recipe = explicit.get("recipe")
        if explicit.get("init_from"):
            recipe = init_recipe(explicit["init_from"], recipe)
        recipe = recipe or PRESETS[gpu].recipe
        merged = {**asdict(PRESETS[gpu]), **recipe_defaults(recipe, gpu), **explicit, "gpu": gpu, "recipe": recipe}
        if merged.get("init_from"):
            merged["model"] = init_model_size(merged["init_from"], explicit.get("model"), recipe)
        if "out_dir" not in merged:  # main() creates it exclusively (default_out_dir): a suffix if it exists
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
        merged["micro_batch"] = preset_micro_batch(merged["gpu"], merged["backend"], merged["torch_ops"],
                                                   merged["recipe"])
    if resume_path is None and merged["recipe"] == "speedrun" and "seq_len" not in explicit:
        # the packed length for the backend that runs (run-defining: a resumed run keeps its own)
        merged["seq_len"] = preset_seq_len(merged["gpu"], merged["backend"], merged["torch_ops"])
    speedrun = merged["recipe"] in SPEEDRUN_RECIPES
    refused = SPEEDRUN_REFUSED if speedrun else GPT2_REFUSED
    for name, why in refused.items():
        if name in explicit:
            raise UserError(f"--{name.replace('_', '-')} does not apply to --recipe {merged['recipe']} ({why}): "
                            f"drop it" + (", or use --recipe gpt2" if speedrun else ""))
    if merged["recipe"] == "speedrun" and merged["micro_batch"] != 1:
        raise UserError(f"--micro-batch {merged['micro_batch']} does not apply to --recipe speedrun (each micro-batch "
                        f"is one packed sequence of --seq-len tokens): drop it and size --seq-len instead")
    cfg = Config(**{f.name: merged[f.name] for f in fields(Config)})
    validate(cfg)
    return cfg, resume_path


def checkpoint_model(path: str) -> tuple[str, dict]:
    """(model kind, model config dict) of a tritonrun checkpoint (file or run dir), without reading its tensors.
    Kind "gpt2" for checkpoints from before "model_kind" was written. UserError when it does not load."""
    from tritonrun.gpt2.checkpoint import resolve_checkpoint

    try:
        ckpt = torch.load(resolve_checkpoint(path), map_location="cpu", weights_only=False, mmap=True)
        return checkpoint_model_kind(ckpt), dict(ckpt["model_config"])
    except CheckpointError as e:
        raise UserError(f"--init-from ckpt:{path}: {e}") from None
    except Exception as e:  # truncated / not a torch file / not ours
        raise UserError(f"--init-from ckpt:{path}: not a readable checkpoint ({type(e).__name__}: {e})") from None


def init_recipe(spec: str, asked: str | None) -> str | None:
    """The recipe --init-from `spec` implies: a checkpoint's model kind (a speedrun / speedrun-dense checkpoint
    trains on under its recipe), gpt2 for hf:/llmc: (GPT-2 weights). A --recipe that cannot train those weights
    is refused."""
    kind, _, path = spec.partition(":")
    if kind == "ckpt":
        try:
            have = checkpoint_model(path)[0]
        except UserError:
            return asked  # the model loader reports an unreadable checkpoint in its own words
    elif kind in ("hf", "llmc"):
        have = "gpt2"
    else:
        return asked  # validate() names the bad prefix
    if asked is not None and asked != have:
        raise UserError(f"--init-from {spec} holds a {have} model, which --recipe {asked} cannot train: drop "
                        f"--recipe (the weights decide it) or pass --recipe {have}")
    return have


def speedrun_init_size(spec: str, asked: str | None, recipe: str = "speedrun") -> str:
    """--model name of the speedrun checkpoint --init-from ckpt:PATH holds (matched on the model's shape)."""
    from tritonrun.gpt2.speedrun import SpeedrunConfig, speedrun_models

    sizes = speedrun_models(recipe)
    shape = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "padded_vocab_size")
    have = SpeedrunConfig.from_dict(checkpoint_model(spec.partition(":")[2])[1]).to_dict()
    names = [n for n, c in sizes.items() if all(getattr(c, k) == have.get(k) for k in shape)]
    what = ", ".join(f"{k} {have.get(k)}" for k in shape)
    if not names:
        raise UserError(f"--init-from {spec}: its speedrun model ({what}) is none of --model's speedrun sizes "
                        f"({', '.join(sizes)})")
    if asked is not None and asked != names[0]:
        raise UserError(f"--init-from {spec} holds speedrun model {names[0]}, not --model {asked}: drop --model "
                        f"(the weights decide it) or pass --model {names[0]}")
    return names[0]


def init_model_size(spec: str, asked: str | None, recipe: str = "gpt2") -> str:
    """The --model name of the weights --init-from `spec` holds (their shape is read, not their weights). A
    --model the user gave that differs is refused: training the checkpoint's model while recording the flag's
    would mislabel the run, and silently building the flag's model would drop the weights the user asked for.
    Left out, the model is the source's (not the preset's default), so config, record and leaderboard say it."""
    if recipe in SPEEDRUN_RECIPES:
        return speedrun_init_size(spec, asked, recipe)
    from tritonrun.gpt2.hf import init_config

    try:
        shape = init_config(spec)
    except (ValueError, OSError) as e:  # the loaders' format errors are ValueErrors naming the file
        raise UserError(f"--init-from {spec}: {e}") from None
    key = lambda c: (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size)  # noqa: E731
    names = [name for name, size in MODEL_SIZES.items() if key(size) == key(shape)]
    what = f"{shape.n_layer} layers, {shape.n_head} heads, width {shape.n_embd}, context {shape.block_size}"
    if not names:
        raise UserError(f"--init-from {spec}: its model ({what}) is none of --model's sizes "
                        f"({', '.join(MODEL_SIZES)}); start from a GPT-2 of one of those sizes")
    if asked is not None and asked != names[0]:
        raise UserError(f"--init-from {spec} holds model {names[0]} ({what}), not --model {asked}: "
                        f"drop --model (the weights decide it) or pass --model {names[0]}")
    return names[0]


# Every numeric flag's range, as data: (fields, test, what the flag must be). Floats must also be finite; NaN fails
# every comparison, so each test is False for it.
NUMERIC_RANGES = [
    (("micro_batch", "total_batch_tokens", "seq_len", "max_steps", "val_every", "val_tokens"), lambda v: v > 0,
     "positive"),
    (("warmup_steps", "timing_warmup_steps", "checkpoint_every", "keep_checkpoints", "max_bad_steps",
      "hellaswag_every", "weight_decay", "grad_clip", "memory_gib", "target_val_loss"), lambda v: v >= 0, ">= 0"),
    (("lr",), lambda v: v > 0, "a positive number"),
    (("peak_tflops",), lambda v: v is None or v >= 0, ">= 0 (0: no MFU)"),
    (("final_lr_frac",), lambda v: 0 <= v <= 1, "in [0, 1]"),
    (("beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("seed",), lambda v: 0 <= v < 2**64, "in [0, 2**64)"),
]


def validate(cfg: Config) -> None:
    for names, ok, what in NUMERIC_RANGES:
        for name in names:
            v = getattr(cfg, name)
            flag = f"--{name.replace('_', '-')}"
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} must be a finite number ({what}), got {v}")
            if not ok(v):
                raise UserError(f"{flag} must be {what}, got {v}")
    sizes = model_sizes(cfg.recipe)
    if cfg.model not in sizes:
        raise UserError(f"--model {cfg.model} is not a --recipe {cfg.recipe} model: choose one of "
                        f"{', '.join(sizes)}, or use --recipe gpt2")
    if cfg.recipe in SPEEDRUN_RECIPES:
        cool = cooldown_steps(cfg.max_steps, cfg.recipe)
        if cfg.warmup_steps + cool > cfg.max_steps:
            raise UserError(f"--warmup-steps {cfg.warmup_steps} overlaps the speedrun cooldown (the last "
                            f"{cool} of --max-steps {cfg.max_steps}): lower --warmup-steps "
                            f"to at most {cfg.max_steps - cool}")
        if cfg.init_from and not cfg.init_from.startswith("ckpt:"):
            raise UserError(f"--init-from {cfg.init_from}: GPT-2 weights train under --recipe gpt2; --recipe "
                            f"{cfg.recipe} starts from ckpt:PATH of a {cfg.recipe} run, or from scratch")
    block = sizes[cfg.model].block_size
    if cfg.seq_len > block:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds model {cfg.model}'s context of {block}: lower --seq-len")
    if cfg.recipe == "speedrun" and cfg.total_batch_tokens % cfg.seq_len:
        k = max(1, round(cfg.total_batch_tokens / cfg.seq_len))
        raise UserError(f"--total-batch-tokens {cfg.total_batch_tokens} is not a multiple of --seq-len {cfg.seq_len} "
                        f"(--recipe speedrun accumulates packed sequences of --seq-len tokens): make it "
                        f"{k * cfg.seq_len} ({k} x {cfg.seq_len}), or pick a --seq-len that divides it")
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
    from tritonrun.data.fineweb import download_command
    from tritonrun.data.shards import ShardError, find_shards, read_header

    if cfg.data == "sample":
        from tritonrun.data.sample import prepare_sample

        data_dir = prepare_sample()
    else:
        data_dir = Path(cfg.data)
        if download and not (find_shards(data_dir, "train") and find_shards(data_dir, "val")):
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise UserError(f"--download under torchrun: fetch the shards first with "
                                f"`{download_command(data_dir)}`, then launch the ranks")
            from tritonrun.data import fineweb

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


def oom_message(cfg: Config) -> str:
    return (f"CUDA out of memory at --micro-batch {cfg.micro_batch} --seq-len {cfg.seq_len} --model {cfg.model} "
            f"(budget {cfg.memory_gib or 'whole GPU'} GiB): lower --micro-batch (grad accumulation grows to "
            f"keep --total-batch-tokens), --seq-len or --model, or raise --memory-gib if the card has more")


def main(argv: list[str] | None = None) -> int:
    from tritonrun import training
    from tritonrun.data.shards import ShardError

    cfg = lock = None
    try:
        args = build_parser().parse_args(argv)
        if args.eval_only and args.resume:
            raise UserError("--eval-only with --resume would rewrite that run's record: score a run's weights "
                            "with --init-from ckpt:RUN_DIR --eval-only --out-dir NEW_DIR")
        if args.resume and args.out_dir and int(os.environ.get("RANK", "0")) == 0:
            running = OutDirLock(Path(args.out_dir))
            if running.holder() is not None:  # before reading its checkpoints: they are still being written
                raise UserError(running.refusal())
        cfg, resume_path = _resolve(args)
        out_dir, lock = claim_out_dir(Path(cfg.out_dir), resuming=resume_path is not None,
                                      default_name=args.out_dir is None)
        cfg = replace(cfg, out_dir=str(out_dir))
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
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
