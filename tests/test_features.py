"""Feature extraction into HDF5: shapes and attributes, skips, and resume after SIGKILL."""

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
    assert rep["images"] == 24 and rep["skipped"] == [] and not (tmp_path / "f.h5.partial").exists()
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
# slow each chunk down so the parent can kill us part-way, deterministically
extract_features(spec, {images!r}, keys, {out!r}, batch_size=2, chunk_batches=1, progress=False,
                 on_chunk=lambda c: time.sleep(0.3))
"""


def test_sigkill_leaves_no_output_and_rerun_resumes_to_identical_file(tmp_path, shapes_dir):
    keys = keys_of(shapes_dir)
    images, out = str(shapes_dir / "images"), tmp_path / "killed.h5"
    script = KILLABLE.format(spec=SPEC.__dict__, keys=keys, images=images, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    partial = tmp_path / "killed.h5.partial"
    deadline = time.time() + 120
    while len(list(partial.glob("chunk-*.h5"))) < 3 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(partial.glob("chunk-*.h5")))
    assert 3 <= done_before < 12, "the run should have been killed part-way"
    assert not out.exists()  # nothing at the declared output path

    rep = extract_features(SPEC, images, keys, out, batch_size=2, chunk_batches=1, progress=False)
    assert rep["resumed_images"] == 2 * done_before and rep["encoded_images"] == 24 - 2 * done_before
    extract_features(SPEC, images, keys, tmp_path / "clean.h5", batch_size=2, chunk_batches=1, progress=False)
    with h5py.File(out) as a, h5py.File(tmp_path / "clean.h5") as b:
        for name in ("spatial", "pooled"):
            np.testing.assert_array_equal(a[name][:], b[name][:])
        assert list(a["images"].asstr()[:]) == list(b["images"].asstr()[:])
        assert dict(a.attrs).keys() == dict(b.attrs).keys()
    assert not partial.exists()


def test_stale_partial_work_from_other_settings_is_discarded(tmp_path, shapes_dir):
    keys = keys_of(shapes_dir)[:4]
    partial = tmp_path / "f.h5.partial"
    partial.mkdir()
    (partial / "fingerprint").write_text("other settings")
    (partial / "chunk-00000.h5").write_bytes(b"junk")
    rep = extract_features(SPEC, shapes_dir / "images", keys, tmp_path / "f.h5", batch_size=4, progress=False)
    assert rep["resumed_images"] == 0 and rep["images"] == 4
