"""Every stage's CLI through click's CliRunner, end to end on a tiny generated dataset."""

import json
import shutil

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from captioning.commands import main as cli
from captioning.metrics import coco_scores, spice_available
from captioning.scene_metrics import scene_accuracy
from stages import evaluate, finetune, report, train


def test_stages_end_to_end(tiny_run):
    root, outs = tiny_run  # every stage, run once per session (conftest.py)
    for name, out in outs.items():
        assert out.strip().splitlines()[-1].startswith(name if name != "gen" else "generate"), out
    assert len(list((root / "data/shapes/images").glob("*.png"))) == 24
    ds = json.loads((root / "data/dataset.json").read_text())
    assert [r["split"] for r in ds["images"]].count("test") == 4
    with h5py.File(root / "data/features.h5") as f:
        assert f["spatial"].shape == (24, 16, 256)  # 32 px through block3_pool: 4x4 grid
    voc = json.loads((root / "data/vocab.json").read_text())["words"]
    assert voc[:4] == ["<pad>", "<start>", "<end>", "<unk>"] and "circle" in voc
    cfg = json.loads((root / "models_final/config.json").read_text())
    assert cfg["decoder"] == "gru" and cfg["model"]["units"] == 8 and cfg["encoder"]["layer"] == "block3_pool"
    assert json.loads((root / "models/vocab.json").read_text())["words"] == voc  # the model folder is whole
    metrics = json.loads((root / "reports/metrics.json").read_text())
    preds = json.loads((root / "reports/predictions.json").read_text())
    assert len(preds) == 4 and set(preds[0]) == {"image", "caption", "log_prob", "BLEU-4", "CIDEr", "references"}
    assert all(len(p["caption"].split()) <= 8 for p in preds)  # evaluate.max_length words at most
    # The scores are what pycocoevalcap and the scene checks give for the predictions written.
    spice, _ = spice_available()
    hyps = {p["image"]: p["caption"] for p in preds}
    recomputed = coco_scores({p["image"]: p["references"] for p in preds}, hyps, use_spice=spice)
    truth = {r["image"]: r["truth"] for r in ds["images"]}  # carried from the generator's records
    recomputed.update(scene_accuracy(hyps, truth))
    assert set(recomputed) >= {"object_accuracy", "layout_accuracy"}
    assert {k: metrics[k] for k in recomputed} == recomputed
    assert ("SPICE" in metrics) is spice and ("SPICE skipped" in outs["evaluate"]) is not spice
    assert metrics["mean_log_prob"] == pytest.approx(np.mean([p["log_prob"] for p in preds]), abs=1e-6)
    assert metrics["mean_log_prob"] < 0
    assert 0 < metrics["word_accuracy"] <= 1 and 0 <= metrics["distinct_2"] <= 1 and 0 <= metrics["novel"] <= 1
    assert metrics["vocab_used"] == len({w for p in preds for w in p["caption"].split()})
    assert {
        k: metrics[k]
        for k in ("images", "images_without_features", "split", "beam_size", "max_length", "length_penalty")
    } == {
        "images": 4,
        "images_without_features": 0,
        "split": "test",
        "beam_size": 2,
        "max_length": 8,
        "length_penalty": 0.0,
    }
    # dvc metrics show prints the saved model's epoch (the best), not the last one
    train_metrics = json.loads((root / "reports/train/metrics.json").read_text())
    state = json.loads((root / "ckpt/state.json").read_text())
    best = state["history"][state["best_epoch"] - 1]
    assert train_metrics["val_loss"] == best["val_loss"] and train_metrics["best_epoch"] == state["best_epoch"]
    assert train_metrics["step"] == state["best_epoch"] - 1
    tsv = (root / "reports/train/plots/metrics/val_loss.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[-1] == "val_loss" and len(tsv) == 3  # header + 2 epochs
    state = json.loads((root / "ckpt/state.json").read_text())
    assert state["complete"] and state["epoch"] == 2


def test_caption_cli(tiny_run, tmp_path):
    root, _ = tiny_run
    imgs = sorted((root / "data/shapes/images").glob("*.png"))[:2]
    (tmp_path / "broken.jpg").write_text("not an image")
    args = ["caption", "--model", str(root / "models_final"), "--json"]
    result = CliRunner().invoke(cli, args + [str(imgs[0]), str(tmp_path / "broken.jpg"), str(imgs[1])])
    assert result.exit_code == 1  # one image failed
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(imgs[0]), str(imgs[1])]
    assert all(isinstance(line["caption"], str) for line in lines)
    assert "broken.jpg: not an image file" in result.stderr
    ok = CliRunner().invoke(cli, args[:-1] + ["--beam-size", "1", str(imgs[0])])
    assert ok.exit_code == 0 and ok.stdout.startswith(str(imgs[0]) + "\t")
    # The model and its copy as an ensemble: equal probabilities averaged, the same caption.
    twice = CliRunner().invoke(cli, args[:-1] + ["--model", str(root / "models"), "--beam-size", "1", str(imgs[0])])
    assert twice.exit_code == 0 and twice.stdout == ok.stdout


def test_caption_features_match_the_stored_ones(tiny_run):
    """The caption command rebuilds the very encoder (random init from seed) the features came from."""
    root, _ = tiny_run
    from captioning.encoder import build_encoder, make_forward
    from captioning.feature_store import EncoderSpec, FeatureStore
    from captioning.images import load_image

    store = FeatureStore(root / "data/features.h5")
    spec = EncoderSpec.from_attrs(json.loads((root / "models/config.json").read_text())["encoder"])
    key = store.keys[0]
    spatial, _ = make_forward(*build_encoder(spec))(
        load_image(root / "data/shapes/images" / key, spec.image_size)[None]
    )
    np.testing.assert_allclose(spatial.numpy()[0], store.load([key])[0], rtol=1e-2, atol=1e-2)


TRAIN_ARGS = [
    "--features",
    "f",
    "--vocab",
    "v",
    "--captions",
    "c",
    "--model-dir",
    "m",
    "--checkpoint",
    "k",
    "--live-dir",
    "l",
]


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"train": {"units": "many"}}, "train.units: expected an integer, got 'many'"),
        ({"train": {"dropout": 1.5}}, "train.dropout: must be <= 0.95, got 1.5"),
        ({"train": {"unit": 3}}, "train.unit: unknown setting"),
        ({"seed": -1}, "seed: must be >= 0"),
        ({"train": {"decoder": "rnn"}}, "train.decoder: must be one of gru, lstm, transformer, updown; got 'rnn'"),
        (
            {"train": {"decoder": "transformer", "attention_reg": 0.1}},
            "train.attention_reg: 0.1, but the transformer decoder has no attention prior",
        ),
        (
            {"train": {"attention": False, "attention_reg": 0.1}},
            "train.attention_reg: 0.1, but the gru decoder without attention has no attention prior",
        ),
        (
            {"train": {"decoder": "updown", "attention": False, "attention_reg": 0.0}},
            "train.attention: the updown decoder reads the image only through attention",
        ),
    ],
)
def test_bad_params_get_one_clear_message(tmp_path, tiny_params, edit, message):
    path, base = tiny_params
    data = {**base, **{k: ({**base[k], **v} if isinstance(v, dict) else v) for k, v in edit.items()}}
    path.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(train.main, ["--params", str(path), *TRAIN_ARGS])
    assert result.exit_code == 1
    assert result.output.strip() == f"Error: {message}" or result.output.strip().startswith(f"Error: {message}")
    assert "Traceback" not in result.output


def test_a_setting_missing_from_params_yaml_is_named(tmp_path, tiny_params):
    path, base = tiny_params
    path.write_text(yaml.safe_dump({**base, "train": {k: v for k, v in base["train"].items() if k != "units"}}))
    result = CliRunner().invoke(train.main, ["--params", str(path), *TRAIN_ARGS])
    assert result.exit_code == 1
    assert result.output.strip() == "Error: train.units: missing (params.yaml holds every setting)"


def test_unknown_split_param(tmp_path, tiny_params):
    path, base = tiny_params
    path.write_text(yaml.safe_dump({**base, "evaluate": {**base["evaluate"], "split": "tst"}}))
    args = ["--model", "m", "--features", "f", "--dataset", "d", "--metrics", "m", "--predictions", "p"]
    result = CliRunner().invoke(evaluate.main, ["--params", str(path), *args])
    assert result.exit_code == 1 and "evaluate.split: must be one of train, val, test; got 'tst'" in result.output


def test_scst_mean_baseline_needs_two_samples(tmp_path, tiny_params):
    from stages import finetune

    path, base = tiny_params
    path.write_text(yaml.safe_dump({**base, "finetune": {**base["finetune"], "enabled": True, "samples": 1}}))
    args = ["--model", "m", "--features", "f", "--captions", "c", "--out", "o", "--checkpoint", "k", "--live-dir", "l"]
    result = CliRunner().invoke(finetune.main, ["--params", str(path), *args])
    assert (
        result.exit_code == 1
        and "finetune.samples: the mean baseline averages an image's other samples" in result.output
    )


def test_the_transformer_refuses_captions_longer_than_its_positions():
    from captioning.decoders import build_decoder
    from captioning.errors import CaptioningError

    m = build_decoder("transformer", vocab_size=9, feature_dim=4, num_locations=4, embed_dim=4, units=8,
                      num_layers=1, num_heads=2, dropout=0.0)  # fmt: skip
    m.check_max_length(63, "evaluate.max_length")  # <start> and 63 words: the 64 positions
    with pytest.raises(CaptioningError, match="evaluate.max_length: 64 words is more than this TransformerDecoder"):
        m.check_max_length(64, "evaluate.max_length")
    build_decoder("gru", vocab_size=9, feature_dim=4, num_locations=4, embed_dim=4, units=8, attention=True,
                  attention_units=4, dropout=0.0).check_max_length(500, "x")  # fmt: skip


@pytest.mark.parametrize(
    "steer, captions",
    [({"groups": 2, "diversity": 1.0, "n_best": 2}, 4), ({"sample": 3, "top_p": 0.9}, 3)],
)
def test_evaluate_keeps_every_caption_of_a_steered_search(tiny_run, tmp_path, steer, captions):
    root, _ = tiny_run
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["evaluate"].update(steer)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    args = ["--params", tmp_path / "params.yaml", "--model", root / "models_final", "--features",
            root / "data/features.h5", "--dataset", root / "data/dataset.json", "--metrics", tmp_path / "m.json",
            "--predictions", tmp_path / "p.json", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(evaluate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    preds = json.loads((tmp_path / "p.json").read_text())
    assert all(len(p["captions"]) == captions and p["captions"][0] == p["caption"] for p in preds)
    assert 0 <= metrics["mBLEU_4"] <= 1 and metrics["oracle_CIDEr"] >= metrics["CIDEr"] - 1e-6
    assert {k: metrics[k] for k in steer} == steer  # every decoding setting off its default is recorded


def test_train_reads_mirror_images_when_the_features_have_them(tmp_path, tiny_params, monkeypatch):
    """features.flip: the features file holds every image and its mirror image; the training set
    gets the mirror rows (left and right swapped in their words) and the train stage trains on it."""
    from conftest import invoke, prepare_training_data

    from captioning.caption_set import caption_set
    from captioning.feature_store import FeatureStore
    from captioning.vocab import Vocabulary

    path, base = tiny_params
    path.write_text(yaml.safe_dump({**base, "features": {**base["features"], "flip": True}}))
    monkeypatch.chdir(tmp_path)
    prepare_training_data(str(path))
    store = FeatureStore("data/features.h5")
    originals = [k for k in store.keys if not k.endswith("#flip")]
    assert len(store.keys) == 2 * len(originals) and store.mirrored(originals)
    vocab = Vocabulary.from_json(json.loads((tmp_path / "data/vocab.json").read_text()))
    data = caption_set(store, "data/captions.h5", "train", vocab)
    assert (data.mirror_rows == data.image_rows + len(data.features) // 2).all()
    assert data.mirror_words[vocab.index["left"]] == vocab.index["right"]
    assert data.mirror_words[vocab.index["right"]] == vocab.index["left"]
    assert caption_set(store, "data/captions.h5", "val").mirror_rows is None
    args = "--features data/features.h5 --vocab data/vocab.json --captions data/captions.h5 --model-dir m"
    out = invoke(train, ["--params", str(path), *f"{args} --checkpoint k --live-dir l --no-progress".split()])
    assert "best val_loss" in out


def test_evaluate_decodes_several_models_as_one_ensemble(tiny_run, tmp_path):
    """The model twice: the mean of equal probabilities is each, so the very captions of the model
    alone (in the tiny run, finetune is off and models_final is models' copy); a model with
    another vocabulary is refused by name."""
    root, _ = tiny_run
    single = json.loads((root / "reports/predictions.json").read_text())
    args = ["--params", root / "params.yaml", "--model", root / "models", "--model", root / "models_final",
            "--features", root / "data/features.h5", "--dataset", root / "data/dataset.json",
            "--metrics", tmp_path / "m.json", "--predictions", tmp_path / "p.json", "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(evaluate.main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m.json").read_text())["ensemble"] == 2
    assert [p["caption"] for p in json.loads((tmp_path / "p.json").read_text())] == [p["caption"] for p in single]
    other = tmp_path / "other"
    shutil.copytree(root / "models", other)
    vocab = json.loads((other / "vocab.json").read_text())
    (other / "vocab.json").write_text(json.dumps({**vocab, "words": vocab["words"][:-1] + ["zebra"]}))
    args[args.index(root / "models_final")] = other
    result = CliRunner().invoke(evaluate.main, [str(a) for a in args])
    assert result.exit_code == 1 and f"{other}: another vocabulary than {root / 'models'}" in result.output


def test_features_of_another_encoder_are_refused_by_name(tiny_run, tmp_path):
    """A model trained on one CNN's features, given another's (here the model claims 48 px
    images): evaluate, finetune and report each stop with one line naming the features file,
    before any captioning."""
    root, _ = tiny_run
    other = tmp_path / "other"
    shutil.copytree(root / "models", other)
    config = json.loads((other / "config.json").read_text())
    config["encoder"]["image_size"] = 48
    (other / "config.json").write_text(json.dumps(config))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["finetune"]["enabled"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    features = root / "data/features.h5"
    common = ["--params", tmp_path / "params.yaml", "--model", other, "--features", features]
    runs = {
        evaluate: ["--dataset", root / "data/dataset.json", "--metrics", tmp_path / "m.json",
                   "--predictions", tmp_path / "p.json", "--no-progress"],
        finetune: ["--captions", root / "data/captions.h5", "--out", tmp_path / "ft", "--checkpoint", tmp_path / "ck",
                   "--live-dir", tmp_path / "live", "--no-progress"],
        report: ["--dataset", root / "data/dataset.json", "--images", root / "data/shapes/images",
                 "--predictions", root / "reports/predictions.json", "--metrics", root / "reports/metrics.json",
                 "--curves", root / "reports/train/plots/metrics", "--out", tmp_path / "g",
                 "--plots", tmp_path / "plots", "--summary", tmp_path / "a.json"],
    }  # fmt: skip
    for stage, args in runs.items():
        result = CliRunner().invoke(stage.main, [str(a) for a in common + args])
        assert result.exit_code == 1, result.output
        assert f"{features}: features of vgg16 (layer block3_pool, 32 px, weights none), but {other} was trained" in (
            result.output
        )
        assert "48 px" in result.output and "Traceback" not in result.output
    assert not any((tmp_path / p).exists() for p in ("m.json", "p.json", "ft", "g", "a.json"))
