"""tritonrun/kernels/normuon.py: record #89's NorMuon and cautious Adam.

Against the record's own functions (train_gpt.py at f411b3d3: polar_express, _apply_normuon_variance_reduction,
_cautious_wd_and_update_inplace, _adam_update_step, their torch.compile decorators removed, the Triton XXT / XTX /
ba_plus_cAA products written as the same torch products, the uint32 bit packing as int32 views: no CPU kernel for
uint32 shifts), run on CPU outside the repo: 4 NorMuon steps on wide, square and tall banks (c_proj's 2x per-matrix
lr included) and 5 Adam steps were bitwise equal in params, mantissas and every state buffer. Here: the properties
and hand-computed cases that pin the same math down without the record's code."""
import copy

import pytest
import torch

from tritonrun.kernels.normuon import CautiousAdam, NorMuon, cautious_update_, normuon_normalize, polar_express


def _steps(p, n, seed, **group):
    opt = NorMuon([{"params": [p], **group}])
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        p.grad = torch.randn(p.shape, generator=g).bfloat16().to(p.dtype)  # the same values for both dtypes
        opt.param_groups[0]["momentum"] = 0.85 + 0.02 * i
        opt.step()
    return opt


def test_bf16_with_mantissa_is_the_fp32_master_bit_for_bit():
    """bf16 params + a uint16 mantissa state hold exactly the fp32 master an fp32 run computes (the same fp32 update
    math, independent of the bit packing), and the bf16 param is its high half (a truncation, as in the record)."""
    p0 = (torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(0)) * 0.05).bfloat16()
    half, full = p0.clone().requires_grad_(), p0.float().requires_grad_()
    opt = _steps(half, 4, 1, matrix_lr_mul=[1, 2, 1])
    _steps(full, 4, 1, matrix_lr_mul=[1, 2, 1])
    mant = opt.state[half]["mantissa"]
    bits = (half.detach().view(torch.int16).to(torch.int32) << 16) | (mant.view(torch.int16).to(torch.int32) & 0xFFFF)
    assert torch.equal(bits.view(torch.float32), full.detach())
    assert torch.equal(half.detach().view(torch.int16), (full.detach().view(torch.int32) >> 16).to(torch.int16))


def test_polar_express_orthogonalizes_and_normuon_keeps_the_norm():
    """After Polar Express every singular value is near 1 (5 steps of the published coefficients: within [0.7, 1.2]
    in bf16); NorMuon's first step (s = 0.1 m) equalizes the rows' RMS and keeps the Frobenius norm."""
    u = torch.randn(2, 64, 160, generator=torch.Generator().manual_seed(2))
    X = polar_express(u)
    sv = torch.linalg.svdvals(X.float())
    assert X.dtype == torch.bfloat16 and sv.min() > 0.7 and sv.max() < 1.2
    second = torch.zeros(2, 1, 160)  # wide: the mean runs over the rows, one state per column
    V = normuon_normalize(X, second, 0.9, -2)
    assert torch.allclose(second, 0.1 * X.float().square().mean(-2, keepdim=True), rtol=1e-6, atol=0)
    norms = V.float().norm(dim=(-2, -1))
    assert torch.allclose(norms, X.float().norm(dim=(-2, -1)), rtol=2e-2)  # bf16 rounding of V and of the scale
    cols = V.float().square().mean(-2).sqrt()
    assert torch.allclose(cols, cols.mean(-1, keepdim=True).expand_as(cols), rtol=2e-2)  # every column one RMS


def test_cautious_weight_decay_by_hand():
    """p -= p [u p >= 0] wd lr + u lr: decay only where the update pushes p toward zero (or u p = 0)."""
    p = torch.tensor([1.0, -1.0, 2.0, 0.0, 3.0])
    u = torch.tensor([0.5, 0.5, -1.0, 1.0, 0.0])  # the last: u p = 0 decays (>= 0, the record's NorMuon mask)
    cautious_update_(p, u, torch.tensor(0.1), torch.tensor(0.5))
    assert p.tolist() == pytest.approx([1.0 - 0.05 - 0.25, -1.0 - 0.25, 2.0 + 0.5, 0.0 - 0.5, 3.0 - 0.15],
                                       rel=1e-7)  # fp32 arithmetic


def test_shape_rule_and_per_matrix_lr():
    """A tall bank (rows 4 x cols): lr x sqrt(4) = 2; matrix 1 with per-matrix 2 moves exactly twice matrix 0 (same
    gradient, no decay), all in fp32."""
    p = torch.zeros(2, 128, 32, requires_grad=True)
    opt = NorMuon([{"params": [p], "matrix_lr_mul": [1, 2]}], lr=0.01, weight_decay=0.0)
    p.grad = torch.randn(128, 32, generator=torch.Generator().manual_seed(3)).expand(2, 128, 32).clone()
    opt.step()
    d0, d1 = p.detach()[0], p.detach()[1]
    assert torch.equal(d1, 2 * d0)
    # ||d0|| = eff lr x ||V|| = (0.01 x sqrt(128 / 32)) x ||X||, and X has 32 singular values near 1
    assert d0.norm().item() == pytest.approx(0.02 * 32 ** 0.5, rel=0.2)


def test_cautious_adam_first_step_by_hand():
    """Step 1: m = (1-b1) g, v = (1-b2) g^2, u = m / (sqrt(v) + eps) x lr sqrt(1-b2) / (1-b1) = lr sign(g) (eps
    aside); decay lr^2 wd wd_mul p where u p > 0."""
    p = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    opt = CautiousAdam([p], lr=0.1, betas=(0.5, 0.9), eps=0.0, weight_decay=0.5, lr_mul=2.0, wd_mul=3.0)
    p.grad = torch.tensor([1.0, 1.0, -4.0])
    opt.step()
    lr = 0.2
    want = [1.0 - (lr + lr * lr * 1.5 * 1.0), -2.0 - lr, 3.0 + lr]
    assert p.detach().tolist() == pytest.approx(want, rel=1e-6)  # fp32 arithmetic of the same terms


def test_resume_is_bitwise():
    """state_dict after 2 steps into a fresh optimizer, 2 more: equal to 4 straight steps (params and mantissa)."""
    p0 = (torch.randn(2, 40, 72, generator=torch.Generator().manual_seed(4)) * 0.05).bfloat16()
    g = torch.Generator().manual_seed(5)
    grads = [torch.randn(2, 40, 72, generator=g).bfloat16() for _ in range(4)]
    a = p0.clone().requires_grad_()
    opt_a = NorMuon([a])
    for gr in grads:
        a.grad = gr.clone()
        opt_a.step()
    b = p0.clone().requires_grad_()
    opt_b = NorMuon([b])
    for gr in grads[:2]:
        b.grad = gr.clone()
        opt_b.step()
    saved = copy.deepcopy(opt_b.state_dict())
    opt_c = NorMuon([b])
    opt_c.load_state_dict(saved)
    for gr in grads[2:]:
        b.grad = gr.clone()
        opt_c.step()
    assert torch.equal(a.detach().view(torch.int16), b.detach().view(torch.int16))
    assert torch.equal(opt_a.state[a]["mantissa"].view(torch.int16), opt_c.state[b]["mantissa"].view(torch.int16))


def test_refuses_what_is_not_a_matrix():
    with pytest.raises(ValueError, match="bf16/fp32 matrices or stacks"):
        NorMuon([torch.zeros(5, requires_grad=True)])


def test_adam_chunks_give_the_same_bits(monkeypatch):
    """Tensors above ADAM_CHUNK elements are updated chunk by chunk (bounded temporaries): the same bits as one
    update of the whole tensor (the update is elementwise)."""
    import tritonrun.kernels.normuon as nm

    g = torch.Generator().manual_seed(3)
    p0 = torch.randn(37, 29, generator=g)
    grads = [torch.randn(37, 29, generator=g) for _ in range(3)]
    out = []
    for chunk in (1 << 24, 100):
        monkeypatch.setattr(nm, "ADAM_CHUNK", chunk)
        p = p0.clone().requires_grad_()
        opt = nm.CautiousAdam([p], lr=0.1, weight_decay=0.5, wd_mul=1.0)
        for gr in grads:
            p.grad = gr.clone()
            opt.step()
        out.append((p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"]))
    for a, b in zip(*out):
        assert torch.equal(a, b)


def test_polar_express_splits_the_update_above_1024_rows():
    """Matrices with more than 1,024 rows (the MLP bank at d12: 3,072 x 768) take the record's split step, X·B
    rounded to bf16 and then a·X added; smaller ones one fused baddbmm. The two differ in the last bits (the reason
    the split is kept), and the split form is exactly that product-then-add."""
    import tritonrun.kernels.normuon as nm
    from tritonrun.kernels.muon import newton_schulz

    g = torch.Generator().manual_seed(5)
    u = torch.randn(2, 1040, 64, generator=g)
    split = nm.polar_express(u)
    fused = newton_schulz(u, 5, "polar_express", eps=nm.PE_EPS, dtype=torch.bfloat16, norm_in_dtype=True)
    assert not torch.equal(split, fused)
    by_hand = newton_schulz(u, 5, "polar_express", eps=nm.PE_EPS, dtype=torch.bfloat16, norm_in_dtype=True,
                            split_above=1039)
    assert torch.equal(split, by_hand)
    small = torch.randn(2, 1024, 64, generator=g)
    assert torch.equal(nm.polar_express(small), newton_schulz(small, 5, "polar_express", eps=nm.PE_EPS,
                                                              dtype=torch.bfloat16, norm_in_dtype=True))
