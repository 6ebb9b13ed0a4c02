"""Self-critical sequence training: the baseline maths, seeded sampling, learning, exact resume,
and the finetune stage on the tiny pipeline."""

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from conftest import params_section

from captioning.cider import CiderD
from captioning.decoders import build_decoder
from captioning.scst import (
    FinetuneSettings,
    ImageSet,
    Reward,
    baseline,
    fine_tune,
    make_sampler,
    sentence_bleu4,
    strip_end,
)
from captioning.vocab import SPECIALS, Vocabulary


def test_mean_of_others_baseline():
    rewards = [1.0, 2.0, 3.0, 4.0, 4.0, 4.0]  # two images, three samples each
    np.testing.assert_allclose(baseline(rewards, 3), [2.5, 2.0, 1.5, 4.0, 4.0, 4.0])
    # each sample's baseline ignores its own reward: the advantages of an image sum to zero here
    adv = np.array(rewards) - baseline(rewards, 3)
    np.testing.assert_allclose(adv.reshape(2, 3).sum(axis=1), 0.0, atol=1e-12)


def test_greedy_baseline_repeats_the_greedy_reward():
    np.testing.assert_allclose(baseline([1.0, 2.0, 3.0, 4.0], 2, greedy=[0.5, 3.5]), [0.5, 0.5, 3.5, 3.5])


# A toy world: image i shows colour i % 3 in its features; its references say "a <colour>".
VOCAB = Vocabulary(list(SPECIALS) + ["a", "red", "green", "blue", "big"])


def toy(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    feats = rng.normal(size=(n, 4, 6)).astype("float32") * 0.1
    feats[np.arange(n), :, labels] += 2.0
    return ImageSet(feats, [[[4, 5 + lab], [4, 5 + lab]] for lab in labels])


def tiny_decoder(dropout=0.0):
    from captioning.cli import seed_everything

    seed_everything(0)
    return build_decoder(
        "gru",
        vocab_size=len(VOCAB),
        feature_dim=6,
        num_locations=4,
        embed_dim=6,
        units=8,
        attention=True,
        attention_units=4,
        dropout=dropout,
    )


def test_sampling_is_seeded_and_well_formed():
    d = tiny_decoder()
    d.build()
    sample = make_sampler(d, VOCAB.start_id, VOCAB.end_id, max_length=5)
    feats = tf.constant(toy(6, 0).features)
    a = sample(feats, tf.constant([1, 2])).numpy()
    assert a.shape == (6, 6) and np.array_equal(a, sample(feats, tf.constant([1, 2])).numpy())
    assert not np.array_equal(a, sample(feats, tf.constant([1, 3])).numpy())
    for row in a:
        assert not set(row.tolist()) & {1, 3}  # never <start> or <unk>
        ends = np.flatnonzero(row == VOCAB.end_id)
        assert len(ends) == 1 and (row[ends[0] + 1 :] == 0).all() and (row[: ends[0]] >= 4).all()
    assert strip_end([4, 5, 2, 0], 2) == [4, 5]


def test_the_policy_excludes_the_tokens_it_never_samples():
    """Loss log-probs come from the same distribution as the samples: no gradient reaches
    <pad>, <start> or <unk>, so updates cannot drain probability into them."""
    from captioning.scst import policy_logits

    logits = tf.Variable(tf.random.normal((3, len(VOCAB))))
    with tf.GradientTape() as tape:
        logp = tf.nn.log_softmax(policy_logits(logits))
        loss = -tf.reduce_sum(logp[:, 4]) + tf.reduce_sum(logp[:, 5])  # push "a" up, "red" down
    grad = tape.gradient(loss, logits).numpy()
    assert np.allclose(grad[:, [0, 1, 3]], 0.0) and not np.allclose(grad[:, [2, 4, 5, 6, 7, 8]], 0.0)
    np.testing.assert_allclose(np.exp(logp.numpy())[:, [2, 4, 5, 6, 7, 8]].sum(axis=1), 1.0, rtol=1e-6)


SETTINGS = params_section(
    FinetuneSettings, "finetune", enabled=True, samples=4, batch_size=6, learning_rate=0.05, epochs=4, patience=4,
    max_length=4,
)  # fmt: skip


def run(tmp_path, name, settings=SETTINGS, decoder=None, log=None, on_epoch=None):
    train, val = toy(18, 0), toy(6, 1)
    decoder = decoder or tiny_decoder()
    base = len(VOCAB) + 1
    state = fine_tune(
        decoder,
        VOCAB,
        train,
        val,
        CiderD(train.references, base),
        CiderD(val.references, base),
        settings,
        3,
        tmp_path / name,
        on_epoch=on_epoch,
        progress=False,
        log=log or (lambda s: None),
    )
    return decoder, state


def test_fine_tuning_raises_val_cider_and_is_deterministic(tmp_path):
    a, state = run(tmp_path, "a")
    assert state["best_val_cider"] > state["start_val_cider"] + 1.0, state["history"]
    b, _ = run(tmp_path, "b")
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())


def test_dropout_in_the_update_is_seeded_and_changes_the_path(tmp_path):
    """finetune.dropout: the update's forward pass drops out (seeded by the step), so two runs
    agree bit for bit, differ from the run without dropout, and still learn."""
    settings = dataclasses.replace(SETTINGS, dropout=True)
    a, state = run(tmp_path, "a", settings, decoder=tiny_decoder(dropout=0.3))
    b, _ = run(tmp_path, "b", settings, decoder=tiny_decoder(dropout=0.3))
    plain, _ = run(tmp_path, "plain", decoder=tiny_decoder(dropout=0.3))
    assert state["best_val_cider"] > state["start_val_cider"] + 0.5, state["history"]
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert any(not np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, plain.weights))


def test_reference_rows_and_their_cross_entropy():
    """The cross-entropy term reads every reference of each image as <start> words <end>, with the
    image's features repeated; a reference's <unk> is not scored (the policy never draws it)."""
    import keras

    from captioning.scst import _Policy

    settings = dataclasses.replace(SETTINGS, xe_weight=0.5)
    d = tiny_decoder()
    d.build()
    policy = _Policy(d, VOCAB, keras.optimizers.Adam(0.01), settings, (4, 6))
    feats = np.arange(2 * 4 * 6, dtype="float32").reshape(2, 4, 6)
    ref_feats, rows = policy.references(feats, [[[4, 5], [4]], [[4, VOCAB.unk_id, 6]]])
    s, e, u = VOCAB.start_id, VOCAB.end_id, VOCAB.unk_id
    np.testing.assert_array_equal(rows.numpy(), [[s, 4, 5, e, 0], [s, 4, e, 0, 0], [s, 4, u, 6, e]])
    np.testing.assert_array_equal(ref_feats.numpy(), feats[[0, 0, 1]])
    loss = float(policy._reference_loss(ref_feats, rows, None))
    assert 0 < loss < 2 * np.log(len(VOCAB))  # an <unk> target would cost 1e9 under the policy
    off = _Policy(d, VOCAB, keras.optimizers.Adam(0.01), SETTINGS, (4, 6)).references(feats, [[[4]], [[4]]])
    assert off[0].shape[0] == 0 and off[1].shape[0] == 0  # the term off: nothing is built


def test_the_cross_entropy_term_keeps_the_references_likely(tmp_path):
    """finetune.xe_weight: the references' cross-entropy ends lower than SCST alone leaves it,
    and CIDEr-D still rises."""
    from captioning.scst import _Policy

    def reference_loss(decoder):
        policy = _Policy(decoder, VOCAB, None, dataclasses.replace(SETTINGS, xe_weight=1.0), (4, 6))
        train = toy(18, 0)
        return float(policy._reference_loss(*policy.references(train.features, train.references), None))

    settings = dataclasses.replace(SETTINGS, xe_weight=1.0)
    mixed, state = run(tmp_path, "mixed", settings)
    plain, _ = run(tmp_path, "plain")
    assert state["best_val_cider"] > state["start_val_cider"] + 1.0, state["history"]
    assert reference_loss(mixed) < reference_loss(plain) / 2  # 0.43 against 3.23


def test_sentence_bleu4_on_scripted_captions():
    refs = [[4, 5, 6, 7, 9], [8, 8]]  # the caption's length 5 matches the first: no brevity penalty
    assert sentence_bleu4([4, 5, 6, 7, 9], refs) == pytest.approx(1.0)
    # n-gram precisions 5/5, 3/4, 2/3, 1/2 (8 is clipped against the second reference)
    assert sentence_bleu4([4, 5, 6, 7, 8], refs) == pytest.approx((1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # no 4-gram matches: smoothing 1 counts 0.1 of one, so the shorter n-grams still rank it
    assert sentence_bleu4([4, 5, 6, 9, 8], refs) == pytest.approx((1 * 2 / 4 * 1 / 3 * 0.1 / 2) ** 0.25)
    assert sentence_bleu4([4, 5], refs) < sentence_bleu4([4, 5, 6, 7], refs)  # the brevity penalty
    assert sentence_bleu4([], refs) == 0.0


def test_the_reward_adds_the_weighted_bleu_term():
    refs = [[4, 5, 6, 7, 9], [4, 8, 6]]
    scorer = CiderD([refs, [[5, 5, 9]]], len(VOCAB) + 1)
    vecs = [scorer.vector(r) for r in refs]
    caption = [4, 5, 6, 9]
    cider = scorer.score(scorer.vector(caption), vecs)
    assert cider > 0 and Reward(scorer)(caption, vecs, refs) == cider
    assert Reward(scorer, 2.0)(caption, vecs, refs) == pytest.approx(cider + 2.0 * sentence_bleu4(caption, refs))


def test_the_bleu_term_changes_the_path_and_still_learns(tmp_path):
    """finetune.bleu_weight is not ignored: the run differs from CIDEr-D alone, is deterministic,
    and val CIDEr-D still rises."""
    settings = dataclasses.replace(SETTINGS, bleu_weight=1.0)
    a, state = run(tmp_path, "a", settings)
    b, _ = run(tmp_path, "b", settings)
    plain, _ = run(tmp_path, "plain")
    assert state["best_val_cider"] > state["start_val_cider"] + 1.0, state["history"]
    for x, y in zip(a.weights, b.weights):
        np.testing.assert_array_equal(x.numpy(), y.numpy())
    assert any(not np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.weights, plain.weights))


@pytest.mark.parametrize("dropout", [False, True])
def test_a_killed_run_resumes_on_the_same_path(tmp_path, dropout):
    class Killed(Exception):
        pass

    settings = dataclasses.replace(SETTINGS, dropout=dropout)

    def go(name, **kw):  # with dropout, the update's masks come from the checkpointed step count
        return run(tmp_path, name, settings, decoder=tiny_decoder(dropout=0.3 if dropout else 0.0), **kw)

    def kill_after_epoch_2(epoch, metrics):  # called once the epoch's checkpoint is written
        if epoch == 2:
            raise Killed

    with pytest.raises(Killed):
        go("ckpt", on_epoch=kill_after_epoch_2)
    assert json.loads((tmp_path / "ckpt/state.json").read_text())["epoch"] == 2
    messages = []
    resumed, r_state = go("ckpt", log=messages.append)
    assert messages[0].startswith("resuming from") and "after epoch 2" in messages[0]
    clean, c_state = go("clean")
    assert [h["val_cider"] for h in r_state["history"]] == [h["val_cider"] for h in c_state["history"]]
    for x, y in zip(resumed.weights, clean.weights):
        np.testing.assert_allclose(x.numpy(), y.numpy(), rtol=1e-5, atol=1e-6)


def test_finetune_stage_end_to_end(tiny_run, tmp_path):
    import yaml
    from conftest import merged

    from stages import finetune

    root, outs = tiny_run
    assert outs["finetune"].strip().startswith("finetune: off")
    assert json.loads((root / "reports/finetune/metrics.json").read_text()) == {"enabled": False}
    params = tmp_path / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            merged(
                yaml.safe_load((root / "params.yaml").read_text()),
                {"finetune": {"enabled": True, "epochs": 2, "batch_size": 8}},
            )
        )
    )
    args = [
        "--params",
        params,
        "--model",
        root / "models",
        "--features",
        root / "data/features.h5",
        "--captions",
        root / "data/captions.h5",
        "--out",
        tmp_path / "models_final",
        "--checkpoint",
        tmp_path / "ckpt",
        "--live-dir",
        tmp_path / "live",
        "--no-progress",
    ]
    result = CliRunner().invoke(finetune.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1].startswith("finetune: 2 SCST epochs")
    summary = json.loads((tmp_path / "live/metrics.json").read_text())
    assert summary["enabled"] and summary["epochs_run"] == 2 and "best_val_cider" in summary
    cfg = json.loads((tmp_path / "models_final/config.json").read_text())
    assert cfg["scst"]["best_epoch"] == summary["best_epoch"] and cfg["encoder"]["layer"] == "block3_pool"
    from captioning.model_folder import load_model

    assert load_model(tmp_path / "models_final").vocab.words == load_model(root / "models").vocab.words


def test_the_forced_end_at_the_word_limit_is_not_in_the_policy_loss():
    from captioning.scst import policy_mask

    seqs = np.array([[5, 6, 2, 0], [5, 6, 7, 2]])  # max_length 3: the first drew <end>, the second was cut
    np.testing.assert_array_equal(policy_mask(seqs, 3).numpy(), [[1, 1, 1, 0], [1, 1, 1, 0]])
