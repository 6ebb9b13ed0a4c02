"""Caption features with a trained model: a compiled decoding step driven by beam search."""

from __future__ import annotations

import numpy as np

from .beam import beam_search

NEVER_GENERATED = (0, 1, 3)  # <pad>, <start>, <unk> (see vocab.SPECIALS)


def make_step_fn(model):
    """numpy-facing step for :func:`beam_search`: state = (h, feats, keys).

    ``<pad>``, ``<start>`` and ``<unk>`` get log-probability -inf, so beam search can never
    choose them (a caption of real words always beats one that says "<unk>").
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(tokens, h, f, keys):
        log_probs, h, _ = model.decode_step(tokens, h, f, keys)
        banned = tf.reduce_max(tf.one_hot(NEVER_GENERATED, tf.shape(log_probs)[-1]), axis=0)  # (V,)
        return tf.where(banned > 0, -float("inf"), log_probs), h

    def step_fn(tokens, state):
        h, f, keys = state
        log_probs, h = step(tf.constant(tokens, tf.int32), h, f, keys)
        return log_probs.numpy(), (h.numpy(), f, keys)

    return step_fn


def caption_features(
    model, vocab, features, beam_size=3, max_length=20, length_penalty=0.0, batch_size=64, progress=False
):
    """``(captions, log_probs)`` for ``features`` (N, L, C) by batched beam search.

    Captions have at most ``max_length`` words; ``log_probs`` are the model's log-probability
    of each chosen caption (its words, and ``<end>`` when it ended before the limit).
    """
    from tqdm import tqdm

    step_fn = make_step_fn(model)
    captions, log_probs = [], []
    for i in tqdm(range(0, len(features), batch_size), desc="captioning", unit="batch", disable=not progress):
        batch = features[i : i + batch_size]
        h, f, keys = (np.asarray(x) for x in model.encode(batch))
        seqs, _, raw = beam_search(
            step_fn, (h, f, keys), len(batch), beam_size, max_length, vocab.start_id, vocab.end_id, length_penalty
        )
        captions.extend(vocab.decode(s) for s in seqs)
        log_probs.extend(raw)
    return captions, log_probs


def load_captioner(model_path):
    """Load a saved :class:`Captioner` (Keras format, safe mode: no arbitrary code)."""
    from pathlib import Path

    import keras

    from . import model as _registers_captioner  # noqa: F401  (registers the class for loading)
    from .errors import CaptioningError

    if not Path(model_path).is_file():
        raise CaptioningError(f"{model_path}: model file not found (run `dvc repro` first)")
    return keras.saving.load_model(model_path, safe_mode=True, compile=False)
