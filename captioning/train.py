"""Teacher-forced training: the train section's settings, the epoch loop and its compiled steps.

Batches are drawn from an RNG seeded by ``(seed, epoch)`` and dropout masks from ``(seed,
step)``, so a run resumed from its checkpoint (:mod:`captioning.lifecycle`) follows exactly
the path of one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from . import config, lifecycle
from .caption_set import CaptionSet
from .errors import CaptioningError


@dataclasses.dataclass
class TrainSettings:
    """The ``train`` section of params.yaml: the decoder and how it is trained (no defaults here:
    params.yaml holds them)."""

    decoder: str = config.field()  # a captioning.decoders.DECODERS entry
    attention: bool = config.field()  # soft attention over the feature map; false = image as initial state
    blind: bool = config.field()  # zero the image features (the no-image baseline)
    embed_dim: int = config.field(lo=1)
    units: int = config.field(lo=1)
    attention_units: int = config.field(lo=1)
    num_layers: int = config.field(lo=1, hi=24)
    num_heads: int = config.field(lo=1, hi=64)
    dropout: float = config.field(lo=0.0, hi=0.95)
    attention_reg: float = config.field(lo=0.0)  # weight of the decoder's own term (the attention prior)
    label_smoothing: float = config.field(lo=0.0, hi=0.5)  # training targets (1 - eps) one-hot + eps / V
    batch_size: int = config.field(lo=1)
    learning_rate: float = config.field(lo=1e-7, hi=1.0)
    lr_decay: float = config.field(lo=0.01, hi=1.0)  # epoch e trains at learning_rate * lr_decay**(e-1)
    epochs: int = config.field(lo=1)
    patience: int = config.field(lo=1)  # epochs without a lower val loss before stopping
    clip_norm: float = config.field(lo=0.0)
    bucket: int = config.field(lo=0)  # batches per length-sorted pool (0: plain shuffle); less padding
    read_block: int = config.field(lo=1)  # images per shuffled block of feature rows (1: full shuffle)
    strategy: str = config.field(choices=("auto", "default", "mirrored", "multi_worker"))  # captioning.distribute
    jit: bool = config.field()  # XLA-compile the training step (one compile per batch shape)
    precision: str = config.field(choices=("float32", "mixed_bfloat16"))  # captioning.decoders.PRECISIONS

    def validate(self, section):
        from .decoders import DECODERS

        if self.decoder not in DECODERS:
            raise CaptioningError(f"{section}.decoder: must be one of {', '.join(DECODERS)}; got {self.decoder!r}")
        cls = DECODERS[self.decoder]
        optional = "attention" in cls.SETTINGS  # else the decoder reads the image only through attention
        if not optional and not self.attention:
            raise CaptioningError(
                f"{section}.attention: the {self.decoder} decoder reads the image only through attention; set it true"
            )
        if self.attention_reg > 0 and not (cls.ATTENTION_PRIOR and self.attention):
            raise CaptioningError(
                f"{section}.attention_reg: {self.attention_reg}, but the {self.decoder} decoder"
                f"{' without attention' if optional else ''} has no attention prior to weigh (set it to 0)"
            )

    def decoder_settings(self) -> dict:
        """The constructor arguments of the chosen decoder (its ``SETTINGS``)."""
        from .decoders import DECODERS

        return {k: getattr(self, k) for k in DECODERS[self.decoder].SETTINGS}


LOGGED = ("train_loss", "val_loss", "val_perplexity", "learning_rate")  # per-epoch curves


def best_epoch_metrics(state) -> dict:
    """What the saved model scored: the best epoch's row of the history (not the last epoch's),
    with the epoch it came from and how many epochs ran."""
    best = state["history"][state["best_epoch"] - 1]
    return {**{k: best[k] for k in LOGGED}, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"]}


def train_decoder(store, vocab, captions_h5, settings: TrainSettings, seed: int, checkpoint_dir, **fit_args):
    """``(decoder, final state)``: a new decoder of ``settings`` trained (:func:`fit`, which takes
    ``fit_args``) on the train split of ``captions_h5`` (the vocab stage's file) over the features
    in ``store`` (the mirror images too where it has them), early-stopped on the val split."""
    from .caption_set import caption_set
    from .decoders import build_decoder

    train, val = caption_set(store, captions_h5, "train", vocab), caption_set(store, captions_h5, "val")
    model = build_decoder(
        settings.decoder,
        vocab_size=len(vocab),
        feature_dim=store.feature_dim,
        num_locations=store.num_locations,
        blind=settings.blind,
        precision=settings.precision,
        **settings.decoder_settings(),
    )
    model.check_max_length(train.tokens.shape[1] - 2, f"{captions_h5} (vocab.max_length)")
    return model, fit(model, train, val, settings, seed, checkpoint_dir, **fit_args)


def fingerprint(model, train: CaptionSet, val: CaptionSet, settings: TrainSettings, seed: int) -> str:
    """The identity of a training path (:func:`captioning.lifecycle.fingerprint`): the model, the
    settings and seed, the captions and the features by identity (any strategy: the same path)."""
    path = {**dataclasses.asdict(settings), "seed": seed, "strategy": None}
    data = [d for s in (train, val) for d in (s.tokens, s.image_rows, s.mirror_rows, s.mirror_words) if d is not None]
    return lifecycle.fingerprint(model, path, data, (train.features, val.features))


def fit(
    model,
    train: CaptionSet,
    val: CaptionSet,
    settings: TrainSettings,
    seed: int,
    checkpoint_dir,
    on_epoch=None,
    progress=True,
    log=print,
    strategy=None,
):
    """Train ``model`` in place; leaves the best (lowest val loss) weights in it.

    ``on_epoch(epoch, metrics)`` is called after every epoch, also for epochs replayed from
    a checkpoint, so loggers see the full history. ``strategy``: a ``tf.distribute`` strategy
    (captioning.distribute; None: no distribution); only its chief writes the checkpoint.
    Returns the final state dict.
    """
    import keras
    import tensorflow as tf

    from .distribute import is_chief, local_replica_ids

    if len(train.tokens) == 0 or len(val.tokens) == 0:
        raise CaptioningError("training needs captions in both the train and the val split")
    strategy = strategy or tf.distribute.get_strategy()
    local, chief = local_replica_ids(strategy), is_chief(strategy)
    with strategy.scope():  # the variables: mirrored on every replica
        model.build()
        optimizer = keras.optimizers.Adam(settings.learning_rate)
        optimizer.build(model.trainable_variables)
    steps = _steps(model, optimizer, settings, strategy, train.features.shape[1:], local)
    fp = fingerprint(model, train, val, settings, seed)
    state, best_weights = lifecycle.begin_or_resume(
        checkpoint_dir,
        model,
        optimizer,
        fp,
        lambda: lifecycle.fresh_state(fp, best_val_loss=None),
        on_epoch,
        log,
    )
    if strategy.num_replicas_in_sync > 1:
        _check_agreement(strategy, state, checkpoint_dir)
    while lifecycle.running(state, settings):
        metrics, val_loss = _epoch(state, model, optimizer, steps, train, val, settings, seed, strategy, progress)
        log(
            f"epoch {metrics['epoch']}: train_loss {metrics['train_loss']:.4f} val_loss {val_loss:.4f}"
            f" ({metrics['seconds']:.0f}s)"
        )
        improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
        best_weights = lifecycle.end_epoch(
            state,
            metrics,
            improved,
            {"best_val_loss": val_loss},
            model,
            optimizer,
            best_weights,
            checkpoint_dir if chief else None,
            on_epoch,
        )
    return lifecycle.finish(checkpoint_dir if chief else None, model, optimizer, state, best_weights)


def _epoch(state, model, optimizer, steps, train, val, settings, seed, strategy, progress):
    """Train one epoch (``state["step"]`` advances), then the val loss: ``(the epoch's metrics,
    the val loss unrounded)``."""
    import tensorflow as tf
    from tqdm import tqdm

    from .distribute import local_replica_ids, worker_name

    train_step, val_step, inputs = steps
    replicas, local = strategy.num_replicas_in_sync, local_replica_ids(strategy)
    epoch, t0 = state["epoch"] + 1, time.perf_counter()
    # Set from the epoch number alone, so a resumed run trains at the same rate.
    lr = settings.learning_rate * settings.lr_decay ** (epoch - 1)
    optimizer.learning_rate.assign(lr)
    # With length buckets a batch of short captions has few tokens; dividing its loss by its
    # own token count would weigh each of those tokens more than a long caption's. Dividing by
    # the epoch's mean tokens per batch instead weighs every token alike, as a shuffled epoch
    # does on average. Without buckets the batch's own count is used, as always.
    per_batch = float((train.tokens[:, 1:] > 0).sum()) * settings.batch_size / len(train.tokens)

    def batches(data, rng=None):
        return data.replica_batches(
            settings.batch_size, rng, bucket=settings.bucket, block=settings.read_block, replicas=replicas, local=local
        )

    total, n = 0.0, 0
    n_batches = (len(train.tokens) + settings.batch_size - 1) // settings.batch_size
    rng = np.random.default_rng([seed, epoch])
    bar = tqdm(batches(train, rng), total=n_batches, desc=f"epoch {epoch}", unit="batch", disable=not progress,
               leave=False)  # fmt: skip
    try:
        for n_rows, n_tokens, parts in bar:
            state["step"] += 1
            step_seed = tf.constant([seed, state["step"]], tf.int32)
            norm = tf.constant(per_batch if settings.bucket > 1 else max(n_tokens, 1), tf.float32)
            loss, ce_sum, count = (float(x) for x in train_step(*inputs(parts, n_rows), step_seed, norm))
            if not np.isfinite(loss):
                raise CaptioningError(
                    f"training diverged at epoch {epoch} step {state['step']} (loss {loss}); lower train.learning_rate"
                )
            total, n = total + ce_sum, n + count  # train_loss: the training loss per real token
            bar.set_postfix(loss=f"{total / n:.3f}")
        ce, count = 0.0, 0.0
        for n_rows, _, parts in batches(val):
            s, c = val_step(*inputs(parts, n_rows)[:2])
            ce, count = ce + float(s), count + float(c)
    except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError) as e:
        if replicas == 1:
            raise
        raise CaptioningError(
            f"{worker_name(strategy)}: lost another worker at epoch {epoch} step {state['step']} "
            f"({type(e).__name__}). Start every worker again with the same command: training resumes "
            f"from the checkpoint after epoch {state['epoch']}."
        ) from None
    val_loss = ce / count
    metrics = {
        "epoch": epoch,
        "train_loss": round(total / n, 6),
        "val_loss": round(val_loss, 6),
        "val_perplexity": round(float(np.exp(val_loss)), 4),
        "learning_rate": float(f"{lr:.6g}"),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    return metrics, val_loss


def _steps(model, optimizer, settings, strategy, feature_shape, local):
    """``(train_step, val_step, inputs)``: the compiled steps over ``strategy``'s replicas, and
    ``inputs(parts, n)``, which turns one batch's per-replica parts into what they take.

    ``train_step(feats, tokens, rows, seed, norm) -> (loss, summed cross-entropy, tokens)``,
    ``val_step(feats, tokens) -> (summed cross-entropy, tokens)``, each summed over replicas.
    """
    import tensorflow as tf

    L, C = feature_shape
    replicas = strategy.num_replicas_in_sync
    sig = [tf.TensorSpec([None, L, C], tf.float32), tf.TensorSpec([None, None], tf.int32)]
    vec, scalar = tf.TensorSpec([2], tf.int32), tf.TensorSpec([], tf.float32)
    loss_and_gradients, val_loss_sum = _replica_losses(model, settings, replicas)
    # train.jit: XLA fuses the many small element-wise ops of a step into few kernels.
    compiled = (lambda fn: tf.function(fn, jit_compile=True, autograph=False)) if settings.jit else (lambda fn: fn)
    grads_step, replica_val_step = compiled(loss_and_gradients), compiled(val_loss_sum)

    def replica_train_step(feats, tokens, rows, seed, norm):
        loss, ce_sum, count, grads = grads_step(feats, tokens, rows, seed, norm)
        if replicas > 1:  # clip the whole batch's gradient, as one process would
            grads = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, grads)
        grads, _ = tf.clip_by_global_norm(grads, settings.clip_norm)
        if replicas > 1:  # Keras' apply_gradients sums over the replicas once more
            grads = [g / replicas for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        return loss, ce_sum, count

    # autograph=False: the steps have no Python control flow over tensors (the time loop is an
    # explicit tf.while_loop), and converting their source took seconds at every start.
    if replicas == 1:  # one signature: no retracing for new batch or caption lengths
        train_step = tf.function(replica_train_step, input_signature=sig + [vec, vec, scalar], autograph=False)
        val_step = tf.function(replica_val_step, input_signature=sig, autograph=False)
    else:

        def summed(fn):
            @tf.function(reduce_retracing=True, autograph=False)
            def run(*args):
                out = strategy.run(fn, args=args)
                return [strategy.reduce(tf.distribute.ReduceOp.SUM, x, axis=None) for x in out]

            return run

        train_step, val_step = summed(replica_train_step), summed(replica_val_step)

    def inputs(parts, n):
        """Per-replica (features, tokens, rows) of one batch, as the step takes them."""
        values = [(f, t, np.array([offset, n], np.int32)) for f, t, offset in parts]
        if replicas == 1:
            return values[0]
        return tuple(
            strategy.experimental_distribute_values_from_function(
                lambda ctx, i=i: values[local.index(ctx.replica_id_in_sync_group)][i]
            )
            for i in range(3)
        )

    return train_step, val_step, inputs


def _replica_losses(model, settings, replicas):
    """``(loss_and_gradients, val_loss_sum)``: one replica's training loss with its gradients,
    and its summed validation cross-entropy."""
    import tensorflow as tf

    from .decoders.base import RowSeed, dense_gradients, masked_cross_entropy_sum

    def forward(feats, inputs, targets, seed=None):
        """Logits of the real steps only, packed (N, V) at ``aux["index"]`` (padding is neither
        computed nor scored); under XLA, which needs shapes fixed when it compiles, (B, T, V)."""
        if settings.jit:
            return model.forward(feats, inputs, seed)
        lengths = tf.reduce_sum(tf.cast(targets > 0, tf.int32), axis=1)  # (B,) each caption's real steps
        return model.forward(feats, inputs, seed, lengths=lengths, packed=True)

    def loss_and_gradients(feats, tokens, rows, seed, norm):
        """One replica's slice: rows = [its first row, rows in the whole batch]; norm = the
        whole batch's loss divisor, so the replicas' gradients add up to the batch's."""
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        with tf.GradientTape() as tape:
            # Masks drawn for all replicas' rows (padding included: a size known when compiling)
            # and cut at this replica's; row i's mask is the same for any padded size (tested).
            padded = tf.shape(tokens)[0] * replicas
            logits, aux = forward(feats, inputs, targets, RowSeed(seed, rows[0], padded))
            ce_sum, count = masked_cross_entropy_sum(logits, targets, aux.get("index"), settings.label_smoothing)
            loss = ce_sum / norm
            if settings.attention_reg > 0:  # the decoder's own term (the attention prior), a mean
                share = tf.cast(tf.shape(tokens)[0], tf.float32) / tf.cast(rows[1], tf.float32)  # over rows
                extra = tf.cast(model.extra_loss(aux, tf.cast(targets > 0, logits.dtype)), tf.float32)
                loss += settings.attention_reg * extra * share
        grads = dense_gradients(tape.gradient(loss, model.trainable_variables), model.trainable_variables)
        return loss, ce_sum, count, grads

    def val_loss_sum(feats, tokens):
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        logits, aux = forward(feats, inputs, targets)
        return masked_cross_entropy_sum(logits, targets, aux.get("index"))

    return loss_and_gradients, val_loss_sum


def _check_agreement(strategy, state, checkpoint_dir):
    """Fail unless every worker starts from the same point (the same data, the same checkpoint)."""
    import tensorflow as tf

    mine = np.array([state["step"], int(state["fingerprint"][:5], 16)], np.int64)
    value = strategy.experimental_distribute_values_from_function(lambda ctx: tf.constant([*mine, *mine**2]))
    sums = strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None).numpy()
    n = strategy.num_replicas_in_sync
    # Equal sums of v and v**2 over the replicas (n * mine) hold only when every v equals mine.
    if not np.array_equal(sums, n * np.concatenate([mine, mine**2])):
        raise CaptioningError(
            f"the workers disagree on where training starts (this one: step {state['step']}): every worker "
            f"needs the same data and must see the same checkpoint folder {checkpoint_dir} (a shared path)"
        )
