"""Several trained decoders decoding as one: at every step the mean of their word probabilities.

An :class:`Ensemble` honours the decoder contract's decoding half (``initial_state``, ``step``,
``STATIC_STATE``, ``forward`` for attention maps), so the searches, the evaluate stage and the
captioner take it as they take one decoder. Members must read the same features (one encoder)
and share one vocabulary; they may be different decoders (a GRU and an Up-Down, say).
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from .errors import CaptioningError
from .model_folder import TrainedModel, load_model


class Ensemble:
    """``members``: decoders over the same features and vocabulary. The state is the members'
    states one after another; the image parts of each stay static."""

    def __init__(self, members):
        if len(members) < 2:
            raise ValueError("an ensemble needs two or more decoders")
        self.members = list(members)
        first = self.members[0]
        for m in self.members[1:]:
            if (m.vocab_size, m.feature_dim, m.num_locations) != (
                first.vocab_size,
                first.feature_dim,
                first.num_locations,
            ):
                raise ValueError("ensemble members must share the vocabulary and the feature shape")
        self.vocab_size, self.feature_dim, self.num_locations = first.vocab_size, first.feature_dim, first.num_locations
        probe = tf.zeros((1, self.num_locations, self.feature_dim))
        self._sizes = [len(m.initial_state(probe)) for m in self.members]  # state parts per member
        static, at = [], 0
        for m, n in zip(self.members, self._sizes):
            static += [at + i % n for i in getattr(m, "STATIC_STATE", ())]
            at += n
        self.STATIC_STATE = tuple(static)
        self.MAX_TOKENS = min((m.MAX_TOKENS for m in self.members if m.MAX_TOKENS), default=None)

    def check_max_length(self, max_length, where):
        for m in self.members:
            m.check_max_length(max_length, where)

    def settings(self) -> dict:
        """Attends when every member does (the maps shown are their mean)."""
        return {"attention": all(m.settings().get("attention", True) for m in self.members), "members": len(self)}

    def __len__(self):
        return len(self.members)

    def _split(self, state):
        out, at = [], 0
        for n in self._sizes:
            out.append(tuple(state[at : at + n]))
            at += n
        return out

    def initial_state(self, features):
        return tuple(part for m in self.members for part in m.initial_state(features))

    def step(self, tokens, state):
        """tokens (N,) -> log of the members' mean probabilities (N, V), state', mean attention (N, L)."""
        outs = [m.step(tokens, s) for m, s in zip(self.members, self._split(state))]
        log_probs = tf.reduce_logsumexp(tf.stack([o[0] for o in outs]), axis=0) - math.log(len(self))
        state = tuple(part for o in outs for part in o[1])
        return log_probs, state, tf.add_n([o[2] for o in outs]) / len(self)

    def forward(self, features, tokens_in, **_):
        """Teacher-forced: log of the mean probabilities (B, T, V), {"attention": mean (B, T, L)}."""
        outs = [m.forward(features, tokens_in) for m in self.members]
        log_p = tf.stack([tf.nn.log_softmax(o[0], axis=-1) for o in outs])  # (K, B, T, V)
        logits = tf.reduce_logsumexp(log_p, axis=0) - math.log(len(self))
        return logits, {"attention": tf.add_n([o[1]["attention"] for o in outs]) / len(self)}


def load_models(folders) -> TrainedModel:
    """One model folder, or several decoding as an ensemble (:class:`captioning.ensemble.Ensemble`):
    they must share the vocabulary, the encoder and the features' precision."""
    models = [load_model(f) for f in folders]
    if len(models) == 1:
        return models[0]
    first = models[0]
    for m in models[1:]:
        for what, same in (
            ("vocabulary", m.vocab.words == first.vocab.words),
            ("encoder", m.encoder.same_network(first.encoder)),
            ("feature precision", m.feature_dtype == first.feature_dtype),
        ):
            if not same:
                raise CaptioningError(f"{m.folder}: another {what} than {first.folder}; an ensemble needs the same")
    try:
        decoder = Ensemble([m.decoder for m in models])
    except ValueError as e:
        raise CaptioningError(f"{', '.join(str(m.folder) for m in models)}: {e}") from None
    config = {**first.config, "ensemble": [str(m.folder) for m in models]}
    return dataclasses.replace(first, decoder=decoder, config=config)
