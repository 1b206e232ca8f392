"""tritonrun/kernels/rope.py: QK-norm + RoPE forward and the gradients of q and k against an fp64 reference, fp32 /
fp16 / bf16 (GPU), odd shapes, the model's strided q/k views, poisoned outputs, the rotation convention, the tables,
torch.compile, and the composition with kernels.attention.causal_attention."""
import math

import pytest
import torch

from tritonrun.kernels import attention as attn
from tritonrun.kernels import rope as rope
from tests.helpers import ELEMENTWISE_DTYPES, poison_allocations

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"

# (B, T, H, D): prime batches, T = 37 (two block boundaries and a partial last block at BLOCK_T = 16) and
# T = 5 (one partial block), H = 3 and 6 (the speedrun's 6 heads), D = 64 and 128 (the speedrun's).
SHAPES = [(3, 37, 3, 64), (5, 37, 6, 128), (2, 5, 6, 128), (7, 16, 3, 64)]

# (dtype, floor) pairs and the rule, as tests/test_layernorm.py (tests/helpers.py ELEMENTWISE_DTYPES):
#   max|ours - ref| <= 2 * max|torch_same_dtype - ref| + floor * max|ref|,  ref = fp64 on the same inputs.
# The kernel rounds each output once at its store after fp32 math; torch's worst error may land on a small
# element, so the floor is one ulp at the top magnitude for fp16 (2^-10) / bf16 (2^-7), and 8 fp32 ulps
# (2^-20) for fp32, where the order of the length-D sums differs from torch's. The torch peer is the model's
# eager path: F.rms_norm in the input dtype, the rotation against the fp32 tables, rounded at the end.
DTYPES = ELEMENTWISE_DTYPES
EPS = 1e-6


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    poison_allocations(monkeypatch, rope)


def make_qkv(B, T, H, D, dtype, seed):
    """A (B, T, 3*H*D) fused projection output with per-row scales and offsets (so the norm matters), and
    gradients for q2, k2 in the layout attention returns them: (B, H, T, D) views of (B, T, H, D) memory."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(B, T, 3 * H, 1, generator=g))
    x = (torch.randn(B, T, 3 * H, D, generator=g) + 0.3) * scale
    grads = [torch.randn(B, T, H, D, generator=g).transpose(1, 2) for _ in range(2)]
    return x.reshape(B, T, 3 * H * D).to(DEVICE, dtype), grads


def split_heads(qkv, H, D):
    """q, k as the model passes them: (B, T, H, D) views of slices of the projection output (strided)."""
    B, T, _ = qkv.shape
    return qkv[..., : H * D].view(B, T, H, D), qkv[..., H * D: 2 * H * D].view(B, T, H, D)


def run(fn, qkv, H, D, cos, sin, grads, eps=EPS):
    """(q2, k2, dqkv) through autograd, from a fresh leaf."""
    leaf = qkv.detach().clone().requires_grad_()
    q2, k2 = fn(*split_heads(leaf, H, D), cos.to(DEVICE), sin.to(DEVICE), eps)
    (dqkv,) = torch.autograd.grad((q2, k2), leaf, [g.to(q2.device, q2.dtype) for g in grads])
    return q2.detach(), k2.detach(), dqkv


def peer(q, k, cos, sin, eps):
    return rope.reference_qk_norm_rope(q, k, cos, sin, eps, compute_dtype=None)


def assert_rule(names, ours, theirs, ref, floor, floor32=2.0**-20):
    for name, o, p, r in zip(names, ours, theirs, ref):
        assert o.dtype == p.dtype and o.shape == p.shape, (name, o.dtype, p.dtype, o.shape, p.shape)
        assert not torch.isnan(o).any(), f"{name}: NaN survived (an element was never written)"
        r = r.double()
        err = (o.double() - r).abs().max().item()
        peer_err = (p.double() - r).abs().max().item()
        bound = 2 * peer_err + (floor32 if o.dtype == torch.float32 else floor) * r.abs().max().item()
        assert err <= bound, f"{name}: max err {err:.3g} > {bound:.3g} (torch's own err {peer_err:.3g})"


@pytest.mark.parametrize("dtype,floor", DTYPES)
@pytest.mark.parametrize("B,T,H,D", SHAPES)
def test_qk_norm_rope(B, T, H, D, dtype, floor):
    qkv, grads = make_qkv(B, T, H, D, dtype, seed=B * T * H * D)
    cos, sin = rope.rope_tables(T, D)
    ours = run(rope.qk_norm_rope, qkv, H, D, cos, sin, grads)
    theirs = run(peer, qkv, H, D, cos, sin, grads)
    ref = run(rope.reference_qk_norm_rope, qkv.double(), H, D, cos, sin, grads)
    q2, k2, dqkv = ours
    assert q2.shape == k2.shape == (B, H, T, D) and q2.is_contiguous() and k2.is_contiguous()
    assert dqkv[..., 2 * H * D:].eq(0).all(), "v's slice got a gradient"
    assert_rule(["q2", "k2", "dq,dk"], ours, theirs, ref, floor)


def test_layouts():
    """Separate contiguous q, k (the record's c_q / c_k outputs); q as a transposed view of (B, H, T, D) memory;
    a last dim with stride 2 (copied first); contiguous output grads; dq/dk shaped like q, k."""
    B, T, H, D = 2, 19, 3, 64
    g = torch.Generator().manual_seed(3)
    cos, sin = (t.to(DEVICE) for t in rope.rope_tables(T, D))
    base = torch.randn(B, T, H, 2 * D, generator=g).to(DEVICE)
    layouts = {
        "contiguous": tuple(torch.randn(B, T, H, D, generator=g).to(DEVICE) for _ in range(2)),
        "heads-major": (torch.randn(B, H, T, D, generator=g).to(DEVICE).transpose(1, 2),
                        torch.randn(B, H, T, D, generator=g).to(DEVICE).transpose(1, 2)),
        "last-dim-stride-2": (base[..., ::2], base[..., 1::2]),
    }
    dq2, dk2 = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(2))
    for name, (q, k) in layouts.items():
        outs = []
        for fn, dt in ((rope.qk_norm_rope, torch.float32), (rope.reference_qk_norm_rope, torch.float64)):
            ql, kl = q.detach().to(dt).requires_grad_(), k.detach().to(dt).requires_grad_()
            q2, k2 = fn(ql, kl, cos, sin, EPS)
            outs.append([q2, k2, *torch.autograd.grad((q2, k2), (ql, kl), (dq2.to(dt), dk2.to(dt)))])
        for what, o, r in zip(("q2", "k2", "dq", "dk"), *outs):  # fp32 vs fp64: measured <= 9.8e-7 at <= 4.4
            assert o.shape == r.shape, (name, what)
            torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5, msg=f"{name}: {what}")


def test_rotation_convention_and_relative_positions():
    """Independent of the reference: the record's convention written out per element for one head vector,
    and the property RoPE exists for: <q2[t1], k2[t2]> depends only on t1 - t2."""
    T, D = 6, 8
    cos, sin = rope.rope_tables(T, D)
    x = torch.randn(D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = x.float().expand(1, T, 1, D).to(DEVICE)  # the same vector at every position
    q2, k2 = rope.qk_norm_rope(q, q, cos.to(DEVICE), sin.to(DEVICE), 0.0)
    xh = x / math.sqrt(float((x * x).mean()))
    # fp32 kernel vs fp64 math: a few ulps of |q2| <= 2.3 (measured 2.8e-7); a score, an 8-term dot of such
    # values (sum |q| <= 8), errs by <= 2 * 8 * 2.8e-7 = 4.5e-6, so a lag's spread <= 9e-6 (measured 1.1e-6)
    for t in range(T):
        for i in range(D // 2):
            angle = t / 10000.0 ** (2 * i / D)
            y1 = xh[i] * math.cos(angle) + xh[i + D // 2] * math.sin(angle)
            y2 = -xh[i] * math.sin(angle) + xh[i + D // 2] * math.cos(angle)
            assert abs(q2[0, 0, t, i].item() - y1) < 1e-5 and abs(q2[0, 0, t, i + D // 2].item() - y2) < 1e-5
    scores = (q2[0, 0].double() @ k2[0, 0].double().T).cpu()
    for lag in range(-T + 1, T):
        diag = torch.diagonal(scores, lag)
        assert (diag - diag[0]).abs().max() < 1e-5, f"scores at lag {lag} differ: {diag}"


@pytest.mark.parametrize("eps", [1e-1, 2.0**-7, 0.0])
def test_eps(eps):
    """eps is the one passed in: rows of tiny magnitude normalize to very different results with 0.1, with
    the record's finfo(bf16).eps, and with 0 (pure RMS). fp32 vs fp64, 1e-5 of max|ref|: measured <= 1.6e-7."""
    B, T, H, D = 1, 7, 3, 64
    qkv, grads = make_qkv(B, T, H, D, torch.float32, seed=2)
    qkv = qkv * 1e-2
    cos, sin = rope.rope_tables(T, D)
    ours = run(rope.qk_norm_rope, qkv, H, D, cos, sin, grads, eps=eps)
    ref = run(rope.reference_qk_norm_rope, qkv.double(), H, D, cos, sin, grads, eps=eps)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(o.double(), r, rtol=1e-5, atol=1e-5 * r.abs().max().item())


def test_rope_tables():
    T, D = 33, 128
    cos, sin = rope.rope_tables(T, D, base=10000)
    assert cos.shape == sin.shape == (T, D // 2) and cos.dtype == sin.dtype == torch.float32
    for t in (0, 1, 17, 32):  # fp64 math rounded once to fp32: <= 2^-25 ~ 3e-8 at |x| <= 1 (measured 2.9e-8)
        for i in (0, 1, 31, 63):
            angle = t * 10000.0 ** (-2 * i / D)
            assert abs(cos[t, i].item() - math.cos(angle)) < 1e-7 and abs(sin[t, i].item() - math.sin(angle)) < 1e-7
    # the record's fp32 construction agrees to fp32 rounding of the angle (t * ulp(inv_freq))
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    torch.testing.assert_close(cos, freqs.cos(), rtol=0, atol=1e-5)
    torch.testing.assert_close(sin, freqs.sin(), rtol=0, atol=1e-5)
    # sin(0.316) ~ 0.31 rounded once to fp32: <= 1.5e-8
    assert rope.rope_tables(4, 8, base=100)[1][1, 1].item() == pytest.approx(math.sin(100 ** -0.25), abs=1e-7)
    with pytest.raises(ValueError, match="must be even"):
        rope.rope_tables(4, 7)


def test_longer_tables_and_errors():
    """Tables built for a longer context serve a shorter T (rows 0..T-1); bad inputs say what is wrong."""
    B, T, H, D = 1, 5, 3, 64
    q, k = (torch.randn(B, T, H, D, device=DEVICE) for _ in range(2))
    cos, sin = (t.to(DEVICE) for t in rope.rope_tables(40, D))
    torch.testing.assert_close(rope.qk_norm_rope(q, k, cos, sin, EPS),
                               rope.qk_norm_rope(q, k, cos[:T], sin[:T], EPS), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one shape"):
        rope.qk_norm_rope(q, k[:, :4], cos, sin, EPS)
    with pytest.raises(TypeError, match="fp32, fp16 or bf16"):
        rope.qk_norm_rope(q, k.double(), cos, sin, EPS)
    with pytest.raises(ValueError, match="must be even"):
        rope.qk_norm_rope(q[..., :63], k[..., :63], cos, sin, EPS)
    with pytest.raises(ValueError, match="cos must be fp32"):
        rope.qk_norm_rope(q, k, cos.half(), sin, EPS)
    with pytest.raises(ValueError, match="sin must be fp32"):
        rope.qk_norm_rope(q, k, cos, sin[:4], EPS)


def test_torch_compile_matches_eager():
    """torch.compile traces through the custom ops (fullgraph: no graph break) and gives eager's result."""
    torch._dynamo.reset()
    B, T, H, D = 2, 9, 3, 64
    g = torch.Generator().manual_seed(9)
    q, k = (torch.randn(B, T, H, D, generator=g).to(DEVICE) for _ in range(2))
    cos, sin = (t.to(DEVICE) for t in rope.rope_tables(T, D))
    dq2, dk2 = (torch.randn(B, H, T, D, generator=g).to(DEVICE) for _ in range(2))

    def f(q, k):
        return rope.qk_norm_rope(q, k, cos, sin, EPS)

    results = []
    for fn in (f, torch.compile(f, fullgraph=True)):
        ql, kl = q.clone().requires_grad_(), k.clone().requires_grad_()
        q2, k2 = fn(ql, kl)
        results.append([q2.detach(), k2.detach(), *torch.autograd.grad((q2, k2), (ql, kl), (dq2, dk2))])
    for e, c in zip(*results):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6)  # same kernels, same inputs: measured bitwise


# The composition runs kernels/attention.py, whose bf16 tl.dot the Triton interpreter computes wrongly (errors of
# ~1e8 on CPU): its bf16 case needs a GPU. rope's own bf16 cases above run everywhere (it computes in fp32).
ATTENTION_DTYPES = [p if p.id != "bf16" else pytest.param(*p.values, id="bf16", marks=pytest.mark.skipif(
    not HAS_CUDA, reason="needs CUDA: the Triton interpreter's bf16 tl.dot (inside attention) is wrong"))
    for p in DTYPES]


@pytest.mark.parametrize("dtype,floor", ATTENTION_DTYPES)
@pytest.mark.parametrize("B,T,H,D", [(2, 37, 3, 64), (1, 37, 6, 128)])  # 6 heads of 128: the speedrun's
def test_composes_with_causal_attention(monkeypatch, B, T, H, D, dtype, floor):
    """causal_attention(*qk_norm_rope(q, k, ...), v): output and the gradients of q, k, v against the fp64
    composition of the two references, by the same rule and floors (peer: torch's eager rope + math attention
    in dtype; on CPU ours and torch's errors are of one size, e.g. fp32 dq 1.2e-5 vs 1.3e-5 at max|ref| 43)."""
    monkeypatch.setattr(attn, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan"),
                                                                                       dtype=dtype, device=device))
    qkv, _ = make_qkv(B, T, H, D, dtype, seed=11)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(12))
    cos, sin = rope.rope_tables(T, D)

    def compose(norm_rope, attention):
        def fn(qkv):
            q, k = split_heads(qkv, H, D)
            v = qkv[..., 2 * H * D:].view(q.shape).transpose(1, 2)
            return attention(*norm_rope(q, k, cos.to(DEVICE), sin.to(DEVICE), EPS), v)
        return fn

    results = []
    for fn, x in ((compose(rope.qk_norm_rope, attn.causal_attention), qkv),
                  (compose(peer, attn.attention_reference), qkv),
                  (compose(rope.reference_qk_norm_rope, attn.attention_reference), qkv.double())):
        leaf = x.detach().clone().requires_grad_()
        o = fn(leaf)
        results.append([o.detach(), *torch.autograd.grad(o, leaf, do.to(o.device, o.dtype))])
    ours, theirs, ref = results
    assert_rule(["o", "dq,dk,dv"], ours, theirs, ref, floor)


def test_seam_entry():
    """tritonrun/gpt2/ops.py's TRITON_OPS names this module's function under the contract's name."""
    from tritonrun.gpt2 import ops

    assert ops.TRITON_OPS["qk_norm_rope"] == ("tritonrun.kernels.rope", "qk_norm_rope")
    fn, where = ops._load_triton_op("qk_norm_rope")
    assert fn is rope.qk_norm_rope and where == "triton"
