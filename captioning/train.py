"""Teacher-forced training with early stopping and resumable checkpoints.

A checkpoint (written after every epoch, atomically) holds the current and best weights,
the optimizer's variables and the loop state. Batches are drawn from an RNG seeded by
``(seed, epoch)`` and dropout masks from ``(seed, step)``, so a run resumed from a checkpoint
follows exactly the path of one that was never interrupted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path

import h5py
import numpy as np

from .errors import CaptioningError
from .feature_store import feature_identity
from .files import atomic_path


@dataclasses.dataclass
class CaptionSet:
    """Training examples: one row per caption, pointing at its image's features.

    ``features`` is a :class:`captioning.feature_store.FeatureRows` (rows read from disk a
    batch at a time) or, for small data, the same rows as an in-memory array.
    """

    features: object  # (N_images, L, C): FeatureRows or a float32 array
    tokens: np.ndarray  # (N_captions, T) int32, <start> ... <end> then 0 padding
    image_rows: np.ndarray  # (N_captions,) row of each caption's image in ``features``
    # Augmentation: the row of each caption's mirror image; a shuffled epoch reads it instead for
    # a seeded half of the captions, their words mapped through ``mirror_words`` (left <-> right).
    mirror_rows: np.ndarray | None = None  # (N_captions,)
    mirror_words: np.ndarray | None = None  # (V,) token id -> token id in the mirror image's caption

    def batches(self, batch_size, rng=None, bucket=0, block=1, prefetch_depth=2):
        """Yield ``(features (B, L, C), tokens (B, T_b))``, trimmed to the batch's longest caption.

        With ``rng``: the seeded epoch order of :func:`captioning.batching.batch_order`. Without
        (evaluation): every caption in file order, or sorted by length when ``bucket`` > 1. The
        order is fixed before the first batch is read; a thread reads ``prefetch_depth`` ahead.
        """
        for _, _, [(feats, toks, _)] in self.replica_batches(
            batch_size, rng, bucket=bucket, block=block, prefetch_depth=prefetch_depth
        ):
            yield feats, toks

    def replica_batches(self, batch_size, rng=None, bucket=0, block=1, replicas=1, local=(0,), prefetch_depth=2):
        """The batches of ``batches`` (one per replica with ``replicas`` 1), each cut for
        ``replicas`` replicas (captioning.distribute).

        Yields ``(n, n_tokens, parts)``: the batch's caption count, its real target tokens (the
        loss divisor), and for each replica id in ``local`` (this process's replicas)
        ``(features (m, L, C), tokens (m, T_b), offset)``, padded to ``m = ceil(n / replicas)``
        rows with empty captions. Only the local replicas' rows are read.
        """
        from .batching import batch_order, prefetch
        from .distribute import replica_slices

        lengths = (self.tokens > 0).sum(axis=1)
        rows, tokens = self.image_rows, self.tokens
        if rng is not None:
            order = batch_order(lengths, self.image_rows, batch_size, rng, bucket=bucket, block=block)
            if self.mirror_rows is not None:  # drawn after the order: without mirrors, the same epochs
                rows, tokens = self.mirrored(rng.random(len(rows)) < 0.5)
        else:
            seq = np.argsort(lengths, kind="stable") if bucket > 1 else np.arange(len(self.tokens))
            order = [seq[i : i + batch_size] for i in range(0, len(seq), batch_size)]
        L, C = self.features.shape[1:]

        def read():
            for idx in order:
                m, slices = replica_slices(len(idx), replicas)
                mine = [slices[r] for r in local]
                lo, hi = min(a for a, _ in mine), max(b for _, b in mine)  # local replicas are contiguous
                feats = self.features[rows[idx[lo:hi]]] if hi > lo else None
                toks = tokens[idx][:, : int(lengths[idx].max())]
                parts = []
                for a, b in mine:
                    if (a, b) == (0, m) == (lo, hi):  # one replica (or the whole read): no copy
                        parts.append((feats, toks[a:b], a))
                        continue
                    f = np.zeros((m, L, C), np.float32)
                    t = np.zeros((m, toks.shape[1]), np.int32)
                    if b > a:
                        f[: b - a], t[: b - a] = feats[a - lo : b - lo], toks[a:b]
                    parts.append((f, t, a))
                yield len(idx), int((toks[:, 1:] > 0).sum()), parts

        return prefetch(read(), prefetch_depth) if prefetch_depth > 0 else read()

    def mirrored(self, flip):
        """``(image rows, tokens)`` with the captions where ``flip`` (N_captions,) is set reading
        their mirror image, their words mirrored."""
        rows = np.where(flip, self.mirror_rows, self.image_rows)
        words = self.mirror_words if self.mirror_words is not None else np.arange(int(self.tokens.max()) + 1)
        return rows, np.where(flip[:, None], words[self.tokens], self.tokens).astype(self.tokens.dtype)


@dataclasses.dataclass
class FitSettings:
    batch_size: int = 64
    learning_rate: float = 1e-3
    lr_decay: float = 1.0  # learning rate multiplier per epoch: epoch e trains at lr * lr_decay**(e-1)
    epochs: int = 10
    patience: int = 3  # epochs without val-loss improvement before stopping
    attention_reg: float = 0.01  # weight of the decoder's own loss term (the attention prior)
    label_smoothing: float = 0.0  # the training loss's target: (1 - eps) one-hot + eps / V (val loss: plain)
    clip_norm: float = 5.0
    seed: int = 0
    bucket: int = 0  # batches per length-sorting pool (0 or 1: plain shuffle); see batching.py
    read_block: int = 1  # images per shuffled block of feature rows (1: any image with any)
    jit: bool = False  # XLA-compile the forward and backward pass (one compile per batch shape)


LOGGED = ("train_loss", "val_loss", "val_perplexity", "learning_rate")  # per-epoch curves


def best_epoch_metrics(state) -> dict:
    """What the saved model scored: the best epoch's row of the history (not the last epoch's),
    with the epoch it came from and how many epochs ran."""
    best = state["history"][state["best_epoch"] - 1]
    return {**{k: best[k] for k in LOGGED}, "best_epoch": state["best_epoch"], "epochs_run": state["epoch"]}


def _fingerprint(model, settings, train, val) -> str:
    """Identity of a training trajectory. ``epochs`` and ``patience`` only decide when to stop,
    not the path, so they are left out: a run can be resumed with a longer or shorter schedule."""
    h = hashlib.blake2b(digest_size=16)
    path = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("epochs", "patience")}
    h.update(json.dumps([type(model).__name__, model.settings(), path], sort_keys=True).encode())
    if model.dtype_policy.name != "float32":  # mixed precision takes another path
        h.update(model.dtype_policy.name.encode())
    for data in (train, val):
        # The features by identity (the file's stored content hash and the rows used), never
        # by reading every byte: a COCO-sized file is tens of GB.
        h.update(feature_identity(data.features).encode())
        for arr in (data.tokens, data.image_rows, data.mirror_rows, data.mirror_words):
            if arr is None:  # no mirror images: nothing to add
                continue
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def save_checkpoint(path, model, optimizer, state, best_weights):
    """Write the whole checkpoint to a temporary folder, then swap it in."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model.save_weights(tmp / "last.weights.h5")
        with h5py.File(tmp / "best.weights.h5", "w") as f:
            for i, w in enumerate(best_weights):
                f[f"w{i:04d}"] = w
        with h5py.File(tmp / "optimizer.h5", "w") as f:
            for i, v in enumerate(optimizer.variables):
                f[f"v{i:04d}"] = np.asarray(v)
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def load_checkpoint(path, model, optimizer, fingerprint):
    """Restore model/optimizer/state from ``path`` when it matches ``fingerprint``; else None."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.is_dir() and old.is_dir():  # killed mid-swap: the previous checkpoint is intact
        path = old
    state_file = path / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return None
    if state.get("fingerprint") != fingerprint or state.get("complete"):
        return None
    model.load_weights(path / "last.weights.h5")
    with h5py.File(path / "optimizer.h5", "r") as f:
        for i, v in enumerate(optimizer.variables):
            v.assign(f[f"v{i:04d}"][()])  # [()] reads scalars (the step counter) too
    with h5py.File(path / "best.weights.h5", "r") as f:
        best = [f[k][()] for k in sorted(f)]
    return state, best


def fit(
    model,
    train: CaptionSet,
    val: CaptionSet,
    settings: FitSettings,
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
    from tqdm import tqdm

    from .distribute import is_chief, local_replica_ids, worker_name

    if len(train.tokens) == 0 or len(val.tokens) == 0:
        raise CaptioningError("training needs captions in both the train and the val split")
    strategy = strategy or tf.distribute.get_strategy()
    replicas, local, chief = strategy.num_replicas_in_sync, local_replica_ids(strategy), is_chief(strategy)
    with strategy.scope():  # the variables: mirrored on every replica
        model.build()
        optimizer = keras.optimizers.Adam(settings.learning_rate)
        optimizer.build(model.trainable_variables)
    # With length buckets a batch of short captions has few tokens; dividing its loss by its
    # own token count would weigh each of those tokens more than a long caption's. Dividing by
    # the epoch's mean tokens per batch instead weighs every token alike, as a shuffled epoch
    # does on average. Without buckets the batch's own count is used, as always.
    per_batch = float((train.tokens[:, 1:] > 0).sum()) * settings.batch_size / len(train.tokens)
    train_step, val_step, inputs = _steps(model, optimizer, settings, strategy, train.features.shape[1:], local)

    fingerprint = _fingerprint(model, settings, train, val)
    state, best_weights = begin_or_resume(
        checkpoint_dir,
        model,
        optimizer,
        fingerprint,
        lambda: {
            "fingerprint": fingerprint,
            "epoch": 0,
            "step": 0,
            "best_val_loss": None,
            "best_epoch": 0,
            "bad_epochs": 0,
            "history": [],
            "complete": False,
        },
        on_epoch,
        log,
    )
    if replicas > 1:
        _check_agreement(strategy, state, checkpoint_dir)

    def batches(data, rng=None):
        return data.replica_batches(
            settings.batch_size, rng, bucket=settings.bucket, block=settings.read_block, replicas=replicas, local=local
        )

    while state["epoch"] < settings.epochs and state["bad_epochs"] < settings.patience:
        epoch = state["epoch"] + 1
        t0 = time.perf_counter()
        # Set from the epoch number alone, so a resumed run trains at the same rate.
        lr = settings.learning_rate * settings.lr_decay ** (epoch - 1)
        optimizer.learning_rate.assign(lr)
        rng = np.random.default_rng([settings.seed, epoch])
        total, n = 0.0, 0
        n_batches = (len(train.tokens) + settings.batch_size - 1) // settings.batch_size
        bar = tqdm(
            batches(train, rng), total=n_batches, desc=f"epoch {epoch}", unit="batch", disable=not progress, leave=False
        )
        try:
            for n_rows, n_tokens, parts in bar:
                state["step"] += 1
                seed = tf.constant([settings.seed, state["step"]], tf.int32)
                norm = tf.constant(per_batch if settings.bucket > 1 else max(n_tokens, 1), tf.float32)
                loss, ce_sum, count = (float(x) for x in train_step(*inputs(parts, n_rows), seed, norm))
                if not np.isfinite(loss):
                    raise CaptioningError(
                        f"training diverged at epoch {epoch} step {state['step']} (loss {loss}); "
                        "lower train.learning_rate"
                    )
                total, n = total + ce_sum, n + count  # train_loss: cross-entropy per real token
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
        log(
            f"epoch {epoch}: train_loss {metrics['train_loss']:.4f} val_loss {val_loss:.4f} ({metrics['seconds']:.0f}s)"
        )
        improved = state["best_val_loss"] is None or val_loss < state["best_val_loss"]
        best_weights = end_epoch(
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
    return finish(checkpoint_dir if chief else None, model, optimizer, state, best_weights)


def _steps(model, optimizer, settings, strategy, feature_shape, local):
    """``(train_step, val_step, inputs)``: the compiled steps over ``strategy``'s replicas, and
    ``inputs(parts, n)``, which turns one batch's per-replica parts into what they take.

    ``train_step(feats, tokens, rows, seed, norm) -> (loss, summed cross-entropy, tokens)``,
    ``val_step(feats, tokens) -> (summed cross-entropy, tokens)``, each summed over replicas.
    """
    import tensorflow as tf

    from .decoders.base import RowSeed, dense_gradients, masked_cross_entropy_sum

    L, C = feature_shape
    replicas = strategy.num_replicas_in_sync
    sig = [tf.TensorSpec([None, L, C], tf.float32), tf.TensorSpec([None, None], tf.int32)]
    vec, scalar = tf.TensorSpec([2], tf.int32), tf.TensorSpec([], tf.float32)

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


def begin_or_resume(checkpoint_dir, model, optimizer, fingerprint, fresh, on_epoch, log):
    """``(state, best weights)`` from a checkpoint matching ``fingerprint``, its history replayed to
    ``on_epoch`` so loggers see every epoch; else ``fresh()`` and the model's current weights."""
    restored = load_checkpoint(checkpoint_dir, model, optimizer, fingerprint)
    if not restored:
        return fresh(), [np.asarray(w) for w in model.weights]
    state, best_weights = restored
    log(f"resuming from {checkpoint_dir} after epoch {state['epoch']}")
    for m in state["history"]:
        if on_epoch:
            on_epoch(m["epoch"], m)
    return state, best_weights


def end_epoch(state, metrics, improved, best, model, optimizer, best_weights, checkpoint_dir, on_epoch):
    """Record a finished epoch: its history row, the best so far (``best``: the state keys to set
    when it ``improved``) or one more epoch of patience spent, an atomic checkpoint, the callback.
    Returns the best weights."""
    state["history"].append(metrics)
    state["epoch"] = metrics["epoch"]
    if improved:
        state.update(best, best_epoch=metrics["epoch"], bad_epochs=0)
        best_weights = [np.asarray(w) for w in model.weights]
    else:
        state["bad_epochs"] += 1
    if checkpoint_dir is not None:  # None: not the chief worker, which alone writes
        save_checkpoint(checkpoint_dir, model, optimizer, state, best_weights)
    if on_epoch:
        on_epoch(metrics["epoch"], metrics)
    return best_weights


def finish(checkpoint_dir, model, optimizer, state, best_weights):
    """Leave the best weights in ``model`` and mark the checkpoint complete (it is not resumed)."""
    for var, w in zip(model.weights, best_weights):
        var.assign(w)
    state["complete"] = True
    if checkpoint_dir is not None:
        save_checkpoint(checkpoint_dir, model, optimizer, state, best_weights)
    return state
