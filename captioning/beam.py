"""Batched beam search over any step function (numpy; the model supplies the step).

``step_fn(tokens (N,), state) -> (log_probs (N, V), state')`` where N = batch * beam and
``state`` is a tuple of arrays whose first axis is N. Greedy decoding is ``beam_size=1``.

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

import numpy as np


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
    """Column indices of the ``k`` largest values per row, best first (stable: ties by index)."""
    n = values.shape[1]
    idx = np.argpartition(-values, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (len(values), 1))
    order = np.argsort(-np.take_along_axis(values, idx, 1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, 1)


def beam_search(step_fn, state, batch_size, beam_size, max_length, start_id, end_id, length_penalty=0.0, static=()):
    """Best caption per item: ``(token-id lists without <start>/<end>, normalised scores, log-probs)``.

    ``state`` has first axis ``batch_size`` (one row per item); it is repeated per beam here.
    Length normalisation divides a caption's log-probability by ``length**length_penalty``,
    where length counts the ``<end>`` token when one was emitted. Ties go to the caption found
    first. Tokens the step gives ``-inf`` are never chosen.

    ``static``: indices of state parts that are the same for every beam of an item and that the
    step never changes (the image's features): they are never reordered, since reordering
    within an item's rows would leave them as they are. Moving them costs most of a step
    otherwise (for Flickr8k, 64 images x 6 rows x 49 x 1024 floats).
    """
    B, K, T, alpha = batch_size, beam_size, max_length, length_penalty
    G = K + 1 if K > 1 else 1  # rows per item: K beams, then the greedy path (beam 1 is greedy)
    state = tuple(np.repeat(np.asarray(s), G, axis=0) for s in state)  # (B*G, ...)
    tokens = np.full((B, G), start_id, dtype=np.int64)
    seqs = np.zeros((B, G, 0), dtype=np.int64)
    scores = np.full((B, G), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    scores[:, G - 1] = 0.0  # ... and the greedy row
    best_norm = np.full(B, -np.inf)  # best finished caption per item
    best_raw = np.full(B, -np.inf)
    best_seq: list[list[int]] = [[] for _ in range(B)]
    rows = np.arange(B)

    def finish(b, raw, seq, t):
        norm = normalised(raw, t, alpha)
        if norm > best_norm[b]:  # strict: ties go to the caption found first
            best_norm[b], best_raw[b], best_seq[b] = norm, raw, seq.tolist()

    for t in range(1, T + 2):  # T word steps, then one step that can only close with <end>
        log_probs, state = step_fn(tokens.reshape(-1), state)
        log_probs = np.asarray(log_probs, dtype=np.float64)
        V = log_probs.shape[-1]
        cand = scores[:, :, None] + log_probs.reshape(B, G, V)  # (B, G, V)

        # Greedy row: its best token, <end> included (forced at the last step).
        g_tok = cand[:, G - 1].argmax(axis=1) if t <= T else np.full(B, end_id)
        g_score = cand[rows, G - 1, g_tok]
        if G > K:
            for b in np.flatnonzero((g_tok == end_id) & np.isfinite(g_score)):
                finish(b, g_score[b], seqs[b, G - 1], t)

        # Beam candidates ranked over all beams. An <end> among the K best closes a caption of t
        # tokens (Hugging Face's rule); at the last step every beam closes with <end>.
        flat = cand[:, :K].reshape(B, K * V)
        top = _top(flat, K if t <= T else K * V)
        for b, r in zip(*np.nonzero((top % V == end_id) & np.isfinite(np.take_along_axis(flat, top, 1)))):
            finish(b, flat[b, top[b, r]], seqs[b, top[b, r] // V], t)
        if t == T + 1:
            break

        # The next beams: the K best continuations that do not end; greedy goes its own way.
        flat[:, end_id::V] = -np.inf
        top = _top(flat, K)
        parents, words = np.divmod(top, V)
        beam_scores = np.take_along_axis(flat, top, axis=1)  # (B, K); -inf marks a dead beam
        if G > K:
            parents = np.concatenate([parents, np.full((B, 1), K)], axis=1)
            words = np.concatenate([words, g_tok[:, None]], axis=1)
            beam_scores = np.concatenate([beam_scores, np.where(g_tok == end_id, -np.inf, g_score)[:, None]], 1)
        scores, tokens = beam_scores, words
        seqs = np.concatenate([np.take_along_axis(seqs, parents[:, :, None], axis=1), tokens[:, :, None]], axis=2)

        # An item is done when its best finished caption beats every continuation of its open rows.
        done = best_norm >= _open_bound(scores.max(axis=1), T + 1, alpha)
        if done.all():
            break
        scores[done] = -np.inf  # done items stop growing (their rows still flow through the step)
        keep = (rows[:, None] * G + parents).reshape(-1)
        fixed = {i % len(state) for i in static}
        state = tuple(s if i in fixed else np.asarray(s)[keep] for i, s in enumerate(state))

    return best_seq, best_norm.tolist(), best_raw.tolist()
