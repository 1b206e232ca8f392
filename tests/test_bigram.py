"""tritonrun/kernels/bigram.py: record #89's bigram hash embedding (hash + lookup + sign in one kernel) through the
Triton interpreter. The forward is a gather times +-1, so it is exact: compared bitwise with the torch reference and
with the hash written out here in plain Python int32 arithmetic. The record's own get_bigram_hash was compared
with the kernel outside the repo (20 random sequences at the record's 377,280 rows: equal, the wrap of 27191 x M at
position 1 included)."""
import pytest
import torch

from tests.helpers import poison_allocations
from tritonrun.kernels import bigram as bg


def int32(v: int) -> int:
    return (v + 2**31) % 2**32 - 2**31


def hash_by_hand(xs: list[int], rows: int, sign_rows: int) -> tuple[list[int], list[int]]:
    """The module docstring's formulas in Python ints: int32 wrap of each product, XOR, floor mod (torch's %)."""
    m = rows - 1
    h, s = [m], [0]
    for t in range(1, len(xs)):
        prev = m if t == 1 else xs[t - 1]
        h.append((int32(36313 * xs[t]) ^ int32(27191 * prev)) % m)
        s.append((xs[t - 1] ^ xs[t]) % sign_rows)
    return h, s


@pytest.mark.parametrize("rows", [377_280, 1_001, 7])
def test_indices_match_the_hash_by_hand(rows):
    """At the record's 377,280 rows, 27191 x M overflows int32 at position 1 (wraps, then floor mod: the kernel's
    fix-up of a negative remainder matters on a GPU, whose % truncates; the interpreter's numpy % already floors)."""
    x = torch.randint(0, 50304, (300,), generator=torch.Generator().manual_seed(rows))
    want_h, want_s = hash_by_hand(x.tolist(), rows, 8192)
    assert rows != 377_280 or int32(27191 * (rows - 1)) != 27191 * (rows - 1)  # the wrap is exercised
    table = torch.stack([torch.arange(rows, dtype=torch.float32), torch.ones(rows)], 1)  # row index, exact
    signs = torch.stack([torch.ones(8192), torch.arange(8192, dtype=torch.float32)], 1)
    out = bg.bigram_embed(x, table, signs)
    assert out[:, 0].long().tolist() == want_h and out[:, 1].long().tolist() == want_s
    h, s = bg.reference_bigram_indices(x, rows, 8192)
    assert h.tolist() == want_h and s.tolist() == want_s


@pytest.mark.parametrize("shape", [(37,), (3, 29)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ids", [torch.int64, torch.int32])
def test_forward_is_the_reference_bitwise(monkeypatch, shape, dtype, ids):
    poison_allocations(monkeypatch, bg)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50257, shape, generator=g).to(ids)
    table = torch.randn(1001, 100, generator=g).to(dtype)
    signs = torch.randn(64, 100, generator=g).sign().to(dtype)
    out = bg.bigram_embed(x, table, signs)
    assert out.shape == (*shape, 100) and out.dtype == dtype
    assert torch.equal(out, bg.reference_bigram_embed(x.long(), table, signs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_table_gradient(monkeypatch, dtype):
    """7 rows for 2 x 61 positions: many positions per row. The gradient of row r is the sum of dout[t] * sign over
    the positions hashing to r: fp64 by index_add here; ours sums the same fp32 products in fp32 (at most 122 terms
    of |x| <= ~5: error <= 122 * 2^-24 * 600 ~ 4.4e-3 worst case, measured ~1e-6), then one rounding to the table's
    dtype (bf16: 2^-8 relative)."""
    poison_allocations(monkeypatch, bg)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 50257, (2, 61), generator=g)
    table = torch.randn(7, 40, generator=g).to(dtype).requires_grad_()
    signs = torch.randn(16, 40, generator=g).sign().to(dtype)
    dy = torch.randn(2, 61, 40, generator=g).to(dtype)
    bg.bigram_embed(x, table, signs).backward(dy)
    h, s = bg.reference_bigram_indices(x, 7, 16)
    want = torch.zeros(7, 40, dtype=torch.float64).index_add_(0, h.view(-1).long(),
                                                              (dy.double() * signs.double()[s.long()]).view(-1, 40))
    assert table.grad.dtype == dtype
    tol = 2.0 ** -8 * want.abs() + 1e-4 if dtype == torch.bfloat16 else 1e-4  # the fp32 bound above, ~40x measured
    assert bool(((table.grad.double() - want).abs() <= tol).all())
    first = table.grad.clone()
    table.grad = None
    bg.bigram_embed(x, table, signs).backward(dy)
    assert torch.equal(table.grad, first)  # sorted-index sum: bitwise repeatable


def test_bad_input_is_one_clear_error():
    table, signs = torch.zeros(10, 4), torch.ones(8, 4)
    with pytest.raises(ValueError, match="token ids must be int64/int32"):
        bg.bigram_embed(torch.zeros(5), table, signs)
    with pytest.raises(ValueError, match=r"table \(V, D\) and signs \(S, D\) needed"):
        bg.bigram_embed(torch.zeros(5, dtype=torch.long), table, torch.ones(8, 3))
    with pytest.raises(ValueError, match="needs >= 2 rows"):
        bg.bigram_embed(torch.zeros(5, dtype=torch.long), torch.zeros(1, 4), signs)


def test_fakes_give_the_real_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        out, hs = torch.ops.tritonrun.bigram_fwd(torch.empty(2, 9, dtype=torch.long), torch.empty(11, 6),
                                                 torch.empty(4, 6))
        dt = torch.ops.tritonrun.bigram_bwd(torch.empty(2, 9, 6), hs, torch.empty(4, 6), 11)
    assert out.shape == (2, 9, 6) and hs.shape == (2, 18) and hs.dtype == torch.int32 and dt.shape == (11, 6)
