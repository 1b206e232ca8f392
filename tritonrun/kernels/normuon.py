"""NorMuon and cautious Adam: record #89's optimizers (modded-nanogpt train_gpt.py, NorMuonAndAdam), single-GPU math.

NorMuon, per matrix W (rows x cols) of a bank (a stack of same-shape matrices), gradient g, step by step:

    buf = lerp(buf, g, 1 - mu);  u = lerp(g, buf, mu)             Nesterov momentum in fp32 (mu scheduled)
    X   = bf16(u);  X = X / (||X||_F * 1.02 + 1e-6)                  in bf16, per matrix
    5 Polar Express steps (tritonrun/kernels/muon.py POLAR_EXPRESS): wide (rows <= cols): A = X X^T,
      B = b A + c A A, X = a X + B X; tall: A = X^T X, B = b A + c A A, X = a X + X B       (bf16 GEMMs)
    NorMuon: m = mean(X^2) over the larger dimension (cols when rows >= cols, else rows), in fp32;
      s = lerp(s, m, 1 - beta2) (s: fp32, rows x 1 or 1 x cols);  r = rsqrt(max(s, 1e-10));
      V = X * r * ||X||_F / ||X * r||_F (the Frobenius norm kept; computed from m, not from X again)
    W  = W - W * [V * W >= 0] * (wd_mul * wd * lr) * eff_lr - V * eff_lr        cautious weight decay, in fp32
      eff_lr = lr * sqrt(max(1, rows/cols)) * per-matrix multiplier; lr = 0.023 x the schedule's multiplier; the
      decay's factor carries lr too, so it scales with lr^2.

"Mantissa": the record keeps W in bf16 plus the low 16 bits of its fp32 master in a uint16 state; the update runs
on the reassembled fp32 value and is split back (the forward then reads the bf16 high half: a truncation of the
fp32 master, not a rounding). NorMuon here does the same: bf16 params, a uint16 "mantissa" state, the fp32 value
bit for bit; with fp32 params it updates them in place (no mantissa).

Cautious Adam (everything else), per tensor: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
u = (m / (sqrt(v) + eps)) * lr sqrt(1 - b2^t) / (1 - b1^t); u += lr^2 * wd * wd_mul * W where u * W > 0 (strict);
W -= u. The record steps Adam on odd steps only, on two steps' summed gradients (the trainer's cadence).

Every expression follows the record's operation order (which rounding happens where), checked against its own
functions on CPU (tests/test_normuon.py's docstring). Not a Triton kernel: torch ops (the record compiles these
with torch.compile; the Polar Express GEMMs are the cost, 0.4 % of a step, tritonrun/kernels/muon.py).
"""
from __future__ import annotations

import torch

from tritonrun.kernels.muon import newton_schulz

PE_EPS = 1e-6  # [train_gpt.py polar_express: X / (X.norm() * (1 + 2e-2) + 1e-6); 1.02 is muon.SAFETY's]


SPLIT_ABOVE = 1024  # rows above which the record splits each step's a·X + X·B in two [H881 is_large_matrix]


def polar_express(u: torch.Tensor) -> torch.Tensor:
    """bf16 orthogonalization of u (..., rows, cols), the record's order of operations (module docstring):
    tritonrun/kernels/muon.newton_schulz with Polar Express's 5 triples, normalized in bf16, tall matrices iterated
    with their Gram matrix on the right; above SPLIT_ABOVE rows (the MLP bank) the product is rounded before a·X is
    added, as the record."""
    return newton_schulz(u, 5, "polar_express", eps=PE_EPS, dtype=torch.bfloat16, norm_in_dtype=True,
                         split_above=SPLIT_ABOVE)


def normuon_normalize(v: torch.Tensor, second: torch.Tensor, beta2: float, red_dim: int) -> torch.Tensor:
    """v scaled by the running per-row (or per-column) RMS, Frobenius norm kept; updates `second` in place."""
    v_mean = v.float().square().mean(dim=red_dim, keepdim=True)
    n = v.size(red_dim)
    v_norm = v_mean.sum(dim=(-2, -1), keepdim=True).mul_(n).sqrt_()
    second.lerp_(v_mean.to(second.dtype), 1 - beta2)
    step = second.clamp_min(1e-10).rsqrt_()
    new_norm = ((v_mean * n) * step.float().square()).sum(dim=(-2, -1), keepdim=True).sqrt_()
    return v * (step * (v_norm / new_norm.clamp_min_(1e-10))).type_as(v)


def _fp32_of(p16: torch.Tensor, mantissa: torch.Tensor) -> torch.Tensor:
    """The fp32 value whose high half is bf16 p16 and low half `mantissa` (int32 arithmetic: portable)."""
    hi = p16.view(torch.int16).to(torch.int32) << 16
    lo = mantissa.view(torch.int16).to(torch.int32) & 0xFFFF
    return (hi | lo).view(torch.float32)


def cautious_update_(p: torch.Tensor, update: torch.Tensor, wd_factor: torch.Tensor, lr_factor: torch.Tensor,
                     mantissa: torch.Tensor | None = None) -> None:
    """p = p - p [update p >= 0] wd lr - update lr in fp32 (the record's order); bf16 p with its mantissa state."""
    g = update.float()
    wd, lr = wd_factor.to(torch.float32), lr_factor.to(torch.float32)
    if mantissa is None:
        p.copy_(p - (p * ((g * p) >= 0) * wd * lr) - (g * lr))
        return
    precise = _fp32_of(p, mantissa)
    new = precise - (precise * ((g * precise) >= 0) * wd * lr) - (g * lr)
    bits = new.view(torch.int32)
    p.view(torch.int16).copy_((bits >> 16).to(torch.int16))
    mantissa.view(torch.int16).copy_((bits & 0xFFFF).to(torch.int16))


class _KeepsStateDtypes:
    """torch.optim.Optimizer.load_state_dict casts floating-point state to the param's dtype: fp32 moments of a bf16
    param would come back rounded to bf16. These optimizers keep each state tensor as it was saved."""

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            for k, v in state_dict["state"].get(i, {}).items():
                if isinstance(v, torch.Tensor):
                    self.state[p][k] = v.to(device=p.device, copy=True)


class NorMuon(_KeepsStateDtypes, torch.optim.Optimizer):
    """NorMuon over banks of matrices (module docstring). Each param: (rows, cols) or (n, rows, cols), bf16 (with a
    uint16 mantissa state) or fp32. Group keys: lr (the record: 0.023 x the schedule), momentum (scheduled),
    beta2 (0.9), weight_decay (1.2), wd_mul (1), lr_mul (1; the shape rule sqrt(max(1, rows/cols)) is applied on
    top), and per-param `matrix_lr_mul` (a list, one per matrix of a bank: the record gives MLP c_proj 2).
    state_dict is torch.optim.Optimizer's; load_state_dict keeps the fp32 / uint16 state as saved."""

    def __init__(self, params, lr: float = 0.023, momentum: float = 0.95, beta2: float = 0.9,
                 weight_decay: float = 1.2, wd_mul: float = 1.0, lr_mul: float = 1.0, matrix_lr_mul=None):
        defaults = dict(lr=lr, momentum=momentum, beta2=beta2, weight_decay=weight_decay, wd_mul=wd_mul,
                        lr_mul=lr_mul, matrix_lr_mul=matrix_lr_mul)
        super().__init__(params, defaults)
        for g in self.param_groups:
            for p in g["params"]:
                if p.ndim not in (2, 3) or p.dtype not in (torch.bfloat16, torch.float32):
                    raise ValueError(f"NorMuon: params are bf16/fp32 matrices or stacks of them, got {p.dtype} "
                                     f"{tuple(p.shape)}")

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            rows, cols = p.shape[-2:]
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
            shape = (*p.shape[:-1], 1) if rows >= cols else (*p.shape[:-2], 1, cols)
            state["second_momentum_buffer"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
            if p.dtype == torch.bfloat16:
                state["mantissa"] = torch.zeros(p.shape, dtype=torch.uint16, device=p.device)
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                mu = torch.tensor(group["momentum"], dtype=torch.float32, device=p.device)
                state = self._state(p)
                rows, cols = p.shape[-2:]
                g = p.grad.to(torch.float32, copy=True)  # the momentum steps below run in place: keep p.grad
                buf = state["momentum_buffer"]
                buf.lerp_(g, 1 - mu)
                u = g.lerp_(buf, mu)
                v = normuon_normalize(polar_express(u), state["second_momentum_buffer"], group["beta2"],
                                      -1 if rows >= cols else -2)
                shape_mult = max(1.0, rows / cols) ** 0.5
                base = group["lr_mul"] * shape_mult * group["lr"]
                wd = torch.tensor(group["wd_mul"] * group["weight_decay"] * group["lr"])
                mantissa = state.get("mantissa")
                per = group["matrix_lr_mul"]
                if per is None or p.ndim == 2:
                    cautious_update_(p, v, wd, torch.tensor(base), mantissa)
                else:
                    for i in range(p.shape[0]):
                        lr_i = torch.tensor(group["lr_mul"] * shape_mult * per[i] * group["lr"])
                        cautious_update_(p[i], v[i], wd, lr_i, None if mantissa is None else mantissa[i])
        return loss


class CautiousAdam(_KeepsStateDtypes, torch.optim.Optimizer):
    """Adam with cautious weight decay tied to lr^2 (module docstring), the record's Adam groups. Group keys: lr,
    lr_mul, betas, eps (1e-10), weight_decay, wd_mul. The trainer calls step() on odd steps only (the record's
    cadence: gradients of the even step are kept and summed)."""

    def __init__(self, params, lr: float = 0.008, betas=(0.9, 0.99), eps: float = 1e-10, weight_decay: float = 0.005,
                 lr_mul: float = 1.0, wd_mul: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, lr_mul=lr_mul,
                                      wd_mul=wd_mul))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr = group["lr"] * group["lr_mul"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
                state["step"] += 1
                t = state["step"]
                step_size = torch.tensor(lr * ((1 - b2 ** t) ** 0.5 / (1 - b1 ** t)))
                eff_wd = torch.tensor(lr * lr * group["weight_decay"] * group["wd_mul"])
                m, v, g = state["exp_avg"], state["exp_avg_sq"], p.grad
                if p.numel() <= ADAM_CHUNK or not (p.is_contiguous() and g.is_contiguous()):
                    _adam_update_(p, g, m, v, b1, b2, group["eps"], step_size, eff_wd)
                    continue
                flat = [t.view(-1) for t in (p, g, m, v)]
                for a in range(0, p.numel(), ADAM_CHUNK):  # elementwise: the same bits, 1/n of the temporaries
                    _adam_update_(*(t[a:a + ADAM_CHUNK] for t in flat), b1, b2, group["eps"], step_size, eff_wd)
        return loss


# Adam's temporaries (the update, sqrt(v), the caution mask: ~3 fp32 copies of the tensor) for a 290M-element table
# would be 3.2 GiB at once: tensors larger than this many elements are updated chunk by chunk (64 MiB of fp32).
ADAM_CHUNK = 1 << 24


def _adam_update_(p, g, m, v, b1, b2, eps, step_size, eff_wd) -> None:
    """One cautious Adam update of p in place (the record's order of operations; CautiousAdam.step)."""
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    update = m.div(v.sqrt().add_(eps)).mul_(step_size)
    update.addcmul_(p, (update * p) > 0, value=eff_wd)
    p.add_(other=update, alpha=-1.0)
