"""Hardware presets (--gpu): what each card holds and how fast it multiplies, the defaults that suit it, and the
peak MFU is measured against. `--gpu auto` picks one by the CUDA device's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonrun.data.fineweb import DEFAULT_OUT_DIR  # the default --data: where tritonrun.data.fineweb writes
from tritonrun.data.hellaswag import DEFAULT_PATH as HELLASWAG_PATH
from tritonrun.errors import UserError
from tritonrun.gpt2.ops import parse_op_list


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


def mfu_peak_info(cfg, device_name: str) -> dict | None:
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


def fused_head(backend: str, torch_ops: str) -> bool:
    """Whether the fused LM head + cross-entropy kernel runs (it keeps no tokens x vocab logits in memory)."""
    return backend == "triton" and "linear_cross_entropy" not in parse_op_list(torch_ops)


def preset_seq_len(preset: str, backend: str, torch_ops: str = "") -> int:
    """The preset's packed sequence length for a packed recipe: triton_speedrun_seq_len when the fused LM head runs
    (fused_head), else speedrun_seq_len (bench/memory.py's estimate, as preset_micro_batch)."""
    p = PRESETS[preset]
    fused = fused_head(backend, torch_ops) and p.triton_speedrun_seq_len
    return p.triton_speedrun_seq_len if fused else p.speedrun_seq_len


def preset_micro_batch(preset: str, backend: str, torch_ops: str, recipe) -> int:
    """The preset's micro-batch for this backend and recipe: 1 for a packed recipe (one packed sequence; its size
    is the packed length, preset_seq_len); triton_micro_batch when the fused LM head runs (--backend triton,
    linear_cross_entropy not in --torch-ops; it fits every dense recipe), else speedrun_micro_batch for a model with
    the softcapped torch LM head (its fp32 logits through tanh), else micro_batch. All from bench/memory.py's
    estimate (bench/results/memory-[speedrun-]<preset>-*.json): the reserved peak of an eager step within the card's
    memory - 1 GiB."""
    if recipe.packed:
        return 1
    p = PRESETS[preset]
    if fused_head(backend, torch_ops) and p.triton_micro_batch:
        return p.triton_micro_batch
    if recipe.softcapped_head and p.speedrun_micro_batch:
        return p.speedrun_micro_batch
    return p.micro_batch
