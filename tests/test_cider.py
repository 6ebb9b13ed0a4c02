"""The SCST reward equals pycocoevalcap's CIDEr-D, to 1e-6, on a fixture with the hard cases."""

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from captioning.cider import CiderD, ngram_keys

REFS = {
    "a": ["a dog runs on the grass", "a brown dog is running", "the dog runs in a field"],
    "b": ["two children play in the snow", "kids playing in snow", "two kids in the snow"],
    "c": ["a man rides a bike", "a man on a bicycle", "a person riding a bike down the street"],
    "d": ["a dog", "a dog a dog a dog", "dog"],  # repeats: the clipping matters
    "e": ["a cat sleeps", "a cat on a sofa"],
}
HYPS = {
    "a": "a dog runs on the grass",  # equals a reference
    "b": "two two two kids in in the snow snow",  # repeated n-grams
    "c": "a bike",  # much shorter: the length penalty
    "d": "cat",  # nothing in common
    "e": "",  # a sample that drew <end> first
}


def ids(words, vocab):
    return [vocab.setdefault(w, len(vocab) + 1) for w in words.split()]


def test_equals_pycocoevalcap_to_1e6():
    expected_mean, expected = Cider().compute_score({k: REFS[k] for k in REFS}, {k: [HYPS[k]] for k in REFS})
    vocab = {}
    refs = [[ids(r, vocab) for r in REFS[k]] for k in REFS]
    hyps = [ids(HYPS[k], vocab) for k in REFS]
    scorer = CiderD(refs, base=len(vocab) + 1)
    got = scorer.scores(hyps, refs)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert got.mean() == pytest.approx(expected_mean, abs=1e-6)
    assert got[0] > got[2] > got[3] == 0.0


def test_ngram_keys_never_collide_across_lengths():
    keys, sizes = ngram_keys([3, 1, 2], base=4)
    assert sorted(keys.tolist()) == sorted([3, 1, 2, 3 * 4 + 1, 1 * 4 + 2, 3 * 16 + 1 * 4 + 2])
    assert sizes.tolist() == [1, 1, 1, 2, 2, 3]
    assert len(set(keys.tolist())) == 6
