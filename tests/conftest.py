"""Shared fixtures: tiny generated data and tiny params, all under tmp_path."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]

# Small enough that every stage runs in seconds on 2 CPU cores, big enough to be real:
# the real VGG16 graph (at 32 px), a real GRU with attention, real HDF5 and real metrics.
TINY_PARAMS = {
    "seed": 7,
    "dataset": {
        "captions": "data/shapes/dataset_shapes.json",
        "images": "data/shapes/images",
        "splits": "data/shapes/dataset_shapes.json",
        "format": "auto",
    },
    "generate": {"n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32, "captions_per_image": 3},
    "prepare": {"split_ratios": [0.8, 0.1, 0.1], "max_bad_fraction": 0.01},
    "features": {
        "backbone": "vgg16",
        "weights": "none",
        "layer": "block3_pool",
        "image_size": 32,
        "alpha": 1.0,
        "batch_size": 8,
        "dtype": "float16",
        "max_bad_fraction": 0.01,
    },
    "vocab": {"min_count": 1, "max_length": 12},
    "train": {
        "attention": True,
        "blind": False,
        "embed_dim": 8,
        "units": 8,
        "attention_units": 4,
        "dropout": 0.1,
        "attention_reg": 0.01,
        "batch_size": 16,
        "learning_rate": 0.01,
        "epochs": 2,
        "patience": 2,
        "clip_norm": 5.0,
    },
    "evaluate": {"split": "test", "beam_size": 2, "max_length": 8, "length_penalty": 0.0, "batch_size": 8},
}


@pytest.fixture
def tiny_params(tmp_path):
    """Write the tiny params to tmp_path/params.yaml; returns (path, dict)."""
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    return path, TINY_PARAMS


@pytest.fixture
def shapes_dir(tmp_path):
    """A generated shapes dataset (24 images at 32 px) in tmp_path/shapes."""
    import json

    from captioning import shapes

    out = tmp_path / "shapes"
    dataset, truth = shapes.generate(out, n_train=16, n_val=4, n_test=4, seed=3, image_size=32, n_captions=3)
    (out / "dataset_shapes.json").write_text(json.dumps(dataset))
    (out / "ground_truth.json").write_text(json.dumps(truth))
    return out


def git_init(path):
    """A git repo with a local identity (fresh CI machines have none)."""
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.name", "test"],
        ["git", "config", "user.email", "test@example.com"],
    ):
        subprocess.run(cmd, cwd=path, check=True)
