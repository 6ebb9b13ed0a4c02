"""Two training workers on one machine (MultiWorkerMirroredStrategy over gRPC on 127.0.0.1)
against one plain process: steps/s and how closely the loss curves match.

    python -m benchmarks.loopback WORKDIR [--images 1000] [--epochs 3] [--workers 2]

Makes the default pipeline's data at a size with a few dozen steps per epoch (generated
shapes, VGG16 block3_pool features at 64 px, random init), then runs the real train stage with
the default params once as one process and once as ``--workers`` processes with
``train.strategy: multi_worker``, the same global batch. Prints steps/s (epochs after the
first, which traces the graphs), wall time, and the largest differences of the per-epoch
train and val losses and of the final weights. On one machine the workers share its cores
and talk over loopback, so this measures correctness and overhead, not a speed-up.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parents[1]
DATA = ("--features", "data/features.h5", "--vocab", "data/vocab.json", "--captions", "data/captions.h5")


def stage(name, params, *args, env=None, wait=True):
    cmd = [sys.executable, str(ROOT / "stages" / f"{name}.py"), "--params", str(params), *args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def train_args(out):
    return (*DATA, "--model-dir", f"{out}_model", "--checkpoint", f"{out}_ckpt", "--live-dir", f"{out}_live")


def summary(workdir, out):
    import h5py
    import numpy as np

    state = json.loads((workdir / f"{out}_ckpt/state.json").read_text())
    with h5py.File(workdir / f"{out}_ckpt/last.weights.h5") as f:
        weights = []
        f.visititems(lambda _, d: weights.append(d[()]) if isinstance(d, h5py.Dataset) else None)
    curves = np.array([[h["train_loss"], h["val_loss"]] for h in state["history"]])
    return state, curves, weights


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--images", default=1000, show_default=True, help="Generated training images (3 captions each).")
@click.option("--epochs", default=3, show_default=True)
@click.option("--workers", default=2, show_default=True)
def main(workdir, images, epochs, workers):
    """Print steps/s and loss match of one process against WORKERS loopback workers."""
    import numpy as np

    from captioning.distribute import loopback_cluster

    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["generate"].update(n_train=images, n_val=images // 10, n_test=10)
    params["dataset"].update(captions="data/shapes/dataset_shapes.json", images="data/shapes/images")
    params["dataset"]["splits"] = params["dataset"]["captions"]
    params["train"].update(epochs=epochs, patience=epochs)
    one = Path("params_one.yaml")
    one.write_text(yaml.safe_dump(params, sort_keys=False))
    params["train"]["strategy"] = "multi_worker"
    multi = Path("params_multi.yaml")
    multi.write_text(yaml.safe_dump(params, sort_keys=False))
    if not Path("data/captions.h5").exists():
        stage("generate", one, "--out-dir", "data/shapes")
        stage("prepare", one, "--captions", "data/shapes/dataset_shapes.json", "--images", "data/shapes/images",
              "--out", "data/dataset.json", "--report", "reports/prepare.json")  # fmt: skip
        stage("features", one, "--dataset", "data/dataset.json", "--images", "data/shapes/images",
              "--out", "data/features.h5", "--report", "reports/features.json", "--no-progress")  # fmt: skip
        stage("vocab", one, "--dataset", "data/dataset.json", "--vocab", "data/vocab.json",
              "--captions", "data/captions.h5")  # fmt: skip

    rows = []
    for name, n in (("one", 1), ("multi", workers)):
        for p in Path(".").glob(f"{name}*_*"):
            shutil.rmtree(p)
        t0 = time.perf_counter()
        if n == 1:
            stage("train", one, *train_args(name), "--no-progress")
        else:
            cluster = loopback_cluster(n)
            procs = [
                stage(
                    "train",
                    multi,
                    *train_args(f"{name}{i}" if i else name),
                    "--no-progress",
                    env={"TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})},
                    wait=False,
                )
                for i in range(n)
            ]
            for p in procs:
                out, _ = p.communicate()
                if p.returncode:
                    sys.exit(f"worker failed:\n{out[-3000:]}")
        wall = time.perf_counter() - t0
        state, curves, weights = summary(workdir, name)
        rows.append((name, n, state, curves, weights, wall))

    from captioning.vocab import load_encoded

    n_train, batch = len(load_encoded("data/captions.h5", "train")[1]), params["train"]["batch_size"]
    print(f"data: {n_train} train captions, batch {batch}, {epochs} epochs, the default GRU-256 + attention")
    print("| run | processes | steps/s (epochs 2+) | wall s | final train loss | final val loss |")
    print("|---|---|---|---|---|---|")
    for name, n, state, curves, _, wall in rows:
        later = state["history"][1:]
        steps = len(later) * -(-n_train // batch)
        rate = steps / sum(h["seconds"] for h in later) if later else float("nan")
        print(f"| {name} | {n} | {rate:.2f} | {wall:.0f} | {curves[-1, 0]:.6f} | {curves[-1, 1]:.6f} |")
    (_, _, _, c1, w1, _), (_, _, _, c2, w2, _) = rows
    print(f"largest loss difference over {epochs} epochs: train {np.abs(c1[:, 0] - c2[:, 0]).max():.2e},"
          f" val {np.abs(c1[:, 1] - c2[:, 1]).max():.2e}")  # fmt: skip
    print(f"largest final-weight difference: {max(float(np.abs(a - b).max()) for a, b in zip(w1, w2)):.2e}")


if __name__ == "__main__":
    main()
