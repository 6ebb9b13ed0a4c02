"""Steered decoding on scripted step functions with known answers: n-best, constrained and diverse
beam search against brute force and against beam.py's search; sampling's seeds, greedy limit and
frequencies."""

import itertools

import numpy as np
import pytest
from test_beam import END, GREEDY_PRUNED, NEVER_ENDS, OPEN_BEAM_WINS, SHORT_VS_LONG, START, random_model, scripted

from captioning.beam import beam_search, normalised
from captioning.steer import check_constraints, constraint_ids, sample, steered_search


def prefix_model(n_tokens, seed, items=2):
    """test_beam.random_model: every prefix its own distribution; tokens 1.. are words, 0 <end>."""
    step_fn, _ = random_model(n_tokens, seed)

    def state():
        holder = np.empty(items, dtype=object)
        holder[:] = [()] * items
        return (np.arange(items), holder)

    def log_prob(item, words):  # the caption's words, then <end>
        holder = np.empty(1, dtype=object)
        holder[0] = ()
        out, st = step_fn(np.array([-1]), (np.array([item]), holder))
        total = 0.0
        for w in words:
            total += out[0][w]
            out, st = step_fn(np.array([w]), st)
        return total + out[0][0]

    return step_fn, state, log_prob


def every_caption(n_tokens, max_length):
    for k in range(max_length + 1):
        yield from itertools.product(range(1, n_tokens), repeat=k)


def ranked(log_prob, item, n_tokens, max_length, alpha, keep=lambda words: True):
    out = []
    for words in every_caption(n_tokens, max_length):
        if keep(words):
            raw = log_prob(item, words)
            out.append((normalised(raw, len(words) + 1, alpha), list(words), raw))
    return sorted(out, key=lambda h: -h[0])


def contains(words, phrase):
    return any(tuple(words[i : i + len(phrase)]) == phrase for i in range(len(words) - len(phrase) + 1))


SCRIPTED = [NEVER_ENDS, SHORT_VS_LONG, OPEN_BEAM_WINS, GREEDY_PRUNED]


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_with_nothing_steered_it_is_beam_py_search(beam, alpha):
    for max_length in (1, 3, 5):
        step_fn, _ = scripted(SCRIPTED)
        want = beam_search(step_fn, (np.arange(4),), 4, beam, max_length, START, END, alpha)
        got = steered_search(step_fn, (np.arange(4),), 4, beam, max_length, START, END, alpha)
        assert [h[0].tokens for h in got] == want[0]
        assert [h[0].score for h in got] == want[1] and [h[0].log_prob for h in got] == want[2]
        diverse = steered_search(step_fn, (np.arange(4),), 4, beam, max_length, START, END, alpha, diversity=0.0)
        assert diverse == got  # one group, no penalty: today's search


@pytest.mark.parametrize("n_tokens, max_length, alpha, seed", [(4, 3, 0.0, 0), (5, 3, 0.7, 1), (4, 4, 0.0, 2)])
def test_n_best_with_a_wide_beam_is_the_brute_force_n_best(n_tokens, max_length, alpha, seed):
    step_fn, state, log_prob = prefix_model(n_tokens, seed)
    got = steered_search(step_fn, state(), 2, n_tokens**max_length, max_length, -1, 0, alpha, n_best=4)
    for item in range(2):
        exact = ranked(log_prob, item, n_tokens, max_length, alpha)[:4]
        assert [h.tokens for h in got[item]] == [e[1] for e in exact]
        np.testing.assert_allclose([h.log_prob for h in got[item]], [e[2] for e in exact], atol=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_constrained_with_a_wide_beam_is_the_brute_force_best_that_satisfies(seed):
    n_tokens, max_length = 5, 4
    step_fn, state, log_prob = prefix_model(n_tokens, seed)
    constraints = [[(2,), (4,)], [(3, 1)]]  # "2" or "4", and the phrase "3 1"

    def ok(words):
        return (contains(words, (2,)) or contains(words, (4,))) and contains(words, (3, 1))

    got = steered_search(
        step_fn, state(), 2, n_tokens**max_length, max_length, -1, 0, n_best=3, constraints=constraints
    )
    for item in range(2):
        exact = ranked(log_prob, item, n_tokens, max_length, 0.0, ok)[:3]
        assert [h.tokens for h in got[item]] == [e[1] for e in exact]
        assert all(ok(h.tokens) for h in got[item])
    narrow = steered_search(step_fn, state(), 2, 2, max_length, -1, 0, constraints=constraints)
    assert all(ok(h[0].tokens) for h in narrow)  # every answer meets them, even with 2 beams per state


def test_diverse_groups_give_one_caption_each_and_differ():
    step_fn, state, _ = prefix_model(6, 3)
    plain = steered_search(step_fn, state(), 2, 4, 4, -1, 0, n_best=4)
    diverse = steered_search(step_fn, state(), 2, 1, 4, -1, 0, groups=4, diversity=2.0)
    for item in range(2):
        assert len(diverse[item]) == 4  # G = beam size: one caption per group
        firsts = {tuple(h.tokens[:1]) for h in diverse[item]}
        assert len(firsts) >= len({tuple(h.tokens[:1]) for h in plain[item]})
        scores = [h.score for h in diverse[item]]
        assert scores == sorted(scores, reverse=True)
    same = steered_search(step_fn, state(), 2, 1, 4, -1, 0, groups=4, diversity=0.0)
    assert all(len({tuple(h.tokens) for h in same[i]}) == 1 for i in range(2))  # no penalty: all alike


def test_trigram_blocking():
    # <end> is never likely (1e-12): every caption runs to max_length; the likeliest one loops.
    loop = {START: {3: 1.0}, 3: {4: 0.99, 6: 0.01}, 4: {5: 0.99, 6: 0.01}, 5: {3: 0.9, 6: 0.1}, 6: {6: 0.5, 7: 0.5}}
    loop[7] = {6: 0.5, 7: 0.5}
    step_fn, _ = scripted([loop])
    (free,) = steered_search(step_fn, (np.arange(1),), 1, 2, 7, START, END)
    (blocked,) = steered_search(step_fn, (np.arange(1),), 1, 2, 7, START, END, block_trigrams=True)
    assert free[0].tokens == [3, 4, 5, 3, 4, 5, 3]
    trigrams = lambda s: [tuple(s[i : i + 3]) for i in range(len(s) - 2)]  # noqa: E731
    assert len(set(trigrams(free[0].tokens))) < len(trigrams(free[0].tokens))  # it loops
    assert len(set(trigrams(blocked[0].tokens))) == len(trigrams(blocked[0].tokens))


def test_constraint_errors():
    from captioning.vocab import SPECIALS, Vocabulary

    vocab = Vocabulary([*SPECIALS, "dog", "dogs", "red", "shirt"])
    assert constraint_ids(vocab, ["dog|dogs", "red shirt"]) == [[(4,), (5,)], [(6, 7)]]
    with pytest.raises(ValueError, match="'cat' is not in the model's vocabulary"):
        constraint_ids(vocab, ["cat|dog"])
    with pytest.raises(ValueError, match="need at least 3 words, more than max_length 2"):
        check_constraints([[(4,)], [(6, 7)]], 2)


def test_sampling_is_seeded_greedy_at_top_k_1_and_follows_the_distribution():
    step_fn, _ = scripted(SCRIPTED)
    args = (step_fn, (np.arange(4),), 4, 3, 5, START, END)
    a, b = sample(*args, seed=1), sample(*args, seed=1)
    assert a == b and a != sample(*args, seed=2)
    greedy = beam_search(step_fn, (np.arange(4),), 4, 1, 5, START, END)
    for item, caps in enumerate(sample(*args, top_k=1, seed=3)):
        assert all(c.tokens == greedy[0][item] and c.log_prob == pytest.approx(greedy[2][item]) for c in caps)
    # One step: the first word's frequencies against the scripted probabilities (chi-square, 3 dof).
    first = {START: {3: 0.5, 4: 0.3, 5: 0.15, END: 0.05}}
    one, _ = scripted([first])
    n = 20_000
    words = [c.tokens[0] if c.tokens else END for c in sample(one, (np.arange(1),), 1, n, 1, START, END, seed=0)[0]]
    counts = np.array([words.count(w) for w in (3, 4, 5, END)])
    expected = n * np.array([0.5, 0.3, 0.15, 0.05])
    assert ((counts - expected) ** 2 / expected).sum() < 16.3  # p = 0.001 for 3 degrees of freedom
    nucleus = sample(one, (np.arange(1),), 1, 2000, 1, START, END, top_p=0.7, seed=0)[0]
    assert {tuple(c.tokens) for c in nucleus} == {(3,), (4,)}  # 0.5 + 0.3 reach 0.7: the rest cut
    with pytest.raises(ValueError, match="temperature > 0"):
        sample(*args, temperature=0)
