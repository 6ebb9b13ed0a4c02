"""The features file: what it holds, which encoder made it (``EncoderSpec``), and reading it back.

:func:`captioning.encoder.extract_features` writes it. Kept apart from the CNN code: training,
evaluation and captioning read features without touching Keras applications, so an edit to
the encoder code reruns only the stages it can change.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np

from .errors import CaptioningError

# backbone -> (keras.applications constructor, preprocess module, default feature layer)
BACKBONES = {
    "vgg16": ("VGG16", "vgg16", "block5_conv3"),
    "resnet50": ("ResNet50", "resnet50", "conv5_block3_out"),
    "inceptionv3": ("InceptionV3", "inception_v3", "mixed10"),
    "xception": ("Xception", "xception", "block14_sepconv2_act"),
    "mobilenet": ("MobileNet", "mobilenet", "conv_pw_13_relu"),
}


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """Everything needed to rebuild an encoder exactly (stored as HDF5 attributes)."""

    backbone: str = "vgg16"
    weights: str = "none"  # "imagenet", "none" (random init from seed) or a weights file path
    layer: str = ""  # "" = the backbone's last convolutional block
    image_size: int = 224
    alpha: float = 1.0  # MobileNet width multiplier
    seed: int = 0

    def resolved_layer(self) -> str:
        return self.layer or BACKBONES[self.backbone][2]

    def attrs(self) -> dict:
        d = dataclasses.asdict(self)
        d["layer"] = self.resolved_layer()
        return d

    @classmethod
    def from_attrs(cls, attrs: dict) -> EncoderSpec:
        """The spec stored by :meth:`attrs` (in a features file or a model's config)."""
        return cls(**{f.name: attrs[f.name] for f in dataclasses.fields(cls)})


def square_grid(num_locations: int) -> tuple:
    """(rows, cols) of a flattened feature map: the CNNs here make square maps from square images."""
    side = int(round(num_locations**0.5))
    return side, num_locations // side


class FeatureStore:
    """Read a features file: ``store.spec``, ``store.index[key]``, ``store.load(split_keys)``."""

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

    def load(self, keys, pooled=False):
        """``(len(keys), L, C)`` spatial features (or ``(len(keys), C)`` pooled) as float32."""
        missing = [k for k in keys if k not in self.index]
        if missing:
            raise CaptioningError(f"{self.path}: no features for {len(missing)} images (first: {missing[0]})")
        rows = np.array([self.index[k] for k in keys], dtype=np.int64)
        with h5py.File(self.path, "r") as f:
            dset = f["pooled" if pooled else "spatial"]
            if 2 * len(rows) >= len(dset):  # most of the file: one contiguous read beats fancy indexing
                return dset[:][rows].astype(np.float32)
            wanted, where = np.unique(rows, return_inverse=True)  # h5py reads increasing rows
            return dset[wanted][where].astype(np.float32)
