"""Warm one-photo latency (file in, caption out) against its arithmetic floor, per beam size.

    python -m benchmarks.latency MODEL_DIR IMAGE... [--beams 1,3,5] [--runs 40]

In one process, with the model loaded once: for each beam size, ``Captioner.caption([file])``
(the search compiled into one graph) and the host-driven search (beam.py: a TensorFlow call and a
numpy round trip per word, after the same read and encode) alternate over the images, ``--runs``
times each. The floor, timed in the same run: the encoder's forward pass on one image alone, plus
the decoder's matrix products for the captions made (each step's products at that beam's rows,
for the caption's words and its <end>, run back to back inside one graph loop so no dispatch is
counted). Prints median and p95 of each path, the floor and the ratios.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402


def step_products(decoder):
    """The decoder's matrix products per step and row: ``[(k, m)]`` (``(rows, k) x (k, m)``), plus
    the attention's per-row ``(L, k) x (k, m)`` products; and once per image ``[(L, k, m)]``."""
    from benchmarks.floor import products

    s = decoder.settings()
    kind = "lstm" if "LSTM" in type(decoder).__name__ else "gru"
    att = bool(s.get("attention", True))
    A = s.get("attention_units", 0)
    shapes = products(kind, att, s["embed_dim"], s["units"], A, s["vocab_size"], s["num_locations"], s["feature_dim"])
    per_step = [(per, rows, k, m) for _, per, rows, k, m in shapes if per in ("step", "token", "context")]
    per_image = [(rows, k, m) for _, per, rows, k, m in shapes if per == "caption"]
    return per_step, per_image


def decoder_floor(decoder, rows, steps, repeats=7):
    """Seconds of ``steps`` steps' products at ``rows`` rows, plus the once-per-image products."""
    import tensorflow as tf

    per_step, per_image = step_products(decoder)
    L = decoder.num_locations
    rng = np.random.default_rng(0)

    def pair(r, k, m):
        return (tf.constant(rng.standard_normal((r, k), dtype=np.float32)),
                tf.constant(rng.standard_normal((k, m), dtype=np.float32)))  # fmt: skip

    step_pairs = []
    for per, n, k, m in per_step:
        if per == "context":  # each row's (1, L) x (L, C): a batched product
            step_pairs.append((tf.constant(rng.random((rows, 1, L), np.float32)),
                               tf.constant(rng.random((rows, L, m), np.float32))))  # fmt: skip
        else:
            step_pairs.append(pair(rows * n, k, m))
    image_pairs = [pair(n, k, m) for n, k, m in per_image]

    @tf.function
    def run(n_steps):
        def body(i, acc):
            for a, b in step_pairs:  # the step's products, each on its own operands
                acc += tf.reduce_sum(tf.matmul(a, b)[..., :1]) * 0
            return i + 1, acc

        acc = tf.constant(0.0)
        for a, b in image_pairs:
            acc += tf.reduce_sum(tf.matmul(a, b)[..., :1]) * 0
        return tf.while_loop(lambda i, _: i < n_steps, body, (0, acc))[1]

    run(tf.constant(steps)).numpy()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(tf.constant(steps)).numpy()
        best = min(best, time.perf_counter() - t0)
    return best


def encoder_floor(captioner, image, repeats=20):
    array = captioner.read(image)[None]
    captioner._forward(array)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        captioner._forward(array)[0].numpy()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--beams", default="1,3,5", show_default=True)
@click.option("--runs", default=40, show_default=True, type=int, help="Captions per path and beam size.")
@click.option("--max-length", default=20, show_default=True, type=int)
def main(model_dir, images, beams, runs, max_length):
    from captioning.decode import caption_features
    from captioning.inference import Captioner

    captioner = Captioner.load(model_dir)
    decoder, vocab = captioner.model.decoder, captioner.model.vocab

    def host(path, beam):  # the same read and encode, then the host-driven search
        feats = captioner.encode(captioner.read(path)[None])
        return caption_features(decoder, vocab, feats, beam, max_length, batch_size=1)[0][0]

    def graph(path, beam):
        return captioner.caption([path], beam_size=beam, max_length=max_length)[0].text

    enc = encoder_floor(captioner, images[0])
    print(f"{model_dir}: {type(decoder).__name__} {decoder.settings()['units']} units, "
          f"encoder {captioner.model.encoder.backbone} at {captioner.image_size} px; "
          f"encoder forward alone (1 image, median): {1000 * enc:.1f} ms")  # fmt: skip
    print("| beam | compiled median | p95 | host-driven median | p95 | floor | compiled / floor | host / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for beam in (int(b) for b in beams.split(",")):
        for path in images:  # warm-up: trace both paths
            host(path, beam), graph(path, beam)
        times = {"graph": [], "host": []}
        words = []
        for i in range(runs):
            path = images[i % len(images)]
            for name, fn in (("graph", graph), ("host", host)) if i % 2 else (("host", host), ("graph", graph)):
                t0 = time.perf_counter()
                caption = fn(path, beam)
                times[name].append(time.perf_counter() - t0)
            words.append(len(caption.split()))
        rows = beam + 1 if beam > 1 else 1  # the beams and the greedy row
        dec = decoder_floor(decoder, rows, int(round(np.mean(words))) + 1)
        floor = enc + dec
        med = {k: float(np.median(v)) for k, v in times.items()}
        p95 = {k: float(np.percentile(v, 95)) for k, v in times.items()}
        print(f"| {beam} | {1000 * med['graph']:.1f} ms | {1000 * p95['graph']:.1f} | {1000 * med['host']:.1f} ms | "
              f"{1000 * p95['host']:.1f} | {1000 * floor:.1f} ms (decoder {1000 * dec:.2f}) | "
              f"{med['graph'] / floor:.2f}x | {med['host'] / floor:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
