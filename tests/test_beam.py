"""Beam search against scripted step functions with exact expected outputs, and against brute force."""

import itertools

import numpy as np
import pytest

from captioning.beam import beam_search

START, END, A, B, C, D, E, F = 1, 2, 3, 4, 5, 6, 7, 8
V = 9


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
# Two captions finish at step 2 from the beams "a" and "b" while the open beam "a c" (0.48) is
# better than both; stopping once beam_size captions finished returned "b" (0.36) at beam 2.
OPEN_BEAM_WINS = {START: {A: 0.6, B: 0.4}, A: {C: 0.8, END: 0.1, D: 0.1}, B: {END: 0.9, D: 0.1}}
# The empty caption (0.30) and "b" (0.20) finish first; greedy's "a c" (0.45) is better.
EMPTY_LOSES = {START: {A: 0.5, END: 0.3, B: 0.2}, A: {C: 0.9, D: 0.1}, B: {END: 1.0}}
# Plain beam 2 keeps "a" and "b", then prunes greedy's "a d" (0.144) for "b e" and "b f" (0.165
# each), which never end: it would return a caption of probability ~1e-12. Beam 3 keeps "c".
GREEDY_PRUNED = {
    START: {A: 0.36, B: 0.33, C: 0.31},
    A: {D: 0.4, END: 0.3, C: 0.3},
    B: {E: 0.5, F: 0.5},
    C: {END: 1.0},
    E: {F: 1.0},
    F: {E: 1.0},
}


def run(tables, beam, max_length=4, alpha=0.0):
    step_fn, calls = scripted(tables)
    seqs, scores, raw = beam_search(
        step_fn, (np.arange(len(tables)),), len(tables), beam, max_length, START, END, alpha
    )
    return seqs, scores, raw, calls


def test_greedy_without_end_stops_at_max_length_words():
    seqs, scores, raw, calls = run([NEVER_ENDS], beam=1, max_length=4)
    assert seqs == [[A, A, A, A]]  # max_length words, never more
    # scored as the complete caption: its words and the <end> that must follow them
    assert scores[0] == pytest.approx(np.log(0.5) + 3 * np.log(0.35) + np.log(0.31))
    assert raw == scores
    assert calls == [1] * 5  # max_length word steps and the closing <end>


def test_beam_finds_the_better_short_caption():
    seqs, scores, _, _ = run([NEVER_ENDS], beam=2)
    assert seqs == [[B]]
    assert scores[0] == pytest.approx(np.log(0.4 * 0.9))


@pytest.mark.parametrize("table, best, p", [(OPEN_BEAM_WINS, [A, C], 0.48), (EMPTY_LOSES, [A, C], 0.45)])
@pytest.mark.parametrize("beam", [1, 2, 3, 4])
def test_an_open_beam_that_can_still_win_is_not_dropped(table, best, p, beam):
    seqs, scores, _, _ = run([table], beam=beam)
    assert seqs == [best] and scores[0] == pytest.approx(np.log(p))


@pytest.mark.parametrize("beam, best, p", [(1, [A, D], 0.144), (2, [A, D], 0.144), (3, [C], 0.31)])
def test_beam_never_ends_below_greedy(beam, best, p):
    seqs, scores, _, _ = run([GREEDY_PRUNED], beam=beam, max_length=6)
    assert seqs == [best] and scores[0] == pytest.approx(np.log(p))


def test_stops_as_soon_as_no_open_beam_can_win():
    # raw scores: "b" (0.24) finishes at step 2; the open "a a a a" (0.151) falls below it at step 4
    seqs, scores, _, calls = run([SHORT_VS_LONG], beam=2, max_length=10)
    assert seqs == [[B]] and scores[0] == pytest.approx(np.log(0.3 * 0.8))
    assert calls == [1, 3, 3, 3]  # <start> once (every row starts the same), then 2 beams and the greedy row


def test_length_normalisation_changes_the_winner():
    norm, norm_scores, norm_raw, calls = run([SHORT_VS_LONG], beam=2, alpha=1.0)
    # a^k b <end> gains with k under alpha 1; the longest that fits 4 words is "a a a b"
    assert norm == [[A, A, A, B]]
    assert norm_raw[0] == pytest.approx(np.log(0.7 * 0.6 * 0.6 * 0.3 * 0.8))
    assert norm_scores[0] == pytest.approx(norm_raw[0] / 5)  # 4 words and <end>
    # the bound for alpha > 0 divides by the longest possible length: nothing stops early here
    assert calls == [1] + [3] * 4


def test_batched_items_do_not_mix():
    seqs, _, _, _ = run([NEVER_ENDS, SHORT_VS_LONG, OPEN_BEAM_WINS], beam=2)
    assert seqs == [[B], [B], [A, C]]
    seqs, _, _, _ = run([SHORT_VS_LONG, NEVER_ENDS], beam=1, max_length=4)
    assert seqs == [[A, A, A, A], [A, A, A, A]]  # greedy: a -> a is always the best next word


def test_beam_larger_than_vocab_still_terminates():
    seqs, _, _, _ = run([NEVER_ENDS], beam=8, max_length=3)
    assert seqs == [[B]]


def test_tokens_with_minus_inf_are_never_chosen():
    def step_fn(tokens, state):
        lp = np.log(np.full((len(tokens), V), 1.0 / (V - 3)))
        lp[:, [0, START, A]] = -np.inf  # what make_step_fn does for <pad>, <start>, <unk>
        return lp, state

    seqs, _, _ = beam_search(step_fn, (np.zeros(3),), 3, 20, 4, START, END)
    assert all(tok not in (0, START, A) for s in seqs for tok in s)


# ---- exactness: beam search with enough beams is brute-force enumeration --------------------


def random_model(n_tokens, seed, end=0):
    """A step function over prefixes: every distinct prefix gets its own random distribution.

    Tokens 1..n_tokens-1 are words, 0 is <end>; the state carries each row's prefix.
    """
    cache = {}

    def dist(item, prefix):
        key = (item, prefix)
        if key not in cache:
            rng = np.random.default_rng([seed, item, len(prefix), *prefix])
            cache[key] = np.log(rng.dirichlet(np.full(n_tokens, 0.6)))
        return cache[key]

    def step_fn(tokens, state):
        items, prefixes = state
        first = tokens[0] < 0  # the <start> token (-1) on the first call
        prefixes = [() if first else tuple(p) + (int(t),) for p, t in zip(prefixes, tokens)]
        out = np.stack([dist(int(i), p) for i, p in zip(items, prefixes)])
        holder = np.empty(len(prefixes), dtype=object)
        holder[:] = prefixes
        return out, (items, holder)

    def brute_force(item, max_length, alpha):
        best = (-np.inf, None, None)
        for k in range(max_length + 1):
            for words in itertools.product(range(1, n_tokens), repeat=k):
                raw = sum(dist(item, words[:i])[w] for i, w in enumerate(words)) + dist(item, words)[end]
                norm = raw / (k + 1) ** alpha if alpha else raw
                if norm > best[0]:
                    best = (norm, list(words), raw)
        return best

    return step_fn, brute_force


CASES = [
    (v, t, alpha, seed)
    for seed, (v, t) in enumerate([(4, 1), (4, 3), (4, 5), (5, 2), (5, 4), (6, 3), (6, 4)])
    for alpha in (0.0, 0.7)
]


@pytest.mark.parametrize("n_tokens, max_length, alpha, seed", CASES)
def test_enough_beams_equal_brute_force_and_beam_never_loses_to_greedy(n_tokens, max_length, alpha, seed):
    step_fn, brute_force = random_model(n_tokens, seed)
    items = 2  # batched: each item its own model

    def search(k):
        holder = np.empty(items, dtype=object)
        holder[:] = [()] * items
        return beam_search(step_fn, (np.arange(items), holder), items, k, max_length, -1, 0, alpha)

    exact = [brute_force(i, max_length, alpha) for i in range(items)]
    seqs, scores, raw = search(n_tokens**max_length)
    for i in range(items):
        assert seqs[i] == exact[i][1]
        assert scores[i] == pytest.approx(exact[i][0], abs=1e-9) and raw[i] == pytest.approx(exact[i][2], abs=1e-9)

    greedy = search(1)[1]
    for k in (2, 3, 5):
        got = search(k)[1]
        assert all(g >= gr - 1e-12 for g, gr in zip(got, greedy)), (k, got, greedy)
        assert all(g <= e[0] + 1e-12 for g, e in zip(got, exact))


@pytest.mark.parametrize("decoder", ["gru", "lstm", "transformer", "updown"])
def test_image_once_per_item_and_candidates_picked_in_tensorflow_change_nothing(decoder):
    """The image parts of the state (STATIC_STATE) go to the step once per item, not per beam, and
    the step picks each row's best tokens itself (top_k): the same captions and scores as the
    plain step that repeats every part per row and returns the whole (N, V) log-probs; and
    the same again with the state kept in TensorFlow between steps (``take``)."""
    import keras

    from captioning.beam import Candidates, Step
    from captioning.decode import make_step_fn
    from captioning.decoders import build_decoder

    keras.utils.set_random_seed(0)
    extra = {"attention_units": 4} if decoder != "transformer" else {"num_layers": 1, "num_heads": 2}
    m = build_decoder(decoder, vocab_size=9, feature_dim=6, num_locations=4, embed_dim=4, units=8, **extra)
    m.build()
    feats = np.random.default_rng(0).normal(size=(5, 4, 6)).astype("float32")
    plain = make_step_fn(m)
    assert plain.static == m.STATIC_STATE != ()
    state = tuple(np.asarray(s) for s in m.initial_state(feats))
    for k in (1, 3):
        fast = make_step_fn(m, top_k=k + 1, end_id=2)
        assert isinstance(fast(np.ones(5, np.int64), state)[0], Candidates)
        got = beam_search(Step(fast, fast.static), state, 5, k, 6, 1, 2)  # numpy state, numpy take
        want = beam_search(Step(plain), state, 5, k, 6, 1, 2)  # every part repeated per row
        assert got[0] == want[0] and got[2] == want[2]
        # The state kept in TensorFlow (tensors in, tf.gather to reorder): the very same search.
        kept = beam_search(fast, m.initial_state(feats), 5, k, 6, 1, 2)
        assert kept == got


@pytest.mark.parametrize("decoder", ["gru", "lstm", "transformer", "updown"])
def test_the_step_is_traced_once_for_every_row_count(decoder):
    """The search calls the step with one row per image, then beam + 1 rows, then fewer as images
    finish (and the Transformer's state grows a step each call): one graph serves them all."""
    import keras

    from captioning.beam import Step
    from captioning.decode import make_step_fn
    from captioning.decoders import build_decoder

    keras.utils.set_random_seed(0)
    extra = {"attention_units": 4} if decoder != "transformer" else {"num_layers": 1, "num_heads": 2}
    m = build_decoder(decoder, vocab_size=9, feature_dim=6, num_locations=4, embed_dim=4, units=8, **extra)
    m.build()
    feats = np.random.default_rng(0).normal(size=(16, 4, 6)).astype("float32")
    step_fn, rows = make_step_fn(m, top_k=4, end_id=2), []

    def counted(tokens, state):
        rows.append(len(tokens))
        return step_fn(tokens, state)

    beam_search(Step(counted, step_fn.static, step_fn.take), m.initial_state(feats), 16, 3, 8, 1, 2)
    assert rows[0] == 16 and rows[1] > 16 and len(set(rows)) > 2
    assert step_fn.traces() == 1


def test_tensorflow_candidates_break_ties_as_numpy_does():
    """A decoder whose log-probs tie: top_k in the step keeps the lower token ids, as the search's
    own ranking of the whole row does."""
    from captioning.beam import candidates
    from captioning.decode import make_step_fn
    from captioning.decoders import build_decoder

    m = build_decoder("gru", vocab_size=12, feature_dim=6, num_locations=4, embed_dim=4, units=8, attention_units=4)
    m.build()
    kernel, _ = m.out_logits.get_weights()
    m.out_logits.set_weights([np.zeros_like(kernel), np.array([0, 0, 1, 0, 2, 2, 1, 2, 0, 1, 2, 1], "float32")])
    state = tuple(np.asarray(s) for s in m.initial_state(np.ones((2, 4, 6), "float32")))
    tokens = np.array([5, 7])
    got = make_step_fn(m, top_k=6, end_id=2)(tokens, state)[0]
    want = candidates(make_step_fn(m)(tokens, state)[0], 6, end_id=2)
    assert got.tokens.tolist() == want.tokens.tolist() == [[4, 5, 7, 10, 2, 6]] * 2
    with pytest.raises(ValueError, match="end_id"):  # the search needs every row's <end> log-prob
        make_step_fn(m, top_k=6)
    np.testing.assert_array_equal(got.log_probs, want.log_probs)
    np.testing.assert_array_equal(got.end, want.end)


# ---- candidates and compaction: the same search as ranking the whole vocabulary ---------------


def empty_prefixes(n):
    """An object array of n empty tuples (random_model's state: each row's prefix)."""
    holder = np.empty(n, dtype=object)
    holder[:] = [()] * n
    return holder


def full_vocabulary_search(step_fn, items, beam, max_length, start, end, alpha):
    """The search written the textbook way, as a reference: every beam's whole (V,) log-probs
    ranked at every step, every item in every step, no candidates, no compaction."""
    K, T = beam, max_length
    G = K + 1 if K > 1 else 1
    state = (np.repeat(np.arange(items), G), empty_prefixes(items * G))
    tokens, seqs = np.full((items, G), start), np.zeros((items, G, 0), dtype=np.int64)
    scores = np.full((items, G), -np.inf)
    scores[:, 0] = scores[:, G - 1] = 0.0
    best = [(-np.inf, None, None)] * items

    def finish(b, raw, seq, t):
        norm = raw / t**alpha if alpha else raw
        if norm > best[b][0]:
            best[b] = (norm, seq.tolist(), raw)

    for t in range(1, T + 2):
        log_probs, state = step_fn(tokens.reshape(-1), state)
        V = log_probs.shape[1]
        cand = scores[:, :, None] + log_probs.reshape(items, G, V)
        g_tok = cand[:, G - 1].argmax(1) if t <= T else np.full(items, end)
        g_score = cand[np.arange(items), G - 1, g_tok]
        if G > K:
            for b in np.flatnonzero((g_tok == end) & np.isfinite(g_score)):
                finish(b, g_score[b], seqs[b, G - 1], t)
        flat = cand[:, :K].reshape(items, K * V)
        order = np.argsort(-flat, axis=1, kind="stable")  # best first, ties by (beam, token)
        for b in range(items):
            for j in order[b, : K if t <= T else K * V]:
                if j % V == end and np.isfinite(flat[b, j]):
                    finish(b, flat[b, j], seqs[b, j // V], t)
        if t == T + 1:
            break
        flat[:, end::V] = -np.inf
        top = np.argsort(-flat, axis=1, kind="stable")[:, :K]
        parents, words, new = top // V, top % V, np.take_along_axis(flat, top, 1)
        if G > K:
            parents = np.concatenate([parents, np.full((items, 1), K)], 1)
            words = np.concatenate([words, g_tok[:, None]], 1)
            new = np.concatenate([new, np.where(g_tok == end, -np.inf, g_score)[:, None]], 1)
        scores, tokens = new, words
        seqs = np.concatenate([np.take_along_axis(seqs, parents[:, :, None], 1), tokens[:, :, None]], 2)
        bound = scores.max(1) / (T + 1) ** alpha if alpha else scores.max(1)
        done = np.array([b[0] for b in best]) >= bound
        if done.all():
            break
        scores[done] = -np.inf
        keep = (np.arange(items)[:, None] * G + parents).reshape(-1)
        state = tuple(s[keep] for s in state)
    return [b[1] for b in best], [b[0] for b in best], [b[2] for b in best]


def tied_model(n_tokens, seed, end=0):
    """A step function over prefixes with coarse probabilities (0.1 steps): many exact ties."""
    step_fn, _ = random_model(n_tokens, seed, end)

    def tied(tokens, state):
        out, state = step_fn(tokens, state)
        p = np.round(np.exp(out), 1) + 0.05  # quantised: equal log-probs are common
        return np.log(p / p.sum(1, keepdims=True)), state

    return tied


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("beam", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_candidates_and_compaction_choose_what_ranking_the_whole_vocabulary_chooses(seed, beam, alpha):
    """Each row's beam + 1 best tokens, items leaving the batch when done: the textbook result,
    ties included (a wrong tie order or a missed candidate changes the chosen captions)."""
    items, calls = 6, []
    tied = tied_model(8, seed)

    def step_fn(tokens, state):
        calls.append(len(tokens))
        return tied(tokens, state)

    got = beam_search(step_fn, (np.arange(items), empty_prefixes(items)), items, beam, 6, -1, 0, alpha)
    want = full_vocabulary_search(tied, items, beam, 6, -1, 0, alpha)
    assert got[0] == want[0] and got[1] == want[1] and got[2] == want[2]
    assert calls[0] == items  # the first step: one row per item, all its beams start the same
    rows = calls[1:]
    assert rows == sorted(rows, reverse=True) and rows[-1] < rows[0]  # done items left the batch


def test_candidates_keep_each_rows_best_tokens_lowest_id_first_on_ties():
    from captioning.beam import candidates

    lp = np.log(np.array([[0.1, 0.3, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.24, 0.01]]))
    got = candidates(lp, 3, end_id=4)
    assert got.tokens.tolist() == [[1, 2, 3], [0, 1, 2]]
    np.testing.assert_array_equal(got.log_probs, np.take_along_axis(lp, got.tokens, 1))
    np.testing.assert_array_equal(got.end, lp[:, 4])
    assert candidates(lp, 9, end_id=4).tokens.shape == (2, 5)  # no more than V
