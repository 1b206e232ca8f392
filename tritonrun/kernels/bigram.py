"""Record #89's bigram hash embedding with the sign trick, the hash, lookup and sign fused in one pass.

For a token sequence x (each row of a batch is one sequence, as one rank's packed sequence in the record):

    h[0] = M                                         M = table rows - 1 (a reserved row)
    h[t] = ((36313 x[t]) XOR (27191 p[t])) mod M     p[1] = M, p[t] = x[t-1] for t >= 2; int32 arithmetic
    s[0] = 0,  s[t] = (x[t-1] XOR x[t]) mod S        S = sign-table rows (8,192)
    out[t] = table[h[t]] * signs[s[t]]               signs: a fixed +-1 buffer (sign of a normal draw)

The record computes h on the CPU in its data loader (get_bigram_hash: the right-hand side reads the sequence after
h[0] was written, so position 1 hashes with M, not with x[0], and 27191 M overflows int32 and wraps; mod is
torch's, with the divisor's sign) and s and the product in the model; here one kernel computes both indices from the
token ids and writes out[t] reading each table row once: the eager form writes the gathered rows, reads them
back with the gathered signs and writes the product (5 x T x D element moves against 3). Document boundaries are
not masked (a document's first token hashes with the previous document's last), as in the record.

Backward (the table only: the signs are a buffer, the ids integers): g[t] = dout[t] * signs[s[t]] in one pass,
then the table's gradient is the sum of g over the positions of each row, by PyTorch's deterministic
embedding backward (sorted indices, no atomics: bitwise repeatable).

Registered as torch.library custom ops (fake + autograd) so torch.compile traces through; on CPU tensors the
kernels run through the Triton interpreter.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tritonrun.gpt2.ops import BIGRAM_HASH, bigram_indices, torch_bigram_embed
from tritonrun.kernels.target import device_arch

HASH_A, HASH_B = BIGRAM_HASH  # [record #89 train_gpt.py get_bigram_hash: rand_int_1, rand_int_2]


@triton.jit
def _indices(X, rows, n, T, MOD, SIGN_ROWS):
    """h, s (int32) of flat positions `rows` of x (n tokens, rows of T): the module docstring's formulas."""
    t = rows % T
    valid = rows < n
    x = tl.load(X + rows, mask=valid, other=0).to(tl.int32)
    xp = tl.load(X + rows - 1, mask=valid & (t > 0), other=0).to(tl.int32)
    prev = tl.where(t == 1, MOD, xp)  # position 1 hashes with h[0] = MOD (the record's in-place rewrite)
    h = (x * 36313) ^ (prev * 27191)  # HASH_A, HASH_B; int32: 27191 * MOD wraps, as torch's int32 multiply does
    h = h % MOD
    h = tl.where(h < 0, h + MOD, h)  # the divisor's sign, as torch's %, whatever the backend's remainder does
    h = tl.where(t == 0, MOD, h)
    s = (xp ^ x) % SIGN_ROWS  # both >= 0
    s = tl.where(t == 0, 0, s)
    return h, s


@triton.jit
def _bigram_fwd_kernel(
    X,  # (n,) int64 / int32 token ids, rows of T
    TABLE,  # (V, D)
    SIGNS,  # (S, D)
    OUT,  # (n, D) TABLE's dtype
    HS,  # (2, n) int32: h and s, for the backward
    n, T, D, MOD, SIGN_ROWS,
    stride_table, stride_signs,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Bytes: n * D * (2 * table size + sign size) for the two gathered rows and the output, + 12 n for ids / h, s.
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < n
    h, s = _indices(X, rows, n, T, MOD, SIGN_ROWS)
    tl.store(HS + rows, h, mask=valid)
    tl.store(HS + n + rows, s, mask=valid)
    h64, s64 = h.to(tl.int64), s.to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = valid[:, None] & (cols[None, :] < D)
        e = tl.load(TABLE + h64[:, None] * stride_table + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(SIGNS + s64[:, None] * stride_signs + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(OUT + rows[:, None] * D + cols[None, :], (e * g).to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _bigram_bwd_kernel(
    DOUT,  # (n, D) contiguous
    SIGNS,  # (S, D)
    HS,  # (2, n) int32 from the forward
    G,  # (n, D) fp32: dout * signs[s]
    n, D, stride_signs,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    valid = rows < n
    s64 = tl.load(HS + n + rows, mask=valid, other=0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = valid[:, None] & (cols[None, :] < D)
        dy = tl.load(DOUT + rows[:, None] * D + cols[None, :], mask=m, other=0.0).to(tl.float32)
        g = tl.load(SIGNS + s64[:, None] * stride_signs + cols[None, :], mask=m, other=0.0).to(tl.float32)
        tl.store(G + rows[:, None] * D + cols[None, :], dy * g, mask=m)


# arch -> (BLOCK_T tokens, BLOCK_D columns, num_warps). 8 x 256 bf16 columns per program: 16-byte loads of two
# gathered rows; NOT yet tuned on a GPU (bench/kernels.py --op bigram).
CONFIGS: dict[str, tuple[int, int, int]] = {"default": (8, 256, 4), "interpreter": (64, 1024, 1)}


_arch = device_arch  # the config-table key of a device (bench/ada.py patches it per file)


def bytes_moved(n: int, D: int, pass_: str, *, dtype: torch.dtype) -> int:
    """DRAM bytes of one call: forward reads a table row and a sign row per token and writes the output (+ ids,
    h and s); backward reads dout and the sign rows and writes the fp32 g (the scatter-sum is torch's)."""
    size = torch.empty((), dtype=dtype).element_size()
    fwd = n * D * 3 * size + 16 * n
    bwd = n * D * (2 * size + 4) + 4 * n
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output buffer comes from here (tests patch it to NaN-fill, proving each element is written)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _check(x: torch.Tensor, table: torch.Tensor, signs: torch.Tensor) -> None:
    if x.dtype not in (torch.int64, torch.int32) or x.dim() not in (1, 2):
        raise ValueError(f"bigram_embed: token ids must be int64/int32 of shape (T,) or (B, T), got {x.dtype} "
                         f"{tuple(x.shape)}")
    if table.dim() != 2 or signs.dim() != 2 or table.shape[1] != signs.shape[1]:
        raise ValueError(f"bigram_embed: table (V, D) and signs (S, D) needed, got {tuple(table.shape)} and "
                         f"{tuple(signs.shape)}")
    if table.shape[0] < 2 or not 1 <= signs.shape[0] < 2**31:
        raise ValueError(f"bigram_embed: the table needs >= 2 rows (one reserved), got {table.shape[0]}")


# ------------------------------------------------------------------ custom ops (autograd, compile)


@torch.library.custom_op("tritonrun::bigram_fwd", mutates_args=())
def _bigram_fwd(x: torch.Tensor, table: torch.Tensor, signs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x1 = x.contiguous().view(-1)
    n, T, D = x1.numel(), x.shape[-1], table.shape[1]
    out = _alloc((n, D), table.dtype, table.device)
    hs = torch.empty((2, n), dtype=torch.int32, device=table.device)  # (the NaN-poisoning tests cover floats)
    if n:
        bt, bd, warps = CONFIGS.get(_arch(table.device), CONFIGS["default"])
        table_c, signs_c = table.contiguous(), signs.contiguous()
        _bigram_fwd_kernel[(triton.cdiv(n, bt),)](
            x1, table_c, signs_c, out, hs, n, T, D, table.shape[0] - 1, signs.shape[0], table_c.stride(0),
            signs_c.stride(0), BLOCK_T=bt, BLOCK_D=min(bd, triton.next_power_of_2(D)), num_warps=warps)
    return out.view(*x.shape, D), hs


@torch.library.custom_op("tritonrun::bigram_bwd", mutates_args=())
def _bigram_bwd(dout: torch.Tensor, hs: torch.Tensor, signs: torch.Tensor, rows: int) -> torch.Tensor:
    D = dout.shape[-1]
    d1 = dout.contiguous().view(-1, D)
    n = d1.shape[0]
    g = _alloc((n, D), torch.float32, dout.device)
    if n:
        bt, bd, warps = CONFIGS.get(_arch(dout.device), CONFIGS["default"])
        signs_c = signs.contiguous()
        _bigram_bwd_kernel[(triton.cdiv(n, bt),)](d1, signs_c, hs, g, n, D, signs_c.stride(0), BLOCK_T=bt,
                                                   BLOCK_D=min(bd, triton.next_power_of_2(D)), num_warps=warps)
    # the table's gradient: deterministic, sorted by row (no atomics)
    return torch.ops.aten.embedding_dense_backward(g, hs[0].long(), rows, -1, False)


@_bigram_fwd.register_fake
def _(x, table, signs):
    return table.new_empty((*x.shape, table.shape[1])), table.new_empty((2, x.numel()), dtype=torch.int32)


@_bigram_bwd.register_fake
def _(dout, hs, signs, rows):
    dout.new_empty((hs.shape[1], dout.shape[-1]), dtype=torch.float32)  # g
    return dout.new_empty((rows, dout.shape[-1]), dtype=torch.float32)


def _setup(ctx, inputs, output):
    _, table, signs = inputs
    ctx.save_for_backward(output[1], signs)
    ctx.rows, ctx.table_dtype = table.shape[0], table.dtype


def _backward(ctx, dout, _dhs):
    hs, signs = ctx.saved_tensors
    return None, _bigram_bwd(dout, hs, signs, ctx.rows).to(ctx.table_dtype), None


_bigram_fwd.register_autograd(_backward, setup_context=_setup)


# ------------------------------------------------------------------------------------- public API


def bigram_embed(x: torch.Tensor, table: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """table[h] * signs[s] for token ids x (T,) or (B, T): (..., D) in table's dtype (module docstring)."""
    _check(x, table, signs)
    return _bigram_fwd(x, table, signs)[0]


# ------------------------------------------------------------------------- plain-PyTorch reference


# The torch op of the seam is the reference: tritonrun/gpt2/ops.py (imports no triton).
reference_bigram_indices = bigram_indices
reference_bigram_embed = torch_bigram_embed
