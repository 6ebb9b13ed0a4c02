"""Decoding people can steer: n-best lists, diverse beam search, constrained beam search, sampling.

:func:`steered_search` is beam.py's search generalised to *sets* of beams. Each set keeps its own
``beam_size`` beams and its own finished captions, under beam.py's rules (a beam still open after
``max_length`` words closes with ``<end>``; an item stops when its ``n_best``-th finished caption
beats every continuation of its open rows; ties to the caption found first):

- **n-best**: the ``n_best`` best finished captions of each set, not only the best;
- **diverse** (Vijayakumar et al. 2018): ``groups`` sets; at each step group g's candidates are
  ranked with ``diversity`` x (how many earlier groups chose that token at this step) subtracted
  (a Hamming penalty); captions keep their model log-probability as score;
- **constrained** (Anderson et al. 2017): one set per subset of ``constraints`` met (a finite-state
  machine over which are met); a continuation moves to the set of what its caption now contains;
  only captions in the set of all constraints may finish, so every answer contains each one. A
  constraint is a list of alternatives, each a tuple of token ids (a word or a phrase, matched
  contiguously).

With one set, no constraints and no penalty it is exactly beam.py's search (the greedy path runs
beside the beams there too; tested). ``block_trigrams`` bans a token that would repeat a trigram
already in the caption. :func:`sample` draws captions instead (temperature, top-k, top-p).
``step_fn`` returns the whole (N, V) log-probs here (``make_step_fn(decoder)``): constraint
words must be reachable whatever their rank.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .beam import Step, normalised


class Hypothesis(NamedTuple):
    tokens: list
    score: float  # log-probability / length**length_penalty
    log_prob: float


def _rank(values):
    """Indices of ``values`` (1-D) best first; equal values: lower index first (beam.py's order)."""
    return np.argsort(-values, kind="stable")


def _completes(seq, constraint):
    """Whether ``seq`` (a tuple) ends with one of the constraint's alternatives."""
    return any(len(alt) <= len(seq) and seq[len(seq) - len(alt) :] == alt for alt in constraint)


def check_constraints(constraints, max_length):
    """A clear error for constraints that cannot all fit in ``max_length`` words."""
    need = sum(min(len(alt) for alt in c) for c in constraints)
    if need > max_length:
        raise ValueError(f"the constraints need at least {need} words, more than max_length {max_length}")


def steered_search(
    step,
    state,
    batch_size,
    beam_size,
    max_length,
    start_id,
    end_id,
    length_penalty=0.0,
    n_best=1,
    groups=1,
    diversity=0.0,
    constraints=(),
    block_trigrams=False,
):
    """Per item, its finished captions as :class:`Hypothesis` lists, best first (see the module
    docstring): ``n_best`` per set, and one list per item (the groups' captions merged).
    ``step``: a :class:`captioning.beam.Step` (or a plain step function)."""
    constraints = [tuple(tuple(alt) for alt in c) for c in constraints]
    check_constraints(constraints, max_length)
    if constraints and groups > 1:
        raise ValueError("diverse groups and constraints do not combine (each makes its own sets of beams)")
    plan = _Plan(beam_size, max_length, length_penalty, n_best, end_id, diversity, constraints, groups)
    B, R, T = batch_size, plan.R, max_length
    step = Step.of(step)
    finished = _Finished(plan, B)
    scores = np.tile(plan.start_scores(), (B, 1))  # (B, R): the model's log-probability of each row's prefix
    tokens = np.full((B, R), start_id, np.int64)
    seqs = [[() for _ in range(R)] for _ in range(B)]
    for t in range(1, T + 2):
        if t == 1:  # every row of an item starts from <start> in the same state: one row each, then copied
            out, state = step.first(tokens[:, 0], state, R)
        else:
            out, state = step(tokens.reshape(-1), state)
        lp = np.asarray(out, np.float64).reshape(B, R, -1)
        if block_trigrams:
            lp = _block_trigrams(lp, seqs)
        steps = [_advance(plan, finished, b, t, scores[b], lp[b], seqs[b]) for b in range(B)]
        if t == T + 1:
            break
        scores = np.stack([s[0] for s in steps])
        tokens = np.stack([s[1] for s in steps])
        keep = np.stack([s[2] for s in steps])
        seqs = [s[3] for s in steps]
        bound = normalised(scores.max(axis=1), T + 1, length_penalty) if length_penalty else scores.max(axis=1)
        done = np.array([finished.bar(b) >= bound[b] for b in range(B)])
        scores[done] = -np.inf  # done items stop growing
        if done.all():
            break
        state = step.reorder(state, (np.arange(B)[:, None] * R + keep).reshape(-1))
    return [finished.results(b) for b in range(B)]


class _Plan:
    """The search's layout: ``S`` sets of ``K`` beams (groups, or one per subset of constraints
    met), then beam.py's greedy row where there is one set."""

    def __init__(self, K, T, alpha, n_best, end_id, diversity, constraints, groups):
        self.K, self.T, self.alpha, self.n_best, self.end_id = K, T, alpha, n_best, end_id
        self.diversity, self.constraints = diversity, constraints
        C = len(constraints)
        self.S = 2**C if C else groups
        self.accepting = [self.S - 1] if C else list(range(self.S))
        self.greedy = self.S == 1 and K > 1
        self.R = self.S * K + self.greedy  # rows per item
        self.row_set = np.repeat(np.arange(self.S), K)

    def start_scores(self):
        """(R,): 0 for the rows that start (a set's first beam; every group's), -inf elsewhere."""
        scores = np.full(self.R, -np.inf)
        scores[0] = 0.0  # the first beam of the first set (no constraint met) ...
        if not self.constraints:
            scores[np.arange(self.S) * self.K] = 0.0  # ... or of every group
        if self.greedy:
            scores[-1] = 0.0
        return scores


class _Finished:
    """Each item's finished captions per set, best first, at most ``n_best`` (ties: first found)."""

    def __init__(self, plan, batch_size):
        self.plan = plan
        self.pools = [[[] for _ in range(plan.S)] for _ in range(batch_size)]  # (norm, raw, seq)

    def add(self, b, s, raw, seq, t):
        pool, norm = self.pools[b][s], normalised(raw, t, self.plan.alpha)
        if any(h[2] == seq for h in pool):  # the greedy row's caption may be a beam's too
            return
        at = next((i for i, h in enumerate(pool) if norm > h[0]), len(pool))  # after equals: first found wins
        if at < self.plan.n_best:
            pool.insert(at, (norm, raw, seq))
            del pool[self.plan.n_best :]

    def bar(self, b):
        """The score item b's open rows must beat: per accepting set its n-th best, the lowest."""
        n = self.plan.n_best
        return min((self.pools[b][s][-1][0] if len(self.pools[b][s]) == n else -np.inf) for s in self.plan.accepting)

    def results(self, b):
        pool = sorted((h for s in self.plan.accepting for h in self.pools[b][s]), key=lambda h: -h[0])  # stable
        return [Hypothesis(list(seq), norm, raw) for norm, raw, seq in pool]


def _advance(plan, finished, b, t, scores, lp, seqs):
    """One step of item b: ``(scores, tokens, parents, seqs)`` of its next rows, finishing the
    captions that end (``lp``: (R, V) log-probs of its rows' next tokens)."""
    K, S, R, end_id = plan.K, plan.S, plan.R, plan.end_id
    V = lp.shape[1]
    cand = scores[:, None] + lp  # (R, V)
    new_scores, new_tokens = np.full(R, -np.inf), np.full(R, end_id, np.int64)
    keep, new_seqs = np.zeros(R, np.int64), [() for _ in range(R)]
    if plan.greedy:  # the greedy row first: its best token (<end> forced at the last step)
        g = R - 1
        w = int(np.argmax(lp[g])) if t <= plan.T else end_id
        if w == end_id and np.isfinite(cand[g, w]):
            finished.add(b, 0, cand[g, w], seqs[g], t)
        new_scores[g] = cand[g, w] if w != end_id else -np.inf
        new_tokens[g], keep[g], new_seqs[g] = w, g, seqs[g] + (w,)
    target = _targets(plan.row_set, seqs, plan.constraints, V, S, K) if plan.constraints else None
    chosen = np.zeros(V)  # diversity: tokens earlier groups chose at this step
    for s in range(S):
        if target is not None:  # every row may move here: the candidates whose caption now meets set s
            sel = np.where(target == s, cand[: S * K], -np.inf)
        else:  # a group extends its own beams only
            sel = np.full((S * K, V), -np.inf)
            sel[s * K : (s + 1) * K] = cand[s * K : (s + 1) * K] - plan.diversity * chosen
        if t == plan.T + 1:  # every open beam closes with <end>, best first
            for r in _rank(sel[:, end_id])[:K] if s in plan.accepting else ():
                if np.isfinite(sel[r, end_id]):
                    finished.add(b, s, cand[r, end_id], seqs[r], t)
            continue
        flat = sel.reshape(-1)
        for i in _rank(flat)[:K]:  # an <end> among the set's K best closes a caption (beam.py's rule)
            r, w = divmod(int(i), V)
            if w == end_id and np.isfinite(flat[i]) and s in plan.accepting:
                finished.add(b, s, cand[r, w], seqs[r], t)
        flat = flat.copy()
        flat[end_id::V] = -np.inf
        for j, i in enumerate(_rank(flat)[:K]):  # the set's next beams: its K best that do not end
            r, w = divmod(int(i), V)
            row = s * K + j
            if np.isfinite(flat[i]):
                new_scores[row] = cand[r, w]
                chosen[w] += 1
            new_tokens[row], keep[row], new_seqs[row] = w, r, seqs[r] + (w,)
    return new_scores, new_tokens, keep, new_seqs


def _targets(row_set, seqs, constraints, V, S, K):
    """(S * K, V): the set a row's caption moves to with each next token (the constraints it meets)."""
    target = np.repeat(row_set[:, None], V, axis=1).copy()
    ends = {alt[-1] for c in constraints for alt in c}  # only these tokens can complete a constraint
    for r in range(S * K):
        mask = row_set[r]
        for w in ends:
            seq = seqs[r] + (w,)
            met = mask | sum(1 << i for i, c in enumerate(constraints) if _completes(seq, c))
            target[r, w] = met
    return target


def _block_trigrams(lp, seqs):
    """-inf for each row's tokens that would repeat a trigram already in its caption."""
    lp = lp.copy()
    for b, rows in enumerate(seqs):
        for r, seq in enumerate(rows):
            if len(seq) >= 2:
                last = seq[-2:]
                for i in range(len(seq) - 2):
                    if seq[i : i + 2] == last:
                        lp[b, r, seq[i + 2]] = -np.inf
    return lp


def sample(
    step,
    state,
    batch_size,
    n,
    max_length,
    start_id,
    end_id,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seed=0,
):
    """``n`` sampled captions per item as :class:`Hypothesis` lists (in draw order), seeded.

    Each word is drawn from the model's distribution divided by ``temperature``, cut to its
    ``top_k`` most probable tokens (0: all) and to the smallest set whose probability reaches
    ``top_p`` (nucleus). A caption still open after ``max_length`` words closes with ``<end>``, as
    in beam search. Scores are the model's own log-probabilities of the captions (untempered).
    ``top_k=1`` is greedy decoding. ``step``: a :class:`captioning.beam.Step` (or a function).
    """
    if temperature <= 0 or not (0 < top_p <= 1) or top_k < 0:
        raise ValueError(f"need temperature > 0, 0 < top_p <= 1, top_k >= 0 (got {temperature}, {top_p}, {top_k})")
    rng = np.random.default_rng(seed)
    N = batch_size * n
    step = Step.of(step)
    tokens = np.full(batch_size, start_id, np.int64)
    raw, open_ = np.zeros(N), np.ones(N, bool)
    seqs = [[] for _ in range(N)]
    for t in range(1, max_length + 2):
        out, state = step.first(tokens, state, n) if t == 1 else step(tokens, state)
        lp = np.asarray(out, np.float64)
        if t == max_length + 1:
            words = np.full(N, end_id)
        else:
            words = _draw(lp, temperature, top_k, top_p, rng)
        raw[open_] += lp[open_, words[open_]]
        for i in np.flatnonzero(open_ & (words != end_id)):
            seqs[i].append(int(words[i]))
        open_ &= words != end_id
        tokens = np.where(open_, words, end_id)
        if not open_.any():
            break
    return [[Hypothesis(seqs[i], raw[i], raw[i]) for i in range(b * n, (b + 1) * n)] for b in range(batch_size)]


def _draw(lp, temperature, top_k, top_p, rng):
    """One token per row from (N, V) log-probs under temperature, top-k and top-p."""
    logits = lp / temperature
    order = np.argsort(-logits, axis=1, kind="stable")  # best first, ties: lower id
    ranked = np.take_along_axis(logits, order, 1)
    probs = np.exp(ranked - ranked[:, :1])
    if top_k:
        probs[:, top_k:] = 0
    probs /= probs.sum(axis=1, keepdims=True)
    if top_p < 1:
        before = np.cumsum(probs, axis=1) - probs  # mass of the better tokens
        probs[before >= top_p] = 0  # keep the smallest prefix whose mass reaches top_p
        probs /= probs.sum(axis=1, keepdims=True)
    pick = (rng.random((len(lp), 1)) < np.cumsum(probs, axis=1)).argmax(axis=1)
    return order[np.arange(len(lp)), pick]


def constraint_ids(vocab, constraints):
    """``["dog|dogs", "red shirt"]`` -> token-id alternatives; a ValueError names an unknown word."""
    out = []
    for text in constraints:
        alts = []
        for alt in text.split("|"):
            words = alt.strip().lower().split()
            if not words:
                raise ValueError(f"constraint {text!r}: an empty alternative")
            unknown = [w for w in words if w not in vocab.index]
            if unknown:
                raise ValueError(f"constraint {text!r}: {unknown[0]!r} is not in the model's vocabulary")
            alts.append(tuple(vocab.index[w] for w in words))
        out.append(alts)
    return out
