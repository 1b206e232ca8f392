"""--recipe gpt2: GPT-2 124M exactly as llm.c trains it (tritonrun/gpt2/model.py; REFERENCE.md, "The llm.c 124M
recipe"): AdamW with --lr peak, --beta1/--beta2, eps 1e-8, --weight-decay on 2-D weights only; --warmup-steps
linear warmup, cosine to --lr x --final-lr-frac at --max-steps; --grad-clip global norm. Dense (micro_batch,
seq_len) batches. Its values are llm.c's (GPT2_DEFAULTS: lr 6e-4, warmup 700, 18,865 steps, decay 0.1, clip 1.0);
the CPU smoke run's are its own (a tiny model's lr, 10 steps of warmup in 50).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from tritonrun.gpt2.ops import GPT2_OPS
from tritonrun.recipes.base import Recipe, Schedule


# llm.c's GPT-2 124M run (REFERENCE.md): 18,865 steps x 524,288 tokens = 10B tokens
GPT2_DEFAULTS = {"lr": 6e-4, "warmup_steps": 700, "max_steps": 18_865, "final_lr_frac": 0.0, "weight_decay": 0.1,
                 "grad_clip": 1.0, "beta1": 0.9, "beta2": 0.95}
# the smoke run (tritonrun/defaults.py SMOKE_DEFAULTS: its 50 steps, the tiny model): a small model's peak lr
GPT2_SMOKE = {"lr": 2e-3, "warmup_steps": 10}


def lr_at(cfg, step: int) -> float:
    """llm.c: linear warmup to lr, then cosine to lr * final_lr_frac at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    min_lr = cfg.lr * cfg.final_lr_frac
    ratio = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.lr - min_lr)


class CosineSchedule(Schedule):
    """lr_at on every param group."""

    def __init__(self, cfg):
        self.cfg = cfg

    def apply(self, optimizer, step: int) -> dict:
        lr = lr_at(self.cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        return {"lr": lr}


@dataclass(frozen=True)
class GPT2Recipe(Recipe):
    @property
    def refused(self) -> dict[str, str]:
        return {"muon_coefficients": "gpt2 trains with AdamW only (no Muon)",
                "doc_aligned": "its dense batches read contiguous tokens: there are no packed sequences to align"}

    def defaults(self, on_gpu: bool) -> dict:
        if on_gpu:
            return dict(GPT2_DEFAULTS)
        return {k: v for k, v in {**GPT2_DEFAULTS, **GPT2_SMOKE}.items() if k != "max_steps"}

    def sizes(self) -> dict:
        from tritonrun.gpt2.config import MODEL_SIZES

        return MODEL_SIZES

    def init_model_size(self, spec: str, asked: str | None) -> str:
        """The GPT-2 size of hf:/llmc:/ckpt: weights, read from their config (not their tensors)."""
        from tritonrun.gpt2.hf import init_config

        try:
            shape = init_config(spec)
        except (ValueError, OSError) as e:  # the loaders' format errors are ValueErrors naming the file
            raise ValueError(f"--init-from {spec}: {e}") from None
        what = f"{shape.n_layer} layers, {shape.n_head} heads, width {shape.n_embd}, context {shape.block_size}"
        keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
        return self._size_named(spec, asked, {k: getattr(shape, k) for k in keys}, keys, what,
                                hint="; start from a GPT-2 of one of those sizes", shape_in_refusal=True)

    def model_for(self, config, ops=None):
        from tritonrun.gpt2.model import GPT

        return GPT(config, ops)

    def build_model(self, cfg, ops):
        if cfg.init_from:
            from tritonrun.gpt2.hf import init_from
            from tritonrun.errors import InitError

            try:
                return init_from(cfg.init_from, ops)
            except (ValueError, OSError) as e:  # the loaders' format errors are ValueErrors naming the file
                raise InitError(str(e)) from None
        return self.model_for(self.sizes()[cfg.model], ops)

    def build_optimizer(self, model, ops, cfg):
        return ops.optimizer(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)

    def schedule(self, cfg, model) -> Schedule:
        return CosineSchedule(cfg)


RECIPE = GPT2Recipe(name="gpt2", replicates="llm.c's GPT-2 124M (AdamW 6e-4, cosine, ~9.0B tokens to 3.28)",
                    model_kind="gpt2", hf_export=True, init_sources=("hf", "llmc", "ckpt"), op_names=GPT2_OPS,
                    warmup_fraction=700 / 18_865,  # llm.c's GPT-2 124M run: 700 warmup steps of 18,865
                    tokens_to_target=9.0e9,
                    tokens_source="llm.c 124M recipe: first val <= 3.28 at step ~17,250 x 524,288 tokens; "
                                  "/work/shared/REFERENCE.md")
