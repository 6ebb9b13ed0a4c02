"""The features file: what it holds, which encoder made it (``EncoderSpec``), its layout
(created, sealed, rows copied, shards merged) and reading it back.

The file holds, for every image (row ``i`` belongs to ``images[i]``):

- ``spatial``: ``(N, H*W, C)`` the chosen layer's feature map, flattened for attention;
- ``pooled``:  ``(N, C)`` its spatial mean;
- ``images``:  ``(N,)`` the image keys (paths relative to the image folder; ``KEY#flip`` the
  mirror image of ``KEY``, with ``features.flip``);

with the encoder's settings as file attributes, so the captioning command can rebuild the very
same encoder, and ``content_hash`` (blake2b of the feature bytes), which identifies the features
without reading them. :func:`captioning.encoder.extract_features` fills it with a CNN. Kept apart
from the CNN code: training, evaluation and captioning read features without touching Keras
applications, so an edit to the encoder code reruns only the stages it can change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path

import h5py
import numpy as np

from .errors import CaptioningError
from .files import atomic_path

# backbone -> (keras.applications constructor, preprocess module, default feature layer; "" = the output)
BACKBONES = {
    "vgg16": ("VGG16", "vgg16", "block5_conv3"),
    "resnet50": ("ResNet50", "resnet50", "conv5_block3_out"),
    "resnet101": ("ResNet101", "resnet", "conv5_block3_out"),
    "inceptionv3": ("InceptionV3", "inception_v3", "mixed10"),
    "xception": ("Xception", "xception", "block14_sepconv2_act"),
    "mobilenet": ("MobileNet", "mobilenet", "conv_pw_13_relu"),
    "efficientnetv2s": ("EfficientNetV2S", "efficientnet_v2", "top_activation"),
    "efficientnetv2b0": ("EfficientNetV2B0", "efficientnet_v2", "top_activation"),
    "convnext_tiny": ("ConvNeXtTiny", "convnext", ""),  # "": the model's output (its final norm)
}
FLIP_SUFFIX = "#flip"  # the key of an image's mirror image (features.flip: augmentation for training)
MODEL_FILE_SUFFIX = ".keras"  # features.backbone may name such a file: any Keras CNN (see encoder.py)


def is_model_file(backbone: str) -> bool:
    """Whether ``backbone`` names a Keras model file rather than a built-in table entry."""
    return str(backbone).endswith(MODEL_FILE_SUFFIX)


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder exactly (stored as HDF5 attributes)."""

    backbone: str = "vgg16"  # a BACKBONES entry, or a path to a .keras model file
    weights: str = "none"  # "imagenet", "none" (random init from seed) or a weights file path
    layer: str = ""  # "" = the backbone's last convolutional block (a model file: its output)
    image_size: int = 224
    alpha: float = 1.0  # MobileNet width multiplier
    seed: int = 0
    file_hash: str = ""  # a model file's sha256: another file at the same path is another encoder

    def resolved_layer(self) -> str:
        if is_model_file(self.backbone):
            return self.layer
        return self.layer or BACKBONES[self.backbone][2]

    def attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer"] = self.resolved_layer()
        if not d["file_hash"]:  # a built-in backbone: nothing to record
            del d["file_hash"]
        return d

    def same_network(self, other: EncoderSpec) -> bool:
        """Whether the two specs build the same network: the seed counts only for a built-in
        backbone's random initialisation (``weights: none``)."""
        random = self.weights == "none" and not is_model_file(self.backbone)
        return self == other if random else dataclasses.replace(self, seed=0) == dataclasses.replace(other, seed=0)

    def describe(self) -> str:
        layer = self.resolved_layer() or "output"
        return f"{self.backbone} (layer {layer}, {self.image_size} px, weights {self.weights})"

    @classmethod
    def from_attrs(cls, attrs: dict) -> EncoderSpec:
        """The spec stored by :meth:`attrs` (in a features file or a model's config)."""
        return cls(**{f.name: attrs[f.name] for f in dataclasses.fields(cls) if f.name in attrs})


def square_grid(num_locations: int) -> tuple:
    """(rows, cols) of a flattened feature map: the CNNs here make square maps from square images."""
    side = int(round(num_locations**0.5))
    return side, num_locations // side


class FeatureStore:
    """Read a features file: ``store.spec``, ``store.index[key]``, ``store.rows(keys)``, ``store.load(keys)``."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            with h5py.File(self.path, "r") as f:
                self.keys = list(f["images"].asstr()[:])
                self.attrs = {
                    k: (v.item() if hasattr(v, "item") and np.ndim(v) == 0 else v) for k, v in f.attrs.items()
                }
                self.num_locations, self.feature_dim = f["spatial"].shape[1:]
        except (OSError, KeyError) as e:
            raise CaptioningError(f"{self.path}: not a features file ({e})") from None
        self.index = {k: i for i, k in enumerate(self.keys)}

    @property
    def spec(self) -> EncoderSpec:
        return EncoderSpec.from_attrs(self.attrs)

    def check_encoder(self, spec: EncoderSpec, model) -> None:
        """Refuse features of another CNN than ``model`` was trained on: a decoder reads any map
        with its channel count without an error, and captions noise."""
        if not self.spec.same_network(spec):
            theirs, its = self.spec.describe(), spec.describe()
            raise CaptioningError(f"{self.path}: features of {theirs}, but {model} was trained on those of {its}")

    def content_hash(self) -> str:
        """The hash of the feature bytes the features stage stored in the file, or (older files
        without one) computed now by streaming the file in blocks: never the whole file in RAM."""
        if not self.attrs.get("content_hash"):  # computed once, kept like the stored attribute
            with h5py.File(self.path, "r") as f:
                self.attrs["content_hash"] = hash_features(f["spatial"], f["pooled"])
        return str(self.attrs["content_hash"])

    def mirrored(self, keys) -> bool:
        """Whether the file also holds every one of ``keys``'s mirror images (``features.flip``)."""
        return all(k + FLIP_SUFFIX in self.index for k in keys)

    def rows(self, keys, pooled=False) -> FeatureRows:
        """The features of ``keys`` (in that order) as a :class:`FeatureRows`, read on demand."""
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise CaptioningError(f"{self.path}: no features for {len(missing)} images (first: {missing[0]})")
        return FeatureRows(self, np.array([self.index[k] for k in keys], dtype=np.int64), pooled)

    def load(self, keys, pooled=False):
        """``(len(keys), L, C)`` spatial features (or ``(len(keys), C)`` pooled) as float32, in RAM.

        For a handful of images (captioning, the gallery); whole splits go through :meth:`rows`.
        """
        with self.rows(keys, pooled) as rows:
            return rows[np.arange(len(rows))]


def hash_features(*datasets, block=1024) -> str:
    """blake2b over the datasets' shapes and bytes, read ``block`` rows at a time."""
    h = hashlib.blake2b(digest_size=16)
    for d in datasets:
        h.update(f"{d.shape}{d.dtype}".encode())
        for i in range(0, len(d), block):
            h.update(np.ascontiguousarray(d[i : i + block]).tobytes())
    return h.hexdigest()


class FeatureRows:
    """A split's feature rows, read from disk when indexed: ``rows[idx]`` -> float32 array.

    Stands in for the in-memory ``(N, L, C)`` array it replaces (``len``, ``shape``, integer,
    array and slice indexing), so training and beam search take either, and a split never has
    to fit in RAM. A read asks h5py for the sorted unique file rows, one slice per run of
    consecutive rows (block-shuffled batches read a few long runs; a random batch, one short
    read per row), then converts only those rows to float32. The HDF5 file stays open until
    :meth:`close` (or the end of a ``with`` block).
    """

    def __init__(self, store: FeatureStore, file_rows, pooled=False):
        self.store, self.file_rows = store, np.asarray(file_rows, dtype=np.int64)
        self.name = "pooled" if pooled else "spatial"
        item = (store.feature_dim,) if pooled else (store.num_locations, store.feature_dim)
        self.shape = (len(self.file_rows), *item)
        self._file = None

    def __len__(self):
        return len(self.file_rows)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def identity(self) -> str:
        """What these rows hold, without reading them: the file's content hash and the row list."""
        h = hashlib.blake2b(self.file_rows.tobytes(), digest_size=16)
        return f"{self.store.content_hash()}:{self.name}:{h.hexdigest()}"

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            idx = np.arange(len(self))[idx]
        scalar = np.ndim(idx) == 0
        rows = self.file_rows[np.atleast_1d(np.asarray(idx, dtype=np.int64))]
        out = self.read_file_rows(rows)
        return out[0] if scalar else out

    def read_file_rows(self, rows):
        """float32 features of file ``rows`` (any order, repeats allowed)."""
        if self._file is None:
            self._file = h5py.File(self.store.path, "r")
        dset = self._file[self.name]
        wanted, where = np.unique(rows, return_inverse=True)
        buf = np.empty((len(wanted), *dset.shape[1:]), dtype=dset.dtype)
        # One read per run of consecutive rows.
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        at = 0
        for run in np.split(wanted, breaks):
            dset.read_direct(buf, np.s_[run[0] : run[-1] + 1], np.s_[at : at + len(run)])
            at += len(run)
        in_order = len(where) == len(wanted) and bool(np.all(np.diff(where) == 1))
        return (buf if in_order else buf[where]).astype(np.float32, copy=False)


def feature_identity(features) -> str:
    """Identity of a feature array for a resume fingerprint: :meth:`FeatureRows.identity`, or the
    bytes' hash of an in-memory array (small data, tests)."""
    if isinstance(features, FeatureRows):
        return features.identity()
    arr = np.ascontiguousarray(features)
    return hashlib.blake2b(f"{arr.shape}{arr.dtype}".encode() + arr.tobytes(), digest_size=16).hexdigest()


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


def seal(f):
    """The last write: ``content_hash``, which names the features without reading them."""
    f.attrs["content_hash"] = hash_features(f["spatial"], f["pooled"])


def copy_rows(path, sources, merge=False, block=1024):
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
        seal(dst)


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
            copy_rows(tmp, [(path, np.arange(rows, dtype=np.int64)) for path, _, rows in metas], merge=True)
    return sum(m[2] for m in metas)


SHARD_ATTRS = ("shard_index", "shard_count", "content_hash")
