"""The features file: what it holds, which encoder made it (``EncoderSpec``), and reading it back.

:func:`captioning.encoder.extract_features` writes it. Kept apart from the CNN code: training,
evaluation and captioning read features without touching Keras applications, so an edit to
the encoder code reruns only the stages it can change.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import h5py
import numpy as np

from .errors import CaptioningError

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
