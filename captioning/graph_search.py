"""The beam search of :mod:`captioning.beam` as one TensorFlow graph (a ``tf.while_loop``).

:func:`captioning.beam.beam_search` drives the decoder from Python: one TensorFlow call and a
numpy round trip per word. For one photo that overhead is most of a caption's cost, so this
module runs the same search inside the graph: a whole batch's captions are one call.

Same search space, length rule, stopping rule and tie-breaking as the reference (the tests
compare both on scripted steps and real decoders; see beam.py's docstring for the rules):
``beam_size`` beams plus the greedy path as one extra row, a beam still open after ``max_length``
words closed by one more step that reads its ``<end>`` probability, an item stopping when its best
finished caption beats every continuation of its open rows, ties to the caption found first.
Scores add in float64, as the reference's do, so both pick the same captions to the last bit.

One difference, in speed only: items whose search has ended stay in the batch (their rows are
scored -inf and never finish again) instead of leaving it; for the small batches this is for
(one photo, a service's batch) that is cheaper than compacting the state.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


def graph_beam_search(step, state, beam_size, max_length, start_id, end_id, length_penalty=0.0, static=()):
    """``(seqs (B, T) int32, lengths (B,) int32, scores (B,) float64, log_probs (B,) float64)``.

    ``step(tokens (N,) int32, state) -> (log_probs (N, V), state')``: TensorFlow ops only (it is
    traced into the loop); ``state``: a tuple of tensors with one row per item (``static`` parts
    stay that way; the others are repeated per row after the first step, as in beam.py). Row
    ``b`` of the result is item ``b``'s best caption: its first ``lengths[b]`` tokens (no
    ``<start>``/``<end>``), its length-normalised score and its raw log-probability (-inf and
    length 0 where nothing finished). Call it inside a ``tf.function``.
    """
    K, T = beam_size, max_length
    G = K + 1 if K > 1 else 1  # rows per item: K beams, then the greedy path (beam 1 is greedy)
    fixed = {i % len(state) for i in static}
    # length**alpha as Python computes it for the reference, so the scores agree to the bit
    denom = tf.constant([float(n) ** length_penalty if length_penalty else 1.0 for n in range(T + 2)], tf.float64)
    B = tf.shape(state[0])[0]
    neg = tf.constant(float("-inf"), tf.float64)
    shape = _Shape(K, T, G, B, end_id, denom, neg)

    def reorder(state, rows):
        return tuple(s if i in fixed else tf.gather(s, rows) for i, s in enumerate(state))

    carry = {
        "scores": tf.concat([tf.zeros((B, 1), tf.float64), tf.fill((B, G - 1), neg)], axis=1),
        "tokens": tf.fill((B, G), start_id),
        "seqs": tf.zeros((B, G, T), tf.int32),
        "best_norm": tf.fill((B,), neg),
        "best_raw": tf.fill((B,), neg),
        "best_seq": tf.zeros((B, T), tf.int32),
        "best_len": tf.zeros((B,), tf.int32),
        "done": tf.zeros((B,), tf.bool),
    }
    if G > K:  # the greedy row starts beside the first beam
        carry["scores"] = tf.concat([carry["scores"][:, :K], tf.zeros((B, 1), tf.float64)], axis=1)
    # The first step once per item (every row starts from <start> in the same state), then copied.
    log_probs, state = step(tf.fill((B,), start_id), state)
    first = tf.repeat(tf.range(B), G)
    carry, keep = _bookkeep(shape, tf.constant(1), tf.gather(log_probs, first), carry)
    state = reorder(reorder(state, first), keep)

    def cond(t, carry, state):
        return (t <= T + 1) & ~tf.reduce_all(carry["done"])

    def body(t, carry, state):
        log_probs, state = step(tf.reshape(carry["tokens"], [-1]), state)
        carry, keep = _bookkeep(shape, t, log_probs, carry)
        return t + 1, carry, reorder(state, keep)

    grows = tuple(tf.TensorShape([None] * s.shape.rank) for s in state)  # a Transformer's cache grows
    items = {k: tf.TensorShape([None, *v.shape[1:]]) for k, v in carry.items()}  # any number of items
    _, carry, _ = tf.while_loop(
        cond, body, (tf.constant(2), carry, state), shape_invariants=(tf.TensorShape([]), items, grows)
    )
    return carry["best_seq"], carry["best_len"], carry["best_norm"], carry["best_raw"]


class _Shape(NamedTuple):
    K: int  # beams
    T: int  # max_length
    G: int  # rows per item: the beams and the greedy row
    B: object  # items (a scalar tensor)
    end_id: int
    denom: object  # (T + 2,) float64: length**length_penalty
    neg: object  # -inf, float64


def _bookkeep(shape, t, log_probs, c):
    """One step of the reference's search on (B * G, V) ``log_probs``; ``c``: the carry (a dict of
    tensors). Returns the new carry and the rows of the state the next step extends."""
    K, T, G, B, end_id, denom, neg = shape
    V = log_probs.shape[-1] or tf.shape(log_probs)[-1]
    k = min(K + 1, V) if isinstance(V, int) else tf.minimum(K + 1, V)
    best = tf.math.top_k(log_probs, k)  # equal values: lower id first, as the reference
    words = tf.reshape(best.indices, (B, G, -1))  # (B, G, k)
    cand = c["scores"][:, :, None] + tf.reshape(tf.cast(best.values, tf.float64), (B, G, -1))
    ends = c["scores"] + tf.reshape(tf.cast(log_probs[:, end_id], tf.float64), (B, G))  # (B, G)
    last = tf.equal(t, T + 1)  # only <end> may follow now: every row closes
    length = tf.cast(t - 1, tf.int32)  # words in a caption that ends at step t

    def finish(c, ok, raw, seq):  # the reference's finish(): strictly better replaces
        norm = tf.where(ok, raw / denom[t], neg)
        better = norm > c["best_norm"]
        c["best_norm"] = tf.where(better, norm, c["best_norm"])
        c["best_raw"] = tf.where(better, raw, c["best_raw"])
        c["best_seq"] = tf.where(better[:, None], seq, c["best_seq"])
        c["best_len"] = tf.where(better, length, c["best_len"])
        return c

    c = dict(c)
    # The greedy row first (the reference finishes it before the beams): its best token.
    g_tok = tf.where(last, end_id, words[:, G - 1, 0])
    g_score = tf.where(last, ends[:, G - 1], cand[:, G - 1, 0])
    if G > K:
        c = finish(c, tf.equal(g_tok, end_id) & tf.math.is_finite(g_score), g_score, c["seqs"][:, G - 1])

    # Beams that end, best first: the first such is the step's best (same length, so the
    # same order after normalisation). At the last step every beam closes with <end>.
    flat = tf.reshape(cand[:, :K], (B, -1))  # (B, K * k), beam-major as the reference ranks them
    flat_words = tf.reshape(words[:, :K], (B, -1))
    top = tf.math.top_k(flat, K)
    ending = tf.equal(tf.gather(flat_words, top.indices, batch_dims=1), end_id) & tf.math.is_finite(top.values)
    first = tf.reduce_min(tf.where(ending, tf.range(K)[None], K), axis=1)  # (B,): K where none ends
    pick = tf.minimum(first, K - 1)
    b_score = tf.gather(top.values, pick, batch_dims=1)
    b_beam = tf.gather(top.indices, pick, batch_dims=1) // tf.shape(words)[2]
    closing = tf.math.top_k(ends[:, :K], 1)  # the last step: the best closing beam
    b_ok = tf.where(last, tf.math.is_finite(closing.values[:, 0]), first < K)
    b_score = tf.where(last, closing.values[:, 0], b_score)
    b_beam = tf.where(last, closing.indices[:, 0], b_beam)
    c = finish(c, b_ok, b_score, tf.gather(c["seqs"], b_beam, batch_dims=1))

    # The next beams: the K best continuations that do not end; greedy goes its own way.
    top = tf.math.top_k(tf.where(tf.equal(flat_words, end_id), neg, flat), K)
    parents = top.indices // tf.shape(words)[2]  # (B, K)
    tokens = tf.gather(flat_words, top.indices, batch_dims=1)
    scores = top.values
    if G > K:
        parents = tf.concat([parents, tf.fill((B, 1), K)], axis=1)
        tokens = tf.concat([tokens, g_tok[:, None]], axis=1)
        scores = tf.concat([scores, tf.where(tf.equal(g_tok, end_id), neg, g_score)[:, None]], axis=1)
    seqs = tf.gather(c["seqs"], parents, batch_dims=1)  # (B, G, T): position t-1 is still 0
    c["seqs"] = seqs + tf.one_hot(length, T, dtype=tf.int32)[None, None, :] * tokens[:, :, None]
    # An item is done when its best beats every continuation of its open rows (or at the end).
    bound = tf.reduce_max(scores, axis=1) / denom[T + 1]
    c["done"] = (c["best_norm"] >= bound) | last
    c["scores"] = tf.where(c["done"][:, None], neg, scores)
    c["tokens"] = tokens
    keep = tf.reshape(tf.range(B)[:, None] * G + parents, [-1])  # the rows the next step extends
    return c, keep


def compile_search(step, beam_size, max_length, start_id, end_id, length_penalty=0.0, static=(), jit=True, init=None):
    """A :class:`CompiledSearch`: ``search(inputs) -> (token lists, scores, log-probs)`` (beam.py's
    return, as Python values), the search as one ``tf.function``, traced at the first call.
    ``inputs``: the initial state (a tuple of tensors), or what ``init(inputs) -> state`` takes (a
    decoder's ``initial_state`` of the features: then that runs inside the same compiled call).

    ``jit``: compile it with XLA where the step keeps its state's shapes (a recurrent decoder; a
    Transformer's cache grows each step, so it runs as a plain graph). XLA fuses the search's many
    small per-word ops into a few kernels; it compiles once per batch size, so batches are padded
    to the next power of two (repeating the last item) and the pad rows dropped.
    """

    def run(inputs):
        state = tuple(init(inputs)) if init else inputs
        return graph_beam_search(step, state, beam_size, max_length, start_id, end_id, length_penalty, static)

    return CompiledSearch(run, step, init, jit)


class CompiledSearch:
    """See :func:`compile_search`. ``traces()``: graphs built so far (one serves every batch size);
    ``xla()``: whether it runs XLA-compiled (None before the first call)."""

    def __init__(self, run, step, init, jit):
        self._run, self._step, self._init, self._jit = run, step, init, jit
        self._fn, self._xla = None, None

    def traces(self) -> int:
        return self._fn.experimental_get_tracing_count() if self._fn else 0

    def xla(self):
        return self._xla

    def _compile(self, inputs):
        init = self._init
        specs = tf.nest.map_structure(lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), inputs)
        state_specs = tf.nest.map_structure(
            lambda s: tf.TensorSpec([None, *s.shape[1:]], s.dtype), tuple(init(inputs[:1])) if init else inputs
        )
        self._xla = self._jit and keeps_shapes(self._step, state_specs)
        self._fn = tf.function(self._run, input_signature=[specs], autograph=False, jit_compile=self._xla)

    def __call__(self, inputs):
        init = self._init
        inputs = tf.convert_to_tensor(inputs) if init else tuple(tf.convert_to_tensor(s) for s in inputs)
        parts = [inputs] if init else inputs
        if self._fn is None:  # any number of items: one graph serves every batch size
            self._compile(inputs)
        n = int(parts[0].shape[0])
        if self._xla and n:
            pad = (1 << (n - 1).bit_length()) - n  # to a power of two: few XLA compilations
            padded = [tf.concat([s, tf.repeat(s[-1:], pad, axis=0)], 0) if pad else s for s in parts]
            inputs = padded[0] if init else tuple(padded)
        seqs, lengths, norm, raw = (x.numpy()[:n] for x in self._fn(inputs))
        return [s[:k].tolist() for s, k in zip(seqs, lengths)], norm.tolist(), raw.tolist()


def keeps_shapes(step, specs) -> bool:
    """Whether ``step`` returns every state part in the shape it took (what XLA's loop needs)."""
    traced = tf.function(step, autograph=False).get_concrete_function(tf.TensorSpec([None], tf.int32), specs)
    return all(out.shape.as_list() == spec.shape.as_list() for out, spec in zip(traced.structured_outputs[1], specs))
