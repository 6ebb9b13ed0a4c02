"""Two versions of the training step in one process, timed batch by batch in turn.

    python -m benchmarks.step_ab OLD_CHECKOUT FEATURES CAPTIONS [--preset flickr8k] [--batches 20] [--rounds 3]
    python -m benchmarks.step_ab - FEATURES CAPTIONS --profile      # this checkout's step, op by op

The machines here change speed by up to 1.6x within minutes (other tenants), so two processes
run one after the other can differ by more than the change being measured. This copies
OLD_CHECKOUT's ``captioning`` package under another name, builds the same model and optimizer
from each version (same seed), and runs ``captioning.train``'s compiled step of each on the same
real batches (the train split's first ``--batches``, in the seeded epoch order), alternating
which goes first; both see the same machine phases. Prints each version's mean ms per step and
the sum of its losses (equal to float rounding when the maths is unchanged), and new / old.

``--profile`` traces five steps of this checkout with TensorFlow's profiler and prints thread
time per op type, split into the forward time loop, the backward time loop, the optimizer and
the rest.
"""

from __future__ import annotations

import collections
import glob
import importlib
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.floor import PRESETS, caption_set  # noqa: E402


def build(pkg, features, captions, cfg, seed):
    """(train set, compiled train step, inputs) of package ``pkg``, as ``fit`` builds them."""
    import keras
    import tensorflow as tf

    train_mod = importlib.import_module(pkg + ".train")
    store = importlib.import_module(pkg + ".feature_store").FeatureStore(features)
    images, tokens = importlib.import_module(pkg + ".vocab").load_encoded(captions, "train")
    data = caption_set(train_mod, store, images, tokens)
    keras.utils.set_random_seed(seed)
    model = importlib.import_module(pkg + ".decoders").build_decoder(
        "gru",
        vocab_size=int(tokens.max()) + 1,
        feature_dim=store.feature_dim,
        num_locations=store.num_locations,
        attention=True,
        embed_dim=cfg["embed_dim"],
        units=cfg["units"],
        attention_units=cfg["attention_units"],
        dropout=cfg["dropout"],
    )
    settings = importlib.import_module(pkg + ".config").load_section(
        "params.yaml", "train", train_mod.TrainSettings, batch_size=cfg["batch"], learning_rate=cfg["lr"],
        attention_reg=cfg["reg"], bucket=0,
    )  # fmt: skip
    model.build()
    optimizer = keras.optimizers.Adam(cfg["lr"])
    optimizer.build(model.trainable_variables)
    step, _, inputs = train_mod._steps(
        model, optimizer, settings, tf.distribute.get_strategy(), data.features.shape[1:], (0,)
    )
    return data, step, inputs


def profile(step, batches, log):
    """Thread time per op over five steps, grouped by where the op sits."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        for i, b in enumerate(batches[:5]):
            step(*b[:3], tf.constant([0, i]), b[3])[0].numpy()
        tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(logdir + "/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    ms = collections.Counter()
    for plane in space.planes:
        names = {k: v.name for k, v in plane.event_metadata.items()}
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for ev in line.events:
                name = names.get(ev.metadata_id, "?")
                if name.startswith(("ExecutorState", "Process")) or "ParallelFor" in name:
                    continue  # wrappers around the ops below
                op, low = name.split(":")[-1], name.lower()
                # The backward time loop is the second while loop of the step.
                where = "backward loop" if "while_1/" in low else "forward loop" if "while/" in low else None
                where = where or ("optimizer" if "adam" in low else "rest")
                ms[(where, "MatMul" if "MatMul" in op else op)] += ev.duration_ps / 1e9 / 5
    total = sum(ms.values())
    log(f"thread time per step, both cores: {total:.1f} ms")
    groups = collections.Counter()
    for (where, _), v in ms.items():
        groups[where] += v
    for where, v in groups.most_common():
        top = sorted(((v2, op) for (w2, op), v2 in ms.items() if w2 == where), reverse=True)[:6]
        log(f"  {where:14s} {v:7.1f} ms ({v / total:4.0%}): " + ", ".join(f"{op} {t:.1f}" for t, op in top))


@click.command()
@click.argument("old")
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="flickr8k", show_default=True)
@click.option("--batches", default=20, show_default=True, help="Real train batches, each run once per round.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--profile", "do_profile", is_flag=True, help="Profile this checkout's step instead (OLD: -).")
@click.option("--seed", default=42, show_default=True)
def main(old, features, captions, preset, batches, rounds, do_profile, seed):
    import tensorflow as tf

    cfg = PRESETS[preset]
    versions = {"new": "captioning"}
    tmp = tempfile.mkdtemp()
    try:
        if not do_profile:
            shutil.copytree(os.path.join(old, "captioning"), os.path.join(tmp, "captioning_old"))
            sys.path.insert(0, tmp)
            versions = {"old": "captioning_old", **versions}
        built = {name: build(pkg, features, captions, cfg, seed) for name, pkg in versions.items()}
        data, _, inputs = built["new"]
        todo = []  # the same batches, as tensors, for both versions
        order = data.replica_batches(cfg["batch"], np.random.default_rng([seed, 1]))
        for i, (n_rows, n_tokens, parts) in enumerate(order):
            if i == batches:
                break
            f, t, _ = inputs(parts, n_rows)
            rows = np.array([0, n_rows], np.int32)
            todo.append((tf.constant(f), tf.constant(t), tf.constant(rows), tf.constant(float(max(n_tokens, 1)))))
        for _, step, _ in built.values():  # trace and warm up
            for i, b in enumerate(todo[:2]):
                step(*b[:3], tf.constant([seed, i]), b[3])[0].numpy()
        if do_profile:
            profile(built["new"][1], todo, print)
            return
        seconds, losses = collections.Counter(), collections.Counter()
        for r in range(rounds):
            for i, b in enumerate(todo):
                for name in versions if (i + r) % 2 else reversed(list(versions)):
                    t0 = time.perf_counter()
                    loss = built[name][1](*b[:3], tf.constant([seed, i]), b[3])[0].numpy()
                    seconds[name] += time.perf_counter() - t0
                    losses[name] += float(loss)
        n = rounds * len(todo)
        for name in versions:
            print(f"{name} ({versions[name]}): {seconds[name] / n * 1e3:.1f} ms/step, loss sum {losses[name]:.6f}")
        print(f"new / old: {seconds['new'] / seconds['old']:.3f} ({preset}, {len(todo)} batches x {rounds} rounds)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
