"""Top-down attention decoder in the style of Up-Down (Anderson et al. 2018), over grid features.

Shapes: B batch, L feature locations, C feature channels, T caption steps, U units, A attention
units, E word embedding, V vocab.

Two LSTMs per step. The attention LSTM reads the language LSTM's last output, the mean image
and the word; its output is the query of an additive attention over the L locations. The
language LSTM reads that attended context and the attention LSTM's output; the words come from
its output. The features are first embedded (dense + ReLU + dropout, as in ruotianluo's
TopDown), which keeps a wide CNN's channels from being memorised. Training runs the steps as a
``tf.scan`` and lets autodiff do the backward pass (no hand-written one).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from .base import Decoder, coverage_term, dropout, dropout_seeds
from .bptt import Packing


@keras.saving.register_keras_serializable(package="captioning")
class UpDownDecoder(Decoder):
    SETTINGS = ("embed_dim", "units", "attention_units", "dropout")
    # The image: embedded features (B, L, U), attention keys (B, L, A), mean feature (B, U).
    STATIC_STATE = (-3, -2, -1)

    def __init__(
        self,
        vocab_size,
        feature_dim,
        num_locations,
        embed_dim=256,
        units=512,
        attention_units=256,
        dropout=0.3,
        blind=False,
        **kwargs,
    ):
        super().__init__(vocab_size, feature_dim, num_locations, blind=blind, **kwargs)
        self.embed_dim, self.units, self.attention_units, self.dropout = embed_dim, units, attention_units, dropout
        self.feat_embed = layers.Dense(units, activation="relu", name="feat_embed")
        self.feat_pos = layers.Embedding(num_locations, units, name="feat_pos")  # where each location is
        self.embed = layers.Embedding(vocab_size, embed_dim, name="embed")
        self.att_lstm = layers.LSTMCell(units, name="att_lstm")
        self.lang_lstm = layers.LSTMCell(units, name="lang_lstm")
        self.att_keys = layers.Dense(attention_units, name="att_keys")
        self.att_query = layers.Dense(attention_units, use_bias=False, name="att_query")
        self.att_score = layers.Dense(1, name="att_score")
        self.out_logits = layers.Dense(vocab_size, name="out_logits")

    def _build_cells(self):
        if not self.att_lstm.built:  # built here, not inside the time loop (no variables made in a loop)
            self.att_lstm.build((None, 2 * self.units + self.embed_dim))
            self.lang_lstm.build((None, 2 * self.units))

    def initial_state(self, features, seed=None):
        """features (B, L, C) -> (h1, c1, h2, c2 (B, U) zeros, feats (B, L, U), keys (B, L, A), mean (B, U))."""
        f = dropout(self.feat_embed(self.normalised_features(features)), self.dropout, seed)  # (B, L, U)
        f = f + self.feat_pos(tf.range(self.num_locations))[None]
        zeros = tf.zeros_like(f[:, 0])  # (B, U)
        return (zeros, zeros, zeros, zeros, f, self.att_keys(f), tf.reduce_mean(f, axis=1))

    def _step(self, emb, states, f, keys, mean):
        """One step for N = B * R rows (rows ``b * R ...`` read image b): emb (N, E) ->
        (h1, c1, h2, c2), the language LSTM's output (N, U), alpha (N, L)."""
        h1, c1, h2, c2 = states
        images, rows = tf.shape(f)[0], tf.shape(emb)[0] // tf.shape(f)[0]
        x1 = tf.concat([h2, tf.repeat(mean, rows, axis=0), emb], axis=-1)  # (N, 2U + E)
        h1, (_, c1) = self.att_lstm(x1, [h1, c1])
        q = tf.reshape(self.att_query(h1), [images, -1, 1, self.attention_units])  # (B, R, 1, A)
        e = self.att_score(tf.tanh(keys[:, None] + q))  # (B, R, L, 1)
        alpha = tf.nn.softmax(tf.reshape(e, [images, -1, self.num_locations]), axis=-1)  # (B, R, L)
        ctx = tf.reshape(tf.matmul(alpha, f), [-1, self.units])  # (N, U)
        h2, (_, c2) = self.lang_lstm(tf.concat([ctx, h1], axis=-1), [h2, c2])
        return (h1, c1, h2, c2), h2, tf.reshape(alpha, [-1, self.num_locations])

    # ---- teacher-forced training -----------------------------------------------------------
    def forward(self, features, tokens_in, dropout_seed=None, lengths=None, packed=False):
        """features (B, L, C), tokens_in (B, T) -> logits (B, T, V), {"attention": (B, T, L)}.

        Every step is computed (``lengths`` only zeroes the outputs past them); ``packed``
        (with ``lengths``): the real steps' logits only, (N, V) at ``aux["index"]``."""
        if packed and lengths is None:
            raise ValueError("packed logits need lengths")
        feat_seed = emb_seed = out_seed = None
        if dropout_seed is not None and self.dropout > 0:
            feat_seed, emb_seed, out_seed = dropout_seeds(dropout_seed, 3)
        self._build_cells()
        *states, f, keys, mean = self.initial_state(features, feat_seed)
        emb = dropout(self.embed(tokens_in), self.dropout, emb_seed)  # (B, T, E)

        def step(carry, emb_t):  # carry: (states, h2, alpha) of the last step
            states, out, alpha = self._step(emb_t, carry[0], f, keys, mean)
            return states, out, alpha

        alpha0 = tf.zeros_like(keys[:, :, 0])  # (B, L)
        _, hs, alphas = tf.scan(step, tf.transpose(emb, [1, 0, 2]), initializer=(tuple(states), states[2], alpha0))
        hs, alphas = tf.transpose(hs, [1, 0, 2]), tf.transpose(alphas, [1, 0, 2])  # (B, T, U), (B, T, L)
        shape = tf.shape(tokens_in)
        if lengths is None:
            return self.out_logits(dropout(hs, self.dropout, out_seed)), {"attention": alphas}
        index = Packing.of(lengths, shape[1]).index  # (N, 2) the real steps
        real = tf.cast(tf.range(shape[1])[None] < tf.cast(lengths, tf.int32)[:, None], alphas.dtype)  # (B, T)
        aux = {"attention": alphas * real[:, :, None]}
        if packed:
            h = dropout(tf.gather_nd(hs, index), self.dropout, out_seed, packed=(index, shape))  # (N, U)
            return self.out_logits(h), {**aux, "index": index}
        logits = self.out_logits(dropout(hs, self.dropout, out_seed))
        return logits * tf.cast(real, logits.dtype)[:, :, None], aux

    def extra_loss(self, aux, mask):
        return coverage_term(aux["attention"], mask)

    # ---- one decoding step (beam search) ---------------------------------------------------
    def step(self, tokens, state):
        """tokens (N,), state -> log-probs (N, V), state', alpha (N, L); the image parts may hold
        one row per image for N = images * R rows."""
        *states, f, keys, mean = state
        self._build_cells()
        states, out, alpha = self._step(self.embed(tokens), tuple(states), f, keys, mean)
        return tf.nn.log_softmax(self.out_logits(out), axis=-1), (*states, f, keys, mean), alpha
