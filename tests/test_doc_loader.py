"""tritonrun/data/doc_loader.py: record #89's batches on hand-built shards. (Outside the repo, the record's own
Shard.next_batch and this loader gave the same x, y and cu_seqlens for 200 batches of a synthetic corpus, across a
stage change, a shard switch, and for each rank of 2.)"""
import numpy as np
import pytest

from tritonrun.data.doc_loader import DocPackLoader
from tritonrun.data.shards import write_shard

E = 50256


def doc(length: int, tag: int) -> list[int]:
    """A document: EOT then length - 1 tokens equal to tag (so each token says which document it came from)."""
    return [E] + [tag] * (length - 1)


def make(tmp_path, *shards):
    files = []
    for k, toks in enumerate(shards):
        f = tmp_path / f"x_train_{k:06d}.bin"
        write_shard(f, np.array(toks, dtype=np.uint16))
        files.append(f)
    return files


def test_documents_are_cut_at_max_len_and_the_last_fills_the_batch(tmp_path):
    # a leading piece, then documents of 5, 12, 4, 9 and 12 tokens
    toks = [7, 7] + doc(5, 1) + doc(12, 2) + doc(4, 3) + doc(9, 4) + doc(12, 5)
    (f,) = make(tmp_path, toks)
    ld = DocPackLoader([f], tokens=14, max_doc_len=8, doc_slots=4)
    x, y, cu = ld.next_batch()
    # 5 tokens of doc 1, 8 of doc 2 (cut at max_doc_len), then 2 of doc 3 fill 14 + 1
    buf = doc(5, 1) + doc(12, 2)[:8] + doc(4, 3)[:2]
    assert x[0].tolist() == buf[:-1] and y[0].tolist() == buf[1:]
    assert cu.tolist() == [0, 5, 13, 14, 14]  # the last document's last token is only a target; padded with 14
    x, _, cu = ld.next_batch()  # the rest of doc 3 is skipped: the next batch starts at doc 4
    assert x[0].tolist()[:9] == doc(9, 4)[:8] + [E] and cu.tolist()[:3] == [0, 8, 14]  # doc 4 cut at 8
    # read: the leading 2 + docs 1-3 (21 tokens to doc 4's start) + docs 4, 5 up to the shard end in batch 2
    assert ld.read_tokens == 2 + 5 + 12 + 4 + 9 + 12 and ld.skipped_tokens == ld.read_tokens - 2 * 15
    # a third batch: no document start left in the shard (the record's StopIteration): the whole rest is skipped
    # and, with one shard, reading starts over at its first document (epoch 1)
    assert ld.next_batch()[0][0].tolist()[:5] == doc(5, 1) and ld.epoch == 1


def test_ranks_interleave_like_micro_batches_and_state_resumes(tmp_path):
    rng = np.random.default_rng(1)
    toks = []
    for i in range(300):
        toks += doc(int(rng.integers(2, 60)), i % 50_000)
    files = make(tmp_path, toks)
    single = DocPackLoader(files, tokens=64, max_doc_len=40, doc_slots=8)
    ranks = [DocPackLoader(files, tokens=64, max_doc_len=40, doc_slots=8, rank=r, world_size=2) for r in range(2)]
    for step in range(10):
        for r in range(2):
            a, b = single.next_batch(), ranks[r].next_batch()
            assert all(u.tolist() == v.tolist() for u, v in zip(a, b)), (step, r)
    state = single.state_dict()
    want = [single.next_batch()[0].tolist() for _ in range(3)]
    again = DocPackLoader(files, tokens=64, max_doc_len=40, doc_slots=8)
    again.load_state_dict(state)
    assert [again.next_batch()[0].tolist() for _ in range(3)] == want


def test_a_shard_that_runs_out_hands_over_to_the_next(tmp_path):
    """Documents left in shard 0 cannot fill a batch: its tail is skipped, the batch comes from shard 1's first
    document; a stage change (set_batch) takes effect at the next batch."""
    files = make(tmp_path, doc(10, 1) + doc(10, 2) + doc(3, 3), [5] + doc(30, 4) + doc(30, 5))
    ld = DocPackLoader(files, tokens=15, max_doc_len=30, doc_slots=4)
    assert ld.next_batch()[0][0].tolist() == doc(10, 1) + doc(10, 2)[:5]
    x, _, _ = ld.next_batch()  # doc 3 alone (3 tokens, the shard's last) cannot fill 16
    assert ld.shard == 1 and x[0].tolist() == doc(30, 4)[:15]
    ld.set_batch(20, 30)
    assert ld.next_batch()[0][0].tolist() == doc(30, 5)[:20]


def test_not_enough_documents_anywhere_is_one_error(tmp_path):
    files = make(tmp_path, doc(4, 1) * 3 + [1] * 30)
    ld = DocPackLoader(files, tokens=12, max_doc_len=3, doc_slots=4)
    with pytest.raises(ValueError, match="no shard holds enough documents"):
        ld.next_batch()


def test_cuda_staging_holds_a_batch_of_one_token_documents(tmp_path):
    """The worst case for the bounds: every document one or two tokens (more documents than doc_slots, so the bounds
    grow to the next power of two): ids + bounds fit the pinned staging buffer a CUDA loader allocates."""
    files = make(tmp_path, ([E] + [E, 1] * 3 + [E, 2, 2, 2]) * 40)
    ld = DocPackLoader(files, tokens=14, max_doc_len=4, doc_slots=4)
    for _ in range(5):
        x, _, cu = ld.next_batch()
        assert cu.numel() > 5 and x.numel() + 1 + cu.numel() <= DocPackLoader._staging(14, 4)
