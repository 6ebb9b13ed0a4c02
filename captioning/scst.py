"""Self-critical sequence training (Rennie et al., CVPR 2017): fine-tune a decoder for CIDEr-D.

Each image's caption is sampled ``samples`` times from the decoder's own distribution; each
sample earns its CIDEr-D against the image's references (document frequencies from the training
references, computed once: :mod:`captioning.cider`), minus a baseline: the mean reward of the
image's other samples (the "new self-critical" variant) or the reward of its greedy caption
(the original). The loss is REINFORCE's ``-(reward - baseline) * log p(sample)``: samples that
beat the baseline become more likely, the others less. Early stopping watches the validation
split's greedy CIDEr-D, not a loss.

Like cross-entropy training: sampling is seeded per (seed, epoch, batch) with stateless random
ops, each epoch ends with an atomic checkpoint, and a killed run resumes on the same path.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import numpy as np

from .decode import NEVER_GENERATED
from .errors import CaptioningError
from .feature_store import feature_identity
from .train import begin_or_resume, end_epoch, finish


@dataclasses.dataclass
class SCSTSettings:
    samples: int = 5  # captions sampled per image
    baseline: str = "mean"  # "mean": of the image's other samples; "greedy": its greedy caption's reward
    batch_size: int = 32  # images per step (each brings ``samples`` captions)
    learning_rate: float = 5e-5
    epochs: int = 10
    patience: int = 2  # epochs without a better val CIDEr-D before stopping
    max_length: int = 16  # words per sampled caption
    clip_norm: float = 5.0
    seed: int = 0


@dataclasses.dataclass
class ImageSet:
    """Images with their features and references: ``features`` (N, L, C), ``references`` [[ids]].

    ``features``: FeatureRows (read from disk per batch) or an in-memory array."""

    features: object
    references: list


def baseline(rewards, samples, greedy=None):
    """Per-sample baselines for ``rewards`` (B*K,), grouped by image (K = ``samples`` in a row).

    Without ``greedy``: each sample's baseline is the mean reward of its image's *other*
    samples, so it does not depend on the sample itself (the estimator stays unbiased). With
    ``greedy`` (B,): every sample of an image gets its greedy caption's reward.
    """
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, samples)  # (B, K)
    if greedy is not None:
        return np.repeat(np.asarray(greedy, dtype=np.float64), samples)
    if samples < 2:
        raise CaptioningError("the mean-of-others baseline needs at least 2 samples per image")
    return ((r.sum(axis=1, keepdims=True) - r) / (samples - 1)).reshape(-1)


def strip_end(seq, end_id):
    """Token ids up to (not including) the first ``end_id``."""
    seq = list(seq)
    return seq[: seq.index(end_id)] if end_id in seq else seq


def policy_logits(logits):
    """The logits of the policy SCST samples from and optimises: <pad>, <start>, <unk> excluded.

    The softmax over the remaining tokens is the distribution samples are drawn from, so the
    log-probabilities in the loss must come from it too. Taken over all tokens, every update
    with a negative advantage would push probability onto the never-sampled, never-penalised
    excluded tokens, draining the words' log-probabilities (beam search then favours ever
    shorter captions).
    """
    import tensorflow as tf

    banned = tf.reduce_max(tf.one_hot(NEVER_GENERATED, tf.shape(logits)[-1]), axis=0) > 0  # (V,)
    return tf.where(banned, tf.constant(-1e9, logits.dtype), logits)


def policy_mask(seqs, max_length):
    """(N, T) float mask of the sampled tokens the policy chose: the drawn words and a drawn <end>.
    The <end> the sampler writes after ``max_length`` words is no action of the policy: it gets no
    credit or blame."""
    import tensorflow as tf

    drawn = tf.range(tf.shape(seqs)[1])[None, :] < max_length
    return tf.cast((seqs > 0) & drawn, tf.float32)


def make_sampler(decoder, start_id, end_id, max_length):
    """A compiled function: features (B, L, C), seed (2,) -> sampled ids (B, max_length + 1), 0-padded.

    Each row samples from the decoder's distribution (<pad>, <start>, <unk> excluded) until it
    draws ``<end>``, which is kept; a row still open after ``max_length`` words gets ``<end>``.
    """
    import tensorflow as tf

    @tf.function(reduce_retracing=True)
    def sample(features, seed):
        state = decoder.initial_state(features)
        n = tf.shape(features)[0]
        tokens = tf.fill([n], start_id)
        done = tf.zeros([n], tf.bool)
        out = tf.TensorArray(tf.int32, size=max_length + 1)
        seeds = tf.random.experimental.stateless_split(seed, num=max_length)
        for t in range(max_length):  # unrolled: the transformer's state grows with every step
            log_probs, state, _ = decoder.step(tokens, state)
            log_probs = policy_logits(log_probs)  # categorical renormalises over the rest
            drawn = tf.cast(tf.random.stateless_categorical(log_probs, 1, seed=seeds[t])[:, 0], tf.int32)
            drawn = tf.where(done, 0, drawn)  # finished rows are padded
            out = out.write(t, drawn)
            done = done | tf.equal(drawn, end_id)
            tokens = tf.where(done, end_id, drawn)
        out = out.write(max_length, tf.where(done, 0, end_id))  # close rows at the word limit
        return tf.transpose(out.stack())  # (B, max_length + 1)

    return sample


def fine_tune(
    decoder,
    vocab,
    train: ImageSet,
    val: ImageSet,
    scorer,
    val_scorer,
    settings: SCSTSettings,
    checkpoint_dir,
    on_epoch=None,
    progress=True,
    log=print,
):
    """Fine-tune ``decoder`` in place for CIDEr-D; leaves the best (val CIDEr-D) weights in it.

    ``scorer``/``val_scorer``: :class:`captioning.cider.CiderD` over the training / validation
    references. Returns the final state (history of val CIDEr-D, rewards, seconds per epoch).
    """
    import keras
    import tensorflow as tf
    from tqdm import tqdm

    from .beam import beam_search
    from .decode import make_step_fn
    from .decoders.base import dense_gradients

    if settings.baseline not in ("mean", "greedy"):
        raise CaptioningError(f"unknown SCST baseline {settings.baseline!r} (mean or greedy)")
    K, B = settings.samples, settings.batch_size
    decoder.build()
    optimizer = keras.optimizers.Adam(settings.learning_rate)
    optimizer.build(decoder.trainable_variables)
    sample = make_sampler(decoder, vocab.start_id, vocab.end_id, settings.max_length)
    step_fn = make_step_fn(decoder, top_k=2, end_id=vocab.end_id)  # greedy: beam 1 reads 2 candidates
    train_refs = [[scorer.vector(r) for r in refs] for refs in train.references]  # prepared once
    val_refs = [[val_scorer.vector(r) for r in refs] for refs in val.references]
    L, C = train.features.shape[1:]

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, L, C], tf.float32),
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.float32),
        ]
    )
    def train_step(feats, seqs, advantage):
        inputs = tf.concat([tf.fill([tf.shape(seqs)[0], 1], vocab.start_id), seqs[:, :-1]], axis=1)
        mask = policy_mask(seqs, settings.max_length)
        with tf.GradientTape() as tape:
            # No dropout: the policy that sampled. Only the sampled steps run (packed, for recurrent decoders).
            logits, _ = decoder.forward(feats, inputs, lengths=tf.cast(tf.reduce_sum(mask, axis=1), tf.int32))
            logits = policy_logits(logits)
            logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=seqs, logits=logits)  # (N, T)
            loss = -tf.reduce_mean(advantage * tf.reduce_sum(logp * mask, axis=1))
        grads = dense_gradients(tape.gradient(loss, decoder.trainable_variables), decoder.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, settings.clip_norm)
        optimizer.apply_gradients(zip(grads, decoder.trainable_variables))
        return loss

    def greedy(features):
        seqs = []
        for i in range(0, len(features), 64):
            state = decoder.initial_state(features[i : i + 64])
            got, _, _ = beam_search(
                step_fn,
                state,
                len(state[0]),
                1,
                settings.max_length,
                vocab.start_id,
                vocab.end_id,
                static=step_fn.static,
                take=step_fn.take,
            )
            seqs.extend(got)
        return seqs

    def val_cider():
        caps = greedy(val.features)
        return float(np.mean([val_scorer.score(val_scorer.vector(c), refs) for c, refs in zip(caps, val_refs)]))

    fingerprint = _fingerprint(decoder, settings, train, val)

    def fresh():
        start = val_cider()  # the cross-entropy model's score: the bar to beat
        log(f"SCST: val CIDEr-D {start:.4f} before fine-tuning")
        return {
            "fingerprint": fingerprint,
            "epoch": 0,
            "step": 0,
            "start_val_cider": start,
            "best_val_cider": start,
            "best_epoch": 0,
            "bad_epochs": 0,
            "history": [],
            "complete": False,
        }

    state, best_weights = begin_or_resume(checkpoint_dir, decoder, optimizer, fingerprint, fresh, on_epoch, log)

    while state["epoch"] < settings.epochs and state["bad_epochs"] < settings.patience:
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        order = np.random.default_rng([settings.seed, epoch]).permutation(len(train.features))
        rewards_seen, lengths = [], []
        n_batches = (len(order) + B - 1) // B
        for b in tqdm(range(n_batches), desc=f"scst {epoch}", unit="batch", disable=not progress, leave=False):
            idx = np.sort(order[b * B : (b + 1) * B])  # sorted rows: h5py-friendly, same set
            feats = np.repeat(train.features[idx], K, axis=0)  # (B*K, L, C)
            state["step"] += 1
            seqs = sample(tf.constant(feats), tf.constant([settings.seed, state["step"]], tf.int32)).numpy()
            caps = [strip_end(s, vocab.end_id) for s in seqs]
            rewards = np.array([scorer.score(scorer.vector(c), train_refs[idx[j // K]]) for j, c in enumerate(caps)])
            if settings.baseline == "greedy":
                g = greedy(train.features[idx])
                base = baseline(rewards, K, [scorer.score(scorer.vector(c), train_refs[i]) for c, i in zip(g, idx)])
            else:
                base = baseline(rewards, K)
            train_step(tf.constant(feats), tf.constant(seqs, tf.int32), tf.constant(rewards - base, tf.float32))
            rewards_seen.append(rewards.mean())
            lengths.extend(len(c) for c in caps)
        score = val_cider()
        metrics = {
            "epoch": epoch,
            "val_cider": round(score, 6),
            "train_reward": round(float(np.mean(rewards_seen)), 6),
            "sample_words": round(float(np.mean(lengths)), 3),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(
            f"scst epoch {epoch}: val CIDEr-D {score:.4f}, mean sample reward {metrics['train_reward']:.4f}"
            f" ({metrics['seconds']:.0f}s)"
        )
        best_weights = end_epoch(
            state,
            metrics,
            score > state["best_val_cider"],
            {"best_val_cider": score},
            decoder,
            optimizer,
            best_weights,
            checkpoint_dir,
            on_epoch,
        )
    return finish(checkpoint_dir, decoder, optimizer, state, best_weights)


def _fingerprint(decoder, settings, train, val) -> str:
    """Identity of a fine-tuning trajectory (``epochs``/``patience`` only say when to stop)."""
    h = hashlib.blake2b(digest_size=16)
    path = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("epochs", "patience")}
    h.update(json.dumps([type(decoder).__name__, decoder.settings(), path], sort_keys=True).encode())
    for w in decoder.weights:  # the starting model
        h.update(np.ascontiguousarray(np.asarray(w)).tobytes())
    for data in (train, val):
        h.update(feature_identity(data.features).encode())  # by identity: never every feature byte
        h.update(json.dumps(data.references, default=int).encode())
    return h.hexdigest()
