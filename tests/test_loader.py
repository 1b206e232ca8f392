"""ShardLoader: llm.c batch order across shards and epochs, resumable state, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tritonrun.data.loader import ShardLoader
from tritonrun.data.shards import ShardError, write_shard


def _make_shards(tmp_path: Path, lengths: list[int]) -> tuple[list[Path], list[np.ndarray]]:
    """Shards whose tokens say where they come from: shard i, position j holds 1000*i + j."""
    files, streams = [], []
    for i, n in enumerate(lengths):
        tokens = 1000 * i + np.arange(n)
        path = tmp_path / f"t_train_{i + 1:06d}.bin"
        write_shard(path, tokens)
        files.append(path)
        streams.append(tokens)
    return files, streams


def _expected(streams: list[np.ndarray], B: int, T: int, n_batches: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """llm.c order written out: shard i yields (len_i - 1) // (B*T) chunks at offsets 0, BT, 2BT, ...,
    each B*T+1 tokens long; the shard tail is skipped; shards follow each other and then wrap around."""
    out = []
    while len(out) < n_batches:
        for s in streams:
            for k in range((len(s) - 1) // (B * T)):
                chunk = s[k * B * T : k * B * T + B * T + 1]
                out.append((chunk[:-1].reshape(B, T), chunk[1:].reshape(B, T)))
    return out[:n_batches]


def _take(loader: ShardLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def _assert_same(got, want) -> None:
    assert len(got) == len(want)
    for step, ((x, y), (ex, ey)) in enumerate(zip(got, want)):
        assert x.dtype == y.dtype == torch.int64, step
        assert x.device.type == "cpu"
        np.testing.assert_array_equal(x.numpy(), ex, err_msg=f"x at batch {step}")
        np.testing.assert_array_equal(y.numpy(), ey, err_msg=f"y at batch {step}")


def test_hand_written_order(tmp_path):
    # B*T = 6, chunks of 7: shard 0 (14 tokens) gives offsets 0 and 6, shard 1 (7 tokens) gives offset 0,
    # then back to shard 0.
    files, _ = _make_shards(tmp_path, [14, 7])
    loader = ShardLoader(files, batch_size=2, seq_len=3)
    x, y = loader.next_batch()
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]] and y.tolist() == [[1, 2, 3], [4, 5, 6]]
    x, y = loader.next_batch()
    assert x.tolist() == [[6, 7, 8], [9, 10, 11]] and y.tolist() == [[7, 8, 9], [10, 11, 12]]
    assert (loader.shard, loader.offset, loader.epoch) == (0, 12, 0)
    x, y = loader.next_batch()  # 12 + 7 > 14: tail token 13 is skipped
    assert x.tolist() == [[1000, 1001, 1002], [1003, 1004, 1005]]
    assert y.tolist() == [[1001, 1002, 1003], [1004, 1005, 1006]]
    x, _ = loader.next_batch()  # wrap to the first shard
    assert x.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert (loader.shard, loader.epoch) == (0, 1)


@pytest.mark.parametrize(
    "lengths, B, T",
    [
        ([100], 2, 5),  # one shard, many wraps
        ([61, 11, 40], 2, 5),  # 61 = 6*10 + 1 fits exactly; 11 = one chunk exactly
        ([97, 53, 131, 23], 3, 7),  # odd sizes, tails skipped
        ([1 + 4 * 13], 4, 13),  # shard holds exactly one chunk
    ],
)
def test_order_matches_llmc_rule(tmp_path, lengths, B, T):
    files, streams = _make_shards(tmp_path, lengths)
    loader = ShardLoader(files, batch_size=B, seq_len=T)
    per_epoch = sum((n - 1) // (B * T) for n in lengths)
    n = 3 * per_epoch + 2
    _assert_same(_take(loader, n), _expected(streams, B, T, n))
    assert loader.epoch == (n - 1) // per_epoch  # wraps completed before the last batch


def test_batch_shapes_and_shift(tmp_path):
    files, _ = _make_shards(tmp_path, [200])
    x, y = ShardLoader(files, batch_size=3, seq_len=11).next_batch()
    assert x.shape == y.shape == (3, 11)
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


@pytest.mark.parametrize("k", [0, 1, 5, 7, 8, 15, 23])
def test_state_dict_resume(tmp_path, k):
    files, _ = _make_shards(tmp_path, [61, 11, 40])  # 6 + 1 + 3 = 10 batches per epoch at B*T = 10
    loader = ShardLoader(files, batch_size=2, seq_len=5)
    _take(loader, k)
    state = loader.state_dict()
    assert set(state) == {"shard", "offset", "epoch"}
    continued = _take(loader, 12)

    fresh = ShardLoader(files, batch_size=2, seq_len=5)
    fresh.load_state_dict(dict(state))
    assert fresh.state_dict() == state
    resumed = _take(fresh, 12)
    for (x, y), (rx, ry) in zip(continued, resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert fresh.state_dict() == loader.state_dict()


def test_reset(tmp_path):
    files, streams = _make_shards(tmp_path, [61, 11])
    loader = ShardLoader(files, batch_size=2, seq_len=5)
    _take(loader, 9)
    assert loader.epoch == 1
    loader.reset()
    assert loader.state_dict() == {"shard": 0, "offset": 0, "epoch": 0}
    _assert_same(_take(loader, 8), _expected(streams, 2, 5, 8))


@pytest.mark.parametrize(
    "state, match",
    [
        ({"shard": 2, "offset": 0, "epoch": 0}, "shard 2 out of range"),
        ({"shard": -1, "offset": 0, "epoch": 0}, "shard -1 out of range"),
        ({"shard": 1, "offset": 12, "epoch": 0}, "offset 12 out of range"),
        ({"shard": 0, "offset": -1, "epoch": 0}, "offset -1 out of range"),
        ({"shard": 0, "offset": 0, "epoch": -1}, "epoch -1"),
        ({"shard": 0, "offset": 0}, "missing"),
    ],
)
def test_load_state_dict_validates(tmp_path, state, match):
    files, _ = _make_shards(tmp_path, [61, 11])
    loader = ShardLoader(files, batch_size=2, seq_len=5)
    with pytest.raises(ValueError, match=match):
        loader.load_state_dict(state)
    assert loader.state_dict() == {"shard": 0, "offset": 0, "epoch": 0}  # unchanged


def test_state_at_end_of_shard_moves_on(tmp_path):
    files, streams = _make_shards(tmp_path, [61, 11])
    loader = ShardLoader(files, batch_size=2, seq_len=5)
    loader.load_state_dict({"shard": 0, "offset": 61, "epoch": 0})  # at the very end: next batch is shard 1
    _assert_same(_take(loader, 1), _expected(streams, 2, 5, 7)[6:])


def test_empty_file_list():
    with pytest.raises(ValueError, match="no shard files"):
        ShardLoader([], batch_size=2, seq_len=5)


def test_shard_too_small(tmp_path):
    files, _ = _make_shards(tmp_path, [61, 10])  # second shard is one token short of B*T+1 = 11
    with pytest.raises(ValueError) as info:
        ShardLoader(files, batch_size=2, seq_len=5)
    msg = str(info.value)
    assert str(files[1]) in msg and "10 tokens" in msg and "11" in msg


def test_bad_shard_fails_up_front(tmp_path):
    files, _ = _make_shards(tmp_path, [61, 11])
    with open(files[1], "r+b") as f:
        f.truncate(1030)
    with pytest.raises(ShardError, match="truncated"):
        ShardLoader(files, batch_size=2, seq_len=5)


@pytest.mark.parametrize("B, T", [(0, 5), (2, 0)])
def test_bad_sizes(tmp_path, B, T):
    files, _ = _make_shards(tmp_path, [61])
    with pytest.raises(ValueError, match="positive"):
        ShardLoader(files, batch_size=B, seq_len=T)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_matches_cpu(tmp_path):
    files, _ = _make_shards(tmp_path, [97, 53, 131])
    cpu = ShardLoader(files, batch_size=3, seq_len=7)
    gpu = ShardLoader(files, batch_size=3, seq_len=7, device="cuda")
    for _ in range(40):
        (x, y), (gx, gy) = cpu.next_batch(), gpu.next_batch()
        assert gx.is_cuda and gx.dtype == torch.int64
        assert torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
@pytest.mark.parametrize("world", [2, 3])
def test_cuda_ranks_match_cpu_ranks(tmp_path, world):
    """The pinned staging path under DDP: each rank stages only its own chunk (B*T+1 tokens)."""
    files, _ = _make_shards(tmp_path, [97, 53 * world, 131 * world])
    for r in range(world):
        cpu = ShardLoader(files, 3, 7, rank=r, world_size=world)
        gpu = ShardLoader(files, 3, 7, rank=r, world_size=world, device="cuda")
        for _ in range(20):
            (x, y), (gx, gy) = cpu.next_batch(), gpu.next_batch()
            assert torch.equal(x, gx.cpu()) and torch.equal(y, gy.cpu())


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_interleave_single_process_order(tmp_path, world):
    """Rank r's k-th batch is the single-process loader's (k*world + r)-th batch, across a shard change."""
    B, T = 2, 3
    files, _ = _make_shards(tmp_path, [6 * 3 * world + 1, 6 * 2 * world + 1])  # whole spans, no tails
    single = _take(ShardLoader(files, B, T), 5 * world)
    ranks = [ShardLoader(files, B, T, rank=r, world_size=world) for r in range(world)]
    for k in range(5):
        for r, loader in enumerate(ranks):
            x, y = loader.next_batch()
            assert torch.equal(x, single[k * world + r][0]) and torch.equal(y, single[k * world + r][1])
    states = {tuple(sorted(loader.state_dict().items())) for loader in ranks}
    assert len(states) == 1, "all ranks share one position"


def test_rank_out_of_range(tmp_path):
    files, _ = _make_shards(tmp_path, [100])
    with pytest.raises(ValueError, match="rank 2"):
        ShardLoader(files, 2, 3, rank=2, world_size=2)


def test_bad_token_id_fails_when_its_shard_is_opened(tmp_path):
    """The shard at the loader's position is checked at construction (and on load_state_dict); a later shard when
    the loader reaches it. The error names the file and the first bad position, instead of an IndexError in
    the embedding after training started."""
    files, _ = _make_shards(tmp_path, [61, 61])
    write_shard(files[1], np.r_[np.arange(40), 50300, np.arange(20)])  # 50300: inside the vocabulary padding
    loader = ShardLoader(files, batch_size=2, seq_len=5)  # shard 0 is fine
    _take(loader, 6)  # all of shard 0's chunks
    with pytest.raises(ShardError, match=rf"{files[1]}: token id 50300 at position 40 "):
        loader.next_batch()
    with pytest.raises(ShardError, match="position 40"):
        ShardLoader(files, batch_size=2, seq_len=5).load_state_dict({"shard": 1, "offset": 0, "epoch": 0})
    with pytest.raises(ShardError, match="position 40"):
        ShardLoader(files[1:], batch_size=2, seq_len=5)  # e.g. the val loader: at startup
