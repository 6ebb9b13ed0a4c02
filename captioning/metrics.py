"""COCO caption metrics (pycocoevalcap).

``COCOEvalCap.evaluate()`` always builds SPICE, which needs Stanford CoreNLP 3.6.0 jars that
pycocoevalcap downloads on first use. Offline that fails, so the scorers are assembled here
and SPICE runs only when the jars are already present.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

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
