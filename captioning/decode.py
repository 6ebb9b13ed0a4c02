"""Caption features with a trained model: a compiled decoding step driven by beam search."""

from __future__ import annotations

import numpy as np

from .beam import beam_search


def make_step_fn(model):
    """numpy-facing step for :func:`beam_search`: state = (h, feats, keys)."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def step(tokens, h, f, keys):
        log_probs, h, _ = model.decode_step(tokens, h, f, keys)
        # <pad>, <start> and <unk> are never generated (ids 0, 1, 3; see vocab.SPECIALS): a
        # caption of real words always beats one that says "<unk>".
        banned = tf.one_hot([0, 1, 3], tf.shape(log_probs)[-1], on_value=-1e9, off_value=0.0)
        return log_probs + tf.reduce_sum(banned, axis=0), h

    def step_fn(tokens, state):
        h, f, keys = state
        log_probs, h = step(tf.constant(tokens, tf.int32), h, f, keys)
        return log_probs.numpy(), (h.numpy(), f, keys)

    return step_fn


def caption_features(model, vocab, features, beam_size=3, max_length=20, length_penalty=0.0,
                     batch_size=64, progress=False):
    """Captions (strings) for ``features`` (N, L, C) by batched beam search."""
    from tqdm import tqdm

    step_fn = make_step_fn(model)
    captions = []
    for i in tqdm(range(0, len(features), batch_size), desc="captioning", unit="batch", disable=not progress):
        batch = features[i:i + batch_size]
        h, f, keys = (np.asarray(x) for x in model.encode(batch))
        seqs, _ = beam_search(step_fn, (h, f, keys), len(batch), beam_size, max_length + 1,
                              vocab.start_id, vocab.end_id, length_penalty)
        captions.extend(vocab.decode(s) for s in seqs)
    return captions


def load_captioner(model_path):
    """Load a saved :class:`Captioner` (Keras format, safe mode: no arbitrary code)."""
    from pathlib import Path

    import keras

    from . import model as _registers_captioner  # noqa: F401  (registers the class for loading)
    from .errors import CaptioningError

    if not Path(model_path).is_file():
        raise CaptioningError(f"{model_path}: model file not found (run `dvc repro` first)")
    return keras.saving.load_model(model_path, safe_mode=True, compile=False)
