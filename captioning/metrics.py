"""COCO caption metrics (pycocoevalcap).

``COCOEvalCap.evaluate()`` always builds SPICE, which needs Stanford CoreNLP 3.6.0 jars that
pycocoevalcap downloads on first use. Offline that fails, so the scorers are assembled here
and SPICE runs only when the jars are already present.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def spice_available(env=None, lib=None):
    """``(True, "")`` when SPICE can run, else ``(False, why)``.

    SPICE looks for the CoreNLP jars in ``lib`` (default ``pycocoevalcap/spice/lib``). Put them
    there, or point ``SPICE_CORENLP_DIR`` at a folder holding both (they are linked into place).
    """
    import pycocoevalcap.spice as spice_pkg

    env = os.environ if env is None else env
    lib = Path(spice_pkg.__file__).parent / "lib" if lib is None else Path(lib)
    if all((lib / j).is_file() for j in CORENLP_JARS):
        return True, ""
    src = env.get("SPICE_CORENLP_DIR")
    if src and all((Path(src) / j).is_file() for j in CORENLP_JARS):
        for j in CORENLP_JARS:
            target = lib / j
            if not target.exists():
                try:
                    target.symlink_to(Path(src, j).resolve())
                except OSError:
                    shutil.copyfile(Path(src, j), target)
        return True, ""
    where = f"{lib} or $SPICE_CORENLP_DIR"
    return False, f"SPICE skipped: Stanford CoreNLP 3.6.0 jars ({', '.join(CORENLP_JARS)}) not found in {where}"


PER_IMAGE = ("BLEU-4", "CIDEr")  # the per-image scores kept for the gallery


def coco_scores(references: dict, hypotheses: dict, use_spice=None, log=print, per_image=False):
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when available) for ``{id: [refs]}`` vs ``{id: hyp}``.

    Captions are tokenised with the PTB tokenizer exactly as the COCO evaluation server does.
    With ``per_image`` also returns ``{id: {"BLEU-4": .., "CIDEr": ..}}``, the scorers' own
    per-image figures (sentence BLEU and the image's CIDEr term).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(hypotheses)
    if sorted(references) != ids:
        raise ValueError("references and hypotheses must cover the same ids")
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tok.tokenize({i: [{"caption": hypotheses[i]}] for i in ids})
    scorers = [
        (Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]),
        (Meteor(), "METEOR"),
        (Rouge(), "ROUGE-L"),
        (Cider(), "CIDEr"),
    ]
    if use_spice is None:
        use_spice, why = spice_available()
        if not use_spice:
            log(why)
    if use_spice:
        from pycocoevalcap.spice.spice import Spice

        scorers.append((Spice(), "SPICE"))
    out, images = {}, {i: {} for i in ids}
    for scorer, names in scorers:
        score, each = scorer.compute_score(gts, res)  # ``each`` follows the order of ``gts``: ids
        if isinstance(names, list):
            out.update({n: float(s) for n, s in zip(names, score)})
            each = dict(zip(names, each))
        else:
            out[names] = float(score)
            each = {names: each}
        for name in PER_IMAGE:
            for i, v in zip(ids, each.get(name, ())):
                images[i][name] = round(float(v), 6)
    out = {k: round(v, 6) for k, v in out.items()}
    return (out, images) if per_image else out


def diversity(captions: list, train_captions=(), references: dict | None = None) -> dict:
    """Caption-set figures the COCO metrics do not give, for the generated ``captions`` (strings,
    already tokenised words joined by spaces): ``vocab_used`` (distinct words), ``distinct_1``,
    ``distinct_2`` (distinct uni- and bigrams over all of them), ``novel`` (share of captions not
    found verbatim among ``train_captions``), ``mean_length``, and with ``references``
    (``{id: [caption]}``, tokenised the same way) ``ref_mean_length``."""
    words = [c.split() for c in captions]
    unigrams = [w for ws in words for w in ws]
    bigrams = [tuple(ws[i : i + 2]) for ws in words for i in range(len(ws) - 1)]
    seen = set(train_captions)
    out = {
        "vocab_used": len(set(unigrams)),
        "distinct_1": round(len(set(unigrams)) / max(1, len(unigrams)), 6),
        "distinct_2": round(len(set(bigrams)) / max(1, len(bigrams)), 6),
        "novel": round(sum(c not in seen for c in captions) / max(1, len(captions)), 6),
        "mean_length": round(sum(map(len, words)) / max(1, len(words)), 4),
    }
    if references:
        refs = [r.split() for rs in references.values() for r in rs]
        out["ref_mean_length"] = round(sum(map(len, refs)) / max(1, len(refs)), 4)
    return out


def among_n(references: dict, candidates: dict) -> dict:
    """For ``{id: [n captions]}``: ``oracle_CIDEr`` (each image's best caption's CIDEr, averaged)
    and ``mBLEU_4`` (each caption's BLEU-4 against the image's other captions, averaged: lower is
    more diverse). pycocoevalcap's scorers on PTB-tokenised captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    ids = sorted(candidates)
    n = min(len(candidates[i]) for i in ids)
    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    cands = tok.tokenize({(i, k): [{"caption": candidates[i][k]}] for i in ids for k in range(n)})
    best = np.full(len(ids), -np.inf)
    for k in range(n):  # CIDEr's document frequencies come from the references: same for every k
        _, each = Cider().compute_score(gts, {i: cands[(i, k)] for i in ids})
        best = np.maximum(best, each)
    if n < 2:
        return {"oracle_CIDEr": round(float(best.mean()), 6)}
    others = {(i, k): [c for j in range(n) if j != k for c in cands[(i, j)]] for i in ids for k in range(n)}
    (_, _, _, bleu4), _ = Bleu(4).compute_score(others, cands, verbose=0)
    return {"oracle_CIDEr": round(float(best.mean()), 6), "mBLEU_4": round(float(bleu4), 6)}


def word_accuracy(decoder, vocab, features, captions, max_length, batch_size=256) -> float:
    """Teacher-forced next-word accuracy: the share of real tokens (words and ``<end>``) of
    ``captions`` (``[(feature row, token list)]``) that the decoder ranks first given the true
    words before them (the "accuracy" captioning READMEs quote)."""
    import tensorflow as tf

    hits = total = 0
    for i in range(0, len(captions), batch_size):
        part = captions[i : i + batch_size]
        ids = [vocab.encode(tokens, max_length) for _, tokens in part]
        width = max(map(len, ids))
        tokens = np.zeros((len(part), width), np.int32)
        for j, t in enumerate(ids):
            tokens[j, : len(t)] = t
        logits, _ = decoder.forward(
            tf.constant(features[[r for r, _ in part]], tf.float32), tf.constant(tokens[:, :-1])
        )
        target = tokens[:, 1:]
        real = target > 0
        hits += int((np.argmax(logits.numpy(), -1) == target)[real].sum())
        total += int(real.sum())
    return round(hits / max(1, total), 6)
