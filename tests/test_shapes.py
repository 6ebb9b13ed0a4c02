"""The generated default dataset: deterministic, consistent captions and ground truth."""

import hashlib
import json

import numpy as np
import pytest

from captioning import scene_metrics, shapes


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ds = shapes.generate(tmp_path / name, 6, 2, 2, seed=seed, image_size=32)
        (tmp_path / name / "d.json").write_text(json.dumps(ds, sort_keys=True))
        outs.append(digest(tmp_path / name))
    assert outs[0] == outs[1] != outs[2]


def test_every_caption_names_every_object(tmp_path):
    ds = shapes.generate(tmp_path, 40, 5, 5, seed=0, image_size=32, n_captions=5)
    assert [im["split"] for im in ds["images"]].count("val") == 5
    counts = set()
    for im in ds["images"]:
        gt = im["truth"]  # the ground truth travels in the record
        counts.add(len(gt["objects"]))
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        in_reading_order = [(o["size"], o["colour"], o["shape"]) for o in gt["objects"]]
        for s in im["sentences"]:
            assert scene_metrics.content_correct(s["raw"], gt), (s["raw"], gt)
            assert scene_metrics.layout_correct(s["raw"], gt), (s["raw"], gt)  # every template's relation parses
            assert shapes.OBJECT_RE.findall(s["raw"]) == in_reading_order, s["raw"]
    assert counts == {1, 2, 3}


def test_scene_layout_is_unambiguous():
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, gt = shapes.make_scene(rng, 32)
        assert image.size == (32, 32)
        boxes = [o["box"] for o in gt["objects"]]
        axis = 0 if gt["layout"] == "row" else 1
        centres = [(b[axis] + b[axis + 2]) / 2 for b in boxes]
        assert centres == sorted(centres)  # objects listed left-to-right / top-to-bottom


RED, BLUE, GREEN = ("small", "red", "circle"), ("large", "blue", "square"), ("small", "green", "diamond")


def scene(layout, *objs):
    return {"layout": layout, "objects": [dict(zip(("size", "colour", "shape"), o)) for o in objs]}


ROW = scene("row", RED, BLUE)  # red circle left, blue square right
COL = scene("col", RED, BLUE)  # red circle above, blue square below
ROW3 = scene("row", RED, BLUE, GREEN)


@pytest.mark.parametrize(
    "truth, caption, objects, layout",
    [
        (ROW, "a small red circle to the left of a large blue square", True, True),
        (ROW, "a large blue square to the right of a small red circle", True, True),
        (ROW, "to the right of a small red circle is a large blue square", True, True),
        (ROW, "there is a small red circle and a large blue square to its right", True, True),
        (ROW, "a small red circle and a large blue square", True, True),
        (ROW, "a large blue square and a small red circle", True, False),  # named against reading order
        (ROW, "a large blue square to the left of a small red circle", True, False),
        (ROW, "a small red circle above a large blue square", True, False),  # a column relation in a row
        (ROW, "a large blue square above a small red circle", True, False),  # the example
        (ROW, "a small red circle", False, False),
        (ROW, "a small blue circle to the left of a large blue square", False, False),
        (COL, "a small red circle above a large blue square", True, True),
        (COL, "below a small red circle is a large blue square", True, True),
        (COL, "there is a small red circle and a large blue square beneath it", True, True),
        (COL, "a large blue square below a small red circle", True, True),
        (COL, "a small red circle on top of a large blue square on a gray background", True, True),
        (COL, "a large blue square above a small red circle", True, False),
        (COL, "a small red circle to the left of a large blue square", True, False),
        (ROW3, "from left to right a small red circle, a large blue square and a small green diamond", True, True),
        (ROW3, "a small red circle, a small green diamond and a large blue square", True, False),
        (ROW3, "a small red circle, a large blue square and a small green diamond in a column", True, False),
        (scene("col", RED), "a small red circle on a white background", True, True),
    ],
)
def test_object_and_layout_accuracy_on_hand_written_captions(truth, caption, objects, layout):
    assert scene_metrics.content_correct(caption, truth) is objects
    assert scene_metrics.layout_correct(caption, truth) is layout
    assert scene_metrics.scene_accuracy({"x": caption}, {"x": truth}) == {
        "object_accuracy": float(objects),
        "layout_accuracy": float(layout),
    }
