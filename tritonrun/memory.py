"""Peak memory of one whole training step, estimated without a GPU (the CLI: python bench/memory.py).

What runs. The real GPT-2 (tritonrun/gpt2/model.py) with the preset's model, T and the backend's ops
(tritonrun/gpt2/ops.py), and the real optimizer (the backend's AdamW, as training.Trainer builds it) under torch's
FakeTensorMode: every tensor has a shape, dtype and storage but no data, so nothing is computed and a d12 step at any
micro-batch takes seconds. One warm-up step (with one micro-batch) creates the optimizer state, then the measured step
runs what Trainer.train_step runs: min(2, grad accumulation) micro-batches of forward under bf16 autocast and backward
(the second one adds into existing grads, as every micro-batch after the first does), the global grad-norm clip
(the fused one of FusedAdamW, or torch's foreach clip), the optimizer step and zero_grad. The Triton ops' fake
implementations (register_fake in kernels/*.py; FusedAdamW allocates its buffers and skips the launch) allocate
what their real launches allocate, scratch included, sized for the preset's GPU (SM count, arch config table:
tritonrun/kernels/target.py). Eager mode: torch.compile changes what is saved and fused, so a compiled step's
activations differ (often lower); the record says "mode": "eager".

Recipes (--recipe; default the GPU run's, speedrun). gpt2: the above. speedrun-dense
(the 2024-11-10 model, T = 1024) and speedrun (the 2024-12-17 one): tritonrun/gpt2/speedrun.py's SpeedrunGPT
(SPEEDRUN_DENSE_MODELS / SPEEDRUN_MODELS) and the optimizers the trainer builds for it
(tritonrun/recipes/modded_nanogpt.py's SpeedrunOptimizer): the ops seam's Adam (`optimizer`, torch's fused or the
Triton FusedAdamW, weight_decay 0) over optimizer_groups()["adam"] (wte and the value-embedding tables, lm_head,
scalars) and kernels/muon.Muon over the blocks' matrices. speedrun's micro-batch is ONE packed sequence of --seq-len
tokens with its document bounds and the schedule's last (largest) window,
1,792; --max searches the largest power-of-two --seq-len (128 .. the model's 65,536) that fits instead of a
micro-batch. Its attention is ops.window_attention: under --backend triton tritonrun/kernels/window_attention.py's
fake (saves q, k, v, the output and an fp32 logsumexp); under --backend torch the trainer runs FlexAttention under
torch.compile on a GPU, which saves the same tensors, so the estimate uses the kernel's fake there too (the eager
CPU path, a dense T x T mask, is not what a GPU runs). Records: memory-speedrun-packed-<preset>-<date>.json
(speedrun), memory-speedrun-dense-... (speedrun- dense): names no record of the other model ever had. The step has
no grad clip (the record clips nothing): Adam's step, then Muon's: its fp32 momentum buffers (one per matrix,
optimizer state) and its Newton-Schulz temporaries (the Nesterov updates stacked per shape, the bf16 X, A = X Xᵀ, B
and each new X: temporaries). The Muon group's matrices of one shape are orthogonalized in one batch, so those
temporaries scale with the largest shape group (d12: 48 of 768 x 768, 24 of 768 x 3072), not with one matrix.

Fake device. The step runs on fake *CPU* tensors under CPU bf16 autocast, not on a fake CUDA device: in a CPU-only
torch build, autograd on fake CUDA tensors aborts the process (no CUDA device guard; "PyTorch is not linked with
support for cuda devices"). For this model CPU and CUDA autocast make the same casts (matmuls, linear and SDPA in
bf16; the fp32 residual stream keeps layer norms in fp32; the torch LM head upcasts its logits itself):
tests/test_memory.py checks op for op on a fake CUDA forward, which works. The torch attention runs SDPA's CPU
flash kernel under fake tensors, which saves what CUDA's flash kernel saves (output and an fp32 logsumexp).

Tracker. A small dispatch-level ledger: every op's output storage is registered once (views share it), counted
while its Python storage object lives (rounded up to 512 B, the CUDA caching allocator's block size), and the
peak of the live sum is kept with the list of storages live at it. At the end each of those is put in one
category: parameters, grads (the .grad tensors after a backward), optimizer state (tensors the optimizer holds
after its step), activations (allocated in a forward and still alive when its backward starts: saved tensors,
autocast's bf16 weight copies, the batch), temporaries (the rest). Under FakeTensorMode the ledger is fed from
the fake mode itself, so it also sees what the fake implementations allocate inside an op; on real tensors it is
fed by a TorchDispatchMode (tests/test_memory.py checks it against the CPU allocator's own events on a tiny model).
Not seen: memory a library kernel allocates internally without a tensor (cuBLAS workspace, FlashAttention-2's
fp32 dq accumulator, B*T*C*4 bytes for one backward call), autotune benchmarking buffers (tuned before the peak).

Fit. peak_reserved_estimate_bytes = peak_bytes x (1 + FRAGMENTATION) for what the caching allocator reserves
beyond live tensors (block rounding, segments split by earlier sizes); the CUDA context (CONTEXT_ALLOWANCE, CUDA
runtime, cuBLAS handles, loaded kernels) lives outside the allocator. A micro-batch fits when the reserved
estimate is within budget_bytes = the preset's memory minus 1 GiB (12 GB card: 11 GiB), which leaves the context
allowance and 0.5 GiB for the display and the card's own reservations (a "12 GB" RTX 4070 reports 11.99 GiB).
Both allowances are assumptions until the budgeted GPU check (.ci/gpu) prints this estimate against a measured
peak. search_max (bench/memory.py --max): the largest micro-batch dividing total_batch_tokens / T whose estimate
fits (the estimate grows with the micro-batch; the search checks that it does).
"""
from __future__ import annotations

import math
import time
import weakref
from dataclasses import dataclass, field, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

from tritonrun.kernels.target import Target, arch_key, capability_of, planning_for  # (imports no triton)
from tritonrun.presets import PRESETS
from tritonrun.recipes import get_recipe

GIB = 2**30
CATEGORIES = ("parameters", "grads", "optimizer_state", "activations", "temporaries")
CUDA_BLOCK = 512  # bytes: the CUDA caching allocator rounds every allocation up to a multiple of this
CONTEXT_ALLOWANCE = GIB // 2  # CUDA context + cuBLAS/Triton modules, outside the allocator (0.3-0.5 GiB measured
#                               on consumer cards by others; the upper end)
FRAGMENTATION = 0.10  # reserved over allocated at the peak: the caching allocator's rounding and split segments
BUDGET_MARGIN = GIB  # budget = preset memory - this: the context allowance plus 0.5 GiB of headroom

# The GPU behind each CUDA preset, as the kernels' fakes need it: its config-table key (the kernels' own arch_key:
# sm_86, the RTX 3090, uses sm_89's tables) and SM count, from the presets' hardware facts.
GPUS: dict[str, Target] = {name: Target(name, arch_key(capability_of(p.arch)), p.sm_count)
                           for name, p in PRESETS.items() if p.arch is not None}


# ------------------------------------------------------------------------------------------ tracker
@dataclass(eq=False)
class _Entry:
    serial: int
    nbytes: int
    phase: str  # "setup", "forward", "backward", "optimizer", "batch"
    ref: object = None  # weakref to the storage (keeps the callback alive)


@dataclass
class Ledger:
    """Live tensor storage bytes over time, its peak and what was live at the peak (see the module docstring)."""

    granularity: int = 1  # round each storage up to a multiple of this (CUDA_BLOCK for a CUDA estimate)
    phase: str = "setup"
    live_bytes: int = 0
    peak_bytes: int = 0
    peak_phase: str = "setup"
    peak_op: str = ""
    allocations: int = 0
    _entries: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    _live: dict = field(default_factory=dict)  # serial -> _Entry
    _peak_live: list = field(default_factory=list)
    _serial: int = 0
    roles: dict = field(default_factory=lambda: {c: set() for c in CATEGORIES})  # category -> serials
    inside: str = ""  # the custom op (tritonrun::...) whose fake implementation is running, if any
    trace: list | None = None  # when a list: (bytes, op, inside) of every new storage, in order

    def _free(self, serial: int) -> None:
        entry = self._live.pop(serial, None)
        if entry is not None:
            self.live_bytes -= entry.nbytes

    def see(self, tensors, op: str = "") -> None:
        """Register the storages of `tensors` not seen yet; update the peak."""
        grew = False
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self._entries:
                continue
            n = -(-storage.nbytes() // self.granularity) * self.granularity
            self._serial += 1
            entry = _Entry(self._serial, n, self.phase)
            serial, free = entry.serial, self._free
            entry.ref = weakref.ref(storage, lambda _, s=serial, f=free: f(s))
            self._entries[storage] = entry
            self._live[serial] = entry
            self.live_bytes += n
            self.allocations += 1
            if self.trace is not None:
                self.trace.append((n, op, self.inside))
            grew = True
        if grew and self.live_bytes > self.peak_bytes:
            self.peak_bytes, self.peak_phase, self.peak_op = self.live_bytes, self.phase, op
            self._peak_live = list(self._live.values())

    def reset_peak(self) -> None:
        self.peak_bytes, self.peak_phase, self.peak_op = self.live_bytes, self.phase, "reset"
        self._peak_live = list(self._live.values())

    def serial_of(self, t: torch.Tensor) -> int | None:
        entry = self._entries.get(t.untyped_storage())
        return entry.serial if entry is not None else None

    def mark(self, category: str, tensors) -> None:
        """These tensors' storages belong to `category` (registered first if not seen yet)."""
        tensors = [t for t in tensors if isinstance(t, torch.Tensor)]
        self.see(tensors, op=f"mark {category}")
        self.roles[category].update(self.serial_of(t) for t in tensors)

    def mark_live(self, category: str, phases: tuple[str, ...]) -> None:
        """Every storage live now that was allocated in one of `phases` belongs to `category`."""
        self.roles[category].update(e.serial for e in self._live.values() if e.phase in phases)

    def split(self, entries=None) -> dict[str, int]:
        """Bytes per category of `entries` (default: those live at the peak); first matching role wins."""
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self._peak_live if entries is None else entries:
            out[next((c for c in CATEGORIES[:-1] if e.serial in self.roles[c]), "temporaries")] += e.nbytes
        return out


class TrackingMode(TorchDispatchMode):
    """Feeds a Ledger from real tensors: every op's outputs."""

    def __init__(self, ledger: Ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ledger.see(tree_leaves(out), str(func))
        return out


class TrackingFakeMode(FakeTensorMode):
    """FakeTensorMode that feeds a Ledger: it also sees the ops a fake implementation runs inside a custom op
    (their scratch), which a TorchDispatchMode stacked above the fake mode would not."""

    def __init__(self, ledger: Ledger):
        super().__init__(allow_non_fake_inputs=True)
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outer = self.ledger.inside
        if not outer and func.namespace == "tritonrun":
            self.ledger.inside = str(func)
        try:
            out = super().__torch_dispatch__(func, types, args, kwargs)
        finally:
            self.ledger.inside = outer
        self.ledger.see(tree_leaves(out), str(func))
        return out


# ------------------------------------------------------------------------------------------ the step
def optimizer_tensors(optimizer) -> list[torch.Tensor]:
    """Every tensor the optimizer holds (state, FusedAdamW's flat buffers and tables), found by walking it; a
    SpeedrunOptimizer: both of its optimizers'."""
    if isinstance(optimizer, SpeedrunOptimizer):
        return [t for inner in optimizer.optimizers for t in optimizer_tensors(inner)]
    found, seen = [], set()

    def walk(obj, depth=0):
        if depth > 6 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            found.append(obj)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k, depth + 1)
                walk(v, depth + 1)
        elif isinstance(obj, (list, tuple, set)):
            for v in obj:
                walk(v, depth + 1)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)):
            walk(vars(obj), depth + 1)

    walk(optimizer.state)
    walk(getattr(optimizer, "_buckets", None))
    return found


def build_optimizer(model, ops, weight_decay: float = 0.1):
    """The optimizer training.Trainer builds (ops.optimizer), with torch's fused AdamW where torch_adamw would pick
    it on CUDA (it picks foreach for CPU params, and these fake params are CPU ones)."""
    from tritonrun.gpt2.ops import TorchAdamW, torch_adamw

    groups = model.param_groups(weight_decay)
    if ops.optimizer is torch_adamw:
        return TorchAdamW(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return ops.optimizer(groups, lr=6e-4, betas=(0.9, 0.95), eps=1e-8)


class SpeedrunOptimizer:
    """The speedrun recipes' optimizers as the trainer drives them (tritonrun/recipes/modded_nanogpt.py's
    SpeedrunOptimizer, which this mirrors for the estimate without the schedule: lr and momentum values do not change
    what is allocated): the seam's Adam over SpeedrunGPT.optimizer_groups()["adam"], then kernels/muon.Muon over its
    "muon" group."""

    def __init__(self, model, ops):
        from tritonrun.gpt2.ops import TorchAdamW, torch_adamw
        from tritonrun.kernels.muon import Muon

        groups, c = model.optimizer_groups(), model.config
        adam_kw = dict(lr=groups["adam"][0]["lr"], betas=c.adam_betas, eps=c.adam_eps)
        if ops.optimizer is torch_adamw:  # torch_adamw's pick on CUDA params (fused); these fake params are CPU
            self.adam = TorchAdamW(groups["adam"], fused=True, **adam_kw)
        else:
            self.adam = ops.optimizer(groups["adam"], **adam_kw)
        self.muon = Muon(groups["muon"], lr=c.muon_lr, momentum=c.muon_momentum_warmup_start,
                         nesterov=c.muon_nesterov, ns_steps=c.muon_ns_steps, ns_dtype=torch.bfloat16, shard=False,
                         momentum_form=c.muon_momentum_form)
        self.optimizers = (self.adam, self.muon)

    def step(self) -> None:
        self.adam.step()
        self.muon.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)


def build_speedrun_optimizer(model, ops) -> SpeedrunOptimizer:
    return SpeedrunOptimizer(model, ops)


def training_step(model, optimizer, batches, ledger: Ledger, autocast, grad_clip: float = 1.0) -> None:
    """Trainer.train_step's work on `batches` (one (x, y) per micro-batch, or (x, y, cu_seqlens, window) for the
    packed recipe), phases marked in the ledger. The loss and norm are not read back to the host (a fake tensor has
    no value)."""
    params = list(model.parameters())
    ledger.phase = "optimizer"
    loss_sum = torch.zeros((), device=params[0].device)
    for batch in batches:
        ledger.phase = "batch"
        ledger.mark("activations", [t for t in batch if isinstance(t, torch.Tensor)])
        ledger.phase = "forward"
        with autocast:
            loss = model(*batch) / len(batches)
        ledger.mark_live("activations", ("forward",))  # alive when backward starts: saved for it
        ledger.phase = "backward"
        loss.backward()
        ledger.phase = "optimizer"
        loss_sum += loss.detach()
        del loss
        ledger.mark("grads", [p.grad for p in params if p.grad is not None])
    if grad_clip > 0 and hasattr(optimizer, "clip_grad_norm_"):
        norm = optimizer.clip_grad_norm_(grad_clip)
    elif grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    torch.stack([loss_sum, norm.float()])  # what the trainer reads back (host copy left out)
    optimizer.step()
    ledger.mark("optimizer_state", optimizer_tensors(optimizer))
    optimizer.zero_grad(set_to_none=True)


def make_batches(n: int, B: int, T: int, vocab: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randint(0, vocab, (B, T), device=device), torch.randint(0, vocab, (B, T), device=device))
            for _ in range(n)]


def make_packed_batches(n: int, T: int, vocab: int, window: int, device) -> list[tuple]:
    """The packed recipe's micro-batches: (x, y) of (1, T), cu_seqlens int32 (one document: the count does not
    change what is allocated) and the window."""
    return [(x, y, torch.tensor([0, T], dtype=torch.int32, device=device), window)
            for x, y in make_batches(n, 1, T, vocab, device)]


def packed_ops(ops):
    """The ops of a packed-recipe estimate: under --backend torch the window attention is the kernel's op, whose
    fake saves what compiled FlexAttention saves on a GPU (see the module docstring)."""
    if ops.backend != "torch":
        return ops
    import dataclasses

    from tritonrun.kernels.window_attention import window_attention

    placement = {**ops.placement, "window_attention": "torch (FlexAttention under compile; estimated by the "
                                                      "kernel's saved tensors)"}
    return dataclasses.replace(ops, window_attention=window_attention, placement=placement)


# ------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class Setup:
    preset: str
    model: str
    seq_len: int
    total_batch_tokens: int
    memory_gib: float
    target: Target
    budget_gib: float | None = None  # --budget-gib: instead of memory_gib - 1
    # "gpt2" (GPT + AdamW, grad clip 1.0) | "speedrun" (packed SpeedrunGPT + Adam and Muon, no clip) |
    # "speedrun-dense" (the 11-10 SpeedrunGPT at micro-batch x T)
    recipe: str = "gpt2"
    torch_ops: str = ""  # under --backend triton, the ops kept in torch (tritonrun/gpt2/ops.py names)

    @property
    def packed(self) -> bool:
        return get_recipe(self.recipe).packed

    @property
    def budget_bytes(self) -> int:
        if self.budget_gib is not None:
            return int(self.budget_gib * GIB)
        return int(self.memory_gib * GIB) - BUDGET_MARGIN

    def micro_batches(self) -> list[int]:
        """Micro-batches the trainer accepts: divisors of total_batch_tokens / seq_len (the packed recipe: 1)."""
        if self.packed:
            return [1]
        n = self.total_batch_tokens // self.seq_len
        return [b for b in range(1, n + 1) if n % b == 0]

    def seq_lens(self, block_size: int) -> list[int]:
        """The packed recipe's --max candidates: powers of two from 128 to the context dividing the total batch."""
        return get_recipe(self.recipe).packed_lengths(self.total_batch_tokens, block_size)


def estimate(setup: Setup, backend: str, micro_batch: int) -> dict:
    """One fake training step of `setup` with `backend` at `micro_batch`; the record entry (see --json)."""
    from tritonrun.gpt2.ops import get_ops

    step = get_recipe(setup.recipe).memory_step
    if step != "generic":
        return ESTIMATORS[step](setup, backend)
    t0 = time.perf_counter()
    ledger = Ledger(granularity=CUDA_BLOCK)
    build_model, build_opt, config, grad_clip = recipe_parts(setup.recipe, setup.model)
    grad_accum = setup.total_batch_tokens // (micro_batch * setup.seq_len)
    # device "cuda": the ops are resolved as for a GPU run (no interpreter); the tensors are fake CPU ones
    from tritonrun.gpt2.ops import parse_op_list

    ops = get_ops(backend, "cuda", parse_op_list(setup.torch_ops) if backend == "triton" else ())
    if setup.packed:
        ops = packed_ops(ops)

    def batches_of(n):
        if setup.packed:
            return make_packed_batches(n, setup.seq_len, config.vocab_size, config.final_window, "cpu")
        return make_batches(n, micro_batch, setup.seq_len, config.vocab_size, "cpu")

    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    with planning_for(setup.target), TrackingFakeMode(ledger):
        model = build_model(config, ops)
        ledger.mark("parameters", list(model.parameters()))
        ledger.mark("parameters", list(model.buffers()))
        optimizer = build_opt(model, ops)
        warm = batches_of(1)
        training_step(model, optimizer, warm, ledger, autocast, grad_clip)  # creates the optimizer state
        del warm
        ledger.reset_peak()
        batches = batches_of(min(2, max(1, grad_accum)))
        training_step(model, optimizer, batches, ledger, autocast, grad_clip)
        del batches
        after_step = ledger.live_bytes
        del model, optimizer
    split = ledger.split()
    peak = ledger.peak_bytes
    reserved = math.ceil(peak * (1 + FRAGMENTATION))
    return {
        "recipe": setup.recipe, "preset": setup.preset, "backend": backend, "micro_batch": micro_batch,
        "seq_len": setup.seq_len,
        "model": setup.model, "grad_accum": grad_accum, "micro_batches_simulated": min(2, max(1, grad_accum)),
        "peak_bytes": peak, "peak_gib": round(peak / GIB, 3),
        "peak_reserved_estimate_bytes": reserved, "peak_reserved_estimate_gib": round(reserved / GIB, 3),
        "context_allowance_bytes": CONTEXT_ALLOWANCE, "budget_bytes": setup.budget_bytes,
        "fits": reserved <= setup.budget_bytes,
        "split_bytes": split, "split_gib": {k: round(v / GIB, 3) for k, v in split.items()},
        "peak_phase": ledger.peak_phase, "peak_op": ledger.peak_op,
        "resident_after_step_bytes": after_step, "allocations": ledger.allocations,
        "ops": ops.placement, "seconds": round(time.perf_counter() - t0, 2),
    }


def recipe_parts(name: str, model: str):
    """(build_model(config, ops), build_optimizer(model, ops), config, grad clip) of a recipe's training step: the
    recipe's model; the optimizer the trainer builds for it (Adam + Muon for a model with Muon groups, else AdamW);
    the recipe's grad clip over the presets' llm.c 1.0."""
    recipe = get_recipe(name)

    def build_opt(model, ops):
        muon = hasattr(model, "optimizer_groups")  # the records' models: Adam groups + Muon
        return build_speedrun_optimizer(model, ops) if muon else build_optimizer(model, ops)

    return recipe.model_for, build_opt, recipe.sizes()[model], recipe.defaults(on_gpu=True).get("grad_clip", 1.0)


def search_max(fits_at, candidates: list[int]) -> tuple[int | None, list[tuple[int, bool]]]:
    """The largest candidate c with fits_at(c), assuming fits is monotone (true up to a point, then false):
    binary search, then the step above the answer is checked to fail. Returns (c or None, [(c, fits)...])."""
    tried: dict[int, bool] = {}

    def probe(i):
        if candidates[i] not in tried:
            tried[candidates[i]] = fits_at(candidates[i])
        return tried[candidates[i]]

    lo, hi = -1, len(candidates)  # invariant: candidates[lo] fits (or lo = -1), candidates[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    if lo >= 0 and lo + 1 < len(candidates):
        probe(lo + 1)
    return (candidates[lo] if lo >= 0 else None), sorted(tried.items())


# ------------------------------------------------------------------------------------------ fit
ESTIMATOR_VERSION = 1  # part of the fit cache's key, beside the package's source digest and torch's version


def source_digest() -> str:
    """sha256 of every .py file of the tritonrun package: a fit cached by other code is never reused."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def fit_key(setup: Setup, backend: str) -> dict:
    """What a fit depends on: the step (recipe, model config, backend and its torch ops, tokens per step, the dense
    sequence length), the GPU it is sized for, the budget, and the code and torch that estimate it."""
    config = get_recipe(setup.recipe).sizes()[setup.model]
    return {"estimator": ESTIMATOR_VERSION, "torch": torch.__version__, "source": source_digest(),
            "recipe": setup.recipe, "model": config.to_dict(), "backend": backend,
            "torch_ops": setup.torch_ops if backend == "triton" else "",
            "total_batch_tokens": setup.total_batch_tokens, "seq_len": None if setup.packed else setup.seq_len,
            "target": [setup.target.name, setup.target.arch, setup.target.sm_count], "budget_bytes": setup.budget_bytes}


def fit(setup: Setup, backend: str, cache_dir=None, estimate_fn=None, use_cache: bool = True) -> dict:
    """The largest micro-batch (dense recipes: a divisor of total_batch_tokens / seq_len) or packed length (packed
    recipes: a power of two up to the model's context dividing total_batch_tokens) whose estimated reserved peak
    fits setup.budget_bytes, by search_max over the estimate (bench/memory.py --max searches alike).

    Returns {"micro_batch", "seq_len", "reserved_gib" (the pick's estimate), "budget_gib", "tried" [[value, fits]],
    "searched": "micro_batch" | "seq_len", "cached", "seconds"}, with micro_batch None when nothing fits. The
    answer is kept in cache_dir (default $TRITONRUN_CACHE/memory) under a hash of fit_key: a later run of the same
    step on the same code answers at once (use_cache False: neither read nor written, as bench/memory.py --max
    wants). estimate_fn stands in for estimate (bench/memory.py's printing one, tests)."""
    import hashlib
    import json
    from pathlib import Path

    from tritonrun.runinfo import atomic_write_json

    t0 = time.perf_counter()
    if cache_dir is None:
        from tritonrun.data.sample import default_cache_dir

        cache_dir = default_cache_dir() / "memory"
    key = json.loads(json.dumps(fit_key(setup, backend)))  # as the cache file holds it (tuples become lists)
    path = Path(cache_dir) / f"fit-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]}.json"
    try:
        cached = json.loads(path.read_text()) if use_cache else {}
        if cached.get("key") == key:
            return {**cached["fit"], "cached": True, "seconds": round(time.perf_counter() - t0, 3)}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no answer yet (or a damaged one): estimate
    run = estimate_fn or estimate
    seen: dict[tuple[int, int], dict] = {}

    def at(micro_batch: int, seq_len: int) -> dict:
        if (micro_batch, seq_len) not in seen:
            seen[micro_batch, seq_len] = run(replace(setup, seq_len=seq_len), backend, micro_batch)
        return seen[micro_batch, seq_len]

    if setup.packed:
        block = get_recipe(setup.recipe).sizes()[setup.model].block_size
        best, tried = search_max(lambda t: at(1, t)["fits"], setup.seq_lens(block))
        pick = None if best is None else (1, best)
    else:
        best, tried = search_max(lambda b: at(b, setup.seq_len)["fits"], setup.micro_batches())
        pick = None if best is None else (best, setup.seq_len)
    answer = {"micro_batch": pick and pick[0], "seq_len": pick and pick[1],
              # from the bytes, not the record's 3-decimal GiB: one rounding, where the caller prints it
              "reserved_gib": pick and round(seen[pick]["peak_reserved_estimate_bytes"] / GIB, 4),
              "budget_gib": round(setup.budget_bytes / GIB, 2), "tried": [list(t) for t in tried],
              "searched": "seq_len" if setup.packed else "micro_batch"}
    try:
        if use_cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"key": key, "fit": answer})
    except OSError:
        pass  # an unwritable cache costs the next run the estimate, nothing else
    return {**answer, "cached": False, "seconds": round(time.perf_counter() - t0, 3)}



def fit_preset(preset: str, recipe: str, model: str, seq_len: int, total_batch_tokens: int, backend: str,
               torch_ops: str = "", memory_gib: float | None = None, **kw) -> dict | None:
    """fit() for a run on a hardware preset: the largest micro-batch (dense recipes, at `seq_len`) or packed length
    (packed recipes) within `memory_gib` (default the preset's) - 1 GiB. None when the preset has no GPU or no
    memory to size by (the cpu preset, --memory-gib 0 on a card without one): the caller keeps its default."""
    memory = PRESETS[preset].memory_gib if memory_gib is None else memory_gib
    if preset not in GPUS or not memory:
        return None
    setup = Setup(preset, model, seq_len, total_batch_tokens, memory, GPUS[preset], recipe=recipe,
                  torch_ops=torch_ops)
    return fit(setup, backend, **kw)


def derived_micro_batch(preset: str, recipe: str, model: str, backend: str, torch_ops: str = "",
                        seq_len: int | None = None, memory_gib: float | None = None) -> int | None:
    """The micro-batch train_speedrun.py derives for a dense step of `recipe` on `preset` over the default
    524,288-token batch (at the default T = 1024 unless `seq_len`); cached. None when none fits, or the preset has no
    memory to size by. The benches size their runs with it."""
    from tritonrun.defaults import RUN_DEFAULTS

    found = fit_preset(preset, recipe, model, seq_len or RUN_DEFAULTS["seq_len"], RUN_DEFAULTS["total_batch_tokens"],
                       backend, torch_ops, memory_gib=memory_gib)
    return found and found["micro_batch"]


# ------------------------------------------------------------------------------------------ record #89
def record89_estimate(setup: Setup, backend: str = "triton") -> dict:
    """Peak memory of record #89's training steps (tritonrun/gpt2/model89.py + recipes/record89_optim.py) at one
    packed micro-batch of setup.seq_len tokens, under FakeTensorMode as estimate() does, in estimate()'s record:
    parameters, gradients and optimizer state stored as the record stores them (bf16 parameters, fp32 Adam moments,
    NorMuon fp32 momentum and uint16 mantissa), the extension stage's windows (the largest training ones). Three
    steps run: an odd one creates every optimizer state, then the measured even step (NorMuon only; Adam's gradients
    stay, as the record keeps them for the next step) and odd step (both optimizers). Each step runs one
    micro-batch: further ones add into the same gradients. The MLPs run bf16: --fp8 adds the e4m3 weight copies
    (11 x 2 x 3,072 x 768 bytes = 52 MB at d12) and a transient e4m3 activation (T x 3,072 bytes), not counted.
    estimate() comes here for a recipe whose memory_step is "record89" (recipes/modded_nanogpt_2026_07_17.py)."""
    from tritonrun.gpt2 import speedrun89 as s89
    from tritonrun.gpt2.model89 import RECORD89_MODELS, Record89GPT, step_inputs
    from tritonrun.gpt2.ops import get_ops, parse_op_list
    from tritonrun.recipes.record89_optim import Record89Optimizer

    t0 = time.perf_counter()
    seq_len, target, budget = setup.seq_len, setup.target, setup.budget_bytes
    ops = packed_ops(get_ops(backend, "cuda", parse_op_list(setup.torch_ops) if backend == "triton" else ()))
    schedule = s89.Schedule89()
    config = RECORD89_MODELS[setup.model]
    ledger = Ledger(granularity=CUDA_BLOCK)
    with planning_for(target), TrackingFakeMode(ledger):
        net = Record89GPT(config, ops)
        ledger.mark("parameters", list(net.parameters()) + list(net.buffers()))
        optimizer = Record89Optimizer(net, untie_step=schedule.untie_step)
        inputs = step_inputs(schedule, schedule.total_steps - 1, seq_len, config.head_dim, "cpu")
        cu = torch.tensor([0, seq_len], dtype=torch.int32)

        def step(s: int) -> None:
            ids = torch.randint(0, config.vocab_size, (seq_len,))
            targets = torch.randint(0, config.vocab_size, (seq_len,))
            ledger.phase = "batch"
            ledger.mark("activations", [ids, targets, cu])
            ledger.phase = "forward"
            loss = net(ids, targets, cu, inputs, reduction="none").sum() / 8
            ledger.mark_live("activations", ("forward",))
            ledger.phase = "backward"
            loss.backward()
            del loss
            ledger.phase = "optimizer"
            ledger.mark("grads", [p.grad for p in net.parameters() if p.grad is not None])
            optimizer.set_step(s, 1.0, schedule.momentum_max)
            optimizer.step()
            ledger.mark("optimizer_state", optimizer_tensors(optimizer.adam) + optimizer_tensors(optimizer.normuon))
            optimizer.zero_grad()

        step(1)
        ledger.reset_peak()
        step(2)
        step(3)
        after_step = ledger.live_bytes

    peak = ledger.peak_bytes
    reserved = math.ceil(peak * (1 + FRAGMENTATION))
    split = ledger.split()
    grad_accum = max(1, setup.total_batch_tokens // seq_len)
    return {"recipe": setup.recipe, "preset": setup.preset, "backend": backend, "micro_batch": 1, "seq_len": seq_len,
            "model": setup.model, "grad_accum": grad_accum, "micro_batches_simulated": 1,
            "peak_bytes": peak, "peak_gib": round(peak / GIB, 3), "peak_reserved_estimate_bytes": reserved,
            "peak_reserved_estimate_gib": round(reserved / GIB, 3), "context_allowance_bytes": CONTEXT_ALLOWANCE,
            "budget_bytes": budget, "fits": reserved <= budget, "split_bytes": split,
            "split_gib": {k: round(v / GIB, 3) for k, v in split.items()},
            "peak_phase": ledger.peak_phase, "peak_op": ledger.peak_op, "resident_after_step_bytes": after_step,
            "allocations": ledger.allocations, "ops": ops.placement, "seconds": round(time.perf_counter() - t0, 2),
            "dtype": "the record's storage: bf16 parameters, fp32 scalars (no autocast)",
            "step": ("record #89's: one packed sequence of seq_len tokens per micro-batch at the extension's windows, "
                     "forward + backward of the summed MTP / prefix loss / 8, NorMuon on the banks (fp32 momentum and "
                     "uint16 mantissa = optimizer_state), cautious Adam on odd steps (its gradients kept over the even "
                     "step), zero_grad; steps 2 and 3 measured after step 1 created every state")}


# recipes whose step estimate() cannot build from model_for and the generic optimizers: Recipe.memory_step names them
ESTIMATORS = {"record89": record89_estimate}
