"""The generated default dataset: deterministic, consistent captions and ground truth."""

import hashlib
import json

import numpy as np

from captioning import shapes


def digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    outs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        ds, truth = shapes.generate(tmp_path / name, 6, 2, 2, seed=seed, image_size=32)
        (tmp_path / name / "d.json").write_text(json.dumps([ds, truth], sort_keys=True))
        outs.append(digest(tmp_path / name))
    assert outs[0] == outs[1] != outs[2]


def test_every_caption_names_every_object(tmp_path):
    ds, truth = shapes.generate(tmp_path, 40, 5, 5, seed=0, image_size=32, n_captions=5)
    assert [im["split"] for im in ds["images"]].count("val") == 5
    counts = set()
    for im in ds["images"]:
        gt = truth[im["filename"]]
        counts.add(len(gt["objects"]))
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        in_reading_order = [(o["size"], o["colour"], o["shape"]) for o in gt["objects"]]
        for s in im["sentences"]:
            assert shapes.content_correct(s["raw"], gt), (s["raw"], gt)
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
