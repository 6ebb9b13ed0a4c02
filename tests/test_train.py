"""Training: learns, resumes after SIGKILL from the last checkpoint, and is deterministic."""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import params_section

from captioning.caption_set import CaptionSet
from captioning.decoders import build_decoder
from captioning.errors import CaptioningError
from captioning.train import TrainSettings, best_epoch_metrics, fingerprint, fit


def toy_sets(seed=0, h5=None):
    """Image i has one of 3 'colours' in its features; its caption names that colour.

    ``h5``: write the features to that HDF5 file (the features stage's layout) and stream them
    from it, as the train stage does; captions then vary in length (1-3 words before the colour).
    """
    rng = np.random.default_rng(seed)
    labels = np.arange(30) % 3
    feats = rng.normal(size=(30, 4, 6)).astype("float32") * 0.1
    feats[np.arange(30), :, labels] += 2.0
    if h5 is None:
        tokens = np.array([[1, 4, 5 + lab, 2] for lab in labels], dtype="int32")  # <start> a <colour> <end>
        return CaptionSet(feats[:24], tokens[:24], np.arange(24)), CaptionSet(feats[24:], tokens[24:], np.arange(6))
    tokens = np.zeros((30, 6), "int32")
    for i, lab in enumerate(labels):
        words = [4] * (1 + i % 3) + [5 + lab]
        tokens[i, : len(words) + 2] = [1, *words, 2]
    store = write_features(h5, feats)
    train = CaptionSet(store.rows(store.keys[:24]), tokens[:24], np.arange(24))
    return train, CaptionSet(store.rows(store.keys[24:]), tokens[24:], np.arange(6))


def write_features(path, feats):
    """A features file of the features stage's layout holding ``feats`` (N, L, C) as float16."""
    import h5py

    from captioning.feature_store import FeatureStore, hash_features

    with h5py.File(path, "w") as f:
        f["spatial"], f["pooled"] = feats.astype("float16"), feats.mean(1).astype("float16")
        f.create_dataset(
            "images", data=np.array([f"im{i}" for i in range(len(feats))], dtype=object), dtype=h5py.string_dtype()
        )
        f.attrs["content_hash"] = hash_features(f["spatial"], f["pooled"])
    return FeatureStore(path)


TINY = {
    "gru": {"attention": True, "attention_units": 4},
    "lstm": {"attention": True, "attention_units": 4},
    "transformer": {"num_layers": 1, "num_heads": 2},
    "updown": {"attention_units": 4},
}


def make_model(seed=0, decoder="gru"):
    from captioning.cli import seed_everything

    seed_everything(seed)  # as the train stage does: seeded, deterministic TF ops
    return build_decoder(
        decoder, vocab_size=8, feature_dim=6, num_locations=4, embed_dim=4, units=8, dropout=0.1, **TINY[decoder]
    )


# lr_decay < 1: the kill-and-resume test then also checks the rate is restored per epoch.
SETTINGS = params_section(
    TrainSettings, "train", batch_size=8, learning_rate=0.05, lr_decay=0.9, epochs=6, patience=6, attention_reg=0.01
)
SEED = 3


def test_fit_learns_and_keeps_best_weights(tmp_path):
    train, val = toy_sets()
    m = make_model()
    logged = []
    state = fit(
        m,
        train,
        val,
        SETTINGS,
        SEED,
        tmp_path / "ckpt",
        on_epoch=lambda e, mt: logged.append(e),
        progress=False,
        log=lambda s: None,
    )
    assert logged == [1, 2, 3, 4, 5, 6] and state["complete"]
    losses = [h["val_loss"] for h in state["history"]]
    assert losses[-1] < losses[0] * 0.5
    assert round(state["best_val_loss"], 6) == min(losses) and state["best_epoch"] == 6
    assert [h["learning_rate"] for h in state["history"]] == [float(f"{0.05 * 0.9**e:.6g}") for e in range(6)]


def test_early_stopping_restores_the_best_epoch_not_the_last(tmp_path):
    """Val captions name the *next* colour: val loss first falls (the caption's frame is learned),
    then rises as the train mapping is learned, until patience stops the run."""
    train, val = toy_sets()
    val = CaptionSet(
        val.features, np.array([[1, 4, 5 + (t[2] - 4) % 3, 2] for t in val.tokens], "int32"), val.image_rows
    )
    settings = dataclasses.replace(SETTINGS, lr_decay=1.0, epochs=12, patience=2)
    m = make_model()
    weights_after = {}
    state = fit(
        m,
        train,
        val,
        settings,
        SEED,
        tmp_path / "ckpt",
        progress=False,
        log=lambda s: None,
        on_epoch=lambda e, _: weights_after.__setitem__(e, [w.numpy() for w in m.weights]),
    )
    losses = [h["val_loss"] for h in state["history"]]
    best = state["best_epoch"]
    assert state["epoch"] == best + settings.patience < settings.epochs  # stopped by patience
    assert losses[best - 1] == min(losses) and losses[-1] > losses[best - 1]
    summary = best_epoch_metrics(state)
    assert summary["val_loss"] == losses[best - 1] and summary["best_epoch"] == best
    assert summary["epochs_run"] == state["epoch"]

    # The weights left in the model are those a run stopped at the best epoch ends with.
    at_best = make_model()
    fit(
        at_best,
        train,
        val,
        dataclasses.replace(settings, epochs=best),
        SEED,
        tmp_path / "b",
        progress=False,
        log=lambda s: None,
    )
    for a, b in zip(m.weights, at_best.weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)
    # ... which are the best epoch's, not the last epoch's
    for a, b in zip(m.weights, weights_after[best]):
        np.testing.assert_array_equal(a.numpy(), b)
    assert not all(np.allclose(a.numpy(), b) for a, b in zip(m.weights, weights_after[state["epoch"]]))


@pytest.mark.parametrize("decoder", ["lstm", "transformer", "updown"])
def test_every_decoder_trains_through_the_same_loop(tmp_path, decoder):
    train, val = toy_sets()
    state = fit(
        make_model(decoder=decoder), train, val, SETTINGS, SEED, tmp_path / "c", progress=False, log=lambda s: None
    )
    losses = [h["val_loss"] for h in state["history"]]
    assert losses[-1] < losses[0] * 0.7, losses


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def test_label_smoothing_trains_and_spreads_the_predictions(tmp_path):
    """The same run with eps = 0.2: it learns (val loss, plain cross-entropy, falls) and its most
    likely words get less mass than the unsmoothed model gives them."""
    train, val = toy_sets()
    peaks = []
    for eps in (0.0, 0.2):
        m = make_model()
        settings = dataclasses.replace(SETTINGS, label_smoothing=eps)
        state = fit(m, train, val, settings, SEED, tmp_path / str(eps), progress=False, log=lambda s: None)
        losses = [h["val_loss"] for h in state["history"]]
        assert losses[-1] < losses[0] * 0.8, losses
        logits, _ = m.forward(val.features[val.image_rows[:16]], val.tokens[:16, :-1])
        peaks.append(float(np.mean(np.max(softmax(logits.numpy()), axis=-1))))
    assert peaks[1] < peaks[0] - 0.02, peaks


@pytest.mark.parametrize("decoder", ["updown"])
def test_a_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tmp_path, decoder):
    """Interrupted after epoch 2's checkpoint, then resumed to 4: the very weights, bit for bit,
    of one run of 4 epochs (dropout on, so its masks must line up too)."""
    train, val = toy_sets()
    settings = dataclasses.replace(SETTINGS, epochs=4, label_smoothing=0.1)

    def interrupt(epoch, _):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(make_model(decoder=decoder), train, val, settings, SEED, tmp_path / "c", on_epoch=interrupt, progress=False)
    messages, resumed = [], make_model(decoder=decoder)
    fit(resumed, train, val, settings, SEED, tmp_path / "c", progress=False, log=messages.append)
    assert messages[0].startswith("resuming from") and "after epoch 2" in messages[0]
    clean = make_model(decoder=decoder)
    fit(clean, train, val, settings, SEED, tmp_path / "clean", progress=False, log=lambda s: None)
    for a, b in zip(resumed.weights, clean.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_same_seed_same_weights(tmp_path):
    train, val = toy_sets()
    weights = []
    for name in ("a", "b"):
        m = make_model()
        fit(m, train, val, SETTINGS, SEED, tmp_path / name, progress=False, log=lambda s: None)
        weights.append([w.numpy() for w in m.weights])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_xla_step_learns_repeats_itself_and_matches_the_plain_step(tmp_path):
    """train.jit: XLA computes the plain step's numbers to float rounding (shown without dropout:
    XLA draws other dropout masks, its Philox differing from TF's kernel), run after run alike."""
    from captioning.cli import seed_everything

    train, val = toy_sets()
    curves = []
    for i, jit in enumerate((True, True, False)):
        seed_everything(0)
        m = build_decoder("gru", vocab_size=8, feature_dim=6, num_locations=4, embed_dim=4, units=8, dropout=0.0)
        s = dataclasses.replace(SETTINGS, epochs=2, jit=jit)
        state = fit(m, train, val, s, SEED, tmp_path / f"c{i}", progress=False, log=lambda s: None)
        curves.append([(h["train_loss"], h["val_loss"]) for h in state["history"]])
    assert curves[0] == curves[1] and curves[0][-1][1] < curves[0][0][1] * 0.8, curves
    np.testing.assert_allclose(curves[0], curves[2], rtol=1e-4)


def test_mixed_bfloat16_trains_with_float32_weights_and_its_own_fingerprint(tmp_path):
    from captioning.cli import seed_everything

    train, val = toy_sets()
    seed_everything(0)
    m = build_decoder(
        "gru", precision="mixed_bfloat16", vocab_size=8, feature_dim=6, num_locations=4, embed_dim=4, units=8
    )
    state = fit(m, train, val, dataclasses.replace(SETTINGS, epochs=3), SEED, tmp_path / "c", progress=False)
    # a float32 checkpoint of the same settings is another run: never resumed into this one
    assert fingerprint(m, train, val, SETTINGS, SEED) != fingerprint(make_model(), train, val, SETTINGS, SEED)
    losses = [h["val_loss"] for h in state["history"]]
    assert m.compute_dtype == "bfloat16" and all(w.dtype == "float32" for w in m.weights)
    assert losses[-1] < losses[0] * 0.8, losses
    logits, _ = m.forward(np.zeros((2, 4, 6), np.float32), np.ones((2, 3), np.int32))
    assert logits.dtype == "bfloat16"
    with pytest.raises(CaptioningError, match="unknown precision 'mixed_float16'"):
        build_decoder("gru", precision="mixed_float16", vocab_size=8, feature_dim=6, num_locations=4)


KILLABLE = """
import time, sys
sys.path.insert(0, {tests!r})
from test_train import toy_sets, make_model, settings_for
from captioning.train import fit
train, val = toy_sets(h5={h5!r})
fit(make_model(), train, val, settings_for({h5!r}), 3, {ckpt!r}, on_epoch=lambda e, m: time.sleep(1.0), progress=False)
"""


def settings_for(h5):
    """Streamed features train with length buckets and block-shuffled reads, as a COCO run would."""
    return SETTINGS if h5 is None else dataclasses.replace(SETTINGS, bucket=2, read_block=4)


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, streamed):
    ckpt, h5 = tmp_path / "ckpt", (str(tmp_path / "features.h5") if streamed else None)
    script = KILLABLE.format(tests=os.path.dirname(__file__), ckpt=str(ckpt), h5=h5)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}, stdout=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    epoch = 0
    while time.time() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            epoch = json.loads((ckpt / "state.json").read_text())["epoch"]
        if epoch >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= epoch < SETTINGS.epochs, "the run should have been killed part-way"

    train, val = toy_sets(h5=h5)
    messages, logged = [], []
    resumed = make_model()
    state = fit(
        resumed,
        train,
        val,
        settings_for(h5),
        SEED,
        ckpt,
        on_epoch=lambda e, m: logged.append(e),
        progress=False,
        log=messages.append,
    )
    assert messages[0].startswith("resuming from") and f"after epoch {epoch}" in messages[0]
    assert logged == [1, 2, 3, 4, 5, 6]  # history replayed, then continued

    clean = make_model()
    clean_state = fit(clean, train, val, settings_for(h5), SEED, tmp_path / "clean", progress=False, log=lambda s: None)
    assert state["history"][-1]["val_loss"] == clean_state["history"][-1]["val_loss"]
    for a, b in zip(resumed.weights, clean.weights):  # same path, up to float rounding
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6)


def test_a_finished_checkpoint_is_not_resumed(tmp_path):
    train, val = toy_sets()
    fit(make_model(), train, val, SETTINGS, SEED, tmp_path / "ckpt", progress=False, log=lambda s: None)
    messages = []
    fit(make_model(), train, val, SETTINGS, SEED, tmp_path / "ckpt", progress=False, log=messages.append)
    assert not any(m.startswith("resuming") for m in messages)


def test_empty_val_split_is_a_clear_error(tmp_path):
    train, val = toy_sets()
    empty = CaptionSet(val.features, val.tokens[:0], val.image_rows[:0])
    with pytest.raises(CaptioningError, match="both the train and the val split"):
        fit(make_model(), train, empty, SETTINGS, SEED, tmp_path / "c", progress=False)


def test_streamed_features_train_exactly_as_in_memory_ones(tmp_path):
    """The same rows from disk (FeatureRows) or from RAM give the same trajectory, bit for bit."""
    streamed, val_streamed = toy_sets(h5=tmp_path / "f.h5")
    in_ram = CaptionSet(streamed.features[np.arange(24)], streamed.tokens, streamed.image_rows)
    val_ram = CaptionSet(val_streamed.features[np.arange(6)], val_streamed.tokens, val_streamed.image_rows)
    settings = settings_for("streamed")
    weights = []
    for name, (tr, va) in {"disk": (streamed, val_streamed), "ram": (in_ram, val_ram)}.items():
        m = make_model()
        fit(m, tr, va, settings, SEED, tmp_path / name, progress=False, log=lambda s: None)
        weights.append([w.numpy() for w in m.weights])
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


def test_resume_fingerprint_uses_the_file_identity_not_its_bytes(tmp_path, monkeypatch):
    """Streamed features are fingerprinted by the stored content hash (no feature is read)."""
    from captioning import feature_store

    train, val = toy_sets(h5=tmp_path / "f.h5")
    reads = []
    real = feature_store.FeatureRows.read_file_rows
    monkeypatch.setattr(feature_store.FeatureRows, "read_file_rows", lambda self, r: reads.append(r) or real(self, r))
    fp = fingerprint(make_model(), train, val, SETTINGS, SEED)
    assert reads == [] and fp == fingerprint(make_model(), train, val, SETTINGS, SEED)
    other, _ = toy_sets(seed=1, h5=tmp_path / "g.h5")  # other features: another trajectory
    assert fingerprint(make_model(), other, val, SETTINGS, SEED) != fp


def test_mirror_images_replace_a_seeded_half_with_their_words_mirrored():
    """Rows 0-3 are images, 4-7 their mirror images; token 5 is "left", 6 "right". A shuffled epoch
    reads about half the captions from the mirror image, those captions with left and right
    swapped; the same seed gives the same epoch; evaluation (no rng) reads no mirror image."""
    feats = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((8, 2, 3), np.float32)
    tokens = np.array([[1, 5, 7, 2], [1, 6, 2, 0], [1, 7, 2, 0], [1, 5, 6, 2]] * 10, np.int32)
    rows = np.tile(np.arange(4), 10)
    words = np.arange(8)
    words[[5, 6]] = 6, 5
    data = CaptionSet(feats, tokens, rows, mirror_rows=rows + 4, mirror_words=words)

    def epoch(seed):
        out = [(f[:, 0, 0].astype(int), t) for f, t in data.batches(8, np.random.default_rng(seed), prefetch_depth=0)]
        return np.concatenate([r for r, _ in out]), [t for _, t in out]

    read, toks = epoch(1)
    mirrored = read >= 4
    assert 10 < mirrored.sum() < 30  # about half of 40
    flat = [row for t in toks for row in t]
    for r, t in zip(read, flat):
        original = tokens[np.flatnonzero(rows == r % 4)[0]]
        if r >= 4:
            assert t.tolist() == words[original[: len(t)]].tolist()
        else:
            assert t.tolist() == original[: len(t)].tolist()
    again, toks_again = epoch(1)
    np.testing.assert_array_equal(read, again)
    assert all((a == b).all() for a, b in zip(toks, toks_again))
    plain = np.concatenate([f[:, 0, 0] for f, _ in data.batches(8, prefetch_depth=0)])
    assert (plain < 4).all()
