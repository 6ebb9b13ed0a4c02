"""CNN encoders (Keras applications without their classifier) and HDF5 feature files.

The features file holds, for every image (row ``i`` belongs to ``images[i]``):

- ``spatial``: ``(N, H*W, C)`` the chosen layer's feature map, flattened for attention;
- ``pooled``:  ``(N, C)`` its spatial mean;
- ``images``:  ``(N,)`` the image keys (paths relative to the image folder);

with the encoder's settings as file attributes, so the captioning command can rebuild the
very same encoder. Extraction is resumable: finished chunks are kept in ``<out>.partial/``
and reused after an interruption; the final file appears only when complete. Reading the
file back is :mod:`captioning.feature_store`'s job.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import CaptioningError
from .feature_store import BACKBONES, EncoderSpec, square_grid
from .files import atomic_path
from .images import ImageError, load_image


def build_encoder(spec: EncoderSpec):
    """``(model, preprocess)``: image batch (B, S, S, 3) in 0..255 -> feature map (B, h, w, C)."""
    import keras

    if spec.backbone not in BACKBONES:
        raise CaptioningError(f"unknown backbone {spec.backbone!r} (expected one of {', '.join(BACKBONES)})")
    ctor_name, module_name, _ = BACKBONES[spec.backbone]
    ctor = getattr(keras.applications, ctor_name)
    preprocess = getattr(keras.applications, module_name).preprocess_input
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
    try:
        out = base.get_layer(spec.resolved_layer()).output
    except ValueError:
        raise CaptioningError(f"{spec.backbone} has no layer named {spec.resolved_layer()!r}") from None
    return keras.Model(base.input, out, name=f"{spec.backbone}_encoder"), preprocess


def make_forward(model, preprocess):
    """A compiled forward function: uint8-range RGB batch -> (spatial (B, h*w, C), pooled (B, C))."""
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def forward(images):  # (B, S, S, 3) float32
        fmap = model(preprocess(images), training=False)  # (B, h, w, C)
        b, h, w, c = tf.unstack(tf.shape(fmap))
        spatial = tf.reshape(fmap, (b, h * w, c))  # (B, L, C)
        return spatial, tf.reduce_mean(spatial, axis=1)

    return forward


def _image_batches(paths, size, batch_size):
    """tf.data pipeline: decode + resize in parallel (PIL in worker threads), batched, prefetched.

    Yields ``(images (B, S, S, 3), ok (B,), error (B,))``; a bad image is a zero image with
    ``ok=False`` and its reason, so one corrupt file never stops the pipeline.
    """
    import tensorflow as tf

    paths = [str(p) for p in paths]

    def decode(i):
        try:
            return load_image(paths[int(i)], size), True, b""
        except ImageError as e:
            return np.zeros((size, size, 3), np.float32), False, str(e).encode()

    def tf_decode(i):
        img, ok, err = tf.numpy_function(decode, [i], [tf.float32, tf.bool, tf.string], stateful=False)
        img.set_shape((size, size, 3))
        ok.set_shape(())
        err.set_shape(())
        return img, ok, err

    ds = tf.data.Dataset.range(len(paths))
    ds = ds.map(tf_decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size).prefetch(2)


def _fingerprint(spec: EncoderSpec, keys, batch_size, dtype) -> str:
    import hashlib

    h = hashlib.sha256(json.dumps([spec.attrs(), batch_size, dtype], sort_keys=True).encode())
    for k in keys:
        h.update(k.encode() + b"\0")
    return h.hexdigest()


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
):
    """Encode every image in ``keys`` (paths under ``image_dir``) into the HDF5 file ``out``.

    Work is saved in chunks of ``chunk_batches`` batches under ``<out>.partial/``; a rerun with
    the same settings resumes from them and produces the same file an uninterrupted run
    would. Unreadable images are skipped and returned in the report; more than
    ``max_bad_fraction`` of them is an error. Returns the report dict.
    """
    from tqdm import tqdm

    out = Path(out)
    keys = list(keys)
    if not keys:
        raise CaptioningError("no images to encode")
    partial = out.with_name(out.name + ".partial")
    fp = _fingerprint(spec, keys, batch_size, dtype)
    chunk = batch_size * chunk_batches
    n_chunks = (len(keys) + chunk - 1) // chunk

    done = set()
    if partial.is_dir():
        marker = partial / "fingerprint"
        if marker.is_file() and marker.read_text() == fp:
            for p in partial.glob("chunk-*.h5"):
                done.add(int(p.stem.split("-")[1]))
        else:
            shutil.rmtree(partial)  # stale work from other settings or images
    partial.mkdir(parents=True, exist_ok=True)
    (partial / "fingerprint").write_text(fp)

    todo = [c for c in range(n_chunks) if c not in done]
    t0 = time.perf_counter()
    n_new = 0
    if todo:
        model, preprocess = build_encoder(spec)
        forward = make_forward(model, preprocess)
        # One pipeline over the remaining chunks (they start on batch boundaries, so the
        # batches are the same as in an uninterrupted run).
        todo_keys = [k for c in todo for k in keys[c * chunk : (c + 1) * chunk]]
        batches = iter(_image_batches([Path(image_dir) / k for k in todo_keys], spec.image_size, batch_size))
        bar = tqdm(
            total=len(keys), initial=len(keys) - len(todo_keys), unit="img", desc="features", disable=not progress
        )
        for c in todo:
            ck = keys[c * chunk : (c + 1) * chunk]
            spatial, pooled, oks, errs = [], [], [], []
            for _ in range((len(ck) + batch_size - 1) // batch_size):
                images, ok, err = next(batches)
                s, p = forward(images)
                spatial.append(s.numpy().astype(dtype))
                pooled.append(p.numpy().astype(dtype))
                oks.append(ok.numpy())
                errs.extend(e.decode() for e in err.numpy())
                bar.update(len(ok))
            _write_chunk(
                partial / f"chunk-{c:05d}.h5",
                ck,
                np.concatenate(spatial),
                np.concatenate(pooled),
                np.concatenate(oks),
                errs,
            )
            n_new += len(ck)
            if on_chunk:
                on_chunk(c)
        bar.close()
    elapsed = time.perf_counter() - t0

    report = _merge_chunks(partial, n_chunks, out, spec, max_bad_fraction, len(keys))
    shutil.rmtree(partial)
    report.update(
        resumed_images=len(keys) - n_new,
        encoded_images=n_new,
        seconds=round(elapsed, 2),
        images_per_second=round(n_new / elapsed, 2) if n_new and elapsed > 0 else None,
    )
    return report


def _write_chunk(path, keys, spatial, pooled, ok, errors):
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f["spatial"] = spatial
        f["pooled"] = pooled
        f["ok"] = ok
        f["images"] = np.array(keys, dtype=h5py.string_dtype())
        f["errors"] = np.array(errors, dtype=h5py.string_dtype())


def _merge_chunks(partial, n_chunks, out, spec, max_bad_fraction, n_total):
    """Join the chunk files into ``out``, one chunk in memory at a time.

    A first pass reads only the small ``ok``/``images``/``errors`` arrays (what was skipped,
    how many rows the file gets); the second copies each chunk's rows into pre-sized
    datasets, so peak memory is one chunk's, whatever the number of images.
    """
    skipped, keys, shape = [], [], None
    for c in range(n_chunks):
        with h5py.File(partial / f"chunk-{c:05d}.h5", "r") as f:
            ok = f["ok"][:]
            names = f["images"].asstr()[:]
            errs = f["errors"].asstr()[:]
            skipped += [{"image": k, "error": e} for k, e, o in zip(names, errs, ok) if not o]
            keys += names[ok].tolist()
            shape, dtype = f["spatial"].shape[1:], f["spatial"].dtype
    if len(skipped) > max_bad_fraction * n_total:
        first = skipped[0]
        raise CaptioningError(
            f"{len(skipped)} of {n_total} images could not be read (first: {first['image']}: {first['error']});"
            f" more than max_bad_fraction={max_bad_fraction}"
        )
    spatial_shape = (len(keys), *shape)
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
        spatial = f.create_dataset("spatial", shape=spatial_shape, dtype=dtype, chunks=(1, *shape))
        pooled = f.create_dataset("pooled", shape=(len(keys), shape[1]), dtype=dtype)
        f.create_dataset("images", data=np.array(keys, dtype=object), dtype=h5py.string_dtype())
        row = 0
        for c in range(n_chunks):
            with h5py.File(partial / f"chunk-{c:05d}.h5", "r") as part:
                ok = part["ok"][:]
                n = int(ok.sum())
                spatial[row : row + n] = part["spatial"][:][ok]
                pooled[row : row + n] = part["pooled"][:][ok]
                row += n
        for k, v in spec.attrs().items():
            f.attrs[k] = v
        f.attrs["grid"] = square_grid(shape[0])
        f.attrs["feature_dim"] = shape[1]
        f.attrs["dtype"] = str(dtype)
    return {
        "images": int(len(keys)),
        "skipped": skipped,
        "spatial_shape": list(spatial_shape),
        "pooled_shape": [len(keys), shape[1]],
    }
