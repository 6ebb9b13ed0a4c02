"""GRU caption decoder with optional soft attention (Show, Attend and Tell, with a GRU).

Shapes: B batch, L feature locations (h*w), C feature channels, T caption steps, V vocab.

With ``attention=True`` each step attends over the L locations (Bahdanau additive scoring,
query = previous hidden state), gates the context (SAT's beta) and feeds it with the word
embedding into the GRU. A learned embedding per location is added to the features first, so
attention can select by place as well as by content. With ``attention=False`` it is the plain
"image as initial state" decoder: the pooled image initialises the GRU and the words alone
drive it.

Dropout is stateless and takes an explicit seed, so a training run resumed from a checkpoint
draws exactly the same dropout masks as one that never stopped. Each dropout layer draws from
its own stream split off the step's seed (:func:`dropout_seeds`).
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers


def dropout_seeds(seed):
    """Independent seeds ``(embedding, output)`` for the two dropout layers from one step seed.

    ``stateless_split`` hashes the seed, so the streams never line up across steps (adding an
    offset to ``[seed, step]`` would make one layer's mask equal the next step's other one).
    """
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), num=2))


@keras.saving.register_keras_serializable(package="captioning")
class Captioner(keras.Model):
    def __init__(
        self,
        vocab_size,
        feature_dim,
        num_locations,
        embed_dim=256,
        units=512,
        attention=True,
        attention_units=256,
        dropout=0.3,
        blind=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.vocab_size, self.feature_dim, self.num_locations = vocab_size, feature_dim, num_locations
        self.embed_dim, self.units, self.attention = embed_dim, units, attention
        self.attention_units, self.dropout, self.blind = attention_units, dropout, blind

        # CNN features from different backbones (or random init) differ wildly in scale.
        self.feat_norm = layers.LayerNormalization(name="feat_norm")
        self.init_h = layers.Dense(units, activation="tanh", name="init_h")
        self.embed = layers.Embedding(vocab_size, embed_dim, name="embed")
        self.cell = layers.GRUCell(units, name="gru")
        if attention:
            # Conv features say *what* is at a location but hardly *where* it is; a learned
            # embedding per location lets attention pick "the left one" and lets the context
            # carry layout ("above" vs "left of").
            self.feat_pos = layers.Embedding(num_locations, feature_dim, name="feat_pos")
            self.att_keys = layers.Dense(attention_units, name="att_keys")
            self.att_query = layers.Dense(attention_units, use_bias=False, name="att_query")
            self.att_score = layers.Dense(1, name="att_score")
            self.att_gate = layers.Dense(1, activation="sigmoid", name="att_gate")
        # Deep output: logits from the hidden state, the context and the previous word.
        self.out_hidden = layers.Dense(embed_dim, name="out_hidden")
        self.out_logits = layers.Dense(vocab_size, name="out_logits")

    def get_config(self):
        return {**super().get_config(), **self.settings()}

    def settings(self) -> dict:
        keys = (
            "vocab_size",
            "feature_dim",
            "num_locations",
            "embed_dim",
            "units",
            "attention",
            "attention_units",
            "dropout",
            "blind",
        )
        return {k: getattr(self, k) for k in keys}

    def build(self, input_shape=None):
        # Create every weight by running one step, so a loaded model can take its weights.
        feats = tf.zeros((1, self.num_locations, self.feature_dim))
        self.forward(feats, tf.ones((1, 2), tf.int32))
        self.built = True

    # ---- pieces shared by training and decoding -------------------------------------------
    def encode(self, features):
        """features (B, L, C) -> state: (h0 (B, U), feats (B, L, C), keys (B, L, A) or dummy)."""
        if self.blind:
            features = tf.zeros_like(features)  # the blind baseline: same decoder, no image
        f = self.feat_norm(features)  # (B, L, C)
        h0 = self.init_h(tf.reduce_mean(f, axis=1))  # (B, U)
        if self.attention:
            f = f + self.feat_pos(tf.range(self.num_locations))[None]  # (B, L, C)
        keys = self.att_keys(f) if self.attention else tf.zeros_like(f[:, :, :1])  # (B, L, A)
        return h0, f, keys

    def _attend(self, h, f, keys):
        """Soft attention: returns context (B, C) and weights alpha (B, L)."""
        q = self.att_query(h)[:, None, :]  # (B, 1, A)
        e = tf.squeeze(self.att_score(tf.tanh(keys + q)), -1)  # (B, L)
        alpha = tf.nn.softmax(e, axis=-1)
        ctx = tf.reduce_sum(alpha[:, :, None] * f, axis=1)  # (B, C)
        return self.att_gate(h) * ctx, alpha

    def _recur(self, emb_t, h, f, keys):
        """One GRU step: emb_t (B, E), h (B, U) -> h' (B, U), ctx (B, C or 0), alpha (B, L)."""
        if self.attention:
            ctx, alpha = self._attend(h, f, keys)
            x = tf.concat([emb_t, ctx], axis=-1)
        else:
            ctx, alpha = tf.zeros_like(emb_t[:, :0]), tf.zeros_like(f[:, :, 0])
            x = emb_t
        h, _ = self.cell(x, [h])
        return h, ctx, alpha

    def _logits(self, h, ctx, emb, dropout_seed=None):
        z = self.out_hidden(tf.concat([h, ctx, emb], axis=-1))
        if dropout_seed is not None and self.dropout > 0:
            z = tf.nn.experimental.stateless_dropout(z, self.dropout, seed=dropout_seed)
        return self.out_logits(z)

    # ---- teacher-forced training -----------------------------------------------------------
    def forward(self, features, tokens_in, dropout_seed=None):
        """features (B, L, C), tokens_in (B, T) -> logits (B, T, V), alphas (B, T, L).

        ``dropout_seed``: int32 (2,) tensor turns dropout on (training); None turns it off.
        """
        emb_seed = out_seed = None
        if dropout_seed is not None and self.dropout > 0:
            emb_seed, out_seed = dropout_seeds(dropout_seed)
        h, f, keys = self.encode(features)
        emb = self.embed(tokens_in)  # (B, T, E)
        if emb_seed is not None:
            emb = tf.nn.experimental.stateless_dropout(emb, self.dropout, seed=emb_seed)

        def step(carry, emb_t):
            h_prev = carry[0]
            h_new, ctx, alpha = self._recur(emb_t, h_prev, f, keys)
            return h_new, ctx, alpha

        init = (h, tf.zeros_like(f[:, 0, :]) if self.attention else tf.zeros_like(h[:, :0]), tf.zeros_like(f[:, :, 0]))
        hs, ctxs, alphas = tf.scan(step, tf.transpose(emb, [1, 0, 2]), initializer=init)  # time-major
        hs, ctxs, alphas = (tf.transpose(x, [1, 0, 2]) for x in (hs, ctxs, alphas))  # (B, T, .)
        return self._logits(hs, ctxs, emb, out_seed), alphas

    def call(self, inputs, training=False):
        features, tokens_in = inputs
        return self.forward(features, tokens_in)[0]

    # ---- one decoding step (beam search) ---------------------------------------------------
    def decode_step(self, tokens, h, f, keys):
        """tokens (N,), h (N, U) -> log-probs (N, V), h' (N, U), alpha (N, L)."""
        emb = self.embed(tokens)  # (N, E)
        h, ctx, alpha = self._recur(emb, h, f, keys)
        return tf.nn.log_softmax(self._logits(h, ctx, emb), axis=-1), h, alpha


def masked_loss(logits, targets, alphas, attention_reg=0.0):
    """Mean cross-entropy over real tokens (targets > 0) plus SAT's doubly stochastic term.

    ``alphas`` (B, T, L) are softmaxes over the L locations, so at every step the attention sums
    to 1 and a caption's coverage (attention summed over its n real words, per location) always
    totals n: the term cannot change how much the decoder looks, only where. It is the squared
    distance of the coverage from the even spread n/L per location (SAT's ``(1 - sum_t alpha)^2``
    is the case n = L), summed over locations and averaged over captions, so it pushes the
    decoder to look at the whole image over a caption instead of fixating on one place.
    Padded steps count for neither the cross-entropy nor the coverage.
    """
    mask = tf.cast(targets > 0, logits.dtype)  # (B, T)
    ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets, logits=logits)  # (B, T)
    loss = tf.reduce_sum(ce * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)
    if attention_reg > 0:
        coverage = tf.reduce_sum(alphas * mask[:, :, None], axis=1)  # (B, L)
        share = tf.reduce_sum(mask, axis=1, keepdims=True) / tf.cast(tf.shape(alphas)[-1], mask.dtype)  # (B, 1)
        loss += attention_reg * tf.reduce_mean(tf.reduce_sum((share - coverage) ** 2, axis=-1))
    return loss
