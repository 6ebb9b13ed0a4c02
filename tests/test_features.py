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
    from captioning.encoder import _fingerprint

    keys = keys_of(shapes_dir)[:4]
    images = shapes_dir / "images"
    clean = extract_features(SPEC, images, keys, tmp_path / "clean.h5", batch_size=4, progress=False)
    assert clean["resumed_images"] == 0
    cases = {
        "other.h5": ({"fingerprint": "other settings", "done": [0], "errors": {}}, None),  # another run's work
        "junk.h5": ({"fingerprint": _fingerprint(SPEC, keys, 4, "float16"), "done": [0], "errors": {}}, b"junk"),
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
    from captioning.encoder import merge_shards, shard_range

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
    if n > 1:  # the copy through _copy_rows gives the same bytes as a single shard's file
        from captioning.encoder import _copy_rows

        _copy_rows(tmp_path / "copied.h5", [(tmp_path / "whole.h5", np.arange(24))])
        assert (tmp_path / "copied.h5").read_bytes() == (tmp_path / "whole.h5").read_bytes()


def test_merge_refuses_missing_reordered_or_foreign_shards(tmp_path, shapes_dir):
    from captioning.encoder import merge_shards

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
