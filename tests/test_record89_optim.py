"""Record #89's optimizer wiring (tritonrun/recipes/record89_optim.py): the parameter table, the Adam cadence (odd
steps, two steps' gradients), the tied LM head / embedding, the untie, and state round trips. The update rules
themselves are tests/test_normuon.py's (bitwise against the record's functions)."""
import copy

import pytest
import torch
import torch.nn as nn

from tritonrun.kernels.normuon import CautiousAdam
from tritonrun.recipes.record89_optim import ADAM_TABLE, NORMUON_PARAMS, Record89Optimizer


class Small(nn.Module):
    """Every parameter name of Record89GPT at toy shapes (C = 6, V = 10), lm_head (C, V) and embed (V, C) tied."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        shapes = {"qk_bank": (4, 8, 6), "vo_bank": (2, 6, 6), "mlp_bank": (4, 12, 6), "lm_head": (6, 10),
                  "embed": (10, 6)}
        for name in list(ADAM_TABLE) + list(NORMUON_PARAMS):
            shape = shapes.get(name, (3, 5) if name != "mudd_gate_scale" else ())
            setattr(self, name, nn.Parameter(0.1 * torch.randn(shape, generator=g)))
        with torch.no_grad():
            self.embed.copy_(self.lm_head.t())



def _steps(model, opt, steps, seed=10):
    for s in steps:
        _grads_add(model, s + seed)
        opt.set_step(s, 1.0, 0.9)
        opt.step()
        opt.zero_grad()


def _grads_add(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        d = torch.randn(p.shape, generator=g)
        p.grad = d if p.grad is None else p.grad + d


def test_every_parameter_has_the_records_settings():
    opt = Record89Optimizer(Small(), untie_step=3)
    by_name = {g["name"]: g for g in opt.param_groups}
    assert set(by_name) == set(ADAM_TABLE) | set(NORMUON_PARAMS)
    assert by_name["bigram_embed"]["betas"] == (0.75, 0.95) and by_name["bigram_embed"]["lr_mul"] == 75.0
    assert by_name["lm_head"]["wd_mul"] == 150.0 and by_name["scalars"]["lr_mul"] == 5.0
    assert by_name["mlp_bank"]["matrix_lr_mul"] == [1.0, 2.0, 1.0, 2.0]  # c_proj (odd) at twice the lr
    opt.set_step(0, 1.5, 0.85)
    assert by_name["lm_head"]["lr"] == pytest.approx(0.008 * 1.5) and by_name["qk_bank"]["lr"] == pytest.approx(
        0.023 * 1.5)
    assert by_name["qk_bank"]["momentum"] == 0.85


def test_unknown_parameter_is_refused():
    model = Small()
    model.extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="without a table entry: \\['extra'\\]"):
        Record89Optimizer(model, untie_step=3)


def test_adam_steps_on_odd_steps_with_two_steps_gradients_and_the_tied_head():
    """Step 0 moves the banks only and keeps Adam's gradients; step 1 applies Adam to g0 + g1, the embedding's
    (transposed) added into the LM head's, and copies the head back into the embedding."""
    model = Small()
    opt = Record89Optimizer(model, untie_step=99)
    before = copy.deepcopy(model)
    _grads_add(model, 1)
    g0 = {n: p.grad.clone() for n, p in model.named_parameters()}
    opt.set_step(0, 1.0, 0.9)
    opt.step()
    opt.zero_grad()
    for n, p in model.named_parameters():
        moved = not torch.equal(p, dict(before.named_parameters())[n])
        assert moved == (n in NORMUON_PARAMS), n
        assert (p.grad is None) == (n in NORMUON_PARAMS), n
    _grads_add(model, 2)
    g1 = {n: p.grad - g0[n] for n, p in model.named_parameters()}
    opt.set_step(1, 1.0, 0.9)
    opt.step()
    opt.zero_grad()
    # the LM head by hand: one cautious Adam step on the summed gradient, the embedding's included
    head = dict(before.named_parameters())["lm_head"].detach().clone().requires_grad_()
    head.grad = g0["lm_head"] + g1["lm_head"] + (g0["embed"] + g1["embed"]).t()
    CautiousAdam([dict(params=[head], betas=(0.5, 0.95), lr_mul=1.0, wd_mul=150.0)], lr=0.008).step()
    assert torch.equal(model.lm_head, head)
    assert torch.equal(model.embed, model.lm_head.t())
    assert all(p.grad is None for p in model.parameters())


def test_untie_copies_the_heads_moments_and_then_they_train_apart():
    model = Small()
    opt = Record89Optimizer(model, untie_step=3)
    _steps(model, opt, range(4))
    assert opt.split
    lm, em = opt.adam.state[model.lm_head], opt.adam.state[model.embed]
    assert em["step"] == lm["step"] == 2
    assert torch.equal(em["exp_avg"], lm["exp_avg"].t()) and torch.equal(em["exp_avg_sq"], lm["exp_avg_sq"].t())
    assert torch.equal(model.embed, model.lm_head.t())
    _steps(model, opt, range(4, 6))
    assert em["step"] == 3 and not torch.equal(model.embed, model.lm_head.t())


def test_state_round_trip_continues_bitwise():
    """Saved mid-way (after an even step: Adam's gradients pending; and tied) and loaded into a fresh optimizer
    over a copy of the model: the next steps (the untie among them) give the same parameters bit for bit."""
    a = Small()
    opt_a = Record89Optimizer(a, untie_step=5)
    _steps(a, opt_a, range(3))  # ends after step 2 (even): Adam gradients are pending
    b = copy.deepcopy(a)
    for pa, pb in zip(a.parameters(), b.parameters()):
        pb.grad = None if pa.grad is None else pa.grad.clone()
    opt_b = Record89Optimizer(b, untie_step=5)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    _steps(a, opt_a, range(3, 8))
    _steps(b, opt_b, range(3, 8))
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), n
    assert opt_a.split and opt_b.split
