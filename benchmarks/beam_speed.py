"""Batched beam search against a per-image loop, on a trained model's real features.

    python -m benchmarks.beam_speed MODEL_DIR FEATURES [--images 1000 --beam 5 --batch 128 --loop-images 100 --rounds 3]

Captions ``--images`` images (the features file's first rows) with the evaluate stage's batched
search, then ``--loop-images`` of them one image at a time (batch 1, the same search), and
prints captions/s for both, their ratio and how many of the looped captions equal the batched
ones; ``--rounds`` times in turn, then the median ratio (the machine's speed drifts between
runs). Run it with nothing else on the machine. Older checkouts: run this file as a script from
outside both, ``cd /tmp && PYTHONPATH=OLD_CHECKOUT python NEW_CHECKOUT/benchmarks/beam_speed.py ...``
(the first line printed names the package timed).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.option("--images", default=1000, show_default=True)
@click.option("--beam", default=5, show_default=True)
@click.option("--batch", default=128, show_default=True)
@click.option("--max-length", default=20, show_default=True)
@click.option("--loop-images", default=100, show_default=True)
@click.option("--rounds", default=3, show_default=True, help="Batched and looped runs, in turn.")
def main(model_dir, features, images, beam, batch, max_length, loop_images, rounds):
    import captioning
    from captioning.cli import seed_everything

    print(f"timing {os.path.dirname(os.path.abspath(captioning.__file__))}")
    seed_everything(0)
    from captioning.decode import caption_features
    from captioning.feature_store import FeatureStore
    from captioning.model_folder import load_model

    model = load_model(model_dir)
    store = FeatureStore(features)
    rows = store.rows(store.keys[:images])

    def run(n, b):
        t0 = time.perf_counter()  # after the warm-up below; each call traces its step once, as evaluate does
        caps, _ = caption_features(
            model.decoder, model.vocab, rows[:n], beam_size=beam, max_length=max_length, batch_size=b
        )
        return caps, n / (time.perf_counter() - t0)

    run(batch, batch), run(1, 1)  # warm-up: TensorFlow's first calls and oneDNN's kernels are not timed
    ratios = []
    for r in range(rounds):  # batched and looped in turn: both see the machine's same phases
        batched, fast = run(len(rows), batch)
        looped, slow = run(min(loop_images, len(rows)), 1)
        same = sum(a == b for a, b in zip(looped, batched))
        ratios.append(fast / slow)
        print(
            f"round {r + 1}: beam {beam}, {len(rows)} images: batched (batch {batch}) {fast:.1f} captions/s;"
            f" per-image loop {slow:.1f} captions/s over {len(looped)} images; {fast / slow:.1f}x;"
            f" {same}/{len(looped)} looped captions equal the batched ones"
        )
    print(f"median of {rounds} rounds: {statistics.median(ratios):.1f}x")


if __name__ == "__main__":
    main()
