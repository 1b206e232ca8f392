"""What a recipe is: everything the trainer, the CLI, the benches and the checkpoints ask of one.

A recipe is one module in tritonrun/recipes/ holding one `Recipe` subclass. It declares (as class attributes) and
builds (as methods); nothing outside tritonrun/recipes/ tests which recipe it has. The questions, in the order a
run asks them:

  name, replicates        the --recipe name, and the record or recipe it follows (logs, README)
  sizes()                 --model's names and their model configs
  defaults(on_gpu)        the fields it sets over tritonrun/defaults.py's (lr, schedule lengths, betas, ...: every
                          optimizer field; on_gpu False: the CPU smoke run's)
  refused                 flags with no meaning under it, each with the reason
  validate(cfg)           what it requires of a resolved config (ValueError: one line, the fix)
  packed                  the data layout: one packed sequence of seq_len tokens per micro-batch (documents in
                          cu_seqlens, a sliding window per step) or dense (micro_batch, seq_len) batches
  model_for(config, ops)  its model class built from a config (the memory estimate builds it alike)
  build_model(cfg, ops)   the model, from scratch or --init-from (init_sources: the schemes it trains from)
  build_optimizer(...)    the optimizer(s), one object with step / zero_grad / state_dict / param_groups
  schedule(cfg, model)    a Schedule: per step, the lr (and momentum, window, ...) it sets on the optimizer
  flops_per_token(...)    the MFU basis of a run of it
  op_names                the ops-seam entries its model calls (the ops table of the log)
  model_kind, hf_export   the "model_kind" its checkpoints carry, and whether HF export takes them
  autocast, fp8           --dtype bf16 as torch.autocast (or the model's own casts); whether --fp8 applies
  memory_step             which training step tritonrun.memory estimates for it: "generic" (estimate()'s, built
                          from model_for and the optimizers) or a recipe's own (memory.ESTIMATORS)
  packed_lengths(...)     a packed recipe's --seq-len candidates for the memory fit
  lr_is_multiplier        --lr: an absolute peak, or a multiplier on every group's base lr
  softcapped_head         its torch LM head softcaps fp32 logits (more memory per micro-batch: presets)
  warmup_fraction         its lr warmup as a fraction of the run; tokens_to_target (+ source): the published
                          tokens to val <= 3.28 (bench/train.py's projection)
"""
from __future__ import annotations

from dataclasses import dataclass


class Schedule:
    """What the loop asks each step: set the optimizer's lr (and whatever else the recipe schedules) for 0-based
    `step` and say what was set ({"lr": ..., ...}: logged and recorded with the step), and the attention window
    of the step (None: no window)."""

    def apply(self, optimizer, step: int) -> dict:
        raise NotImplementedError

    def window(self, step: int) -> int | None:
        return None

    def micro_batches(self, step: int, default: int) -> int:
        """Micro-batches per rank at 0-based `step` (default: the run's total_batch_tokens / (micro-batch x seq_len x
        ranks)); a recipe whose batch grows in stages returns the stage's."""
        return default

    def grad_scale(self, step: int, tokens: int) -> float:
        """The factor on the mean loss the backward takes for a step of `tokens` tokens (all ranks): 1.0 (the
        gradient of the mean); a recipe whose record sums its losses returns what makes the gradients the record's.
        The logged loss stays the mean."""
        return 1.0

    def begin_step(self, step: int, train_loader) -> None:
        """Before `step`'s first micro-batch: what the data loader must know of the step (a stage's maximum document
        length)."""

    def warmup_steps(self, start: int, n: int, end: int) -> list[int]:
        """The 0-based steps the untimed warm-up runs for a run at `start` with `n` warm-up steps and `end` steps in
        all: start .. start + n - 1, and, where the schedule hands the model a window, one step at the first window
        after those that differs and one at the last window. Under --compile the first changed window recompiles
        once (the window then becomes a symbolic int) and the largest may cross a guard: both happen here, not
        in the clock."""
        steps = list(range(start, start + n))
        if not steps or self.window_key(start) is None:
            return steps
        seen = {self.window_key(s) for s in steps}
        later = next((s for s in range(steps[-1] + 1, end) if self.window_key(s) not in seen), None)
        for s in (later, end - 1):
            if s is not None and s > steps[-1] and self.window_key(s) not in seen:
                steps.append(s)
                seen.add(self.window_key(s))
        return steps

    def window_key(self, step: int):
        """What of window(step) tells the warm-up two steps apart (hashable): the window itself by default."""
        return self.window(step)


@dataclass(frozen=True)
class Recipe:
    name: str  # the --recipe name
    replicates: str  # what it follows, in words
    model_kind: str  # checkpoints' "model_kind"
    packed: bool = False
    lr_is_multiplier: bool = False
    hf_export: bool = False
    init_sources: tuple[str, ...] = ("ckpt",)  # --init-from schemes whose weights it trains
    ddp_broadcast_buffers: bool = True  # DDP re-broadcasts the model's buffers each forward
    autocast: bool = True  # --dtype bf16 runs the forward under torch.autocast (False: the model casts itself)
    fp8: bool = False  # --fp8 applies (the record runs matmuls in FP8)
    memory_step: str = "generic"  # which of tritonrun.memory's step estimates measures it (ESTIMATORS)
    op_names: tuple[str, ...] = ()
    # its torch LM head applies a softcap (fp32 logits through tanh): a dense micro-batch of it takes more memory
    softcapped_head: bool = False
    warmup_fraction: float = 0.0  # its lr warmup as a fraction of the run (runs of another length scale it)
    tokens_to_target: float | None = None  # training tokens to the first FineWeb val <= 3.28, as published
    tokens_source: str = ""  # where tokens_to_target comes from

    # ------------------------------------------------------------------------------ configuration
    @property
    def refused(self) -> dict[str, str]:
        """{config field: why it does not apply}: given as flags, refused with the reason."""
        return {}

    def sizes(self) -> dict:
        raise NotImplementedError

    def defaults(self, on_gpu: bool) -> dict:
        """Fields this recipe sets over tritonrun/defaults.py's: every optimizer and schedule field (lr,
        warmup_steps, max_steps, final_lr_frac, weight_decay, grad_clip, beta1, beta2), and what its data layout
        needs (a packed recipe: micro_batch 1). on_gpu False: the CPU smoke run's values."""
        raise NotImplementedError

    def validate(self, cfg) -> None:
        """Raise ValueError (one line with the fix) for a config this recipe cannot train."""

    def init_model_size(self, spec: str, asked: str | None) -> str:
        """The --model name of the weights --init-from `spec` holds; ValueError (one line) when they are none of
        sizes(), or not `asked`."""
        raise NotImplementedError

    def _size_named(self, spec: str, asked: str | None, have: dict, keys: tuple[str, ...], what: str,
                    kind: str = "", hint: str = "", shape_in_refusal: bool = False) -> str:
        """init_model_size's matching: the first of sizes() whose `keys` equal `have`'s. Left out, --model is the
        weights' (not the preset's default), so config, record and leaderboard say it; a --model that differs is
        refused: training the weights' model under the flag's name would mislabel the run, and building the flag's
        model would drop the weights asked for."""
        sizes = self.sizes()
        names = [n for n, c in sizes.items() if all(getattr(c, k) == have.get(k) for k in keys)]
        if not names:
            raise ValueError(f"--init-from {spec}: its {kind}model ({what}) is none of --model's {kind}sizes "
                             f"({', '.join(sizes)}){hint}")
        if asked is not None and asked != names[0]:
            shown = f" ({what})" if shape_in_refusal else ""
            raise ValueError(f"--init-from {spec} holds {kind}model {names[0]}{shown}, not --model {asked}: drop "
                             f"--model (the weights decide it) or pass --model {names[0]}")
        return names[0]

    # ------------------------------------------------------------------------------ the run
    def model_for(self, config, ops=None):
        """A freshly initialized model of one of sizes()' configs (or a checkpoint's)."""
        raise NotImplementedError

    def build_model(self, cfg, ops):
        """The run's model: model_for(sizes()[cfg.model]), or the weights of --init-from."""
        raise NotImplementedError

    def own_checkpoint(self, init_from: str) -> dict:
        """The checkpoint --init-from ckpt:PATH names; InitError (one line) when it cannot be read or another recipe
        wrote it."""
        from tritonrun.errors import InitError
        from tritonrun.gpt2.checkpoint import (CheckpointError, checkpoint_model_kind, load_checkpoint,
                                               resolve_checkpoint)

        path = init_from.partition(":")[2]
        try:
            ckpt = load_checkpoint(resolve_checkpoint(path))
        except CheckpointError as e:
            raise InitError(str(e)) from None
        kind = checkpoint_model_kind(ckpt)
        if kind != self.model_kind:
            raise InitError(f"{path}: a {kind} checkpoint, not a {self.name} one: use --recipe {kind}")
        return ckpt

    def build_optimizer(self, model, ops, cfg):
        raise NotImplementedError

    def schedule(self, cfg, model) -> Schedule:
        raise NotImplementedError

    def flops_per_token(self, model, cfg) -> int:
        return model.flops_per_token(cfg.seq_len)

    def packed_lengths(self, total_batch_tokens: int, block_size: int) -> list[int]:
        """A packed recipe's --seq-len candidates for the memory fit: powers of two from 128 to the context that
        divide --total-batch-tokens."""
        return [t for t in (2 ** k for k in range(7, 21)) if t <= block_size and total_batch_tokens % t == 0]

    def batch_note(self, cfg) -> str:
        """What the dry run's batch line adds for this recipe (a staged batch: the stages'); "" for none."""
        return ""

    def describe_optimizer(self, optimizer, world_size: int) -> str | None:
        """An extra line for the log's ops table, for what runs outside the ops seam (None: nothing)."""
        return None

    def loaders(self, cfg, train_files, val_file, device, rank: int, world_size: int):
        """(train loader, val loader): dense (micro_batch, seq_len) batches; packed recipes override."""
        from tritonrun.data.loader import ShardLoader

        B, T = cfg.micro_batch, cfg.seq_len
        return (ShardLoader(train_files, B, T, device, rank=rank, world_size=world_size),
                ShardLoader([val_file], B, T, device, rank=rank, world_size=world_size))
