"""Embedding lookup whose backward is deterministic also under torch.compile.

Eager PyTorch's CUDA embedding backward (aten.embedding_dense_backward) is deterministic: it sorts the indices
and sums each row's contributions in a fixed order (or, for few indices, walks them in order per feature slice).
Inductor does not call it: it decomposes the backward into a scatter-add (index_put with accumulate=True), which
it runs as atomic adds on CUDA, so wte's and wpe's gradients change from run to run at float-rounding level and
two compiled runs (or a run and its resume) are not bitwise equal, even where every other op is deterministic.

`embedding(idx, weight)` is the same math as F.embedding: a torch.library custom op, so Inductor calls it as an
extern kernel instead of decomposing it, and its backward is a second custom op that runs the eager
aten.embedding_dense_backward (padding_idx none, no scale by frequency, as GPT-2's nn.Embedding).

Cost: the lookup is no longer fused into the add of the position embedding (one extra write and read of a
(B, T, C) fp32 tensor: 2 x 25 MB at micro-batch 8 x 1024 x 768, about 0.1 ms at a 4070's 504 GB/s, against a
~250 ms micro-batch), and the backward is the eager sort-based kernel instead of Inductor's scatter. To be
measured on a GPU: the step time of --compile with this op against nn.Embedding's lowering (bench/train.py
triton+compile before and after), and `bench/resume.py`'s compiled rows (bitwise or not).
"""
from __future__ import annotations

import torch


@torch.library.custom_op("tritonrun::embedding", mutates_args=())
def _embedding(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.embedding(idx, weight)


@torch.library.custom_op("tritonrun::embedding_backward", mutates_args=())
def _embedding_backward(grad: torch.Tensor, idx: torch.Tensor, num_weights: int) -> torch.Tensor:
    return torch.ops.aten.embedding_dense_backward(grad, idx, num_weights, -1, False)


@_embedding.register_fake
def _(idx, weight):
    return weight.new_empty((*idx.shape, weight.shape[1]))


@_embedding_backward.register_fake
def _(grad, idx, num_weights):
    return grad.new_empty((num_weights, grad.shape[-1]))


def _setup(ctx, inputs, output):
    idx, weight = inputs
    ctx.save_for_backward(idx)
    ctx.num_weights = weight.shape[0]


def _backward(ctx, grad):
    (idx,) = ctx.saved_tensors
    return None, _embedding_backward(grad.contiguous(), idx, ctx.num_weights)


_embedding.register_autograd(_backward, setup_context=_setup)


def embedding(idx: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """weight[idx] (F.embedding), with a backward that stays deterministic under torch.compile."""
    return _embedding(idx, weight)
