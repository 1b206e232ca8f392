"""tritonrun/kernels/attention.py: fused causal attention (forward + FlashAttention-2 backward).

Every case: fresh random inputs, every buffer the op allocates NaN-poisoned first (`poison` fixture),
output, logsumexp and all three gradients compared against the fp64 math reference.

Tolerance (flash-attention's rule): max|out - ref64| <= 2 * max|torch_lowprec - ref64| + floor, where
torch_lowprec is the same math reference run in the input dtype (fp32 or fp16 here, bf16 on a GPU).
The floor is fp32 rounding noise: the kernel computes in fp32 whatever the input dtype, in a different
order than torch. A sum's rounding error is bounded by a few ulps of the sum of its terms' magnitudes,
not of its result, so the floor is FLOOR_ULPS fp32 ulps of that magnitude (`rounding_floor`). It only
matters where torch is exact and the 2x term vanishes: at T = 1, o = v and dq = dk = 0 exactly in torch,
while the kernel's dq = scale * (dO.V - rowsum(dO*O)) * k cancels two differently ordered length-D
sums of magnitude sum_d |dO*V| (~40 at D = 64): measured up to 0.3 ulps of it on CPU, modelled up to
~0.6 with tensor-core accumulation. (A floor at the result's scale, max(1, |ref|), left 0.34 there.)
Elsewhere the 2x term dominates by orders of magnitude for fp16 (~100-3000 such ulps).

On CPU the kernels run in the Triton interpreter (slow): shapes are small, T = 1024 runs once.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tritonrun.kernels import attention as attn
from tritonrun.kernels.attention import attention_flops, attention_reference, causal_attention, causal_attention_op

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
REPO = Path(__file__).resolve().parents[1]
NO_BF16_REASON = "needs CUDA: the Triton interpreter's bf16 tl.dot is wrong (it runs the fp16 and fp32 cases)"
FLOOR_ULPS = 4


@pytest.fixture
def poison(monkeypatch):
    """Every output buffer the op allocates starts as NaN: a row the kernel forgets to write fails."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(attn, "_new_output", nan_empty)


def make_qkv(B, H, T, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g).to(DEVICE, dtype) for _ in range(3)]


def run_kernel(q, k, v, do):
    """(o, lse, dq, dk, dv) from the custom op, through autograd."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    o, lse = causal_attention_op(q, k, v, 1.0 / math.sqrt(q.shape[-1]))
    o.backward(do)
    return o.detach(), lse, q.grad, k.grad, v.grad


def run_reference(q, k, v, do, dtype):
    """(o, dq, dk, dv) of the math reference computed in `dtype`."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    o = attention_reference(q, k, v)
    o.backward(do.to(dtype))
    return o.detach(), q.grad, k.grad, v.grad


def reference_scores(q, k):
    """The scaled causal scores in fp64, -inf above the diagonal."""
    T, D = q.shape[-2:]
    s = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(D)
    return s.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))


def reference_lse(q, k):
    return reference_scores(q, k).logsumexp(-1)


def rounding_floor(q, k, v, do) -> dict[str, float]:
    """FLOOR_ULPS fp32 ulps of the largest sum of term magnitudes behind each output element (fp64):
    o = P V: P |V|;  dV = P^T dO: P^T |dO|;  dQ = scale dS K and dK = scale dS^T Q with
    dS = P * (dO V^T - rowsum(dO * O)): the same with |dO| |V|^T + rowsum(|dO * O|) in place of the
    cancelling difference (the kernel's two sums round apart by a few ulps of those magnitudes)."""
    q, k, v, do = (t.double() for t in (q, k, v, do))
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = reference_scores(q, k).softmax(-1)
    terms = p * (do.abs() @ v.abs().transpose(-2, -1) + (do * (p @ v)).abs().sum(-1, keepdim=True))
    mags = {"o": p @ v.abs(), "dq": scale * terms @ k.abs(), "dk": scale * terms.transpose(-2, -1) @ q.abs(),
            "dv": p.transpose(-2, -1) @ do.abs()}
    eps32 = torch.finfo(torch.float32).eps
    return {name: FLOOR_ULPS * eps32 * m.max().item() for name, m in mags.items()}


def check_case(B, H, T, D, dtype, seed):
    q, k, v = make_qkv(B, H, T, D, dtype, seed)
    do = torch.randn(B, H, T, D, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    got = run_kernel(q, k, v, do)
    ref = run_reference(q, k, v, do, torch.float64)
    low = run_reference(q, k, v, do, dtype)
    o, lse, grads = got[0], got[1], got[2:]
    floors = rounding_floor(q, k, v, do)
    for name, x, r, lp in zip(("o", "dq", "dk", "dv"), (o, *grads), ref, low):
        assert x.dtype == dtype and x.shape == (B, H, T, D), name
        assert torch.isfinite(x).all(), f"{name}: non-finite values (unwritten NaN-poisoned rows?)"
        err = (x.double() - r).abs().max().item()
        torch_err = (lp.double() - r).abs().max().item()
        floor = floors[name]
        assert err <= 2 * torch_err + floor, f"{name}: err {err:.3g} > 2 * torch {torch_err:.3g} + floor {floor:.3g}"
    # lse is fp32 whatever the input dtype; compare against the fp64 logsumexp of the same inputs.
    # fp32 m + log sum exp(s - m) over fp32 dots (|s| <= ~6): a few ulps, measured <= 8.5e-7 (>= 20x below).
    lse_err = (lse.double() - reference_lse(q, k)).abs().max().item()
    assert lse.dtype == torch.float32 and lse_err <= 1e-5 * max(1.0, math.log(T + 1)), lse_err


# (T, D, B, H): T from 1 (single key) to 257 (crosses every block boundary), odd B*H both ways.
SHAPES = [(T, D, *((1, 3) if (i + j) % 2 == 0 else (3, 1)))
          for i, T in enumerate((1, 17, 128, 257)) for j, D in enumerate((64, 128))]


@pytest.mark.parametrize("T,D,B,H", SHAPES, ids=[f"T{t}-D{d}-B{b}H{h}" for t, d, b, h in SHAPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matches_fp64_reference(T, D, B, H, dtype, poison):
    check_case(B, H, T, D, dtype, seed=1000 * T + D + B)


def test_long_sequence_fp16(poison):
    """T = 1024 (the GPT-2 context), the one long case: many off-diagonal blocks per program."""
    check_case(1, 1, 1024, 64, torch.float16, seed=7)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_BF16_REASON)
@pytest.mark.parametrize("T", [1, 17, 128, 257, 1024])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("B,H", [(1, 3), (3, 1), (4, 12)])
def test_bf16_on_gpu(T, D, B, H, poison):
    check_case(B, H, T, D, torch.bfloat16, seed=T + D + B)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU, test_every_autotune_candidate_on_gpu runs its arch's space natively "
                                      "(another arch's configs may not fit its shared memory)")
@pytest.mark.parametrize("D", attn.HEAD_DIMS)
def test_every_tune_space_config_in_the_interpreter(D, poison, monkeypatch):
    """Every config any arch's table or autotune space holds (block sizes up to 128 x 128, never run by the
    other CPU tests, which use INTERPRETER_CONFIG), in fp16 at T = 257: a partial last block for every size.
    Each case forces the i-th config of every kind at once (cycling through the shorter lists)."""
    space = {kind: sorted({c for arch in attn.TUNE_SPACE for c in attn.TUNE_SPACE[arch][kind][D]})
             for kind in attn.KERNELS}
    monkeypatch.setenv("TRITONRUN_AUTOTUNE", "0")
    for i in range(max(map(len, space.values()))):
        forced = {kind: configs[i % len(configs)] for kind, configs in space.items()}
        monkeypatch.setattr(attn, "_table_config", lambda kind, *_, forced=forced: forced[kind])
        check_case(1, 1, 257, D, torch.float16, seed=D + i)


@pytest.mark.skipif(not HAS_CUDA, reason=NO_BF16_REASON)
@pytest.mark.parametrize("kind", sorted(attn.KERNELS))
def test_every_autotune_candidate_on_gpu(kind, poison, monkeypatch):
    """The other tests run the table's fixed config (conftest sets TRITONRUN_AUTOTUNE=0 on a GPU); the
    autotuner may pick any config of the arch's TUNE_SPACE on another card or day, so each is checked here,
    forced one at a time for `kind`, at T = 257 (a partial last block for every block size) and every D."""
    arch = attn.arch_key(torch.cuda.get_device_capability())
    table = attn._table_config
    monkeypatch.setenv("TRITONRUN_AUTOTUNE", "0")
    for D in attn.HEAD_DIMS:
        for config in attn.TUNE_SPACE[arch][kind][D]:
            monkeypatch.setattr(attn, "_table_config",
                                lambda k, d, dt, dev, c=config: c if k == kind else table(k, d, dt, dev))
            check_case(3, 1, 257, D, torch.bfloat16, seed=D + sum(config))


@pytest.mark.skipif(not HAS_CUDA, reason=NO_BF16_REASON)
def test_autotuned_path_on_gpu(poison, monkeypatch):
    """What the trainer runs by default: the autotuner (its pick cached by Triton) launching the kernels."""
    monkeypatch.setenv("TRITONRUN_AUTOTUNE", "1")
    monkeypatch.setattr(attn, "_TUNERS", {})  # only this test's picks (other tests may have autotuned too)
    check_case(1, 3, 1024, 64, torch.bfloat16, seed=5)
    check_case(3, 1, 257, 128, torch.bfloat16, seed=6)
    arch = attn.arch_key(torch.cuda.get_device_capability())
    picks = {(d["kernel"], d["D"]): tuple(d["config"]) for d in attn.tuning_decisions()}  # what records list
    assert {k for k, _ in picks} == set(attn.KERNELS) and {D for _, D in picks} == {64, 128}
    assert all(cfg in attn.TUNE_SPACE[arch][kind][D] for (kind, D), cfg in picks.items())


def test_no_timing_while_a_cuda_graph_is_captured(monkeypatch, poison):
    """The autotuner's CUDA-graph guard (tritonrun/kernels/tune.py pick_unless_capturing, as cross-entropy's): during a
    capture, before any pick for the key, the table's config runs and triton.autotune is not called (it would
    time every candidate inside the capture); a key tuned earlier in the process reuses its pick. The
    interpreter stands in for an sm_89 GPU; a fake autotuner "picks" each space's last candidate and says when
    it would time."""
    from tritonrun.kernels import tune

    state = {"capturing": False}
    events = []
    monkeypatch.setattr(tune, "capturing", lambda device: state["capturing"])
    monkeypatch.setattr(attn, "autotune_enabled", lambda: True)
    monkeypatch.setattr(attn.torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    table = attn._table_config
    monkeypatch.setattr(attn, "_table_config", lambda kind, *a: events.append(("table", kind)) or table(kind, *a))

    class FakeAutotuner:  # triton.autotune's Autotuner: times every candidate the first time it sees a key
        def __init__(self, kind, arch, D):
            self.kind, self.pick, self.cache = kind, attn.TUNE_SPACE[arch][kind][D][-1], set()

        def __getitem__(self, grid):
            def run(*args, HEAD_DIM, DOT_PRECISION):
                key = (args[-1], str(args[0].dtype))
                if key not in self.cache:
                    assert not state["capturing"], f"{self.kind}: timed during capture"
                    events.append(("timed", self.kind))
                    self.cache.add(key)
                events.append(("autotuned", self.kind))
                bm, bn, warps, stages = self.pick
                attn.KERNELS[self.kind][grid({"BLOCK_M": bm, "BLOCK_N": bn})](
                    *args, HEAD_DIM=HEAD_DIM, BLOCK_M=bm, BLOCK_N=bn, DOT_PRECISION=DOT_PRECISION,
                    num_warps=warps, num_stages=stages)
            return run

    tuners = {}
    monkeypatch.setattr(attn, "_autotuned", lambda kind, arch, D: tuners.setdefault((kind, arch, D),
                                                                                    FakeAutotuner(kind, arch, D)))
    kinds = ["fwd", "bwd_dkdv", "bwd_dq"]
    state["capturing"] = True  # no pick yet: the table
    check_case(1, 3, 37, 64, torch.float16, seed=11)
    assert events == [("table", k) for k in kinds]
    events.clear()
    state["capturing"] = False  # eager: tuned once per key, then the pick runs
    check_case(1, 3, 37, 64, torch.float16, seed=12)
    assert events == [e for k in kinds for e in (("timed", k), ("autotuned", k))]
    events.clear()
    state["capturing"] = True  # captured after the pick: the pick, nothing timed, no table
    check_case(1, 3, 37, 64, torch.float16, seed=13)
    assert events == [("autotuned", k) for k in kinds]
    events.clear()
    check_case(1, 3, 300, 64, torch.float16, seed=14)  # another T bucket, not tuned yet: the table again
    assert events == [("table", k) for k in kinds]


def test_backward_is_deterministic(poison):
    q, k, v = make_qkv(1, 3, 77, 64, torch.float16, seed=3)
    do = torch.randn_like(q.float()).to(q.dtype)
    first = run_kernel(q, k, v, do)
    second = run_kernel(q, k, v, do)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


def test_model_layout_views(poison):
    """The model passes transposed views of the c_attn output: read in place, same bits as contiguous
    inputs; o comes back as a view of (B, T, H, D) memory so the model's transpose+contiguous is free."""
    B, T, H, D = 2, 33, 3, 32
    g = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, 3 * H * D, generator=g).to(DEVICE, torch.float16).requires_grad_()
    q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in qkv.split(H * D, dim=2))
    assert not q.is_contiguous()
    o = causal_attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous()
    do = torch.randn(B, H, T, D, generator=g).to(DEVICE, torch.float16)
    o.backward(do)

    qc, kc, vc = (t.detach().contiguous().requires_grad_() for t in (q, k, v))
    oc = causal_attention(qc, kc, vc)
    oc.backward(do)
    assert torch.equal(o, oc)
    dq, dk, dv = (t.grad.transpose(1, 2).reshape(B, T, H * D) for t in (qc, kc, vc))
    assert torch.equal(qkv.grad, torch.cat([dq, dk, dv], dim=2))


def test_non_default_scale_and_odd_grad_strides(poison):
    """scale is honoured; an expanded (stride-0) incoming gradient, as from `.sum().backward()`, works."""
    q, k, v = make_qkv(1, 1, 20, 64, torch.float32, seed=5)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    causal_attention(q, k, v, scale=0.3).sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = attention_reference(q64, k64, v64, scale=0.3)
    ref.sum().backward()
    # fp32 vs fp64: a few ulps of |o| <= 3 and of 20-key grad sums <= 8 (measured 1.0e-6 and 3.8e-6)
    assert torch.allclose(causal_attention(q, k, v, scale=0.3).double(), ref, atol=1e-5)
    for a, b in ((q, q64), (k, k64), (v, v64)):
        assert torch.allclose(a.grad.double(), b.grad, atol=1e-5)


def test_torch_compile_traces_through(poison):
    """The custom op (forward + backward) inside torch.compile(fullgraph=True) on CPU: inductor keeps it
    as an extern call, generates C++ for the rest, and the result matches eager bit for bit."""
    q, k, v = make_qkv(1, 2, 19, 32, torch.float32, seed=9)

    def loss_fn(q, k, v):
        return (causal_attention(q * 1.5, k, v) ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True)
    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for _ in range(2)]
    eager = loss_fn(*leaves[0])
    eager.backward()
    comp = compiled(*leaves[1])
    comp.backward()
    assert torch.equal(comp, eager)
    for a, b in zip(leaves[0], leaves[1]):
        assert torch.equal(a.grad, b.grad)


def test_rejects_bad_inputs():
    q = torch.randn(1, 1, 4, 48)
    with pytest.raises(ValueError, match="head dim"):
        causal_attention(q, q, q)
    with pytest.raises(TypeError, match="bf16, fp16 or fp32"):
        causal_attention(*(torch.randn(1, 1, 4, 64, dtype=torch.float64),) * 3)


def test_flops_formula():
    assert attention_flops(1, 1, 1024, 64) == 2 * 1024 * 1024 * 64
    assert attention_flops(2, 3, 8, 64, causal=False) == 4 * 2 * 3 * 8 * 8 * 64
    assert attention_flops(1, 1, 16, 64, mode="fwd_bwd") == 3.5 * attention_flops(1, 1, 16, 64)


def test_config_tables_are_consistent():
    """Every config has the block divisibility its kernel's diagonal walk needs, for every arch and D."""
    assert set(attn.CONFIGS) == set(attn.TUNE_SPACE) == set(attn.SHARED_LIMIT)
    for arch in attn.CONFIGS:
        for kind in attn.KERNELS:
            for D in attn.HEAD_DIMS:
                space = attn.TUNE_SPACE[arch][kind][D]
                assert space[0] == attn.CONFIGS[arch][kind][D] and 1 <= len(space) <= 4
                for bm, bn, warps, stages in [*space, attn.FP32_CONFIG[kind], attn.INTERPRETER_CONFIG[kind]]:
                    assert (bn % bm == 0) if kind == "bwd_dkdv" else (bm % bn == 0), (arch, kind, D, bm, bn)
                    assert min(bm, bn) >= 16 and warps in (2, 4, 8) and 1 <= stages <= 5
    assert [attn.arch_key(c) for c in ((8, 0), (8, 6), (8, 9), (9, 0), (12, 0))] == \
        ["sm_80", "sm_89", "sm_89", "sm_90", "sm_89"]


# ------------------------------------------------------------------ compile for real GPUs, no GPU needed
@pytest.fixture(scope="module")
def compiled() -> dict[str, list[dict]]:
    """One `python -m tritonrun.kernels.attention` run without TRITON_INTERPRET (real compilation, 2 processes):
    sm_89 everything (table, autotune space, fp32 fallback); sm_80 and sm_90 their tables and fp32
    fallback, plus their autotune spaces with TRITONRUN_FULL_COMPILE_CHECK=1. Cold: ~2 min on 2 cores;
    later runs hit Triton's cache (the ptxas numbers are cached beside each kernel): ~10 s."""
    other = "" if os.environ.get("TRITONRUN_FULL_COMPILE_CHECK") == "1" else ":table"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-m", "tritonrun.kernels.attention",
                          "sm_89", f"sm_80{other}", f"sm_90{other}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return {arch: [r for r in rows if r["arch"] == arch] for arch in ("sm_80", "sm_89", "sm_90")}


def assert_fits(rows: list[dict]) -> None:
    assert rows
    for r in rows:
        what = f"{r['arch']} {r['kind']} D={r['D']} {r['dtype']} {tuple(r['config'])}"
        assert r["shared"] <= r["limit"], f"{what}: {r['shared']} B shared > {r['limit']}"
        if r["spill_stores"] is None:
            pytest.skip("ptxas not found in the triton package (triton/backends/nvidia/bin/ptxas): no spill check")
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{what}: spills ({r['regs']} registers)"
        if r["dtype"] != "fp32":  # ieee fp32 dots run on FMA units by design
            assert r["mma"], f"{what}: no tensor-core mma instruction in the PTX"


def test_sm89_configs_fit(compiled):
    """Every sm_89 config (table, autotune space, fp32 fallback) compiled for sm_89: shared memory within
    101,376 B per block, no register spills (ptxas -v), tensor-core mma.sync in the PTX."""
    assert len(compiled["sm_89"]) == len(attn.all_configs("sm_89"))
    assert_fits(compiled["sm_89"])


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_other_arch_configs_fit(compiled, arch):
    """sm_80 (166,912 B) and sm_90 (232,448 B): the same checks."""
    assert_fits(compiled[arch])
