"""Hugging Face interop: GPT-2 checkpoints in transformers' `GPT2LMHeadModel` format, in and out.

Format (what `GPT2LMHeadModel.save_pretrained` writes and `from_pretrained` reads):
  config.json        model_type "gpt2", n_layer, n_head, n_embd, n_positions, vocab_size, layer_norm_epsilon,
                     activation_function ("gelu_new" = tanh GELU), tie_word_embeddings
  model.safetensors  keys transformer.{wte,wpe,h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},
                     ln_f}.{weight,bias}; metadata {"format": "pt"}. The tied lm_head.weight is not stored.
                     (or pytorch_model.bin, or a sharded *.index.json; OpenAI's own `gpt2` has no
                     "transformer." prefix and carries the attention-mask buffers h.{i}.attn.bias.)
  Conv1D weights (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are stored (in, out): the transpose of
  nn.Linear's (out, in). wte has vocab_size (50257) rows; here it is padded to a multiple of 128 (50304)
  with zero rows on load and unpadded on save.

API:
  save_hf(model, path)              write config.json + model.safetensors (fp32), loadable by transformers
  load_hf(path, ops=None) -> GPT    read a directory in that format (no transformers needed)
  init_from(spec, ops=None)         "hf:DIR", "llmc:FILE.bin" (both GPT-2 formats: a GPT) or
                                    "ckpt:RUN_DIR_OR_FILE" (the model the checkpoint holds: a GPT, or a SpeedrunGPT
                                    for a --recipe speedrun / speedrun-dense run)
  (a run dir given as ckpt:/--checkpoint means its newest checkpoint: gpt2.checkpoint.resolve_checkpoint)
CLI:
  python -m tritonrun.gpt2.hf export --checkpoint RUN_DIR_OR_CKPT --out DIR
  (gpt2 recipe checkpoints only: the speedrun model has no GPT2LMHeadModel form, and export refuses it.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from tritonrun.gpt2.checkpoint import (checkpoint_model_kind, load_checkpoint, load_model, model_from_checkpoint,
                             read_model_config, resolve_checkpoint)
from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.model import GPT
from tritonrun.gpt2.speedrun import SpeedrunGPT
from tritonrun.runinfo import atomic_file, atomic_write_text, make_dir

# Why a speedrun model cannot be exported (one line, the CLI's error): what it is, and what HF export covers.
NOT_GPT2 = ("a speedrun model (SpeedrunGPT: RoPE, QK-norm, weightless RMSNorm, ReLU^2, untied softcapped head, "
            "value and U-net skips; windowed attention and value embeddings under --recipe speedrun), not a "
            "GPT2LMHeadModel: Hugging Face export covers the gpt2 recipe only (--recipe gpt2)")

SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_NAME = "config.json"

# Stored (in, out) by transformers' Conv1D: transposed relative to our nn.Linear (out, in).
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Both compute the tanh approximation of GELU that GPT-2 uses.
TANH_GELU_NAMES = ("gelu_new", "gelu_pytorch_tanh")
PAD_MULTIPLE = 128  # wte rows are padded to a multiple of this (50257 -> 50304)


class HFFormatError(ValueError):
    """A Hugging Face checkpoint that is missing, malformed or not a plain GPT-2; str is one line naming the file."""


# ---------------------------------------------------------------------------------------------- save


def hf_config_dict(config: GPTConfig) -> dict:
    """config.json for transformers' GPT2LMHeadModel describing `config` (dropout 0: this model trains without)."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "activation_function": "gelu_new",
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_embd": config.n_embd,
        "n_inner": None,  # 4 * n_embd
        "n_positions": config.block_size,
        "n_ctx": config.block_size,  # read by older transformers versions
        "vocab_size": config.vocab_size,
        "layer_norm_epsilon": config.ln_eps,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "attn_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "resid_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "dtype": "float32",
        "torch_dtype": "float32",  # the name older transformers versions read
    }


def hf_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our weights under transformers' GPT2LMHeadModel names and layouts, fp32, contiguous, unshared."""
    vocab = model.config.vocab_size
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu", torch.float32)
        if name == "transformer.wte.weight":
            t = t[:vocab]  # drop the padded rows
        elif name.endswith(CONV1D_SUFFIXES):
            t = t.t()
        out[name] = t.contiguous().clone()
    return out


def save_hf(model: GPT, path) -> Path:
    """Write `model` as a Hugging Face GPT-2 checkpoint directory (model.safetensors + config.json).
    HFFormatError for a SpeedrunGPT (no GPT2LMHeadModel form). Each file is written whole or not at all; a disk
    that will not take one raises WriteFailed (its size, the free space, the fix), config.json last, so a
    directory with a config.json holds a complete export."""
    from safetensors.torch import save

    if isinstance(model, SpeedrunGPT):
        raise HFFormatError(f"cannot export {NOT_GPT2}")
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise HFFormatError(f"{path}: exists and is not a directory")
    fix = "free space there, or pass --out on another disk"
    make_dir(path, fix=fix)
    weights = save(hf_state_dict(model), metadata={"format": "pt"})
    with atomic_file(path / SAFETENSORS_NAME, "wb", needed=len(weights), fix=fix) as f:
        f.write(weights)
    atomic_write_text(path / CONFIG_NAME, json.dumps(hf_config_dict(model.config), indent=2) + "\n", fix=fix)
    return path


# ---------------------------------------------------------------------------------------------- load


def _read_config(path: Path) -> tuple[GPTConfig, dict]:
    """Our GPTConfig for the directory's config.json, and the raw JSON."""
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise HFFormatError(f"{cfg_path}: missing (a Hugging Face GPT-2 checkpoint needs config.json)")
    try:
        hf = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFFormatError(f"{cfg_path}: not readable JSON ({_first_line(e)})") from None
    if not isinstance(hf, dict):
        raise HFFormatError(f"{cfg_path}: not a JSON object")

    def unsupported(what: str):
        return HFFormatError(f"{cfg_path}: {what} not supported (this loader reads plain GPT-2)")

    if hf.get("model_type", "gpt2") != "gpt2":
        raise unsupported(f"model_type {hf['model_type']!r}")
    act = hf.get("activation_function", "gelu_new")
    if act not in TANH_GELU_NAMES:
        raise unsupported(f"activation_function {act!r} (expected one of {', '.join(TANH_GELU_NAMES)})")
    for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False)):
        if key in hf and bool(hf[key]) != want:
            raise unsupported(f"{key}={hf[key]}")
    try:
        n_embd, n_layer, n_head = int(hf["n_embd"]), int(hf["n_layer"]), int(hf["n_head"])
        vocab = int(hf["vocab_size"])
        block = int(hf["n_positions"] if "n_positions" in hf else hf["n_ctx"])
        eps = float(hf.get("layer_norm_epsilon", 1e-5))
    except KeyError as e:
        raise HFFormatError(f"{cfg_path}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HFFormatError(f"{cfg_path}: bad field value ({e})") from None
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise unsupported(f"n_inner={hf['n_inner']} (expected 4 * n_embd = {4 * n_embd})")
    padded = -(-vocab // PAD_MULTIPLE) * PAD_MULTIPLE
    try:
        config = GPTConfig(block_size=block, vocab_size=vocab, padded_vocab_size=padded, n_layer=n_layer,
                           n_head=n_head, n_embd=n_embd, ln_eps=eps)
    except ValueError as e:
        raise HFFormatError(f"{cfg_path}: {e}") from None
    return config, hf


def _first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message cut to one short line (torch.load's can run to dozens of lines)."""
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_weight_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise HFFormatError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated / pickled objects beyond tensors / not a torch file
        why = f"{type(e).__name__}: {_first_line(e)}"
        raise HFFormatError(f"{file}: not a readable PyTorch weights file ({why})") from None
    if not isinstance(sd, dict):
        raise HFFormatError(f"{file}: holds a {type(sd).__name__}, not a state dict")
    return sd


def _read_weights(path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The checkpoint's tensors (safetensors preferred) and the file they came from."""
    for index_name in (SAFETENSORS_INDEX_NAME, PYTORCH_INDEX_NAME):
        index = path / index_name
        if index.is_file() and not (path / SAFETENSORS_NAME).is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise HFFormatError(f"{index}: not a readable shard index ({_first_line(e)})") from None
            sd = {}
            for shard in shards:
                if not (path / shard).is_file():
                    raise HFFormatError(f"{path / shard}: missing (listed in {index.name})")
                sd.update(_read_weight_file(path / shard))
            return index, sd
    for name in (SAFETENSORS_NAME, PYTORCH_NAME):
        if (path / name).is_file():
            return path / name, _read_weight_file(path / name)
    raise HFFormatError(f"{path}: no {SAFETENSORS_NAME} or {PYTORCH_NAME} (not a Hugging Face checkpoint directory)")


def _is_mask_buffer(key: str) -> bool:
    # h.{i}.attn.bias (causal mask) and h.{i}.attn.masked_bias: buffers some versions saved, not weights
    return key.endswith(".attn.bias") or key.endswith(".attn.masked_bias")


def load_hf(path, ops=None) -> GPT:
    """Read a Hugging Face GPT-2 checkpoint directory (e.g. a downloaded `gpt2`) into an fp32 GPT on the CPU.

    `path` is the directory, or a weights file inside it (config.json is read beside it)."""
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise HFFormatError(f"{path}: no such directory (expected a Hugging Face checkpoint directory)")
    config, hf_config = _read_config(path)
    file, raw = _read_weights(path)

    sd: dict[str, torch.Tensor] = {}  # under our names ("transformer." + the key without its prefix, if any)
    stored_as: dict[str, str] = {}  # our name -> the key in the file, for error messages
    lm_head = None
    for key, t in raw.items():
        if key == "lm_head.weight":
            lm_head = t
            continue
        name = "transformer." + key.removeprefix("transformer.")
        if _is_mask_buffer(name):
            continue
        sd[name], stored_as[name] = t, key

    with torch.device("meta"):  # names and shapes only, no memory, no init cost
        unpadded = GPTConfig(**{**config.to_dict(), "padded_vocab_size": config.vocab_size})
        expected = GPT(unpadded).state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        more = f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""
        raise HFFormatError(f"{file}: missing key(s) {', '.join(missing[:3])}{more} for a "
                            f"{config.n_layer}-layer GPT-2 as config.json describes")
    unexpected = [stored_as[k] for k in sd if k not in expected]
    if unexpected:
        more = f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else ""
        raise HFFormatError(f"{file}: unexpected key(s) {', '.join(unexpected[:3])}{more} (not a plain GPT-2)")
    for k, ref in expected.items():
        t = sd[k]
        if k.endswith(CONV1D_SUFFIXES):
            t = t.t()
        if tuple(t.shape) != tuple(ref.shape):
            stored = tuple(sd[k].shape)
            want = tuple(ref.shape[::-1]) if k.endswith(CONV1D_SUFFIXES) else tuple(ref.shape)
            raise HFFormatError(f"{file}: {k} has shape {stored}, expected {want} from config.json")
        sd[k] = t.to(torch.float32)
    wte = sd["transformer.wte.weight"]
    if lm_head is not None and not torch.equal(lm_head.to(torch.float32), wte):
        raise HFFormatError(f"{file}: lm_head.weight differs from wte (untied LM head not supported)")
    # (an untied config with no lm_head.weight would leave transformers' LM head random: refuse it)
    if lm_head is None and not hf_config.get("tie_word_embeddings", True):
        raise HFFormatError(f"{file}: tie_word_embeddings is false and lm_head.weight is absent")

    pad = config.padded_vocab_size - config.vocab_size
    sd["transformer.wte.weight"] = torch.cat([wte, wte.new_zeros(pad, config.n_embd)])
    model = GPT(config, ops)
    model.load_state_dict(sd, strict=True)
    return model


# ---------------------------------------------------------------------------------------- init_from


INIT_SCHEMES = ("hf", "llmc", "ckpt")


def init_from(spec: str, ops=None) -> GPT | SpeedrunGPT:
    """Build a model from "hf:DIR" (Hugging Face), "llmc:FILE" (llm.c .bin) or "ckpt:PATH" (our checkpoint,
    a run dir meaning its newest). hf: and llm.c files hold GPT-2s: a GPT. ckpt: gives the class the checkpoint
    records (its model_kind): a GPT, or a SpeedrunGPT from a --recipe speedrun(-dense) run. Weights only, fp32, on the
    CPU. Raises a ValueError subclass with a one-line message on any user error."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in INIT_SCHEMES or not rest:
        raise ValueError(f"--init-from {spec!r}: expected hf:DIR, llmc:FILE.bin or ckpt:RUN_DIR_OR_FILE")
    if scheme == "hf":
        return load_hf(rest, ops)
    if scheme == "llmc":
        from tritonrun.gpt2.llmc import load_llmc

        return load_llmc(rest, ops)
    return load_model(resolve_checkpoint(rest), device="cpu", ops=ops)


def init_config(spec: str) -> GPTConfig:
    """The model shape init_from(spec) would build, read from the source's config only (config.json, the
    llm.c header, the checkpoint's model_config); the weights are not loaded. Same errors as init_from."""
    scheme, sep, rest = spec.partition(":")
    if not sep or scheme not in INIT_SCHEMES or not rest:
        raise ValueError(f"--init-from {spec!r}: expected hf:DIR, llmc:FILE.bin or ckpt:RUN_DIR_OR_FILE")
    if scheme == "hf":
        path = Path(rest)
        path = path.parent if path.is_file() else path
        if not path.is_dir():
            raise HFFormatError(f"{path}: no such directory (expected a Hugging Face checkpoint directory)")
        return _read_config(path)[0]
    if scheme == "llmc":
        from tritonrun.gpt2.llmc import read_llmc_config

        return read_llmc_config(rest)
    return read_model_config(resolve_checkpoint(rest))


# ---------------------------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        sys.stderr.write(f"error: {message}\n")
        raise SystemExit(2)


def main(argv=None) -> int:
    parser = _Parser(prog="python -m tritonrun.gpt2.hf", description="Hugging Face interop for tritonrun GPT-2 models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    exp = sub.add_parser("export", help="write a run's checkpoint as a Hugging Face GPT2LMHeadModel directory")
    exp.add_argument("--checkpoint", required=True, help="checkpoint file, or a run dir (its newest checkpoint)")
    exp.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    exp.add_argument("--force", action="store_true", help="overwrite an existing export in --out")
    args = parser.parse_args(argv)

    try:
        out_dir = Path(args.out)
        if out_dir.exists() and not out_dir.is_dir():
            raise HFFormatError(f"--out {out_dir} is a file, not a directory: give a directory")
        held = [n for n in ("config.json", "model.safetensors") if (out_dir / n).exists()]
        if held and not args.force:
            raise HFFormatError(f"--out {out_dir} already holds an export ({', '.join(held)}): pick another --out, "
                                f"or add --force to overwrite it")
        ckpt = resolve_checkpoint(args.checkpoint)
        state = load_checkpoint(ckpt)
        kind = checkpoint_model_kind(state)
        if kind != "gpt2":  # only GPT2LMHeadModel's shape exports; before any weights load
            what = NOT_GPT2 if kind.startswith("speedrun") else (
                f"a {kind} model (--recipe {kind}), not a GPT2LMHeadModel: Hugging Face export covers the gpt2 "
                f"recipe only (--recipe gpt2)")
            raise HFFormatError(f"{ckpt}: {what}")
        out = save_hf(model_from_checkpoint(state, ckpt), args.out)
    except (ValueError, OSError) as e:  # CheckpointError / HFFormatError are ValueErrors
        msg = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename and e.strerror else str(e)
        sys.stderr.write(f"error: {msg}\n")
        return 2
    print(f"exported {ckpt} -> {out} (load with transformers.GPT2LMHeadModel.from_pretrained({str(out)!r}))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
