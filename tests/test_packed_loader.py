"""PackedLoader: document-aligned packed sequences, cu_seqlens from EOT positions, exact resume, exact DDP interleave,
clear errors. Every expectation comes from a brute-force walk written out here in plain Python loops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tritonrun.data.loader import EOT, PackedLoader, ShardLoader, doc_bounds
from tritonrun.data.shards import ShardError, write_shard


def _docs_stream(rng: np.random.Generator, n_tokens: int, max_len: int, p_one: float) -> np.ndarray:
    """GPT-2-style token stream: documents of [EOT] + body, body ids in 0..50255 (no EOT inside); a fraction
    p_one of the documents is the bare EOT (one-token documents)."""
    parts, total = [], 0
    while total < n_tokens:
        body = 0 if rng.random() < p_one else int(rng.integers(1, max_len))
        doc = np.r_[EOT, rng.integers(0, EOT, size=body)]
        parts.append(doc)
        total += doc.size
    return np.concatenate(parts)[:n_tokens]


def _write(tmp_path: Path, shards: list[np.ndarray]) -> list[Path]:
    files = []
    for i, tokens in enumerate(shards):
        path = tmp_path / f"p_train_{i + 1:06d}.bin"
        write_shard(path, tokens)
        files.append(path)
    return files


def _split_shards(tmp_path, seed: int, sizes: list[int], max_len: int, p_one: float):
    """One document stream cut into shards of `sizes` tokens, so documents run across shard ends (llm.c)."""
    stream = _docs_stream(np.random.default_rng(seed), sum(sizes), max_len, p_one)
    cuts = np.cumsum([0] + sizes)
    shards = [stream[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    return _write(tmp_path, shards), shards


def _brute_starts(shards: list[np.ndarray], T: int, n: int, aligned: bool = True) -> list[tuple[int, int, int]]:
    """(epoch, shard, start) of the first n sequences, walked one token at a time: a start is an EOT (any position
    when not aligned) at or after the position with T+1 tokens left in its shard; the next search begins at
    start + T; a shard with no such start left hands over to offset 0 of the next, cycling."""
    out, epoch, shard, pos = [], 0, 0, 0
    while len(out) < n:
        tok = shards[shard]
        found = None
        for s in range(pos, len(tok) - T):  # s + T + 1 <= len(tok)
            if not aligned or tok[s] == EOT:
                found = s
                break
        if found is None:
            shard, pos = (shard + 1) % len(shards), 0
            epoch += shard == 0
            continue
        out.append((epoch, shard, found))
        pos = found + T
    return out


def _brute_bounds(x: np.ndarray) -> list[int]:
    bounds = [0]
    for p in range(1, len(x)):
        if x[p] == EOT:
            bounds.append(p)
    return bounds + [len(x)]


def _expected(shards, T, n, aligned=True):
    out = []
    for _, shard, s in _brute_starts(shards, T, n, aligned):
        chunk = shards[shard][s : s + T + 1].astype(np.int64)
        out.append((chunk[:-1], chunk[1:], _brute_bounds(chunk[:-1])))
    return out


def _per_epoch(shards, T) -> list[int]:
    """Sequences per shard in one pass (first epoch)."""
    walk = _brute_starts(shards, T, 1 + sum(len(s) // T + 1 for s in shards))
    return [sum(1 for e, sh, _ in walk if e == 0 and sh == i) for i in range(len(shards))]


def _take(loader, n):
    return [loader.next_batch() for _ in range(n)]


def _assert_batches(got, want, T):
    assert len(got) == len(want)
    for k, ((x, y, cu), (ex, ey, ecu)) in enumerate(zip(got, want)):
        assert x.shape == y.shape == (1, T) and x.dtype == y.dtype == torch.int64, k
        assert cu.dtype == torch.int32 and cu.ndim == 1 and cu.device == x.device, k
        np.testing.assert_array_equal(x[0].cpu().numpy(), ex, err_msg=f"x of sequence {k}")
        np.testing.assert_array_equal(y[0].cpu().numpy(), ey, err_msg=f"y of sequence {k}")
        assert cu.cpu().tolist() == ecu, f"cu_seqlens of sequence {k}"


def _same_stream(a, b):
    assert len(a) == len(b)
    for k, ((x, y, cu), (bx, by, bcu)) in enumerate(zip(a, b)):
        assert torch.equal(x, bx) and torch.equal(y, by) and torch.equal(cu, bcu), k


def test_hand_written(tmp_path):
    E = EOT
    files = _write(tmp_path, [np.array([E, 1, 2, E, 3, E, E, 4, 5, 6, 7, E, 8, 9]), np.array([7, 7, 7, E, 1, 2, 3, 4])])
    loader = PackedLoader(files, seq_len=4)
    x, y, cu = loader.next_batch()  # start 0; the document [E, 3] is cut after its EOT: 3 is only a target
    assert x.tolist() == [[E, 1, 2, E]] and y.tolist() == [[1, 2, E, 3]] and cu.tolist() == [0, 3, 4]
    assert loader.state_dict() == {"shard": 0, "offset": 4, "epoch": 0}
    x, y, cu = loader.next_batch()  # first EOT at or after 4 is 5: token 3 skipped; [E] is a one-token document
    assert x.tolist() == [[E, E, 4, 5]] and y.tolist() == [[E, 4, 5, 6]] and cu.tolist() == [0, 1, 4]
    # next EOT at or after 9 is 11, but 11 + 5 > 14: the shard's rest is skipped. Shard 1 begins mid-document
    # ([7, 7, 7], the split document's tail): its first start is its EOT at 3, the last start that fits
    # (3 + 5 = 8 tokens); one document, no EOT after position 0.
    x, y, cu = loader.next_batch()
    assert x.tolist() == [[E, 1, 2, 3]] and y.tolist() == [[1, 2, 3, 4]] and cu.tolist() == [0, 4]
    assert loader.state_dict() == {"shard": 1, "offset": 7, "epoch": 0}
    x, _, _ = loader.next_batch()  # nothing fits in shard 1 after 7: back to shard 0
    assert x.tolist() == [[E, 1, 2, E]] and loader.state_dict() == {"shard": 0, "offset": 4, "epoch": 1}


@pytest.mark.parametrize(
    "seed, sizes, T, max_len, p_one, long_docs",
    [
        (0, [300], 16, 12, 0.3, False),  # many short documents, one-token ones, several documents per sequence
        (1, [257, 101, 389], 23, 40, 0.2, True),  # odd sizes, documents longer than T (single-document sequences)
        (2, [200, 64, 500], 31, 90, 0.5, True),  # a shard barely larger than T
        (3, [150, 150], 7, 5, 0.8, False),  # mostly one-token documents
    ],
)
def test_matches_brute_force(tmp_path, seed, sizes, T, max_len, p_one, long_docs):
    files, shards = _split_shards(tmp_path, seed, sizes, max_len, p_one)
    n = 3 * sum(_per_epoch(shards, T)) + 2  # three wraps
    loader = PackedLoader(files, seq_len=T)
    got = _take(loader, n)
    _assert_batches(got, _expected(shards, T, n), T)
    assert loader.epoch == 3
    for x, y, cu in got:
        assert x[0, 0] == EOT, "every sequence starts at a document start"
        assert torch.equal(y[0, :-1], x[0, 1:]), "targets are the next tokens"
    assert any(len(cu) > 3 for _, _, cu in got), "sequences of several documents occur"
    assert any(len(cu) == 2 for _, _, cu in got) == long_docs, "sequences of one document occur iff docs exceed T"
    assert any((cu[1:] - cu[:-1]).min() == 1 for _, _, cu in got), "one-token documents occur"


def test_doc_bounds_brute_force():
    rng = np.random.default_rng(7)
    cases = [np.full(9, EOT), np.r_[EOT, np.arange(12)], np.arange(5), np.r_[3, EOT, EOT, 4, EOT], np.array([EOT])]
    for _ in range(50):
        T = int(rng.integers(1, 40))
        cases.append(np.where(rng.random(T) < rng.random(), EOT, rng.integers(0, EOT, T)).astype(np.uint16))
    for x in cases:
        b = doc_bounds(x)
        assert b.dtype == np.int32 and b.tolist() == _brute_bounds(x), x
    assert doc_bounds(np.full(4, EOT)).tolist() == [0, 1, 2, 3, 4]  # every token its own document
    assert doc_bounds(np.r_[EOT, 1, 2]).tolist() == [0, 3]  # no EOT after position 0: one document


def test_unaligned_is_contiguous(tmp_path):
    """doc_aligned=False: the 2024-11-19 .. 2024-12-17 records' reading (contiguous chunks, documents masked by the
    EOTs inside, position 0 a bound even mid-document)."""
    files, shards = _split_shards(tmp_path, 11, [130, 77], 15, 0.1)
    T = 9
    got = _take(PackedLoader(files, seq_len=T, doc_aligned=False), 40)
    _assert_batches(got, _expected(shards, T, 40, aligned=False), T)
    assert any(x[0, 0] != EOT for x, _, _ in got)


@pytest.mark.parametrize("k", [0, 1, 6, 9, 10, 12, 19, 25])
def test_state_dict_resume(tmp_path, k):
    files, shards = _split_shards(tmp_path, 4, [180, 70, 130], 20, 0.2)
    T = 13
    per_shard = _per_epoch(shards, T)
    # k: mid shard 0, its last sequence (9), the first of shard 1 (10), mid shard 1, the wrap (19), epoch 1
    assert per_shard == [10, 3, 6], per_shard
    loader = PackedLoader(files, seq_len=T)
    _take(loader, k)
    state = loader.state_dict()
    assert set(state) == {"shard", "offset", "epoch"}
    continued = _take(loader, 15)
    fresh = PackedLoader(files, seq_len=T)
    fresh.load_state_dict(dict(state))
    assert fresh.state_dict() == state
    _same_stream(continued, _take(fresh, 15))
    assert fresh.state_dict() == loader.state_dict()
    _assert_batches(continued, _expected(shards, T, k + 15)[k:], T)


def test_resume_at_shard_end_and_from_any_offset(tmp_path):
    files, shards = _split_shards(tmp_path, 8, [150, 100], 12, 0.2)
    T = 10
    loader = PackedLoader(files, seq_len=T)
    loader.load_state_dict({"shard": 0, "offset": 150, "epoch": 0})  # the very end: next start is in shard 1
    first_in_1 = _per_epoch(shards, T)[0]
    _assert_batches(_take(loader, 3), _expected(shards, T, first_in_1 + 3)[first_in_1:], T)
    # a mid-document offset (e.g. from a ShardLoader state) resumes at the next document start
    loader.load_state_dict({"shard": 0, "offset": 1, "epoch": 0})
    x, _, _ = loader.next_batch()
    s = 1 + int(np.flatnonzero(shards[0][1:] == EOT)[0])
    assert x[0].numpy().tolist() == shards[0][s : s + T].tolist()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("sizes", [[211, 97, 150], [120, 45]])
def test_ranks_interleave_single_process_order(tmp_path, world, sizes):
    """Rank r's k-th micro-batch is the single process's (k*world + r)-th, for any shard sizes (steps straddle shard
    ends here), and all ranks hold the same state after every step."""
    files, _ = _split_shards(tmp_path, 9, sizes, 18, 0.2)
    T = 12
    single = _take(PackedLoader(files, seq_len=T), 30 * world)
    ranks = [PackedLoader(files, seq_len=T, rank=r, world_size=world) for r in range(world)]
    for k in range(30):
        for r, loader in enumerate(ranks):
            _same_stream([loader.next_batch()], [single[k * world + r]])
        assert len({tuple(sorted(loader.state_dict().items())) for loader in ranks}) == 1, k
    assert ranks[0].epoch >= 1


def test_ranks_resume(tmp_path):
    files, _ = _split_shards(tmp_path, 10, [160, 90], 15, 0.2)
    a = [PackedLoader(files, seq_len=9, rank=r, world_size=2) for r in range(2)]
    for loader in a:
        _take(loader, 7)
    state = a[0].state_dict()
    for r in range(2):
        b = PackedLoader(files, seq_len=9, rank=r, world_size=2)
        b.load_state_dict(state)
        _same_stream(_take(a[r], 10), _take(b, 10))


def test_bad_token_id_fails_when_its_shard_is_opened(tmp_path):
    files, shards = _split_shards(tmp_path, 12, [120, 120], 10, 0.2)
    bad = shards[1].copy()
    bad[60] = 50300  # inside the vocabulary padding
    write_shard(files[1], bad)
    loader = PackedLoader(files, seq_len=8)  # shard 0 is fine
    _take(loader, _per_epoch(shards, 8)[0])  # all of shard 0's sequences
    assert loader.shard == 0
    with pytest.raises(ShardError, match=rf"{files[1]}: token id 50300 at position 60 "):
        loader.next_batch()
    with pytest.raises(ShardError, match="position 60"):
        PackedLoader(files, seq_len=8).load_state_dict({"shard": 1, "offset": 0, "epoch": 0})
    with pytest.raises(ShardError, match="position 60"):
        PackedLoader(files[1:], seq_len=8)  # e.g. the val loader: at startup


def test_seq_len_larger_than_a_shard(tmp_path):
    files, _ = _split_shards(tmp_path, 13, [200, 40], 10, 0.2)
    with pytest.raises(ValueError) as info:
        PackedLoader(files, seq_len=40)  # needs 41 tokens
    msg = str(info.value)
    assert "\n" not in msg and str(files[1]) in msg and "40 tokens" in msg and "seq_len+1 = 41" in msg
    assert "smaller seq_len" in msg
    PackedLoader(files, seq_len=39)  # 40 tokens are enough


def test_shard_without_document_start_is_skipped(tmp_path):
    E = EOT
    files = _write(tmp_path, [np.r_[E, np.arange(1, 12)], np.arange(1, 30), np.r_[5, E, np.arange(1, 8)]])
    loader = PackedLoader(files, seq_len=6)
    read_from = []
    for _ in range(4):
        loader.next_batch()
        read_from.append(loader.shard)  # a sequence never leaves its shard, so the position is still there
    assert read_from == [0, 2, 0, 2]  # shard 1 holds no EOT: skipped whole
    (tmp_path / "none").mkdir()
    none = _write(tmp_path / "none", [np.arange(1, 30)] * 2)
    with pytest.raises(ValueError, match="no shard has a document start"):
        PackedLoader(none, seq_len=6).next_batch()
    x, _, cu = PackedLoader(none, seq_len=6, doc_aligned=False).next_batch()
    assert x.tolist() == [[1, 2, 3, 4, 5, 6]] and cu.tolist() == [0, 6]


def test_bad_arguments(tmp_path):
    files, _ = _split_shards(tmp_path, 14, [100], 10, 0.2)
    with pytest.raises(ValueError, match="positive"):
        PackedLoader(files, seq_len=0)
    with pytest.raises(ValueError, match="rank 2"):
        PackedLoader(files, seq_len=5, rank=2, world_size=2)
    with pytest.raises(ValueError, match="PackedLoader got no shard files"):
        PackedLoader([], seq_len=5)
    loader = PackedLoader(files, seq_len=5)
    with pytest.raises(ValueError, match="offset 101 out of range"):
        loader.load_state_dict({"shard": 0, "offset": 101, "epoch": 0})
    assert loader.state_dict() == {"shard": 0, "offset": 0, "epoch": 0}


def test_shard_loader_state_is_accepted(tmp_path):
    """The state keys are ShardLoader's: a run can switch loaders and resume at the next document start."""
    files, shards = _split_shards(tmp_path, 15, [300], 12, 0.2)
    dense = ShardLoader(files, batch_size=1, seq_len=10)
    _take(dense, 3)
    packed = PackedLoader(files, seq_len=10)
    packed.load_state_dict(dense.state_dict())
    x, _, _ = packed.next_batch()
    s = 30 + int(np.flatnonzero(shards[0][30:] == EOT)[0])
    assert x[0].tolist() == shards[0][s : s + 10].tolist()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("world", [1, 2])
def test_cuda_matches_cpu(tmp_path, world):
    """The pinned path: tokens and bounds in one staging buffer and one non_blocking copy, buffers reused."""
    files, _ = _split_shards(tmp_path, 16, [401, 233], 30, 0.3)
    for r in range(world):
        cpu = PackedLoader(files, seq_len=37, rank=r, world_size=world)
        gpu = PackedLoader(files, seq_len=37, rank=r, world_size=world, device="cuda")
        got = _take(gpu, 40)
        torch.cuda.synchronize()
        for (x, y, cu), (gx, gy, gcu) in zip(_take(cpu, 40), got):
            assert gx.is_cuda and gcu.is_cuda and gx.dtype == torch.int64 and gcu.dtype == torch.int32
            assert torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu()) and torch.equal(cu, gcu.cpu())


def test_doc_slots_pad_cu_seqlens_to_one_length(tmp_path):
    """With doc_slots (the trainer's: doc_slots_for(seq_len)) every cu_seqlens has doc_slots + 1 entries: the
    sequence's own bounds, then seq_len repeated (empty documents no position falls in); a sequence with more
    documents than slots widens to the next power of two. Tokens and the unpadded prefix are the plain loader's."""
    from tritonrun.data.loader import doc_slots_for, pad_bounds

    files, _ = _split_shards(tmp_path, 0, [300], 12, 0.3)
    plain, padded = _take(PackedLoader(files, seq_len=16), 20), _take(PackedLoader(files, seq_len=16, doc_slots=2), 20)
    widened = 0
    for (x, y, cu), (px, py, pcu) in zip(plain, padded):
        assert torch.equal(x, px) and torch.equal(y, py)
        n = len(cu)
        assert torch.equal(pcu[:n], cu) and (pcu[n:] == 16).all()
        assert len(pcu) == (3 if n <= 3 else 1 + (1 << (n - 2).bit_length())), (n, len(pcu))
        widened += n > 3
    assert widened, "a sequence with more documents than slots occurs in this corpus"
    assert pad_bounds(np.array([0, 5, 9], dtype=np.int32), 4).tolist() == [0, 5, 9, 9, 9]
    assert doc_slots_for(256) == 16 and doc_slots_for(65536) == 2048
    pos = np.arange(16)
    for (_, _, cu), (_, _, pcu) in zip(plain, padded):  # every position lies in the same document
        assert (np.searchsorted(cu.numpy(), pos, side="right") == np.searchsorted(pcu.numpy(), pos, side="right")).all()
