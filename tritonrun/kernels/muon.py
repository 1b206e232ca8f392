"""Muon: SGD-momentum whose update is orthogonalized by a few Newton-Schulz steps (the 2024-11-10 speedrun record).

What it computes, per 2-D hidden matrix W (rows x cols) with gradient g, per step (μ = the group's momentum, which
the trainer warms up: `muon_momentum_at`):
    buf = μ·buf + g                                   (momentum buffer, fp32 for fp32 params; zeros at the start)
    u   = g + μ·buf  (nesterov=True, the record's)    or  u = buf
  (momentum_form="ema", the 2024-12-17 record's: buf = μ·buf + (1-μ)·g and u = (1-μ)·g + μ·buf, torch lerps; the
  orthogonalization normalizes u, so the two forms differ only while μ changes, i.e. during the warmup)
    O   = newton_schulz(u)                            ≈ U·Vᵀ for u = U·S·Vᵀ (bf16, 5 steps)
    W  -= lr · max(1, rows/cols)^0.5 · O              (the record's shape rule: 2 for the 3072x768 c_fc)
Embeddings, the LM head and 0/1-D params are not Muon's: the record trains them with Adam.

Newton-Schulz (`newton_schulz`). X = G/(‖G‖_F·s + ε) so every singular value is ≤ 1 (s is a safety factor: 1 for
the quintic, 1.02 for Polar Express, as modded-nanogpt's train_gpt.py normalises it), cast to bf16, transposed when
G is tall (so X X^T is the small rows x rows Gram matrix), then per step with coefficients (a, b, c):
    A = X Xᵀ;   B = b·A + c·A·A;   X = a·X + B·X      i.e. X ← p(X Xᵀ)·X, each σ ← p(σ) = a·σ + b·σ³ + c·σ⁵
"quintic" is the record's fixed triple (3.4445, -4.7750, 2.0315), chosen for a steep slope at 0 rather than
convergence: after 5 steps the singular values sit in the polynomial's attractor [0.68, 1.13] (tests derive it)
instead of at 1, which the record reports does not hurt. "polar_express" uses one published triple per step
(Amsel, Persson, Musco, Gower 2025, arXiv:2505.16932; the list and the 1.02 safety factor as modded-nanogpt's
records/track_1_short/2025-09-29_PolarExpress and today's train_gpt.py use them, "num_iters=5, safety_factor=2e-2,
cushion=2"), which ends much closer to U·Vᵀ for the same 5 steps and FLOPs. The matmuls run as torch bf16 matmuls
(addmm/baddbmm: the b·A and a·X terms ride in the GEMM epilogue), fp32 accumulation.

Batched by shape. All Muon matrices of one (shape, device) are stacked and orthogonalized by one batched iteration:
the d12 speedrun's 72 matrices are 48 of 768x768 (q, k, v, attn proj) and 24 of 768x3072 after transposing the
3072x768 c_fc, so a step issues 2 x 5 x 3 = 30 GEMM launches instead of 72 x 15 = 1,080.

FLOPs (a rows x cols matrix, m = min, n = max): one step 2m²n (X Xᵀ) + 2m³ (A·A) + 2m²n (B·X) = 4m²n + 2m³.
    768x768:   6·768³                    = 2.72 GFLOP per step
    768x3072:  4·768²·3072 + 2·768³      = 8.15 GFLOP per step
    d12 (12 layers x (4 square + 2 MLP matrices)) x 5 steps = 1.631 TFLOP per optimizer step.
A training step of the 2024-11-10 record (524,288 tokens; 6·123.6M matmul params + 6·L·C·T attention = 0.798
GFLOP/token) is 418.4 TFLOP, so Newton-Schulz is 0.39 % of a step (the record: "< 1 %"). On an RTX 4070 (58.3
TFLOPS): ~55 ms of Newton-Schulz at 50 % of peak against ~17.9 s per step at 40 % MFU.

Why there is no Triton X·Xᵀ (one-triangle) kernel here. X Xᵀ and A·A are symmetric (A·A is, since A is), so a
kernel computing only the upper-triangle tiles and mirroring them halves those two products: it saves m²n + m³ of
4m²n + 2m³, i.e. 1/3 for the square matrices and 27.8 % for the MLP ones, 30.0 % of the Newton-Schulz FLOPs over
the d12 set (less with real tiles: a 768x768 output in 128x128 tiles computes 21 of 36 tiles, not 18). 30 % of
0.39 % is 0.12 % of a training step's FLOPs: at most ~17 ms of a ~17.9 s step on a 4070, ~50 s over the 3,000-step
run, before a hand-written kernel's own shortfall against cuBLAS on 768-wide GEMMs. Not worth a kernel, its tests
and an sm_89 fit entry; we write the number down and use torch matmuls. (It pays where Muon is a larger share:
much smaller batches per optimizer step, or much wider matrices; modded-nanogpt's later records ship one.)

Momentum and update: torch._foreach ops (not a Triton launch), over all of a group's tensors. Bytes per fp32 param
(84.9M d12 hidden params), eager: momentum 20 B (mul_ reads+writes buf; add_ reads buf and g, writes buf), Nesterov
12, stacking 8, norm 4, scale-and-round to bf16 14, update 10 (read p, O; write p), plus 4 for c_fc's transposed copy
and shape scale: ~68 B, 5.8 GB, ~11.5 ms at the 4070's 504 GB/s. One fused Triton pass (read g, buf; write buf and
a bf16 u; the norm as fp32 partials; then the update) would move ~24 B, ~4 ms: it saves ~7.5 ms of a ~17.9 s step
(0.04 %). Foreach keeps the state as torch's own per-param "momentum_buffer" tensors (state_dict, load_state_dict
and resume are torch.optim.Optimizer's, bitwise) in a handful of launches per group.

DDP: orthogonalization is SHARDED when torch.distributed is initialized with world size W > 1 (`shard=None`, the
default; `shard=False` replicates). DDP hands every rank the same all-reduced grads, so every rank updates every
momentum buffer (elementwise, cheap: the state stays whole on each rank and rank 0's state_dict is complete), then
orthogonalizes only its share of each shape group, round-robin as the record does (matrix j of a group on rank
j mod W), and one all_gather per shape group gives every rank every update, so params stay identical. That divides
the 1.63 TFLOP of Newton-Schulz by W for all_gathers of ~170 MB of bf16 updates per step (the record all-reduces a
zero-padded flat buffer of the same size instead). On CPU, where batched GEMMs round each matrix as alone, sharded
and single-process runs agree to the bit (tests: 2 gloo ranks). On the project's target, one GPU, nothing is
sharded; with W > 1, replication would cost < 0.4 % of a step, sharding saves most of that.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

# ------------------------------------------------------------------------------------------ coefficients
# The record's quintic (KellerJordan/modded-nanogpt, records/track_1_short/2024-11-10_UNetDoubleLr), every step.
QUINTIC = (3.4445, -4.7750, 2.0315)
# Polar Express, one triple per step, for 5 steps (modded-nanogpt train_gpt.py / 2025-09-29_PolarExpress record,
# computed by the paper's method with num_iters=5, safety_factor=2e-2, cushion=2).
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
# X = G / (‖G‖_F · SAFETY + eps): Polar Express's coefficients assume σ_max ≤ 1/1.02 (train_gpt.py divides so).
SAFETY = {"quintic": 1.0, "polar_express": 1.02}
COEFFICIENTS = tuple(SAFETY)


def ns_coefficients(coefficients: str | Sequence[Sequence[float]], steps: int) -> tuple[list[tuple], float]:
    """(per-step (a, b, c) triples, safety factor) for a coefficient set name, or for an explicit list of `steps`
    triples (safety 1). Raises ValueError with the fix."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Muon: ns_steps must be a positive int, got {steps!r}")
    if isinstance(coefficients, str):
        if coefficients == "quintic":
            return [QUINTIC] * steps, SAFETY["quintic"]
        if coefficients == "polar_express":
            if steps > len(POLAR_EXPRESS):
                raise ValueError(f"Muon: Polar Express coefficients are published for {len(POLAR_EXPRESS)} steps, "
                                 f"got ns_steps={steps}; use ns_steps<={len(POLAR_EXPRESS)} or coefficients='quintic'")
            return list(POLAR_EXPRESS[:steps]), SAFETY["polar_express"]
        raise ValueError(f"Muon: unknown coefficients {coefficients!r}; choose one of {', '.join(COEFFICIENTS)} "
                         "or pass a list of (a, b, c) triples, one per step")
    triples = [tuple(float(v) for v in t) for t in coefficients]
    if len(triples) != steps or any(len(t) != 3 for t in triples):
        raise ValueError(f"Muon: explicit coefficients must be {steps} (a, b, c) triples (one per step), "
                         f"got {len(triples)}")
    return triples, 1.0


def newton_schulz_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Matmul FLOPs of `steps` Newton-Schulz steps on one rows x cols matrix: steps·(4m²n + 2m³), m = min."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m ** 3)


def shape_scale(rows: int, cols: int) -> float:
    """The record's update scale for a rows x cols matrix: max(1, rows/cols)^0.5."""
    return max(1.0, rows / cols) ** 0.5


def muon_momentum_at(step: int, warmup_steps: int = 500, start: float = 0.85, end: float = 0.95) -> float:
    """Muon momentum at optimizer step `step` (0-based): linear from `start` to `end` over `warmup_steps`, then
    `end` (the 2024-11-10 record: 0.85 -> 0.95 over 500 steps). Set it with group['momentum'] before step()."""
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


# ------------------------------------------------------------------------------------------ Newton-Schulz
def newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: str | Sequence = "quintic", eps: float = 1e-7,
                  dtype: torch.dtype = torch.bfloat16, norm_in_dtype: bool = False, split_above: int | None = None
                  ) -> torch.Tensor:
    """Orthogonalize G (rows, cols) or a stack of same-shape matrices (batch, rows, cols): ≈ U·Vᵀ of each, in `dtype`.

    The norm ‖G‖_F·safety + eps is taken per matrix in fp32 (float64 for dtype=float64) and X is rounded to `dtype`
    once, after the division; the matmuls then run in `dtype` (bf16 by default, fp32 accumulation). Tall matrices
    are iterated transposed (the Gram matrix is the small side's) and transposed back.
    norm_in_dtype: record #89's order instead (tritonrun/kernels/normuon.py): G rounded to `dtype` first, norm and
    division in `dtype`, and a tall X iterated as it is, its Gram matrix XᵀX on the right (X ← a·X + X·B).
    split_above: for matrices with more rows than this, the update is the product rounded to `dtype`, then a·X added
    (record #89's split_baddbmm for its MLP matrices: two roundings where baddbmm has one).
    """
    if G.ndim not in (2, 3):
        raise ValueError(f"newton_schulz takes a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    triples, safety = ns_coefficients(coefficients, steps)
    tall = G.size(-2) > G.size(-1)
    if norm_in_dtype:
        X = G.to(dtype)
        X = (X / (X.norm(dim=(-2, -1), keepdim=True) * safety + eps)).contiguous()
    else:
        X = G.mT if tall else G
        norm_dtype = torch.promote_types(dtype, torch.float32)
        norm = torch.linalg.vector_norm(X, dim=(-2, -1), keepdim=True, dtype=norm_dtype)
        X = (X / (norm * safety + eps)).to(dtype).contiguous()
    right = norm_in_dtype and tall  # the small Gram matrix on the right of an untransposed tall X
    addmm = torch.baddbmm if X.ndim == 3 else torch.addmm
    split = split_above is not None and G.size(-2) > split_above
    for a, b, c in triples:
        A = X.mT @ X if right else X @ X.mT
        B = addmm(A, A, A, beta=b, alpha=c)  # b·A + c·A·A
        if split:
            X = (X @ B if right else B @ X).add_(X, alpha=a)
        else:
            X = addmm(X, X, B, beta=a) if right else addmm(X, B, X, beta=a, alpha=1.0)  # a·X + X·B | a·X + B·X
    return X.mT if tall and not norm_in_dtype else X


# ------------------------------------------------------------------------------------------ optimizer
class Muon(torch.optim.Optimizer):
    """Muon over 2-D hidden matrices (see the module docstring for the math, FLOPs and the DDP choice).

    Args:
        params: 2-D tensors (or param-group dicts of them); anything else is refused with a ValueError.
        lr: the update size (the record: 0.04 for the 2024-11-10 recipe). A float; schedule it through
            group['lr'] (e.g. torch.optim.lr_scheduler.LambdaLR, or assigning it every step).
        momentum: μ (the record: 0.95, warmed up from 0.85; assign group['momentum'] = muon_momentum_at(step)).
        nesterov: use g + μ·buf (True, the record's) or buf.
        ns_steps: Newton-Schulz steps (5).
        coefficients: "quintic" (the record's), "polar_express", or a list of ns_steps (a, b, c) triples.
        ns_dtype: the Newton-Schulz matmul dtype (bf16, the record's; fp32/fp64 for references and tests).
        momentum_form: "sum" (buf = μ·buf + g, the 2024-11-10 record's) or "ema" (buf = lerp(buf, g, 1-μ), Nesterov
            u = lerp(g, buf, μ): the 2024-12-17 record's).
        shard: split the orthogonalization over the torch.distributed ranks (None: when a process group of more
            than one rank is initialized; True: require one; False: every rank computes everything). Every rank
            must call step() at the same time, with the same params having grads.

    State per param: {"momentum_buffer"} in the grad's dtype, torch.optim.SGD's key. state_dict() and
    load_state_dict() are torch.optim.Optimizer's: a save/load round trip continues bitwise.
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, coefficients: str | Sequence = "quintic", ns_dtype: torch.dtype = torch.bfloat16,
                 shard: bool | None = None, momentum_form: str = "sum"):
        if not lr >= 0.0:
            raise ValueError(f"Muon: lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        ns_coefficients(coefficients, ns_steps)  # validate once here, with the fix in the message
        defaults = dict(lr=lr, momentum=momentum, nesterov=bool(nesterov), ns_steps=ns_steps,
                        coefficients=coefficients)
        super().__init__(params, defaults)
        if momentum_form not in ("sum", "ema"):
            raise ValueError(f"Muon: momentum_form must be 'sum' or 'ema', got {momentum_form!r}")
        self.ns_dtype = ns_dtype
        self.shard = shard
        self.momentum_form = momentum_form
        for gi, group in enumerate(self.param_groups):
            ns_coefficients(group["coefficients"], group["ns_steps"])
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon: a param of shape {tuple(p.shape)} in group {gi}: Muon takes 2-D hidden "
                                     "matrices only; give embeddings, the LM head and 0/1-D params to Adam")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]  # no grad: left alone, as in torch
            if not params:
                continue
            grads = [p.grad for p in params]
            for g in grads:
                if g.is_sparse:
                    raise RuntimeError("Muon: sparse gradients are not supported (Muon is for dense 2-D matrices)")
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])
            mu = float(group["momentum"])
            ema = self.momentum_form == "ema"
            if ema:
                torch._foreach_lerp_(bufs, grads, 1.0 - mu)
            else:
                torch._foreach_mul_(bufs, mu)
                torch._foreach_add_(bufs, grads)
            # One batched Newton-Schulz per (shape, device): same-shape matrices share every GEMM launch.
            by_shape: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                by_shape.setdefault((tuple(p.shape), p.device), []).append(i)
            lr = float(group["lr"])
            world, rank = self._world()
            for (shape, _), idx in by_shape.items():
                mine = idx[rank::world]  # round-robin: matrix j of the group on rank j mod world
                if group["nesterov"] and mine and ema:
                    updates = list(torch._foreach_lerp([grads[i] for i in mine], [bufs[i] for i in mine], mu))
                elif group["nesterov"] and mine:
                    updates = list(torch._foreach_add([grads[i] for i in mine], [bufs[i] for i in mine], alpha=mu))
                else:
                    updates = [bufs[i] for i in mine]
                if world > 1:  # every rank gathers the same number of matrices: pad with zeros (NS(0) = 0)
                    per_rank = -(-len(idx) // world)
                    updates += [torch.zeros_like(grads[idx[0]]) for _ in range(per_rank - len(mine))]
                G = torch.stack(updates)
                del updates
                O = newton_schulz(G, steps=group["ns_steps"], coefficients=group["coefficients"],
                                  dtype=self.ns_dtype)
                del G
                if world > 1:  # rank-major blocks of per_rank (padding last in each) -> the group's order: matrix
                    # j came from rank j % world, slot j // world, so slot-major order is j's (a view, no host index)
                    O = self._gather(O, world).unflatten(0, (world, per_rank)).transpose(0, 1).flatten(0, 1)
                    O = O[: len(idx)]
                scale = shape_scale(*shape)
                if scale != 1.0:
                    O.mul_(scale)
                torch._foreach_add_([params[i] for i in idx], list(O.unbind(0)), alpha=-lr)
        return loss

    def _world(self) -> tuple[int, int]:
        """(world size, rank) to shard over; (1, 0) when not sharding."""
        if self.shard is False:
            return 1, 0
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            if self.shard:
                raise RuntimeError("Muon(shard=True) needs an initialized torch.distributed process group (run "
                                   "under torchrun and call init_process_group first), or pass shard=None/False")
            return 1, 0
        return dist.get_world_size(), dist.get_rank()

    @staticmethod
    def _gather(O: torch.Tensor, world: int) -> torch.Tensor:
        """All ranks' (per_rank, m, n) results stacked rank-major: (world·per_rank, m, n). Gathered as raw bytes,
        so any dtype travels through any backend (gloo has no bf16 on some builds) and arrives bit for bit."""
        import torch.distributed as dist

        raw = O.contiguous().view(torch.uint8)
        parts = [torch.empty_like(raw) for _ in range(world)]
        dist.all_gather(parts, raw)
        return torch.cat(parts).view(O.dtype)


# ------------------------------------------------------------------------------------------ references
def reference_newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: str | Sequence = "quintic",
                            eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Plain PyTorch, one matrix, op by op as the record writes it: cast to `dtype`, divide by its own norm
    (computed in `dtype`), then A = X Xᵀ; B = b·A + c·(A·A); X = a·X + B·X, each op rounded to `dtype`."""
    triples, safety = ns_coefficients(coefficients, steps)
    X = G.to(dtype)
    if G.size(0) > G.size(1):
        X = X.T
    X = X / (X.norm() * safety + eps)
    for a, b, c in triples:
        A = X @ X.T
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if G.size(0) > G.size(1):
        X = X.T
    return X


def reference_newton_schulz_fp64(G: torch.Tensor, steps: int = 5, coefficients: str | Sequence = "quintic",
                                 eps: float = 1e-7) -> torch.Tensor:
    """The same iteration in float64 on one matrix, no rounding to a low precision anywhere."""
    return reference_newton_schulz(G.double(), steps, coefficients, eps, dtype=torch.float64)


def svd_newton_schulz(G: torch.Tensor, steps: int = 5, coefficients: str | Sequence = "quintic",
                      eps: float = 1e-7) -> tuple[torch.Tensor, torch.Tensor]:
    """Newton-Schulz through the SVD, in float64, independent of any matmul iteration: with G = U·S·Vᵀ, each step
    maps X = U·f(S)·Vᵀ to U·p(f(S))·Vᵀ, so the result is U·diag(p_k(...p_1(σ/(‖G‖_F·s + ε))))·Vᵀ.
    Returns (that matrix, the output singular values in the order of G's)."""
    triples, safety = ns_coefficients(coefficients, steps)
    G = G.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    x = S / (torch.linalg.norm(G) * safety + eps)
    for a, b, c in triples:
        x = a * x + b * x ** 3 + c * x ** 5
    return (U * x) @ Vh, x


def polar_factor(G: torch.Tensor) -> torch.Tensor:
    """U·Vᵀ for G = U·S·Vᵀ (float64): the orthogonal matrix nearest to G, which Newton-Schulz approximates."""
    U, _, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    return U @ Vh


def reference_muon_step(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], bufs: Sequence[torch.Tensor],
                        lr: float, momentum: float, nesterov: bool = True, orthogonalize=None,
                        momentum_form: str = "sum") -> None:
    """One Muon step in plain PyTorch, in place, one tensor at a time (the record's loop, without the DDP
    sharding): buf = μ·buf + g; u = g + μ·buf (nesterov) or buf; W -= lr·max(1, rows/cols)^0.5·orthogonalize(u).
    momentum_form "ema" (2024-12-17): buf = μ·buf + (1-μ)·g; u = (1-μ)·g + μ·buf. `orthogonalize` defaults to the
    record-style bf16 `reference_newton_schulz`."""
    orthogonalize = orthogonalize or reference_newton_schulz
    for p, g, buf in zip(params, grads, bufs):
        if momentum_form == "ema":
            buf.mul_(momentum).add_(g, alpha=1 - momentum)
            u = (g * (1 - momentum)).add(buf, alpha=momentum) if nesterov else buf
        else:
            buf.mul_(momentum).add_(g)
            u = g.add(buf, alpha=momentum) if nesterov else buf
        o = orthogonalize(u)
        o = o * shape_scale(*p.shape)
        p.add_(o.to(p.dtype), alpha=-lr)

