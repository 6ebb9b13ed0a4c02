"""Training on several devices or machines with tf.distribute, and how a batch is split.

The global batch (``train.batch_size`` captions), its order, the learning rate and the seeds
are those of a single-process run. Each batch is cut into one contiguous slice per replica
(replica ``r`` of ``N`` gets rows ``r*m ... r*m + m - 1``, ``m = ceil(n / N)``, padded with
empty captions to ``m`` rows), so no caption is read twice and every worker reads only the
rows of its own replicas. Every replica divides its loss by the token count of the whole
batch, and the gradients are summed over replicas before clipping: the update is the
single-process one up to the order of float additions.

Strategies (``name``):

- ``default``: no distribution (one CPU or one GPU, as TensorFlow places ops);
- ``mirrored``: ``MirroredStrategy`` over all local GPUs (or all CPU devices if none);
- ``multi_worker``: ``MultiWorkerMirroredStrategy`` over the machines in ``TF_CONFIG``;
- ``auto``: ``multi_worker`` when ``TF_CONFIG`` is set, ``mirrored`` with two or more GPUs,
  else ``default``.
"""

from __future__ import annotations

import json
import os

from .errors import CaptioningError

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")


def tf_config() -> dict:
    """The parsed ``TF_CONFIG`` environment variable ({} when unset)."""
    raw = os.environ.get("TF_CONFIG", "").strip()
    if not raw:
        return {}
    try:
        cfg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CaptioningError(f"TF_CONFIG is not valid JSON: {e}") from None
    if not isinstance(cfg, dict) or "cluster" not in cfg or "task" not in cfg:
        raise CaptioningError('TF_CONFIG needs "cluster" and "task" (README: "GPUs and several machines")')
    return cfg


def make_strategy(name: str, timeout_s: float = 300.0):
    """The ``tf.distribute`` strategy called ``name`` (see the module docstring).

    ``timeout_s`` bounds every collective of ``multi_worker``: a worker that died makes the
    others fail with a clear error instead of waiting forever.
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise CaptioningError(f"train.strategy: {name!r} is not one of {', '.join(STRATEGIES)}")
    if name == "auto":
        if tf_config():
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    cfg = tf_config()
    if not cfg:
        raise CaptioningError(
            'train.strategy multi_worker needs the TF_CONFIG environment variable (README: "GPUs and several machines")'
        )
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout_s)
    return tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)


def is_chief(strategy=None) -> bool:
    """Whether this process writes the checkpoints and outputs: the ``chief`` task, or worker 0
    when the cluster has no chief; always true outside ``multi_worker``."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return resolver.task_type == "worker" and resolver.task_id == 0 and not has_chief


def worker_name(strategy=None) -> str:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return "single process"
    return f"{resolver.task_type} {resolver.task_id}"


def local_replica_ids(strategy) -> list[int]:
    """The global ids (0 .. N-1) of the replicas this process runs, in its local order."""
    n = strategy.num_replicas_in_sync
    if n == 1:
        return [0]
    ids = strategy.experimental_distribute_values_from_function(lambda ctx: ctx.replica_id_in_sync_group)
    return [int(i) for i in strategy.experimental_local_results(ids)]


def replica_slices(n: int, replicas: int) -> tuple[int, list[tuple[int, int]]]:
    """``(m, [(start, stop)] per replica)``: contiguous slices of ``n`` rows, each padded to ``m``."""
    m = -(-n // replicas)
    return m, [(min(r * m, n), min(r * m + m, n)) for r in range(replicas)]


def loopback_cluster(workers: int) -> dict:
    """A ``TF_CONFIG`` cluster of ``workers`` workers on free ports of 127.0.0.1 (tests, benchmarks,
    trying ``multi_worker`` on one machine)."""
    import socket

    socks = [socket.socket() for _ in range(workers)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return {"worker": [f"127.0.0.1:{s.getsockname()[1]}" for s in socks]}
    finally:
        for s in socks:
            s.close()
