"""Every decoder honours the contract (base.py) on tiny configs: shapes, masks, attention,
step == teacher forcing, seeded dropout, Keras save/load in safe mode, the ban on specials."""

import numpy as np
import pytest
import tensorflow as tf

from captioning.decoders import DECODERS, build_decoder
from captioning.decoders.base import coverage_term, masked_cross_entropy, masked_cross_entropy_sum

VARIANTS = {  # name -> (decoder, settings)
    "gru": ("gru", {"attention": True, "attention_units": 3}),
    "gru-noatt": ("gru", {"attention": False, "attention_units": 3}),
    "lstm": ("lstm", {"attention": True, "attention_units": 3}),
    "lstm-noatt": ("lstm", {"attention": False, "attention_units": 3}),
    "transformer": ("transformer", {"num_layers": 2, "num_heads": 2}),
    "updown": ("updown", {"attention_units": 3}),
}
ATTENTIVE = ["gru", "lstm", "transformer", "updown"]


def tiny(variant="gru", **kw):
    tf.keras.utils.set_random_seed(0)
    name, settings = VARIANTS[variant]
    m = build_decoder(
        name,
        vocab_size=11,
        feature_dim=6,
        num_locations=4,
        embed_dim=6,
        units=7,
        dropout=kw.pop("dropout", 0.0),
        **{**settings, **kw},
    )
    m.build()
    return m


FEATS = np.random.default_rng(0).normal(size=(2, 4, 6)).astype("float32")
TOKENS = np.array([[1, 5, 6, 7, 2], [1, 8, 2, 0, 0]], dtype="int32")


@pytest.mark.parametrize("variant", VARIANTS)
def test_shapes_and_step_matches_teacher_forcing(variant):
    m = tiny(variant)
    logits, aux = m.forward(FEATS, TOKENS[:, :-1])
    assert logits.shape == (2, 4, 11) and aux["attention"].shape == (2, 4, 4)
    state = m.initial_state(FEATS)
    assert all(s.shape[0] == 2 for s in state)  # beam search repeats and reorders rows
    for t in range(4):
        lp, state, alpha = m.step(tf.constant(TOKENS[:, t]), state)
        assert lp.shape == (2, 11) and alpha.shape == (2, 4)
        np.testing.assert_allclose(np.exp(lp.numpy()).sum(-1), 1.0, rtol=1e-5)
        np.testing.assert_allclose(lp.numpy(), tf.nn.log_softmax(logits[:, t]).numpy(), atol=1e-5)
        np.testing.assert_allclose(alpha.numpy(), aux["attention"][:, t].numpy(), atol=1e-5)


@pytest.mark.parametrize("variant", ATTENTIVE)
def test_attention_weights_are_a_distribution(variant):
    _, aux = tiny(variant).forward(FEATS, TOKENS[:, :-1])
    np.testing.assert_allclose(aux["attention"].numpy().sum(-1), 1.0, rtol=1e-5)
    assert (aux["attention"].numpy() > 0).all()


def test_transformer_exposes_every_layers_cross_attention():
    _, aux = tiny("transformer").forward(FEATS, TOKENS[:, :-1])
    assert aux["layer_attention"].shape == (2, 2, 4, 4)  # (B, layers, T, L)
    np.testing.assert_allclose(aux["layer_attention"][:, -1].numpy(), aux["attention"].numpy())


@pytest.mark.parametrize("variant", ["gru", "transformer"])
def test_later_words_do_not_change_earlier_logits(variant):
    m = tiny(variant)
    a, _ = m.forward(FEATS, TOKENS[:, :3])
    b, _ = m.forward(FEATS, np.concatenate([TOKENS[:, :2], TOKENS[:, 3:4]], axis=1))  # word 3 differs
    np.testing.assert_allclose(a[:, :2].numpy(), b[:, :2].numpy(), atol=1e-6)  # causal
    assert not np.allclose(a[:, 2].numpy(), b[:, 2].numpy())


def test_padding_is_masked_out_of_the_loss():
    logits, _ = tiny().forward(FEATS, TOKENS[:, :-1])
    targets = TOKENS[:, 1:]
    base = float(masked_cross_entropy(logits, targets))
    noise = tf.where((targets == 0)[:, :, None], 100.0, 0.0)  # only where the target is <pad>
    assert float(masked_cross_entropy(logits + noise, targets)) == pytest.approx(base)
    noise = tf.where((targets == 2)[:, :, None], 100.0 * tf.one_hot(3, 11), 0.0)
    assert float(masked_cross_entropy(logits + noise, targets)) > base + 1


def test_label_smoothing_on_a_scripted_case():
    """Two real tokens over a 3-word vocabulary, one padded step: the smoothed target is
    (1 - eps) one-hot + eps / 3, worked out by hand; packed logits give the same sum."""
    probs = np.array([[[0.5, 0.25, 0.25], [0.2, 0.2, 0.6], [0.1, 0.1, 0.8]]])  # (1, 3, 3)
    logits, targets = tf.constant(np.log(probs), tf.float32), tf.constant([[1, 2, 0]])
    eps = 0.1
    by_hand = sum((1 - eps) * -np.log(p[t]) + eps * -np.log(p).mean() for p, t in ((probs[0, 0], 1), (probs[0, 1], 2)))
    total, count = masked_cross_entropy_sum(logits, targets, smoothing=eps)
    assert float(count) == 2 and float(total) == pytest.approx(by_hand, rel=1e-6)
    index = tf.constant([[0, 0], [0, 1]])
    packed, _ = masked_cross_entropy_sum(tf.gather_nd(logits, index), targets, index, smoothing=eps)
    assert float(packed) == pytest.approx(by_hand, rel=1e-6)
    plain, _ = masked_cross_entropy_sum(logits, targets)  # eps = 0: the plain cross-entropy
    assert float(plain) == pytest.approx(-np.log(0.25) - np.log(0.6), rel=1e-6)
    # A uniform prediction is what smoothing pulls towards: its loss does not depend on eps.
    flat = tf.zeros((1, 3, 3))
    assert float(masked_cross_entropy_sum(flat, targets, smoothing=0.3)[0]) == pytest.approx(2 * np.log(3), rel=1e-6)


def test_coverage_term_is_zero_for_uniform_coverage():
    mask = tf.ones((1, 4))  # 4 real tokens over 4 locations, each looked at once: coverage == share == 1
    assert float(coverage_term(tf.constant(np.eye(4, dtype="float32")[None]), mask)) == pytest.approx(0.0)
    focused = tf.constant(np.tile([[1.0, 0, 0, 0]], (4, 1))[None].astype("float32"))
    assert float(coverage_term(focused, mask)) == pytest.approx(9 + 1 + 1 + 1)


def test_coverage_term_with_more_locations_than_steps_and_padding():
    """T=3 steps, L=5 locations, the second caption padded after 2 tokens: checked against numpy."""
    alphas = np.random.default_rng(1).dirichlet(np.ones(5), size=(2, 3)).astype("float32")  # (B, T, L)
    targets = np.array([[5, 6, 2], [7, 2, 0]])
    mask = (targets > 0).astype("float64")
    coverage = (alphas * mask[:, :, None]).sum(axis=1)  # (B, L): attention summed over real words
    share = mask.sum(axis=1, keepdims=True) / 5  # each location's fair share of the real words
    expected = ((share - coverage) ** 2).sum(axis=1).mean()
    got = float(coverage_term(tf.constant(alphas), tf.constant(mask, tf.float32)))
    assert got == pytest.approx(expected, rel=1e-5)
    # the softmax fixes each caption's total: coverage always sums to its number of real words
    np.testing.assert_allclose(coverage.sum(axis=1), mask.sum(axis=1), rtol=1e-5)
    moved = alphas.copy()
    moved[1, 2] = np.eye(5)[0]  # attention at a padded step is not counted
    assert float(coverage_term(tf.constant(moved), tf.constant(mask, tf.float32))) == pytest.approx(got, rel=1e-6)


@pytest.mark.parametrize("variant", VARIANTS)
def test_extra_loss_is_the_attention_prior_where_there_is_attention(variant):
    m = tiny(variant)
    _, aux = m.forward(FEATS, TOKENS[:, :-1])
    mask = tf.cast(TOKENS[:, 1:] > 0, tf.float32)
    expected = float(coverage_term(aux["attention"], mask)) if variant in ("gru", "lstm", "updown") else 0.0
    assert float(m.extra_loss(aux, mask)) == pytest.approx(expected)


@pytest.mark.parametrize("variant", ["gru", "lstm", "transformer"])
def test_blind_decoder_ignores_the_image(variant):
    m = tiny(variant, blind=True)
    a, _ = m.forward(FEATS, TOKENS[:, :-1])
    b, _ = m.forward(FEATS * 0 + 3.0, TOKENS[:, :-1])
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_attention_knows_where_each_location_is():
    """Identical content everywhere: only the location embedding can tell the places apart."""
    m = tiny()
    same = np.tile(np.arange(6, dtype="float32"), (1, 4, 1))  # (1, 4, 6), every location alike
    _, aux = m.forward(same, TOKENS[:1, :3])
    assert not np.allclose(aux["attention"].numpy(), 0.25, atol=1e-4)
    m.feat_pos.set_weights([np.zeros((4, 6), "float32")])  # take the embedding away
    _, aux = m.forward(same, TOKENS[:1, :3])
    np.testing.assert_allclose(aux["attention"].numpy(), 0.25, rtol=1e-5)


@pytest.mark.parametrize("variant", ["gru", "transformer"])
def test_stateless_dropout_is_seeded(variant):
    m = tiny(variant, dropout=0.5)
    a, _ = m.forward(FEATS, TOKENS[:, :-1], dropout_seed=tf.constant([1, 2]))
    b, _ = m.forward(FEATS, TOKENS[:, :-1], dropout_seed=tf.constant([1, 2]))
    c, _ = m.forward(FEATS, TOKENS[:, :-1], dropout_seed=tf.constant([1, 3]))
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(a.numpy(), c.numpy())


@pytest.mark.parametrize("variant, sites", [("gru", 2), ("transformer", 7)])
def test_dropout_sites_draw_their_own_streams(monkeypatch, variant, sites):
    """Every dropout site of step s and step s+1 uses its own seed: no mask repeats."""
    seen = []
    real = tf.nn.experimental.stateless_dropout

    def recording(x, rate, seed, **kw):
        seen.append(tuple(np.asarray(seed).tolist()))
        return real(x, rate, seed=seed, **kw)

    monkeypatch.setattr(tf.nn.experimental, "stateless_dropout", recording)
    m = tiny(variant, dropout=0.5)
    for step in (5, 6):
        m.forward(FEATS, TOKENS[:, :-1], dropout_seed=tf.constant([1, step]))
    assert len(seen) == 2 * sites and len(set(seen)) == 2 * sites, seen
    ones = tf.ones((2, 4, 6))  # e.g. step 5's last site against step 6's first
    assert not np.array_equal(real(ones, 0.5, seed=seen[sites - 1]).numpy(), real(ones, 0.5, seed=seen[sites]).numpy())


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_folder_round_trip_in_safe_mode(tmp_path, variant):
    from captioning.model_folder import load_model, save_model
    from captioning.vocab import SPECIALS, Vocabulary

    m = tiny(variant)
    voc = Vocabulary(list(SPECIALS) + [f"w{i}" for i in range(7)])
    save_model(
        tmp_path / "models",
        m,
        VARIANTS[variant][0],
        voc,
        {
            "encoder": {
                "backbone": "vgg16",
                "weights": "none",
                "layer": "block3_pool",
                "image_size": 32,
                "alpha": 1.0,
                "seed": 0,
            },
            "feature_dtype": "float16",
        },
    )
    loaded = load_model(tmp_path / "models")
    assert type(loaded.decoder) is type(m) and loaded.decoder.settings() == m.settings()
    assert loaded.vocab.words == voc.words and loaded.feature_dtype == "float16"
    np.testing.assert_array_equal(loaded.decoder.forward(FEATS, TOKENS)[0].numpy(), m.forward(FEATS, TOKENS)[0].numpy())


def test_a_vocabulary_that_does_not_fit_the_model_is_refused(tmp_path):
    from captioning.errors import CaptioningError
    from captioning.model_folder import load_model, save_model
    from captioning.vocab import SPECIALS, Vocabulary

    save_model(tmp_path / "m", tiny(), "gru", Vocabulary(list(SPECIALS) + ["a"]), {"encoder": {}})
    with pytest.raises(CaptioningError, match="vocab.json: 5 words, but the decoder was trained with 11"):
        load_model(tmp_path / "m")


@pytest.mark.parametrize("variant", ATTENTIVE)
def test_pad_start_and_unk_are_never_generated(variant):
    """Even a model that prefers them: their log-probability is -inf, so no beam takes them."""
    from captioning.beam import beam_search
    from captioning.decode import make_step_fn
    from captioning.vocab import NEVER_GENERATED

    m = tiny(variant)
    kernel, bias = m.out_logits.get_weights()
    bias[list(NEVER_GENERATED)] = 50.0  # <pad>, <start>, <unk> dominate the softmax
    m.out_logits.set_weights([kernel, bias])
    step_fn = make_step_fn(m)
    state = tuple(np.asarray(x) for x in m.initial_state(FEATS))
    log_probs, _ = step_fn(np.array([1, 1]), state)
    assert np.isneginf(log_probs[:, list(NEVER_GENERATED)]).all()
    assert np.isfinite(np.delete(log_probs, list(NEVER_GENERATED), axis=1)).all()
    for beam in (1, 3, 11):  # 11 beams: more than the 8 tokens that may be generated
        seqs, scores, _ = beam_search(step_fn, state, 2, beam, 5, 1, 2)
        assert all(t not in NEVER_GENERATED for s in seqs for t in s) and np.isfinite(scores).all()
        assert all(len(s) <= 5 for s in seqs)


def test_the_registry_builds_every_decoder():
    assert set(DECODERS) == {"gru", "lstm", "transformer", "updown"}
    for variant in VARIANTS:
        assert tiny(variant).count_params() > 0


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_logits_are_the_real_steps(variant):
    """``packed=True``: the real steps' logits, row for row those of the (B, T, V) output at
    ``aux["index"]``, and the same loss and gradients as the masked loss over the padded batch."""
    m = tiny(variant)
    lengths = [3, 0, 5, 1]  # an empty caption (a replica's padding row) and one running all T steps
    rng = np.random.default_rng(2)
    feats = tf.constant(rng.normal(size=(4, 4, 6)).astype("float32"))
    targets = tf.constant(rng.integers(1, 11, (4, 5)) * (np.arange(5)[None] < np.array(lengths)[:, None]), tf.int32)
    tokens_in = tf.constant(rng.integers(1, 11, (4, 5)), tf.int32)

    def loss(packed):
        with tf.GradientTape() as tape:
            logits, aux = m.forward(feats, tokens_in, lengths=tf.constant(lengths), packed=packed)
            ce, count = masked_cross_entropy_sum(logits, targets, aux.get("index"))
        return logits, aux, ce, count, tape.gradient(ce, m.trainable_variables)

    full, _, ce, count, grads = loss(False)
    packed, aux, ce_p, count_p, grads_p = loss(True)
    index = aux["index"].numpy()
    assert packed.shape == (sum(lengths), 11) and sorted(map(tuple, index)) == sorted(
        (b, t) for b, n in enumerate(lengths) for t in range(n)
    )
    np.testing.assert_allclose(packed.numpy(), tf.gather_nd(full, index).numpy(), atol=1e-6)
    assert count_p == count == sum(lengths)
    np.testing.assert_allclose(ce_p, ce, rtol=1e-6)
    for g, g_p in zip(grads, grads_p):
        np.testing.assert_allclose(tf.convert_to_tensor(g_p), tf.convert_to_tensor(g), atol=1e-6)
    with pytest.raises(ValueError, match="need lengths"):
        m.forward(feats, tokens_in, packed=True)
