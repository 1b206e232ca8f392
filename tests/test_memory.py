"""bench/memory.py: the tracker against the CPU allocator, the kernels' fakes against their real launches, the
category split, the --max search, flag errors and the JSON record."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile

from gpt2 import GPT
from gpt2.config import GPTConfig
from gpt2.ops import get_ops

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
import memory  # noqa: E402

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


def _real_step_peak(backend: str, B: int = 3, T: int = 64) -> tuple[int, memory.Ledger]:
    """(allocator's peak of bytes allocated during the measured step, the dispatch-mode ledger of the same step)."""
    torch.manual_seed(0)
    ops = get_ops(backend, "cpu")
    model = GPT(SMALL, ops)
    opt = memory.build_optimizer(model, ops)
    batches = memory.make_batches(2, B, T, SMALL.vocab_size, "cpu")
    memory.training_step(model, opt, batches[:1], memory.Ledger(), AUTOCAST)  # optimizer state exists
    ledger = memory.Ledger()
    ledger.mark("parameters", list(model.parameters()))
    ledger.mark("optimizer_state", memory.optimizer_tensors(opt))
    ledger.mark("activations", [t for b in batches for t in b])
    base = ledger.live_bytes
    ledger.reset_peak()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with memory.TrackingMode(ledger):
            memory.training_step(model, opt, batches, ledger, AUTOCAST)
    events = _allocations(prof)
    # total_allocated counts what was allocated while profiling and is still live: the step's own allocations
    allocator_peak = max(e.typed[1].total_allocated for e in events)
    assert events[-1].typed[1].total_allocated == ledger.live_bytes - base  # both back to what they began with
    return allocator_peak, ledger, base


def _fake_step_peak(backend: str, B: int = 3, T: int = 64) -> int:
    ledger = memory.Ledger()
    ops = get_ops(backend, "cpu")
    with memory.TrackingFakeMode(ledger):
        model = GPT(SMALL, ops)
        opt = memory.build_optimizer(model, ops)
        batches = memory.make_batches(2, B, T, SMALL.vocab_size, "cpu")
        memory.training_step(model, opt, batches[:1], ledger, AUTOCAST)
        base = ledger.live_bytes
        ledger.reset_peak()
        memory.training_step(model, opt, batches, ledger, AUTOCAST)
    return ledger.peak_bytes - base


def test_tracker_matches_the_cpu_allocator_and_the_fake_step(one_torch_thread):
    """On real CPU tensors (torch ops, bf16 autocast, two micro-batches, clip, fused AdamW) the ledger's peak is the
    allocator's own (native kernels' internal scratch could make them differ: 1% allowed; today they are equal),
    and the same step under FakeTensorMode gives the same peak."""
    allocator_peak, ledger, base = _real_step_peak("torch")
    assert ledger.peak_bytes - base == pytest.approx(allocator_peak, rel=0.01)
    assert _fake_step_peak("torch") == ledger.peak_bytes - base


def _real_op_allocations(fn, prefix: str, min_bytes: int) -> list[int]:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Left out: what a CPU reduction allocates inside aten::sum (a sum over bools first copies them to int64;
    # a CUDA reduction casts as it loads).
    return sorted(e.typed[1].alloc_size for e in _allocations(prof)
                  if e.typed[1].alloc_size >= min_bytes and _inside(e, prefix) and not _inside(e, "aten::sum"))


def _fake_op_allocations(make_inputs, fn, min_bytes: int, inside: str) -> list[int]:
    ledger = memory.Ledger()
    with memory.TrackingFakeMode(ledger):
        inputs = make_inputs()
        ledger.trace = []
        fn(*inputs)
    return sorted(n for n, op, where in ledger.trace if n >= min_bytes and where.startswith(inside))


def test_fakes_allocate_what_the_launches_allocate(one_torch_thread):
    """Every buffer of >= 1 KiB that the Triton ops' real launches allocate inside the op (interpreter, CPU) is
    allocated by their fake implementations too, with the same sizes: outputs, partials and scratch."""
    from kernels.attention import causal_attention
    from kernels.cross_entropy import linear_cross_entropy
    from kernels.layernorm import add_layer_norm

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


def test_fused_adamw_under_fake_tensors_allocates_what_it_does_for_real(one_torch_thread):
    """FusedAdamW has no custom op: under FakeTensorMode it runs its own host code and skips the launches, so the
    clip + step allocate the same buffers (pointer tables, norm partials) as a real step."""
    from kernels.adamw import FusedAdamW

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
    ledger = memory.Ledger()
    with memory.TrackingFakeMode(ledger):
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
    assert memory.main(["--gpu", "rtx4070", "--model", "tiny", "--seq-len", "128", "--backend", "both",
                        "--micro-batch", "4,2", "--json", str(path)]) == 0
    record = json.loads(path.read_text())
    for key in ("peak_bytes", "peak_reserved_estimate_bytes", "context_allowance_bytes", "budget_bytes", "fits",
                "micro_batch", "backend", "preset", "split_bytes"):
        assert key in record, key
    assert (record["backend"], record["micro_batch"], record["preset"]) == ("triton", 4, "rtx4070")
    assert record["budget_bytes"] == 11 * 2**30 and record["mode"] == "eager"
    assert [(e["backend"], e["micro_batch"]) for e in record["estimates"]] == [
        ("triton", 4), ("triton", 2), ("torch", 4), ("torch", 2)]
    for e in record["estimates"]:
        assert sum(e["split_bytes"].values()) == e["peak_bytes"]
        assert set(e["split_bytes"]) == set(memory.CATEGORIES)
        assert e["peak_reserved_estimate_bytes"] >= e["peak_bytes"] * (1 + memory.FRAGMENTATION)
        assert e["fits"] == (e["peak_reserved_estimate_bytes"] <= e["budget_bytes"])
        s = e["split_bytes"]
        assert s["grads"] == s["parameters"] and s["optimizer_state"] >= 2 * s["parameters"]  # fp32 AdamW
    torch_4 = record["estimates"][2]
    # the torch LM head keeps fp32 logits for backward: at least N x V x 4 bytes of activations
    assert torch_4["split_bytes"]["activations"] >= 4 * 128 * 50257 * 4
    out = capsys.readouterr().out
    assert "triton B=4" in out and "torch  B=2" in out and f"record: {path}" in out


def test_max_search_is_monotone_and_respects_the_budget(tmp_path):
    calls = []
    best, tried = memory.search_max(lambda b: calls.append(b) or b <= 24, [1, 2, 4, 8, 16, 32, 64])
    assert best == 16 and dict(tried)[32] is False and len(calls) == len(set(calls))
    assert memory.search_max(lambda b: False, [1, 2, 4])[0] is None
    assert memory.search_max(lambda b: True, [1, 2, 4])[0] == 4

    path = tmp_path / "max.json"
    assert memory.main(["--gpu", "rtx4070", "--model", "tiny", "--seq-len", "128", "--backend", "torch", "--max",
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
    (["--gpu", "rtx4070", "--micro-batch", "0"], "--micro-batch '0'"),
    (["--gpu", "rtx4070", "--micro-batch", "7"], "--micro-batch 7 does not divide"),
    (["--gpu", "rtx4070", "--micro-batch", "x"], "expected positive integers"),
    (["--gpu", "cpu"], "--gpu"),
    (["--gpu", "rtx4070", "--seq-len", "4096"], "--seq-len 4096"),
    (["--gpu", "rtx4070", "--budget-gib", "-1"], "--budget-gib"),
    (["--micro-batch", "8"], "--gpu"),
    (["--gpu", "rtx4070", "--bogus"], "unrecognized"),
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
from gpt2 import GPT, MODEL_SIZES
from gpt2.ops import get_ops

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


def test_preset_micro_batch_follows_the_backend(monkeypatch):
    """--backend triton with the fused LM head takes the preset's triton_micro_batch; the torch LM head (the torch
    backend, or linear_cross_entropy kept in torch) the preset's micro_batch; an explicit --micro-batch wins.
    (Config resolution on a GPU, faked on CPU: it reads only is_available and the device name.)"""
    import train_speedrun
    from train_speedrun import PRESETS, preset_micro_batch, resolve_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA GeForce RTX 4070")

    p = PRESETS["rtx4070"]
    assert p.triton_micro_batch and p.triton_micro_batch > p.micro_batch
    assert preset_micro_batch("rtx4070", "triton") == p.triton_micro_batch
    assert preset_micro_batch("rtx4070", "triton", "attention") == p.triton_micro_batch
    assert preset_micro_batch("rtx4070", "triton", "linear_cross_entropy") == p.micro_batch
    assert preset_micro_batch("rtx4070", "torch") == p.micro_batch
    assert preset_micro_batch("cpu", "triton") == PRESETS["cpu"].micro_batch
    base = ["--gpu", "rtx4070", "--out-dir", "unused"]
    assert resolve_config(base)[0].micro_batch == p.micro_batch  # the preset's default backend: torch
    assert resolve_config(base + ["--backend", "triton"])[0].micro_batch == p.triton_micro_batch
    assert resolve_config(base + ["--backend", "triton", "--torch-ops", "linear_cross_entropy"])[0].micro_batch \
        == p.micro_batch
    assert resolve_config(base + ["--backend", "triton", "--micro-batch", "4"])[0].micro_batch == 4
    assert train_speedrun.Preset.__dataclass_fields__["triton_micro_batch"].default is None


def _newest_record(preset: str) -> dict | None:
    paths = sorted((REPO / "bench" / "results").glob(f"memory-{preset}-*.json"))
    return json.loads(paths[-1].read_text()) if paths else None


def test_gpu_presets_fit_by_their_memory_record():
    """Each GPU preset's micro-batches are within what its committed memory record found to fit: micro_batch for
    the torch LM head, triton_micro_batch for the fused one."""
    from train_speedrun import PRESETS

    assert _newest_record("rtx4070") is not None, "bench/results/memory-rtx4070-*.json is the compass record"
    for name, p in PRESETS.items():
        record = _newest_record(name)
        if p.device != "cuda" or record is None:
            continue
        fit = record["max_micro_batch"]
        assert p.micro_batch <= fit["torch"]["micro_batch"], name
        if p.triton_micro_batch:
            assert p.triton_micro_batch <= fit["triton"]["micro_batch"], name
        assert record["seq_len"] == p.seq_len and record["model"] == p.model, name


def test_fakes_size_scratch_for_the_planned_gpu():
    """Under kernels.target.planning_for, the cross-entropy fakes size the per-program fp32 scratch for the named
    GPU's SM count and arch table: at GPT-2 shapes the tables' tall-skinny backward tiles (dh 64 rows x 256 vocab,
    dW 256 rows x 64 vocab) give each program a 64 x 768 fp32 slot, so on the rtx4070 (46 SMs) each backward
    kernel's scratch is 46 x 64 x 768 x 4 B (~9 MB) and on an H100 (132 SMs) 132 x 64 x 768 x 4 B (~26 MB): both
    grids are capped by the SM count (256 row blocks, 786 vocab blocks). The launcher's own plan agrees."""
    from kernels.cross_entropy import backward_workspace, linear_cross_entropy
    from kernels.target import planning_for
    from train_speedrun import PRESETS

    assert {n for n, p in PRESETS.items() if p.device == "cuda"} == set(memory.GPUS)
    N, C, Vp = 16 * 1024, 768, 50304
    for gpu in ("rtx4070", "h100"):
        ledger = memory.Ledger()
        with planning_for(memory.GPUS[gpu]), memory.TrackingFakeMode(ledger):
            h = torch.empty(N, C, dtype=torch.bfloat16, requires_grad=True)
            w = torch.empty(Vp, C, dtype=torch.bfloat16, requires_grad=True)
            t = torch.empty(N, dtype=torch.long)
            ledger.trace = []
            linear_cross_entropy(h, w, t, -1, 50257).backward()
        sms = memory.GPUS[gpu].sm_count
        # one program per SM, at most one per tile: 256 row blocks (dh, one vocab split), 786 vocab blocks (dW)
        dh_scratch, dw_scratch = min(256, sms) * 64 * C * 4, min(786, sms) * 64 * C * 4
        plan = backward_workspace(N, C, 50257, Vp, sms, arch=memory.GPUS[gpu].arch)
        assert [4 * math.prod(s) for s in plan["dh"] + plan["dw"]] == [dh_scratch, dw_scratch], gpu
        inside = [n for n, _, where in ledger.trace if where.startswith("tritonrun.linear_cross_entropy_backward")]
        assert inside == [N, N * C * 2, dh_scratch, Vp * C * 2, dw_scratch], gpu  # mask, dh, scratch, dW, scratch
    assert dh_scratch == dw_scratch == 25_952_256  # H100: 132 programs each
