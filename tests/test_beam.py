"""Beam search against scripted step functions with exact expected outputs."""

import numpy as np
import pytest

from captioning.beam import beam_search

START, END, A, B = 1, 2, 3, 4
V = 5


def scripted(tables):
    """Step function whose next-token probabilities depend on (item, last token) only.

    ``tables[item][last] = {token: prob}``; state = (item id per row,), so a wrong reordering
    of beams across items would read the wrong table.
    """
    calls = []

    def step_fn(tokens, state):
        (items,) = state
        out = np.full((len(tokens), V), np.log(1e-12))
        for row, (item, last) in enumerate(zip(items, tokens)):
            for tok, p in tables[int(item)].get(int(last), {END: 1.0}).items():  # unscripted: end
                out[row, tok] = np.log(p)
        calls.append(len(tokens))
        return out, state

    return step_fn, calls


# greedy follows "a" forever: <end> is never the best next token after "a"
NEVER_ENDS = {START: {A: 0.5, B: 0.4, END: 0.1}, A: {A: 0.35, B: 0.34, END: 0.31}, B: {END: 0.9, A: 0.05, B: 0.05}}
# a short caption wins on raw log-probability, a longer one after length normalisation
SHORT_VS_LONG = {START: {A: 0.7, B: 0.3}, A: {A: 0.6, B: 0.3, END: 0.1}, B: {END: 0.8, A: 0.1, B: 0.1}}


def run(tables, beam, max_length=4, alpha=0.0):
    step_fn, calls = scripted(tables)
    seqs, scores = beam_search(step_fn, (np.arange(len(tables)),), len(tables), beam, max_length, START, END, alpha)
    return seqs, scores, calls


def test_greedy_without_end_finishes_at_max_length():
    seqs, scores, calls = run([NEVER_ENDS], beam=1, max_length=4)
    assert seqs == [[A, A, A, A]]
    assert scores[0] == pytest.approx(np.log(0.5) + 3 * np.log(0.35))
    assert calls == [1, 1, 1, 1]  # exactly max_length steps, then stops


def test_beam_finds_the_better_short_caption():
    seqs, scores, _ = run([NEVER_ENDS], beam=2)
    assert seqs == [[B]]
    assert scores[0] == pytest.approx(np.log(0.4 * 0.9))


def test_length_normalisation_changes_the_winner():
    raw, raw_scores, calls = run([SHORT_VS_LONG], beam=2, alpha=0.0)
    norm, norm_scores, _ = run([SHORT_VS_LONG], beam=2, alpha=1.0)
    assert raw == [[B]] and raw_scores[0] == pytest.approx(np.log(0.3 * 0.8))
    assert norm == [[A, B]] and norm_scores[0] == pytest.approx(np.log(0.7 * 0.3 * 0.8) / 3)
    assert calls == [2, 2, 2]  # stops once beam_size hypotheses have finished


def test_batched_items_do_not_mix():
    seqs, _, _ = run([NEVER_ENDS, SHORT_VS_LONG, NEVER_ENDS], beam=2)
    assert seqs == [[B], [B], [B]]
    seqs, _, _ = run([SHORT_VS_LONG, NEVER_ENDS], beam=1, max_length=4)
    # greedy on SHORT_VS_LONG: a a a a (never ends: A -> A is always best)
    assert seqs == [[A, A, A, A], [A, A, A, A]]


def test_beam_larger_than_vocab_still_terminates():
    seqs, _, _ = run([NEVER_ENDS], beam=8, max_length=3)
    assert seqs == [[B]]
