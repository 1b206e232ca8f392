"""The ops seam: every op the model and trainer need that a Triton kernel may replace.

`get_ops("torch")` gives the best plain PyTorch (SDPA, F.layer_norm, tanh-GELU, F.cross_entropy,
fused AdamW on CUDA). `get_ops("triton")` takes each op from `kernels/<file>.py` when that kernel has
landed and falls back to the torch op otherwise; `get_ops("triton", torch_ops=("attention",))` keeps the
named ops in torch (the trainer's --torch-ops: a mix per op, where a kernel loses on some GPU).
`Ops.placement` records which one runs, and the trainer prints it at startup.

Signatures (the contract a kernel must match; the speedrun ops are issue 26's CONTRACT26.md):
  attention(q, k, v) -> o                         q, k, v, o: (B, H, T, D), causal, scale 1/sqrt(D)
  window_attention(q, k, v, cu_seqlens, window) -> o   as attention, but query i attends key j iff both lie in
        the same document of cu_seqlens (int32 (n_docs + 1,), 0 first, T last, shared by the batch rows) and
        0 <= i - j < window (a Python int >= 1: the speedrun's window schedule changes it every few steps)
  layer_norm(x, weight, bias, eps) -> y           normalizes over the last dim
  add_layer_norm(x, residual, weight, bias, eps) -> (layer_norm(x + residual), x + residual)
  gelu(x) -> y                                    tanh approximation
  linear_cross_entropy(h, weight, targets, ignore_index, vocab_size, softcap=None) -> mean loss
        h (N, C), weight (V_padded, C), targets (N,) int64; only the first vocab_size rows of
        weight are classes (padded rows never receive loss). softcap: logits z = softcap * tanh(z / softcap)
        before the fp32 softmax when set (the speedrun model's 30), else plain logits.
  optimizer(param_groups, lr, betas, eps) -> torch.optim.Optimizer (AdamW; per-group weight_decay)
  rms_norm(x, eps) -> y                           y = x / sqrt(mean(x^2, -1) + eps), no weight
  add_rms_norm(x, residual, eps) -> (rms_norm(x + residual, eps), x + residual)
  mix_rms_norm(x, x0, lambdas, eps) -> (rms_norm(s, eps), s), s = lambdas[0] * x + lambdas[1] * x0 (the speedrun
        block's x0 mix, lambdas a (2,) tensor; grads for x, x0 and lambdas)
  relu2(x) -> y                                   relu(x)^2
  qk_norm_rope(q, k, cos, sin, eps) -> (q2, k2)   q, k: (B, T, H, D) (last dim contiguous); cos, sin: (T, D/2)
        fp32. Per head vector: rms_norm over D, then rotary on halves x1 = x[..., :D/2], x2 = x[..., D/2:]:
        y1 = x1 cos + x2 sin, y2 = -x1 sin + x2 cos; in the input dtype, returned as (B, H, T, D)
        (the kernel writes them contiguous in that order; the torch op returns transposed views).
  Record #89's (RECORD89_OPS; window_attention there takes scale=, the record's 0.1-based softmax scale):
  bigram_embed(x, table, signs) -> (..., D)       the bigram hash embedding with the sign trick, x (T,) or (B, T)
        token ids (tritonrun/kernels/bigram.py)
  relu2_mlp(x, W1, W2, scales=None) -> y          relu(x W1^T)^2 W2^T, W1 (H, C), W2 (C, H); scales: the FP8 state
        (tritonrun/kernels/mlp_relu2.Fp8MlpScales, Triton only); bf16 x: pre and post rounded to bf16
  mtp_head(h, weight, targets, mtp_weights, prefix_targets, prefix_weight) -> (N,) per-token losses of the
        training head: logits h @ weight (weight (C, V), all V columns), 23 sigmoid((l + 5) / 7.5), multi-token
        prediction over the next len(mtp_weights) targets and the prefix-token term (speedrun89.mtp_loss_reference)

GPT2_OPS, SPEEDRUN_OPS (the 2024-12-17 windowed model) and SPEEDRUN_DENSE_OPS (2024-11-10) name the ops each model
calls: the other ops' placement does not matter to a run.
"""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

# ---------------------------------------------------------------------------- torch implementations


def torch_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


# The dense (T, T) boolean mask of the eager path: T^2 bytes, plus SDPA's work over every pair. Above this T on a
# GPU it is refused (16,384: a 256 MiB mask; the rtx4070's packed 4,096-8,192 pass, an H100's 32-64K would need
# 1-4 GiB): FlexAttention under --compile, or the Triton kernel, keeps only the allowed blocks.
DENSE_WINDOW_MASK_MAX_T = 16_384


def dense_window_refusal(T: int) -> str:
    return (f"window attention in eager torch at --seq-len {T} would build a dense {T} x {T} mask "
            f"({T * T / 2**30:.2f} GiB) and score every pair on the GPU: add --compile (FlexAttention, block-sparse) "
            f"or --backend triton, or lower --seq-len to {DENSE_WINDOW_MASK_MAX_T}")


def torch_window_mask(cu_seqlens: torch.Tensor, window: int, T: int, device: torch.device):
    """The mask torch_window_attention applies, built once per forward and shared by every layer (the record builds
    one per step): under torch.compile on CUDA a FlexAttention BlockMask (block-sparse; the window is a value the
    mask closes over, so a changed window rebuilds the mask, not the kernel), elsewhere the dense (T, T) boolean
    mask for SDPA, which a GPU only gets up to DENSE_WINDOW_MASK_MAX_T (ValueError beyond: the fix named)."""
    compiling = torch.compiler.is_compiling()
    if device.type == "cuda" and not compiling and T > DENSE_WINDOW_MASK_MAX_T:
        raise ValueError(dense_window_refusal(T))
    pos = torch.arange(T, dtype=cu_seqlens.dtype, device=device)
    doc = torch.searchsorted(cu_seqlens, pos, right=True)  # document id per position
    if device.type == "cuda" and compiling:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki) & (qi - ki < window)

        return create_block_mask(mask_mod, None, None, T, T, device=device)
    diff = pos[:, None] - pos[None, :]
    return (doc[:, None] == doc[None, :]) & (diff >= 0) & (diff < window)  # the diagonal: no empty row


# FlexAttention's tiles where a block gets at most ~100 KB of shared memory (sm_86, sm_89: 101,376 B; sm_80 and
# sm_90 offer 166,912 and 232,448). Its default backward needs about 131 KB at head dim 128 there and fails with
# "out of resource: shared memory" (pytorch/pytorch issue 133254); backward tiles of 32 x 32 fit at head dim 128
# (a maintainer's sweep in meta-pytorch/torchtune issue 2113: BLOCK_M1 = BLOCK_N1 = BLOCK_M2 = BLOCK_N2 = 32), and
# 64 x 64 forward tiles need 64 KB of q/k/v staging at head dim 128 in bf16; modded-nanogpt's RTX 4090 port (its
# PR #38) likewise passed smaller tiles through kernel_options. All divide the block mask's 128-token blocks.
FLEX_SMALL_SMEM_OPTIONS = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_M1": 32, "BLOCK_N1": 32, "BLOCK_M2": 32,
                           "BLOCK_N2": 32}
FLEX_BIG_SMEM_BYTES = 160 * 1024  # sm_80 / sm_90 opt-in shared memory per block is above this
_flex_options: dict | None = None  # configure_flex's answer, read (as a constant) where the graph calls flex


def flex_options_for(smem_per_block: int | None, shrink: int = 0) -> dict | None:
    """FlexAttention kernel_options for a GPU with `smem_per_block` bytes of opt-in shared memory per block:
    Inductor's defaults (None) on big-shared-memory parts, FLEX_SMALL_SMEM_OPTIONS on ~100 KB ones; `shrink`
    halves every tile that many times more (down to 16) with one pipeline stage: the fallback after an
    out-of-resources failure (tritonrun/training.py)."""
    if not shrink and (smem_per_block is None or smem_per_block >= FLEX_BIG_SMEM_BYTES):
        return None
    base = dict(FLEX_SMALL_SMEM_OPTIONS)
    if shrink:
        base = {k: max(16, v >> shrink) for k, v in base.items()} | {"num_stages": 1}
    return base


def configure_flex(device: torch.device, shrink: int = 0) -> dict | None:
    """Set (and return) the kernel_options torch_window_attention passes to FlexAttention on `device`; call it
    before torch.compile traces the model (the trainer does)."""
    global _flex_options
    smem = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", None)
    _flex_options = flex_options_for(smem, shrink)
    return _flex_options


def torch_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                           window: int, mask=None, scale: float | None = None) -> torch.Tensor:
    """Document-masked sliding-window attention in plain torch, under `mask` = torch_window_mask(cu_seqlens, window,
    T) (built here when not given; the model passes one per forward): FlexAttention with its BlockMask under
    torch.compile on CUDA, else SDPA with the dense boolean mask (tests, CPU runs, GPU runs of a few thousand
    tokens)."""
    if mask is None:
        mask = torch_window_mask(cu_seqlens, window, q.shape[-2], q.device)
    if not isinstance(mask, torch.Tensor):  # a FlexAttention BlockMask
        from torch.nn.attention.flex_attention import flex_attention

        return flex_attention(q, k, v, block_mask=mask, scale=scale, kernel_options=_flex_options)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def torch_layer_norm(x, weight, bias, eps: float = 1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def torch_add_layer_norm(x, residual, weight, bias, eps: float = 1e-5):
    s = x + residual
    return F.layer_norm(s, (s.shape[-1],), weight, bias, eps), s


def torch_gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def torch_linear_cross_entropy(h, weight, targets, ignore_index: int = -1, vocab_size: int = 50257,
                               softcap: float | None = None):
    # Materializes (N, V) logits: the memory the fused Triton kernel avoids.
    # The matmul runs over all padded rows (aligned shapes tile better); the padded columns are
    # sliced off before the softmax, so they never enter the normalizer nor receive gradient.
    logits = F.linear(h, weight)[:, :vocab_size]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16/fp16 -> fp32 softmax
    if softcap is not None:  # tanh in fp32 too (the record rounds it in bf16; the kernel computes it in fp32)
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, targets, ignore_index=ignore_index)


def torch_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    # torch computes the statistic in fp32 for bf16/fp16 inputs. The cast keeps the input dtype where an
    # autocast policy runs the norm in fp32 (the contract: outputs in the input dtype); a no-op otherwise.
    return F.rms_norm(x, (x.shape[-1],), eps=eps).to(x.dtype)


def torch_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, eps: float):
    s = x + residual
    return F.rms_norm(s, (s.shape[-1],), eps=eps).to(s.dtype), s


def torch_mix_rms_norm(x: torch.Tensor, x0: torch.Tensor, lambdas: torch.Tensor, eps: float):
    s = lambdas[0] * x + lambdas[1] * x0
    return F.rms_norm(s, (s.shape[-1],), eps=eps).to(s.dtype), s


def torch_relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def torch_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float):
    """q, k (B, T, H, D) -> RMS-normed and rotated (B, H, T, D) views. cos, sin (T, D/2) broadcast over B and H;
    the rotation runs in fp32 (promoted by cos/sin) and is cast back to the input dtype."""
    cos, sin = cos[None, :, None, :], sin[None, :, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = F.rms_norm(x, (x.shape[-1],), eps=eps).chunk(2, dim=-1)
        y = torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1)
        return y.to(x.dtype).transpose(1, 2)  # (B, H, T, D) view: SDPA and causal_attention take any strides

    return rotate(q), rotate(k)


BIGRAM_HASH = (36313, 27191)  # record #89's get_bigram_hash multipliers (tritonrun/kernels/bigram.py)


def bigram_indices(x: torch.Tensor, rows: int, sign_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Record #89's bigram hash rows h and sign rows s of token ids x (T,) or (B, T), int32 like the record's
    get_bigram_hash, row by row (tritonrun/kernels/bigram.py's docstring has the formulas and their quirks)."""
    x2 = x.reshape(-1, x.shape[-1]).to(torch.int32)
    mod = rows - 1
    h = x2.clone()
    h[:, 0] = mod
    h[:, 1:] = torch.bitwise_xor(BIGRAM_HASH[0] * h[:, 1:], BIGRAM_HASH[1] * h[:, :-1]) % mod  # reads h[:, 0] at t = 1
    s = torch.zeros_like(x2)
    s[:, 1:] = (x2[:, :-1] ^ x2[:, 1:]) % sign_rows
    return h.view(x.shape), s.view(x.shape)


def torch_bigram_embed(x: torch.Tensor, table: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """table[h] * signs[s] (bigram_indices): the bigram hash embedding with the sign trick, (..., D)."""
    h, s = bigram_indices(x, table.shape[0], signs.shape[0])
    return table[h.long()] * signs[s.long()].to(table.dtype)


def torch_relu2_mlp(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, scales=None) -> torch.Tensor:
    """relu(x W1^T)^2 W2^T in x's dtype (bf16: pre and post rounded to bf16, as the record's kernel); W1 (H, C),
    W2 (C, H). `scales` (the FP8 state) is the Triton op's: the torch op has no FP8 path."""
    if scales is not None:
        raise ValueError("the torch relu2_mlp has no FP8 path: run --fp8 off or the triton backend")
    return F.linear(F.relu(F.linear(x, W1)).square(), W2)


def torch_mtp_head(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mtp_weights: torch.Tensor,
                   prefix_targets: torch.Tensor, prefix_weight: torch.Tensor) -> torch.Tensor:
    """Record #89's training head in torch: per-token losses of the sigmoid-rescaled logits h @ weight with
    multi-token prediction and the prefix-token term (tritonrun/gpt2/speedrun89.mtp_loss_reference), weight (C, V)."""
    from tritonrun.gpt2.speedrun89 import mtp_head_torch

    return mtp_head_torch(h, weight, targets, mtp_weights, prefix_targets, prefix_weight)


class TorchAdamW(torch.optim.AdamW):
    """torch.optim.AdamW that keeps the implementation it was built with (fused / foreach) across load_state_dict.

    torch's load_state_dict takes every group setting from the saved dict, the implementation flags included: a
    checkpoint written on CPU (foreach) or by the Triton FusedAdamW (no such keys) would turn a CUDA run's
    fused=True into the slower foreach path on resume. Those flags describe this process, not the run's math."""

    IMPLEMENTATION = ("fused", "foreach", "capturable", "differentiable")

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["param_groups"]
        if len(saved) == len(self.param_groups):  # else torch's own load raises its error
            # Rewritten before the load: torch places each "step" tensor by the loaded group's fused/capturable.
            saved = [{**sg, **{k: g[k] for k in self.IMPLEMENTATION if k in g}}
                     for sg, g in zip(saved, self.param_groups)]
        super().load_state_dict({**state_dict, "param_groups": saved})


def torch_adamw(param_groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8) -> torch.optim.Optimizer:
    params = [p for g in param_groups for p in g["params"]]
    on_cuda = all(p.is_cuda for p in params)
    # fused=True: one multi-tensor CUDA kernel. On CPU keep the default (foreach) path: deterministic
    # and fast enough for the tiny model.
    return TorchAdamW(param_groups, lr=lr, betas=betas, eps=eps, fused=True if on_cuda else None)


TORCH_OPS: dict[str, Callable] = {
    "attention": torch_attention,
    "window_attention": torch_window_attention,
    "layer_norm": torch_layer_norm,
    "add_layer_norm": torch_add_layer_norm,
    "gelu": torch_gelu,
    "linear_cross_entropy": torch_linear_cross_entropy,
    "optimizer": torch_adamw,
    "rms_norm": torch_rms_norm,
    "add_rms_norm": torch_add_rms_norm,
    "mix_rms_norm": torch_mix_rms_norm,
    "relu2": torch_relu2,
    "qk_norm_rope": torch_qk_norm_rope,
    "bigram_embed": torch_bigram_embed,
    "relu2_mlp": torch_relu2_mlp,
    "mtp_head": torch_mtp_head,
}

# Where each op's Triton kernel lives: (module, attribute). A missing module means "not landed yet".
TRITON_OPS: dict[str, tuple[str, str]] = {
    "attention": ("tritonrun.kernels.attention", "causal_attention"),
    "window_attention": ("tritonrun.kernels.window_attention", "window_attention"),
    "layer_norm": ("tritonrun.kernels.layernorm", "layer_norm"),
    "add_layer_norm": ("tritonrun.kernels.layernorm", "add_layer_norm"),
    "gelu": ("tritonrun.kernels.gelu", "gelu"),
    "linear_cross_entropy": ("tritonrun.kernels.cross_entropy", "linear_cross_entropy"),
    "optimizer": ("tritonrun.kernels.adamw", "FusedAdamW"),
    "rms_norm": ("tritonrun.kernels.rmsnorm", "rms_norm"),
    "add_rms_norm": ("tritonrun.kernels.rmsnorm", "add_rms_norm"),
    "mix_rms_norm": ("tritonrun.kernels.rmsnorm", "mix_rms_norm"),
    "relu2": ("tritonrun.kernels.relu2", "relu2"),
    "qk_norm_rope": ("tritonrun.kernels.rope", "qk_norm_rope"),
    "bigram_embed": ("tritonrun.kernels.bigram", "bigram_embed"),
    "relu2_mlp": ("tritonrun.kernels.mlp_relu2", "mlp_op"),
    "mtp_head": ("tritonrun.kernels.mtp_head", "mtp_head_loss"),
}

# The ops each model calls (tritonrun/gpt2/model.py, tritonrun/gpt2/speedrun.py). The speedrun recipe's Adam groups may
# use `optimizer` (AdamW with weight_decay 0 is Adam); its Muon is tritonrun/kernels/muon.py, outside the seam.
GPT2_OPS = ("attention", "layer_norm", "add_layer_norm", "gelu", "linear_cross_entropy", "optimizer")
SPEEDRUN_OPS = ("window_attention", "rms_norm", "add_rms_norm", "mix_rms_norm", "relu2", "qk_norm_rope",
                "linear_cross_entropy", "optimizer")
RECORD89_OPS = ("window_attention", "bigram_embed", "relu2_mlp", "mtp_head")
SPEEDRUN_DENSE_OPS = ("attention", "rms_norm", "add_rms_norm", "mix_rms_norm", "relu2", "qk_norm_rope",
                      "linear_cross_entropy", "optimizer")

BACKENDS = ("torch", "triton")


@dataclass
class Ops:
    backend: str
    attention: Callable
    window_attention: Callable
    layer_norm: Callable
    add_layer_norm: Callable
    gelu: Callable
    linear_cross_entropy: Callable
    optimizer: Callable
    rms_norm: Callable
    add_rms_norm: Callable
    mix_rms_norm: Callable
    relu2: Callable
    qk_norm_rope: Callable
    bigram_embed: Callable
    relu2_mlp: Callable
    mtp_head: Callable
    placement: dict[str, str] = field(default_factory=dict)  # op -> "triton" | "torch" | "torch (why)"

    def describe(self, names: Iterable[str] | None = None) -> str:
        """One line per op (the ops in `names` only, e.g. GPT2_OPS, when given): name and where it runs."""
        names = set(self.placement if names is None else names)
        shown = {k: v for k, v in self.placement.items() if k in names}
        width = max(len(k) for k in shown)
        return "\n".join(f"  {name:<{width}}  {where}" for name, where in shown.items())


def load_triton_op(name: str) -> Callable:
    """The Triton kernel of op `name` (RuntimeError naming why when it cannot run here)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        raise RuntimeError(f"the Triton {name} kernel needs a CUDA GPU or TRITON_INTERPRET=1")
    fn, where = _load_triton_op(name)
    if fn is None:
        raise RuntimeError(f"the Triton {name} kernel cannot run here: {where}")
    return fn


def _load_triton_op(name: str) -> tuple[Callable | None, str]:
    module_name, attr = TRITON_OPS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name in (module_name, "kernels"):
            return None, f"torch (fallback: {module_name.replace('.', '/')}.py has not landed)"
        if e.name == "triton" or (e.name or "").startswith("triton."):
            return None, "torch (fallback: triton is not installed)"
        raise
    if not hasattr(module, attr):
        return None, f"torch (fallback: {module_name} has no {attr} yet)"
    fn = getattr(module, attr)
    if name == "linear_cross_entropy" and "softcap" not in inspect.signature(fn).parameters:
        return _softcap_in_torch(fn), "triton (softcap: torch; tritonrun.kernels.cross_entropy has no softcap yet)"
    return fn, "triton"


def _softcap_in_torch(kernel: Callable) -> Callable:
    """A Triton linear_cross_entropy from before the softcap keyword: calls without softcap (GPT-2) still run
    the kernel; calls with it (the speedrun model) run the torch op, which caps, instead of failing or
    silently dropping the cap."""

    def linear_cross_entropy(h, weight, targets, ignore_index: int = -1, vocab_size: int = 50257,
                             softcap: float | None = None):
        if softcap is None:
            return kernel(h, weight, targets, ignore_index, vocab_size)
        return torch_linear_cross_entropy(h, weight, targets, ignore_index, vocab_size, softcap)

    return linear_cross_entropy


def _major_minor(version: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run here, or None. Triton <= 3.6 turns loop bounds into Python
    ints with int() on 1-element arrays, which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be
    converted to Python scalars"); Triton 3.7 fixed it. Versions come from package metadata: importing
    triton here would fix its interpreter mode too early."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        triton_v, numpy_v = version("triton"), version("numpy")
    except PackageNotFoundError as e:
        return f"{e.name} is not installed (pip install -e .)"
    if _major_minor(triton_v) < (3, 7) and _major_minor(numpy_v) >= (2, 4):
        return (f"Triton {triton_v}'s CPU interpreter does not work with NumPy {numpy_v}: "
                f"pip install 'numpy<2.4' (or triton>=3.7), or use --backend torch")
    return None


def use_cpu_interpreter() -> None:
    """Run the Triton kernels on CPU tensors through Triton's interpreter. TRITON_INTERPRET is read when
    @triton.jit functions are defined, triton's own helpers (tl.sum, ...) included, so it must be set before
    triton is first imported; a process that imported triton without it cannot run the kernels on CPU.
    Raises RuntimeError with the fix when that cannot work."""
    problem = interpreter_problem()
    if problem:
        raise RuntimeError(problem)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    if "triton" in sys.modules or os.environ.get("TRITON_INTERPRET") not in (None, ""):
        raise RuntimeError("the Triton kernels run on CPU only through the interpreter: set TRITON_INTERPRET=1 "
                           "in the environment (before triton is imported), or use --backend torch")
    os.environ["TRITON_INTERPRET"] = "1"


def canonical_ops(names: Iterable[str]) -> tuple[str, ...]:
    """The named ops in the seam's order, each once. ValueError naming an unknown op and the known ones: a typo
    must not silently run the kernel it meant to leave out."""
    names = set(names)
    unknown = sorted(names - set(TRITON_OPS))
    if unknown:
        raise ValueError(f"unknown op {unknown[0]!r}: choose from {', '.join(TRITON_OPS)}")
    return tuple(n for n in TRITON_OPS if n in names)


def parse_op_list(text: str) -> tuple[str, ...]:
    """'linear_cross_entropy,attention' -> ('attention', 'linear_cross_entropy') ('' -> ()), as canonical_ops."""
    return canonical_ops(n.strip() for n in text.split(",") if n.strip())


def get_ops(backend: str = "torch", device: str | torch.device = "cpu", torch_ops: tuple[str, ...] = ()) -> Ops:
    """Resolve every op for `backend`; on CPU the Triton kernels run through the interpreter. Under "triton",
    the ops named in `torch_ops` stay torch."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    torch_ops = canonical_ops(torch_ops)
    impls, placement = dict(TORCH_OPS), {name: "torch" for name in TORCH_OPS}
    if backend == "triton":
        if torch.device(device).type != "cuda":
            use_cpu_interpreter()
        for name in TRITON_OPS:
            if name in torch_ops:
                placement[name] = "torch (--torch-ops)"
                continue
            fn, where = _load_triton_op(name)
            if fn is not None:
                impls[name] = fn
                if os.environ.get("TRITON_INTERPRET") == "1":  # "triton (interpreter)", "triton (interpreter; ...)"
                    where = "triton (interpreter)" if where == "triton" else where.replace("(", "(interpreter; ", 1)
            placement[name] = where
    return Ops(backend=backend, placement=placement, **impls)
