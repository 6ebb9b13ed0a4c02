"""Batched beam search over any step function (numpy; the model supplies the step).

``step_fn(tokens (N,), state) -> (log_probs (N, V), state')`` where N = batch * beam and
``state`` is a tuple of arrays whose first axis is N. Greedy decoding is ``beam_size=1``.
"""

from __future__ import annotations

import numpy as np


def normalised(score, length, alpha):
    """Length-normalised score: ``score / length**alpha`` (alpha 0 = raw log-probability)."""
    return score / (length ** alpha) if alpha else score


def beam_search(step_fn, state, batch_size, beam_size, max_length, start_id, end_id, length_penalty=0.0):
    """Best caption per item: ``(list of token-id lists without <start>/<end>, list of scores)``.

    ``state`` has first axis ``batch_size`` (one row per item); it is repeated per beam here.
    A hypothesis finishes when it emits ``end_id``; an item is done once it has ``beam_size``
    finished hypotheses. Beams still open after ``max_length`` steps finish there as they are
    (without ``<end>``), so decoding always terminates. Scores are length-normalised by
    ``length_penalty`` (length counts the ``<end>`` token when emitted).
    """
    B, K = batch_size, beam_size
    state = tuple(np.repeat(np.asarray(s), K, axis=0) for s in state)  # (B*K, ...)
    tokens = np.full((B, K), start_id, dtype=np.int64)
    seqs = np.zeros((B, K, 0), dtype=np.int64)
    scores = np.full((B, K), -np.inf)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished = [[] for _ in range(B)]  # per item: (normalised score, raw score, tokens)
    done = np.zeros(B, dtype=bool)

    for t in range(1, max_length + 1):
        log_probs, state = step_fn(tokens.reshape(-1), state)
        log_probs = np.asarray(log_probs, dtype=np.float64)
        V = log_probs.shape[-1]
        cand = (scores[:, :, None] + log_probs.reshape(B, K, V)).reshape(B, K * V)
        # 2K candidates always hold K that do not end here.
        top = np.argsort(-cand, axis=1, kind="stable")[:, : 2 * K]
        new_tokens = np.full((B, K), end_id, dtype=np.int64)
        new_scores = np.full((B, K), -np.inf)
        parents = np.tile(np.arange(K), (B, 1))
        for b in range(B):
            if done[b]:
                continue
            alive = 0
            for c in top[b]:
                s = cand[b, c]
                if not np.isfinite(s):
                    break
                k, w = divmod(int(c), V)
                if w == end_id:
                    finished[b].append((normalised(s, t, length_penalty), s, seqs[b, k].tolist()))
                else:
                    parents[b, alive], new_tokens[b, alive], new_scores[b, alive] = k, w, s
                    alive += 1
                if alive == K:
                    break
            if len(finished[b]) >= K:
                done[b] = True
        seqs = np.concatenate([np.take_along_axis(seqs, parents[:, :, None], axis=1), new_tokens[:, :, None]], axis=2)
        tokens, scores = new_tokens, new_scores
        scores[done] = -np.inf
        if done.all():
            break
        flat = (np.arange(B)[:, None] * K + parents).reshape(-1)
        state = tuple(np.asarray(s)[flat] for s in state)

    best_seqs, best_scores = [], []
    for b in range(B):
        if not done[b]:  # ran out of steps: open beams finish without <end>
            for k in range(K):
                if np.isfinite(scores[b, k]):
                    finished[b].append((normalised(scores[b, k], max_length, length_penalty),
                                        scores[b, k], seqs[b, k].tolist()))
        # highest normalised score; ties go to the earliest found (stable sort)
        best = sorted(finished[b], key=lambda h: -h[0])[0]
        best_seqs.append(best[2])
        best_scores.append(float(best[0]))
    return best_seqs, best_scores
