"""Caption image features with any decoder: its step driven by beam search, and the attention behind
each word. (Images in, captions out: :class:`captioning.inference.Captioner`.)

Two drivers of the one search: :func:`captioning.beam.beam_search` from Python (the reference;
drops finished images from the batch, so it suits whole splits) and
:func:`captioning.graph_search.graph_beam_search` inside one TensorFlow graph (no per-word round
trip, so it suits one photo or a few).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .beam import Candidates, Step, beam_search
from .errors import CaptioningError
from .vocab import NEVER_GENERATED


@dataclasses.dataclass(frozen=True)
class Decoding:
    """How to decode: beam search (``beam_size``, ``max_length``, ``length_penalty``), steered
    (``n_best`` captions, ``groups`` with a ``diversity`` penalty, captions that must ``include``
    words or phrases, ``block_trigrams``) or sampled (``sample`` captions, ``temperature``,
    ``top_k``, ``top_p``, ``seed``). See :mod:`captioning.steer`."""

    beam_size: int = 3
    max_length: int = 20
    length_penalty: float = 0.0
    n_best: int = 1
    groups: int = 1
    diversity: float = 0.0
    include: tuple = ()  # constraints: "dog|dogs" (alternatives), "red shirt" (a phrase)
    block_trigrams: bool = False
    sample: int = 0  # > 0: draw this many captions per image instead of searching
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        object.__setattr__(self, "include", tuple(self.include))
        problems = [
            (self.beam_size >= 1, "beam_size must be >= 1"),
            (self.max_length >= 1, "max_length must be >= 1"),
            (self.length_penalty >= 0, "length_penalty must be >= 0"),
            (1 <= self.n_best <= self.beam_size or self.sample, "n_best must be between 1 and beam_size"),
            (self.groups >= 1 and self.diversity >= 0, "groups must be >= 1 and diversity >= 0"),
            (not (self.groups > 1 and self.include), "groups and include do not combine"),
            (self.sample >= 0 and self.temperature > 0, "sample must be >= 0 and temperature > 0"),
            (self.top_k >= 0 and 0 < self.top_p <= 1, "top_k must be >= 0 and 0 < top_p <= 1"),
            # settings that would be silently ignored
            (
                self.sample or (self.temperature, self.top_k, self.top_p) == (1.0, 0, 1.0),
                "temperature, top_k and top_p need sample > 0",
            ),
            (
                not (self.sample and (self.n_best > 1 or self.groups > 1 or self.include)),
                "sample does not combine with n_best, groups or include",
            ),
            (self.groups > 1 or not self.diversity, "diversity needs groups > 1"),
        ]
        for ok, message in problems:
            if not ok:
                raise CaptioningError(f"decoding: {message}")

    @property
    def steered(self) -> bool:
        """Whether it needs the host-driven search (steer.py) rather than the compiled one."""
        return self.n_best > 1 or self.groups > 1 or bool(self.include) or self.block_trigrams or self.sample > 0


def log_prob_step(decoder):
    """``step(tokens (N,), state) -> (log_probs (N, V), state')``: the decoder's step in TensorFlow
    ops, with ``<pad>``, ``<start>`` and ``<unk>`` at log-probability -inf, so no search can
    choose them (a caption of real words always beats one that says "<unk>")."""
    import tensorflow as tf

    def step(tokens, state):
        log_probs, state, _ = decoder.step(tokens, state)
        banned = tf.reduce_max(tf.one_hot(NEVER_GENERATED, tf.shape(log_probs)[-1]), axis=0)  # (V,)
        return tf.where(banned > 0, tf.constant(-float("inf"), log_probs.dtype), log_probs), state

    return step


def graph_search(decoder, vocab, beam_size, max_length, length_penalty=0.0):
    """``search(features (N, L, C)) -> (token lists, scores, log-probs)``: the decoder's initial
    state and the whole search as one compiled call."""
    from .graph_search import compile_search

    step = log_prob_step(decoder)
    static = getattr(decoder, "STATIC_STATE", ())
    return compile_search(
        step, beam_size, max_length, vocab.start_id, vocab.end_id, length_penalty, static, init=decoder.initial_state
    )


def make_step_fn(decoder, top_k=None, end_id=None):
    """Step for :func:`beam_search` over the decoder's own state: numpy tokens in, numpy
    log-probs (or candidates) out; the state stays a tuple of tensors, which the search reorders
    with the step's ``take`` (``tf.gather``) and the step's ``static`` parts come back unchanged.

    The log-probs are :func:`log_prob_step`'s. ``top_k`` (beam size + 1) and ``end_id``: the step
    returns :class:`Candidates`, each row's ``top_k`` best tokens picked in TensorFlow, instead of
    the (N, V) log-probs: the search reads nothing else, and numpy then ranks (N, top_k) arrays instead of (N, V).
    """
    import tensorflow as tf

    if top_k is not None and end_id is None:
        raise ValueError("make_step_fn(top_k=...) needs end_id: the search reads every row's <end> log-prob")

    model_step = log_prob_step(decoder)

    def step(tokens, state):
        log_probs, state = model_step(tokens, state)  # (N, V)
        if top_k is None:
            return log_probs, state
        best = tf.math.top_k(log_probs, k=tf.minimum(top_k, tf.shape(log_probs)[-1]))  # ties: lower id first
        return Candidates(best.values, best.indices, log_probs[:, end_id]), state

    static = getattr(decoder, "STATIC_STATE", ())
    compiled = []  # traced once, at the first call: every row count shares the one graph

    def run(tokens, state):
        # The state stays in TensorFlow between steps: beam search reorders it with ``take``
        # (tf.gather), so it is never copied out to numpy and back (only the candidates are).
        inputs = tuple(s if isinstance(s, tf.Tensor) else tf.constant(s) for s in state)
        if not compiled:
            specs = [tf.TensorSpec([None] * x.shape.rank, x.dtype) for x in inputs]  # rows, steps: any
            compiled.append(tf.function(step, input_signature=[tf.TensorSpec([None], tf.int32), tuple(specs)]))
        log_probs, out = compiled[0](tf.constant(tokens, tf.int32), inputs)
        log_probs = Candidates(*(x.numpy() for x in log_probs)) if top_k else log_probs.numpy()
        # The static parts (the image) go back as they came in: the same tensors, not copies.
        fixed = {i % len(state) for i in static}
        return log_probs, tuple(inputs[i] if i in fixed else s for i, s in enumerate(out))

    return DecoderStep(run, static, tf.gather, compiled)


class DecoderStep(Step):
    """A decoder's compiled step (:func:`make_step_fn`): the state stays in TensorFlow, its rows
    taken with ``tf.gather``; ``traces()`` counts the graphs it has built (one serves every row count)."""

    def __init__(self, fn, static, take, compiled):
        super().__init__(fn, static, take)
        self._compiled = compiled

    def traces(self) -> int:
        return self._compiled[0].experimental_get_tracing_count() if self._compiled else 0


def caption_features(
    decoder, vocab, features, beam_size=3, max_length=20, length_penalty=0.0, batch_size=64, progress=False
):
    """``(captions, log_probs)`` for ``features`` (N, L, C) by batched beam search.

    ``features``: an array or :class:`captioning.feature_store.FeatureRows`, read a batch at a time.

    Captions have at most ``max_length`` words; ``log_probs`` are the model's log-probability
    of each chosen caption (its words, and ``<end>`` when it ended before the limit).
    """
    from tqdm import tqdm

    from .batching import prefetch

    step_fn = make_step_fn(decoder, top_k=beam_size + 1, end_id=vocab.end_id)
    captions, log_probs = [], []
    starts = range(0, len(features), batch_size)
    # ``features`` may be FeatureRows (read from disk): the next batch is read during the search.
    batches = prefetch((features[i : i + batch_size] for i in starts), depth=2)
    for batch in tqdm(batches, total=len(starts), desc="captioning", unit="batch", disable=not progress):
        state = decoder.initial_state(batch)  # tensors: the step keeps them in TensorFlow
        seqs, _, raw = beam_search(
            step_fn, state, len(batch), beam_size, max_length, vocab.start_id, vocab.end_id, length_penalty
        )
        captions.extend(vocab.decode(s) for s in seqs)
        log_probs.extend(raw)
    return captions, log_probs


def word_attention(decoder, vocab, features, captions):
    """For each caption (space-separated vocabulary words): ``(words, alphas (len(words), L))``.

    The attention at each word is the decoder's own when it generated that word (a
    teacher-forced pass over the caption reproduces the search's steps).
    """
    import tensorflow as tf

    token_lists = [[vocab.start_id] + [vocab.index.get(w, vocab.unk_id) for w in c.split()] for c in captions]
    width = max(len(t) for t in token_lists)
    tokens = np.zeros((len(captions), width), np.int32)
    for i, t in enumerate(token_lists):
        tokens[i, : len(t)] = t
    _, aux = decoder.forward(tf.constant(features, tf.float32), tf.constant(tokens))
    alphas = np.asarray(aux["attention"])  # (B, T, L); step t generates word t (input: token t-1)
    return [(c.split(), alphas[i, : len(c.split())]) for i, c in enumerate(captions)]


def steered(decoder, vocab, features, d: Decoding) -> list:
    """``[[(tokens, score, log_prob), ...] per image]`` of (N, L, C) ``features`` by steered beam
    search or sampling (:mod:`captioning.steer`), driven from Python."""
    from .steer import check_constraints, constraint_ids, sample, steered_search

    step_fn = make_step_fn(decoder)  # the whole (N, V) log-probs: constraint words at any rank
    state, n = decoder.initial_state(features), len(features)
    try:
        if d.sample:
            found = sample(step_fn, state, n, d.sample, d.max_length, vocab.start_id, vocab.end_id,
                           d.temperature, d.top_k, d.top_p, d.seed)  # fmt: skip
        else:
            constraints = constraint_ids(vocab, d.include)
            check_constraints(constraints, d.max_length)
            found = steered_search(step_fn, state, n, d.beam_size, d.max_length, vocab.start_id, vocab.end_id,
                                   d.length_penalty, d.n_best, d.groups, d.diversity, constraints,
                                   d.block_trigrams)  # fmt: skip
    except ValueError as e:
        raise CaptioningError(f"decoding: {e}") from None
    return [[(h.tokens, float(h.score), float(h.log_prob)) for h in hyps] for hyps in found]
