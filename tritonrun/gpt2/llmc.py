"""llm.c's GPT-2 model file (`gpt2_124M.bin`, `gpt2_124M_bf16.bin`, checkpoints of train_gpt2.cu): read and write.

Layout, verified against karpathy/llm.c at commit f1e2ace (2025-05-10): `write_model` / `write_tensors` in
train_gpt2.py (the Python exporter), `fill_in_parameter_sizes` and `gpt2_build_from_checkpoint` in train_gpt2.c
(the CPU reader) and `gpt2_write_to_checkpoint` in train_gpt2.cu (the CUDA trainer's own checkpoints):

  header: 256 int32, little-endian (1024 bytes)
    [0] magic 20240326        [1] version: 3 = every tensor fp32, 5 = every tensor bf16
    [2] max_seq_len (maxT)    [3] vocab_size (V, 50257)    [4] n_layer (L)    [5] n_head
    [6] n_embd (C)            [7] padded_vocab_size (Vp, 50304)                 [8..255] zero
  then the parameters, one flat array, grouped by kind across layers, each tensor row-major:
     0 wte       (Vp, C)       rows V..Vp-1 are padding (zero when exported by train_gpt2.py)
     1 wpe       (maxT, C)
     2 ln1w      (L, C)        h.{i}.ln_1.weight
     3 ln1b      (L, C)        h.{i}.ln_1.bias
     4 qkvw      (L, 3C, C)    h.{i}.attn.c_attn.weight, nn.Linear layout (out, in): no transpose
     5 qkvb      (L, 3C)
     6 attprojw  (L, C, C)     h.{i}.attn.c_proj.weight (out, in)
     7 attprojb  (L, C)
     8 ln2w      (L, C)
     9 ln2b      (L, C)
    10 fcw       (L, 4C, C)    h.{i}.mlp.c_fc.weight (out, in)
    11 fcb       (L, 4C)
    12 fcprojw   (L, C, 4C)    h.{i}.mlp.c_proj.weight (out, in)
    13 fcprojb   (L, C)
    14 lnfw      (C,)
    15 lnfb      (C,)
  File size = 1024 + (number of parameters) * (4 for fp32, 2 for bf16). The LM head is wte (tied).

bf16 (version 5) values are the top 16 bits of an fp32: reading shifts each uint16 left by 16 into an fp32,
which is exact. Writing bf16 rounds to nearest even (torch's fp32 -> bf16 cast), as llm.c's exporter does.
Older llm.c versions (1, 2: unpadded vocab, another order) and the Llama 3 file (magic 20240803) are refused.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.model import GPT

MAGIC = 20240326
VERSION_FP32 = 3
VERSION_BF16 = 5
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
_BYTES_PER_VALUE = {VERSION_FP32: 4, VERSION_BF16: 2}
_OTHER_MAGICS = {  # other llm.c files, named in the error when one is passed by mistake
    20240803: "llm.c's Llama 3 model file",
    20240520: "a token shard",
    20240327: "llm.c's debug state file",
}


class LlmcFormatError(ValueError):
    """An llm.c model file that is missing, malformed or of an unsupported version; str is one line naming it."""


def _tensor_specs(cfg: GPTConfig) -> list[tuple[str, tuple[int, ...]]]:
    """The 16 llm.c parameter groups in file order: (per-layer name suffix or full name, shape of the group)."""
    Vp, T, L, C = cfg.padded_vocab_size, cfg.block_size, cfg.n_layer, cfg.n_embd
    return [
        ("transformer.wte.weight", (Vp, C)),
        ("transformer.wpe.weight", (T, C)),
        ("ln_1.weight", (L, C)),
        ("ln_1.bias", (L, C)),
        ("attn.c_attn.weight", (L, 3 * C, C)),
        ("attn.c_attn.bias", (L, 3 * C)),
        ("attn.c_proj.weight", (L, C, C)),
        ("attn.c_proj.bias", (L, C)),
        ("ln_2.weight", (L, C)),
        ("ln_2.bias", (L, C)),
        ("mlp.c_fc.weight", (L, 4 * C, C)),
        ("mlp.c_fc.bias", (L, 4 * C)),
        ("mlp.c_proj.weight", (L, C, 4 * C)),
        ("mlp.c_proj.bias", (L, C)),
        ("transformer.ln_f.weight", (C,)),
        ("transformer.ln_f.bias", (C,)),
    ]


def _num_values(cfg: GPTConfig) -> int:
    return sum(int(np.prod(shape)) for _, shape in _tensor_specs(cfg))


def _config_from_header(path: Path, header: np.ndarray) -> tuple[int, GPTConfig]:
    magic, version = int(header[0]), int(header[1])
    if magic != MAGIC:
        what = _OTHER_MAGICS.get(magic)
        hint = f" ({what}, not a GPT-2 model)" if what else ""
        raise LlmcFormatError(f"{path}: bad magic {magic}{hint}; an llm.c GPT-2 model file starts with {MAGIC}")
    if version not in _BYTES_PER_VALUE:
        raise LlmcFormatError(
            f"{path}: llm.c model version {version} not supported (3 = fp32, 5 = bf16); "
            "re-export it with a current llm.c train_gpt2.py"
        )
    max_t, v, n_layer, n_head, n_embd, vp = (int(x) for x in header[2:8])
    fields = dict(max_seq_len=max_t, vocab_size=v, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                  padded_vocab_size=vp)
    bad = [f"{k}={x}" for k, x in fields.items() if x <= 0]
    if bad:
        raise LlmcFormatError(f"{path}: bad header field(s) {', '.join(bad)}")
    try:
        cfg = GPTConfig(block_size=max_t, vocab_size=v, padded_vocab_size=vp, n_layer=n_layer, n_head=n_head,
                        n_embd=n_embd)
    except ValueError as e:
        raise LlmcFormatError(f"{path}: bad header: {e}") from None
    return version, cfg


def _read_header(path: Path) -> tuple[int, GPTConfig]:
    if not path.is_file():
        raise LlmcFormatError(f"{path}: no such llm.c model file")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise LlmcFormatError(f"{path}: {size} bytes, shorter than the {HEADER_BYTES}-byte llm.c header")
    return _config_from_header(path, np.fromfile(path, dtype="<i4", count=HEADER_INTS))


def read_llmc_config(path) -> GPTConfig:
    """The model shape an llm.c model file's header describes (the weights are not read)."""
    return _read_header(Path(path))[1]


def load_llmc(path, ops=None) -> GPT:
    """Read an llm.c GPT-2 model file (version 3 fp32 or 5 bf16) into an fp32 GPT on the CPU."""
    path = Path(path)
    version, cfg = _read_header(path)
    size = path.stat().st_size
    n = _num_values(cfg)
    width = _BYTES_PER_VALUE[version]
    expected = HEADER_BYTES + n * width
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise LlmcFormatError(
            f"{path}: {what}: {size} bytes, expected {expected} (header + {n} {'fp32' if width == 4 else 'bf16'} "
            f"values for L={cfg.n_layer} C={cfg.n_embd} Vp={cfg.padded_vocab_size} T={cfg.block_size})"
        )
    if version == VERSION_FP32:
        flat = np.fromfile(path, dtype="<f4", offset=HEADER_BYTES, count=n)
    else:  # bf16: the high half of an fp32
        raw = np.fromfile(path, dtype="<u2", offset=HEADER_BYTES, count=n)
        flat = (raw.astype(np.uint32) << 16).view(np.float32)
    values = torch.from_numpy(flat)

    state: dict[str, torch.Tensor] = {}
    offset = 0
    for name, shape in _tensor_specs(cfg):
        count = int(np.prod(shape))
        group = values[offset : offset + count].view(shape)
        offset += count
        if name.startswith("transformer."):
            state[name] = group
        else:  # one slice per layer
            for i in range(cfg.n_layer):
                state[f"transformer.h.{i}.{name}"] = group[i]
    model = GPT(cfg, ops)
    model.load_state_dict(state, strict=True)  # copies: the model does not alias the numpy buffer
    return model


def save_llmc(model: GPT, path, dtype: str = "fp32") -> Path:
    """Write `model` as an llm.c model file: version 3 (dtype "fp32") or 5 ("bf16", rounded to nearest even)."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    cfg = model.config
    path = Path(path)
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = [MAGIC, VERSION_FP32 if dtype == "fp32" else VERSION_BF16, cfg.block_size, cfg.vocab_size,
                  cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.padded_vocab_size]
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(header.tobytes())
        for name, _ in _tensor_specs(cfg):
            group = [sd[name]] if name.startswith("transformer.") else [
                sd[f"transformer.h.{i}.{name}"] for i in range(cfg.n_layer)
            ]
            for t in group:
                if dtype == "fp32":
                    f.write(t.contiguous().numpy().astype("<f4", copy=False).tobytes())
                else:
                    f.write(t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes())
    os.replace(tmp, path)
    return path
