"""What the modded-nanogpt record replications share: SpeedrunGPT (tritonrun/gpt2/speedrun.py) trained by Adam
groups + Muon, a constant-then-cooldown lr, Muon momentum warmup, --lr as a multiplier on every group's base lr.
Each record is its own module (modded_nanogpt_2024_11_10.py, modded_nanogpt_2024_12_17.py) with its SpeedrunConfig
(every number beside its source line in tritonrun/gpt2/speedrun.py).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from tritonrun.recipes.base import Recipe, Schedule

# The record's fields over any preset: --lr is a multiplier on each optimizer group's base lr, no warmup, no decay,
# no clipping, cooldown to 0; the Adam betas are the record's (defaults() adds them).
SPEEDRUN_DEFAULTS = {"lr": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0, "final_lr_frac": 0.0}


class SpeedrunOptimizer:
    """The records' optimizers as one object the training loop drives: Adam (the seam's `optimizer`, AdamW with
    weight_decay 0 = Adam: torch's or the Triton FusedAdamW) over SpeedrunGPT.optimizer_groups()'s "adam" groups
    (wte, lm_head, scalars) and tritonrun/kernels/muon.py's Muon over its "muon" group (the blocks' matrices).

    Each group keeps its base lr in group["base_lr"] (the record's lr x --lr, the multiplier); RecordSchedule sets
    group["lr"] = base_lr x the step's lr multiplier. param_groups lists Adam's groups then Muon's (the same dicts).
    state_dict() holds both optimizers' state ({"adam", "muon"}), so checkpoints, --resume and the warm-up restore
    carry the Muon momentum buffers with the Adam moments."""

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

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups + self.muon.param_groups

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


class RecordSchedule(Schedule):
    """The record's schedules over this run's length: every group's lr = base_lr x speedrun_lr_multiplier, Muon's
    momentum speedrun_muon_momentum, and (windowed attention) speedrun_window. `config` is the model's
    SpeedrunConfig with the run's --max-steps, --warmup-steps and the cooldown as the record's fraction of it."""

    def __init__(self, config):
        self.config = config

    def apply(self, optimizer: SpeedrunOptimizer, step: int) -> dict:
        """Set every group's lr and Muon's momentum for 0-based `step`; returns what was set (with the step's
        attention window for the windowed model). Steps past the end (the untimed warm-up's, near the end of a
        resumed run) get the end's lr, 0, and window."""
        from tritonrun.gpt2.speedrun import speedrun_lr_multiplier, speedrun_muon_momentum

        scale = speedrun_lr_multiplier(min(step, self.config.num_iterations), self.config)
        momentum = speedrun_muon_momentum(step, self.config)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        for g in optimizer.muon.param_groups:
            g["momentum"] = momentum
        out = {"lr": optimizer.muon.param_groups[0]["lr"], "lr_scale": scale, "muon_momentum": momentum}
        window = self.window(step)
        if window is not None:
            out["window"] = window
        return out

    def window(self, step: int) -> int | None:
        """The attention window (tokens) of 0-based training `step`; the validation after s steps uses window(s)
        as the record's loop does. None for dense attention."""
        if self.config.attention != "window":
            return None
        from tritonrun.gpt2.speedrun import speedrun_window

        return speedrun_window(step, self.config)


@dataclass(frozen=True)
class SpeedrunRecipe(Recipe):
    """A modded-nanogpt record: its SpeedrunConfig sizes (sizes()) carry every hyperparameter."""
    lr_is_multiplier: bool = True
    softcapped_head: bool = True  # logits = 30 tanh(z / 30)
    ddp_broadcast_buffers: bool = False  # the RoPE tables are non-persistent buffers, equal on every rank

    @property
    def refused(self) -> dict[str, str]:
        out = {"weight_decay": "the record decays nothing (Adam and Muon without weight decay)",
               "final_lr_frac": "its cooldown goes linearly to 0 over the record's last fraction of --max-steps"}
        if not self.packed:
            out["doc_aligned"] = "its dense batches read contiguous tokens: there are no packed sequences to align"
        return out

    @property
    def record(self):
        """The record's own SpeedrunConfig (its d12)."""
        return self.sizes()["d12"]

    def defaults(self, on_gpu: bool) -> dict:
        rc = self.record
        out = {**SPEEDRUN_DEFAULTS, "beta1": rc.adam_betas[0], "beta2": rc.adam_betas[1]}
        if self.packed:
            out["micro_batch"] = 1  # one packed sequence; its length, seq_len, is sized for the card's memory
        if on_gpu:  # the CPU smoke run keeps its own short length
            out.update(max_steps=rc.num_iterations, val_every=rc.val_every)
        return out

    def cooldown_steps(self, max_steps: int) -> int:
        """Steps of the linear cooldown: the record's fraction of any run (600 of 1490; 900 of 3000)."""
        rc = self.record
        return round(max_steps * rc.warmdown_iters / rc.num_iterations)

    def validate(self, cfg) -> None:
        cool = self.cooldown_steps(cfg.max_steps)
        if cfg.warmup_steps + cool > cfg.max_steps:
            raise ValueError(f"--warmup-steps {cfg.warmup_steps} overlaps the speedrun cooldown (the last "
                             f"{cool} of --max-steps {cfg.max_steps}): lower --warmup-steps "
                             f"to at most {cfg.max_steps - cool}")
        if cfg.init_from and not cfg.init_from.startswith("ckpt:"):
            raise ValueError(f"--init-from {cfg.init_from}: GPT-2 weights train under --recipe gpt2; --recipe "
                             f"{self.name} starts from ckpt:PATH of a {self.name} run, or from scratch")

    def init_model_size(self, spec: str, asked: str | None) -> str:
        """--model name of the checkpoint --init-from ckpt:PATH holds (matched on the model's shape)."""
        from tritonrun.gpt2.checkpoint import CheckpointError, read_model_config, resolve_checkpoint

        try:
            have = read_model_config(resolve_checkpoint(spec.partition(":")[2])).to_dict()
        except CheckpointError as e:
            raise ValueError(f"--init-from {spec}: {e}") from None
        keys = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "padded_vocab_size")
        what = ", ".join(f"{k} {have.get(k)}" for k in keys)
        return self._size_named(spec, asked, have, keys, what, kind="speedrun ")

    def model_for(self, config, ops=None):
        from tritonrun.gpt2.speedrun import SpeedrunGPT

        return SpeedrunGPT(config, ops)

    def build_model(self, cfg, ops):
        """SpeedrunGPT of sizes()[cfg.model], or the model of --init-from ckpt:PATH (a checkpoint of this recipe;
        its weights loaded)."""
        from tritonrun.gpt2.speedrun import SpeedrunConfig

        if not cfg.init_from:
            return self.model_for(self.sizes()[cfg.model], ops)
        ckpt = self.own_checkpoint(cfg.init_from)
        model = self.model_for(SpeedrunConfig.from_dict(ckpt["model_config"]), ops)
        model.load_state_dict(ckpt["model"])
        return model

    def build_optimizer(self, model, ops, cfg) -> SpeedrunOptimizer:
        return SpeedrunOptimizer(model, ops, cfg)

    def schedule_config(self, cfg, model_config):
        """The SpeedrunConfig whose schedules (lr, Muon momentum, window) a run follows: the model's, with the run's
        length, --warmup-steps and the cooldown as the record's fraction of --max-steps."""
        return replace(model_config, num_iterations=cfg.max_steps, warmup_iters=cfg.warmup_steps,
                       warmdown_iters=self.cooldown_steps(cfg.max_steps))

    def schedule(self, cfg, model) -> RecordSchedule:
        return RecordSchedule(self.schedule_config(cfg, model.config))

    def describe_optimizer(self, optimizer: SpeedrunOptimizer, world_size: int) -> str:
        """The Muon line of the log's ops table (Muon is outside the ops seam)."""
        how = f"sharded over {world_size} ranks" if world_size > 1 else "one process"
        coeffs = optimizer.muon.param_groups[0]["coefficients"]
        return f"  muon  torch (tritonrun/kernels/muon.py: bf16 Newton-Schulz, {coeffs}, {how})"
