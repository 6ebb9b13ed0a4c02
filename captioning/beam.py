"""Batched beam search over any :class:`Step` (numpy; the model supplies the step).

``step(tokens (N,), state) -> (log_probs (N, V), state')`` where N = batch * rows per item
and ``state`` is a tuple of arrays whose first axis is N (the step's ``static`` parts: one row
per item). Greedy decoding is ``beam_size=1``. The step may return :class:`Candidates` instead of
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
    """``x``'s rows ``rows`` (numpy fancy indexing): a :class:`Step`'s default ``take``."""
    return np.asarray(x)[rows]


class Step:
    """What a search drives: ``step(tokens (N,), state) -> (log-probs (N, V) or Candidates, state')``.

    ``static``: indices of the state parts the step never changes and that are the same for every
    beam of an item (the image's features). They are neither repeated per beam nor reordered: the
    step gets them with one row per item and rows ``item * G ... item * G + G - 1`` share the
    item's row (G = N / items; see the decoder contract in decoders/base.py). Repeating them
    would cost most of a step's memory traffic (for Flickr8k, 128 images x 6 rows x 49 x 1,024
    floats read every step).

    ``take(x, rows)``: ``x``'s rows ``rows`` (an int array), for every reordering of the state; a
    search reads nothing of the state itself. A step whose state lives in its own framework
    passes that framework's gather, so the state never makes a round trip through numpy
    (:func:`captioning.decode.make_step_fn`). A plain function is a Step with no static parts.
    """

    def __init__(self, fn, static=(), take=take_rows):
        self.fn, self.static, self.take = fn, tuple(static), take

    def __call__(self, tokens, state):
        return self.fn(tokens, state)

    @classmethod
    def of(cls, step) -> Step:
        return step if isinstance(step, Step) else cls(step)

    def first(self, tokens, state, rows):
        """The first step, run once per item (all its rows start from ``<start>`` in one state),
        its output and the state's moving parts then repeated ``rows`` times per item."""
        out, state = self(tokens, state)
        first = np.repeat(np.arange(len(tokens)), rows)  # each item's row, once per row it now has
        out = Candidates(*(take_rows(x, first) for x in out)) if isinstance(out, Candidates) else take_rows(out, first)
        return out, self.reorder(state, first)

    def reorder(self, state, rows):
        """The state's moving parts at ``rows``; the static ones as they are."""
        fixed = {i % len(state) for i in self.static}
        return tuple(s if i in fixed else self.take(s, rows) for i, s in enumerate(state))

    def drop_items(self, state, items):
        """Only ``items`` of the static parts (one row per item); the moving ones as they are."""
        fixed = {i % len(state) for i in self.static}
        return tuple(self.take(s, items) if i in fixed else s for i, s in enumerate(state))


def beam_search(step, state, batch_size, beam_size, max_length, start_id, end_id, length_penalty=0.0):
    """Best caption per item: ``(token-id lists without <start>/<end>, normalised scores, log-probs)``.

    ``step``: a :class:`Step` (or a plain step function). ``state`` has first axis ``batch_size``
    (one row per item). The first step runs once per item (every beam starts from the same state
    and ``<start>``), and its output is then repeated per beam. Length normalisation divides a
    caption's log-probability by ``length**length_penalty``, where length counts the ``<end>``
    token when one was emitted. Ties go to the caption found first. Tokens the step gives
    ``-inf`` are never chosen. Items whose search has ended leave the batch, so the step stops
    computing their rows.
    """
    step = Step.of(step)
    beams = _Beams(batch_size, beam_size, max_length, start_id, end_id, length_penalty)
    for t in range(1, max_length + 2):  # T word steps, then one step that can only close with <end>
        if t == 1:
            out, state = step.first(beams.tokens[:, 0], state, beams.G)
        else:
            out, state = step(beams.tokens.reshape(-1), state)
        cands = out if isinstance(out, Candidates) else candidates(out, beam_size + 1, end_id)
        moved = beams.advance(t, cands)
        if moved is None:
            break
        going, keep = moved
        if going is not None:  # done items leave the batch, their image rows with them
            state = step.drop_items(state, going)
        state = step.reorder(state, keep)
    return beams.best_seq, beams.best_norm.tolist(), beams.best_raw.tolist()


class _Beams:
    """The search's bookkeeping for the items still searching (``live``): each row's tokens so
    far, scores and next token; each item's best finished caption."""

    def __init__(self, batch_size, beam_size, max_length, start_id, end_id, alpha):
        self.K, self.T, self.alpha, self.end_id = beam_size, max_length, alpha, end_id
        self.G = G = beam_size + 1 if beam_size > 1 else 1  # rows per item: K beams, then the greedy path
        self.tokens = np.full((batch_size, G), start_id, dtype=np.int64)
        self.seqs = np.zeros((batch_size, G, 0), dtype=np.int64)
        self.scores = np.full((batch_size, G), -np.inf)
        self.scores[:, 0] = 0.0  # all beams start identical: expand only the first
        self.scores[:, G - 1] = 0.0  # ... and the greedy row
        self.best_norm = np.full(batch_size, -np.inf)  # best finished caption per item
        self.best_raw = np.full(batch_size, -np.inf)
        self.best_seq: list[list[int]] = [[] for _ in range(batch_size)]
        self.live = np.arange(batch_size)  # the items still searching: the per-item arrays' rows, in order

    def finish(self, i, raw, seq, t):  # i: a row of the per-item arrays
        b = self.live[i]
        norm = normalised(raw, t, self.alpha)
        if norm > self.best_norm[b]:  # strict: ties go to the caption found first
            self.best_norm[b], self.best_raw[b], self.best_seq[b] = norm, raw, seq.tolist()

    def advance(self, t, cands):
        """Take step ``t``'s candidates: close what ends, pick the next beams. None when every
        item is done; else ``(going, keep)``: the items that stay (None: all, their finished ones
        frozen) and the previous step's rows the next state is made of (item-major)."""
        K, G, T, end_id = self.K, self.G, self.T, self.end_id
        B = len(self.live)
        k = cands.tokens.shape[1]  # candidates per row
        words = np.asarray(cands.tokens).reshape(B, G, k)
        cand = self.scores[:, :, None] + np.asarray(cands.log_probs, np.float64).reshape(B, G, k)  # (B, G, k)
        ends = self.scores + np.asarray(cands.end, np.float64).reshape(B, G)  # (B, G): each row closing now

        # Greedy row: its best token, <end> included (forced at the last step).
        g_tok, g_score = (words[:, G - 1, 0], cand[:, G - 1, 0]) if t <= T else (np.full(B, end_id), ends[:, G - 1])
        if G > K:
            for b in np.flatnonzero((g_tok == end_id) & np.isfinite(g_score)):
                self.finish(b, g_score[b], self.seqs[b, G - 1], t)
        if t == T + 1:  # every beam closes with <end>, best first (ties: lower beam first)
            closing = ends[:, :K]
            top = _top(closing, K)
            for b, r in zip(*np.nonzero(np.isfinite(np.take_along_axis(closing, top, 1)))):
                self.finish(b, closing[b, top[b, r]], self.seqs[b, top[b, r]], t)
            return None
        parents = self._next_beams(t, cand, words, g_tok, g_score)
        return self._prune(parents)

    def _next_beams(self, t, cand, words, g_tok, g_score):
        """Close the captions an ``<end>`` among the K best ends, then the next beams: the K best
        continuations that do not end (the greedy row goes its own way). Returns their parents."""
        K, G, end_id = self.K, self.G, self.end_id
        B, k = cand.shape[0], cand.shape[2]
        # Beam candidates ranked over all beams (beam-major, so ties go to the lower beam, then the
        # lower token: the order of the (K * V) flattened log-probs). An <end> among the K best
        # closes a caption of t tokens (Hugging Face's rule).
        flat, flat_words = cand[:, :K].reshape(B, K * k), words[:, :K].reshape(B, K * k)
        top = _top(flat, K)
        top_words, top_scores = np.take_along_axis(flat_words, top, 1), np.take_along_axis(flat, top, 1)
        for b, r in zip(*np.nonzero((top_words == end_id) & np.isfinite(top_scores))):
            self.finish(b, top_scores[b, r], self.seqs[b, top[b, r] // k], t)
        flat[flat_words == end_id] = -np.inf
        top = _top(flat, K)
        parents, next_words = top // k, np.take_along_axis(flat_words, top, 1)
        beam_scores = np.take_along_axis(flat, top, axis=1)  # (B, K); -inf marks a dead beam
        if G > K:
            parents = np.concatenate([parents, np.full((B, 1), K)], axis=1)
            next_words = np.concatenate([next_words, g_tok[:, None]], axis=1)
            beam_scores = np.concatenate([beam_scores, np.where(g_tok == end_id, -np.inf, g_score)[:, None]], 1)
        self.scores, self.tokens = beam_scores, next_words
        self.seqs = np.concatenate(
            [np.take_along_axis(self.seqs, parents[:, :, None], axis=1), self.tokens[:, :, None]], axis=2
        )
        return parents

    def _prune(self, parents):
        """An item is done when its best finished caption beats every continuation of its open
        rows; see :meth:`advance` for what it returns."""
        B = len(self.live)
        done = self.best_norm[self.live] >= _open_bound(self.scores.max(axis=1), self.T + 1, self.alpha)
        if done.all():
            return None
        # Done items leave the batch. Their image (static) rows are copied out with them, so this
        # waits until an eighth of the batch is done; until then their rows flow through the step.
        going, dropped = np.arange(B), None
        if done.sum() >= max(1, B // 8):
            going = dropped = np.flatnonzero(~done)
            self.live, self.scores, self.tokens, self.seqs, parents = (
                x[going] for x in (self.live, self.scores, self.tokens, self.seqs, parents)
            )
        else:
            self.scores[done] = -np.inf  # done items stop growing
        keep = (going[:, None] * self.G + parents).reshape(-1)  # rows of the previous step, item-major
        return dropped, keep
