"""The Python API (Captioner) and the self-contained bundle, on the tiny pipeline's model."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from captioning.commands import main as cli
from captioning.errors import CaptioningError


@pytest.fixture(scope="module")
def captioner(tiny_run):
    from captioning import Captioner

    return Captioner.load(tiny_run[0] / "models_final")


def test_paths_bytes_and_arrays_get_the_same_caption_as_the_reference_search(tiny_run, captioner):
    from captioning.decode import caption_features

    root, _ = tiny_run
    imgs = sorted((root / "data/shapes/images").glob("*.png"))[:3]
    as_array = np.asarray(Image.open(imgs[2]).convert("RGB"))
    caps = captioner.caption([str(imgs[0]), imgs[1].read_bytes(), as_array], beam_size=2, max_length=8)
    again = captioner.caption([imgs[0], str(imgs[1]), str(imgs[2])], beam_size=2, max_length=8)
    assert [c.text for c in caps] == [c.text for c in again]
    assert set(captioner.timings) == {"read", "encode", "search"}
    feats = captioner.encode(np.stack([captioner.read(p) for p in imgs]))
    texts, log_probs = caption_features(captioner.model.decoder, captioner.model.vocab, feats, 2, 8)
    assert [c.text for c in caps] == texts  # the compiled search picks what the host-driven one does
    np.testing.assert_allclose([c.log_prob for c in caps], log_probs, rtol=1e-5)
    assert all(c.score == c.log_prob for c in caps)  # no length penalty: the score is the log-prob
    assert all(len(c.words) <= 8 and c.to_json()["caption"] == c.text for c in caps)


def test_attention_per_word_and_bad_input(tiny_run, captioner, tmp_path):
    root, _ = tiny_run
    img = sorted((root / "data/shapes/images").glob("*.png"))[0]
    (cap,) = captioner.caption([img], attention=True)
    L = captioner.model.decoder.num_locations
    assert cap.attention.shape == (len(cap.words), L)
    np.testing.assert_allclose(cap.attention.sum(-1), 1.0, rtol=1e-4)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(CaptioningError, match="bad.jpg: not an image file"):
        captioner.caption([img, str(tmp_path / "bad.jpg")])
    with pytest.raises(CaptioningError, match="image 1: .*expected an"):
        captioner.caption([img, np.zeros((4, 4, 7))])
    assert captioner.caption([]) == []


def test_bundle_captions_in_a_fresh_process_in_another_folder(tiny_run, captioner, tmp_path):
    root, _ = tiny_run
    imgs = sorted((root / "data/shapes/images").glob("*.png"))[:2]
    bundle = tmp_path / "bundle"
    out = CliRunner().invoke(cli, ["export", "--model", str(root / "models_final"), "--out", str(bundle)])
    assert out.exit_code == 0, out.output
    assert sorted(p.name for p in bundle.iterdir()) == ["captioner.keras", "config.json", "encoder.keras", "vocab.json"]
    # The encoder's settings name a weights file that is nowhere: the bundle carries the network.
    config = json.loads((bundle / "config.json").read_text())
    config["encoder"]["weights"] = "no/such/weights.h5"
    (bundle / "config.json").write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = subprocess.run(
        [sys.executable, "-m", "captioning", "caption", "--model", str(bundle), "--json", *map(str, imgs)],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert run.returncode == 0, run.stderr
    got = [json.loads(line) for line in run.stdout.splitlines()]
    want = captioner.caption(imgs)
    assert [g["caption"] for g in got] == [w.text for w in want]
    np.testing.assert_allclose([g["log_prob"] for g in got], [w.log_prob for w in want], atol=2e-6)


def test_a_missing_or_broken_model_is_a_clear_error(tmp_path):
    from captioning import Captioner

    with pytest.raises(CaptioningError, match="no such model folder"):
        Captioner.load(tmp_path / "nope")
    res = CliRunner().invoke(cli, ["caption", "--model", str(tmp_path), "x.jpg"])
    assert res.exit_code == 1 and "captioner.keras: not found" in res.output


def test_steered_decoding_through_the_captioner_and_the_command(tiny_run, captioner):
    root, _ = tiny_run
    img = sorted((root / "data/shapes/images").glob("*.png"))[0]
    (plain,) = captioner.caption([img], beam_size=3)
    (best,) = captioner.caption([img], beam_size=3, n_best=3)
    assert best.text == plain.text and best.log_prob == pytest.approx(plain.log_prob, abs=1e-5)
    ranked = [best.score] + [a.score for a in best.alternatives]
    assert len(best.alternatives) == 2 and ranked == sorted(ranked, reverse=True)
    assert len({best.text, *(a.text for a in best.alternatives)}) == 3
    word = next(w for w in captioner.model.vocab.words[4:] if w not in plain.words)
    (forced,) = captioner.caption([img], include=[word])
    assert word in forced.words
    (drawn,) = captioner.caption([img], sample=4, seed=1)
    assert len(drawn.alternatives) == 3 and captioner.caption([img], sample=4, seed=1)[0] == drawn
    with pytest.raises(CaptioningError, match="'zebra' is not in the model's vocabulary"):
        captioner.caption([img], include=["zebra"])
    with pytest.raises(CaptioningError, match="n_best must be between 1 and beam_size"):
        captioner.caption([img], beam_size=2, n_best=3)
    for ignored, message in [({"temperature": 0.5}, "need sample > 0"), ({"diversity": 0.5}, "needs groups > 1")]:
        with pytest.raises(CaptioningError, match=message):  # a setting that would do nothing is refused
            captioner.caption([img], **ignored)
    model = str(root / "models_final")
    out = CliRunner().invoke(cli, ["caption", "--model", model, "--n-best", "2", "--json", str(img)])
    assert out.exit_code == 0, out.output
    line = json.loads(out.stdout)
    assert line["caption"] == plain.text and len(line["alternatives"]) == 1
    bad = CliRunner().invoke(cli, ["caption", "--model", model, "--include", "zebra", str(img)])
    assert bad.exit_code == 1 and "'zebra' is not in the model's vocabulary" in bad.output
