"""tritonrun/gpt2/embedding.py: F.embedding's math, with a backward Inductor calls instead of lowering to a
scatter-add."""
import pytest
import torch
from torch._inductor.utils import run_and_get_code

from tritonrun.gpt2.embedding import embedding
from tests.helpers import HAS_CUDA

SHAPES = [((3, 7), 50, 16), ((1, 13), 11, 40), ((5,), 9, 24)]  # idx shape, rows, width (repeats guaranteed)


@pytest.mark.parametrize("idx_shape,rows,width", SHAPES)
def test_matches_f_embedding_bitwise(idx_shape, rows, width):
    """Same forward and weight gradient as F.embedding (the same aten kernels run eagerly), repeated indices and
    rows never looked up (their gradient is exactly zero) included."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, width, generator=g)
    idx = torch.randint(0, rows - 2, idx_shape, generator=g)  # the last two rows are never looked up
    upstream = torch.randn(*idx_shape, width, generator=g)
    outs = []
    for fn in (embedding, torch.nn.functional.embedding):
        ww = w.clone().requires_grad_()
        y = fn(idx, ww)
        y.backward(upstream)
        outs.append((y.detach(), ww.grad))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert torch.equal(outs[0][1][-2:], torch.zeros(2, width))


def test_custom_op_opcheck():
    idx = torch.randint(0, 11, (3, 5))
    w = torch.randn(11, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.tritonrun.embedding.default, (idx, w),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch.library.opcheck(torch.ops.tritonrun.embedding_backward.default, (torch.randn(3, 5, 8), idx, 11),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_backward_calls_the_op_not_an_atomic_scatter():
    """Under torch.compile, nn.Embedding's backward becomes a scatter-add that Inductor emits with atomic adds
    (the C++ code on CPU shows atomic_add; Triton's on CUDA the same): the control case below. Through
    gpt2.embedding the backward is the custom op, called as an extern kernel: no atomics, and the gradient
    equals eager's (to rounding: Inductor's fused tanh backward rounds differently from eager's)."""
    g = torch.Generator().manual_seed(2)
    w, idx = torch.randn(50, 16, generator=g), torch.randint(0, 50, (3, 7), generator=g)

    def loss_with(emb):
        return lambda idx, w: (emb(idx, w) * 2).tanh().sum()

    codes, grads = {}, {}
    for name, emb in (("ours", embedding), ("nn", torch.nn.functional.embedding)):
        torch._dynamo.reset()
        ww = w.clone().requires_grad_()
        compiled = torch.compile(loss_with(emb), fullgraph=True)
        _, code = run_and_get_code(lambda: compiled(idx, ww).backward())
        codes[name], grads[name] = "\n".join(code), ww.grad
    torch._dynamo.reset()
    assert "atomic_add" in codes["nn"]  # the control: what the op exists to avoid
    assert "atomic_add" not in codes["ours"] and "embedding_backward" in codes["ours"]
    ww = w.clone().requires_grad_()
    loss_with(embedding)(idx, ww).backward()
    torch.testing.assert_close(grads["ours"], ww.grad, rtol=1e-5, atol=1e-6)  # a few ulps: measured 2.4e-7 at 4


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU: the atomics are CUDA's (none on this machine)")
def test_compiled_triton_model_grads_are_bitwise_repeatable_on_gpu():
    """The tiny GPT-2 under torch.compile, bf16 autocast, Triton backend, twice from the same weights and batch:
    every gradient, wte and wpe included, bitwise equal (what --compile resume exactness rests on)."""
    from tritonrun.gpt2 import GPT, GPTConfig
    from tritonrun.gpt2.ops import get_ops

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=128, vocab_size=257, padded_vocab_size=320, n_layer=2, n_head=2, n_embd=64)
    model = GPT(cfg, get_ops("triton", "cuda")).cuda()
    idx = torch.randint(0, 257, (4, 128), device="cuda")
    grads = []
    for _ in range(2):
        torch._dynamo.reset()
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = torch.compile(model)(idx, idx)
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert torch.equal(a, b), name
