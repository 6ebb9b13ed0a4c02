"""Caption features with any decoder: its compiled step driven by batched beam search."""

from __future__ import annotations

import numpy as np

from .beam import beam_search

NEVER_GENERATED = (0, 1, 3)  # <pad>, <start>, <unk> (see vocab.SPECIALS)


def make_step_fn(decoder):
    """numpy-facing step for :func:`beam_search` over the decoder's own state (a tuple of arrays).

    ``<pad>``, ``<start>`` and ``<unk>`` get log-probability -inf, so beam search can never
    choose them (a caption of real words always beats one that says "<unk>").
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(tokens, state):
        log_probs, state, _ = decoder.step(tokens, state)
        banned = tf.reduce_max(tf.one_hot(NEVER_GENERATED, tf.shape(log_probs)[-1]), axis=0)  # (V,)
        return tf.where(banned > 0, -float("inf"), log_probs), state

    def step_fn(tokens, state):
        log_probs, state = step(tf.constant(tokens, tf.int32), tuple(tf.constant(s) for s in state))
        return log_probs.numpy(), tuple(s.numpy() for s in state)

    return step_fn


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

    step_fn = make_step_fn(decoder)
    captions, log_probs = [], []
    starts = range(0, len(features), batch_size)
    # ``features`` may be FeatureRows (read from disk): the next batch is read during the search.
    batches = prefetch((features[i : i + batch_size] for i in starts), depth=2)
    for batch in tqdm(batches, total=len(starts), desc="captioning", unit="batch", disable=not progress):
        state = tuple(np.asarray(x) for x in decoder.initial_state(batch))
        seqs, _, raw = beam_search(
            step_fn, state, len(batch), beam_size, max_length, vocab.start_id, vocab.end_id, length_penalty
        )
        captions.extend(vocab.decode(s) for s in seqs)
        log_probs.extend(raw)
    return captions, log_probs
