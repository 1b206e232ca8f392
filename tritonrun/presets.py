"""Hardware presets (--gpu): what each card holds and how fast it multiplies, the GPU the kernels plan for, and the
peak MFU is measured against. `--gpu auto` picks one by the CUDA device's name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tritonrun.errors import UserError
from tritonrun.gpt2.ops import parse_op_list


@dataclass(frozen=True)
class Preset:
    """One card: what it holds, how fast it multiplies, which GPU the kernels plan for, and how it runs by default.
    Nothing here names a recipe: the run's values are tritonrun/defaults.py's and the recipe's, and the micro-batch
    (dense recipes) or packed length (packed recipes) is derived from `memory_gib` at startup by the memory
    estimate (tritonrun.memory.fit_preset)."""
    memory_gib: float  # the card's memory: the CUDA allocator is capped to it (emulates a smaller card)
    peak_tflops: float | None  # dense bf16 tensor-core peak with fp32 accumulate, for MFU
    arch: str | None  # compute capability, e.g. "sm_89" (None: no GPU)
    sm_count: int  # streaming multiprocessors (persistent kernels size their grids and scratch by it)
    # torch until the Triton kernels have GPU-validated records in bench/results (issue 9); opt in with
    # --backend triton, which already falls back per op where a kernel has not landed.
    backend: str = "torch"
    compile: bool = True
    dtype: str = "bf16"
    timing_warmup_steps: int = 3  # untimed real steps before the clock starts (compile, autotune)
    device: str = "cuda"


# Hardware facts: memory, peak (NVIDIA datasheets; GeForce: SMs x boost clock x 512 FLOP/clock/SM), architecture
# and SM count (REFERENCE.md).
PRESETS: dict[str, Preset] = {
    "rtx4070": Preset(memory_gib=12, peak_tflops=58.3, arch="sm_89", sm_count=46),
    "rtx4070ti": Preset(memory_gib=12, peak_tflops=80.2, arch="sm_89", sm_count=60),
    "rtx4090": Preset(memory_gib=24, peak_tflops=165.2, arch="sm_89", sm_count=128),
    "rtx3090": Preset(memory_gib=24, peak_tflops=71.0, arch="sm_86", sm_count=82),
    "a100": Preset(memory_gib=40, peak_tflops=312.0, arch="sm_80", sm_count=108),
    "h100": Preset(memory_gib=80, peak_tflops=989.0, arch="sm_90", sm_count=132),
    "h200": Preset(memory_gib=141, peak_tflops=989.0, arch="sm_90", sm_count=132),
    # no GPU: fp32, eager, torch ops; train_speedrun.py gives it the smoke run's defaults (tritonrun/defaults.py)
    "cpu": Preset(memory_gib=0, peak_tflops=None, arch=None, sm_count=0, compile=False, dtype="fp32",
                  timing_warmup_steps=1, device="cpu"),
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
                        f"figures, e.g. --gpu rtx4070 --memory-gib 8 --peak-tflops 40 (the batch is sized for "
                        f"--memory-gib)")
    for needle, preset in AUTO_NAMES:
        if needle in gpu:
            return preset
    raise UserError(f"--gpu auto does not know {torch.cuda.get_device_name()!r}: "
                    f"pass the closest preset and your card's memory, e.g. --gpu rtx4090 --memory-gib 20")


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


# FP8 tensor cores (e4m3 / e5m2 operands, fp32 accumulate, dense) run at twice the bf16 rate where they exist: Ada
# (GeForce whitepaper: RTX 4070 FP8 116.6 vs BF16 58.3 TFLOPS, both with fp32 accumulate) and Hopper (H100 SXM
# datasheet 1,979 vs 989). Ampere (sm_80, sm_86) has none.
FP8_RATIO = {"sm_89": 2.0, "sm_90": 2.0}


def fp8_peak_tflops_for(preset: str, device_name: str | None = None) -> float | None:
    """The dense FP8 peak (fp32 accumulate) of `preset` on this machine's GPU: FP8_RATIO x its bf16 peak
    (peak_tflops_for: variants included); None where the architecture has no FP8 tensor cores."""
    ratio = FP8_RATIO.get(PRESETS[preset].arch)
    bf16 = peak_tflops_for(preset, device_name)
    return None if ratio is None or bf16 is None else round(ratio * bf16, 1)


def mixed_mfu(flops_bf16: float, flops_fp8: float, seconds: float, bf16_peak: float,
              fp8_peak: float | None) -> float:
    """MFU with each matmul at its own precision's peak: the time the work would take at peak, (bf16 FLOPs / bf16
    peak + FP8 FLOPs / FP8 peak), over the time it took. Equal to FLOPs / (peak x seconds) without FP8 work."""
    if flops_fp8 and fp8_peak is None:
        raise ValueError("FP8 FLOPs on a GPU without an FP8 peak (no FP8 tensor cores)")
    at_peak = flops_bf16 / (bf16_peak * 1e12) + (flops_fp8 / (fp8_peak * 1e12) if flops_fp8 else 0.0)
    return at_peak / seconds


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
