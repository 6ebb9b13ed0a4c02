"""Shared fixtures: tiny generated data and tiny params, all under tmp_path."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parents[1]


def merged(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` applied section by section (a deep merge, one level)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for k, v in overrides.items():
        out[k] = {**out[k], **v} if isinstance(v, dict) else v
    return out


# params.yaml (the one home of every default) plus what makes every stage run in seconds on
# 2 CPU cores while staying real: the real VGG16 graph (at 32 px), a real GRU with attention,
# real HDF5 and real metrics.
TINY_PARAMS = merged(
    yaml.safe_load((ROOT / "params.yaml").read_text()),
    {
        "seed": 7,
        "generate": {"n_train": 16, "n_val": 4, "n_test": 4, "image_size": 32, "captions_per_image": 3},
        "features": {"layer": "block3_pool", "image_size": 32, "batch_size": 8},
        "vocab": {"max_length": 12},
        "train": {
            "embed_dim": 8,
            "units": 8,
            "attention_units": 4,
            "num_heads": 2,
            "dropout": 0.1,
            "attention_reg": 0.01,
            "batch_size": 16,
            "learning_rate": 0.01,
            "lr_decay": 1.0,
            "epochs": 2,
            "patience": 2,
        },
        "evaluate": {"beam_size": 2, "max_length": 8, "batch_size": 8},
    },
)


def params_section(cls, section, **overrides):
    """params.yaml's ``section`` as the settings dataclass ``cls`` (validated), with ``overrides``:
    tests start from the one home of the defaults too."""
    from captioning import config

    return config.load_section(ROOT / "params.yaml", section, cls, **overrides)


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
    dataset = shapes.generate(out, n_train=16, n_val=4, n_test=4, seed=3, image_size=32, n_captions=3)
    (out / "dataset_shapes.json").write_text(json.dumps(dataset))
    return out


def git_init(path):
    """A git repo with a local identity (fresh CI machines have none)."""
    for cmd in (
        ["git", "init", "-q"],
        ["git", "config", "user.name", "test"],
        ["git", "config", "user.email", "test@example.com"],
    ):
        subprocess.run(cmd, cwd=path, check=True)


def invoke(cmd, args):
    from click.testing import CliRunner

    result = CliRunner().invoke(cmd.main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def prepare_training_data(params):
    """generate -> prepare -> features -> vocab in the cwd: what train reads. Returns the outputs."""
    from stages import features, generate, prepare, vocab

    p = lambda args: ["--params", params, *args.split()]  # noqa: E731
    outs = {"gen": invoke(generate, p("--out-dir data/shapes"))}
    outs["prepare"] = invoke(
        prepare,
        p(
            "--captions data/shapes/dataset_shapes.json --images data/shapes/images --out data/dataset.json"
            " --report reports/prepare.json"
        ),
    )
    outs["features"] = invoke(
        features,
        p(
            "--dataset data/dataset.json --images data/shapes/images --out data/features.h5"
            " --report reports/features.json --no-progress"
        ),
    )
    outs["vocab"] = invoke(vocab, p("--dataset data/dataset.json --vocab data/vocab.json --captions data/captions.h5"))
    return outs


def run_pipeline(root, params):
    """generate -> prepare -> features -> vocab -> train -> finetune -> evaluate -> report in ``root`` (the cwd)."""
    from stages import evaluate, finetune, report, train

    p = lambda args: ["--params", params, *args.split()]  # noqa: E731
    outs = prepare_training_data(params)
    outs["train"] = invoke(
        train,
        p(
            "--features data/features.h5 --vocab data/vocab.json --captions data/captions.h5 --model-dir models"
            " --checkpoint ckpt --live-dir reports/train --no-progress"
        ),
    )
    outs["finetune"] = invoke(
        finetune,
        p(
            "--model models --features data/features.h5 --captions data/captions.h5 --out models_final"
            " --checkpoint ckpt_ft --live-dir reports/finetune --no-progress"
        ),
    )
    outs["evaluate"] = invoke(
        evaluate,
        p(
            "--model models_final --features data/features.h5 --dataset data/dataset.json"
            " --metrics reports/metrics.json --predictions reports/predictions.json --no-progress"
        ),
    )
    outs["report"] = invoke(
        report,
        p(
            "--model models_final --features data/features.h5 --dataset data/dataset.json --images data/shapes/images"
            " --predictions reports/predictions.json --metrics reports/metrics.json"
            " --curves reports/train/plots/metrics --out reports/gallery --plots reports/attention_plots"
            " --summary reports/attention.json"
        ),
    )
    return outs


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """The tiny pipeline, every stage, run once per test session (read it, do not change it)."""
    root = tmp_path_factory.mktemp("run")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        outs = run_pipeline(root, root / "params.yaml")
    finally:
        os.chdir(cwd)
    return root, outs
