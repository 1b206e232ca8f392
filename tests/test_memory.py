"""tritonrun/memory.py (the estimator) and bench/memory.py (its CLI): the tracker against the CPU allocator, the
kernels' fakes against their real launches, the category split, the --max search, flag errors and the JSON
record."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from tritonrun import memory as est  # the estimator
from tritonrun.gpt2 import GPT
from tritonrun.gpt2.config import GPTConfig
from tritonrun.gpt2.ops import get_ops
from tests.helpers import load_script

REPO = Path(__file__).resolve().parent.parent
memory = load_script("bench/memory.py", "bench_memory")  # the CLI

# A small vocabulary keeps the Triton interpreter fast; two layers, head dim 32 (the kernels' smallest).
SMALL = GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=64, vocab_size=1000, padded_vocab_size=1024)
AUTOCAST = torch.autocast("cpu", dtype=torch.bfloat16)


def _allocations(prof) -> list:
    """The CPU allocator's allocation events (alloc_size < 0: a free), in time order."""
    def walk(events):
        for e in events:
            yield e
            yield from walk(e.children)
    events = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
              if e.typed[0] == _EventType.Allocation]
    return sorted(events, key=lambda e: e.start_time_ns)


def _inside(event, prefix: str) -> str | None:
    p = event.parent
    while p is not None:
        if p.name.startswith(prefix):
            return p.name
        p = p.parent
    return None


def _gpt2_parts():
    return GPT, est.build_optimizer, SMALL, 1.0


def _speedrun_parts():
    """The speedrun-dense recipe's step on the tiny SpeedrunGPT (2 blocks, d 64, the padded 50304 vocabulary)."""
    build_model, build_opt, config, clip = est.recipe_parts("speedrun-dense", "tiny")
    return build_model, build_opt, config, clip


def _real_step_peak(backend: str, B: int = 3, T: int = 64, parts=_gpt2_parts) -> tuple[int, est.Ledger]:
    """(allocator's peak of bytes allocated during the measured step, the dispatch-mode ledger of the same step)."""
    torch.manual_seed(0)
    build_model, build_opt, config, clip = parts()
    ops = get_ops(backend, "cpu")
    model = build_model(config, ops)
    opt = build_opt(model, ops)
    batches = est.make_batches(2, B, T, config.vocab_size, "cpu")
    est.training_step(model, opt, batches[:1], est.Ledger(), AUTOCAST, clip)  # optimizer state exists
    ledger = est.Ledger()
    ledger.mark("parameters", list(model.parameters()) + list(model.buffers()))  # speedrun: the RoPE tables
    ledger.mark("optimizer_state", est.optimizer_tensors(opt))
    ledger.mark("activations", [t for b in batches for t in b])
    base = ledger.live_bytes
    ledger.reset_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with est.TrackingMode(ledger):
            est.training_step(model, opt, batches, ledger, AUTOCAST, clip)
    events = _allocations(prof)
    # total_allocated counts what was allocated while profiling and is still live: the step's own allocations
    allocator_peak = max(e.typed[1].total_allocated for e in events)
    assert events[-1].typed[1].total_allocated == ledger.live_bytes - base  # both back to what they began with
    return allocator_peak, ledger, base


def _fake_step_peak(backend: str, B: int = 3, T: int = 64, parts=_gpt2_parts) -> int:
    ledger = est.Ledger()
    build_model, build_opt, config, clip = parts()
    ops = get_ops(backend, "cpu")
    with est.TrackingFakeMode(ledger):
        model = build_model(config, ops)
        opt = build_opt(model, ops)
        batches = est.make_batches(2, B, T, config.vocab_size, "cpu")
        est.training_step(model, opt, batches[:1], ledger, AUTOCAST, clip)
        base = ledger.live_bytes
        ledger.reset_peak()
        est.training_step(model, opt, batches, ledger, AUTOCAST, clip)
    return ledger.peak_bytes - base


def test_tracker_matches_the_cpu_allocator_and_the_fake_step(one_torch_thread):
    """On real CPU tensors (torch ops, bf16 autocast, two micro-batches, clip, fused AdamW) the ledger's peak is the
    allocator's own (native kernels' internal scratch could make them differ: 1% allowed; today they are equal),
    and the same step under FakeTensorMode gives the same peak."""
    allocator_peak, ledger, base = _real_step_peak("torch")
    assert ledger.peak_bytes - base == pytest.approx(allocator_peak, rel=0.01)
    assert _fake_step_peak("torch") == ledger.peak_bytes - base


def test_tracker_matches_the_cpu_allocator_on_the_speedrun_step(one_torch_thread):
    """The speedrun recipe's step (tiny SpeedrunGPT, torch ops, bf16 autocast, two micro-batches, no clip, fused
    Adam over wte / lm_head / scalars, then Muon: fp32 momentum buffers and the bf16 Newton-Schulz batched by
    shape) on real CPU tensors: the ledger's peak is the allocator's, and the fake step's is the same. The Muon
    step alone (its peak lies below the backward's) is checked too: its momentum buffers are the optimizer state
    the ledger finds on it, and its Newton-Schulz stacks are seen."""
    allocator_peak, ledger, base = _real_step_peak("torch", B=2, T=32, parts=_speedrun_parts)
    assert ledger.peak_bytes - base == pytest.approx(allocator_peak, rel=0.01)
    assert _fake_step_peak("torch", B=2, T=32, parts=_speedrun_parts) == ledger.peak_bytes - base

    # the Muon step alone, real tensors: ledger vs allocator, and the state it leaves is the momentum buffers
    from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS as SPEEDRUN_MODELS, SpeedrunGPT

    torch.manual_seed(0)
    model = SpeedrunGPT(SPEEDRUN_MODELS["tiny"], get_ops("torch", "cpu"))
    opt = est.build_speedrun_optimizer(model, model.ops)
    matrices = [p for g in opt.muon.param_groups for p in g["params"]]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.muon.step()  # momentum buffers exist
    ledger = est.Ledger()
    ledger.mark("parameters", list(model.parameters()) + [p.grad for p in model.parameters()])
    state = est.optimizer_tensors(opt)
    ledger.mark("optimizer_state", state)
    base = ledger.live_bytes
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with est.TrackingMode(ledger):
            opt.muon.step()
    events = _allocations(prof)
    # CPU BLAS and reductions allocate some scratch without a tensor (~6% here, on 64-wide matrices), which the
    # ledger cannot see (nor does a CUDA estimate: cuBLAS workspace is outside it too)
    allocator_peak = max(e.typed[1].total_allocated for e in events)
    assert allocator_peak * 0.9 <= ledger.peak_bytes - base <= allocator_peak
    muon_state = [t for t in state if any(t is opt.muon.state[p]["momentum_buffer"] for p in matrices)]
    assert len(muon_state) == len(matrices) and all(t.dtype == torch.float32 for t in muon_state)
    # the largest shape group's Newton-Schulz: stacked fp32 updates, then bf16 X, A, B, new X of that stack
    fc = [p for p in matrices if p.shape[0] > p.shape[1]]
    assert ledger.peak_bytes - base >= 4 * sum(p.numel() for p in fc)


def _real_op_allocations(fn, prefix: str, min_bytes: int) -> list[int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Left out: what a CPU reduction allocates inside aten::sum (a sum over bools first copies them to int64;
    # a CUDA reduction casts as it loads) and CPU copy_'s internal transpose buffer (copy_ writes into an existing
    # tensor; what it allocates itself is scratch a CUDA copy does not need).
    return sorted(e.typed[1].alloc_size for e in _allocations(prof)
                  if e.typed[1].alloc_size >= min_bytes and _inside(e, prefix) and not _inside(e, "aten::sum")
                  and not _inside(e, "aten::copy_"))


def _fake_op_allocations(make_inputs, fn, min_bytes: int, inside: str) -> list[int]:
    ledger = est.Ledger()
    with est.TrackingFakeMode(ledger):
        inputs = make_inputs()
        ledger.trace = []
        fn(*inputs)
    return sorted(n for n, op, where in ledger.trace if n >= min_bytes and where.startswith(inside))


def test_fakes_allocate_what_the_launches_allocate(one_torch_thread):
    """Every buffer of >= 1 KiB that the Triton ops' real launches allocate inside the op (interpreter, CPU) is
    allocated by their fake implementations too, with the same sizes: outputs, partials and scratch."""
    from tritonrun.kernels.attention import causal_attention
    from tritonrun.kernels.cross_entropy import linear_cross_entropy
    from tritonrun.kernels.layernorm import add_layer_norm

    N, C, V, Vp, min_bytes = 1031, 64, 1000, 1024, 1024  # N > 4 row blocks of 256: one vocab split

    def lce_inputs():
        h = torch.randn(N, C, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(Vp, C, dtype=torch.bfloat16, requires_grad=True)
        return h, w, torch.randint(0, V, (N,))

    def lce(h, w, t):
        linear_cross_entropy(h, w, t, -1, V).backward()

    B, H, T, D = 3, 2, 67, 32

    def attn_inputs():
        return [torch.randn(B, H, T, D, dtype=torch.float16, requires_grad=True) for _ in range(3)]

    def attn(q, k, v):
        causal_attention(q, k, v).float().sum().backward()

    def ln_inputs():
        x = torch.randn(B, T, 96, dtype=torch.bfloat16, requires_grad=True)
        r = torch.randn(B, T, 96, requires_grad=True)
        return x, r, torch.ones(96, requires_grad=True), torch.zeros(96, requires_grad=True)

    def ln(x, r, w, b):
        y, s = add_layer_norm(x, r, w, b)
        (y.float().sum() + s.float().sum()).backward()

    cases = [(lce_inputs, lce, "tritonrun::linear_cross_entropy"), (attn_inputs, attn, "tritonrun::causal_attention"),
             (ln_inputs, ln, "tritonrun::")]
    for make_inputs, fn, prefix in cases:
        torch.manual_seed(0)
        real = _real_op_allocations(lambda: fn(*make_inputs()), prefix, min_bytes)
        fake = _fake_op_allocations(make_inputs, fn, min_bytes, prefix.replace("::", "."))
        assert real, prefix
        assert fake == real, prefix


# The softcapped kernel's tanh is 1 - 2 / (exp2(2x log2 e) + 1), which saturates through an inf exp2 by design
# (tritonrun/kernels/cross_entropy.py _tanh); numpy's interpreter warns about that inf.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp2:RuntimeWarning")
def test_speedrun_fakes_allocate_what_the_launches_allocate(one_torch_thread):
    """The speedrun ops' fakes (rms_norm, add_rms_norm, mix_rms_norm, relu2, qk_norm_rope, the softcapped
    linear_cross_entropy) allocate every >= 1 KiB buffer their real launches allocate (interpreter), same sizes:
    outputs, mix_rms_norm's per-program lambda partials, the contiguous copies of strided inputs."""
    from tritonrun.kernels.cross_entropy import linear_cross_entropy
    from tritonrun.kernels.relu2 import relu2
    from tritonrun.kernels.rmsnorm import add_rms_norm, mix_rms_norm, rms_norm
    from tritonrun.kernels.rope import qk_norm_rope, rope_tables

    B, T, C, H, D, min_bytes = 3, 67, 96, 2, 32, 1024

    def rms_inputs():
        return [torch.randn(B, T, C, requires_grad=True)]

    def rms(x):
        rms_norm(x).float().sum().backward()

    def add_inputs():  # the model's: a bf16 branch output into the fp32 stream
        return (torch.randn(B, T, C, dtype=torch.bfloat16, requires_grad=True),
                torch.randn(B, T, C, requires_grad=True))

    def add(x, r):
        y, s = add_rms_norm(x, r)
        (y.float().sum() + s.float().sum()).backward()

    def mix_inputs():  # x strided over the batch (a copy), a bf16 x0 (dy cast to s's dtype)
        x = torch.randn(2 * B, T, C)[::2].requires_grad_()
        return x, torch.randn(B, T, C, dtype=torch.bfloat16, requires_grad=True), torch.tensor([1.0, 0.5],
                                                                                                requires_grad=True)

    def mix(x, x0, lambdas):
        y, s = mix_rms_norm(x, x0, lambdas)
        (y.float().sum() + s.float().sum()).backward()

    def relu2_inputs():  # a transposed input: the launcher's contiguous copy
        return [torch.randn(4 * C, B * T).t().requires_grad_()]

    def r2(x):
        relu2(x).float().sum().backward()

    def rope_inputs():  # q, k: views of one (B, T, 2 H D) projection, as c_q/c_k outputs split would be
        qk = torch.randn(B, T, 2 * H * D, requires_grad=True)
        cos, sin = rope_tables(T, D)
        return qk, cos, sin

    def rope(qk, cos, sin):
        q, k = qk.view(B, T, 2 * H, D).split(H, dim=2)
        q2, k2 = qk_norm_rope(q, k, cos, sin, 1e-6)
        (q2.sum() + k2.sum()).backward()

    N, V, Vp = 1031, 1000, 1024

    def lce_inputs():
        h = torch.randn(N, 64, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(Vp, 64, dtype=torch.bfloat16, requires_grad=True)
        return h, w, torch.randint(0, V, (N,))

    def lce(h, w, t):
        linear_cross_entropy(h, w, t, -1, V, softcap=30.0).backward()

    # mix_rms_norm down to 64 B: its lambda partials, (row programs, 2) fp32, are 104 B here (13 programs)
    cases = [(rms_inputs, rms, min_bytes), (add_inputs, add, min_bytes), (mix_inputs, mix, 64),
             (relu2_inputs, r2, min_bytes), (rope_inputs, rope, min_bytes), (lce_inputs, lce, min_bytes)]
    for make_inputs, fn, least in cases:
        torch.manual_seed(0)
        real = _real_op_allocations(lambda: fn(*make_inputs()), "tritonrun::", least)
        fake = _fake_op_allocations(make_inputs, fn, least, "tritonrun.")
        assert real, fn.__name__
        assert fake == real, fn.__name__


def test_fused_adamw_under_fake_tensors_allocates_what_it_does_for_real(one_torch_thread):
    """FusedAdamW has no custom op: under FakeTensorMode it runs its own host code and skips the launches, so the
    clip + step allocate the same buffers (pointer tables, norm partials) as a real step."""
    from tritonrun.kernels.adamw import FusedAdamW

    shapes = [(300, 64), (64,), (1000, 3)]

    def make_params():
        params = [torch.zeros(s, requires_grad=True) for s in shapes]
        for p in params:
            p.grad = torch.ones_like(p)
        return params

    def run(params):
        opt = FusedAdamW([{"params": params, "weight_decay": 0.1}], lr=1e-3)
        for _ in range(2):
            opt.clip_grad_norm_(1.0)
            opt.step()

    params = make_params()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run(params)
    real = sorted(e.typed[1].alloc_size for e in _allocations(prof) if e.typed[1].alloc_size > 0)
    ledger = est.Ledger()
    with est.TrackingFakeMode(ledger):
        params = make_params()
        ledger.trace = []
        run(params)
    # Host tables (torch.tensor / torch.from_numpy) copied to the device: lift_fresh under fake tensors, where they
    # count as the device copies a GPU makes; on CPU the copy is the tensor itself (from_numpy shares numpy's memory,
    # torch.tensor allocates its (n_tensors, 3) int64 info table on the host). Compared: everything else.
    fake = sorted(n for n, op, _ in ledger.trace if n > 0 and "lift_fresh" not in op)
    real.remove(len(shapes) * 3 * 8)
    n_flat = sum(-(-math.prod(s) // 16) * 16 for s in shapes)  # the flat fp32 state: exp_avg, exp_avg_sq
    assert fake == real and fake.count(4 * n_flat) == 2


def test_split_sums_to_the_peak_and_the_record_fields(tmp_path, capsys):
    path = tmp_path / "est.json"
    assert memory.main(["--gpu", "rtx4070", "--recipe", "gpt2", "--model", "tiny", "--seq-len", "128", "--backend",
                        "both", "--micro-batch", "4,2", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["recipe"] == "gpt2" and all(e["recipe"] == "gpt2" for e in record["estimates"])
    for key in ("peak_bytes", "peak_reserved_estimate_bytes", "context_allowance_bytes", "budget_bytes", "fits",
                "micro_batch", "backend", "preset", "split_bytes"):
        assert key in record, key
    assert (record["backend"], record["micro_batch"], record["preset"]) == ("triton", 4, "rtx4070")
    assert record["budget_bytes"] == 11 * 2**30 and record["mode"] == "eager"
    assert [(e["backend"], e["micro_batch"]) for e in record["estimates"]] == [
        ("triton", 4), ("triton", 2), ("torch", 4), ("torch", 2)]
    for e in record["estimates"]:
        assert sum(e["split_bytes"].values()) == e["peak_bytes"]
        assert set(e["split_bytes"]) == set(est.CATEGORIES)
        assert e["peak_reserved_estimate_bytes"] >= e["peak_bytes"] * (1 + est.FRAGMENTATION)
        assert e["fits"] == (e["peak_reserved_estimate_bytes"] <= e["budget_bytes"])
        s = e["split_bytes"]
        assert s["grads"] == s["parameters"] and s["optimizer_state"] >= 2 * s["parameters"]  # fp32 AdamW
    torch_4 = record["estimates"][2]
    # the torch LM head keeps fp32 logits for backward: at least N x V x 4 bytes of activations
    assert torch_4["split_bytes"]["activations"] >= 4 * 128 * 50257 * 4
    out = capsys.readouterr().out
    assert "triton B=4" in out and "torch  B=2" in out and f"record: {path}" in out
    # the budgeted GPU check (.ci/gpu_check.py) reads this record's first-choice fields, not a fallback
    check = load_script(".ci/gpu_check.py", "gpu_check_reads_memory")
    c = check.memory_comparison(record, None)
    assert (c["estimate_reserved_field"], c["estimate_alloc_field"]) == ("peak_reserved_estimate_bytes", "peak_bytes")
    assert c["estimate_reserved_gib"] == record["peak_reserved_estimate_bytes"] / 2**30


def test_speedrun_record_names_the_recipe_and_splits_adam_and_muon(tmp_path, capsys):
    """--recipe speedrun-dense: the record and each estimate say "recipe": "speedrun-dense"; params = grads (fp32);
    optimizer state = Adam's two fp32 moments of wte, lm_head and the scalars + Muon's one fp32 momentum buffer per
    matrix; --record names the file memory-speedrun-dense-<preset>-<date>.json (speedrun's:
    memory-speedrun-packed-...; gpt2's keep memory-<preset>-<date>.json)."""
    from tritonrun.gpt2.speedrun import SPEEDRUN_DENSE_MODELS as SPEEDRUN_MODELS, SpeedrunGPT

    path = tmp_path / "speedrun.json"
    assert memory.main(["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--model", "tiny", "--seq-len", "128",
                        "--micro-batch", "2", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["recipe"] == "speedrun-dense" and "Muon" in record["step"] and record["model"] == "tiny"
    assert record["packed"] is False
    assert [(e["recipe"], e["backend"]) for e in record["estimates"]] == [("speedrun-dense", "triton"),
                                                                          ("speedrun-dense", "torch")]
    groups = SpeedrunGPT(SPEEDRUN_MODELS["tiny"]).optimizer_groups()
    adam = sum(p.numel() for g in groups["adam"] for p in g["params"])
    muon = sum(p.numel() for g in groups["muon"] for p in g["params"])
    block = est.CUDA_BLOCK
    rope = sum(-(-b.nbytes // block) * block for b in SpeedrunGPT(SPEEDRUN_MODELS["tiny"]).buffers())
    for e in record["estimates"]:
        s = e["split_bytes"]
        assert sum(s.values()) == e["peak_bytes"] and s["grads"] == s["parameters"] - rope  # + the RoPE tables
        assert 4 * (2 * adam + muon) <= s["optimizer_state"] <= 4 * (2 * adam + muon) + 64 * block + 2**16
    assert "recipe speedrun-dense" in capsys.readouterr().out
    setup = est.Setup("rtx4070", "d12", 1024, 524288, 12, est.GPUS["rtx4070"], recipe="speedrun-dense")
    day = __import__("datetime").date(2026, 12, 3)
    assert memory.record_path(setup, day).name == "memory-speedrun-dense-rtx4070-20261203.json"
    packed = est.Setup("rtx4070", "d12", 16384, 524288, 12, est.GPUS["rtx4070"], recipe="speedrun")
    assert memory.record_path(packed, day).name == "memory-speedrun-packed-rtx4070-20261203.json"
    assert memory.record_path(est.Setup("rtx4070", "d12", 1024, 524288, 12, est.GPUS["rtx4070"]),
                              day).name == "memory-rtx4070-20261203.json"


def test_speedrun_dense_rtx4070_record():
    """The committed speedrun-dense record for the rtx4070 (the 2024-11-10 model): d12 (6 heads of 128, untied
    head), T = 1024, both backends at micro-batch 8 and 16 and the --max search; its fit verdicts follow the fit
    rule."""
    paths = sorted((REPO / "bench" / "results").glob("memory-speedrun-dense-rtx4070-*.json"))
    assert paths, "bench/results/memory-speedrun-dense-rtx4070-*.json: run bench/memory.py --gpu rtx4070 --recipe " \
                  "speedrun-dense --backend both --micro-batch 8,16 --max --record"
    record = json.loads(paths[-1].read_text())
    assert record["recipe"] == "speedrun-dense" and record["model"] == "d12" and record["seq_len"] == 1024
    assert not record.get("packed")
    got = {(e["backend"], e["micro_batch"]) for e in record["estimates"]}
    assert {("triton", 8), ("triton", 16), ("torch", 8), ("torch", 16)} <= got
    for e in record["estimates"]:
        assert e["recipe"] == "speedrun-dense" and e["fits"] == (e["peak_reserved_estimate_bytes"] <= e["budget_bytes"])
    for backend in ("triton", "torch"):
        found = record["max_micro_batch"][backend]
        assert found["peak_grows_with_micro_batch"] and found["micro_batch"]


def test_packed_speedrun_estimates_one_sequence_and_searches_the_seq_len(tmp_path, capsys):
    """--recipe speedrun: one packed sequence per micro-batch (B = 1), its length searched by --max. The windowed
    attention saves O(T) (no T x T mask or scores, also for --backend torch, estimated as FlexAttention's saved
    tensors): activations grow linearly with T, and --max finds the largest power-of-two T within the budget."""
    setup = est.Setup("rtx4070", "tiny", 256, 524288, 12, est.GPUS["rtx4070"], recipe="speedrun")
    got = {(b, t): est.estimate(dataclasses.replace(setup, seq_len=t), b, 1)
           for b in ("triton", "torch") for t in (256, 512)}
    for b in ("triton", "torch"):
        a256, a512 = (got[b, t]["split_bytes"]["activations"] for t in (256, 512))
        assert 1.8 * a256 <= a512 <= 2.2 * a256, (b, a256, a512)  # linear in T: no T^2 term
    assert got["torch", 256]["ops"]["window_attention"].startswith("torch (FlexAttention")
    # the torch LM head keeps T x V fp32 logits that the fused one does not
    assert got["torch", 512]["peak_bytes"] - got["triton", 512]["peak_bytes"] >= 512 * 50257 * 4
    budget = (got["triton", 256]["peak_reserved_estimate_bytes"] + got["triton", 512]["peak_reserved_estimate_bytes"])
    path = tmp_path / "packed.json"
    assert memory.main(["--gpu", "rtx4070", "--recipe", "speedrun", "--model", "tiny", "--seq-len", "256", "--backend",
                        "triton", "--max", "--budget-gib", str(budget / 2 / 2**30), "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    assert record["packed"] is True and record["recipe"] == "speedrun" and record["micro_batch"] == 1
    found = record["max_seq_len"]["triton"]
    assert found["seq_len"] == 256 == record["seq_len"] and found["peak_grows_with_seq_len"]
    assert {"seq_len": 512, "fits": False} in found["tried"]
    assert "largest packed --seq-len" in capsys.readouterr().out


def test_max_search_is_monotone_and_respects_the_budget(tmp_path):
    calls = []
    best, tried = est.search_max(lambda b: calls.append(b) or b <= 24, [1, 2, 4, 8, 16, 32, 64])
    assert best == 16 and dict(tried)[32] is False and len(calls) == len(set(calls))
    assert est.search_max(lambda b: False, [1, 2, 4])[0] is None
    assert est.search_max(lambda b: True, [1, 2, 4])[0] == 4

    path = tmp_path / "max.json"
    assert memory.main(["--gpu", "rtx4070", "--recipe", "gpt2", "--model", "tiny", "--seq-len", "128", "--backend",
                        "torch", "--max",
                        "--budget-gib", "0.5", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    found = record["max_micro_batch"]["torch"]
    assert found["peak_grows_with_micro_batch"]
    by_b = {e["micro_batch"]: e for e in record["estimates"]}
    best = found["micro_batch"]
    assert best in by_b and by_b[best]["fits"] and record["micro_batch"] == best
    assert by_b[best]["peak_reserved_estimate_bytes"] <= 0.5 * 2**30 == record["budget_bytes"]
    above = [t for t in found["tried"] if t["micro_batch"] > best]
    assert above and not above[0]["fits"] and above[0]["micro_batch"] == 2 * best  # the next candidate fails


@pytest.mark.parametrize("argv, needle", [
    (["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--micro-batch", "0"], "--micro-batch '0'"),
    (["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--micro-batch", "7"], "--micro-batch 7 does not divide"),
    (["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--micro-batch", "x"], "expected positive integers"),
    (["--gpu", "cpu"], "--gpu"),
    (["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--seq-len", "4096"], "--seq-len 4096"),
    (["--gpu", "rtx4070", "--budget-gib", "-1"], "--budget-gib"),
    (["--micro-batch", "8"], "--gpu"),
    (["--gpu", "rtx4070", "--bogus"], "unrecognized"),
    (["--gpu", "rtx4070", "--recipe", "llmc"], "--recipe"),
    (["--gpu", "rtx4070", "--recipe", "speedrun", "--model", "d24"], "--model 'd24' is not a speedrun model"),
    (["--gpu", "rtx4070", "--recipe", "gpt2", "--model", "tiny", "--seq-len", "512"], "--seq-len 512"),
    (["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--model", "tiny", "--seq-len", "512"], "--seq-len 512"),
    (["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--micro-batch", "3"], "--micro-batch 3 does not divide"),
    (["--gpu", "rtx4070", "--recipe", "speedrun", "--model", "tiny", "--seq-len", "2048"], "--seq-len 2048"),
    (["--gpu", "rtx4070", "--recipe", "speedrun", "--micro-batch", "2"], "packs one sequence per micro-batch"),
])
def test_bad_flags_give_one_error_line_and_exit_2(argv, needle, capsys):
    assert memory.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], captured.err
    assert captured.out == ""


def test_cli_exit_code_and_no_traceback():
    r = subprocess.run([sys.executable, str(REPO / "bench" / "memory.py"), "--gpu", "rtx4070", "--micro-batch", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


CUDA_AUTOCAST_CHECK = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from tritonrun.gpt2 import GPT, MODEL_SIZES
from tritonrun.gpt2.ops import get_ops

class Log(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        t = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(t, torch.Tensor):
            self.ops.append((str(func), str(t.dtype), tuple(t.shape)))
        return out

def forward(device):
    log = Log()
    with FakeTensorMode(allow_non_fake_inputs=True):
        ops = get_ops("torch")
        ops.attention = lambda q, k, v: q.clone()  # SDPA's math path on a fake CUDA device needs a real one
        with torch.device("meta"):
            model = GPT(MODEL_SIZES["tiny"], ops)
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                m._parameters[name] = torch.nn.Parameter(torch.empty(p.shape, device=device), requires_grad=False)
        x = torch.zeros(2, 32, dtype=torch.long, device=device)
        if device == "cuda":  # torch.autocast("cuda") turns itself off without a GPU: enable the CUDA policy directly
            torch.set_autocast_enabled("cuda", True)
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            ctx = torch.no_grad()
        else:
            ctx = torch.autocast("cpu", dtype=torch.bfloat16)
        with ctx, torch.no_grad(), log:
            model.hidden(x)  # every block: linears, layer norms, GELU, the residual adds
    return log.ops

cpu, cuda = forward("cpu"), forward("cuda")
print(len(cpu), len(cuda))
assert [(o[1], o[2]) for o in cpu if "mm" in o[0] or "linear" in o[0]] == \
       [(o[1], o[2]) for o in cuda if "mm" in o[0] or "linear" in o[0]], "matmul casts differ"
assert [o for o in cpu if "layer_norm" in o[0]] == [o for o in cuda if "layer_norm" in o[0]], "layer norms differ"
assert any(o[1] == "torch.bfloat16" for o in cuda if "mm" in o[0]), "CUDA autocast was not on"
assert [(o[1], o[2]) for o in cpu] == [(o[1], o[2]) for o in cuda], "some op's dtype or shape differs"
print("same casts")
"""


def test_cpu_autocast_makes_the_casts_cuda_autocast_makes():
    """The estimate runs on fake CPU tensors under CPU autocast (autograd on fake CUDA tensors aborts a CPU-only
    torch); a forward without autograd works on a fake CUDA device: the matmuls and layer norms get the same
    dtypes and shapes under both policies. In a subprocess: a CUDA-only path hit by mistake aborts the process."""
    r = subprocess.run([sys.executable, "-c", CUDA_AUTOCAST_CHECK, str(REPO)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "same casts" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]


def test_micro_batch_is_derived_for_the_backend_that_runs(monkeypatch):
    """On a GPU the micro-batch follows the LM head that runs: --backend triton with the fused head fits more
    sequences than the torch head (the torch backend, or linear_cross_entropy kept in torch), each the largest the
    estimate fits (tritonrun.memory.fit_preset, the same search as bench/memory.py --max); an explicit --micro-batch
    wins; the packed default recipe takes one sequence of the derived length. (Config resolution on a GPU, faked on
    CPU: it reads only is_available and the device name.)"""
    from tritonrun.memory import fit_preset
    from tritonrun.train import resolve_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4070")

    def derived(recipe, backend, torch_ops=""):
        return fit_preset("rtx4070", recipe, "d12", 1024, 524288, backend, torch_ops)

    base = ["--gpu", "rtx4070", "--recipe", "gpt2", "--out-dir", "unused"]
    torch_head = resolve_config(base)[0].micro_batch  # the preset's default backend: torch
    fused = resolve_config(base + ["--backend", "triton"])[0].micro_batch
    kept = resolve_config(base + ["--backend", "triton", "--torch-ops", "linear_cross_entropy"])[0].micro_batch
    assert torch_head == derived("gpt2", "torch")["micro_batch"]
    assert fused == derived("gpt2", "triton")["micro_batch"] > torch_head
    assert kept == derived("gpt2", "triton", "linear_cross_entropy")["micro_batch"] < fused
    assert resolve_config(base + ["--backend", "triton", "--micro-batch", "4"])[0].micro_batch == 4
    # the speedrun-dense torch LM head softcaps fp32 logits: fewer sequences than GPT-2's
    dense = resolve_config(["--gpu", "rtx4070", "--recipe", "speedrun-dense", "--out-dir", "unused"])[0]
    assert dense.micro_batch == derived("speedrun-dense", "torch")["micro_batch"] < torch_head
    default = resolve_config(["--gpu", "rtx4070", "--out-dir", "unused"])[0]  # the GPU default recipe: packed
    picked = fit_preset("rtx4070", "record89", "d12", 1024, 393_216, "torch")["seq_len"]  # its own batch
    assert (default.recipe, default.micro_batch, default.seq_len, default.fp8) == ("record89", 1, picked, "off")


def test_presets_describe_hardware_only():
    """No preset field names a recipe, a backend or a batch size: presets carry memory, peak, GPU, dtype, compile
    and the default backend; batch sizes are derived, run values are tritonrun/defaults.py's and the recipes'."""
    from dataclasses import fields

    from tritonrun.gpt2.ops import BACKENDS
    from tritonrun.presets import Preset
    from tritonrun.recipes import RECIPES

    names = {f.name for f in fields(Preset)}
    words = {w for r in RECIPES for w in r.replace("-", "_").split("_")} | set(BACKENDS) | {"recipe"}
    assert not {n for n in names if words & set(n.split("_"))}, names
    assert not names & {"micro_batch", "seq_len", "model", "lr", "max_steps", "total_batch_tokens"}, names
    assert names == {"memory_gib", "peak_tflops", "arch", "sm_count", "backend", "compile", "dtype",
                     "timing_warmup_steps", "device"}


def test_fakes_size_scratch_for_the_planned_gpu():
    """Under kernels.target.planning_for, the cross-entropy fakes size the per-program fp32 scratch for the named
    GPU's SM count and arch table: at GPT-2 shapes the tables' tall-skinny backward tiles (dh 64 rows x 256 vocab,
    dW 256 rows x 64 vocab) give each program a 64 x 768 fp32 slot, so on the rtx4070 (46 SMs) each backward
    kernel's scratch is 46 x 64 x 768 x 4 B (~9 MB) and on an H100 (132 SMs) 132 x 64 x 768 x 4 B (~26 MB): both
    grids are capped by the SM count (256 row blocks, 786 vocab blocks). The launcher's own plan agrees."""
    from tritonrun.kernels.cross_entropy import backward_workspace, linear_cross_entropy
    from tritonrun.kernels.target import planning_for
    from tritonrun.presets import PRESETS

    assert {n for n, p in PRESETS.items() if p.device == "cuda"} == set(est.GPUS)
    N, C, Vp = 16 * 1024, 768, 50304
    for gpu in ("rtx4070", "h100"):
        ledger = est.Ledger()
        with planning_for(est.GPUS[gpu]), est.TrackingFakeMode(ledger):
            h = torch.empty(N, C, dtype=torch.bfloat16, requires_grad=True)
            w = torch.empty(Vp, C, dtype=torch.bfloat16, requires_grad=True)
            t = torch.empty(N, dtype=torch.long)
            ledger.trace = []
            linear_cross_entropy(h, w, t, -1, 50257).backward()
        sms = est.GPUS[gpu].sm_count
        # one program per SM, at most one per tile: 256 row blocks (dh, one vocab split), 786 vocab blocks (dW)
        dh_scratch, dw_scratch = min(256, sms) * 64 * C * 4, min(786, sms) * 64 * C * 4
        plan = backward_workspace(N, C, 50257, Vp, sms, arch=est.GPUS[gpu].arch)
        assert [4 * math.prod(s) for s in plan["dh"] + plan["dw"]] == [dh_scratch, dw_scratch], gpu
        inside = [n for n, _, where in ledger.trace if where.startswith("tritonrun.linear_cross_entropy_backward")]
        assert inside == [N, N * C * 2, dh_scratch, Vp * C * 2, dw_scratch], gpu  # mask, dh, scratch, dW, scratch
    assert dh_scratch == dw_scratch == 25_952_256  # H100: 132 programs each
