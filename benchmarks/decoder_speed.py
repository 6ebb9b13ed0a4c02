"""Training speed of each decoder on the same cached features: seconds per epoch, from timed steps.

    python -m benchmarks.decoder_speed FEATURES CAPTIONS [--steps 40] [--batch 128]

FEATURES / CAPTIONS: a features file and encoded captions (e.g. a Flickr8k run's data/features.h5
and data/captions.h5). Each variant builds the decoder with the settings of benchmarks/flickr8k.sh,
runs a few warm-up steps, then times ``--steps`` training steps on real batches of the train split
(one variant at a time, so they never share the cores) and prints parameters, steps/s and the
implied seconds per epoch. Run it with nothing else on the machine.
"""

from __future__ import annotations

import time

import click
import numpy as np

# name -> (decoder, settings) as in benchmarks/flickr8k.sh
VARIANTS = {
    "gru": ("gru", {"attention": True, "attention_units": 256, "units": 512}),
    "gru-noatt": ("gru", {"attention": False, "attention_units": 256, "units": 512}),
    "lstm": ("lstm", {"attention": True, "attention_units": 256, "units": 512}),
    "lstm-noatt": ("lstm", {"attention": False, "attention_units": 256, "units": 512}),
    "transformer": ("transformer", {"units": 1024, "num_layers": 2, "num_heads": 4}),
}


@click.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.option("--steps", default=40, show_default=True)
@click.option("--batch", default=128, show_default=True)
@click.option("--only", multiple=True, help="Variants to time (default: all).")
def main(features, captions, steps, batch, only):
    from captioning.cli import seed_everything

    seed_everything(0)
    from captioning.feature_store import FeatureStore
    from captioning.train import CaptionSet
    from captioning.vocab import load_encoded

    store = FeatureStore(features)
    images, tokens = load_encoded(captions, "train")
    keys = sorted(set(images))
    row = {k: i for i, k in enumerate(keys)}
    data = CaptionSet(store.load(keys), tokens.astype(np.int32), np.array([row[i] for i in images]))
    n_batches = (len(data.tokens) + batch - 1) // batch
    vocab_size = int(tokens.max()) + 1
    print(f"{len(data.tokens)} captions, {n_batches} batches of {batch} per epoch")
    for name in only or VARIANTS:
        model, per_step = time_variant(name, store, data, vocab_size, batch, steps)
        print(
            f"{name:12s} params {model.count_params():>9,d}  {1 / per_step:6.2f} steps/s"
            f"  ~{per_step * n_batches:6.0f} s/epoch"
        )


def time_variant(name, store, data, vocab_size, batch, steps):
    """Build ``name`` and return ``(model, seconds per training step)``."""
    import keras
    import tensorflow as tf

    from captioning.decoders import build_decoder
    from captioning.decoders.base import masked_cross_entropy

    kind, settings = VARIANTS[name]
    model = build_decoder(
        kind,
        vocab_size=vocab_size,
        feature_dim=store.feature_dim,
        num_locations=store.num_locations,
        embed_dim=256,
        dropout=0.3,
        **settings,
    )
    model.build()
    opt = keras.optimizers.Adam(1e-3)

    @tf.function(reduce_retracing=True)
    def step(feats, toks, seed):
        inputs, targets = toks[:, :-1], toks[:, 1:]
        with tf.GradientTape() as tape:
            logits, aux = model.forward(feats, inputs, dropout_seed=seed)
            mask = tf.cast(targets > 0, logits.dtype)
            loss = masked_cross_entropy(logits, targets) + 0.01 * model.extra_loss(aux, mask)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
        return loss

    batches = data.batches(batch, np.random.default_rng(0))
    for i in range(3):  # warm-up: tracing for the first shapes seen
        f, t = next(batches)
        step(f, t, tf.constant([0, i])).numpy()
    t0 = time.perf_counter()
    for i in range(steps):
        f, t = next(batches)
        step(f, t, tf.constant([1, i])).numpy()
    return model, (time.perf_counter() - t0) / steps


if __name__ == "__main__":
    main()
