"""Batch order (plain, length-bucketed, block-shuffled), the prefetch thread and FeatureRows reads."""

import threading

import h5py
import numpy as np
import pytest

from captioning.batching import batch_order, prefetch
from captioning.feature_store import FeatureStore, hash_features

LENGTHS = np.random.default_rng(0).integers(3, 21, 500)  # 500 captions of 3-20 tokens
ROWS = np.repeat(np.arange(100), 5)  # 5 captions per image, 100 images


def padding(batches):
    return sum(int(LENGTHS[b].max()) * len(b) - int(LENGTHS[b].sum()) for b in batches)


@pytest.mark.parametrize("bucket,block", [(0, 1), (4, 1), (0, 10), (4, 10)])
def test_every_caption_once_and_the_same_order_from_the_same_seed(bucket, block):
    def order(seed):
        return batch_order(LENGTHS, ROWS, 16, np.random.default_rng(seed), bucket=bucket, block=block)

    a = order(1)
    assert sorted(np.concatenate(a).tolist()) == list(range(500))
    assert all(len(b) <= 16 for b in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, order(1))) and len(a) == len(order(1))
    assert not all(np.array_equal(x, y) for x, y in zip(a, order(2)))


def test_plain_order_is_the_seeded_permutation_cut_into_batches():
    got = batch_order(LENGTHS, ROWS, 16, np.random.default_rng(5))
    perm = np.random.default_rng(5).permutation(500)
    assert [b.tolist() for b in got] == [perm[i : i + 16].tolist() for i in range(0, 500, 16)]


def test_buckets_group_similar_lengths():
    plain = batch_order(LENGTHS, ROWS, 16, np.random.default_rng(3))
    bucketed = batch_order(LENGTHS, ROWS, 16, np.random.default_rng(3), bucket=8)
    assert padding(bucketed) < 0.25 * padding(plain)
    # batches are shuffled across the epoch, not served short to long
    firsts = [int(LENGTHS[b].max()) for b in bucketed]
    assert firsts != sorted(firsts)


def test_blocks_keep_a_batch_within_few_runs_of_the_file():
    order = batch_order(LENGTHS, ROWS, 16, np.random.default_rng(3), block=10)
    for b in order:  # 16 captions of 5 per image span at most 2 blocks of 10 images
        assert len(set((ROWS[b] // 10).tolist())) <= 2
    flat = np.concatenate(order)
    blocks = ROWS[flat] // 10
    assert (np.diff(blocks) != 0).sum() == 9  # each block visited once, in one stretch
    assert blocks.tolist() != sorted(blocks.tolist())  # in a shuffled block order


def test_prefetch_keeps_order_raises_errors_and_stops_early():
    assert list(prefetch(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise ValueError("bad row")

    got = []
    with pytest.raises(ValueError, match="bad row"):
        for x in prefetch(failing()):
            got.append(x)
    assert got == [1]

    produced = []

    def endless():
        i = 0
        while True:
            produced.append(i)
            yield i
            i += 1

    for x in prefetch(endless(), depth=2):
        if x == 5:
            break
    assert len(produced) <= 5 + 1 + 3  # at most depth (+ one in hand) ahead when stopped
    assert not any(t.name == "prefetch" for t in threading.enumerate())


@pytest.fixture
def store(tmp_path):
    feats = np.random.default_rng(0).normal(size=(40, 3, 5)).astype(np.float16)
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["spatial"], f["pooled"] = feats, feats.mean(1)
        f.create_dataset("images", data=np.array([f"k{i}" for i in range(40)], dtype=object), dtype=h5py.string_dtype())
        f.attrs["content_hash"] = hash_features(f["spatial"], f["pooled"])
    return FeatureStore(tmp_path / "f.h5"), feats.astype(np.float32)


def test_feature_rows_read_what_the_array_would_hold(store):
    store, feats = store
    keys = [f"k{i}" for i in (7, 3, 30, 31, 32, 0)]
    want = feats[[7, 3, 30, 31, 32, 0]]
    with store.rows(keys) as rows:
        assert rows.shape == (6, 3, 5) and len(rows) == 6
        idx = np.array([5, 2, 2, 3, 4, 0, 1, 2])  # unsorted, repeats, a run (rows 30-32)
        np.testing.assert_array_equal(rows[idx], want[idx])
        np.testing.assert_array_equal(rows[1:4], want[1:4])
        np.testing.assert_array_equal(rows[3], want[3])
        assert rows[idx].dtype == np.float32
    np.testing.assert_array_equal(store.load(keys), want)
    np.testing.assert_array_equal(
        store.load(keys, pooled=True), feats.astype(np.float16).mean(1).astype(np.float32)[[7, 3, 30, 31, 32, 0]]
    )


def test_feature_rows_read_runs_of_rows_in_one_call_each(store, monkeypatch):
    store, _ = store
    calls = []
    real = h5py.Dataset.read_direct
    monkeypatch.setattr(h5py.Dataset, "read_direct", lambda self, *a: calls.append(a[1]) or real(self, *a))
    with store.rows([f"k{i}" for i in range(40)]) as rows:
        rows[np.array([12, 10, 11, 30, 31, 5, 10])]
    assert calls == [np.s_[5:6], np.s_[10:13], np.s_[30:32]]


def test_missing_keys_and_content_hash(store):
    store, _ = store
    from captioning.errors import CaptioningError

    with pytest.raises(CaptioningError, match=r"no features for 1 images \(first: nope\)"):
        store.rows(["k1", "nope"])
    with h5py.File(store.path) as f:
        assert store.content_hash() == hash_features(f["spatial"], f["pooled"])
    a, b = store.rows(["k1", "k2"]), store.rows(["k2", "k1"])
    assert a.identity() != b.identity() and a.identity() == store.rows(["k1", "k2"]).identity()
