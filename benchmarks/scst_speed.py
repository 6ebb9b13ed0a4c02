"""Seconds per SCST epoch, from timed steps: sampling, CIDEr-D rewards and the policy-gradient update.

    python -m benchmarks.scst_speed MODEL_DIR FEATURES CAPTIONS [--batches 15]

Times ``--batches`` steps of 32 images x 5 samples (the finetune defaults) on the train split
and prints the split of time between sampling, rewards and the update, and the implied seconds
per epoch. Run it with nothing else on the machine.
"""

from __future__ import annotations

import time

import click
import numpy as np


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.option("--batches", default=15, show_default=True)
def main(model_dir, features, captions, batches):
    from captioning.cli import seed_everything

    seed_everything(0)
    import tensorflow as tf

    from captioning.cider import CiderD
    from captioning.decoders.base import masked_cross_entropy  # noqa: F401  (same imports as training)
    from captioning.feature_store import FeatureStore
    from captioning.model_folder import load_model
    from captioning.scst import baseline, image_set, make_sampler, strip_end

    model = load_model(model_dir)
    store = FeatureStore(features)
    train = image_set(store, captions, "train", model.vocab)
    scorer = CiderD(train.references, len(model.vocab) + 1)
    refs = [[scorer.vector(r) for r in rs] for rs in train.references]
    dec, voc, K, B = model.decoder, model.vocab, 5, 32
    sample = make_sampler(dec, voc.start_id, voc.end_id, 16)
    opt = tf.keras.optimizers.Adam(5e-5)

    @tf.function(reduce_retracing=True)
    def update(feats, seqs, adv):
        inputs = tf.concat([tf.fill([tf.shape(seqs)[0], 1], voc.start_id), seqs[:, :-1]], axis=1)
        with tf.GradientTape() as tape:
            logits, _ = dec.forward(feats, inputs)
            logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=seqs, logits=logits)
            loss = -tf.reduce_mean(adv * tf.reduce_sum(logp * tf.cast(seqs > 0, tf.float32), axis=1))
        opt.apply_gradients(zip(tape.gradient(loss, dec.trainable_variables), dec.trainable_variables))
        return loss

    times = np.zeros(3)
    order = np.random.default_rng(0).permutation(len(train.features))
    for b in range(batches + 2):  # the first two trace the functions
        idx = np.sort(order[b * B : (b + 1) * B])
        feats = tf.constant(np.repeat(train.features[idx], K, axis=0))
        t0 = time.perf_counter()
        seqs = sample(feats, tf.constant([0, b], tf.int32)).numpy()
        t1 = time.perf_counter()
        rewards = np.array(
            [scorer.score(scorer.vector(strip_end(s, voc.end_id)), refs[idx[j // K]]) for j, s in enumerate(seqs)]
        )
        adv = rewards - baseline(rewards, K)
        t2 = time.perf_counter()
        update(feats, tf.constant(seqs, tf.int32), tf.constant(adv, tf.float32)).numpy()
        t3 = time.perf_counter()
        if b >= 2:
            times += [t1 - t0, t2 - t1, t3 - t2]
    per = times / batches
    n = (len(train.features) + B - 1) // B
    print(
        f"per step of {B} images x {K} samples: sampling {per[0]:.3f} s, rewards {per[1]:.3f} s,"
        f" update {per[2]:.3f} s; {n} steps per epoch -> ~{per.sum() * n:.0f} s per epoch (+ val greedy)"
    )


if __name__ == "__main__":
    main()
