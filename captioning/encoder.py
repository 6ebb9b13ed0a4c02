"""CNN encoders (Keras applications without their classifier, or any Keras model file) and
the extraction of every image's features into the features file (its layout:
:mod:`captioning.feature_store`).

Rows are written in place into ``<out>.partial.h5`` as they are computed (memory holds one
chunk), a rerun resumes after the last finished chunk, and the file appears at ``out`` only
when complete. ``--shard I/N`` files hold a contiguous slice of the keys, and
:func:`captioning.feature_store.merge_shards` joins them into the same bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import NamedTuple

import h5py
import numpy as np

from .errors import CaptioningError
from .feature_store import (
    BACKBONES,
    FLIP_SUFFIX,
    MODEL_FILE_SUFFIX,
    EncoderSpec,
    copy_rows,
    create_layout,
    is_model_file,
    seal,
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
        base = _at_size(base, spec.image_size, path)
    return _feature_model(base, spec, path)


def _at_size(model, size: int, path):
    """``model`` rebuilt for ``size`` x ``size`` inputs with the same weights. A convolutional
    network runs at any size; a larger one gives a finer feature map (224 -> 7x7, 320 -> 10x10)."""
    config = model.get_config()
    _set_input_size(config, size)
    try:
        resized = model.__class__.from_config(config)
        resized.set_weights(model.get_weights())
        if tuple(resized.inputs[0].shape[1:3]) != (size, size):
            raise ValueError("its input size is not in its config")
    except (ValueError, TypeError) as e:
        shape = tuple(model.inputs[0].shape[1:3])
        raise CaptioningError(
            f"{path}: takes {shape[0]}x{shape[1]} images and cannot be rebuilt for {size}x{size}"
            f" ({str(e).splitlines()[0]}); set features.image_size to {shape[0]}"
        ) from None
    return resized


def _set_input_size(config: dict, size: int):
    """Every input layer of a functional model's config, nested models' included, to size x size."""
    for layer in config.get("layers", []):
        if layer["class_name"] == "InputLayer":
            shape = layer["config"]["batch_shape"]
            layer["config"]["batch_shape"] = [shape[0], size, size, *shape[3:]]
        elif isinstance(layer.get("config"), dict) and "layers" in layer["config"]:
            _set_input_size(layer["config"], size)


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


def _extraction_id(spec: EncoderSpec, keys, batch_size, dtype) -> str:
    """Identity of an extraction (what resuming its partial file needs to match)."""
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
    (:func:`shard_range`); :func:`captioning.feature_store.merge_shards` joins the shard files. Returns the report dict.
    """
    out = Path(out)
    keys = list(keys)
    if not keys:
        raise CaptioningError("no images to encode")
    total = len(keys)
    if shard is not None:
        lo, hi = shard_range(total, shard)
        keys = keys[lo:hi]
        if not keys:
            raise CaptioningError(f"shard {shard[0]}/{shard[1]} of {total} images is empty: use fewer shards")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial, ledger = out.with_name(out.name + ".partial.h5"), out.with_name(out.name + ".partial.json")
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)  # older versions' chunk folder
    job = _Job(spec, Path(image_dir), keys, batch_size, dtype, batch_size * chunk_batches, shard)
    state = _resume_state(partial, ledger, _extraction_id(spec, keys, batch_size, dtype))
    # Decoding shares the cores with the CNN: one thread per two cores kept it fed best here
    # (2 cores: 1 thread 92 img/s, 2 threads 89 img/s on 500x375 JPEGs).
    threads = decode_threads or max(1, (os.cpu_count() or 2) // 2)
    n_new, elapsed = _encode(job, partial, ledger, state, threads, progress, on_chunk)
    skipped = _complete(job, partial, ledger, state, out, max_bad_fraction)
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


class _Job(NamedTuple):
    spec: EncoderSpec
    image_dir: Path
    keys: list
    batch_size: int
    dtype: str
    chunk: int  # images per chunk (the unit of resuming)
    shard: tuple | None

    @property
    def n_chunks(self):
        return (len(self.keys) + self.chunk - 1) // self.chunk


def _encode(job: _Job, partial, ledger, state, threads, progress, on_chunk):
    """Encode the chunks ``state`` has not done into ``partial``, recording each in ``ledger``
    once its rows are on disk. Returns ``(images encoded, seconds)`` (model building excluded)."""
    from tqdm import tqdm

    todo = [c for c in range(job.n_chunks) if c not in state["done"]]
    if not todo:
        return 0, 0.0
    spec, keys, size = job.spec, job.keys, job.batch_size
    forward = make_forward(*build_encoder(spec))
    s, _ = forward(np.zeros((size, spec.image_size, spec.image_size, 3), np.uint8))  # trace once
    if not state["done"]:
        # One shard is the whole file: no shard attributes, so its bytes are the merged file's
        # (DVC then stores one copy of the two).
        multi = job.shard is not None and job.shard[1] > 1
        shard_attrs = {"shard_index": job.shard[0], "shard_count": job.shard[1]} if multi else {}
        create_layout(partial, keys, s.shape[1:], job.dtype, {**spec.attrs(), **shard_attrs})
    t0, n_new = time.perf_counter(), 0
    # One pipeline over the remaining chunks (they start on batch boundaries, so the batches are
    # the same as in an uninterrupted run).
    todo_keys = [k for c in todo for k in keys[c * job.chunk : (c + 1) * job.chunk]]
    batches = _image_batches([job.image_dir / k for k in todo_keys], spec.image_size, size, threads)
    bar = tqdm(total=len(keys), initial=len(keys) - len(todo_keys), unit="img", desc="features", disable=not progress)
    with h5py.File(partial, "r+") as f:
        for c in todo:
            row = c * job.chunk
            for _ in range((min(job.chunk, len(keys) - row) + size - 1) // size):
                images, errs = next(batches)
                s, p = forward(images)
                f["spatial"][row : row + len(images)] = s.numpy().astype(job.dtype)
                f["pooled"][row : row + len(images)] = p.numpy().astype(job.dtype)
                state["errors"].update({str(row + i): e for i, e in enumerate(errs) if e})
                row += len(images)
                bar.update(len(images))
            f.flush()  # the chunk's rows are on disk before the ledger says so
            state["done"].append(c)
            write_json(ledger, state, indent=None)
            n_new += row - c * job.chunk
            if on_chunk:
                on_chunk(c)
    bar.close()
    return n_new, time.perf_counter() - t0


def _complete(job: _Job, partial, ledger, state, out, max_bad_fraction):
    """Seal the finished ``partial`` file and move it to ``out`` (the unreadable images' rows
    dropped); the skipped images, or an error when there are too many."""
    keys = job.keys
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
            copy_rows(tmp, [(partial, np.array([i for i in range(len(keys)) if i not in bad], dtype=np.int64))])
        partial.unlink()
    else:
        with h5py.File(partial, "r+") as f:
            seal(f)
        with atomic_path(out) as tmp:
            os.replace(partial, tmp)
    ledger.unlink()
    return skipped


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
