"""Record #89's ReLU² MLP step: the up projection fused with relu(.)^2 (and, in FP8, with the quantization of its
output for the down projection), the down projection in FP8 with delayed scaling, and a bf16 backward.

    forward   pre  = x W1^T            bf16 x, or FP8: x8 = e4m3(x * (448 / amax|x|)), W1 in e4m3 at
                                       s_up = amax|W1| / 448, the product dequantized by s_up * amax|x| / 448
              post = relu(bf16(pre))^2                                        rounded to bf16; the only saved tensor
              FP8 also: post8 = e4m3(min(post / s_act, 448)), and the largest post of each program (partial amax)
              out  = post W2^T         bf16, or FP8: post8 @ W2_8^T with scales s_act, s_w2 (delayed, below)
    backward  (bf16 throughout, from post and the bf16 weights)
              dW2  = dout^T post;   dpre = 2 bf16(dout W2) sqrt(post)   (relu(pre) = sqrt(post): pre is not kept)
              dW1  = dpre^T x;      dx = dpre W1

Delayed scaling of the down projection [record #89: "MLP down projection in FP8 with efficient delayed scaling"]:
s_act for the next forward = max(partial amax) * 1.80 / 448 (starts at 1.0); W2 is quantized after each optimizer
step with the scale computed at the previous one (saturating), then s_w2 <- amax|W2| * 1.12 / 448; the first 16
optimizer steps (and the start) take amax|W2| / 448 at once (Fp8MlpScales). On one GPU with gradient accumulation
s_act moves per micro-batch (the record's 8 GPUs: per step per rank): a deviation, listed in README.

The fused kernel is our tiled matmul (tritonrun/kernels/fp8.py's grouped tiles) with these epilogues; the record's
is a persistent TMA kernel for Hopper. Rounding follows the record's kernel: pre to bf16, its square to bf16, the
FP8 copy from the bf16 post times the fp32 inverse scale, saturating at 448, nearest even (fp8._fp8_code: the same
bytes on CPU and GPU); the backward's 2 * bf16(acc) * sqrt(post) in fp32, rounded once to bf16. The inverse scale
and the square root are correctly rounded (tl.div_rn, tl.sqrt_rn) where the record's kernel uses the GPU's fast
approximations: a deviation of at most an ulp there, for the same bytes on CPU and GPU.
"""
from __future__ import annotations

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
import triton.language as tl

from tritonrun.kernels import fp8
from tritonrun.kernels.fp8 import _fp8_code, _grouped_tile, _round_to_bf16, _tile_product
from tritonrun.kernels.target import device_arch

ACT_HEADROOM, W2_HEADROOM, BOOTSTRAP_STEPS = 1.80, 1.12, 16  # [record #89 train_gpt.py H1670-1675, HK/H1424-1434]


@triton.jit
def _linear_relu2_kernel(
    A, B, C, AUX, POST8, PARTIAL, DEQUANT, ACT_SCALE,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn,
    FORWARD: tl.constexpr, USE_FP8: tl.constexpr, EMIT_FP8: tl.constexpr, ROUND: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # C, AUX, POST8: (M, N) contiguous. Forward: C = post; backward: C = dpre from AUX = post.
    pid = tl.program_id(0)
    rm, rn = _grouped_tile(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    acc = _tile_product(A, B, rm, rn, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, BLOCK_M, BLOCK_N, BLOCK_K)
    if USE_FP8:
        acc = acc * tl.load(DEQUANT)
    # ROUND: the record's bf16 roundings; else (fp32 operands, exact=True: CPU model tests) none, fp32 out
    c = _round_to_bf16(acc) if ROUND else acc  # the record's accumulator.to(bf16)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    offs = rm[:, None] * N + rn[None, :]
    if FORWARD:
        r = tl.where(c > 0.0, c, 0.0)
        post = _round_to_bf16(r * r) if ROUND else r * r  # exact square of a bf16 value, rounded to bf16
        tl.store(C + offs, post.to(C.dtype.element_ty), mask=mask)
        if EMIT_FP8:
            inv = tl.div_rn(1.0, tl.load(ACT_SCALE))  # correctly rounded on CPU and GPU alike
            code = _fp8_code(tl.minimum(post * inv, 448.0), 3, 7, 448.0, 512.0)  # e4m3
            tl.store(POST8 + offs, code.to(tl.uint8), mask=mask)
            tl.store(PARTIAL + pid, tl.max(tl.max(tl.where(mask, post, 0.0), axis=1), axis=0))
    else:
        post = tl.load(AUX + offs, mask=mask, other=0.0).to(tl.float32)
        d = 2.0 * c * tl.sqrt_rn(post)  # IEEE sqrt
        tl.store(C + offs, (_round_to_bf16(d) if ROUND else d).to(C.dtype.element_ty), mask=mask)


# arch -> (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): bf16 and fp8 operands; NOT tuned on a GPU.
CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "sm_89": (128, 128, 64, 8, 8, 3),
    "sm_90": (128, 128, 64, 8, 8, 4),
    "default": (128, 128, 64, 8, 8, 3),
    "interpreter": (64, 128, 128, 8, 1, 1),  # large tiles: fewer interpreted programs and dots
}


_arch = device_arch  # the config-table key of a device (bench/ada.py patches it per file)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Float output buffers come from here (tests patch it to NaN-fill, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(a, b, forward: bool, dequant=None, act_scale=None, aux=None, exact: bool = False):
    M, K = a.shape
    N = b.shape[1]
    bm, bn, bk, gm, warps, stages = CONFIGS.get(_arch(a.device), CONFIGS["default"])
    grid = triton.cdiv(M, bm) * triton.cdiv(N, bn)
    if exact and (a.dtype != torch.float32 or act_scale is not None):
        raise ValueError("linear_relu2: exact=True (no bf16 rounding, fp32 out) takes fp32 operands and no FP8")
    out = _alloc((M, N), torch.float32 if exact else torch.bfloat16, a.device)
    emit = act_scale is not None
    post8 = torch.empty((M, N), dtype=fp8.E4M3.dtype, device=a.device) if emit else out
    partial = _alloc((grid,), torch.float32, a.device) if emit else out
    if M and N and not is_fake(a):  # under FakeTensorMode (a memory estimate): the buffers, no launch
        _linear_relu2_kernel[(grid,)](
            a, b, out, aux if aux is not None else out, post8.view(torch.uint8) if emit else out, partial,
            dequant if dequant is not None else out, act_scale if emit else out, M, N, K,
            a.stride(0), a.stride(1), b.stride(0), b.stride(1), FORWARD=forward, USE_FP8=dequant is not None,
            EMIT_FP8=emit, ROUND=not exact, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps,
            num_stages=stages)
    return out, (post8 if emit else None), (partial if emit else None)


def linear_relu2(a: torch.Tensor, b: torch.Tensor, dequant: torch.Tensor | None = None,
                 act_scale: torch.Tensor | None = None, exact: bool = False):
    """post = relu(bf16(a @ b [* dequant]))^2 in bf16 for a (M, K), b (K, N): bf16, or fp8 with `dequant` (one fp32
    element). With act_scale (one fp32 element) also the e4m3 post / act_scale and one partial amax of post per
    program. Returns (post, post8 or None, partial amax or None). exact (fp32 a, b): no rounding, fp32 post."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"linear_relu2: needs (M, K) @ (K, N), got {tuple(a.shape)} @ {tuple(b.shape)}")
    if (dequant is not None) != (a.dtype == fp8.E4M3.dtype):
        raise ValueError("linear_relu2: e4m3 operands take a dequant scale, bf16 (fp32 / fp16 in tests) ones none")
    return _launch(a, b, True, dequant, act_scale, exact=exact)


def relu2_grad_matmul(g: torch.Tensor, w: torch.Tensor, post: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """dpre = 2 bf16(g @ w) sqrt(post) in bf16, for bf16 g (M, K), w (K, N), the forward's post (M, N); exact (fp32
    g, w): 2 (g @ w) sqrt(post) in fp32, no rounding."""
    return _launch(g, w, False, aux=post.contiguous(), exact=exact)[0]


# ---------------------------------------------------------------------------------------- the MLP
class Fp8MlpScales:
    """One layer's FP8 state: the e4m3 weights and their scales (refresh() after each optimizer step) and the delayed
    activation scale of the down projection (updated by each forward)."""

    def __init__(self, device):
        one = torch.ones(1, dtype=torch.float32, device=device)
        self.act_scale = one.clone()  # s_act, delayed: the next forward's [starts at 1.0]
        self.w2_next = one.clone()  # the scale the next refresh quantizes W2 with
        self.w2_used = one.clone()
        self.s_up = one.clone()
        self.w1_8 = self.w2_8 = None
        self.refreshes = 0

    @torch.no_grad()
    def refresh(self, W1: torch.Tensor, W2: torch.Tensor) -> None:
        """Quantize the weights for the next forwards: W1 at its current amax; W2 at the scale computed at the previous
        refresh (saturating), then the next one = amax|W2| x 1.12 / 448. The first refresh (the start) and those
        after the first BOOTSTRAP_STEPS optimizer steps take amax|W2| / 448 at once: the record calls
        quantize_mlp_fp8(bootstrap_down=True) at the start and bootstrap_down=(step < 16) after step `step`
        [H2300, H2365], 17 bootstrapped refreshes in all."""
        self.s_up = (W1.abs().amax().clamp(min=1e-12) / fp8.E4M3.max).float().reshape(1)
        self.w1_8 = fp8.quantize(W1.float(), self.s_up, fp8.E4M3)  # read on the device: no host sync
        amax2 = W2.abs().amax().clamp(min=1e-12).float().reshape(1)
        if self.refreshes <= BOOTSTRAP_STEPS:  # refresh r follows optimizer step r - 1 (r = 0: the start)
            self.w2_next = amax2 / fp8.E4M3.max
        self.w2_used = self.w2_next.clone()
        self.w2_8 = fp8.quantize(W2.float(), self.w2_used, fp8.E4M3)
        self.w2_next = amax2 * W2_HEADROOM / fp8.E4M3.max
        self.refreshes += 1

    def state_dict(self) -> dict:
        """What the next forwards depend on beyond the weights: the delayed scales and the refresh count (the
        quantized weights follow from the weights and w2_used: load_state_dict re-quantizes them)."""
        return {"act_scale": self.act_scale.clone(), "w2_next": self.w2_next.clone(),
                "w2_used": self.w2_used.clone(), "refreshes": self.refreshes}

    @torch.no_grad()
    def load_state_dict(self, state: dict, W1: torch.Tensor, W2: torch.Tensor) -> None:
        """Restore state_dict()'s scales and re-quantize the current weights W1, W2 as the last refresh did."""
        dev = self.act_scale.device
        self.act_scale, self.w2_next, self.w2_used = (state[k].to(dev).clone()
                                                      for k in ("act_scale", "w2_next", "w2_used"))
        self.refreshes = int(state["refreshes"])
        self.s_up = (W1.abs().amax().clamp(min=1e-12) / fp8.E4M3.max).float().reshape(1)
        self.w1_8 = fp8.quantize(W1.float(), self.s_up, fp8.E4M3)
        self.w2_8 = fp8.quantize(W2.float(), self.w2_used, fp8.E4M3)


class _ReluSquaredMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W1, W2, scales, dt, exact):
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        w1, w2 = W1.to(dt), W2.to(dt)
        if scales is None:
            post, _, _ = linear_relu2(x2, w1.t(), exact=exact)
            out = post.to(dt) @ w2.t()
        elif x2.shape[0] == 0:  # no rows: nothing to quantize or scale (the scales stay as they are)
            post = x2.new_empty((0, W1.shape[0]), dtype=torch.bfloat16)
            out = x2.new_empty((0, W2.shape[0]))
        else:
            amax = x2.abs().max().clamp(min=1e-12)  # bf16, as the record's normed.abs().max()
            x8 = fp8.quantize(x2 * (448.0 / amax), 1.0, fp8.E4M3)  # bf16 product, then e4m3
            dequant = (scales.s_up * amax / 448.0).float()
            post, post8, partial = linear_relu2(x8, scales.w1_8.t(), dequant, scales.act_scale)
            out = fp8.scaled_mm(post8, scales.w2_8.t(), (scales.act_scale * scales.w2_used).float(), torch.bfloat16)
            scales.act_scale = (partial.max().clamp(min=1e-12) * (ACT_HEADROOM / 448.0)).reshape(1)
        ctx.save_for_backward(x2, w1, w2, post)
        ctx.dtypes, ctx.exact = (x.dtype, W1.dtype, W2.dtype), exact
        return out.to(torch.float32 if exact else torch.bfloat16).view(*x.shape[:-1], W2.shape[0])

    @staticmethod
    def backward(ctx, dout):
        x2, w1, w2, post = ctx.saved_tensors
        g = dout.reshape(-1, w2.shape[0]).to(w2.dtype)
        dW2 = g.t() @ post.to(g.dtype)
        dpre = relu2_grad_matmul(g, w2, post, exact=ctx.exact).to(g.dtype)
        dW1 = dpre.t() @ x2
        dx = dpre @ w1
        xd, w1d, w2d = ctx.dtypes
        return dx.to(xd).view(*dout.shape[:-1], w1.shape[1]), dW1.to(w1d), dW2.to(w2d), None, None, None


def relu2_mlp(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, scales: Fp8MlpScales | None = None,
              matmul_dtype: torch.dtype = torch.bfloat16, exact: bool = False) -> torch.Tensor:
    """relu(x W1^T)^2 W2^T (module docstring): bf16, or with `scales` the record's FP8 forward (call
    scales.refresh(W1, W2) after each optimizer step). x (..., C), W1 (H, C), W2 (C, H); out bf16 (..., C).
    matmul_dtype: the bf16 matmuls' operand dtype (fp32 for CPU tests: the interpreter's bf16 tl.dot is wrong).
    exact (with matmul_dtype fp32, no FP8): the same math without the bf16 roundings, fp32 out (an fp32 model)."""
    if W1.dim() != 2 or W2.dim() != 2 or W1.shape[1] != x.shape[-1] or W2.shape[1] != W1.shape[0]:
        raise ValueError(f"relu2_mlp: x (..., C), W1 (H, C), W2 (C, H) needed, got {tuple(x.shape)}, "
                         f"{tuple(W1.shape)}, {tuple(W2.shape)}")
    if scales is not None and scales.w1_8 is None:
        raise ValueError("relu2_mlp: FP8 scales have no quantized weights yet: call scales.refresh(W1, W2) first")
    if exact and (matmul_dtype != torch.float32 or scales is not None):
        raise ValueError("relu2_mlp: exact=True runs fp32 matmuls without FP8 (matmul_dtype=torch.float32, no scales)")
    return _ReluSquaredMLP.apply(x, W1, W2, scales, matmul_dtype, exact)


def mlp_op(x: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor, scales: Fp8MlpScales | None = None) -> torch.Tensor:
    """The ops seam's relu2_mlp (tritonrun/gpt2/ops.py): x's dtype decides. bf16 (training): the record's step, out
    bf16; fp32 (CPU tests, the interpreter): the same kernels in fp32 without the bf16 roundings, out fp32."""
    if x.dtype == torch.float32:
        return relu2_mlp(x, W1, W2, scales, matmul_dtype=torch.float32, exact=scales is None)
    return relu2_mlp(x, W1, W2, scales)


def reference_relu2_mlp(x, W1, W2):
    """The bf16 step in torch: relu(bf16(x W1^T))^2 rounded to bf16, then @ W2^T."""
    x2, w1, w2 = x.to(torch.bfloat16), W1.to(torch.bfloat16), W2.to(torch.bfloat16)
    pre = (x2.float() @ w1.float().t()).bfloat16()
    return (torch.relu(pre).float().square().bfloat16()).float() @ w2.float().t()
