"""--recipe record89: modded-nanogpt's record #89 (2026-07-17, "MLP down projection in FP8 with efficient delayed
scaling metric"; records/track_1_short/2026-07-17_FP8DownProjection) as merged in the repo's train_gpt.py at f411b3d3
(tritonrun/gpt2/speedrun89.py says why that file): 1,285 steps, 338,821,120 tokens, re-implemented for one GPU.

Where each part lives, every hyperparameter beside its source line in the record ("[H2030]": train_gpt.py's line):
  model       tritonrun/gpt2/model89.py (Record89GPT; d12 = the record's, tiny = CPU runs)
  schedule    tritonrun/gpt2/speedrun89.py (Schedule89: stages, lr, momentum, windows, MTP / prefix weights, untie)
  optimizer   tritonrun/recipes/record89_optim.py (NorMuon + cautious Adam, Adam on odd steps, tie / untie, FP8 refresh)
  data        tritonrun/data/doc_loader.py (DocPackLoader: whole documents, each cut to the stage's maximum length)
This module wires them into the trainer:
  batch       the record's step is 8 GPUs x one sequence each; here it is micro-batches of --seq-len tokens, as many as
              the stage's batch holds: --total-batch-tokens is the last stages' (393,216 [H1981]), the first two
              stages take 1/3 and 2/3 of it (131,072 and 262,144). A run of another length scales every stage boundary
              and the momentum warm-up / cool-down with it (scaled_schedule); 1,285 steps is the record's exactly.
  loss        the record backpropagates each rank's summed token losses x 1/grad_accum_steps and averages over its 8
              ranks: the gradient of (sum over the step's tokens) / 8 [H57-58, H2360, H598]. The trainer logs the mean
              and backpropagates mean x tokens / 8 (grad_scale): the same gradients, so Adam's eps (1e-10) and NorMuon
              see the record's magnitudes.
  FP8         --fp8 (auto: on with --backend triton on sm_89 / sm_90): every MLP's two forward matmuls in FP8
              (tritonrun/kernels/mlp_relu2.py) with the record's scaling rule; the LM head stays bf16 (a deviation).
  precision   --dtype bf16 is the record's storage (bf16 parameters, fp32 scalars; the model casts as the record, no
              autocast); --dtype fp32 keeps every parameter fp32 (CPU runs).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from tritonrun.gpt2 import speedrun89 as s89
from tritonrun.gpt2.ops import RECORD89_OPS
from tritonrun.recipes.base import Recipe, Schedule

RECORD_NAME = ("modded-nanogpt record #89 (2026-07-17, FP8 MLP down projection; train_gpt.py at f411b3d3: 1,285 steps, "
               "338.8M tokens)")
RECORD_STEPS = 1285  # [H1890-1891] 1,270 scheduled + 15 extension steps
RECORD_GPUS = 8  # the record's loss: sum / 8 over one step's tokens [H57-58]
FINAL_BATCH = s89.STAGES[-1].batch_tokens  # 393,216 tokens: --total-batch-tokens is the last stages' batch [H1981]
STAGE_BATCH_DIVISOR = 3  # the stages' batches are 1/3, 2/3, 3/3 of the last: --total-batch-tokens splits in thirds


def scaled_schedule(max_steps: int, lr_floor: float = 0.15) -> s89.Schedule89:
    """The record's schedule over a run of `max_steps` steps: the record's own at 1,285 (and the cooldown's floor
    0.15); otherwise the scheduled / extension split, the momentum warm-up (300) and cool-down (50) scaled by
    max_steps / 1,285 (the stage fractions scale by themselves)."""
    base = s89.Schedule89(lr_floor=lr_floor)
    if max_steps == base.total_steps:
        return base
    f = max_steps / base.total_steps
    scheduled = min(max_steps, max(3, round(base.scheduled_steps * f)))
    return replace(base, scheduled_steps=scheduled, extension_steps=max_steps - scheduled,
                   momentum_warmup_steps=max(1, round(base.momentum_warmup_steps * f)),
                   momentum_cooldown_steps=max(1, round(base.momentum_cooldown_steps * f)))


class Record89Schedule(Schedule):
    """Per step: the stage's micro-batches and maximum document length, lr multiplier and NorMuon momentum on the
    optimizer (Record89Optimizer.set_step), and the forward's StepInputs (windows, YaRN'd rotary tables and softmax
    scale, MTP and prefix weights) as `window(step)`; a step at or past max_steps (the final validation) gets the
    record's final long window [H2325-2326]."""

    def __init__(self, plan: s89.Schedule89, seq_len: int, head_dim: int, device, max_steps: int):
        self.plan, self.seq_len, self.head_dim, self.device, self.max_steps = plan, seq_len, head_dim, device, max_steps
        self._tables: dict = {}  # (stage, final) -> StepInputs: the rotary tables change only with the stage

    def micro_batches(self, step: int, default: int) -> int:
        """`default` is the last stages' count (--total-batch-tokens); the stage's share of it."""
        return default * self.plan.batch_tokens(step) // FINAL_BATCH

    def grad_scale(self, step: int, tokens: int) -> float:
        return tokens / RECORD_GPUS

    def begin_step(self, step: int, train_loader) -> None:
        train_loader.set_batch(train_loader.tokens, self.plan.max_doc_len(step))

    def window(self, step: int):
        import torch

        from tritonrun.gpt2.model89 import step_inputs

        final = step >= self.max_steps
        key = (self.plan.stage(step)[0], final)
        if key not in self._tables:
            self._tables[key] = step_inputs(self.plan, step, self.seq_len, self.head_dim, self.device, final=final)
        return replace(self._tables[key],
                       mtp_weights=torch.tensor(self.plan.mtp_weights(step), dtype=torch.float32, device=self.device),
                       prefix_weight=torch.tensor(self.plan.prefix_weight(step), dtype=torch.float32,
                                                  device=self.device))

    def window_key(self, step: int):
        return self.plan.windows(step, step >= self.max_steps)

    def apply(self, optimizer, step: int) -> dict:
        lr, momentum = self.plan.lr_multiplier(step), self.plan.muon_momentum(step)
        optimizer.set_step(step, lr, momentum)
        short, long_ = self.plan.windows(step)
        return {"lr": optimizer.normuon.param_groups[0]["lr"], "lr_scale": lr, "muon_momentum": momentum,
                "window": long_, "short_window": short, "stage": self.plan.stage(step)[0],
                "adam_step": optimizer.adam_step(step), "max_doc_len": self.plan.max_doc_len(step)}


def fp8_enabled(cfg) -> bool:
    """--fp8 on / off as resolved (tritonrun/train.py turns auto into one of them)."""
    return cfg.fp8 == "on"


@dataclass(frozen=True)
class Record20260717(Recipe):
    packed: bool = True
    lr_is_multiplier: bool = True
    autocast: bool = False  # the model casts as the record does (bf16 storage, fp32 scalars)
    fp8: bool = True  # --fp8 applies
    ddp_broadcast_buffers: bool = False  # the sign table (seeded init) and prefix table are equal on every rank
    memory_step: str = "record89"  # tritonrun.memory.record89_estimate: the record's storage, cadence and state

    @property
    def refused(self) -> dict[str, str]:
        return {
            "weight_decay": "each group decays as the record's (cautious, tied to the lr: recipes/record89_optim.py)",
            "warmup_steps": "the record has no lr warmup",
            "grad_clip": "the record clips nothing",
            "beta1": "each Adam group has the record's own betas (recipes/record89_optim.py ADAM_TABLE)",
            "beta2": "each Adam group has the record's own betas (recipes/record89_optim.py ADAM_TABLE)",
            "doc_aligned": "every batch is whole documents from their start, the record's rule",
            "muon_coefficients": "NorMuon runs the record's Polar Express",
            "hellaswag_every": "HellaSwag scoring is not wired for this model (it needs the step's windows)",
            "hellaswag_path": "HellaSwag scoring is not wired for this model (it needs the step's windows)",
            "micro_batch": "each micro-batch is one packed sequence of --seq-len tokens: size --seq-len instead",
        }

    def sizes(self) -> dict:
        from tritonrun.gpt2.model89 import RECORD89_MODELS

        return RECORD89_MODELS

    def defaults(self, on_gpu: bool) -> dict:
        out = {"lr": 1.0, "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 0.0,
               "final_lr_frac": s89.Schedule89().lr_floor,  # the cooldown's floor [H1975]
               "beta1": 0.9, "beta2": 0.99, "micro_batch": 1, "doc_aligned": True,
               "muon_coefficients": "polar_express", "hellaswag_every": 0, "fp8": "auto",
               # eager: every hot op is a Triton kernel; torch.compile of this model is not yet measured on a GPU
               "compile": False}
        if on_gpu:
            out.update(max_steps=RECORD_STEPS, val_every=s89.Schedule89().val_every, total_batch_tokens=FINAL_BATCH)
        else:  # the CPU smoke run: stages of 1, 2, 3 packed sequences of 256 tokens
            out.update(seq_len=256, total_batch_tokens=STAGE_BATCH_DIVISOR * 256)
        return out

    def validate(self, cfg) -> None:
        import os

        if cfg.micro_batch != 1:
            raise ValueError(f"--micro-batch {cfg.micro_batch} does not apply to --recipe {self.name} (each "
                             f"micro-batch is one packed sequence of --seq-len tokens): drop it and size --seq-len")
        if cfg.max_steps < 4:
            raise ValueError(f"--max-steps {cfg.max_steps} is too short for --recipe {self.name}'s three stages and "
                             f"extension: use at least 4")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        unit = STAGE_BATCH_DIVISOR * cfg.seq_len * world
        if cfg.total_batch_tokens % unit:
            k = max(1, round(cfg.total_batch_tokens / unit))
            raise ValueError(f"--total-batch-tokens {cfg.total_batch_tokens} (the last stages' batch; the first two "
                             f"take 1/3 and 2/3 of it) is not a multiple of 3 x --seq-len {cfg.seq_len}"
                             + (f" x {world} ranks" if world > 1 else "")
                             + f": make it {k * unit}, or pick a --seq-len that divides a third of it")
        if not 0 <= cfg.final_lr_frac <= 1:
            raise ValueError(f"--final-lr-frac {cfg.final_lr_frac}: the cooldown's floor is a fraction in [0, 1] "
                             f"(the record's 0.15)")
        if cfg.init_from and not cfg.init_from.startswith("ckpt:"):
            raise ValueError(f"--init-from {cfg.init_from}: --recipe {self.name} starts from ckpt:PATH of a "
                             f"{self.name} run, or from scratch")
        from tritonrun.gpt2.ops import DENSE_WINDOW_MASK_MAX_T, dense_window_refusal, parse_op_list

        torch_attention = cfg.backend == "torch" or "window_attention" in parse_op_list(cfg.torch_ops)
        if cfg.device == "cuda" and torch_attention and not cfg.compile and cfg.seq_len > DENSE_WINDOW_MASK_MAX_T:
            raise ValueError(dense_window_refusal(cfg.seq_len))
        if cfg.fp8 == "on":
            if cfg.backend != "triton" or "relu2_mlp" in parse_op_list(cfg.torch_ops):
                raise ValueError("--fp8 on runs the MLPs in the Triton relu2_mlp kernel: add --backend triton (and "
                                 "keep relu2_mlp out of --torch-ops), or --fp8 off")
            from tritonrun.presets import FP8_RATIO, PRESETS

            arch = PRESETS[cfg.gpu].arch
            if cfg.device == "cuda" and arch not in FP8_RATIO:
                raise ValueError(f"--fp8 on needs FP8 tensor cores (sm_89 or sm_90); --gpu {cfg.gpu} is {arch}: "
                                 f"use --fp8 off")

    def init_model_size(self, spec: str, asked: str | None) -> str:
        from tritonrun.gpt2.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint

        try:
            have = load_checkpoint(resolve_checkpoint(spec.partition(":")[2]))["model_config"]
        except CheckpointError as e:
            raise ValueError(f"--init-from {spec}: {e}") from None
        keys = ("n_embd", "head_dim", "bigram_rows", "vocab_size")
        what = ", ".join(f"{k} {have.get(k)}" for k in keys)
        return self._size_named(spec, asked, have, keys, what, kind="record89 ")

    def model_config(self, cfg):
        """sizes()[cfg.model] in the run's storage: the record's (bf16) under --dtype bf16, all fp32 under fp32."""
        return replace(self.sizes()[cfg.model], dtype="bfloat16" if cfg.dtype == "bf16" else "float32")

    def model_for(self, config, ops=None, fp8: bool = False):
        from tritonrun.gpt2.model89 import Record89GPT

        return Record89GPT(config, ops, fp8=fp8)

    def build_model(self, cfg, ops):
        """Record89GPT of --model (or --init-from ckpt:PATH's weights), its prefix-token table from the tokenizer."""
        import torch

        from tritonrun.data.tokenizer import prefix_table
        from tritonrun.gpt2.model89 import Record89Config

        if not cfg.init_from:
            model = self.model_for(self.model_config(cfg), ops, fp8=fp8_enabled(cfg))
        else:
            ckpt = self.own_checkpoint(cfg.init_from)
            model = self.model_for(Record89Config.from_dict(ckpt["model_config"]), ops, fp8=fp8_enabled(cfg))
            model.load_state_dict(ckpt["model"])
        model.prefix_table.copy_(torch.from_numpy(prefix_table(model.config.padded_vocab)))
        return model

    def build_optimizer(self, model, ops, cfg):
        from tritonrun.recipes.record89_optim import Record89Optimizer

        optimizer = Record89Optimizer(model, untie_step=scaled_schedule(cfg.max_steps).untie_step, lr_scale=cfg.lr)
        model.refresh_fp8()  # the start's quantization [H2300]
        return optimizer

    def schedule(self, cfg, model) -> Record89Schedule:
        device = next(model.parameters()).device
        return Record89Schedule(scaled_schedule(cfg.max_steps, cfg.final_lr_frac), cfg.seq_len,
                                model.config.head_dim, device, cfg.max_steps)

    def loaders(self, cfg, train_files, val_file, device, rank: int, world_size: int):
        """Training: DocPackLoader (the record's batches: whole documents, the stage's maximum length, the schedule
        sets it each step); validation: contiguous windows of --seq-len tokens with their document bounds, as the
        record's unaligned val loader [H2272]."""
        from tritonrun.data.doc_loader import DocPackLoader
        from tritonrun.data.loader import PackedLoader, doc_slots_for

        slots = doc_slots_for(cfg.seq_len)
        plan = scaled_schedule(cfg.max_steps)
        return (DocPackLoader(train_files, cfg.seq_len, plan.max_doc_len(0), slots, device, rank=rank,
                              world_size=world_size),
                PackedLoader([val_file], cfg.seq_len, device, rank=rank, world_size=world_size, doc_aligned=False,
                             doc_slots=slots))

    def flops_per_token(self, model, cfg) -> int:
        """Record89GPT.flops_per_token over the run's windows, weighted by each step's tokens; with --fp8 on the
        MLPs' forward matmuls count at the FP8 rate (FP8_RATIO of the preset's architecture)."""
        from tritonrun.presets import FP8_RATIO, PRESETS

        ratio = FP8_RATIO.get(PRESETS[cfg.gpu].arch, 1.0) if fp8_enabled(cfg) else 1.0
        plan = scaled_schedule(cfg.max_steps)
        total = tokens = 0
        for step in range(cfg.max_steps):
            n = plan.batch_tokens(step)
            total += n * model.flops_per_token(cfg.seq_len, plan.windows(step), ratio)
            tokens += n
        return round(total / tokens)

    def packed_lengths(self, total_batch_tokens: int, block_size: int) -> list[int]:
        """Powers of two from 128 to 16,384 that divide the first stage's batch (a third of --total-batch-tokens):
        every stage is then whole micro-batches. 16,384 is the record's own sequence per GPU in its first stage, and
        the longest the eager torch window attention takes (its dense mask; this recipe runs eager by default)."""
        from tritonrun.gpt2.ops import DENSE_WINDOW_MASK_MAX_T

        third = total_batch_tokens // STAGE_BATCH_DIVISOR
        top = min(block_size, DENSE_WINDOW_MASK_MAX_T)
        return [t for t in (2 ** k for k in range(7, 21)) if t <= top and third % t == 0
                and total_batch_tokens % STAGE_BATCH_DIVISOR == 0]

    def batch_note(self, cfg) -> str:
        plan = scaled_schedule(cfg.max_steps)
        bounds = plan.bounds
        stages = ", ".join(f"steps {a + 1}-{b}: {cfg.total_batch_tokens * s.batch_tokens // FINAL_BATCH:,}"
                           for (a, b), s in zip(bounds, plan.stages) if b > a)
        return f" (the last stages'; by stage, tokens per step: {stages})"

    def describe_optimizer(self, optimizer, world_size: int) -> str:
        return ("  normuon  torch (tritonrun/kernels/normuon.py: NorMuon with Polar Express on the banks; cautious "
                "Adam on odd steps on two steps' gradients; tied head / embed until step "
                f"{optimizer.untie_step})")


RECIPE = Record20260717(name="record89", replicates=RECORD_NAME, model_kind="record89", op_names=RECORD89_OPS,
                        tokens_to_target=s89.LOG_SCHEDULE.tokens(),
                        tokens_source="modded-nanogpt 2026-07-17 record's 13 logged runs: 1,390 steps, "
                                      "365,690,880 tokens, mean val 3.27837 (the merged train_gpt.py this recipe "
                                      "follows schedules 338,821,120 tokens; its val is not published); "
                                      "tritonrun/gpt2/speedrun89.py LOG_SCHEDULE")
