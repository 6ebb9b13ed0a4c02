"""Self-critical sequence training (Rennie et al., CVPR 2017): fine-tune a decoder for CIDEr-D.

Each image's caption is sampled ``samples`` times from the decoder's own distribution; each
sample earns its CIDEr-D against the image's references (document frequencies from the training
references, computed once: :mod:`captioning.cider`), minus a baseline: the mean reward of the
image's other samples (the "new self-critical" variant) or the reward of its greedy caption
(the original). The loss is REINFORCE's ``-(reward - baseline) * log p(sample)``: samples that
beat the baseline become more likely, the others less. Early stopping watches the validation
split's greedy CIDEr-D, not a loss. Two regularisers for small datasets, where the policy soon
fits the training images' references: dropout in the update's forward pass (``dropout``), and the
cross-entropy of the batch images' references added to the loss (``xe_weight``), which keeps
human wording likely as CIDEr-D is chased. ``bleu_weight`` adds that much of each caption's
sentence BLEU-4 to its reward, for users who report BLEU; early stopping still watches CIDEr-D.

Like cross-entropy training: sampling is seeded per (seed, epoch, batch) with stateless random
ops, each epoch ends with an atomic checkpoint, and a killed run resumes on the same path.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import config, lifecycle
from .errors import CaptioningError
from .vocab import NEVER_GENERATED


@dataclasses.dataclass
class FinetuneSettings:
    """The ``finetune`` section of params.yaml (no defaults here: params.yaml holds them)."""

    enabled: bool = config.field()  # false: the cross-entropy model passes through unchanged
    samples: int = config.field(lo=1, hi=64)  # captions sampled per image (the mean baseline needs 2)
    baseline: str = config.field(choices=("mean", "greedy"))  # mean of the other samples, or greedy's reward
    batch_size: int = config.field(lo=1)  # images per step (each brings ``samples`` captions)
    learning_rate: float = config.field(lo=1e-8, hi=1.0)
    epochs: int = config.field(lo=1)
    patience: int = config.field(lo=1)  # epochs without a better val CIDEr-D before stopping
    max_length: int = config.field(lo=1, hi=200)  # words per sampled caption
    clip_norm: float = config.field(lo=0.0)
    dropout: bool = config.field()  # the loss's forward pass drops out at the decoder's rate (sampling never does)
    xe_weight: float = config.field(lo=0.0)  # >0: plus this times the cross-entropy of the images' references
    bleu_weight: float = config.field(lo=0.0)  # >0: the reward adds this times the caption's sentence BLEU-4

    def validate(self, section):
        if self.baseline == "mean" and self.samples < 2:
            raise CaptioningError(
                f"{section}.samples: the mean baseline averages an image's other samples, so it needs 2 or more"
                f" (got {self.samples}; or set {section}.baseline: greedy)"
            )


@dataclasses.dataclass
class ImageSet:
    """Images with their features and references: ``features`` (N, L, C), ``references`` [[ids]].

    ``features``: FeatureRows (read from disk per batch) or an in-memory array."""

    features: object
    references: list


def image_set(store, captions_h5, split, vocab) -> ImageSet:
    """The split's images with features (read from disk per batch) and their references (token
    ids: the words and ``<unk>``, no padding, ``<start>`` or ``<end>``)."""
    from .vocab import load_encoded

    images, tokens = load_encoded(captions_h5, split)
    markers = {vocab.pad_id, vocab.start_id, vocab.end_id}
    refs = {}
    for image, row in zip(images, tokens):
        if image in store.index:  # images the features stage skipped are left out
            refs.setdefault(image, []).append([int(t) for t in row if t not in markers])
    keys = sorted(refs)
    return ImageSet(store.rows(keys), [refs[k] for k in keys])


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


def sentence_bleu4(caption, references) -> float:
    """BLEU-4 of one caption (token ids) against its references (nltk: the closest reference
    length for the brevity penalty; smoothing 1 of Chen & Cherry, 2014, so a caption without a
    matching 4-gram still earns by its shorter n-grams instead of scoring 0)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if not caption:
        return 0.0
    return float(sentence_bleu(references, caption, smoothing_function=SmoothingFunction().method1))


class Reward:
    """A caption's SCST reward: its CIDEr-D (``scorer``: :class:`captioning.cider.CiderD`) plus
    ``bleu_weight`` times its sentence BLEU-4, against one image's references; ``ref_vecs`` are
    their CIDEr-D vectors (prepared once), ``refs`` their token ids."""

    def __init__(self, scorer, bleu_weight=0.0):
        self.scorer, self.bleu_weight = scorer, bleu_weight

    def __call__(self, caption, ref_vecs, refs) -> float:
        r = self.scorer.score(self.scorer.vector(caption), ref_vecs)
        if self.bleu_weight:
            r += self.bleu_weight * sentence_bleu4(caption, refs)
        return r


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


def fine_tune_model(model, store, captions_h5, settings: FinetuneSettings, seed, checkpoint_dir, on_epoch=None, **kw):
    """:func:`fine_tune` of a trained model (a :class:`captioning.model_folder.TrainedModel`, changed
    in place) on the train split of ``captions_h5`` over ``store``'s features, early-stopped on
    the val split's CIDEr-D (document frequencies: each split's own references)."""
    from .cider import CiderD

    store.check_encoder(model.encoder, model.folder)
    vocab = model.vocab
    train, val = image_set(store, captions_h5, "train", vocab), image_set(store, captions_h5, "val", vocab)
    base = len(vocab) + 1  # token ids are digits of this base in the n-gram keys
    scorers = CiderD(train.references, base), CiderD(val.references, base)
    return fine_tune(model.decoder, vocab, train, val, *scorers, settings, seed, checkpoint_dir, on_epoch, **kw)


def fine_tune(
    decoder,
    vocab,
    train: ImageSet,
    val: ImageSet,
    scorer,
    val_scorer,
    settings: FinetuneSettings,
    seed: int,
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

    decoder.build()
    optimizer = keras.optimizers.Adam(settings.learning_rate)
    optimizer.build(decoder.trainable_variables)
    policy = _Policy(decoder, vocab, optimizer, settings, train.features.shape[1:])
    train_refs = [[scorer.vector(r) for r in refs] for refs in train.references]  # prepared once
    val_refs = [[val_scorer.vector(r) for r in refs] for refs in val.references]

    def val_cider():
        caps = policy.greedy(val.features)
        return float(np.mean([val_scorer.score(val_scorer.vector(c), refs) for c, refs in zip(caps, val_refs)]))

    path = {**dataclasses.asdict(settings), "seed": seed}
    weights = [np.asarray(w) for w in decoder.weights]  # the starting model
    fingerprint = lifecycle.fingerprint(
        decoder, path, weights, (train.features, val.features), (train.references, val.references)
    )

    def fresh():
        start = val_cider()  # the cross-entropy model's score: the bar to beat
        log(f"SCST: val CIDEr-D {start:.4f} before fine-tuning")
        return lifecycle.fresh_state(fingerprint, start_val_cider=start, best_val_cider=start)

    state, best_weights = lifecycle.begin_or_resume(
        checkpoint_dir, decoder, optimizer, fingerprint, fresh, on_epoch, log
    )
    reward = Reward(scorer, settings.bleu_weight)
    while lifecycle.running(state, settings):
        t0 = time.perf_counter()
        epoch, rewards, lengths = _epoch(state, policy, train, train_refs, reward, settings, seed, progress)
        score = val_cider()
        metrics = {
            "epoch": epoch,
            "val_cider": round(score, 6),
            "train_reward": round(float(np.mean(rewards)), 6),
            "sample_words": round(float(np.mean(lengths)), 3),
            "seconds": round(time.perf_counter() - t0, 2),
        }
        log(
            f"scst epoch {epoch}: val CIDEr-D {score:.4f}, mean sample reward {metrics['train_reward']:.4f}"
            f" ({metrics['seconds']:.0f}s)"
        )
        improved = score > state["best_val_cider"]
        best_weights = lifecycle.end_epoch(
            state, metrics, improved, {"best_val_cider": score}, decoder, optimizer, best_weights, checkpoint_dir,
            on_epoch,
        )  # fmt: skip
    return lifecycle.finish(checkpoint_dir, decoder, optimizer, state, best_weights)


def _epoch(state, policy, train, train_refs, reward, settings, seed, progress):
    """One SCST epoch over ``train`` (``train_refs``: its references as CIDEr-D vectors; ``reward``:
    a :class:`Reward`; ``state["step"]`` advances): ``(epoch, mean rewards per batch, sampled caption lengths)``."""
    import tensorflow as tf
    from tqdm import tqdm

    K, B = settings.samples, settings.batch_size
    epoch = state["epoch"] + 1
    order = np.random.default_rng([seed, epoch]).permutation(len(train.features))
    rewards_seen, lengths = [], []
    n_batches = (len(order) + B - 1) // B
    for b in tqdm(range(n_batches), desc=f"scst {epoch}", unit="batch", disable=not progress, leave=False):
        idx = np.sort(order[b * B : (b + 1) * B])  # sorted rows: h5py-friendly, same set
        image_feats = train.features[idx]  # (B, L, C)
        feats = np.repeat(image_feats, K, axis=0)  # (B*K, L, C)
        state["step"] += 1
        seqs = policy.sample(tf.constant(feats), tf.constant([seed, state["step"]], tf.int32)).numpy()
        caps = [strip_end(s, policy.vocab.end_id) for s in seqs]
        owners = idx[np.arange(len(caps)) // K]  # each sample's image
        rewards = np.array([reward(c, train_refs[i], train.references[i]) for c, i in zip(caps, owners)])
        if settings.baseline == "greedy":
            g = policy.greedy(image_feats)
            base = baseline(rewards, K, [reward(c, train_refs[i], train.references[i]) for c, i in zip(g, idx)])
        else:
            base = baseline(rewards, K)
        advantage, step_seed = tf.constant(rewards - base, tf.float32), tf.constant([seed, state["step"]])
        ref_feats, refs = policy.references(image_feats, [train.references[i] for i in idx])
        policy.train_step(tf.constant(feats), tf.constant(seqs, tf.int32), advantage, step_seed, ref_feats, refs)
        rewards_seen.append(rewards.mean())
        lengths.extend(len(c) for c in caps)
    return epoch, rewards_seen, lengths


class _Policy:
    """The decoder as SCST's policy: ``sample`` (compiled), ``greedy`` captions and the
    REINFORCE ``train_step`` (compiled once for any batch and caption length)."""

    def __init__(self, decoder, vocab, optimizer, settings, feature_shape):
        import tensorflow as tf

        from .decode import make_step_fn

        self.decoder, self.vocab, self.max_length = decoder, vocab, settings.max_length
        self.sample = make_sampler(decoder, vocab.start_id, vocab.end_id, settings.max_length)
        self._step = make_step_fn(decoder, top_k=2, end_id=vocab.end_id)  # greedy: beam 1 reads 2 candidates
        L, C = feature_shape
        signature = [tf.TensorSpec([None, L, C], tf.float32), tf.TensorSpec([None, None], tf.int32),
                     tf.TensorSpec([None], tf.float32), tf.TensorSpec([2], tf.int32),
                     tf.TensorSpec([None, L, C], tf.float32), tf.TensorSpec([None, None], tf.int32)]  # fmt: skip
        self.train_step = tf.function(self._train_step, input_signature=signature)
        self._optimizer, self._clip_norm, self._dropout = optimizer, settings.clip_norm, settings.dropout
        self._xe_weight = settings.xe_weight

    def references(self, image_feats, references):
        """The cross-entropy term's inputs: features (R, L, C) and ``<start>`` words ``<end>`` rows
        (R, T) of every reference of the batch's images (empty when the term is off)."""
        import tensorflow as tf

        if self._xe_weight == 0:
            return tf.zeros([0, *image_feats.shape[1:]]), tf.zeros([0, 2], tf.int32)
        v = self.vocab
        rows = [[v.start_id, *r, v.end_id] for refs in references for r in refs]
        tokens = np.zeros((len(rows), max(map(len, rows))), np.int32)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = r
        counts = [len(refs) for refs in references]
        return tf.constant(np.repeat(image_feats, counts, axis=0)), tf.constant(tokens)

    def _train_step(self, feats, seqs, advantage, seed, ref_feats, refs):
        import tensorflow as tf

        from .decoders.base import dense_gradients, dropout_seeds

        decoder, vocab = self.decoder, self.vocab
        inputs = tf.concat([tf.fill([tf.shape(seqs)[0], 1], vocab.start_id), seqs[:, :-1]], axis=1)
        mask = policy_mask(seqs, self.max_length)
        with tf.GradientTape() as tape:
            # Only the sampled steps run (packed, for recurrent decoders). Without dropout this is the
            # policy that sampled; with it, the update is regularised as cross-entropy training is.
            lengths = tf.cast(tf.reduce_sum(mask, axis=1), tf.int32)
            logits, _ = decoder.forward(feats, inputs, dropout_seed=seed if self._dropout else None, lengths=lengths)
            logits = policy_logits(logits)
            logp = -tf.nn.sparse_softmax_cross_entropy_with_logits(labels=seqs, logits=logits)  # (N, T)
            loss = -tf.reduce_mean(advantage * tf.reduce_sum(logp * mask, axis=1))
            if self._xe_weight > 0:
                loss += self._xe_weight * self._reference_loss(ref_feats, refs, dropout_seeds(seed)[1])
        grads = dense_gradients(tape.gradient(loss, decoder.trainable_variables), decoder.trainable_variables)
        grads, _ = tf.clip_by_global_norm(grads, self._clip_norm)
        self._optimizer.apply_gradients(zip(grads, decoder.trainable_variables))
        return loss

    def _reference_loss(self, feats, refs, seed):
        """Mean cross-entropy of the references (R, T) under the policy (its banned tokens left
        out: an ``<unk>`` in a reference is not scored)."""
        import tensorflow as tf

        from .decoders.base import masked_cross_entropy_sum

        inputs, targets = refs[:, :-1], refs[:, 1:]
        lengths = tf.reduce_sum(tf.cast(targets > 0, tf.int32), axis=1)
        logits, _ = self.decoder.forward(feats, inputs, dropout_seed=seed if self._dropout else None, lengths=lengths)
        scored = tf.where(tf.equal(targets, self.vocab.unk_id), 0, targets)  # (R, T); 0 is not scored
        total, count = masked_cross_entropy_sum(policy_logits(logits), scored)
        return total / tf.maximum(count, 1.0)

    def greedy(self, features):
        """Greedy captions (token lists) of ``features``, 64 images at a time."""
        from .beam import beam_search

        seqs = []
        for i in range(0, len(features), 64):
            state = self.decoder.initial_state(features[i : i + 64])
            got, _, _ = beam_search(
                self._step, state, len(state[0]), 1, self.max_length, self.vocab.start_id, self.vocab.end_id
            )
            seqs.extend(got)
        return seqs
