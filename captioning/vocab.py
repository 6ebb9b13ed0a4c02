"""Tokenising and the vocabulary.

Tokenising uses nltk's Treebank tokenizer, which needs no downloaded data (``word_tokenize``
wants the punkt models). The vocabulary is plain JSON; special tokens live here only.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIALS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3: <pad> must be 0 (masking relies on it)
# Never a word of a generated caption: a caption of real words always beats one that says "<unk>".
NEVER_GENERATED = tuple(SPECIALS.index(t) for t in (PAD, START, UNK))


def make_tokenizer():
    from nltk.tokenize import TreebankWordTokenizer

    treebank = TreebankWordTokenizer()

    def tokenize(text: str) -> list[str]:
        # Keep words only: punctuation adds nothing a caption metric rewards.
        return [t for t in treebank.tokenize(text.lower()) if any(ch.isalnum() for ch in t)]

    return tokenize


@dataclasses.dataclass
class Vocabulary:
    words: list  # index -> word, specials first

    def __post_init__(self):
        self.index = {w: i for i, w in enumerate(self.words)}
        assert tuple(self.words[:4]) == SPECIALS

    @property
    def pad_id(self):
        return SPECIALS.index(PAD)

    @property
    def start_id(self):
        return SPECIALS.index(START)

    @property
    def end_id(self):
        return SPECIALS.index(END)

    @property
    def unk_id(self):
        return SPECIALS.index(UNK)

    def __len__(self):
        return len(self.words)

    @classmethod
    def build(cls, token_lists, min_count=1):
        """Words seen at least ``min_count`` times, most frequent first (ties alphabetical)."""
        counts = collections.Counter(t for toks in token_lists for t in toks)
        kept = sorted(
            (w for w, c in counts.items() if c >= min_count and w not in SPECIALS), key=lambda w: (-counts[w], w)
        )
        return cls(list(SPECIALS) + kept)

    def encode(self, tokens, max_length):
        """``<start> w1 .. wn <end>`` ids, words cut to ``max_length``."""
        ids = [self.index.get(t, self.unk_id) for t in tokens[:max_length]]
        return [self.start_id] + ids + [self.end_id]

    def decode(self, ids):
        """Words up to the first ``<end>``, specials dropped."""
        words = []
        for i in ids:
            i = int(i)
            if i == self.end_id:
                break
            if i >= 4:
                words.append(self.words[i])
            elif i == self.unk_id:
                words.append(UNK)
        return " ".join(words)

    def to_json(self):
        return {"words": self.words, "specials": list(SPECIALS)}

    @classmethod
    def from_json(cls, data):
        return cls(list(data["words"]))


def encode_captions(vocab, token_lists, max_length):
    """Padded ``(n, max_length + 2)`` int32 matrix of encoded captions (0 = <pad>)."""
    out = np.zeros((len(token_lists), max_length + 2), dtype=np.int32)
    for i, toks in enumerate(token_lists):
        ids = vocab.encode(toks, max_length)
        out[i, : len(ids)] = ids
    return out


def save_encoded(path, splits):
    """Write ``{split: (image keys, token matrix)}`` to an HDF5 file (``<split>/images``, ``<split>/tokens``)."""
    import h5py

    from .files import atomic_path

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for split, (images, tokens) in sorted(splits.items()):
            g = f.create_group(split)
            g.create_dataset("images", data=np.array(images, dtype=object), dtype=h5py.string_dtype())
            g.create_dataset("tokens", data=tokens)


def load_encoded(path, split):
    """``(image keys, token matrix)`` of one split from :func:`save_encoded`'s file."""
    import h5py

    from .errors import CaptioningError

    with h5py.File(path, "r") as f:
        if split not in f:
            raise CaptioningError(f"{path}: no '{split}' split (has: {', '.join(f)})")
        return list(f[split]["images"].asstr()[:]), f[split]["tokens"][:]
