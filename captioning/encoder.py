"""CNN encoders (Keras applications without their classifier) and HDF5 feature files.

The features file holds, for every image (row ``i`` belongs to ``images[i]``):

- ``spatial``: ``(N, H*W, C)`` the chosen layer's feature map, flattened for attention;
- ``pooled``:  ``(N, C)`` its spatial mean;
- ``images``:  ``(N,)`` the image keys (paths relative to the image folder);

with the encoder's settings as file attributes, so the captioning command can rebuild the
very same encoder, and ``content_hash`` (blake2b of the feature bytes), which identifies the
features without reading them. Rows are written in place into ``<out>.partial.h5`` as they
are computed (memory holds one chunk), a rerun resumes after the last finished chunk, and
the file appears at ``out`` only when complete. ``--shard I/N`` files hold a contiguous slice
of the keys and :func:`merge_shards` joins them into the same bytes. Reading it back is
:mod:`captioning.feature_store`'s job.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import CaptioningError
from .feature_store import (
    BACKBONES,
    FLIP_SUFFIX,
    MODEL_FILE_SUFFIX,
    EncoderSpec,
    hash_features,
    is_model_file,
    square_grid,
)
from .files import atomic_path, write_json
from .images import ImageError, load_image


def build_encoder(spec: EncoderSpec):
    """``(model, preprocess)``: image batch (B, S, S, 3) in 0..255 -> feature map (B, h, w, C)."""
    import keras

    if is_model_file(spec.backbone):
        return load_model_file(spec), preprocess_for(spec)
    preprocess = preprocess_for(spec)  # checks the backbone's name too
    ctor = getattr(keras.applications, BACKBONES[spec.backbone][0])
    if spec.weights == "none":
        weights = None
        keras.utils.set_random_seed(spec.seed)  # random init, reproducible from the seed
    elif spec.weights == "imagenet":
        weights = "imagenet"  # Keras downloads and caches these (needs network once)
    else:
        weights = spec.weights
        if not Path(weights).is_file():
            raise CaptioningError(f"{weights}: encoder weights file not found")
    kwargs = {"alpha": spec.alpha} if spec.backbone == "mobilenet" else {}
    try:
        base = ctor(include_top=False, weights=weights, input_shape=(spec.image_size, spec.image_size, 3), **kwargs)
    except ValueError as e:
        raise CaptioningError(f"cannot build {spec.backbone} with image_size={spec.image_size}: {e}") from None
    except OSError as e:
        raise CaptioningError(f"{weights}: cannot load encoder weights: {e}") from None
    return _feature_model(base, spec, spec.backbone), preprocess


def _feature_model(base, spec: EncoderSpec, name):
    """``base`` cut at ``spec``'s layer ("" = its output), checked to give a (B, h, w, C) map."""
    import keras

    try:
        out = base.get_layer(spec.resolved_layer()).output if spec.resolved_layer() else base.outputs[0]
    except ValueError:
        raise CaptioningError(f"{name} has no layer named {spec.resolved_layer()!r}") from None
    if len(out.shape) != 4:
        where = f"layer {spec.resolved_layer()!r}" if spec.resolved_layer() else "output"
        raise CaptioningError(
            f"{name}: its {where} has shape {tuple(out.shape)}, not a (batch, height, width, channels) feature map"
            " (features.layer picks an inner layer)"
        )
    return keras.Model(base.inputs[0], out, name=f"{Path(name).stem}_encoder")


def model_file_hash(path) -> str:
    """sha256 of a model file's bytes (recorded in the spec: a different file is a different encoder)."""
    import hashlib

    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except FileNotFoundError:
        raise CaptioningError(f"{path}: encoder model file not found") from None
    return h.hexdigest()


def make_spec(backbone, weights, layer, image_size, alpha, seed) -> EncoderSpec:
    """The spec for these settings; a model file's content hash is read now."""
    file_hash = model_file_hash(backbone) if is_model_file(backbone) else ""
    return EncoderSpec(backbone, weights, layer, image_size, alpha, seed, file_hash)


def load_model_file(spec: EncoderSpec):
    """The CNN of a ``.keras`` file (Keras safe mode: no code runs from the file), cut at
    ``spec.layer``. Its own first layers do any input scaling: it takes RGB 0..255."""
    path = spec.backbone
    if spec.weights != "none":
        raise CaptioningError(f"{path}: a model file holds its own weights; set features.weights to none")
    if spec.file_hash and model_file_hash(path) != spec.file_hash:
        raise CaptioningError(f"{path}: not the file these features were made with (its sha256 differs)")
    base = load_encoder_file(path)
    shape = tuple(base.inputs[0].shape[1:])
    if len(shape) != 3 or shape[-1] not in (None, 3):
        raise CaptioningError(f"{path}: takes inputs of shape {shape}, not (height, width, 3) RGB images")
    if shape[:2] not in ((None, None), (spec.image_size, spec.image_size)):
        raise CaptioningError(f"{path}: takes {shape[0]}x{shape[1]} images; set features.image_size to {shape[0]}")
    return _feature_model(base, spec, path)


def load_encoder_file(path):
    """A Keras model file's network (Keras safe mode: no code runs from the file)."""
    import keras

    if not Path(path).is_file():
        raise CaptioningError(f"{path}: encoder model file not found")
    try:
        return keras.saving.load_model(path, safe_mode=True, compile=False)
    except (ValueError, OSError, TypeError) as e:
        raise CaptioningError(f"{path}: not a Keras model this version can load ({e})") from None


def preprocess_for(spec: EncoderSpec):
    """The backbone's own input scaling (Keras applications' ``preprocess_input``); none for a
    model file, which scales its input itself."""
    import keras

    if is_model_file(spec.backbone):
        return lambda x: x
    if spec.backbone not in BACKBONES:
        raise CaptioningError(
            f"unknown backbone {spec.backbone!r}"
            f" (expected one of {', '.join(BACKBONES)}, or a {MODEL_FILE_SUFFIX} file)"
        )
    return getattr(keras.applications, BACKBONES[spec.backbone][1]).preprocess_input


def make_forward(model, preprocess):
    """A compiled forward function: uint8 RGB batch -> (spatial (B, h*w, C), pooled (B, C))."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(images):  # (B, S, S, 3) uint8 (4x less to move than float32)
        fmap = model(preprocess(tf.cast(images, tf.float32)), training=False)  # (B, h, w, C)
        b, h, w, c = tf.unstack(tf.shape(fmap))
        spatial = tf.reshape(fmap, (b, h * w, c))  # (B, L, C)
        return spatial, tf.reduce_mean(spatial, axis=1)

    return forward


def _decode(path, size):
    """``(image (S, S, 3) uint8, error)``: a bad image is a zero image and its reason. A path
    ending in FLIP_SUFFIX is the mirror image (left and right swapped) of the file before it."""
    path, flip = str(path), str(path).endswith(FLIP_SUFFIX)
    try:
        image = load_image(path[: -len(FLIP_SUFFIX)] if flip else path, size, dtype=np.uint8)
        return (image[:, ::-1] if flip else image), ""
    except ImageError as e:
        return np.zeros((size, size, 3), np.uint8), str(e)


def with_mirrors(keys) -> list:
    """``[k0, k0#flip, k1, k1#flip, ...]``: each image then its mirror image, next to it, so a
    shard (a contiguous slice of the keys) holds both of its images' rows."""
    return [k for key in keys for k in (key, key + FLIP_SUFFIX)]


def _image_batches(paths, size, batch_size, threads=2, ahead=3):
    """Yield ``(images (B, S, S, 3) uint8, errors [B])`` in order, decoded ``ahead`` batches early.

    PIL decodes and resizes in worker threads (it releases the GIL), so the next batches are
    ready while the CNN runs on the current one; one corrupt file never stops the run.
    """
    from concurrent.futures import ThreadPoolExecutor

    starts = list(range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") as pool:
        pending = []
        for i in range(len(starts) + ahead):
            if i < len(starts):
                chunk = paths[starts[i] : starts[i] + batch_size]
                pending.append([pool.submit(_decode, p, size) for p in chunk])
            if i >= ahead:
                done = [f.result() for f in pending.pop(0)]
                yield np.stack([img for img, _ in done]), [err for _, err in done]


def _fingerprint(spec: EncoderSpec, keys, batch_size, dtype) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps([spec.attrs(), batch_size, dtype], sort_keys=True).encode())
    for k in keys:
        h.update(k.encode() + b"\0")
    return h.hexdigest()


def shard_range(n_keys: int, shard: tuple) -> tuple:
    """``(lo, hi)``: the keys of shard ``(i, n)``, a contiguous slice of the key order (the stable
    rule: shards concatenated in order are the unsharded key list)."""
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise CaptioningError(f"shard {i}/{n}: expected 0 <= I < N")
    return n_keys * i // n, n_keys * (i + 1) // n


def extract_features(
    spec: EncoderSpec,
    image_dir,
    keys,
    out,
    batch_size=32,
    dtype="float16",
    chunk_batches=8,
    max_bad_fraction=0.01,
    progress=True,
    on_chunk=None,
    decode_threads=None,
    shard=None,
):
    """Encode every image in ``keys`` (paths under ``image_dir``) into the HDF5 file ``out``.

    Rows are written straight into ``<out>.partial.h5``, a file of the final layout sized for
    every key up front, ``chunk_batches`` batches at a time; memory holds one chunk, whatever
    the number of images. ``<out>.partial.json`` records the finished chunks, so a rerun with
    the same settings resumes after the last one and gives the file an uninterrupted run
    would. The file is renamed to ``out`` only when complete. Unreadable images are skipped
    and listed in the report (their rows are dropped on completion); more than
    ``max_bad_fraction`` of them is an error. ``shard=(i, n)`` encodes only shard i of n
    (:func:`shard_range`); :func:`merge_shards` joins the shard files. Returns the report dict.
    """
    from tqdm import tqdm

    out = Path(out)
    keys = list(keys)
    if not keys:
        raise CaptioningError("no images to encode")
    # Decoding shares the cores with the CNN: one thread per two cores kept it fed best here
    # (2 cores: 1 thread 92 img/s, 2 threads 89 img/s on 500x375 JPEGs).
    decode_threads = decode_threads or max(1, (os.cpu_count() or 2) // 2)
    total = len(keys)
    if shard is not None:
        lo, hi = shard_range(total, shard)
        keys = keys[lo:hi]
        if not keys:
            raise CaptioningError(f"shard {shard[0]}/{shard[1]} of {total} images is empty: use fewer shards")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, ledger = out.with_name(out.name + ".partial.h5"), out.with_name(out.name + ".partial.json")
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # older versions' chunk folder
    fp = _fingerprint(spec, keys, batch_size, dtype)
    chunk = batch_size * chunk_batches
    n_chunks = (len(keys) + chunk - 1) // chunk

    state = _resume_state(partial, ledger, fp)
    todo = [c for c in range(n_chunks) if c not in state["done"]]
    n_new, elapsed = 0, 0.0
    if todo:
        model, preprocess = build_encoder(spec)
        forward = make_forward(model, preprocess)
        s, _ = forward(np.zeros((batch_size, spec.image_size, spec.image_size, 3), np.uint8))  # trace once
        if not state["done"]:
            # One shard is the whole file: no shard attributes, so its bytes are the merged file's
            # (DVC then stores one copy of the two).
            multi = shard is not None and shard[1] > 1
            shard_attrs = {"shard_index": shard[0], "shard_count": shard[1]} if multi else {}
            create_layout(partial, keys, s.shape[1:], dtype, {**spec.attrs(), **shard_attrs})
        t0 = time.perf_counter()  # the rate below is the steady state: model building excluded
        # One pipeline over the remaining chunks (they start on batch boundaries, so the
        # batches are the same as in an uninterrupted run).
        todo_keys = [k for c in todo for k in keys[c * chunk : (c + 1) * chunk]]
        batches = _image_batches([Path(image_dir) / k for k in todo_keys], spec.image_size, batch_size, decode_threads)
        bar = tqdm(
            total=len(keys), initial=len(keys) - len(todo_keys), unit="img", desc="features", disable=not progress
        )
        with h5py.File(partial, "r+") as f:
            for c in todo:
                row = c * chunk
                for _ in range((min(chunk, len(keys) - row) + batch_size - 1) // batch_size):
                    images, errs = next(batches)
                    s, p = forward(images)
                    n = len(images)
                    f["spatial"][row : row + n] = s.numpy().astype(dtype)
                    f["pooled"][row : row + n] = p.numpy().astype(dtype)
                    state["errors"].update({str(row + i): e for i, e in enumerate(errs) if e})
                    row += n
                    bar.update(n)
                f.flush()  # the chunk's rows are on disk before the ledger says so
                state["done"].append(c)
                write_json(ledger, state, indent=None)
                n_new += row - c * chunk
                if on_chunk:
                    on_chunk(c)
        bar.close()
        elapsed = time.perf_counter() - t0
    bad = {int(i): e for i, e in state["errors"].items()}
    skipped = [{"image": keys[i], "error": bad[i]} for i in sorted(bad)]
    if len(skipped) > max_bad_fraction * len(keys):
        first = skipped[0]
        raise CaptioningError(
            f"{len(skipped)} of {len(keys)} images could not be read (first: {first['image']}: {first['error']});"
            f" more than max_bad_fraction={max_bad_fraction}"
        )
    if bad:  # rare: copy the good rows into a fresh file of the same layout
        with atomic_path(out) as tmp:
            _copy_rows(tmp, [(partial, np.array([i for i in range(len(keys)) if i not in bad], dtype=np.int64))])
        partial.unlink()
    else:
        with h5py.File(partial, "r+") as f:
            _seal(f)
        with atomic_path(out) as tmp:
            os.replace(partial, tmp)
    ledger.unlink()
    with h5py.File(out, "r") as f:
        shape = f["spatial"].shape
    return {
        "images": shape[0],
        "skipped": skipped,
        "spatial_shape": list(shape),
        "pooled_shape": [shape[0], shape[2]],
        "resumed_images": len(keys) - n_new,
        "encoded_images": n_new,
        "seconds": round(elapsed, 2),
        "images_per_second": round(n_new / elapsed, 2) if n_new and elapsed > 0 else None,
        **({"shard": list(shard), "total_images": total} if shard is not None else {}),
    }


def _resume_state(partial, ledger, fingerprint):
    """The ledger of finished chunks when it and the partial file belong to this run; else a fresh one."""
    try:
        state = json.loads(ledger.read_text())
        if state.get("fingerprint") == fingerprint and state["done"]:
            with h5py.File(partial, "r"):  # still opens: its metadata was never touched after creation
                return state
    except (OSError, ValueError, KeyError):
        pass
    for p in (partial, ledger):  # another run's work, or none
        p.unlink(missing_ok=True)
    return {"fingerprint": fingerprint, "done": [], "errors": {}}


def create_layout(path, keys, item_shape, dtype, attrs):
    """A features file with every dataset sized and allocated up front: ``images``, then
    ``spatial`` (N, L, C) and ``pooled`` (N, C), contiguous (a row is one seek), and the
    encoder's attributes.

    Writing rows later changes no HDF5 metadata, so a run killed mid-write leaves a file that
    still opens; no timestamps are stored, so the same rows give the same bytes, whichever
    way they were written (one run, a resumed run, or shards merged).
    """
    L, C = item_shape
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=np.array(keys, dtype=object), dtype=h5py.string_dtype(), track_times=False)
        f.create_dataset("spatial", shape=(len(keys), L, C), dtype=dtype, dcpl=dcpl, track_times=False)
        f.create_dataset("pooled", shape=(len(keys), C), dtype=dtype, dcpl=dcpl, track_times=False)
        for k, v in sorted({**attrs, "grid": square_grid(L), "feature_dim": C, "dtype": str(np.dtype(dtype))}.items()):
            f.attrs[k] = v


def _seal(f):
    """The last write: ``content_hash``, which names the features without reading them."""
    f.attrs["content_hash"] = hash_features(f["spatial"], f["pooled"])


def _copy_rows(path, sources, merge=False, block=1024):
    """Write ``path`` from ``[(file, rows)]``: those rows of each file, in order, ``block`` at a time.

    ``merge``: the sources are shards and ``path`` is the whole file (no shard attributes)."""
    keys, first = [], None
    for src, rows in sources:
        with h5py.File(src, "r") as f:
            keys += f["images"].asstr()[:][rows].tolist()
            first = first or (f["spatial"].shape[1:], f["spatial"].dtype, dict(f.attrs))
    item, dtype, attrs = first
    derived = ("content_hash", "grid", "feature_dim", "dtype")  # create_layout and _seal set these
    attrs = {k: v for k, v in attrs.items() if k not in derived + (SHARD_ATTRS if merge else ())}
    create_layout(path, keys, item, dtype, attrs)
    with h5py.File(path, "r+") as dst:
        at = 0
        for src, rows in sources:
            with h5py.File(src, "r") as f:
                for i in range(0, len(rows), block):
                    r = rows[i : i + block]
                    lo, hi = int(r[0]), int(r[-1]) + 1  # one read of the span, then the wanted rows
                    dst["spatial"][at : at + len(r)] = f["spatial"][lo:hi][r - lo]
                    dst["pooled"][at : at + len(r)] = f["pooled"][lo:hi][r - lo]
                    at += len(r)
        _seal(dst)


def merge_shards(shards, out):
    """Join shard files (``features --shard I/N``, given in order 0..N-1) into the one features
    file ``out``: the same bytes as an unsharded run over the same keys. Checks that every
    shard is there once and that all come from the same encoder settings."""
    metas = []
    for path in shards:
        try:
            with h5py.File(path, "r") as f:
                metas.append((path, dict(f.attrs), len(f["images"])))
        except (OSError, KeyError) as e:
            raise CaptioningError(f"{path}: not a features shard ({e})") from None
    if not metas:
        raise CaptioningError("no shards to merge")
    counts = {int(m[1].get("shard_count", 1)) for m in metas}  # no attributes: a whole file, shard 0/1
    n = counts.pop() if len(counts) == 1 else -1
    indices = [int(m[1].get("shard_index", 0)) for m in metas]
    if n < 1 or indices != list(range(n)):
        have = ", ".join(f"{m[0]} = {m[1].get('shard_index', '?')}/{m[1].get('shard_count', '?')}" for m in metas)
        missing = sorted(set(range(max(n, 1))) - set(indices))
        raise CaptioningError(
            f"shards must be 0..N-1 of one N, in order; got {have}" + (f" (missing: {missing})" if missing else "")
        )
    spec = {k: v for k, v in metas[0][1].items() if k not in SHARD_ATTRS}
    for path, attrs, _ in metas[1:]:
        other = {k: v for k, v in attrs.items() if k not in SHARD_ATTRS}
        if json.dumps(other, sort_keys=True, default=str) != json.dumps(spec, sort_keys=True, default=str):
            raise CaptioningError(f"{path}: made with other encoder settings than {metas[0][0]}")
    with atomic_path(out) as tmp:
        if n == 1:  # already the merged file, byte for byte
            shutil.copyfile(metas[0][0], tmp)
        else:
            _copy_rows(tmp, [(path, np.arange(rows, dtype=np.int64)) for path, _, rows in metas], merge=True)
    return sum(m[2] for m in metas)


SHARD_ATTRS = ("shard_index", "shard_count", "content_hash")
