"""Decoders decoding as one: the step is the mean of their probabilities, every search takes it."""

import numpy as np
import pytest
import tensorflow as tf

from captioning.beam import beam_search
from captioning.decode import graph_search, make_step_fn
from captioning.decoders import build_decoder
from captioning.ensemble import Ensemble
from captioning.vocab import SPECIALS, Vocabulary

VOCAB = Vocabulary([*SPECIALS, *(f"w{i}" for i in range(8))])
FEATS = np.random.default_rng(1).normal(size=(5, 4, 6)).astype("float32")


def member(name, seed, **extra):
    tf.keras.utils.set_random_seed(seed)
    m = build_decoder(name, vocab_size=len(VOCAB), feature_dim=6, num_locations=4, embed_dim=4, units=8, **extra)
    m.build()
    return m


@pytest.fixture(scope="module")
def ensemble():
    return Ensemble([member("gru", 0, attention_units=4), member("updown", 1, attention_units=4)])


def test_the_step_is_the_mean_of_the_members_probabilities(ensemble):
    tokens = tf.constant([1, 4, 5, 6, 7])
    log_p, state, alpha = ensemble.step(tokens, ensemble.initial_state(FEATS))
    probs = [np.exp(m.step(tokens, m.initial_state(FEATS))[0].numpy()) for m in ensemble.members]
    np.testing.assert_allclose(np.exp(log_p.numpy()), np.mean(probs, axis=0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(alpha.numpy().sum(-1), 1.0, rtol=1e-5)
    assert len(state) == sum(len(m.initial_state(FEATS)) for m in ensemble.members)
    # The image parts: the GRU's last two, then the Up-Down's last three, as absolute indices.
    assert ensemble.STATIC_STATE == (1, 2, 7, 8, 9)


def test_teacher_forcing_agrees_with_the_steps(ensemble):
    tokens = np.array([[1, 4, 5, 6]] * 5, np.int32)
    logits, aux = ensemble.forward(FEATS, tokens)
    state = ensemble.initial_state(FEATS)
    for t in range(4):
        log_p, state, alpha = ensemble.step(tf.constant(tokens[:, t]), state)
        np.testing.assert_allclose(log_p.numpy(), logits[:, t].numpy(), atol=1e-5)
        np.testing.assert_allclose(alpha.numpy(), aux["attention"][:, t].numpy(), atol=1e-5)


def test_the_reference_and_the_compiled_search_agree_on_an_ensemble(ensemble):
    step_fn = make_step_fn(ensemble, top_k=4, end_id=VOCAB.end_id)
    want = beam_search(step_fn, ensemble.initial_state(FEATS), 5, 3, 7, VOCAB.start_id, VOCAB.end_id)
    got = graph_search(ensemble, VOCAB, 3, 7)(FEATS)
    assert got[0] == want[0]
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5)


def test_a_model_with_itself_captions_as_the_model_alone():
    m = member("lstm", 2, attention_units=4)
    alone = graph_search(m, VOCAB, 3, 7)(FEATS)
    twice = graph_search(Ensemble([m, m]), VOCAB, 3, 7)(FEATS)
    assert twice[0] == alone[0]
    np.testing.assert_allclose(twice[2], alone[2], rtol=1e-5)


def test_members_must_match():
    with pytest.raises(ValueError, match="two or more"):
        Ensemble([member("gru", 0)])
    other = build_decoder("gru", vocab_size=len(VOCAB) + 1, feature_dim=6, num_locations=4, embed_dim=4, units=8)
    with pytest.raises(ValueError, match="share the vocabulary"):
        Ensemble([member("gru", 0), other])
