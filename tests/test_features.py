"""Feature extraction into HDF5: shapes and attributes, skips, and resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from captioning.encoder import extract_features
from captioning.errors import CaptioningError
from captioning.feature_store import EncoderSpec, FeatureStore

SPEC = EncoderSpec(backbone="vgg16", weights="none", layer="block3_pool", image_size=32, seed=1)


def keys_of(shapes_dir):
    return sorted(p.name for p in (shapes_dir / "images").iterdir())


def test_features_file_layout(tmp_path, shapes_dir):
    keys = keys_of(shapes_dir)
    rep = extract_features(SPEC, shapes_dir / "images", keys, tmp_path / "f.h5", batch_size=8, progress=False)
    with h5py.File(tmp_path / "f.h5") as f:
        assert f["spatial"].shape == (24, 16, 256) and f["spatial"].dtype == np.float16  # 32 px -> 4x4 after block3
        assert f["pooled"].shape == (24, 256)
        assert list(f["images"].asstr()[:]) == keys
        assert f.attrs["backbone"] == "vgg16" and f.attrs["layer"] == "block3_pool"
        assert f.attrs["image_size"] == 32 and f.attrs["weights"] == "none" and tuple(f.attrs["grid"]) == (4, 4)
        np.testing.assert_allclose(
            f["pooled"][:].astype(np.float32), f["spatial"][:].astype(np.float32).mean(1), atol=2e-2, rtol=1e-2
        )
    assert rep["images"] == 24 and rep["skipped"] == [] and not (tmp_path / "f.h5.partial.h5").exists()
    store = FeatureStore(tmp_path / "f.h5")
    assert store.spec == SPEC and store.load(keys[:2]).shape == (2, 16, 256)


def test_random_encoder_is_reproducible_from_seed(tmp_path, shapes_dir):
    keys = keys_of(shapes_dir)[:4]
    for name in ("a.h5", "b.h5"):
        extract_features(SPEC, shapes_dir / "images", keys, tmp_path / name, batch_size=4, progress=False)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        np.testing.assert_array_equal(a["spatial"][:], b["spatial"][:])


def test_bad_images_are_skipped_counted_and_bounded(tmp_path, shapes_dir):
    images = shapes_dir / "images"
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")
    keys = keys_of(shapes_dir)
    rep = extract_features(SPEC, images, keys, tmp_path / "f.h5", batch_size=8, max_bad_fraction=0.05, progress=False)
    assert rep["images"] == 24 and rep["skipped"] == [
        {"image": "zz_broken.jpg", "error": "not an image file PIL can read"}
    ]
    with pytest.raises(CaptioningError, match=r"1 of 25 images could not be read \(first: zz_broken.jpg"):
        extract_features(SPEC, images, keys, tmp_path / "g.h5", batch_size=8, max_bad_fraction=0.01, progress=False)
    assert not (tmp_path / "g.h5").exists()


def test_missing_weights_file_is_a_clear_error(tmp_path, shapes_dir):
    spec = EncoderSpec(backbone="mobilenet", weights=str(tmp_path / "nope.h5"), image_size=32)
    with pytest.raises(CaptioningError, match="nope.h5: encoder weights file not found"):
        extract_features(spec, shapes_dir / "images", keys_of(shapes_dir), tmp_path / "f.h5", progress=False)


KILLABLE = """
import sys, time
from captioning.encoder import extract_features
from captioning.feature_store import EncoderSpec
spec = EncoderSpec(**{spec})
keys = {keys}

def on_chunk(c):  # tell the parent a chunk is done, then slow down so it can kill us part-way
    with open({marker!r}, "a") as m:
        m.write("x")
    time.sleep(0.3)

extract_features(spec, {images!r}, keys, {out!r}, batch_size=2, chunk_batches=1, progress=False, on_chunk=on_chunk)
"""


def test_sigkill_leaves_no_output_and_rerun_resumes_to_identical_file(tmp_path, shapes_dir):
    keys = keys_of(shapes_dir)
    images, out, marker = str(shapes_dir / "images"), tmp_path / "killed.h5", tmp_path / "chunks-done"
    script = KILLABLE.format(spec=SPEC.__dict__, keys=keys, images=images, out=str(out), marker=str(marker))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    partial = tmp_path / "killed.h5.partial.h5"

    def chunks_done():
        return len(marker.read_text()) if marker.exists() else 0

    deadline = time.time() + 120
    while chunks_done() < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = chunks_done()
    assert 3 <= done_before < 12, "the run should have been killed part-way"
    assert not out.exists() and partial.exists()  # nothing at the declared output path, rows kept aside

    rep = extract_features(SPEC, images, keys, out, batch_size=2, chunk_batches=1, progress=False)
    # The kill may land between a chunk's done flag and the parent's marker: one chunk more.
    assert rep["resumed_images"] in (2 * done_before, 2 * done_before + 2)
    assert rep["encoded_images"] == 24 - rep["resumed_images"]
    extract_features(SPEC, images, keys, tmp_path / "clean.h5", batch_size=2, chunk_batches=1, progress=False)
    with h5py.File(out) as a, h5py.File(tmp_path / "clean.h5") as b:
        for name in ("spatial", "pooled"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert list(a["images"].asstr()[:]) == list(b["images"].asstr()[:])
        assert dict(a.attrs).keys() == dict(b.attrs).keys()
        assert a.attrs["content_hash"] == b.attrs["content_hash"]
    assert not partial.exists()


def test_rows_are_written_in_place_into_a_presized_file(tmp_path, shapes_dir):
    """Incremental writing: after each chunk its rows are in the partial file (sized for every
    image from the start), the rest still zero, and the ledger lists the finished chunks."""
    keys = keys_of(shapes_dir)
    seen = []

    def on_chunk(c):
        with h5py.File(tmp_path / "f.h5.partial.h5", "r") as f:  # the writer's own handle, shared
            filled = np.abs(f["spatial"][:].astype(np.float32)).sum(axis=(1, 2)) > 0
            done = json.loads((tmp_path / "f.h5.partial.json").read_text())["done"]
            seen.append((f["spatial"].shape, done, int(filled.sum())))

    extract_features(
        SPEC,
        shapes_dir / "images",
        keys,
        tmp_path / "f.h5",
        batch_size=4,
        chunk_batches=2,
        progress=False,
        on_chunk=on_chunk,
    )
    assert seen == [((24, 16, 256), [0], 8), ((24, 16, 256), [0, 1], 16), ((24, 16, 256), [0, 1, 2], 24)]


def test_content_hash_identifies_the_features(tmp_path, shapes_dir):
    from captioning.feature_store import hash_features

    images = shapes_dir / "images"
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")  # the copy-without-skips path too
    keys = keys_of(shapes_dir)
    for name, ks in (("all.h5", keys[:-1]), ("skips.h5", keys)):
        extract_features(SPEC, images, ks, tmp_path / name, batch_size=8, max_bad_fraction=0.1, progress=False)
        with h5py.File(tmp_path / name) as f:
            assert f.attrs["content_hash"] == hash_features(f["spatial"], f["pooled"])
            assert set(f) == {"images", "spatial", "pooled"}  # the documented layout, nothing else
        assert FeatureStore(tmp_path / name).content_hash() == FeatureStore(tmp_path / "all.h5").content_hash()


def test_stale_or_broken_partial_work_is_discarded(tmp_path, shapes_dir):
    from captioning.encoder import _extraction_id

    keys = keys_of(shapes_dir)[:4]
    images = shapes_dir / "images"
    clean = extract_features(SPEC, images, keys, tmp_path / "clean.h5", batch_size=4, progress=False)
    assert clean["resumed_images"] == 0
    cases = {
        "other.h5": ({"fingerprint": "other settings", "done": [0], "errors": {}}, None),  # another run's work
        "junk.h5": ({"fingerprint": _extraction_id(SPEC, keys, 4, "float16"), "done": [0], "errors": {}}, b"junk"),
    }
    for name, (ledger, junk) in cases.items():
        partial = tmp_path / f"{name}.partial.h5"
        if junk:  # killed while the file was being created: the ledger cannot be trusted
            partial.write_bytes(junk)
        else:
            with h5py.File(partial, "w") as f:
                f["spatial"] = np.ones((4, 16, 256), np.float16)
        (tmp_path / f"{name}.partial.json").write_text(json.dumps(ledger))
        rep = extract_features(SPEC, images, keys, tmp_path / name, batch_size=4, progress=False)
        assert rep["resumed_images"] == 0 and rep["images"] == 4, name
        assert not partial.exists() and not (tmp_path / f"{name}.partial.json").exists()
        with h5py.File(tmp_path / name) as a, h5py.File(tmp_path / "clean.h5") as b:
            np.testing.assert_array_equal(a["spatial"][:], b["spatial"][:])


@pytest.mark.parametrize("n", [1, 3])
def test_shards_merged_are_the_bytes_of_one_run(tmp_path, shapes_dir, n):
    from captioning.encoder import shard_range
    from captioning.feature_store import merge_shards

    images = shapes_dir / "images"
    (images / "zz_broken.jpg").write_bytes(b"not a jpeg")  # a skip inside the last shard
    keys = keys_of(shapes_dir)
    kw = dict(batch_size=4, max_bad_fraction=0.2, progress=False)  # checked per shard: 1 bad of 9
    whole = extract_features(SPEC, images, keys, tmp_path / "whole.h5", **kw)
    slices = [shard_range(len(keys), (i, n)) for i in range(n)]
    assert [k for lo, hi in slices for k in keys[lo:hi]] == keys  # every key once, in order
    shards = [tmp_path / f"shard-{i}.h5" for i in range(n)]
    reps = [extract_features(SPEC, images, keys, s, shard=(i, n), **kw) for i, s in enumerate(shards)]
    assert sum(r["images"] for r in reps) == whole["images"] == 24
    assert [s["image"] for r in reps for s in r["skipped"]] == ["zz_broken.jpg"]
    assert merge_shards(shards, tmp_path / "merged.h5") == 24
    assert (tmp_path / "merged.h5").read_bytes() == (tmp_path / "whole.h5").read_bytes()
    if n > 1:  # the copy through copy_rows gives the same bytes as a single shard's file
        from captioning.feature_store import copy_rows

        copy_rows(tmp_path / "copied.h5", [(tmp_path / "whole.h5", np.arange(24))])
        assert (tmp_path / "copied.h5").read_bytes() == (tmp_path / "whole.h5").read_bytes()


def test_merge_refuses_missing_reordered_or_foreign_shards(tmp_path, shapes_dir):
    from captioning.feature_store import merge_shards

    images, keys = shapes_dir / "images", keys_of(shapes_dir)
    kw = dict(batch_size=4, progress=False)
    s = [tmp_path / f"shard-{i}.h5" for i in range(3)]
    for i in range(3):
        extract_features(SPEC, images, keys, s[i], shard=(i, 3), **kw)
    with pytest.raises(CaptioningError, match=r"shards must be 0..N-1 of one N.*\(missing: \[1\]\)"):
        merge_shards([s[0], s[2]], tmp_path / "m.h5")
    with pytest.raises(CaptioningError, match="shards must be 0..N-1 of one N"):
        merge_shards([s[1], s[0], s[2]], tmp_path / "m.h5")
    other = EncoderSpec(backbone="vgg16", weights="none", layer="block3_pool", image_size=32, seed=2)
    extract_features(other, images, keys, tmp_path / "other-1.h5", shard=(1, 3), **kw)
    with pytest.raises(CaptioningError, match="other-1.h5: made with other encoder settings"):
        merge_shards([s[0], tmp_path / "other-1.h5", s[2]], tmp_path / "m.h5")
    assert not (tmp_path / "m.h5").exists()
    with pytest.raises(CaptioningError, match=r"shard 3/3: expected 0 <= I < N"):
        extract_features(SPEC, images, keys, tmp_path / "x.h5", shard=(3, 3), **kw)


def test_merge_stage_names_a_missing_shard(tmp_path, tiny_params):
    from click.testing import CliRunner

    from stages import merge_features

    params = dict(tiny_params[1], features={**tiny_params[1]["features"], "shards": [0, 1]})
    (tmp_path / "p.yaml").write_text(__import__("yaml").safe_dump(params))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-0.h5").write_bytes(b"")
    args = ["--params", str(tmp_path / "p.yaml"), "--shards", str(tmp_path / "shards"), "--reports", str(tmp_path)]
    r = CliRunner().invoke(merge_features.main, [*args, "--out", str(tmp_path / "f.h5"), "--report", "r.json"])
    assert r.exit_code == 1 and "missing features shard(s): " in r.output and "shard-1.h5" in r.output


def tiny_cnn_file(path, size=32, rescale=True):
    """A small Keras CNN saved as a .keras file: RGB 0..255 in, an 8x8x5 map out (and a pooled head)."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((size, size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp) if rescale else inp
    x = keras.layers.Conv2D(5, 3, strides=4, padding="same", activation="relu", name="map")(x)
    out = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    keras.Model(inp, out).save(path)
    return path


def test_any_keras_model_file_is_an_encoder(tmp_path, shapes_dir):
    """features.backbone names a .keras file: its inner layer ``map`` as the feature map, the
    file's sha256 in the spec; a changed file, a flat output and a wrong size are clear errors."""
    from captioning.encoder import build_encoder, make_forward, make_spec
    from captioning.images import load_image

    path = str(tiny_cnn_file(tmp_path / "cnn.keras"))
    spec = make_spec(path, "none", "map", 32, 1.0, 0)
    assert len(spec.file_hash) == 64
    keys = keys_of(shapes_dir)[:5]
    extract_features(spec, shapes_dir / "images", keys, tmp_path / "f.h5", batch_size=4, progress=False)
    store = FeatureStore(tmp_path / "f.h5")
    assert store.spec == spec and (store.num_locations, store.feature_dim) == (64, 5)
    # The file's own network on the raw image: the stored rows, to float16 rounding.
    import keras

    net = keras.saving.load_model(path)
    image = load_image(shapes_dir / "images" / keys[0], 32, dtype=np.uint8)[None].astype(np.float32)
    want = keras.Model(net.inputs[0], net.get_layer("map").output)(image).numpy().reshape(64, 5)
    np.testing.assert_allclose(store.load(keys[:1])[0], want, rtol=1e-2, atol=1e-2)
    with pytest.raises(CaptioningError, match="its output has shape .* not a .* feature map"):
        build_encoder(make_spec(path, "none", "", 32, 1.0, 0))
    with pytest.raises(CaptioningError, match="has no layer named 'nope'"):
        build_encoder(make_spec(path, "none", "nope", 32, 1.0, 0))
    assert make_forward(*build_encoder(make_spec(path, "none", "map", 64, 1.0, 0)))(np.zeros((1, 64, 64, 3), np.uint8))[
        0
    ].shape == (1, 256, 5)  # rebuilt for 64 px: a 16x16 map
    with pytest.raises(CaptioningError, match="holds its own weights"):
        build_encoder(make_spec(path, "imagenet", "map", 32, 1.0, 0))
    tiny_cnn_file(tmp_path / "cnn.keras", rescale=False)  # another network at the same path
    with pytest.raises(CaptioningError, match="not the file these features were made with"):
        build_encoder(spec)
    forward = make_forward(*build_encoder(make_spec(path, "none", "map", 32, 1.0, 0)))
    assert forward(np.zeros((1, 32, 32, 3), np.uint8))[0].shape == (1, 64, 5)
    with pytest.raises(CaptioningError, match="encoder model file not found"):
        make_spec(str(tmp_path / "missing.keras"), "none", "", 32, 1.0, 0)
    (tmp_path / "junk.keras").write_bytes(b"not a zip")
    with pytest.raises(CaptioningError, match="junk.keras: not a Keras model"):
        build_encoder(make_spec(str(tmp_path / "junk.keras"), "none", "", 32, 1.0, 0))


def test_a_model_file_runs_at_another_image_size(tmp_path):
    """A convolutional model file saved for 32 px, asked for 48 px: rebuilt with its own weights
    (nested models included), it computes what the same layers compute at 48 px; a network with a
    dense layer on the flattened map cannot be rebuilt, and the error says what to set."""
    import keras

    from captioning.encoder import build_encoder, make_forward, make_spec

    keras.utils.set_random_seed(0)

    def network(size):  # RGB in, a nested convolutional body, then pooling
        body_in = keras.Input((size, size, 3))
        body = keras.Model(
            body_in, keras.layers.Conv2D(4, 3, strides=2, padding="same", name="conv")(body_in), name="body"
        )
        inp = keras.Input((size, size, 3))
        x = body(keras.layers.Rescaling(1 / 255)(inp))
        return keras.Model(inp, keras.layers.MaxPooling2D(2, name="map")(x))

    saved = network(32)
    saved.save(tmp_path / "nested.keras")
    wanted = network(48)
    wanted.set_weights(saved.get_weights())
    image = np.random.default_rng(0).integers(0, 256, (2, 48, 48, 3), dtype=np.uint8)
    spec = make_spec(str(tmp_path / "nested.keras"), "none", "", 48, 1.0, 0)
    got = make_forward(*build_encoder(spec))(image)[0].numpy()  # (2, 144, 4): a 12x12 map
    np.testing.assert_allclose(got, wanted(image.astype(np.float32)).numpy().reshape(2, 144, 4), rtol=1e-5, atol=1e-6)

    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3, name="map")(inp)
    keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x))).save(tmp_path / "dense.keras")
    with pytest.raises(
        CaptioningError,
        match=r"dense.keras: takes 32x32 images and cannot be rebuilt for 48x48 .*"
        r"set features.image_size to 32",
    ):
        build_encoder(make_spec(str(tmp_path / "dense.keras"), "none", "map", 48, 1.0, 0))


@pytest.mark.parametrize("backbone", ["resnet101", "efficientnetv2b0", "efficientnetv2s", "convnext_tiny"])
def test_every_new_backbone_entry_builds_without_weights(backbone):
    """Each table entry builds (random init, no download) on a 64 px input and gives a map."""
    from captioning.encoder import build_encoder, make_forward

    spec = EncoderSpec(backbone=backbone, weights="none", image_size=64, seed=0)
    spatial, pooled = make_forward(*build_encoder(spec))(np.zeros((1, 64, 64, 3), np.uint8))
    assert spatial.shape[:2] == (1, 4) and pooled.shape == (1, spatial.shape[2])  # 64 px / 32 = a 2x2 map


def test_flip_adds_each_images_mirror_image_next_to_it(tmp_path, shapes_dir):
    from captioning.encoder import build_encoder, make_forward, with_mirrors
    from captioning.images import load_image

    keys = keys_of(shapes_dir)[:3]
    extract_features(SPEC, shapes_dir / "images", with_mirrors(keys), tmp_path / "f.h5", batch_size=4, progress=False)
    store = FeatureStore(tmp_path / "f.h5")
    assert store.keys == [keys[0], keys[0] + "#flip", keys[1], keys[1] + "#flip", keys[2], keys[2] + "#flip"]
    assert store.mirrored(keys) and not FeatureStore(tmp_path / "f.h5").mirrored(keys + ["other.png"])
    image = load_image(shapes_dir / "images" / keys[1], 32, dtype=np.uint8)
    forward = make_forward(*build_encoder(SPEC))
    want = forward(np.stack([image, image[:, ::-1]]))[0].numpy()
    got = store.load([keys[1], keys[1] + "#flip"])
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-2)
    assert not np.allclose(got[0], got[1], atol=1e-2)


def test_the_seed_names_another_network_only_for_a_random_init():
    random = EncoderSpec(backbone="vgg16", weights="none", image_size=32, seed=1)
    assert not random.same_network(EncoderSpec(backbone="vgg16", weights="none", image_size=32, seed=2))
    trained = EncoderSpec(backbone="vgg16", weights="imagenet", image_size=32, seed=1)
    assert trained.same_network(EncoderSpec(backbone="vgg16", weights="imagenet", image_size=32, seed=2))
    file = EncoderSpec(backbone="cnn.keras", weights="none", image_size=32, seed=1, file_hash="ab")
    assert file.same_network(EncoderSpec(backbone="cnn.keras", weights="none", image_size=32, seed=2, file_hash="ab"))
    assert not file.same_network(
        EncoderSpec(backbone="cnn.keras", weights="none", image_size=32, seed=2, file_hash="cd")
    )
