"""Scoring captions of the generated shapes data against each scene's ground truth: does the
caption name the right objects (size, colour, shape), and does it lay them out right?"""

from __future__ import annotations

import collections
import re

from .shapes import OBJECT_RE


def objects_in(caption: str):
    """The (size, colour, shape) triples a caption names, as a multiset."""
    return collections.Counter(OBJECT_RE.findall(caption.lower()))


def content_correct(caption: str, truth) -> bool:
    """True when the caption names every object with its right size, colour and shape, and no others."""
    want = collections.Counter((o["size"], o["colour"], o["shape"]) for o in truth["objects"])
    return objects_in(caption) == want


# Relation phrases, matched on the caption with every object phrase replaced by "#": the layout
# they state, and whether the objects are named in reading order (+1) or against it (-1).
RELATIONS = [
    (r"^(to the )?right of an? # is", "row", 1),  # "to the right of a X is a Y": X is left
    (r"^(to the )?left of an? # is", "row", -1),
    (r"^(below|beneath|under) an? # is", "col", 1),
    (r"^(above|over) an? # is", "col", -1),
    (r"# (to the )?left of an? #", "row", 1),
    (r"# (to the )?right of an? #", "row", -1),
    (r"# (above|over|on top of) an? #", "col", 1),
    (r"# (below|beneath|under|underneath) an? #", "col", -1),
    (r"\bto its right\b|\bfrom left to right\b", "row", 1),
    (r"\bto its left\b|\bfrom right to left\b", "row", -1),
    (r"\b(below|beneath|under) it\b|\bfrom top to bottom\b", "col", 1),
    (r"\b(above|over) it\b", "col", -1),
    (r"\bin a row\b", "row", 0),
    (r"\bin a column\b", "col", 0),
]


def layout_correct(caption: str, truth) -> bool:
    """True when the caption names the right objects in their true order and every relation it
    states is right: a row scene must not be "above", and "a Y to the right of a X" puts X first.

    A caption that states no relation ("a X and a Y") is read in the order it names the objects
    (the generated captions name them in reading order).
    """
    caption = " ".join(caption.lower().split())
    named = OBJECT_RE.findall(caption)
    want = [(o["size"], o["colour"], o["shape"]) for o in truth["objects"]]
    if sorted(named) != sorted(want):
        return False
    if len(want) == 1:
        return True
    masked = OBJECT_RE.sub("#", caption)
    stated = {(layout, order) for pattern, layout, order in RELATIONS if re.search(pattern, masked)}
    if any(layout != truth["layout"] for layout, _ in stated):
        return False
    orders = {order for _, order in stated if order}
    if len(orders) > 1:  # contradicts itself
        return False
    return (named[::-1] if orders == {-1} else named) == want


def scene_accuracy(hypotheses: dict, truth: dict) -> dict:
    """Shares of images whose caption names the right objects, and also lays them out right."""
    ids = sorted(hypotheses)
    n = max(1, len(ids))
    return {
        "object_accuracy": round(sum(content_correct(hypotheses[i], truth[i]) for i in ids) / n, 6),
        "layout_accuracy": round(sum(layout_correct(hypotheses[i], truth[i]) for i in ids) / n, 6),
    }
