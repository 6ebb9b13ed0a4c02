"""Which captions share a batch, in what order, and reading the batches ahead on a thread.

An epoch's order comes from one seeded RNG and nothing else, so a resumed run replays it
exactly. Two knobs trade randomness for speed:

- ``bucket``: captions are taken ``bucket * batch_size`` at a time from the shuffled order,
  sorted by length and cut into batches, and the epoch's batches are shuffled. A batch runs
  only to its longest caption, so similar lengths together waste little work on padding.
- ``block``: the shuffle moves blocks of ``block`` consecutive feature rows (images), not
  single captions, so a batch's images lie in a few runs of the features file: long reads
  where random single-row reads are slow (network disks, cold caches).
"""

from __future__ import annotations

import queue
import threading

import numpy as np


def batch_order(lengths, image_rows, batch_size, rng, bucket=0, block=1):
    """One index array per batch, every caption exactly once, drawn from ``rng``.

    ``bucket <= 1`` and ``block <= 1`` give the plain shuffle: consecutive slices of
    ``rng.permutation(N)``.
    """
    lengths, image_rows = np.asarray(lengths), np.asarray(image_rows)
    n = len(lengths)
    if block > 1:
        blocks = image_rows // block  # (N,) the block of each caption's image
        rank = rng.permutation(int(blocks.max()) + 1)[blocks]  # blocks in a random order
        order = np.lexsort((rng.random(n), rank))  # by block, randomly within a block
    else:
        order = rng.permutation(n)
    if bucket <= 1:
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]
    pool = bucket * batch_size
    batches = []
    for i in range(0, n, pool):
        p = order[i : i + pool]
        p = p[np.argsort(lengths[p], kind="stable")]  # short to long within the pool
        batches += [p[j : j + batch_size] for j in range(0, len(p), batch_size)]
    return [batches[k] for k in rng.permutation(len(batches))]


class _Failed:
    def __init__(self, error):
        self.error = error


_DONE = object()


def prefetch(items, depth=2):
    """Iterate ``items`` on a background thread, up to ``depth`` ahead of the consumer.

    Reading the next batch from disk (h5py and numpy release the GIL for the heavy part)
    then overlaps the training step. An exception in the thread is raised here; leaving the
    loop early stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(x):
        while not stop.is_set():
            try:
                q.put(x, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work():
        try:
            for item in items:
                if not put(item):
                    return
            put(_DONE)
        except BaseException as e:  # handed to the consumer, which raises it
            put(_Failed(e))

    thread = threading.Thread(target=work, name="prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
