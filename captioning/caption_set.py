"""Training examples: a split's captions over its images' features (:class:`CaptionSet`), cut
into batches for one or several replicas, and read from the features and captions files
(:func:`caption_set`)."""

from __future__ import annotations

import dataclasses

import numpy as np

from .batching import batch_order, prefetch


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


def caption_set(store, captions_h5, split, vocab=None) -> CaptionSet:
    """A split's captions (``captions_h5``, the vocab stage's file) over its images' features in
    ``store`` (read from disk a batch at a time); captions of images the features stage skipped
    are dropped. With ``vocab`` (training), the mirror images too where the store has them."""
    from .feature_store import FLIP_SUFFIX
    from .vocab import load_encoded

    images, tokens = load_encoded(captions_h5, split)
    have = [k for k in sorted(set(images)) if k in store.index]
    row = {k: i for i, k in enumerate(have)}
    keep = np.array([im in row for im in images], dtype=bool)
    image_rows = np.array([row[im] for im in images if im in row], dtype=np.int64)
    tokens = tokens[keep].astype(np.int32)
    if vocab is None or not have or not store.mirrored(have):
        return CaptionSet(store.rows(have), tokens, image_rows)
    words = np.arange(len(vocab))
    left, right = (vocab.index.get(w) for w in ("left", "right"))
    if left is not None and right is not None:  # "the dog on the left" is on the right in the mirror
        words[[left, right]] = right, left
    rows = store.rows(have + [k + FLIP_SUFFIX for k in have])
    return CaptionSet(rows, tokens, image_rows, mirror_rows=image_rows + len(have), mirror_words=words)
