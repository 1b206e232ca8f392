"""tritonrun/kernels/window_attention.py: document-masked sliding-window attention (block-sparse FlashAttention-2).

Every numeric case: fresh random inputs and random document boundaries (one-token documents included), every
buffer the op allocates NaN-poisoned first (`poison`), output, logsumexp and all three gradients compared with
the fp64 dense masked reference (window_attention_reference: the (T, T) mask built from cu_seqlens).

Tolerance (REFERENCE.md's rule, as tests/test_attention.py): max|out - ref64| <= 2 * max|torch_lowprec - ref64|
+ floor, torch_lowprec = the same reference run in the input dtype; the floor is FLOOR_ULPS fp32 ulps of the
largest sum of term magnitudes behind an output element (the kernel sums in fp32 in another order than torch;
it only matters where torch is exact, e.g. window = 1: o = v, dq = dk = 0 in torch, a cancelled difference of
two fp32 sums in the kernel).

Beyond numbers: the block ranges the launcher computes are checked against brute force (visited tiles = tiles
with an allowed pair, full tiles = tiles whose pairs are all allowed), so the kernels really skip what the
window and the documents cannot reach; the window is a runtime argument (Triton's binder gives the same
specialization for every window; on a GPU no jit-cache entry is added when it changes); one document with
window >= T is kernels.attention.causal_attention. On CPU the kernels run in the Triton interpreter: small
shapes, fp32 and fp16 (bf16 tl.dot is broken there; bf16 cases need a GPU).
"""
from __future__ import annotations

import math
import random

import pytest
import torch

from tritonrun.kernels import window_attention as wa
from tritonrun.kernels.attention import attention_flops, causal_attention
from tritonrun.kernels.window_attention import (window_attention, window_attention_op, window_attention_reference,
                                               window_mask)
from tests.conftest import requires_cuda

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
FLOOR_ULPS = 4


@pytest.fixture
def poison(monkeypatch):
    """Every output buffer the op allocates starts as NaN: a row the kernel forgets to write fails."""
    monkeypatch.setattr(wa, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype,
                                                                                   device=device))


def random_cuts(T: int, n_docs: int, seed: int) -> list[int]:
    """n_docs documents over T (fewer if T is small): random interior boundaries plus a one-token document at
    the start and one at the end whenever T allows."""
    rng = random.Random(seed)
    inner = set(rng.sample(range(1, T), min(max(n_docs - 1, 0), T - 1))) if T > 1 else set()
    if T > 3:
        inner |= {1, T - 1}  # one-token documents at both ends
    return [0, *sorted(inner), T]


def cu_tensor(cuts: list[int]) -> torch.Tensor:
    return torch.tensor(cuts, dtype=torch.int32, device=DEVICE)


def make_inputs(B, H, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype) for _ in range(4)]  # q, k, v, do


def run_kernel(q, k, v, do, cu, window):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = window_attention_op(q, k, v, cu, window, 1.0 / math.sqrt(q.shape[-1]))
    o.backward(do)
    return o.detach(), lse, q.grad, k.grad, v.grad


def run_reference(q, k, v, do, cu, window, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = window_attention_reference(q, k, v, cu, window)
    o.backward(do.to(dtype))
    return o.detach(), q.grad, k.grad, v.grad


def reference_scores(q, k, cu, window):
    T, D = q.shape[-2:]
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D)
    return s.masked_fill(~window_mask(cu, T, window), float("-inf"))


def rounding_floor(q, k, v, do, cu, window) -> dict[str, float]:
    """FLOOR_ULPS fp32 ulps of the largest sum of term magnitudes behind each output (as test_attention.py)."""
    q, k, v, do = (t.double() for t in (q, k, v, do))
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = reference_scores(q, k, cu, window).softmax(-1)
    terms = p * (do.abs() @ v.abs().transpose(-2, -1) + (do * (p @ v)).abs().sum(-1, keepdim=True))
    mags = {"o": p @ v.abs(), "dq": scale * terms @ k.abs(), "dk": scale * terms.transpose(-2, -1) @ q.abs(),
            "dv": p.transpose(-2, -1) @ do.abs()}
    eps32 = torch.finfo(torch.float32).eps
    return {name: FLOOR_ULPS * eps32 * m.max().item() for name, m in mags.items()}


def check_case(B, H, T, D, dtype, cuts, window, seed):
    q, k, v, do = make_inputs(B, H, T, D, dtype, seed)
    cu = cu_tensor(cuts)
    got = run_kernel(q, k, v, do, cu, window)
    ref = run_reference(q, k, v, do, cu, window, torch.float64)
    low = run_reference(q, k, v, do, cu, window, dtype)
    floors = rounding_floor(q, k, v, do, cu, window)
    for name, x, r, lp in zip(("o", "dq", "dk", "dv"), (got[0], *got[2:]), ref, low):
        assert x.dtype == dtype and x.shape == (B, H, T, D), name
        assert torch.isfinite(x).all(), f"{name}: non-finite values (unwritten NaN-poisoned rows?)"
        err = (x.double() - r).abs().max().item()
        torch_err = (lp.double() - r).abs().max().item()
        assert err <= 2 * torch_err + floors[name], \
            f"{name}: err {err:.3g} > 2 * torch {torch_err:.3g} + floor {floors[name]:.3g} (window {window}, {cuts})"
    lse = got[1]
    # fp32 m + log sum exp(s - m) over fp32 dots (|s| <= ~6): a few ulps, measured <= 1.5e-6 (>= 35x below).
    lse_err = (lse.double() - reference_scores(q, k, cu, window).logsumexp(-1)).abs().max().item()
    assert lse.dtype == torch.float32 and lse_err <= 1e-5 * max(1.0, math.log(T + 1)), lse_err


# (T, D, B, H, documents, window): odd T, windows 1 / 7 / 64 / 300 / >= T, random boundaries with one-token
# documents, a single document, every position its own document; B * H odd both ways.
CASES = [
    (257, 64, 1, 3, "random", 1),
    (257, 128, 3, 1, "random", 7),
    (257, 64, 3, 1, "single", 64),
    (257, 128, 1, 3, "random", 64),
    (257, 64, 1, 1, "random", 300),
    (257, 128, 1, 1, "single", 257),
    (17, 64, 1, 3, "every", 5),
    (1, 128, 3, 1, "single", 1),
]


def _cuts(T, kind, seed):
    return {"single": [0, T], "every": list(range(T + 1)), "random": random_cuts(T, 9, seed)}[kind]


@pytest.mark.parametrize("T,D,B,H,docs,window", CASES, ids=[f"T{c[0]}-D{c[1]}-B{c[2]}H{c[3]}-{c[4]}-w{c[5]}"
                                                            for c in CASES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_fp64_reference(T, D, B, H, docs, window, dtype, poison):
    seed = 1000 * T + D + window
    check_case(B, H, T, D, dtype, _cuts(T, docs, seed), window, seed)


@pytest.mark.parametrize("window", [64, 300])
def test_longer_sequence_fp16(window, poison):
    """T = 1000: many full tiles between the masked ones, and documents longer than the window."""
    check_case(1, 1, 1000, 64, torch.float16, random_cuts(1000, 5, window), window, seed=window)


@requires_cuda
@pytest.mark.parametrize("T,window", [(257, 1), (257, 64), (1000, 300), (4099, 1792), (4099, 5000)])
@pytest.mark.parametrize("D", [64, 128])
def test_bf16_on_gpu(T, window, D, poison):
    check_case(1, 6, T, D, torch.bfloat16, random_cuts(T, max(2, T // 300), T + window), window, seed=T + D)


def test_backward_is_deterministic(poison):
    q, k, v, do = make_inputs(1, 3, 77, 64, torch.float16, seed=3)
    cu = cu_tensor(random_cuts(77, 4, 3))
    first, second = run_kernel(q, k, v, do, cu, 9), run_kernel(q, k, v, do, cu, 9)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_one_document_and_a_window_past_t_is_causal_attention(poison):
    """No mask left but the causal one: the same math as kernels.attention.causal_attention. In the
    interpreter both walk the same tiles in the same order (same block sizes): bitwise equal."""
    q, k, v, do = make_inputs(1, 3, 97, 64, torch.float32, seed=5)
    got = run_kernel(q, k, v, do, cu_tensor([0, 97]), 97)
    qc, kc, vc = (t.detach().clone().requires_grad_() for t in (q, k, v))
    oc = causal_attention(qc, kc, vc)
    oc.backward(do)
    for name, a, b in zip(("o", "dq", "dk", "dv"), (got[0], *got[2:]), (oc.detach(), qc.grad, kc.grad, vc.grad)):
        if HAS_CUDA:  # other tiles and loop structure on a GPU: same math, summation order may differ
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), name  # values <= 4: a few ulps, ~1e-6
        else:
            assert torch.equal(a, b), name


def test_model_layout_views_and_scale(poison):
    """q, k, v as transposed views of (B, T, H, D) memory are read in place; outputs are (B, T, H, D) memory."""
    B, T, H, D = 1, 45, 2, 64
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, 3, H, D, generator=g).to(DEVICE)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    cu = cu_tensor([0, 20, 21, 45])
    o = window_attention(q, k, v, cu, 6, scale=0.3)
    ref = window_attention_reference(q.double(), k.double(), v.double(), cu, 6, scale=0.3)
    assert (o.double() - ref).abs().max().item() < 1e-5  # fp32 vs fp64, |o| <= 3.1: measured 9.8e-7
    assert o.transpose(1, 2).is_contiguous()


def test_torch_compile_traces_through(poison):
    """The custom ops inside torch.compile(fullgraph=True): the window and cu_seqlens pass through as op
    arguments; forward and backward match eager."""
    q, k, v, _ = make_inputs(1, 2, 23, 64, torch.float32, seed=8)
    cu = cu_tensor([0, 9, 10, 23])

    def loss_fn(q, k, v):
        return (window_attention(q * 1.5, k, v, cu, 4) ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    eager = loss_fn(*leaves[0])
    eager.backward()
    comp = compiled(*leaves[1])
    comp.backward()
    assert torch.allclose(comp, eager, rtol=1e-6)  # Inductor sums the squares in its own order: measured 1 ulp
    for a, b in zip(leaves[0], leaves[1]):
        # the same kernels on the same inputs (the square's backward is one elementwise rounding): measured bitwise
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-6)


def test_huge_window_is_clamped(poison):
    """A window far past T (even past int32) is the same mask as window = T, and computes it."""
    q, k, v, do = make_inputs(1, 1, 33, 64, torch.float32, seed=12)
    cu = cu_tensor([0, 20, 33])
    for a, b in zip(run_kernel(q, k, v, do, cu, 33), run_kernel(q, k, v, do, cu, 2 ** 40)):
        assert torch.equal(a, b)


def test_rejects_bad_inputs():
    q = torch.zeros(1, 1, 8, 64, device=DEVICE)
    cu = cu_tensor([0, 8])
    with pytest.raises(ValueError, match="cu_seqlens must be int32"):
        window_attention(q, q, q, cu.long(), 4)
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        window_attention_op(q, q, q, cu, 0, 1.0)
    with pytest.raises(ValueError, match="head dim"):
        window_attention(*(torch.zeros(1, 1, 8, 32, device=DEVICE),) * 3, cu, 4)


# ----------------------------------------------------------------------------------- block ranges
def _brute_tiles(allowed: torch.Tensor, T: int, own: int, streamed: int, transpose: bool):
    """For each program block of `own` positions and each streamed block of `streamed`: (any pair allowed,
    every pair allowed), the program's positions clamped to T, streamed positions >= T counted as not allowed.
    allowed: (T, T) [query, key]; transpose: programs own keys (dK/dV)."""
    a = allowed.t() if transpose else allowed  # (program position, streamed position)
    n_own, n_str = -(-T // own), -(-T // streamed)
    pad = torch.zeros(T, n_str * streamed, dtype=torch.bool)
    pad[:, :T] = a
    anyp = torch.zeros(n_own, n_str, dtype=torch.bool)
    allp = torch.zeros(n_own, n_str, dtype=torch.bool)
    for i in range(n_own):
        rows = pad[i * own:min((i + 1) * own, T)].view(-1, n_str, streamed)
        anyp[i] = rows.any(dim=2).any(dim=0)
        allp[i] = rows.all(dim=2).all(dim=0)
    return anyp, allp


def _tiles_of(ranges: torch.Tensor, n_str: int):
    visited = torch.zeros(len(ranges), n_str, dtype=torch.bool)
    full = torch.zeros_like(visited)
    for i, (lo, flo, fhi, hi) in enumerate(ranges.tolist()):
        assert 0 <= lo <= flo <= fhi <= hi <= n_str, (i, lo, flo, fhi, hi)
        visited[i, lo:hi] = True
        full[i, flo:fhi] = True
    return visited, full


def test_block_ranges_match_brute_force():
    """On random boundaries, windows and block sizes: each program visits exactly the tiles holding an allowed
    pair (nothing the window or the documents cannot reach), and runs unmasked exactly the tiles whose pairs
    are all allowed -- for the forward / dQ ranges (programs own queries) and the dK/dV ranges (own keys)."""
    rng = random.Random(0)
    for trial in range(60):
        T = rng.choice([1, 2, 31, 64, 100, 257, 300])
        cuts = random_cuts(T, rng.randint(1, 12), trial) if trial % 4 else [0, T]
        window = rng.choice([1, 2, 7, 16, 33, 64, 200, 1000])
        bm, bn = rng.choice([16, 32, 64, 128]), rng.choice([16, 32, 64, 128])
        cu = torch.tensor(cuts, dtype=torch.int32)
        allowed = window_mask(cu, T, window)
        what = f"T={T} window={window} blocks=({bm}, {bn}) cuts={cuts}"
        anyp, allp = _brute_tiles(allowed, T, bm, bn, transpose=False)
        visited, full = _tiles_of(wa.kv_block_ranges(cu, T, window, bm, bn), -(-T // bn))
        assert torch.equal(visited, anyp) and torch.equal(full, allp), "kv ranges: " + what
        anyp, allp = _brute_tiles(allowed, T, bn, bm, transpose=True)
        visited, full = _tiles_of(wa.q_block_ranges(cu, T, window, bm, bn), -(-T // bm))
        assert torch.equal(visited, anyp) and torch.equal(full, allp), "q ranges: " + what


def test_doc_starts():
    cu = torch.tensor([0, 1, 1, 5, 6, 9], dtype=torch.int32)  # an empty document too
    assert wa.doc_starts(cu, 9).tolist() == [0, 1, 1, 1, 1, 5, 6, 6, 6]


def test_launcher_uses_the_ranges(monkeypatch, poison):
    """The kernels get exactly the ranges kv_block_ranges / q_block_ranges return (the ones checked above)."""
    seen = []
    for name in ("kv_block_ranges", "q_block_ranges"):
        real = getattr(wa, name)
        monkeypatch.setattr(wa, name, lambda *a, _real=real, _n=name: seen.append((_n, a[2:])) or _real(*a))
    q, k, v, do = make_inputs(1, 1, 40, 64, torch.float32, seed=2)
    run_kernel(q, k, v, do, cu_tensor([0, 13, 40]), 3)
    cfg = {kind: wa.config(kind, 64, torch.float32, q.device) for kind in wa.KERNELS}
    assert seen == [("kv_block_ranges", (3, *cfg["fwd"][:2])), ("q_block_ranges", (3, *cfg["bwd_dkdv"][:2])),
                    ("kv_block_ranges", (3, *cfg["bwd_dq"][:2]))]


def test_cost_grows_with_window_not_t():
    """At T = 65,536 with window 1,792 (the speedrun's), with the sm_89 tiles: the tiles executed are >= 10x
    fewer than dense causal's in every kernel (issue 27's goal), and the model FLOPs are too."""
    T, D, window = 65_536, 128, 1_792
    cu = torch.tensor([0, T], dtype=torch.int32)
    configs = {kind: wa.CONFIGS["sm_89"][kind][D] for kind in wa.KERNELS}
    executed = wa.executed_flops(cu, T, window, D, configs)
    dense = attention_flops(1, 1, T, D, causal=True, mode="fwd")
    assert dense / executed["fwd"] >= 10
    assert 2.5 * dense / (executed["bwd_dkdv"] + executed["bwd_dq"]) * (7 / 5) >= 10  # 7 executed vs 5 counted
    assert dense / wa.window_attention_flops(1, 1, [T], D, window) >= 10
    # doubling T doubles the tiles; doubling the window about doubles them
    t1 = wa.executed_tiles(cu, T, window, 128, 64)
    t2 = wa.executed_tiles(torch.tensor([0, 2 * T], dtype=torch.int32), 2 * T, window, 128, 64)
    t3 = wa.executed_tiles(cu, T, 2 * window, 128, 64)
    assert t2 == pytest.approx(2 * t1, rel=0.01) and t3 == pytest.approx(2 * t1, rel=0.1)


def test_allowed_pairs_matches_the_mask():
    rng = random.Random(1)
    for trial in range(20):
        T = rng.randint(1, 120)
        cuts = random_cuts(T, rng.randint(1, 6), trial)
        window = rng.choice([1, 3, 10, 50, 200])
        lengths = [b - a for a, b in zip(cuts, cuts[1:])]
        assert wa.allowed_pairs(lengths, window) == int(window_mask(torch.tensor(cuts), T, window).sum())
    assert wa.window_attention_flops(2, 3, [10], 64, 100, "fwd_bwd") == 3.5 * 4 * 2 * 3 * 64 * 55


# ----------------------------------------------------------------------------------- runtime window
def _binder_specializations(monkeypatch, windows):
    """Triton's own binder (as JITFunction.run would call it for a CUDA target) on each launch the op makes,
    for each window: the specialization keys Triton compiles by."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    launches = []
    monkeypatch.setattr(wa, "_launch", lambda kind, grid, args, cfg, dtype: launches.append((kind, args, cfg)))
    backend = make_backend(GPUTarget("cuda", 89, 32))
    out = {}
    for window in windows:
        launches.clear()
        q, k, v, do = make_inputs(1, 2, 300, 128, torch.float16, seed=1)
        o, lse = wa._forward(q, k, v, cu_tensor([0, 100, 300]), window, 0.1)
        wa._backward(do, q, k, v, torch.zeros_like(q), lse.nan_to_num(0), cu_tensor([0, 100, 300]), window, 0.1)
        keys = []
        for kind, args, cfg in launches:
            kernel = wa.KERNELS[kind]
            jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn, **kernel.kwargs)
            binder = create_function_from_signature(jit.signature, jit.params, backend)
            kwargs = dict(HEAD_DIM=128, BLOCK_M=cfg[0], BLOCK_N=cfg[1], DOT_PRECISION="tf32", debug=False)
            _, specialization, _ = binder(*args, **kwargs)
            keys.append((kind, str(specialization)))
        out[window] = keys
    return out


def test_window_is_a_runtime_argument(monkeypatch, poison):
    """`window` is passed as a plain, unspecialized integer: for windows 1, 16, 64, 1792 (1 and multiples of 16
    are what Triton specializes plain ints on) every kernel gets the identical specialization key, so a
    schedule changing the window reuses the compiled kernels."""
    for kernel in wa.KERNELS.values():
        assert "window" in kernel.arg_names
    by_window = _binder_specializations(monkeypatch, [1, 16, 64, 1792])
    first = by_window[1]
    assert [kind for kind, _ in first] == ["fwd", "bwd_dkdv", "bwd_dq"]
    for window, keys in by_window.items():
        assert keys == first, f"window {window} changes the specialization"


@requires_cuda
def test_window_change_does_not_recompile_on_gpu(poison):
    def cache_entries():
        return sum(len(c[0]) for kernel in wa.KERNELS.values() for c in kernel.device_caches.values())

    q, k, v, do = make_inputs(1, 6, 1024, 128, torch.bfloat16, seed=4)
    cu = cu_tensor([0, 300, 1024])
    run_kernel(q, k, v, do, cu, 64)
    before = cache_entries()
    for window in (1, 16, 128, 1792):
        run_kernel(q, k, v, do, cu, window)
    assert cache_entries() == before


@requires_cuda
def test_no_host_sync_on_gpu():
    """The block ranges and document starts are computed on the device: forward and backward never wait for it
    (torch's sync debug mode turns any synchronizing call into an error)."""
    q, k, v, do = make_inputs(1, 6, 2048, 128, torch.bfloat16, seed=6)
    cu = cu_tensor(random_cuts(2048, 5, 6))
    q.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        o = window_attention(q, k, v, cu, 300)
        (dq,) = torch.autograd.grad(o, q, do)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(dq).all()


def test_opcheck(poison):
    """torch.library's own check of the custom ops: schema, fake (meta) kernels, autograd registration."""
    q, k, v, _ = make_inputs(1, 2, 19, 64, torch.float32, seed=9)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(window_attention_op, (q, k, v, cu_tensor([0, 4, 19]), 3, 0.125),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_padded_cu_seqlens_change_nothing(poison):
    """cu_seqlens padded with repeated T (the packed loader's doc_slots, one shape under torch.compile) gives the
    kernel's and the torch path's outputs and gradients bit for bit."""
    from tritonrun.gpt2.ops import torch_window_attention

    B, H, T, D = 1, 1, 48, 64
    cuts = random_cuts(T, 5, seed=11)
    q, k, v, do = make_inputs(B, H, T, D, torch.float32, seed=12)
    for window in (5, 20):
        plain = run_kernel(q, k, v, do, cu_tensor(cuts), window)
        padded = run_kernel(q, k, v, do, cu_tensor(cuts + [T] * 9), window)
        for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), plain, padded):
            assert torch.equal(a, b), (name, window)
        ref = torch_window_attention(q, k, v, cu_tensor(cuts), window)
        assert torch.equal(ref, torch_window_attention(q, k, v, cu_tensor(cuts + [T] * 9), window)), window
