"""Fused AdamW: one kernel launch updates every parameter tensor; global-norm clipping costs one read of the grads.

What it computes (torch.optim.AdamW, decoupled weight decay), per element, with s = the clip scale (1 when
`clip_grad_norm_` was not called before this step) and t = this tensor's step count:
    g  = s · grad
    p  = p · (1 − lr·wd)
    m  = m + (1 − β1)·(g − m)                      (torch's lerp for 1 − β1 < 0.5)
    v  = β2·v + ((1 − β2)·g)·g
    p  = p + ((−lr / (1 − β1^t)) · m) / (√v / √(1 − β2^t) + ε)
lr and wd are per param group; lr may be a float or a 0-d tensor and is read by the kernel from memory, so a new
lr never recompiles. √ and ÷ are the IEEE-rounded ones (tl.sqrt_rn, tl.div_rn), as in torch.

Layout. The optimizer state lives in flat fp32 buffers, one set per (device, param dtype) "bucket": exp_avg,
exp_avg_sq and, for bf16/fp16 params, fp32 master weights. Each tensor's slice starts on a 16-element boundary.
Params and grads are NOT copied into flat buffers: every step a small pointer table (param data_ptr, grad data_ptr
per tensor; 16 B per tensor) is uploaded, and the kernel reads each tensor in place. That keeps `param.data` the
model's own storage (nn.Module, load_state_dict, torch.compile all see ordinary parameters) and costs no gather
pass over the grads (a flat grad buffer filled by torch._foreach_copy_ / torch.cat would read and write every grad
once more: +8 B/param for fp32). A static chunk table maps each program to (tensor, BLOCK-sized chunk); a program
whose chunk is whole takes an unmasked, vectorizable path, the tensor's tail chunk a masked one.

Launches per step: one `_adamw_kernel` per bucket (GPT-2: one, over all 148 tensors); with clipping, one
`_grad_sumsq_kernel` per bucket (fp32 sum of squares per program into a partial buffer) plus one single-program
`_finalize_norm_kernel` that sums the partials in a fixed order (deterministic), and writes the norm and the clip
coefficient min(max_norm / (norm + 1e-6), 1) to device memory; the update kernel multiplies the grads by it as it
loads them. Nothing synchronizes with the host.

Bytes moved per step, per parameter (see `bytes_moved`):
    fp32 params:            update reads p, g, m, v (16) and writes p, m, v (12) = 28 B; clipping +4 B (read g)
    bf16 params + masters:  reads master, g(2), m, v (14), writes master, m, v, p(2) (14) = 28 B; clipping +2 B
    bf16 params, no master: reads p(2), g(2), m, v (12), writes p(2), m, v (10) = 22 B; clipping +2 B
GPT-2 124M (124,475,904 params with the padded vocab), fp32 params with clipping: 32 B/param = 3.98 GB per step
(~7.9 ms at the RTX 4070's 504 GB/s). torch's clip_grad_norm_ (read g; read+write g) + fused AdamW (28 B) moves
40 B/param. The tables add 8 B per BLOCK elements (< 0.1 %). FLOPs: ~15 per element (memory bound).

bf16 params are read and written as raw 16-bit patterns with integer ops: widening is exact (bits << 16), and
narrowing is round-to-nearest-even (the same as torch's .to(torch.bfloat16)) or, with `stochastic_rounding=True`,
stochastic (add 16 random bits from tl.randint(seed, element index), truncate). The Triton interpreter has no
correct bf16 cast, so this path is the same on CPU and GPU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from tritonrun.kernels.target import planned as planned_target

# ------------------------------------------------------------------------------------------ configs
# Launch configs keyed by arch; elementwise and memory bound, so BLOCK only needs to be big enough to give each
# thread 8 elements (two 16-B vectors per fp32 stream). GPU entries are untuned starting points (compiled for sm_89:
# fp32 path 76 registers, no spills, no shared memory); bench/ should settle them. The interpreter runs programs one after another, each op
# vectorized by numpy over the whole block (masked lanes included) at ~10 ms of fixed cost per program: there BLOCK
# is the bucket's size / 8 rounded up to a power of two, clamped to [1024, the BLOCK below].
CONFIGS: dict[str, dict[str, int]] = {
    "interpreter": {"BLOCK": 65536, "num_warps": 1},
    "sm_80": {"BLOCK": 2048, "num_warps": 8},
    "sm_89": {"BLOCK": 2048, "num_warps": 8},
    "sm_90": {"BLOCK": 2048, "num_warps": 8},
    "default": {"BLOCK": 2048, "num_warps": 8},
}
FINALIZE_BLOCK = 1024  # lanes of the single program that sums the norm partials
FLAT_ALIGN = 16  # elements: every tensor's slice of the flat state starts 64-B aligned

KIND_FP32, KIND_BF16, KIND_FP16 = 0, 1, 2
_KINDS = {torch.float32: KIND_FP32, torch.bfloat16: KIND_BF16, torch.float16: KIND_FP16}
# Per-group hyperparameters in the per-step scalar table (fp32), in this order.
_HYPER = ("lr", "weight_decay", "beta1", "one_minus_beta1", "beta2", "one_minus_beta2", "eps")
N_HYPER = len(_HYPER)


def _arch(device: torch.device) -> str:
    target = planned_target()
    if target is not None:  # a memory estimate under FakeTensorMode (tritonrun/kernels/target.py)
        return target.arch
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpreter"
    if device.type != "cuda":
        raise RuntimeError(f"FusedAdamW runs its Triton kernels on CUDA, or on CPU tensors through the interpreter: "
                           f"set TRITON_INTERPRET=1 before importing tritonrun/kernels/ to use it on {device}")
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def launch_config(device: torch.device, n_elements: int) -> dict[str, int]:
    arch = _arch(device)
    cfg = dict(CONFIGS.get(arch, CONFIGS["default"]))
    if arch == "interpreter":
        cfg["BLOCK"] = min(cfg["BLOCK"], max(1024, triton.next_power_of_2(-(-n_elements // 8))))
    return cfg


def bytes_moved(n_params: int, param_dtype: torch.dtype = torch.float32, master_weights: bool = True,
                clip: bool = True) -> int:
    """HBM bytes one optimizer step moves over `n_params` parameters (the formula in the module docstring)."""
    pb = torch.empty((), dtype=param_dtype).element_size()
    gb = pb  # grads have the param's dtype
    master = master_weights and param_dtype != torch.float32
    reads = gb + 4 + 4 + (4 if master else pb)  # grad, exp_avg, exp_avg_sq, master or param
    writes = 4 + 4 + (4 + pb if master else pb)  # exp_avg, exp_avg_sq, master and/or param
    return n_params * (reads + writes + (gb if clip else 0))


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def _load_f32(ptr_int, offs, mask, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    """Load elements `offs` of the tensor at raw address `ptr_int` (int64) as fp32 (undefined where masked off)."""
    if KIND == 1:  # bf16: widen the 16-bit pattern exactly
        ptr = ptr_int.to(tl.pointer_type(tl.uint16))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        bits = tl.load(ptr + offs, mask=mask).to(tl.uint32) << 16
        x = bits.to(tl.float32, bitcast=True)
    elif KIND == 2:
        ptr = ptr_int.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        x = tl.load(ptr + offs, mask=mask).to(tl.float32)
    else:
        ptr = ptr_int.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        x = tl.load(ptr + offs, mask=mask)
    return x


@triton.jit
def _bf16_bits(x, seed, rand_offs, STOCHASTIC: tl.constexpr):
    """fp32 -> bf16 bit pattern (uint16): round to nearest even, or stochastically (P(up) = the dropped fraction)."""
    u = x.to(tl.uint32, bitcast=True)
    if STOCHASTIC:
        r = tl.randint(seed, rand_offs) & 0xFFFF
    else:
        r = ((u >> 16) & 1) + 0x7FFF
    out = (u + r) >> 16
    out = tl.where(x != x, (u >> 16) | 0x40, out)  # NaN stays a (quiet) NaN
    return out.to(tl.uint16)


@triton.jit
def _store_param(ptr_int, offs, mask, x, seed, rand_offs, KIND: tl.constexpr, STOCHASTIC: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """Store fp32 `x` into the param at raw address `ptr_int` in its storage dtype (the only cast)."""
    if KIND == 1:
        ptr = ptr_int.to(tl.pointer_type(tl.uint16))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        tl.store(ptr + offs, _bf16_bits(x, seed, rand_offs, STOCHASTIC), mask=mask)
    elif KIND == 2:
        ptr = ptr_int.to(tl.pointer_type(tl.float16))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        tl.store(ptr + offs, x.to(tl.float16), mask=mask)
    else:
        ptr = ptr_int.to(tl.pointer_type(tl.float32))
        if ALIGNED:
            ptr = tl.multiple_of(ptr, 16)
        tl.store(ptr + offs, x, mask=mask)


@triton.jit
def _adamw_block(p_int, g_int, start, numel, flat, exp_avg, exp_avg_sq, master,
                 lr, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, bc1, bc2_sqrt, scale, seed,
                 KIND: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                 ALIGNED: tl.constexpr, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """Elements [start, start + BLOCK) of one tensor; `flat` is start's index in the flat state buffers."""
    offs = tl.arange(0, BLOCK)
    if MASKED:  # the tensor's tail chunk
        mask = offs < numel - start
    else:
        mask = None
    elem = start + offs  # index within the tensor
    state = flat + offs  # index within the flat fp32 state (flat is a multiple of 16)

    g = _load_f32(g_int, elem, mask, KIND, ALIGNED) * scale
    m = tl.load(exp_avg + state, mask=mask)  # masked-off lanes: computed, never stored
    v = tl.load(exp_avg_sq + state, mask=mask)
    if HAS_MASTER:
        p = tl.load(master + state, mask=mask)
    else:
        p = _load_f32(p_int, elem, mask, KIND, ALIGNED)

    p = p * (1.0 - lr * wd)  # decoupled weight decay
    if one_minus_beta1 < 0.5:  # torch.lerp's two formulas
        m = m + one_minus_beta1 * (g - m)
    else:
        m = g - (g - m) * beta1
    v = v * beta2 + (one_minus_beta2 * g) * g
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    neg_step_size = -tl.div_rn(lr, bc1)
    p = p + tl.div_rn(neg_step_size * m, denom)

    tl.store(exp_avg + state, m, mask=mask)
    tl.store(exp_avg_sq + state, v, mask=mask)
    if HAS_MASTER:
        tl.store(master + state, p, mask=mask)
    _store_param(p_int, elem, mask, p, seed, state, KIND, STOCHASTIC, ALIGNED)


@triton.jit(do_not_specialize=["seed"])
def _adamw_kernel(
    step_ptrs,     # (2, n_tensors) int64, uploaded every step: [0] param data_ptr, [1] grad data_ptr (0: no grad)
    step_scalars,  # fp32, uploaded every step: (n_tensors, 2) [1 - β1^t, sqrt(1 - β2^t)], then (n_groups, 7) _HYPER
    tensor_info,   # (n_tensors, 3) int64, static: numel, offset in the flat state / 16, param group
    chunk_info,    # (n_chunks, 2) int32, static: tensor, chunk index within the tensor (one program each)
    exp_avg,       # (n_flat,) fp32
    exp_avg_sq,    # (n_flat,) fp32
    master,        # (n_flat,) fp32 master weights (bf16/fp16 params), or any fp32 tensor when HAS_MASTER is off
    grad_scale,    # (1,) fp32: clip coefficient from _finalize_norm_kernel, or 1.0
    n_tensors,
    seed,          # int64 Philox seed for stochastic rounding, new every step (not specialized: no recompile)
    KIND: tl.constexpr, HAS_MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Bytes: see bytes_moved(); 28 B per fp32 param element + 24 B of tables per program.
    pid = tl.program_id(0)
    t = tl.load(chunk_info + 2 * pid)
    start = tl.load(chunk_info + 2 * pid + 1).to(tl.int64) * BLOCK
    g_int = tl.load(step_ptrs + n_tensors + t)
    if g_int != 0:  # a param whose grad is None is left alone, as in torch
        p_int = tl.load(step_ptrs + t)
        numel = tl.load(tensor_info + 3 * t)
        flat = tl.load(tensor_info + 3 * t + 1) * 16 + start  # * 16: the compiler sees the alignment
        grp = tl.load(tensor_info + 3 * t + 2)
        bc1 = tl.load(step_scalars + 2 * t)
        bc2_sqrt = tl.load(step_scalars + 2 * t + 1)
        hyper = step_scalars + 2 * n_tensors + 7 * grp
        lr = tl.load(hyper)
        wd = tl.load(hyper + 1)
        beta1 = tl.load(hyper + 2)
        one_minus_beta1 = tl.load(hyper + 3)
        beta2 = tl.load(hyper + 4)
        one_minus_beta2 = tl.load(hyper + 5)
        eps = tl.load(hyper + 6)
        scale = tl.load(grad_scale)
        if start + BLOCK <= numel:
            _adamw_block(p_int, g_int, start, numel, flat, exp_avg, exp_avg_sq, master, lr, wd, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, eps, bc1, bc2_sqrt, scale, seed,
                         KIND, HAS_MASTER, STOCHASTIC, ALIGNED, False, BLOCK)
        else:
            _adamw_block(p_int, g_int, start, numel, flat, exp_avg, exp_avg_sq, master, lr, wd, beta1,
                         one_minus_beta1, beta2, one_minus_beta2, eps, bc1, bc2_sqrt, scale, seed,
                         KIND, HAS_MASTER, STOCHASTIC, ALIGNED, True, BLOCK)


@triton.jit
def _grad_sumsq_kernel(
    step_ptrs,    # (2, n_tensors) int64: row 1 holds the grad data pointers (0: no grad)
    tensor_info,  # (n_tensors, 3) int64: numel, flat offset / 16, group
    chunk_info,   # (n_chunks, 2) int32: tensor, chunk index
    partials,     # (n_chunks,) fp32 out: sum of g^2 over this program's chunk
    n_tensors,
    KIND: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    # Bytes: reads each grad once (4 B/elem fp32, 2 B bf16), writes 4 B per program.
    pid = tl.program_id(0)
    t = tl.load(chunk_info + 2 * pid)
    start = tl.load(chunk_info + 2 * pid + 1).to(tl.int64) * BLOCK
    g_int = tl.load(step_ptrs + n_tensors + t)
    if g_int != 0:
        numel = tl.load(tensor_info + 3 * t)
        offs = start + tl.arange(0, BLOCK)
        if start + BLOCK <= numel:
            g = _load_f32(g_int, offs, None, KIND, ALIGNED)
        else:
            g = _load_f32(g_int, offs, offs < numel, KIND, ALIGNED)
            g = tl.where(offs < numel, g, 0.0)
        tl.store(partials + pid, tl.sum(g * g))
    else:
        tl.store(partials + pid, 0.0)


@triton.jit
def _finalize_norm_kernel(
    partials,    # (n_partials,) fp32
    n_partials,
    out,         # (2,) fp32 out: [clip coefficient, total norm] (the coefficient first: a 16-B aligned pointer)
    max_norm,
    BLOCK: tl.constexpr,
):
    # One program; the partials are summed in a fixed order, so the norm is bitwise reproducible.
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(0, n_partials, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc += tl.load(partials + offs, mask=offs < n_partials, other=0.0)
    norm = tl.sqrt_rn(tl.sum(acc))
    coef = tl.minimum(tl.div_rn(max_norm, norm + 1e-6), 1.0)  # torch.nn.utils.clip_grad_norm_'s formula
    tl.store(out, coef)
    tl.store(out + 1, norm)


# ------------------------------------------------------------------------------------------ host side
@dataclass
class _Bucket:
    """Every param of one (device, dtype): its flat fp32 state and the static tables the kernels read."""
    device: torch.device
    dtype: torch.dtype
    params: list[torch.Tensor]
    group_idx: np.ndarray      # (n_tensors,) int64 param group of each tensor
    flat_offsets: list[int]    # start of each tensor in the flat state
    steps: np.ndarray          # (n_tensors,) int64 AdamW step count per tensor (torch keeps one per param too)
    exp_avg: torch.Tensor      # (n_flat,) fp32
    exp_avg_sq: torch.Tensor   # (n_flat,) fp32
    master: torch.Tensor | None  # (n_flat,) fp32 for bf16/fp16 params with master weights
    tensor_info: torch.Tensor  # (n_tensors, 3) int64 on device
    chunk_info: torch.Tensor   # (n_chunks, 2) int32 on device
    block: int
    num_warps: int
    one: torch.Tensor          # (1,) fp32 1.0: the grad scale when no clip is pending
    checked_ptrs: list[int] | None = None  # param data_ptrs last validated against the layout

    @property
    def n_chunks(self) -> int:
        return self.chunk_info.shape[0]

    def view(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        p = self.params[i]
        off = self.flat_offsets[i]
        return flat[off:off + p.numel()].view(p.shape)


class FusedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, as torch.optim.AdamW) with one Triton launch for all params.

    Param groups carry lr (float or 0-d tensor, changeable every step), betas, eps and weight_decay, as in torch.
    Beyond torch's arguments: `master_weights` keeps fp32 masters for bf16/fp16 params (the param is written as
    the rounded master); `stochastic_rounding` rounds bf16 param writes stochastically, seeded by `seed` and the
    step. `clip_grad_norm_(max_norm)` computes the global grad norm on the device and makes the next `step()`
    apply the clip coefficient while it loads the grads (the .grad tensors themselves are left unscaled).
    `state_dict()` uses torch.optim.AdamW's format (+ "master"); loading one with an empty "state" resets to no
    steps. Params must keep their dtype, device and contiguity after the first step; build the optimizer after
    `model.to(...)`.
    """

    def __init__(self, params, lr: float | torch.Tensor = 1e-3, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, master_weights: bool = True, stochastic_rounding: bool = False,
                 seed: int = 0):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("lr as a tensor must have one element")
        if not 0.0 <= float(lr):
            raise ValueError(f"invalid learning rate {float(lr)}")
        if not 0.0 <= eps:
            raise ValueError(f"invalid epsilon {eps}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if not 0.0 <= weight_decay:
            raise ValueError(f"invalid weight_decay {weight_decay}")
        if not 0 <= seed < 2**31 - 1:
            raise ValueError(f"seed must be in [0, 2**31 - 1), got {seed}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.master_weights = master_weights
        self.stochastic_rounding = stochastic_rounding
        self.seed = seed
        self._buckets: list[_Bucket] | None = None  # built at the first step: None means "no steps yet"
        self._pending_scale: torch.Tensor | None = None  # clip coefficient for the next step, on the device

    # ---------------------------------------------------------------------------------- layout
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_buckets", None) is not None:
            raise RuntimeError("FusedAdamW: add_param_group after the first step is not supported "
                               "(the flat state is already packed); add all groups before stepping")
        super().add_param_group(param_group)

    def _build(self) -> list[_Bucket]:
        """Pack every param into per-(device, dtype) buckets with zeroed state and masters = params."""
        by_key: dict[tuple, list[tuple[int, torch.Tensor]]] = {}
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.dtype not in _KINDS:
                    raise TypeError(f"FusedAdamW supports fp32, bf16 and fp16 params, got {p.dtype}")
                if not p.is_contiguous():
                    raise ValueError("FusedAdamW needs contiguous params (it reads each one as a flat array)")
                by_key.setdefault((p.device, p.dtype), []).append((gi, p))
        buckets = []
        for (device, dtype), entries in by_key.items():
            numels = [p.numel() for _, p in entries]
            cfg = launch_config(device, sum(numels))
            block = cfg["BLOCK"]
            offsets, n_flat = [], 0
            for n in numels:
                offsets.append(n_flat)
                n_flat += -(-n // FLAT_ALIGN) * FLAT_ALIGN
            n_flat = max(n_flat, FLAT_ALIGN)
            info = torch.tensor([[n, off // FLAT_ALIGN, gi] for n, off, (gi, _) in zip(numels, offsets, entries)],
                                dtype=torch.int64).reshape(-1, 3)
            counts = np.array([-(-n // block) for n in numels], dtype=np.int64)
            tensor_of_chunk = np.repeat(np.arange(len(numels)), counts)
            first = np.cumsum(counts) - counts
            chunk_in_tensor = np.arange(counts.sum()) - np.repeat(first, counts)
            if counts.sum() and chunk_in_tensor.max() >= 2**31:
                raise ValueError("a tensor too large for the int32 chunk table")
            chunks = torch.from_numpy(np.stack([tensor_of_chunk, chunk_in_tensor], 1).astype(np.int32))
            params = [p for _, p in entries]
            master = None
            if dtype != torch.float32 and self.master_weights:
                master = torch.zeros(n_flat, dtype=torch.float32, device=device)
            bucket = _Bucket(
                device=device, dtype=dtype, params=params,
                group_idx=np.array([gi for gi, _ in entries], dtype=np.int64),
                flat_offsets=offsets, steps=np.zeros(len(params), dtype=np.int64),
                exp_avg=torch.zeros(n_flat, dtype=torch.float32, device=device),
                exp_avg_sq=torch.zeros(n_flat, dtype=torch.float32, device=device),
                master=master, tensor_info=info.to(device), chunk_info=chunks.reshape(-1, 2).to(device),
                block=block, num_warps=cfg["num_warps"],
                one=torch.ones(1, dtype=torch.float32, device=device),
            )
            if master is not None:
                for i, p in enumerate(params):
                    bucket.view(master, i).copy_(p.detach())
            buckets.append(bucket)
        return buckets

    def _buckets_or_build(self) -> list[_Bucket]:
        if self._buckets is None:
            self._buckets = self._build()
        return self._buckets

    def _pointer_table(self, bucket: _Bucket, count_steps: bool) -> tuple[np.ndarray, list, bool]:
        """Host int64 [param ptrs..., grad ptrs...] (both 0 where grad is None); advances step counts if asked."""
        params = bucket.params
        if any(is_fake(p) for p in params):  # FakeTensorMode (a memory estimate): no addresses, nothing launched
            return np.zeros(2 * len(params), dtype=np.int64), [], True
        p_ptrs = [p.data_ptr() for p in params]
        if p_ptrs != bucket.checked_ptrs:  # a param's storage moved: check it still fits the packed layout
            for p in params:
                if p.dtype != bucket.dtype or p.device != bucket.device or not p.is_contiguous():
                    raise RuntimeError("FusedAdamW: a param changed dtype, device or layout after the first "
                                       "step; build the optimizer after moving/casting the model")
            bucket.checked_ptrs = p_ptrs
        grads = [p.grad for p in params]
        keep = []  # contiguous copies of odd-strided grads stay alive until the launch is queued
        for i, g in enumerate(grads):
            if g is None:
                continue
            if g.dtype != bucket.dtype or g.is_sparse:
                raise RuntimeError(f"FusedAdamW: a grad of dtype {g.dtype}, layout {g.layout} for a {bucket.dtype} "
                                   "param; grads must be dense and in the param's dtype")
            if not g.is_contiguous():
                grads[i] = g = g.contiguous()
                keep.append(g)
        has_grad = np.array([g is not None for g in grads], dtype=bool)
        ptrs = np.array(p_ptrs + [0 if g is None else g.data_ptr() for g in grads], dtype=np.int64)
        ptrs[:len(params)][~has_grad] = 0  # the kernel reads neither pointer of a skipped tensor
        if count_steps:
            bucket.steps[has_grad] += 1
        aligned = bool(np.all(ptrs % 16 == 0))
        return ptrs, keep, aligned

    # ---------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for bucket in self._buckets_or_build():
            self._update(bucket)
        self._pending_scale = None
        return loss

    def _update(self, bucket: _Bucket) -> None:
        k = len(bucket.params)
        ptrs, keep, aligned = self._pointer_table(bucket, count_steps=True)
        n_groups = len(self.param_groups)
        n_floats = 2 * k + N_HYPER * n_groups
        host = np.zeros(2 * k + (n_floats + 1) // 2, dtype=np.int64)  # one upload: pointers, then fp32 scalars
        host[:2 * k] = ptrs
        floats = host[2 * k:].view(np.float32)
        # Bias corrections 1 - β1^t and sqrt(1 - β2^t) per tensor: in float64 with Python's ** as torch does, once
        # per distinct (group, step) pair (usually one per group), then rounded to fp32.
        steps = np.maximum(bucket.steps, 1)
        span = int(steps.max()) + 1
        pairs, inverse = np.unique(bucket.group_idx * span + steps, return_inverse=True)
        bc = np.empty((len(pairs), 2))
        for j, pair in enumerate(pairs.tolist()):
            gi, t = divmod(pair, span)
            beta1, beta2 = map(float, self.param_groups[gi]["betas"])
            bc[j] = 1 - beta1 ** t, (1 - beta2 ** t) ** 0.5
        floats[:2 * k] = bc[inverse.reshape(-1)].reshape(-1)
        device_lrs = []
        for gi, group in enumerate(self.param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor) and lr.device.type != "cpu":
                device_lrs.append((gi, lr))  # copied on the device below: no host sync
                lr = 0.0
            beta1, beta2 = map(float, group["betas"])
            floats[2 * k + N_HYPER * gi: 2 * k + N_HYPER * (gi + 1)] = (
                float(lr), float(group["weight_decay"]), beta1, 1 - beta1, beta2, 1 - beta2, float(group["eps"]))
        table = torch.from_numpy(host).to(bucket.device, non_blocking=True)
        step_ptrs = table[:2 * k]
        step_scalars = table[2 * k:].view(torch.float32)
        for gi, lr in device_lrs:
            step_scalars[2 * k + N_HYPER * gi].copy_(lr.reshape(()).to(bucket.device))
        scale = self._pending_scale
        if scale is None or scale.device != bucket.device:
            scale = bucket.one
        # Philox seed: (seed + 1) in the high word keeps it an int64 (>= 2**32) at every step, the step count in
        # the low word makes each step's random bits new; it is data, not a specialization (do_not_specialize).
        seed = ((self.seed + 1) << 32) | (int(bucket.steps.max()) & 0xFFFFFFFF)
        master = bucket.master if bucket.master is not None else bucket.exp_avg
        if bucket.n_chunks and not is_fake(master):  # under FakeTensorMode: the buffers above, no launch
            _adamw_kernel[(bucket.n_chunks,)](
                step_ptrs, step_scalars, bucket.tensor_info, bucket.chunk_info,
                bucket.exp_avg, bucket.exp_avg_sq, master, scale, k, seed,
                KIND=_KINDS[bucket.dtype], HAS_MASTER=bucket.master is not None,
                STOCHASTIC=self.stochastic_rounding and bucket.dtype == torch.bfloat16,
                ALIGNED=aligned, BLOCK=bucket.block, num_warps=bucket.num_warps,
            )
        del keep

    # ---------------------------------------------------------------------------------- clipping
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0,
                        error_if_nonfinite: bool = False) -> torch.Tensor:
        """Global L2 norm of all grads (fp32, deterministic two-pass), returned as a 0-d device tensor.

        The clip coefficient min(max_norm / (norm + 1e-6), 1) stays on the device and the next `step()` scales
        the grads by it as it loads them, so clipping costs one read of the grads and no host sync. Unlike
        torch.nn.utils.clip_grad_norm_, the .grad tensors are not modified; `zero_grad` cancels a pending clip.
        A non-finite norm is returned as is (the update then follows torch: grads times a NaN/0 coefficient).
        """
        if float(norm_type) != 2.0:
            raise NotImplementedError("FusedAdamW.clip_grad_norm_ supports norm_type=2 only")
        buckets = self._buckets_or_build()
        devices = {b.device for b in buckets}
        if len(devices) != 1:
            raise RuntimeError(f"FusedAdamW.clip_grad_norm_ needs all params on one device, got {devices}")
        device = devices.pop()
        partials = torch.empty(max(1, sum(b.n_chunks for b in buckets)), dtype=torch.float32, device=device)
        partials[:1].zero_()  # covers the no-chunk case
        base = 0
        for b in buckets:
            ptrs, keep, aligned = self._pointer_table(b, count_steps=False)
            table = torch.from_numpy(ptrs).to(device, non_blocking=True)
            if b.n_chunks and not is_fake(partials):
                _grad_sumsq_kernel[(b.n_chunks,)](
                    table, b.tensor_info, b.chunk_info, partials[base:], len(b.params),
                    KIND=_KINDS[b.dtype], ALIGNED=aligned, BLOCK=b.block, num_warps=b.num_warps)
            base += b.n_chunks
            del keep
        out = torch.empty(2, dtype=torch.float32, device=device)
        if not is_fake(out):
            _finalize_norm_kernel[(1,)](partials, partials.numel(), out, float(max_norm), BLOCK=FINALIZE_BLOCK)
        norm = out[1]
        if error_if_nonfinite and not torch.isfinite(norm):
            raise RuntimeError(f"the total norm of gradients is non-finite ({norm.item()}), so it cannot be clipped")
        self._pending_scale = out[:1]  # same alignment as bucket.one: clipping or not, one compiled kernel
        return norm

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._pending_scale = None
        super().zero_grad(set_to_none=set_to_none)

    # ---------------------------------------------------------------------------------- state
    def _param_index(self) -> list[tuple[torch.Tensor, int]]:
        """(param, group) in torch's state_dict order: groups in order, params in order."""
        return [(p, gi) for gi, g in enumerate(self.param_groups) for p in g["params"]]

    def state_dict(self) -> dict:
        """torch.optim.AdamW's format: per-param {step, exp_avg, exp_avg_sq} (+ "master" for bf16/fp16 params).

        The tensors are views of the live flat buffers (torch's optimizers also hand out their live state):
        deepcopy or save them before stepping again. A fresh optimizer gives {"state": {}, ...}.
        """
        index = {id(p): i for i, (p, _) in enumerate(self._param_index())}
        groups = []
        for g in self.param_groups:
            packed = {k: v for k, v in g.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in g["params"]]
            groups.append(packed)
        state = {}
        for b in self._buckets or []:
            for i, p in enumerate(b.params):
                if b.steps[i] == 0:
                    continue
                entry = {"step": torch.tensor(float(b.steps[i]), dtype=torch.float32),  # as torch
                         "exp_avg": b.view(b.exp_avg, i), "exp_avg_sq": b.view(b.exp_avg_sq, i)}
                if b.master is not None:
                    entry["master"] = b.view(b.master, i)
                state[index[id(p)]] = entry
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a state_dict from FusedAdamW (or torch.optim.AdamW). An empty "state" resets to "no steps yet":
        the next step starts from zero moments, step 1, and masters taken from the params at that time."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for g, sg in zip(self.param_groups, saved_groups):
            if len(g["params"]) != len(sg["params"]):
                raise ValueError("loaded state dict contains a parameter group that doesn't match the size "
                                 "of the optimizer's group")
        for g, sg in zip(self.param_groups, saved_groups):
            for key, value in sg.items():
                if key != "params":
                    g[key] = value.clone() if isinstance(value, torch.Tensor) else value
        self._pending_scale = None
        saved_state = state_dict["state"]
        if not saved_state:
            self._buckets = None  # frees the flat buffers; rebuilt (zeros, masters from params) at the next step
            return
        self._buckets = self._build()
        saved_ids = [pid for sg in saved_groups for pid in sg["params"]]
        where = {id(p): (b, i) for b in self._buckets for i, p in enumerate(b.params)}
        with torch.no_grad():
            for (p, _), pid in zip(self._param_index(), saved_ids):
                entry = saved_state.get(pid)
                if entry is None:
                    continue
                b, i = where[id(p)]
                b.steps[i] = int(float(entry["step"]))
                b.view(b.exp_avg, i).copy_(entry["exp_avg"].reshape(p.shape))
                b.view(b.exp_avg_sq, i).copy_(entry["exp_avg_sq"].reshape(p.shape))
                if b.master is not None and "master" in entry:
                    b.view(b.master, i).copy_(entry["master"].reshape(p.shape))


# ------------------------------------------------------------------------------------------ reference
def reference_adamw_step(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                         step: int, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                         grad_scale: float | torch.Tensor = 1.0, master: torch.Tensor | None = None) -> None:
    """One AdamW step on one tensor in plain PyTorch, in place, with the kernel's math op for op (fp32 state).

    `step` is the step count after this step (1 for the first). With `master` (fp32), the master is updated and
    `param` (bf16/fp16) receives master rounded to nearest.
    """
    beta1, beta2 = betas
    g = grad.float() * grad_scale
    p = master if master is not None else param.float()
    p.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    p.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))
    if p is not param:
        param.copy_(p)
