"""MS-COCO-sized data on one machine: peak memory and speed of features, train and evaluate.

    python -m benchmarks.scale WORKDIR [--sizes 3000,30000] [--train-captions 3000] [--eval-images 500]

For each size N, in WORKDIR/N (about 0.2 MB of disk per image: 6 GB for 30,000):

1. **features**: the real features stage code (``extract_features``) encodes N images
   (generated 224 px JPEGs; N names over 500 distinct files) with MobileNet (alpha 1, random
   init) cut at ``conv_pw_11_relu``: 14x14x512 float16 rows, the shape and size of VGG16's
   ``block5_conv3`` map at 224 px (the design card's encoder) at a fraction of its cost;
2. **captions**: 5 generated captions per image (8-20 words over 2,000 word ids);
3. **train**: one epoch of ``captioning.train.fit`` (GRU-512 + attention, batch 64, no length buckets) on
   ``--train-captions`` captions drawn from all N images, features streamed from the file;
   for the smallest N also with the split loaded into RAM (the old way), for the ratio;
4. **evaluate**: beam search (beam 3, 128 images at a time) over ``--eval-images`` images spread over the file.

Each step runs in its own process, so its peak RSS (``ru_maxrss``) is its own. Prints one
table: images, file size, peak RSS per step, images/s and captions/s.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402

SPEC = dict(backbone="mobilenet", weights="none", layer="conv_pw_11_relu", image_size=224, alpha=1.0, seed=0)
DECODER = dict(embed_dim=256, units=512, attention=True, attention_units=256, dropout=0.3)
VOCAB = 2000


def make_images(folder: Path, n: int, distinct=500):
    """``n`` image names (symlinks onto ``distinct`` generated JPEGs: decoding costs the same)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(distinct):
        p = folder / f"src_{i:04d}.jpg"
        if not p.exists():
            # smooth random colour fields: JPEG-typical content, not incompressible noise
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((224, 224), Image.BICUBIC).save(p, quality=90)
    keys = []
    for i in range(n):
        k = f"img_{i:06d}.jpg"
        if not (folder / k).exists():
            os.symlink(f"src_{i % distinct:04d}.jpg", folder / k)
        keys.append(k)
    return keys


def make_captions(path: Path, keys, per_image=5):
    from captioning.vocab import save_encoded

    rng = np.random.default_rng(1)
    n = len(keys) * per_image
    lengths = rng.integers(8, 21, n)  # words
    tokens = np.zeros((n, 22), np.int32)
    for i, length in enumerate(lengths):
        tokens[i, 0], tokens[i, 1 : length + 1], tokens[i, length + 1] = 1, rng.integers(4, VOCAB, length), 2
    images = [k for k in keys for _ in range(per_image)]
    cut = int(0.9 * n)
    save_encoded(path, {"train": (images[:cut], tokens[:cut]), "val": (images[cut:], tokens[cut:])})


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ---- the steps, each run in a child process: python -m benchmarks.scale --step NAME ... ----------


def step_features(work: Path, n: int):
    from captioning.encoder import extract_features
    from captioning.feature_store import EncoderSpec

    keys = make_images(work.parent / "images", n)
    rep = extract_features(
        EncoderSpec(**SPEC), work.parent / "images", keys, work / "features.h5", batch_size=32, progress=False
    )
    make_captions(work / "captions.h5", keys)
    return {"images_per_s": rep["images_per_second"], "shape": rep["spatial_shape"]}


def _caption_set(store, captions, split, limit, rng):
    from captioning.vocab import load_encoded

    images, tokens = load_encoded(captions, split)
    pick = np.sort(rng.choice(len(images), size=min(limit, len(images)), replace=False))  # over all images
    keys = sorted({images[i] for i in pick})
    row = {k: r for r, k in enumerate(keys)}
    return keys, np.array([row[images[i]] for i in pick]), tokens[pick]


def step_train(work: Path, limit: int, in_memory: bool):
    from captioning.cli import seed_everything

    seed_everything(0)
    import tempfile

    from captioning.caption_set import CaptionSet
    from captioning.config import load_section
    from captioning.decoders import build_decoder
    from captioning.feature_store import FeatureStore
    from captioning.train import TrainSettings, fit

    store = FeatureStore(work / "features.h5")
    rng = np.random.default_rng(2)
    sets = []
    for split, k in (("train", limit), ("val", max(limit // 10, 64))):
        keys, rows, tokens = _caption_set(store, work / "captions.h5", split, k, rng)
        feats = store.load(keys) if in_memory else store.rows(keys)
        sets.append(CaptionSet(feats, tokens, rows))
    model = build_decoder(
        "gru", vocab_size=VOCAB, feature_dim=store.feature_dim, num_locations=store.num_locations, **DECODER
    )
    settings = load_section("params.yaml", "train", TrainSettings, epochs=1, patience=1)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        state = fit(model, *sets, settings, 0, Path(tmp) / "ckpt", progress=False, log=lambda m: None)
    return {
        "captions_per_s": len(sets[0].tokens) / state["history"][0]["seconds"],
        "epoch_s": state["history"][0]["seconds"],
        "wall_s": time.perf_counter() - t0,
    }


def step_evaluate(work: Path, limit: int):
    from captioning.cli import seed_everything

    seed_everything(0)
    from captioning.decode import caption_features
    from captioning.decoders import build_decoder
    from captioning.feature_store import FeatureStore
    from captioning.vocab import Vocabulary

    store = FeatureStore(work / "features.h5")
    rows = np.linspace(0, len(store.keys) - 1, limit).astype(int)  # spread over the whole file
    feats = store.rows([store.keys[r] for r in rows])
    model = build_decoder(
        "gru", vocab_size=VOCAB, feature_dim=store.feature_dim, num_locations=store.num_locations, **DECODER
    )
    model.build()
    vocab = Vocabulary(["<pad>", "<start>", "<end>", "<unk>"] + [f"w{i}" for i in range(4, VOCAB)])
    t0 = time.perf_counter()
    caps, _ = caption_features(model, vocab, feats, beam_size=3, max_length=16, batch_size=128)  # evaluate default
    return {"captions_per_s": len(caps) / (time.perf_counter() - t0)}


def child(args):
    out = subprocess.run([sys.executable, "-m", "benchmarks.scale", *map(str, args)], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"step {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@click.command()
@click.argument("workdir", type=click.Path(file_okay=False))
@click.option("--sizes", default="3000,30000", show_default=True)
@click.option("--train-captions", default=3000, show_default=True)
@click.option("--eval-images", default=500, show_default=True)
@click.option("--step", type=click.Choice(["features", "train", "train-ram", "evaluate"]), hidden=True)
@click.option("--n", type=int, hidden=True)
def main(workdir, sizes, train_captions, eval_images, step, n):
    if step:  # a child: one step, one JSON line with its figures and its own peak RSS
        work = Path(workdir) / str(n)
        work.mkdir(parents=True, exist_ok=True)
        if step == "features":
            res = step_features(work, n)
        elif step == "evaluate":
            res = step_evaluate(work, eval_images)
        else:
            res = step_train(work, train_captions, in_memory=step == "train-ram")
        print(json.dumps({**res, "peak_rss_gb": peak_rss_gb()}))
        return
    sizes = [int(s) for s in sizes.split(",")]
    rows = []
    for i, n in enumerate(sizes):
        common = [workdir, "--n", n, "--train-captions", train_captions, "--eval-images", eval_images]
        feats = child(["--step", "features", *common])
        size_gb = (Path(workdir) / str(n) / "features.h5").stat().st_size / 1e9
        train = child(["--step", "train", *common])
        ram = child(["--step", "train-ram", *common]) if i == 0 else None
        ev = child(["--step", "evaluate", *common])
        rows.append((n, size_gb, feats, train, ram, ev))
        print(
            f"{n} images, {size_gb:.2f} GB: features {feats['peak_rss_gb']:.2f} GB RSS"
            f" {feats['images_per_s']:.0f} img/s;"
            f" train {train['peak_rss_gb']:.2f} GB {train['captions_per_s']:.0f} captions/s"
            + (f" (in RAM: {ram['peak_rss_gb']:.2f} GB {ram['captions_per_s']:.0f} captions/s)" if ram else "")
            + f"; evaluate {ev['peak_rss_gb']:.2f} GB {ev['captions_per_s']:.1f} captions/s",
            flush=True,
        )
    print("\n| images | file | features RSS | img/s | train RSS | captions/s | evaluate RSS | captions/s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, size_gb, f, t, _, e in rows:
        print(
            f"| {n:,} | {size_gb:.2f} GB | {f['peak_rss_gb']:.2f} GB | {f['images_per_s']:.0f}"
            f" | {t['peak_rss_gb']:.2f} GB"
            f" | {t['captions_per_s']:.0f} | {e['peak_rss_gb']:.2f} GB | {e['captions_per_s']:.1f} |"
        )
    if rows[0][4]:
        t, ram = rows[0][3], rows[0][4]
        print(
            f"\nstreamed vs in RAM ({rows[0][0]:,} images): {t['captions_per_s']:.0f} vs {ram['captions_per_s']:.0f}"
            f" captions/s ({t['captions_per_s'] / ram['captions_per_s']:.0%}); peak RSS {t['peak_rss_gb']:.2f} vs"
            f" {ram['peak_rss_gb']:.2f} GB"
        )
    big, small = rows[-1], rows[0]
    for name, k in (("features", 2), ("train", 3), ("evaluate", 5)):
        print(
            f"{name}: peak RSS at {big[0]:,} / at {small[0]:,} = {big[k]['peak_rss_gb'] / small[k]['peak_rss_gb']:.2f}x"
        )


if __name__ == "__main__":
    main()
