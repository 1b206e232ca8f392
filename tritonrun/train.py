"""Train a GPT on FineWeb to val loss <= 3.28 as fast as possible, under one of four recipes.

    python train_speedrun.py --gpu rtx4070                              # the main job (--recipe record89)
    python train_speedrun.py --gpu rtx4070 --recipe gpt2                # llm.c's GPT-2 124M recipe
    python train_speedrun.py --gpu cpu --model tiny --data sample       # CPU smoke run, no download

Recipes (--recipe; GPU presets default to record89, the cpu preset to gpt2):
  record89  modded-nanogpt's 2026-07-17 record #89 (tritonrun/recipes/modded_nanogpt_2026_07_17.py: 1,285 steps,
            338.8M tokens): Record89GPT (11 layers, bigram hash and value embeddings, MUDD, DC MHA, paired heads, XSA,
            long-short windows with YaRN, multi-token prediction and a prefix-token loss), NorMuon + cautious Adam
            (Adam on odd steps; embed / head untied at 2/3), three stages of 1/3, 2/3 and all of
            --total-batch-tokens (393,216) with growing windows and document lengths, each packed micro-batch whole
            documents from their start. --fp8 (auto: on with --backend triton on sm_89 / sm_90) runs the MLPs'
            forward matmuls in FP8. --lr is a multiplier; --final-lr-frac the cooldown's floor (0.15); the record's
            per-group betas and decay are fixed (--beta1/--beta2/--weight-decay/--grad-clip/--warmup-steps refused).
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
            gradient accumulation over --seq-len micro-batches (sized for the card's memory).
  speedrun-dense  the 2024-11-10 record (dense causal T = 1024, 1.57B tokens): as speedrun without the packing,
            window and value embeddings; its own values: --micro-batch sequences of 1024, betas (0.9, 0.95), Muon
            lr 0.04 with momentum warmup over 500 steps, --max-steps 3000, cooldown the last 900/3000.
  Under both speedrun recipes --weight-decay and --final-lr-frac do not apply and are refused; --init-from takes
  only ckpt: of a run of the same recipe. --model is tiny or d12 (the record's 12 x 768, 6 heads of 128).

A preset (--gpu) describes the card: memory budget, the peak FLOPs used for MFU, the GPU, dtype, backend and
compile; the run's values are tritonrun/defaults.py's under the recipe's. The micro-batch (dense recipes) or packed
--seq-len (speedrun) is sized at startup for the card's memory by the GPU-free memory estimate, and the line it
was chosen by is printed. Every field can be overridden by its long flag. The clock excludes validation and an untimed
warm-up (compile, autotune) that runs real steps and then restores the initial weights, optimizer
state and data position. The out dir gets train.log, result.json, leaderboard.md (finished runs),
loss.png and checkpoints (the last at the end); a run holds a lock on it while it lives.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass, fields, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from tritonrun.errors import UserError
from tritonrun.gpt2.checkpoint import CheckpointError, checkpoint_model_kind
from tritonrun.gpt2.ops import BACKENDS, TRITON_OPS, parse_op_list, use_cpu_interpreter
from tritonrun.defaults import DEFAULT_RECIPE, run_defaults
from tritonrun.data.fineweb import DEFAULT_OUT_DIR
from tritonrun.presets import PRESETS, automatic_peaks, fused_head, peak_tflops_for, resolve_preset
from tritonrun.recipes import RECIPES, get_recipe, recipe_of_model_kind, recipe_taking_weights
from tritonrun.runs import check_not_finished, claim_out_dir, newest_loadable_checkpoint, OutDirLock

MUON_COEFFICIENTS = ("quintic", "polar_express")  # tritonrun/kernels/muon.py COEFFICIENTS (not imported: it
#                                                    loads the kernels)


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
    final_checkpoint: bool
    doc_aligned: bool
    fp8: str  # "on" / "off" once resolved ("auto" as a flag or default)

    @property
    def tokens_per_micro_batch(self) -> int:
        return self.micro_batch * self.seq_len

    @property
    def grad_accum(self) -> int:
        return self.total_batch_tokens // self.tokens_per_micro_batch


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
    p.add_argument("--model", choices=list(dict.fromkeys(n for r in RECIPES.values() for n in r.sizes())),
                   help="model size (d12 = GPT-2 124M; under the speedrun recipes: tiny or d12, the record's model)")
    p.add_argument("--recipe", choices=list(RECIPES),
                   help="gpt2 (llm.c), speedrun (modded-nanogpt 2024-12-17, packed windowed) or speedrun-dense "
                        "(2024-11-10, T = 1024); default speedrun on GPU presets, gpt2 on cpu (see above)")
    p.add_argument("--micro-batch", type=int, help="sequences per forward/backward (default: the largest that fits "
                                                   "the card by the memory estimate; speedrun: 1 packed sequence)")
    p.add_argument("--total-batch-tokens", type=int, help="tokens per optimizer step (default 524288)")
    p.add_argument("--seq-len", type=int, help="sequence length T (default 1024; speedrun: tokens per packed "
                                               "micro-batch, default the largest that fits the card)")
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
    p.add_argument("--doc-aligned", action=argparse.BooleanOptionalAction, default=None,
                   help="speedrun: start every packed training sequence at a document start, skipping the rest of "
                        "the document a sequence cuts (the 2025-07-12 record's rule); default off: contiguous chunks, "
                        "as the 2024-12-17 record reads them. The log says what fraction it skips")
    p.add_argument("--fp8", choices=["auto", "on", "off"],
                   help="record89: the MLPs' forward matmuls in FP8 (the record's scaling rule, Triton kernels); "
                        "default auto: on with --backend triton on sm_89 / sm_90, off elsewhere; off: the same recipe "
                        "in bf16")
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
    p.add_argument("--final-checkpoint", action=argparse.BooleanOptionalAction, default=None,
                   help="write a checkpoint when the run finishes (default yes: sample.py, --init-from, export read "
                        "it); --no-final-checkpoint for timing runs that would spend seconds writing GBs")
    p.add_argument("--keep-checkpoints", type=int, help="keep the newest K checkpoints, 0 = all (default 2)")
    p.add_argument("--max-bad-steps", type=int, help="non-finite steps in a row before the run stops (default 3)")
    p.add_argument("--init-from", help="start from weights: hf:PATH (Hugging Face GPT-2), llmc:PATH, ckpt:PATH")
    p.add_argument("--hellaswag-every", type=int, help="HellaSwag eval every N steps, 0 = off (default 1000 on GPUs)")
    p.add_argument("--hellaswag-path",
                   help="tokenized HellaSwag val file (python -m tritonrun.data.hellaswag writes it)")
    p.add_argument("--resume", action="store_true", help="continue the newest complete checkpoint in --out-dir")
    p.add_argument("--eval-only", action="store_true",
                   help="score the weights of --init-from (hf:, llmc: or ckpt:PATH) on val and HellaSwag into a new "
                        "--out-dir, no training (not with --resume: it would rewrite that run's record)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the run's plan (preset, recipe, batch, the memory estimate behind it) and stop: "
                        "builds no model, reads no data, writes nothing; needs no GPU")
    p.add_argument("--download", action="store_true",
                   help="if --data has no shards, download FineWeb into it first (python -m tritonrun.data.fineweb)")
    return p


# Fields that change the math of a run: a resumed run may not change them (it would not be the same run).
# The rest (hardware, batching split, logging, target) may differ on resume.
RUN_DEFINING = ("model", "recipe", "muon_coefficients", "doc_aligned", "fp8", "total_batch_tokens", "seq_len", "lr",
                "final_lr_frac",
                "warmup_steps", "max_steps",
                "weight_decay", "grad_clip", "beta1", "beta2", "data", "seed", "dtype", "init_from")
HARDWARE = ("micro_batch", "memory_gib", "peak_tflops", "backend", "torch_ops", "compile", "timing_warmup_steps",
            "device")


def resolve_config(argv: list[str] | None) -> tuple[Config, Path | None]:
    """(config, checkpoint to resume from or None). Preset < run defaults < recipe < checkpoint (with --resume) <
    explicit flags; the batch is then sized for the card (size_batch)."""
    args = build_parser().parse_args(argv)
    return _resolve(args)


def _resolve(args: argparse.Namespace) -> tuple[Config, Path | None]:
    cfg, resume_path, _ = resolve_run(args)
    return cfg, resume_path


def resolve_run(args: argparse.Namespace) -> tuple[Config, Path | None, dict | None]:
    """(config, checkpoint to resume from or None, how the batch was sized or None: size_batch's)."""
    explicit = {k: v for k, v in vars(args).items()
                if v is not None and k not in ("resume", "download", "eval_only", "dry_run")}
    if args.resume:
        merged, resume_path, new_hardware = _resumed(explicit)
    else:
        merged, resume_path, new_hardware = _new_run(explicit), None, True
    recipe = get_recipe(merged["recipe"])
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
    merged["fp8"] = resolve_fp8(merged, recipe, explicit)
    for name, why in recipe.refused.items():
        if name in explicit:
            takers = [r.name for r in RECIPES.values() if name not in r.refused]
            raise UserError(f"--{name.replace('_', '-')} does not apply to --recipe {recipe.name} ({why}): drop it"
                            + (f", or use --recipe {takers[0]}" if len(takers) == 1 else ""))
    asked_hellaswag = explicit.get("hellaswag_every", 0) > 0 or "hellaswag_path" in explicit
    if asked_hellaswag and merged["hellaswag_every"] > 0 and not Path(merged["hellaswag_path"]).is_file():
        raise UserError(f"HellaSwag was asked for (--hellaswag-every {merged['hellaswag_every']}) but "
                        f"{merged['hellaswag_path']} does not exist: write it with `python -m tritonrun.data.hellaswag"
                        f"{'' if 'hellaswag_path' not in explicit else ' --out ' + merged['hellaswag_path']}`, "
                        f"or drop the flag (--hellaswag-every 0: off)")
    dry_run = getattr(args, "dry_run", False)
    # what the batch is sized by: the micro-batch (dense) on new hardware, the packed length of a new run (it is
    # run-defining: a resumed packed run keeps its own)
    field = "seq_len" if recipe.packed else "micro_batch"
    sizing = None
    if field not in explicit and (resume_path is None if recipe.packed else new_hardware):
        merged.setdefault("micro_batch", 1)  # a placeholder for the checks before sizing (the CPU's: 4)
        validate(Config(**{f.name: merged[f.name] for f in fields(Config)}), dry_run=dry_run)
        sizing = size_batch(merged, recipe)
        if sizing is not None:
            merged[field] = sizing["value"]
    cfg = Config(**{f.name: merged[f.name] for f in fields(Config)})
    validate(cfg, dry_run=dry_run)
    return cfg, resume_path, sizing


def resolve_fp8(merged: dict, recipe, explicit: dict) -> str:
    """--fp8 as the run takes it: "on" or "off". auto: on for a recipe with FP8 matmuls under --backend triton (its
    relu2_mlp kernel) on a preset with FP8 tensor cores (sm_89, sm_90), else off. --fp8 on for a recipe without FP8
    matmuls is refused."""
    from tritonrun.presets import FP8_RATIO

    asked = merged.get("fp8", "auto")
    if not recipe.fp8:
        if explicit.get("fp8") == "on":
            takers = [r.name for r in RECIPES.values() if r.fp8]
            raise UserError(f"--fp8 on does not apply to --recipe {recipe.name} (its record has no FP8 matmuls): drop "
                            f"it, or use --recipe {' or '.join(takers)}")
        return "off"
    if asked != "auto":
        return asked
    triton_mlp = merged["backend"] == "triton" and "relu2_mlp" not in parse_op_list(merged["torch_ops"])
    on = merged["device"] == "cuda" and triton_mlp and PRESETS[merged["gpu"]].arch in FP8_RATIO
    return "on" if on else "off"


def size_batch(merged: dict, recipe) -> dict | None:
    """The largest micro-batch (dense recipes) or packed length (packed) whose estimated step fits the card's memory
    - 1 GiB (tritonrun.memory.fit_preset; --memory-gib sizes for a smaller card), for this recipe, model, backend
    and --torch-ops: {"field", "value", "reserved_gib", "budget_gib", "cached", "seconds", "text"}. None on a
    preset without a GPU (the smoke run's defaults stand). UserError when nothing fits."""
    from tritonrun.memory import fit_preset

    found = fit_preset(merged["gpu"], recipe.name, merged["model"], merged["seq_len"], merged["total_batch_tokens"],
                       merged["backend"], merged["torch_ops"], memory_gib=merged["memory_gib"] or None)
    if found is None:
        return None
    field, flag, what = (("seq_len", "--seq-len", "packed length") if recipe.packed
                         else ("micro_batch", "--micro-batch", "micro-batch"))
    where = (f"--recipe {recipe.name} --model {merged['model']} --backend {merged['backend']}"
             + (f" --torch-ops {merged['torch_ops']}" if merged["torch_ops"] else ""))
    if found[field] is None:
        smallest = found["tried"][0][0] if found["tried"] else "any"
        hint = ("" if fused_head(merged["backend"], merged["torch_ops"])
                else ", or --backend triton (its fused LM head keeps no logits)")
        raise UserError(f"no {what} of {where} fits {merged['gpu']}'s {found['budget_gib']} GiB budget by the memory "
                        f"estimate (not even {smallest}): pick a smaller --model or a card with more memory "
                        f"(--memory-gib){hint}")
    how = "cached" if found["cached"] else f"estimated in {found['seconds']:.1f} s"
    text = (f"{what} {found[field]}: the largest whose step fits {merged['gpu']}'s {found['budget_gib']} GiB budget "
            f"(memory - 1 GiB) by the memory estimate, {found['reserved_gib']:.2f} GiB reserved, for {where} "
            f"({how}; {flag} overrides)")
    return {"field": field, "value": found[field], "reserved_gib": found["reserved_gib"],
            "budget_gib": found["budget_gib"], "cached": found["cached"], "seconds": found["seconds"], "text": text}


def _resumed(explicit: dict) -> tuple[dict, Path, bool]:
    """--resume: the checkpoint's run config under the flags that may change (hardware, batching split, logging),
    its checkpoint, and whether the run moves to other hardware (a new preset: its batch is sized anew)."""
    if "out_dir" not in explicit:
        raise UserError("--resume needs the run's --out-dir")
    out_dir = Path(explicit["out_dir"])
    resume_path, ckpt = newest_loadable_checkpoint(out_dir)
    base = dict(ckpt["run_config"])
    # The checkpoint's model decides the recipe: before --recipe every run was gpt2, and a run from before the
    # 2024-12-17 recipe that took the name speedrun holds a speedrun-dense model.
    base["recipe"] = recipe_of_model_kind(checkpoint_model_kind(ckpt)).name
    # runs from before --doc-aligned existed: their packed sequences started at document starts
    base.setdefault("doc_aligned", get_recipe(base["recipe"]).packed)
    own = PRESETS[base["gpu"]]
    newer = {**asdict(own), **run_defaults(own.device),
             **get_recipe(base["recipe"]).defaults(on_gpu=own.device == "cuda")}
    for name, value in newer.items():  # fields newer than the checkpoint: today's defaults
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
    new_hardware = "gpu" in explicit and resolve_preset(explicit["gpu"]) != base["gpu"]
    if new_hardware:
        target = PRESETS[resolve_preset(explicit["gpu"])]
        hardware = {**run_defaults(target.device), **asdict(target)}  # a CPU's fixed micro-batch; a GPU's is sized
        base.update({k: hardware[k] for k in HARDWARE if k in hardware})
    merged = {**base, **explicit}
    merged["gpu"] = resolve_preset(merged["gpu"])
    return merged, resume_path, new_hardware


def _new_run(explicit: dict) -> dict:
    """A new run: the preset, the run defaults for its device, the recipe's over both, the flags over all."""
    gpu = resolve_preset(explicit.get("gpu", "auto"))
    preset = PRESETS[gpu]
    name = explicit.get("recipe")
    if explicit.get("init_from"):
        name = init_recipe(explicit["init_from"], name)
    recipe = get_recipe(name or DEFAULT_RECIPE[preset.device])
    merged = {**asdict(preset), **run_defaults(preset.device), **recipe.defaults(on_gpu=preset.device == "cuda"),
              **explicit, "gpu": gpu, "recipe": recipe.name}
    if merged.get("init_from"):
        try:
            merged["model"] = recipe.init_model_size(merged["init_from"], explicit.get("model"))
        except ValueError as e:
            raise UserError(str(e)) from None
    if "out_dir" not in merged:  # main() creates it exclusively (default_out_dir): a suffix if it exists
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        merged["out_dir"] = str(Path("runs") / f"{stamp}-{gpu}-{merged['model']}")
    return merged


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
    """The recipe --init-from `spec` implies: the one whose model a checkpoint holds (it trains on under its
    recipe), the one that takes hf:/llmc: weights (GPT-2's). A --recipe that cannot train those weights is
    refused."""
    scheme, _, path = spec.partition(":")
    if scheme == "ckpt":
        try:
            have = recipe_of_model_kind(checkpoint_model(path)[0]).name
        except UserError:
            return asked  # the model loader reports an unreadable checkpoint in its own words
    elif recipe_taking_weights(scheme) is not None:
        have = recipe_taking_weights(scheme).name
    else:
        return asked  # validate() names the bad prefix
    if asked is not None and asked != have:
        raise UserError(f"--init-from {spec} holds a {have} model, which --recipe {asked} cannot train: drop "
                        f"--recipe (the weights decide it) or pass --recipe {have}")
    return have


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


def validate(cfg: Config, dry_run: bool = False) -> None:
    """Every check a config must pass before a run starts (UserError: one line with the fix). A dry run skips
    only the check that a CUDA GPU is visible."""
    for names, ok, what in NUMERIC_RANGES:
        for name in names:
            v = getattr(cfg, name)
            flag = f"--{name.replace('_', '-')}"
            if isinstance(v, float) and not math.isfinite(v):
                raise UserError(f"{flag} must be a finite number ({what}), got {v}")
            if not ok(v):
                raise UserError(f"{flag} must be {what}, got {v}")
    recipe = get_recipe(cfg.recipe)
    sizes = recipe.sizes()
    if cfg.model not in sizes:
        raise UserError(f"--model {cfg.model} is not a --recipe {cfg.recipe} model: choose one of "
                        f"{', '.join(sizes)}, or use --recipe gpt2")
    block = sizes[cfg.model].block_size
    if cfg.seq_len > block:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds model {cfg.model}'s context of {block}: lower --seq-len")
    try:
        recipe.validate(cfg)
    except ValueError as e:
        raise UserError(str(e)) from None
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
    if cfg.device == "cuda" and not torch.cuda.is_available() and not dry_run:
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
    check_batch_fits(cfg, train)
    return train, val[0]


def check_batch_fits(cfg: Config, train: list[Path]) -> None:
    """UserError (one line, the file and the flag) for train data that cannot make one batch: a dense recipe reads
    micro-batch x seq-len x ranks + 1 tokens from one shard, so every shard needs them; a packed recipe reads one
    sequence of seq-len + 1 tokens from one shard, starting at an end-of-text token (EOT, 50256), so some shard
    must hold that many, and the first one must hold EOTs but not only EOTs (no documents to pack, or nothing
    but empty ones: degenerate data is not trained on silently)."""
    from tritonrun.data.shards import ShardError, load_tokens, read_header
    from tritonrun.data.tokenizer import EOT

    world = int(os.environ.get("WORLD_SIZE", "1"))
    packed = get_recipe(cfg.recipe).packed
    need = cfg.seq_len + 1 if packed else cfg.micro_batch * cfg.seq_len * world + 1
    try:
        sizes = {path: read_header(path) for path in train}
    except ShardError as e:
        raise UserError(bad_shard_message(e)) from None
    short = [path for path, n in sizes.items() if n < need]
    what = ("seq-len + 1" if packed else f"micro-batch x seq-len{' x ranks' if world > 1 else ''} + 1")
    fix = "lower --seq-len" if packed else "lower --micro-batch or --seq-len"
    if (short and not packed) or len(short) == len(train):
        raise UserError(f"train shard {short[0]} holds {sizes[short[0]]:,} tokens, fewer than one micro-batch "
                        f"({what} = {need:,}): {fix}, or use longer shards")
    if packed:
        first = next(path for path in train if sizes[path] >= need)
        head = load_tokens(first)[: 1 << 24]  # a memmap slice: only these 32 MB are read
        eots = int(np.count_nonzero(head == EOT))
        if eots == 0:
            raise UserError(f"train shard {first} has no end-of-text token (50256) in its first {head.size:,} "
                            f"tokens: --recipe {cfg.recipe} packs documents that start at one (GPT-2 shards put one "
                            f"before every document, as python -m tritonrun.data.fineweb writes them); tokenize "
                            f"with it, or use --recipe gpt2 / speedrun-dense")
        if eots == head.size:
            raise UserError(f"train shard {first} holds nothing but end-of-text tokens (50256) in its first "
                            f"{head.size:,}: empty documents, nothing to learn; check how it was tokenized")


def bad_shard_message(e) -> str:
    return f"bad shard {e} (re-download or re-tokenize it)"


def oom_message(cfg: Config) -> str:
    return (f"CUDA out of memory at --micro-batch {cfg.micro_batch} --seq-len {cfg.seq_len} --model {cfg.model} "
            f"(budget {cfg.memory_gib or 'whole GPU'} GiB): lower --micro-batch (grad accumulation grows to "
            f"keep --total-batch-tokens), --seq-len or --model, or raise --memory-gib if the card has more")


def plan_text(cfg: Config, resume_path: Path | None, sizing: dict | None = None) -> str:
    """What a run of `cfg` would do, for --dry-run: the batch geometry, how it was sized (size_batch) or, for a
    batch the flags gave, the memory estimate's largest within the card's budget, and the resolved config."""
    recipe = get_recipe(cfg.recipe)
    preset = PRESETS[cfg.gpu]
    lines = [f"dry run: nothing built, read or written{f' (would resume {resume_path})' if resume_path else ''}",
             f"recipe {recipe.name}: {recipe.replicates}",
             f"preset {cfg.gpu}: {preset.memory_gib or 'no'} GiB, peak {cfg.peak_tflops or 'n/a'} TFLOPS bf16, "
             f"backend {cfg.backend}{f' (torch: {cfg.torch_ops})' if cfg.torch_ops else ''}, "
             f"{'compiled' if cfg.compile else 'eager'}, {cfg.dtype}",
             f"batch: {cfg.micro_batch} x {cfg.seq_len} tokens per micro-batch"
             f"{' (one packed sequence)' if recipe.packed else ''} x {cfg.grad_accum} micro-batches = "
             f"{cfg.total_batch_tokens:,} tokens per step{recipe.batch_note(cfg)}, {cfg.max_steps} steps"]
    if sizing is not None:
        lines.append(f"memory: {sizing['text']}")
    elif preset.memory_gib:
        lines.append(memory_plan(cfg, recipe))
    lines.append("config:\n" + "\n".join(f"  {f.name:<20}  {getattr(cfg, f.name)}" for f in fields(Config)))
    return "\n".join(lines)


def memory_plan(cfg: Config, recipe) -> str:
    """One line for a batch the flags (or the checkpoint) set: the estimate's largest micro-batch (or packed
    length) within the card's budget, and whether this run's is within it."""
    from tritonrun.memory import fit_preset

    found = fit_preset(cfg.gpu, cfg.recipe, cfg.model, cfg.seq_len, cfg.total_batch_tokens, cfg.backend,
                       cfg.torch_ops, memory_gib=cfg.memory_gib or None)
    what, ours = ("packed length", cfg.seq_len) if recipe.packed else ("micro-batch", cfg.micro_batch)
    best = found["seq_len"] if recipe.packed else found["micro_batch"]
    how = "cached" if found["cached"] else f"{found['seconds']:.1f} s"
    if best is None:
        return (f"memory: no {what} fits the {found['budget_gib']} GiB budget by the estimate ({how}): this run "
                f"DOES NOT FIT; use a bigger card or a smaller --model")
    verdict = "fits" if ours <= best else "DOES NOT FIT"
    return (f"memory: largest {what} within the {found['budget_gib']} GiB budget by the estimate: {best} "
            f"({found['reserved_gib']:.2f} GiB reserved, eager, tritonrun/memory.fit, {how}); this run's {ours}: "
            f"{verdict}")


def main(argv: list[str] | None = None) -> int:
    from tritonrun import training
    from tritonrun.data.shards import ShardError

    cfg = lock = None
    try:
        args = build_parser().parse_args(argv)
        if args.dry_run:
            print(plan_text(*resolve_run(args)))
            return 0
        if args.eval_only and args.resume:
            raise UserError("--eval-only with --resume would rewrite that run's record: score a run's weights "
                            "with --init-from ckpt:RUN_DIR --eval-only --out-dir NEW_DIR")
        if args.eval_only and not args.init_from:
            raise UserError("--eval-only needs weights to score (without them it would score a random init): add "
                            "--init-from ckpt:RUN_DIR, hf:PATH or llmc:PATH")
        if args.resume and args.out_dir and int(os.environ.get("RANK", "0")) == 0:
            running = OutDirLock(Path(args.out_dir))
            if running.holder() is not None:  # before reading its checkpoints: they are still being written
                raise UserError(running.refusal())
        cfg, resume_path, sizing = resolve_run(args)
        # the data first: a shard that cannot make one batch is found before the out dir claims a run
        train_files, val_file = open_data(cfg, download=args.download)
        out_dir, lock = claim_out_dir(Path(cfg.out_dir), resuming=resume_path is not None,
                                      default_name=args.out_dir is None)
        cfg = replace(cfg, out_dir=str(out_dir))
        if cfg.device == "cpu" and cfg.backend == "triton":
            try:
                use_cpu_interpreter()  # before anything imports triton
            except RuntimeError as e:
                raise UserError(str(e)) from None
        result = training.run(cfg, out_dir, train_files, val_file, resume_from=resume_path,
                              eval_only=args.eval_only, sizing=sizing)
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
