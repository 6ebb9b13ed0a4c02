"""What every decoder shares: the contract, feature normalisation, seeded dropout, Keras plumbing.

The contract that training, beam search and captioning use, and nothing else:

- ``initial_state(features (B, L, C)) -> state``: a tuple of tensors whose first axis is B
  (beam search repeats and reorders rows without knowing what they hold);
- ``step(tokens (N,), state) -> (log_probs (N, V), state', attention (N, L))``;
- ``forward(features, tokens_in (B, T), dropout_seed=None, lengths=None, packed=False)
  -> (logits (B, T, V), aux)`` for teacher forcing, ``aux["attention"]`` (B, T, L) where the
  image was looked at; with
  ``lengths`` (B,) the steps past a row's length may be skipped (their outputs are then zeros;
  training passes the real target counts, so padding costs nothing); ``packed=True`` (with
  ``lengths``) returns only the real steps' logits, (N, V), with ``aux["index"]`` (N, 2) their
  (row, step) positions, so the loss skips the padding too (:func:`masked_cross_entropy_sum`);
- ``extra_loss(aux, mask (B, T))``: the decoder's own training term (0 if it has none), weighted
  by ``train.attention_reg``;
- ``settings()``: the constructor arguments, saved beside the weights to rebuild it exactly;
- ``STATIC_STATE``: indices of the state parts ``step`` passes through unchanged (the image).
  ``step`` must accept them with one row per image for N = images * R rows, rows
  ``b * R ... b * R + R - 1`` reading image b: beam search passes each image once for its
  beams instead of repeating, copying and reordering it every step. (Optional: a decoder
  without it gets every part repeated per row.)

Dropout is stateless and seeded from ``(seed, step)``, so a resumed run draws exactly the masks
an uninterrupted one would; every dropout site gets its own stream (:func:`dropout_seeds`).
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import tensorflow as tf
from keras import layers


class RowSeed(NamedTuple):
    """A dropout seed for a slice of a batch split over replicas (tf.distribute).

    The masks are drawn for ``total`` rows (the whole batch, or all replicas' rows with their
    padding) and rows ``offset ...`` taken, so a caption gets the same mask whichever replica
    it lands on and however many there are: a stateless draw's leading rows do not depend on
    how many rows follow (tested). Rows past ``total`` reuse the last row's mask.
    """

    seed: tf.Tensor  # int32 (2,)
    offset: tf.Tensor  # int32 (): this replica's first row in the batch
    total: tf.Tensor  # int32 (): rows drawn for


def dropout_seeds(seed, n=2):
    """``n`` independent seeds for the dropout sites of one step, split off the step's seed
    (an int32 (2,) tensor, or a :class:`RowSeed`, whose slice the split seeds keep).

    ``stateless_split`` hashes the seed, so the streams never line up across steps (adding an
    offset to ``[seed, step]`` would make one site's mask equal the next step's other one).
    """
    if isinstance(seed, RowSeed):
        return [seed._replace(seed=s) for s in dropout_seeds(seed.seed, n)]
    return tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int32), num=n))


def dropout(x, rate, seed, packed=None):
    """Stateless dropout on ``x`` (B, ...); ``seed`` None turns it off.

    ``packed``: x (N, ...) holds only some positions of a (B, T, ...) tensor: ``(index (N, 2),
    [B, T])`` (see bptt.Packing); the masks are drawn for the whole tensor and those positions taken, so
    every position gets the mask it would get unpacked.
    """
    if seed is None or rate <= 0:
        return x
    if packed is None and not isinstance(seed, RowSeed):
        return tf.nn.experimental.stateless_dropout(x, rate, seed=seed)
    # The same arithmetic as stateless_dropout over the whole batch, then this replica's rows:
    # with offset 0 and total B it equals stateless_dropout(x) bit for bit (tested).
    index, shape = (None, tf.shape(x)) if packed is None else (packed[0], tf.concat([packed[1], tf.shape(x)[1:]], 0))
    if not isinstance(seed, RowSeed):
        seed = RowSeed(seed, tf.constant(0), shape[0])
    full = tf.concat([[seed.total], shape[1:]], axis=0)
    keep = tf.random.stateless_uniform(full, seed=seed.seed, dtype=x.dtype) >= rate  # (total, ...)
    rows = tf.minimum(seed.offset + tf.range(shape[0]), seed.total - 1)
    keep = tf.gather(keep, rows)  # (B, ...)
    if index is not None:
        keep = tf.gather_nd(keep, index)  # (N, ...)
    return tf.where(keep, x * tf.constant(1 / (1 - rate), x.dtype), tf.zeros((), x.dtype))


def masked_cross_entropy_sum(logits, targets, index=None, smoothing=0.0):
    """``(summed cross-entropy, count)`` over the real tokens (targets > 0; 0 is <pad>), in float32
    whatever the logits' dtype (mixed precision).

    ``index`` (N, 2): ``logits`` (N, V) are packed, the (row, step) positions of the real tokens
    (a forward pass's ``aux["index"]``); else (B, T, V) like ``targets`` (B, T).
    ``smoothing`` eps > 0: the cross-entropy against the smoothed target (1 - eps) * one-hot + eps / V
    (label smoothing, Szegedy et al. 2016): a model is no longer pushed to put all its mass on
    one word where the captions of an image disagree.
    """
    logits = tf.cast(logits, tf.float32)
    if index is not None:  # every row is a real token: no mask, no padding rows in the softmax
        labels, mask = tf.gather_nd(targets, index), None
    else:
        labels, mask = targets, tf.cast(targets > 0, logits.dtype)  # (B, T)
    if smoothing > 0:
        log_p = tf.nn.log_softmax(logits, axis=-1)
        nll = -tf.gather(log_p, labels, batch_dims=labels.shape.rank)  # (N,) or (B, T)
        ce = (1.0 - smoothing) * nll - smoothing * tf.reduce_mean(log_p, axis=-1)
    else:
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)
    if mask is None:
        return tf.reduce_sum(ce), tf.cast(tf.shape(ce)[0], tf.float32)
    return tf.reduce_sum(ce * mask), tf.reduce_sum(mask)


def dense_gradients(grads, variables):
    """The gradients as dense tensors (zeros for a variable the loss does not reach).

    TensorFlow gives the embedding's as IndexedSlices with one row per occurrence of a word.
    Left sparse, ``clip_by_global_norm`` measures the rows separately (the wrong norm) and
    Keras' Adam squares each occurrence apart in its second moment (so a word seen twice gets
    half the squared gradient it should). Dense, they are the textbook update, and one tensor
    each to all-reduce across replicas.
    """
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g) for g, v in zip(grads, variables)]


def masked_cross_entropy(logits, targets):
    """Mean cross-entropy over real tokens (targets > 0; 0 is <pad>)."""
    total, count = masked_cross_entropy_sum(logits, targets)
    return total / tf.maximum(count, 1.0)


def coverage_term(alphas, mask):
    """SAT's doubly stochastic attention term for ``alphas`` (B, T, L) and ``mask`` (B, T).

    The alphas are softmaxes over the L locations, so at every step the attention sums to 1 and
    a caption's coverage (attention summed over its n real words, per location) always totals n:
    the term cannot change how much the decoder looks, only where. It is the squared distance
    of the coverage from the even spread n/L per location (SAT's ``(1 - sum_t alpha)^2`` is the
    case n = L), summed over locations and averaged over captions, so it pushes the decoder to
    look at the whole image over a caption instead of fixating on one place. Padded steps do
    not count.
    """
    coverage = tf.reduce_sum(alphas * mask[:, :, None], axis=1)  # (B, L)
    share = tf.reduce_sum(mask, axis=1, keepdims=True) / tf.cast(tf.shape(alphas)[-1], mask.dtype)  # (B, 1)
    return tf.reduce_mean(tf.reduce_sum((share - coverage) ** 2, axis=-1))


class Decoder(keras.Model):
    """Base class: subclasses list their constructor arguments in ``SETTINGS``."""

    SETTINGS: tuple = ()
    STATIC_STATE: tuple = ()
    MAX_TOKENS: int | None = None  # the longest token sequence it can read (a position table's size)
    ATTENTION_PRIOR: bool = True  # extra_loss is the attention prior (train.attention_reg weighs it)

    def check_max_length(self, max_length, where):
        """A CaptioningError naming ``where`` when captions of ``max_length`` words are too long."""
        from ..errors import CaptioningError

        if self.MAX_TOKENS is not None and max_length + 1 > self.MAX_TOKENS:
            raise CaptioningError(
                f"{where}: {max_length} words is more than this {type(self).__name__} reads"
                f" ({self.MAX_TOKENS} positions: <start> and {self.MAX_TOKENS - 1} words)"
            )

    def __init__(self, vocab_size, feature_dim, num_locations, blind=False, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.feature_dim, self.num_locations, self.blind = (
            vocab_size,
            feature_dim,
            num_locations,
            blind,
        )
        # CNN features from different backbones (or random init) differ wildly in scale.
        self.feat_norm = layers.LayerNormalization(name="feat_norm")

    def settings(self) -> dict:
        keys = ("vocab_size", "feature_dim", "num_locations", *self.SETTINGS, "blind")
        return {k: getattr(self, k) for k in keys}

    def get_config(self):
        return {**super().get_config(), **self.settings()}

    def build(self, input_shape=None):
        # Create every weight by running one step, so a loaded model can take its weights.
        self.forward(tf.zeros((1, self.num_locations, self.feature_dim)), tf.ones((1, 2), tf.int32))
        self.built = True

    def call(self, inputs, training=False):
        features, tokens_in = inputs
        return self.forward(features, tokens_in)[0]

    def normalised_features(self, features):
        """(B, L, C) features, layer-normalised; all zeros for the blind baseline (no image)."""
        if self.blind:
            features = tf.zeros_like(features)
        return self.feat_norm(features)

    def extra_loss(self, aux, mask):
        return tf.constant(0.0)
