"""Decoder shapes, masking, attention and Keras save/load on tiny configs."""

import numpy as np
import pytest
import tensorflow as tf

from captioning.model import Captioner, masked_loss


def tiny(attention=True, **kw):
    tf.keras.utils.set_random_seed(0)
    m = Captioner(
        vocab_size=11,
        feature_dim=6,
        num_locations=4,
        embed_dim=5,
        units=7,
        attention=attention,
        attention_units=3,
        **kw,
    )
    m.build()
    return m


FEATS = np.random.default_rng(0).normal(size=(2, 4, 6)).astype("float32")
TOKENS = np.array([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]], dtype="int32")


@pytest.mark.parametrize("attention", [True, False])
def test_shapes(attention):
    m = tiny(attention)
    logits, alphas = m.forward(FEATS, TOKENS[:, :-1])
    assert logits.shape == (2, 4, 11) and alphas.shape == (2, 4, 4)
    h, f, keys = m.encode(FEATS)
    assert h.shape == (2, 7) and f.shape == (2, 4, 6)
    lp, h2, a = m.decode_step(tf.constant([1, 1]), h, f, keys)
    assert lp.shape == (2, 11) and h2.shape == (2, 7) and a.shape == (2, 4)
    np.testing.assert_allclose(np.exp(lp.numpy()).sum(-1), 1.0, rtol=1e-5)


def test_attention_weights_are_a_distribution():
    m = tiny()
    _, alphas = m.forward(FEATS, TOKENS[:, :-1])
    np.testing.assert_allclose(alphas.numpy().sum(-1), 1.0, rtol=1e-5)
    assert (alphas.numpy() > 0).all()


def test_decode_step_matches_teacher_forcing():
    m = tiny()
    logits, _ = m.forward(FEATS, TOKENS[:, :-1])
    h, f, keys = m.encode(FEATS)
    for t in range(3):
        lp, h, _ = m.decode_step(tf.constant(TOKENS[:, t]), h, f, keys)
        np.testing.assert_allclose(lp.numpy(), tf.nn.log_softmax(logits[:, t]).numpy(), atol=1e-5)


def test_padding_is_masked_out_of_the_loss():
    m = tiny()
    logits, alphas = m.forward(FEATS, TOKENS[:, :-1])
    targets = TOKENS[:, 1:]
    base = float(masked_loss(logits, targets, alphas))
    # Change logits only where the target is <pad>: the loss must not move.
    noise = tf.where((targets == 0)[:, :, None], 100.0, 0.0)
    assert float(masked_loss(logits + noise, targets, alphas)) == pytest.approx(base)
    # ... but it does move when a real position changes.
    noise = tf.where((targets == 2)[:, :, None], 100.0 * tf.one_hot(3, 11), 0.0)
    assert float(masked_loss(logits + noise, targets, alphas)) > base + 1


def test_attention_regulariser_is_zero_for_uniform_coverage():
    # 4 real tokens spread over 4 locations exactly once each: coverage == share == 1
    alphas = tf.constant(np.eye(4, dtype="float32")[None])
    logits = tf.zeros((1, 4, 11))
    targets = tf.constant([[5, 6, 7, 2]])
    assert float(masked_loss(logits, targets, alphas, 1.0)) == pytest.approx(np.log(11), rel=1e-5)
    focused = tf.constant(np.tile([[1.0, 0, 0, 0]], (4, 1))[None].astype("float32"))
    assert float(masked_loss(logits, targets, focused, 1.0)) == pytest.approx(np.log(11) + 9 + 1 + 1 + 1, rel=1e-5)


def test_attention_term_with_more_locations_than_steps_and_padding():
    """T=3 steps, L=5 locations, the second caption padded after 2 tokens: checked against numpy."""
    rng = np.random.default_rng(1)
    alphas = rng.dirichlet(np.ones(5), size=(2, 3)).astype("float32")  # (B, T, L), rows sum to 1
    targets = np.array([[5, 6, 2], [7, 2, 0]])
    logits = tf.zeros((2, 3, 11))
    mask = (targets > 0).astype("float64")
    coverage = (alphas * mask[:, :, None]).sum(axis=1)  # (B, L): attention summed over real words
    share = mask.sum(axis=1, keepdims=True) / 5  # each location's fair share of the real words
    expected = np.log(11) + 0.5 * ((share - coverage) ** 2).sum(axis=1).mean()
    got = float(masked_loss(logits, tf.constant(targets), tf.constant(alphas), 0.5))
    assert got == pytest.approx(expected, rel=1e-5)
    # the softmax fixes each caption's total: coverage always sums to its number of real words
    np.testing.assert_allclose(coverage.sum(axis=1), mask.sum(axis=1), rtol=1e-5)
    # attention at a padded step is not counted
    moved = alphas.copy()
    moved[1, 2] = np.eye(5)[0]
    assert float(masked_loss(logits, tf.constant(targets), tf.constant(moved), 0.5)) == pytest.approx(got, rel=1e-6)


def test_blind_model_ignores_the_image():
    m = tiny(blind=True)
    a, _ = m.forward(FEATS, TOKENS[:, :-1])
    b, _ = m.forward(FEATS * 0 + 3.0, TOKENS[:, :-1])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_stateless_dropout_is_seeded():
    m = tiny(dropout=0.5)
    seed = tf.constant([1, 2])
    a, _ = m.forward(FEATS, TOKENS[:, :-1], dropout_seed=seed)
    b, _ = m.forward(FEATS, TOKENS[:, :-1], dropout_seed=seed)
    c, _ = m.forward(FEATS, TOKENS[:, :-1], dropout_seed=tf.constant([1, 3]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


def test_dropout_layers_draw_their_own_streams(monkeypatch):
    """The embedding and output dropout of step s and s+1 use four different seeds (masks)."""
    seen = []
    real = tf.nn.experimental.stateless_dropout

    def recording(x, rate, seed, **kw):
        seen.append(tuple(np.asarray(seed).tolist()))
        return real(x, rate, seed=seed, **kw)

    monkeypatch.setattr(tf.nn.experimental, "stateless_dropout", recording)
    m = tiny(dropout=0.5)
    for step in (5, 6):
        m.forward(FEATS, TOKENS[:, :-1], dropout_seed=tf.constant([1, step]))
    assert len(seen) == 4 and len(set(seen)) == 4, seen
    # and the masks differ, e.g. step 5's output layer against step 6's embedding layer
    ones = tf.ones((2, 4, 5))
    assert not np.array_equal(real(ones, 0.5, seed=seen[1]).numpy(), real(ones, 0.5, seed=seen[2]).numpy())


@pytest.mark.parametrize("attention", [True, False])
def test_keras_format_round_trip_in_safe_mode(tmp_path, attention):
    from captioning.decode import load_captioner

    m = tiny(attention)
    m.save(tmp_path / "m.keras")
    loaded = load_captioner(tmp_path / "m.keras")
    assert loaded.settings() == m.settings()
    np.testing.assert_array_equal(loaded.forward(FEATS, TOKENS)[0].numpy(), m.forward(FEATS, TOKENS)[0].numpy())


def test_attention_knows_where_each_location_is():
    """Identical content everywhere: only the location embedding can tell the places apart."""
    m = tiny()
    same = np.tile(np.arange(6, dtype="float32"), (1, 4, 1))  # (1, 4, 6), every location alike
    _, alphas = m.forward(same, TOKENS[:1, :3])
    assert not np.allclose(alphas.numpy(), 0.25, atol=1e-4)
    m.feat_pos.set_weights([np.zeros((4, 6), "float32")])  # take the embedding away
    _, alphas = m.forward(same, TOKENS[:1, :3])
    np.testing.assert_allclose(alphas.numpy(), 0.25, rtol=1e-5)


def test_pad_start_and_unk_are_never_generated():
    """Even a model that prefers them: their log-probability is -inf, so no beam takes them."""
    from captioning.beam import beam_search
    from captioning.decode import NEVER_GENERATED, make_step_fn

    m = tiny()
    kernel, bias = m.out_logits.get_weights()
    bias[list(NEVER_GENERATED)] = 50.0  # <pad>, <start>, <unk> dominate the softmax
    m.out_logits.set_weights([kernel, bias])
    step_fn = make_step_fn(m)
    state = tuple(np.asarray(x) for x in m.encode(FEATS))
    log_probs, _ = step_fn(np.array([1, 1]), state)
    assert np.isneginf(log_probs[:, list(NEVER_GENERATED)]).all()
    assert np.isfinite(np.delete(log_probs, list(NEVER_GENERATED), axis=1)).all()
    for beam in (1, 3, 11):  # 11 beams: more than the 8 tokens that may be generated
        seqs, scores, _ = beam_search(step_fn, state, 2, beam, 5, 1, 2)
        assert all(t not in NEVER_GENERATED for s in seqs for t in s) and np.isfinite(scores).all()
        assert all(len(s) <= 5 for s in seqs)
