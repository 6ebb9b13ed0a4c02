"""The recurrent decoders' time loop (bptt.py): the hand-written backward pass equals autodiff
through tf.scan, and packed sequences equal the padded batch at every real step."""

import numpy as np
import pytest
import tensorflow as tf

from captioning.decoders import DECODERS, build_decoder
from captioning.decoders.base import coverage_term
from captioning.decoders.bptt import Packing
from captioning.decoders.recurrent import RecurrentDecoder

RECURRENT = [name for name, cls in DECODERS.items() if issubclass(cls, RecurrentDecoder)]  # new cells too
VARIANTS = [(name, attention) for name in RECURRENT for attention in (True, False)]
LENGTHS = [3, 6, 0, 6, 1]  # an empty row (a replica's padding) and two of the longest
SHORT = [3, 5, 0, 2, 1]  # no row runs all T steps (a replica's slice of a longer batch)
B, T, L, C = 5, 6, 4, 6


def tiny(name, attention, dropout=0.3):
    tf.keras.utils.set_random_seed(0)
    m = build_decoder(
        name,
        vocab_size=11,
        feature_dim=C,
        num_locations=L,
        embed_dim=5,
        units=7,
        attention=attention,
        attention_units=3,
        dropout=dropout,
    )
    m.build()
    return m


def autodiff_forward(dec, features, tokens_in):
    """The reference: tf.scan over the decoder's own step, differentiated by TensorFlow."""
    *states, f, keys = dec.initial_state(features)
    emb = dec.embed(tokens_in)
    w = dec._fused()
    gx_words = tf.tensordot(emb, w["k_word"], 1) + w["b_in"]  # (B, T, G)

    def step(carry, gx_t):
        return dec._recur(gx_t, carry[0], f, keys, w)

    ctx0 = tf.zeros_like(f[:, 0, :]) if dec.attention else tf.zeros_like(states[0][:, :0])
    init = (tuple(states), ctx0, tf.zeros_like(f[:, :, 0]))
    hs, ctxs, alphas = tf.scan(step, tf.transpose(gx_words, [1, 0, 2]), initializer=init)
    hs, ctxs, alphas = (tf.transpose(x, [1, 0, 2]) for x in (hs[0], ctxs, alphas))
    return dec._logits(hs, ctxs, emb), {"attention": alphas}


def inputs(lengths=LENGTHS):
    rng = np.random.default_rng(1)
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype("float32")  # (B, T)
    tokens = rng.integers(1, 11, (B, T)).astype("int32") * mask.astype("int32")
    return tf.constant(rng.normal(size=(B, L, C)).astype("float32")), tf.constant(tokens), tf.constant(mask)


def loss_and_grads(dec, forward, mask):
    """A loss that reaches every output: logits at the real steps and the attention prior."""
    with tf.GradientTape() as tape:
        logits, aux = forward()
        loss = tf.reduce_sum(tf.sin(logits) * mask[:, :, None])
        if dec.attention:
            loss += coverage_term(aux["attention"], mask)
    grads = [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, dec.trainable_variables)]
    return float(loss), grads, (logits * mask[:, :, None]).numpy()


def test_packing_layout():
    p = Packing.of(tf.constant(LENGTHS), T)
    assert p.order.numpy().tolist() == [1, 3, 0, 4, 2]  # longest first, ties in batch order
    assert p.counts.numpy().tolist() == [4, 3, 3, 2, 2, 2]  # rows still running at each step
    index = p.index.numpy().tolist()
    assert index[:4] == [[1, 0], [3, 0], [0, 0], [4, 0]]  # step 0: every non-empty row
    assert index[4:7] == [[1, 1], [3, 1], [0, 1]]
    place = p.place.numpy()  # (step, rank among the sorted rows)
    assert place[:7].tolist() == [[0, 0], [0, 1], [0, 2], [0, 3], [1, 0], [1, 1], [1, 2]]
    assert np.array_equal(p.order.numpy()[place[:, 1]], np.array(index)[:, 0]) and np.array_equal(
        place[:, 0], np.array(index)[:, 1]
    )
    assert len(index) == sum(LENGTHS) and sorted(map(tuple, index)) == sorted(
        (b, t) for b, n in enumerate(LENGTHS) for t in range(n)
    )


@pytest.mark.parametrize("name,attention", VARIANTS)
def test_backward_pass_equals_autodiff(name, attention):
    dec = tiny(name, attention, dropout=0.0)
    feats, tokens, _ = inputs()
    mask = tf.ones((B, T))  # every step counts: the padded batch, as tf.scan runs it
    loss, grads, logits = loss_and_grads(dec, lambda: dec.forward(feats, tokens), mask)
    ref_loss, ref_grads, ref_logits = loss_and_grads(dec, lambda: autodiff_forward(dec, feats, tokens), mask)
    assert loss == ref_loss and np.array_equal(logits, ref_logits)  # the forward pass is the same ops
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "name,attention,graph,lengths",
    [(name, attention, False, LENGTHS) for name, attention in VARIANTS]
    + [("gru", True, True, LENGTHS), ("gru", True, False, SHORT), ("lstm", True, True, SHORT)],  # traced: a few
)
def test_packed_equals_padded(name, attention, graph, lengths):
    """Skipping the steps past each row's length changes nothing at the real steps, dropout
    masks included; the skipped positions are zeros."""
    dec = tiny(name, attention)
    feats, tokens, mask = inputs(lengths)
    seed = tf.constant([3, 4])
    packed = lambda: dec.forward(feats, tokens, seed, lengths=tf.constant(lengths))  # noqa: E731
    run = tf.function(packed) if graph else packed
    loss, grads, logits = loss_and_grads(dec, run, mask)
    ref_loss, ref_grads, ref_logits = loss_and_grads(dec, lambda: dec.forward(feats, tokens, seed), mask)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(g, ref, atol=1e-5, rtol=1e-5)
    full, aux = packed()
    past = ~mask.numpy().astype(bool)
    assert not full.numpy()[past].any() and not aux["attention"].numpy()[past].any()
