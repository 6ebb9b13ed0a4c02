"""A small Transformer decoder over the spatial features: causal self-attention, cross-attention.

Shapes: B batch, L feature locations, C feature channels, T caption steps, D model width.

The features are projected to D and given a learned embedding per location (the memory); each
layer is pre-norm: causal self-attention over the words so far, cross-attention from the words
to the L locations, and a feed-forward block, each around a residual. ``embed_dim`` is the
model width D, ``units`` the feed-forward width. The last layer's cross-attention (averaged
over heads) is where the decoder looks; every layer's is in ``aux["layer_attention"]``.

Decoding re-runs the stack on the caption so far at each step (no key/value cache): captions are
at most a few dozen tokens, so that costs little and keeps the step exact.
"""

from __future__ import annotations

import keras
import tensorflow as tf
from keras import layers

from .base import Decoder, dropout, dropout_seeds
from .bptt import Packing

MAX_POSITIONS = 64  # longest caption (tokens) the position embedding covers


@keras.saving.register_keras_serializable(package="captioning")
class TransformerDecoder(Decoder):
    SETTINGS = ("embed_dim", "units", "num_layers", "num_heads", "dropout")
    MAX_TOKENS = MAX_POSITIONS
    ATTENTION_PRIOR = False
    STATIC_STATE = (0,)  # the memory (projected image features): the same at every step

    def __init__(
        self,
        vocab_size,
        feature_dim,
        num_locations,
        embed_dim=256,
        units=1024,
        num_layers=2,
        num_heads=4,
        dropout=0.1,
        blind=False,
        **kwargs,
    ):
        super().__init__(vocab_size, feature_dim, num_locations, blind=blind, **kwargs)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be a multiple of num_heads ({num_heads})")
        self.embed_dim, self.units, self.num_layers, self.num_heads, self.dropout = (
            embed_dim,
            units,
            num_layers,
            num_heads,
            dropout,
        )
        d, head = embed_dim, embed_dim // num_heads
        self.memory_proj = layers.Dense(d, name="memory_proj")
        self.feat_pos = layers.Embedding(num_locations, d, name="feat_pos")
        self.embed = layers.Embedding(vocab_size, d, name="embed")
        self.word_pos = layers.Embedding(MAX_POSITIONS, d, name="word_pos")
        self.blocks = []
        for i in range(num_layers):
            self.blocks.append(
                {
                    "norm_self": layers.LayerNormalization(name=f"l{i}_norm_self"),
                    "self": layers.MultiHeadAttention(num_heads, head, name=f"l{i}_self"),
                    "norm_cross": layers.LayerNormalization(name=f"l{i}_norm_cross"),
                    "cross": layers.MultiHeadAttention(num_heads, head, name=f"l{i}_cross"),
                    "norm_ff": layers.LayerNormalization(name=f"l{i}_norm_ff"),
                    "ff_in": layers.Dense(units, activation="gelu", name=f"l{i}_ff_in"),
                    "ff_out": layers.Dense(d, name=f"l{i}_ff_out"),
                }
            )
        self.norm_out = layers.LayerNormalization(name="norm_out")
        self.out_logits = layers.Dense(vocab_size, name="out_logits")

    def initial_state(self, features):
        """features (B, L, C) -> (memory (B, L, D), tokens so far (B, 0))."""
        f = self.normalised_features(features)
        memory = self.memory_proj(f) + self.feat_pos(tf.range(self.num_locations))[None]  # (B, L, D)
        return memory, tf.zeros((tf.shape(features)[0], 0), tf.int32)

    def _decode(self, memory, tokens, seeds=None):
        """tokens (B, T) -> logits (B, T, V), per-layer cross-attention [(B, T, L)]."""
        t = tf.shape(tokens)[1]
        x = self.embed(tokens) + self.word_pos(tf.range(t))[None]  # (B, T, D)
        seeds = iter(seeds) if seeds is not None else None
        x = dropout(x, self.dropout, next(seeds) if seeds else None)
        maps = []
        for b in self.blocks:
            h = b["norm_self"](x)
            x = x + dropout(b["self"](h, h, use_causal_mask=True), self.dropout, next(seeds) if seeds else None)
            h = b["norm_cross"](x)
            ctx, scores = b["cross"](h, memory, return_attention_scores=True)  # scores (B, heads, T, L)
            x = x + dropout(ctx, self.dropout, next(seeds) if seeds else None)
            maps.append(tf.reduce_mean(scores, axis=1))  # (B, T, L)
            x = x + dropout(b["ff_out"](b["ff_in"](b["norm_ff"](x))), self.dropout, next(seeds) if seeds else None)
        return self.out_logits(self.norm_out(x)), maps

    def forward(self, features, tokens_in, dropout_seed=None, lengths=None, packed=False):
        """features (B, L, C), tokens_in (B, T) -> logits (B, T, V), aux with the attention maps.

        ``lengths``: the contract lets a decoder skip the steps past them; this one computes all
        (the causal mask already keeps them out of the real steps, and the products are full).
        ``packed`` (with ``lengths``): the real steps' logits only, (N, V) at ``aux["index"]``."""
        if packed and lengths is None:
            raise ValueError("packed logits need lengths")
        seeds = None
        if dropout_seed is not None and self.dropout > 0:
            seeds = dropout_seeds(dropout_seed, 1 + 3 * self.num_layers)  # one stream per dropout site
        memory, _ = self.initial_state(features)
        logits, maps = self._decode(memory, tokens_in, seeds)
        aux = {"attention": maps[-1], "layer_attention": tf.stack(maps, axis=1)}  # (B, T, L), (B, layers, T, L)
        if packed:
            aux["index"] = Packing.of(lengths, tf.shape(tokens_in)[1]).index  # (N, 2)
            logits = tf.gather_nd(logits, aux["index"])  # (N, V)
        return logits, aux

    def step(self, tokens, state):
        """tokens (N,), (memory (B, L, D), tokens so far (N, t)) -> log-probs (N, V), state',
        attention (N, L); N = B * R, rows ``b * R ... b * R + R - 1`` reading image b."""
        memory, seen = state
        seen = tf.concat([seen, tf.cast(tokens, tf.int32)[:, None]], axis=1)  # (N, t + 1)
        rows = tf.shape(seen)[0] // tf.shape(memory)[0]
        logits, maps = self._decode(tf.repeat(memory, rows, axis=0), seen)  # attention wants a row each
        return tf.nn.log_softmax(logits[:, -1], axis=-1), (memory, seen), maps[-1][:, -1]
