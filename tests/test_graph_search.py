"""The search compiled into one TensorFlow graph against the reference (beam.py) and brute force:
scripted step functions with known answers, random tables with ties, and tiny real decoders."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from test_beam import CASES, END, GREEDY_PRUNED, NEVER_ENDS, OPEN_BEAM_WINS, SHORT_VS_LONG, START, V, random_model

from captioning.beam import beam_search
from captioning.graph_search import compile_search


def table_steps(log_probs):
    """The same scripted model twice: a numpy step for the reference, a TensorFlow one for the
    graph. ``log_probs[item, last token]`` (items, V, V); the state is each row's item."""
    table = tf.constant(log_probs, tf.float32)

    def host(tokens, state):
        return log_probs[state[0], tokens], state

    def graph(tokens, state):
        return tf.gather_nd(table, tf.stack([state[0], tokens], axis=1)), state

    return host, graph


def scripted_table(tables):
    out = np.full((len(tables), V, V), np.log(1e-12), np.float32)
    for item, rows in enumerate(tables):
        for last in range(V):
            for tok, p in rows.get(last, {END: 1.0}).items():
                out[item, last, tok] = np.log(p)
    return out


def both(log_probs, beam, max_length, alpha=0.0, jit=False):
    host, graph = table_steps(log_probs)
    items = len(log_probs)
    want = beam_search(host, (np.arange(items),), items, beam, max_length, START, END, alpha)
    search = compile_search(graph, beam, max_length, START, END, alpha, jit=jit)
    got = search((tf.range(items),))
    assert search.xla() is jit  # a table step keeps its state's shape: XLA compiles it when asked
    return got, want


@pytest.mark.parametrize("beam", [1, 2, 3, 5])
@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_scripted_tables_give_the_reference_captions_scores_and_log_probs(beam, alpha):
    log_probs = scripted_table([NEVER_ENDS, SHORT_VS_LONG, OPEN_BEAM_WINS, GREEDY_PRUNED])
    for max_length, jit in ((1, False), (2, False), (4, not alpha), (7, False)):  # XLA: the same answers
        got, want = both(log_probs, beam, max_length, alpha, jit)
        assert got == want, (max_length, got, want)


def test_known_answers():
    log_probs = scripted_table([NEVER_ENDS, GREEDY_PRUNED])
    (seqs, _, raw), _ = both(log_probs, 1, 3)
    assert seqs[0] == [3, 3, 3]  # greedy never ends: closed after max_length words
    assert raw[0] == pytest.approx(np.log(0.5 * 0.35 * 0.35 * 0.31), abs=1e-6)
    (seqs, _, _), _ = both(log_probs, 2, 4)
    assert seqs[1] == [3, 6]  # greedy's "a d": plain beam 2 would prune it (test_beam.GREEDY_PRUNED)


@pytest.mark.parametrize("seed", range(6))
def test_random_tables_with_ties(seed):
    rng = np.random.default_rng(seed)
    items, vocab = int(rng.integers(1, 5)), int(rng.integers(4, 8))
    p = rng.dirichlet(np.full(vocab, 0.5), size=(items, vocab))
    p[:, :, 0] = p[:, :, START] = 0  # never chosen: -inf, as the model step bans specials
    with np.errstate(divide="ignore"):
        log_probs = np.log(p / p.sum(-1, keepdims=True)).astype(np.float32)
    log_probs = np.round(log_probs, 1)  # many exact ties: the first found must win in both
    for beam, max_length, alpha, jit in [(1, 4, 0.0, False), (2, 3, 0.7, True), (3, 5, 1.0, False), (4, 2, 0.0, False)]:
        got, want = both(log_probs, beam, max_length, alpha, jit)
        assert got == want, (beam, max_length, alpha)


def prefix_model(n_tokens, max_length, seed, items=2):
    """test_beam.random_model as a TensorFlow step: every prefix has its own distribution, looked
    up in a table of all prefixes (the state carries each row's prefix as a base-n number)."""
    step_fn, brute_force = random_model(n_tokens, seed)
    sizes = [n_tokens**n for n in range(max_length + 1)]
    offset = np.concatenate([[0], np.cumsum(sizes)])
    table = np.zeros((items, offset[-1], n_tokens), np.float32)
    holder = np.empty(1, dtype=object)
    for item in range(items):
        for n in range(max_length + 1):
            for code, prefix in enumerate(itertools.product(range(n_tokens), repeat=n)):
                holder[0] = prefix[:-1]
                state = (np.array([item]), holder.copy())
                tok = np.array([prefix[-1]]) if n else np.array([-1])
                table[item, offset[n] + code] = step_fn(tok, state)[0][0]
    table, offset = tf.constant(table), tf.constant(offset[:-1], tf.int32)

    def step(tokens, state):
        items, code, depth = state
        started = depth >= 0
        code = tf.where(started, code * n_tokens + tokens, 0)  # -1 before <start>: the empty prefix
        depth = depth + 1
        log_probs = tf.gather_nd(table, tf.stack([items, tf.gather(offset, depth) + code], axis=1))
        return log_probs, (items, code, depth)

    state = (tf.range(items), tf.zeros(items, tf.int32), tf.fill((items,), -1))
    return step, state, brute_force


@pytest.mark.parametrize("n_tokens, max_length, alpha, seed", CASES)
def test_enough_beams_equal_brute_force(n_tokens, max_length, alpha, seed):
    step, state, brute_force = prefix_model(n_tokens, max_length, seed)
    search = compile_search(step, n_tokens**max_length, max_length, n_tokens, 0, alpha, jit=False)
    seqs, scores, raw = search(state)
    for i in range(2):
        norm, words, exact_raw = brute_force(i, max_length, alpha)
        assert seqs[i] == words
        assert scores[i] == pytest.approx(norm, abs=1e-5) and raw[i] == pytest.approx(exact_raw, abs=1e-5)


@pytest.mark.parametrize("decoder", ["gru", "gru-noatt", "lstm", "transformer", "updown"])
def test_real_decoders_caption_as_the_reference_and_trace_once(decoder):
    import keras

    from captioning.decode import graph_search, make_step_fn
    from captioning.decoders import build_decoder
    from captioning.vocab import SPECIALS, Vocabulary

    keras.utils.set_random_seed(0)
    name, _, flavour = decoder.partition("-")
    extra = {"num_layers": 1, "num_heads": 2} if name == "transformer" else {"attention_units": 4}
    if flavour == "noatt":
        extra["attention"] = False
    m = build_decoder(name, vocab_size=12, feature_dim=6, num_locations=4, embed_dim=4, units=8, **extra)
    m.build()
    vocab = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(8))])
    assert len(vocab) == 12
    feats = np.random.default_rng(1).normal(size=(7, 4, 6)).astype("float32")
    for beam, sizes in ((1, (1,)), (4, (7, 3))):  # 7 items run as 8 under XLA (padded), 3 as 4
        search = graph_search(m, vocab, beam, 9)
        step_fn = make_step_fn(m, top_k=beam + 1, end_id=vocab.end_id)
        for n in sizes:
            got = search(feats[:n])
            want = beam_search(
                step_fn, m.initial_state(feats[:n]), n, beam, 9, vocab.start_id, vocab.end_id,
            )  # fmt: skip
            assert got[0] == want[0]
            np.testing.assert_allclose(got[2], want[2], rtol=1e-5)
        assert search.traces() == 1  # one graph for every batch size
        assert search.xla() is (name != "transformer")  # its cache grows a step each word: no XLA
