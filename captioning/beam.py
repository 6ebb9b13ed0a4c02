"""Batched beam search over any step function (numpy; the model supplies the step).

``step_fn(tokens (N,), state) -> (log_probs (N, V), state')`` where N = batch * rows per item
and ``state`` is a tuple of arrays whose first axis is N (the ``static`` parts: one row per
item). Greedy decoding is ``beam_size=1``. The step may return :class:`Candidates` instead of
the (N, V) log-probs: each row's ``beam_size + 1`` best tokens and its ``<end>`` log-prob are
all the search reads, so a model can pick them where it computed them (make_step_fn does it in
TensorFlow) and hand back (N, 6) arrays instead of (N, V).

The search space: captions of at most ``max_length`` words, each scored by the model's
log-probability of the whole caption, its words and the ``<end>`` after them. A beam still
open after ``max_length`` words is closed with one more step that reads the model's
``<end>`` probability, so it competes with the captions that ended earlier on the same terms
(scoring it without ``<end>`` would compare a prefix's probability with whole captions').
An item stops early only when no open beam can still beat its best finished caption (Hugging
Face's ``early_stopping=False``, im2txt); with ``beam_size >= V**max_length`` nothing is ever
pruned and the result is the exact best caption.

Plain beam search can end below greedy decoding: the greedy path can be pruned early and every
beam that survives end worse. So for ``beam_size > 1`` the greedy path runs as one extra row
beside the beams and its caption competes too: the result is never below greedy's.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class Candidates(NamedTuple):
    """A step's ``k`` best next tokens per row, best first (equal log-probs: lower id first, as
    ``tf.math.top_k``), and every row's ``<end>`` log-prob. With ``k >= min(beam_size + 1, V)``
    the search chooses exactly what it would from the whole (N, V) log-probs: each of an item's
    ``beam_size`` best continuations is among its row's ``beam_size`` best tokens, and the best
    ``beam_size`` that do not end are among the row's ``beam_size + 1`` best."""

    log_probs: np.ndarray  # (N, k)
    tokens: np.ndarray  # (N, k)
    end: np.ndarray  # (N,)


def candidates(log_probs, k, end_id):
    """:class:`Candidates` of (N, V) ``log_probs``: each row's ``min(k, V)`` best tokens."""
    log_probs = np.asarray(log_probs)
    top = _top(log_probs, min(k, log_probs.shape[1]))
    return Candidates(np.take_along_axis(log_probs, top, 1), top, log_probs[:, end_id])


def normalised(score, length, alpha):
    """Length-normalised score: ``score / length**alpha`` (alpha 0 = raw log-probability)."""
    return score / (length**alpha) if alpha else score


def _open_bound(scores, max_length, alpha):
    """Best normalised score any continuation of open beams with raw ``scores`` can reach.

    Log-probabilities only fall as words are added, so the raw score is an upper bound on
    every continuation's raw score. Divided by ``length**alpha`` a negative score rises with
    length, so the bound takes the longest length a caption can have: ``max_length`` tokens
    (its words and ``<end>``).
    """
    return normalised(scores, max_length, alpha) if alpha else scores


def _top(values, k):
    """Column indices of the ``k`` largest values per row, best first; equal values: lower index
    first. A stable sort of the whole row: ``argpartition`` would pick arbitrarily among values
    tied with the k-th (the rows here are short: beams x candidates, or a test's vocabulary)."""
    return np.argsort(-values, axis=1, kind="stable")[:, :k]


def take_rows(x, rows):
    """``x``'s rows ``rows`` (numpy fancy indexing): beam_search's default ``take``."""
    return np.asarray(x)[rows]


def beam_search(
    step_fn,
    state,
    batch_size,
    beam_size,
    max_length,
    start_id,
    end_id,
    length_penalty=0.0,
    static=(),
    take=take_rows,
):
    """Best caption per item: ``(token-id lists without <start>/<end>, normalised scores, log-probs)``.

    ``state`` has first axis ``batch_size`` (one row per item). The first step runs once per item
    (every beam starts from the same state and ``<start>``), and its output is then repeated per beam.
    Length normalisation divides a caption's log-probability by ``length**length_penalty``,
    where length counts the ``<end>`` token when one was emitted. Ties go to the caption found
    first. Tokens the step gives ``-inf`` are never chosen.

    ``static``: indices of state parts that are the same for every beam of an item and that the
    step never changes (the image's features). They are neither repeated per beam nor reordered:
    the step gets them with one row per item and rows ``item * G ... item * G + G - 1`` share the
    item's row (G = N / items; see the decoder contract in decoders/base.py). Repeating them
    would cost most of a step's memory traffic (for Flickr8k, 128 images x 6 rows x 49 x 1,024
    floats read every step).

    ``take(x, rows)``: ``x``'s rows ``rows`` (an int array), for every reordering of the state; the
    search itself reads nothing of the state. A step whose state lives in its own framework passes
    that framework's gather, so the state never makes a round trip through numpy
    (``make_step_fn``'s ``take``).

    Items whose search has ended leave the batch, so the step stops computing their rows.
    """
    K, T, alpha = beam_size, max_length, length_penalty
    G = K + 1 if K > 1 else 1  # rows per item: K beams, then the greedy path (beam 1 is greedy)
    fixed = {i % len(state) for i in static}  # state: one row per item until the first step
    tokens = np.full((batch_size, G), start_id, dtype=np.int64)
    seqs = np.zeros((batch_size, G, 0), dtype=np.int64)
    scores = np.full((batch_size, G), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    scores[:, G - 1] = 0.0  # ... and the greedy row
    best_norm = np.full(batch_size, -np.inf)  # best finished caption per item
    best_raw = np.full(batch_size, -np.inf)
    best_seq: list[list[int]] = [[] for _ in range(batch_size)]
    live = np.arange(batch_size)  # the items still searching: the per-item arrays' rows, in order

    def finish(i, raw, seq, t):  # i: a row of the per-item arrays
        b = live[i]
        norm = normalised(raw, t, alpha)
        if norm > best_norm[b]:  # strict: ties go to the caption found first
            best_norm[b], best_raw[b], best_seq[b] = norm, raw, seq.tolist()

    for t in range(1, T + 2):  # T word steps, then one step that can only close with <end>
        if t == 1:  # an item's rows all start from <start> in the same state: one row each, then copied
            out, state = step_fn(tokens[:, 0], state)
            first = np.repeat(np.arange(batch_size), G)  # each item's row, once per row it now has (item-major)
            if isinstance(out, Candidates):
                out = Candidates(*(take_rows(x, first) for x in out))
            else:
                out = take_rows(out, first)
            state = tuple(s if i in fixed else take(s, first) for i, s in enumerate(state))
        else:
            out, state = step_fn(tokens.reshape(-1), state)
        B = len(live)  # from here on: the items still searching
        cands = out if isinstance(out, Candidates) else candidates(out, K + 1, end_id)
        k = cands.tokens.shape[1]  # candidates per row
        words = np.asarray(cands.tokens).reshape(B, G, k)
        cand = scores[:, :, None] + np.asarray(cands.log_probs, np.float64).reshape(B, G, k)  # (B, G, k)
        ends = scores + np.asarray(cands.end, np.float64).reshape(B, G)  # (B, G): each row closing now

        # Greedy row: its best token, <end> included (forced at the last step).
        g_tok, g_score = (words[:, G - 1, 0], cand[:, G - 1, 0]) if t <= T else (np.full(B, end_id), ends[:, G - 1])
        if G > K:
            for b in np.flatnonzero((g_tok == end_id) & np.isfinite(g_score)):
                finish(b, g_score[b], seqs[b, G - 1], t)

        if t == T + 1:  # every beam closes with <end>, best first (ties: lower beam first)
            closing = ends[:, :K]
            top = _top(closing, K)
            for b, r in zip(*np.nonzero(np.isfinite(np.take_along_axis(closing, top, 1)))):
                finish(b, closing[b, top[b, r]], seqs[b, top[b, r]], t)
            break

        # Beam candidates ranked over all beams (beam-major, so ties go to the lower beam, then the
        # lower token: the order of the (K * V) flattened log-probs). An <end> among the K best
        # closes a caption of t tokens (Hugging Face's rule).
        flat, flat_words = cand[:, :K].reshape(B, K * k), words[:, :K].reshape(B, K * k)
        top = _top(flat, K)
        top_words, top_scores = np.take_along_axis(flat_words, top, 1), np.take_along_axis(flat, top, 1)
        for b, r in zip(*np.nonzero((top_words == end_id) & np.isfinite(top_scores))):
            finish(b, top_scores[b, r], seqs[b, top[b, r] // k], t)

        # The next beams: the K best continuations that do not end; greedy goes its own way.
        flat[flat_words == end_id] = -np.inf
        top = _top(flat, K)
        parents, next_words = top // k, np.take_along_axis(flat_words, top, 1)
        beam_scores = np.take_along_axis(flat, top, axis=1)  # (B, K); -inf marks a dead beam
        if G > K:
            parents = np.concatenate([parents, np.full((B, 1), K)], axis=1)
            next_words = np.concatenate([next_words, g_tok[:, None]], axis=1)
            beam_scores = np.concatenate([beam_scores, np.where(g_tok == end_id, -np.inf, g_score)[:, None]], 1)
        scores, tokens = beam_scores, next_words
        seqs = np.concatenate([np.take_along_axis(seqs, parents[:, :, None], axis=1), tokens[:, :, None]], axis=2)

        # An item is done when its best finished caption beats every continuation of its open rows.
        done = best_norm[live] >= _open_bound(scores.max(axis=1), T + 1, alpha)
        if done.all():
            break
        # Done items leave the batch. Their image (static) rows are copied out with them, so this
        # waits until an eighth of the batch is done; until then their rows flow through the step.
        going = np.arange(B)
        if done.sum() >= max(1, B // 8):
            going = np.flatnonzero(~done)
            live, scores, tokens, seqs, parents = (x[going] for x in (live, scores, tokens, seqs, parents))
            state = tuple(take(s, going) if i in fixed else s for i, s in enumerate(state))
        else:
            scores[done] = -np.inf  # done items stop growing
        keep = (going[:, None] * G + parents).reshape(-1)  # rows of the previous step, item-major
        state = tuple(s if i in fixed else take(s, keep) for i, s in enumerate(state))

    return best_seq, best_norm.tolist(), best_raw.tolist()
