"""CIDEr-D as the SCST reward: pycocoevalcap's formula, on token ids, with n-grams as int64 keys.

pycocoevalcap's ``Cider`` (the COCO server's CIDEr-D: tf-idf n-gram vectors for n = 1..4,
clipped cosine similarity, a Gaussian penalty on the length difference, x10) is pure Python
and recomputes the document frequencies on every call. Here the document frequencies come from
a reference corpus once (the training references, for the reward), every reference's vector is
prepared once, and a caption's n-grams are counted with numpy: n-gram ``(w1 .. wk)`` is the key
``w1*B**(k-1) + .. + wk`` with ``B`` above every token id, so keys of different lengths never
collide (ids start at 1). ``tests/test_cider.py`` checks equality with pycocoevalcap to 1e-6.
"""

from __future__ import annotations

import numpy as np

N, SIGMA = 4, 6.0


def ngram_keys(tokens, base):
    """int64 keys of every 1..4-gram of ``tokens`` (ids >= 1) and each key's n-gram length."""
    t = np.asarray(tokens, dtype=np.int64)
    keys, sizes = [], []
    for k in range(1, N + 1):
        if len(t) < k:
            break
        windows = np.lib.stride_tricks.sliding_window_view(t, k)  # (len - k + 1, k)
        keys.append(windows @ (base ** np.arange(k - 1, -1, -1, dtype=np.int64)))
        sizes.append(np.full(len(windows), k))
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(keys), np.concatenate(sizes)


class CiderD:
    """CIDEr-D against fixed document frequencies.

    ``corpus``: for each image, its reference captions as token-id sequences. The document
    frequency of an n-gram is the number of images whose references contain it.
    """

    def __init__(self, corpus, base):
        self.base = int(base)
        self.ref_len = np.log(float(len(corpus)))
        df = {}
        for refs in corpus:
            seen = {int(k) for r in refs for k in ngram_keys(r, self.base)[0]}
            for key in seen:
                df[key] = df.get(key, 0) + 1
        keys = np.array(sorted(df), dtype=np.int64)
        self._df_keys = keys
        self._idf = self.ref_len - np.log(np.maximum(1.0, np.array([df[k] for k in keys.tolist()], dtype=np.float64)))

    def _idf_of(self, keys):
        """tf-idf weight ``ref_len - log(max(1, df))`` of each key (an unseen n-gram has df 0)."""
        if not len(self._df_keys):
            return np.full(len(keys), self.ref_len)
        i = np.minimum(np.searchsorted(self._df_keys, keys), len(self._df_keys) - 1)
        return np.where(self._df_keys[i] == keys, self._idf[i], self.ref_len)

    def vector(self, tokens):
        """(sorted keys, tf-idf values, n-gram sizes, norms per n, length) of one caption."""
        keys, sizes = ngram_keys(tokens, self.base)
        uniq, first, counts = np.unique(keys, return_index=True, return_counts=True)
        sizes = sizes[first]
        vals = counts * self._idf_of(uniq)
        norms = np.sqrt(np.array([np.sum(vals[sizes == k] ** 2) for k in range(1, N + 1)]))
        length = int(np.sum(counts[sizes == 2]))  # pycocoevalcap's "length" counts bigrams
        return uniq, vals, sizes, norms, length

    def score(self, hyp_vec, ref_vecs) -> float:
        """CIDEr-D of one caption (from :meth:`vector`) against its references' vectors."""
        keys, vals, sizes, norms, length = hyp_vec
        total = np.zeros(N)
        for r_keys, r_vals, _, r_norms, r_length in ref_vecs:
            common, hi, ri = np.intersect1d(keys, r_keys, assume_unique=True, return_indices=True)
            prod = np.minimum(vals[hi], r_vals[ri]) * r_vals[ri]  # clipped: a repeated n-gram earns no more
            val = np.bincount(sizes[hi] - 1, weights=prod, minlength=N).astype(np.float64)
            ok = (norms != 0) & (r_norms != 0)
            val[ok] /= norms[ok] * r_norms[ok]
            total += val * np.e ** (-(float(length - r_length) ** 2) / (2 * SIGMA**2))
        return float(np.mean(total) / max(1, len(ref_vecs)) * 10.0)

    def scores(self, hypotheses, references):
        """CIDEr-D of each hypothesis (token ids) against its list of references (token ids)."""
        out = []
        for hyp, refs in zip(hypotheses, references):
            out.append(self.score(self.vector(hyp), [self.vector(r) for r in refs]))
        return np.array(out)
