"""Record #89's optimizer for one GPU (modded-nanogpt train_gpt.py at f411b3d3, NorMuonAndAdam H374-947 and its
parameter table H2026-2076), over tritonrun/gpt2/model89.Record89GPT: NorMuon on the three banks, cautious Adam on
everything else (tritonrun/kernels/normuon.py: both bitwise equal to the record's update functions). The recipe
module (issue 35) drives it; "[H2030]" is the record file's line.

What the record's class adds over the two update rules, kept here:
  cadence   NorMuon steps every step; Adam only on odd steps, on the sum of two steps' gradients (the even step's
            Adam gradients are not cleared) [H2104-2106, H819-823].
  tied      until the untie step the LM head and the token embedding are one matrix: on Adam steps embed's gradient
            (transposed) is added into lm_head's, only lm_head is updated, then embed = lm_head^T [H751-810].
  untie     after the untie step's update (speedrun89.Schedule89.untie_step, odd so Adam has just run) embed takes
            lm_head's Adam moments (transposed) and step count, and the two train apart from then on [H657-694].
  lr        every group's lr = its base lr x the schedule's multiplier; NorMuon's momentum the schedule's
            [H2137-2143].
  FP8       after every step the model re-quantizes its MLP weights (Record89GPT.refresh_fp8, the record's
            quantize_mlp_fp8 after step_optimizers [H2365]); the FP8 scales travel in state_dict (checkpoints).
What it leaves out (8 GPUs only): reduce-scatter / all-gather layouts, sparse bigram gradient exchange, the bank
padding to a multiple of the world size, the scatter and work orders (they order communication, not math).
"""
from __future__ import annotations

import torch

from tritonrun.kernels.normuon import CautiousAdam, NorMuon

ADAM_DEFAULTS = dict(lr=0.008, eps=1e-10, weight_decay=0.005)  # [H2065-2069]
NORMUON_DEFAULTS = dict(lr=0.023, momentum=0.95, beta2=0.9, weight_decay=1.2)  # [H2071-2076]
NORMUON_PARAMS = ("qk_bank", "vo_bank", "mlp_bank")  # [H2027-2029]
# Adam parameters: (betas, lr_mul, wd_mul); lr_mul and wd_mul default to 1 [H482-483]
ADAM_TABLE: dict[str, tuple[tuple[float, float], float, float]] = {
    "scalars": ((0.9, 0.99), 5.0, 0.0),  # [H2030]
    "smear_gate": ((0.9, 0.99), 0.01, 0.0),  # [H2031]
    "ve_gate_bank": ((0.9, 0.99), 1.0, 1.0),  # [H2032]
    "lm_head": ((0.5, 0.95), 1.0, 150.0),  # [H2033]
    "bigram_embed": ((0.75, 0.95), 75.0, 5.0),  # [H2034]
    "post_lambdas": ((0.9, 0.95), 1.0, 0.0),  # [H2035]
    "resid_lambdas": ((0.9, 0.95), 5.0, 0.0),  # [H2036]
    "value_embeds": ((0.75, 0.95), 75.0, 5.0),  # [H2037]
    "embed": ((0.5, 0.95), 1.0, 150.0),  # [H2038]
    "mudd_w1": ((0.9, 0.99), 0.25, 1.0),  # [H2043]
    "mudd_w2": ((0.9, 0.99), 0.25, 1.0),  # [H2044]
    "mudd_b2": ((0.9, 0.99), 0.25, 0.0),  # [H2045]
    "mudd_gate_w1": ((0.9, 0.99), 0.1, 1.0),  # [H2046]
    "mudd_gate_w2": ((0.9, 0.99), 0.1, 1.0),  # [H2047]
    "mudd_gate_b2": ((0.9, 0.99), 0.1, 0.0),  # [H2048]
    "mudd_gate_scale": ((0.9, 0.99), 0.1, 0.0),  # [H2049 _mudd_gate_scale]
}
MLP_CPROJ_LR_MUL = 2.0  # odd matrices of the MLP bank (c_proj) [H514-522]


class Record89Optimizer:
    """NorMuon + cautious Adam with the record's cadence, tying and untie (module docstring). Call set_step(step,
    lr_multiplier, momentum) before each step() (the recipe's schedule does); zero_grad() keeps Adam's gradients
    after a NorMuon-only step. `lr_scale` multiplies every base lr (--lr as a multiplier; 1 = the record's)."""

    def __init__(self, model, untie_step: int, lr_scale: float = 1.0):
        self.model = model
        named = dict(model.named_parameters())
        unknown = set(named) - set(ADAM_TABLE) - set(NORMUON_PARAMS)
        if unknown:
            raise ValueError(f"Record89Optimizer: parameters without a table entry: {sorted(unknown)}")
        self.lm_head, self.embed = named["lm_head"], named["embed"]
        adam_groups = []
        for name, (betas, lr_mul, wd_mul) in ADAM_TABLE.items():
            lr = ADAM_DEFAULTS["lr"] * lr_scale
            adam_groups.append(dict(params=[named[name]], name=name, betas=betas, lr_mul=lr_mul, wd_mul=wd_mul,
                                    lr=lr, base_lr=lr))
        self.adam = CautiousAdam(adam_groups, eps=ADAM_DEFAULTS["eps"], weight_decay=ADAM_DEFAULTS["weight_decay"])
        muon_groups = []
        for name in NORMUON_PARAMS:
            p = named[name]
            per = [MLP_CPROJ_LR_MUL if i % 2 else 1.0 for i in range(p.shape[0])] if name == "mlp_bank" else None
            lr = NORMUON_DEFAULTS["lr"] * lr_scale
            muon_groups.append(dict(params=[p], name=name, matrix_lr_mul=per, lr=lr, base_lr=lr))
        self.normuon = NorMuon(muon_groups, momentum=NORMUON_DEFAULTS["momentum"], beta2=NORMUON_DEFAULTS["beta2"],
                               weight_decay=NORMUON_DEFAULTS["weight_decay"])
        self.untie_step = untie_step
        self.split = False  # embed and lm_head train apart (after the untie step)
        self.step_index = 0
        self._adam_ran = False

    @property
    def param_groups(self) -> list[dict]:
        return self.adam.param_groups + self.normuon.param_groups

    def set_step(self, step: int, lr_multiplier: float, momentum: float) -> None:
        """Every group's lr = base_lr x lr_multiplier, NorMuon's momentum, for 0-based `step`."""
        self.step_index = step
        for g in self.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier
        for g in self.normuon.param_groups:
            g["momentum"] = momentum

    def adam_step(self, step: int | None = None) -> bool:
        """Whether Adam steps at `step` (default: the current one): odd steps [H2104-2106 _is_adam_step]."""
        return (self.step_index if step is None else step) % 2 == 1

    @torch.no_grad()
    def step(self) -> None:
        self.normuon.step()
        self._adam_ran = self.adam_step()
        if self._adam_ran:
            if not self.split:  # tied: one matrix, its gradient both uses' [H751, H810]
                if self.embed.grad is not None:
                    if self.lm_head.grad is None:
                        self.lm_head.grad = torch.zeros_like(self.lm_head)
                    self.lm_head.grad.add_(self.embed.grad.t())
                self.embed.grad = None
            self.adam.step()
            if not self.split:
                self.embed.copy_(self.lm_head.t())
        if self.step_index == self.untie_step and not self.split:
            self.untie()
        if getattr(self.model, "fp8", False):
            self.model.refresh_fp8()

    @torch.no_grad()
    def untie(self) -> None:
        """embed takes lm_head's Adam moments (transposed) and step count; the two train apart [H657-694]."""
        lm = self.adam.state[self.lm_head]
        if lm:
            self.adam.state[self.embed] = {"step": lm["step"], "exp_avg": lm["exp_avg"].t().contiguous(),
                                           "exp_avg_sq": lm["exp_avg_sq"].t().contiguous()}
        self.split = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """NorMuon's gradients always; Adam's only after an Adam step (the even step's are summed into the next)."""
        self.normuon.zero_grad(set_to_none=set_to_none)
        if self._adam_ran:
            self.adam.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        fp8 = getattr(self.model, "fp8_state_dict", lambda: None)()
        return {"adam": self.adam.state_dict(), "normuon": self.normuon.state_dict(), "split": self.split,
                "adam_ran": self._adam_ran, "fp8": fp8}

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state["adam"])
        self.normuon.load_state_dict(state["normuon"])
        self.split, self._adam_ran = bool(state["split"]), bool(state["adam_ran"])
        if state.get("fp8") is not None:
            self.model.load_fp8_state_dict(state["fp8"])
