"""A procedurally generated scene-caption dataset ("shapes"), deterministic from a seed.

Each image holds 1-3 objects (a shape with a colour and a size) on a varied background
(plain colours, gradients, noise). Each image gets several differently worded reference
captions, all naming every object with its size, colour and shape, plus the spatial
relation between them. Objects are always named in reading order (left to right, top to
bottom) and the wording varies around them: which object a caption starts with is then a
fact about the image, not a coin toss a decoder cannot see until the relation words. The
ground truth (objects, boxes, layout, background) travels in each image's record, so caption
content can be scored exactly (:mod:`captioning.scene_metrics`).

Output layout is the Karpathy split JSON that real datasets use, so the generated data
goes through the same ``prepare`` parser as Flickr8k or COCO.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 170),
}
SIZES = {"small": 0.11, "large": 0.18}  # radius as a fraction of the image side
GRID = 8  # object centres snap to the centres of an 8x8 grid
BACKGROUNDS = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (20, 20, 20),
    "beige": (225, 210, 180),
}
OBJECT_RE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")

_ONE = [
    "a {a}",
    "a {a} on a {bg} background",
    "there is a {a} in the picture",
    "a single {a}",
    "an image of a {a}",
    "a {a} on its own",
]
_ROW2 = [
    "a {a} to the left of a {b}",
    "to the right of a {a} is a {b}",
    "a {a} and a {b}",
    "a {a} next to a {b}",
    "a {a} left of a {b} on a {bg} background",
    "there is a {a} and a {b} to its right",
]
_COL2 = [
    "a {a} above a {b}",
    "below a {a} is a {b}",
    "a {a} and a {b}",
    "a {a} on top of a {b}",
    "a {a} over a {b} on a {bg} background",
    "there is a {a} and a {b} beneath it",
]
_ROW3 = [
    "a {a}, a {b} and a {c}",
    "a {a}, a {b} and a {c} from left to right",
    "three shapes: a {a}, a {b} and a {c}",
    "a {a} to the left of a {b} and a {c}",
    "a {a}, a {b} and a {c} in a row on a {bg} background",
    "from left to right a {a}, a {b} and a {c}",
]


def _polygon(kind, cx, cy, r):
    if kind == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if kind == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)]
    if kind == "diamond":
        return [(cx, cy - r), (cx + r * 0.8, cy), (cx, cy + r), (cx - r * 0.8, cy)]
    raise ValueError(kind)


def _background(rng, name, n):
    base = np.array(BACKGROUNDS[name], dtype=np.float32)
    style = rng.integers(3)
    img = np.broadcast_to(base, (n, n, 3)).copy()
    if style == 1:  # gentle gradient
        ramp = np.linspace(-25, 25, n, dtype=np.float32)
        img += ramp[:, None, None] if rng.integers(2) else ramp[None, :, None]
    elif style == 2:  # sensor-like noise
        img += rng.normal(0, 12, size=(n, n, 1)).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def _place(rng, n_obj, radii, layout):
    """Centres (as fractions) for ``n_obj`` objects laid out in a row or a column, no overlap."""
    for _ in range(200):
        if layout == "row":
            xs = np.sort(rng.uniform(0.15, 0.85, n_obj))
            ys = rng.uniform(0.3, 0.7, n_obj)
        else:
            ys = np.sort(rng.uniform(0.15, 0.85, n_obj))
            xs = rng.uniform(0.3, 0.7, n_obj)
        # Centres sit on a coarse grid (cell centres of an 8x8 grid): the CNN sees each
        # shape at a consistent offset to its pooling cells, which keeps shapes learnable
        # from random-init features.
        xs, ys = (np.floor(xs * GRID) + 0.5) / GRID, (np.floor(ys * GRID) + 0.5) / GRID
        ok = all(
            r <= x + 0.02 and x - 0.02 <= 1 - r and r <= y + 0.02 and y - 0.02 <= 1 - r
            for x, y, r in zip(xs, ys, radii)
        )
        main = xs if layout == "row" else ys
        other = ys if layout == "row" else xs
        for i in range(n_obj - 1):
            gap = main[i + 1] - main[i]
            # a clear separation along the main axis, and more than across it: unambiguous relation
            ok &= gap > radii[i] + radii[i + 1] + 0.01 and gap > 1.5 * abs(other[i + 1] - other[i])
        if ok:
            return list(zip(xs.tolist(), ys.tolist()))
    return None


def make_scene(rng, image_size=64, supersample=2):
    """One random scene: ``(PIL image, ground truth dict)``."""
    n_obj = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    layout = "row" if n_obj == 3 or rng.integers(2) == 0 else "col"
    while True:
        objs = [
            {
                "shape": str(rng.choice(SHAPES)),
                "colour": str(rng.choice(list(COLOURS))),
                "size": str(rng.choice(list(SIZES))),
            }
            for _ in range(n_obj)
        ]
        radii = [SIZES[o["size"]] for o in objs]
        centres = _place(rng, n_obj, radii, layout)
        if centres is not None:
            break
    bg = str(rng.choice(list(BACKGROUNDS)))
    n = image_size * supersample
    canvas = Image.fromarray(_background(rng, bg, n))
    draw = ImageDraw.Draw(canvas)
    for o, (x, y), r in zip(objs, centres, radii):
        jitter = rng.integers(-15, 16, size=3)
        fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(COLOURS[o["colour"]], jitter))
        cx, cy, rr = x * n, y * n, r * n
        if o["shape"] == "circle":
            draw.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=fill)
        else:
            draw.polygon(_polygon(o["shape"], cx, cy, rr), fill=fill)
        o["box"] = [round(x - r, 4), round(y - r, 4), round(x + r, 4), round(y + r, 4)]
    image = canvas.resize((image_size, image_size), Image.LANCZOS)
    return image, {"objects": objs, "layout": layout, "background": bg}


def phrase(obj) -> str:
    return f"{obj['size']} {obj['colour']} {obj['shape']}"


def scene_captions(rng, truth, n_captions=5):
    """``n_captions`` differently worded captions for one scene (objects in layout order)."""
    names = [phrase(o) for o in truth["objects"]]
    templates = {1: _ONE, 2: _ROW2 if truth["layout"] == "row" else _COL2, 3: _ROW3}[len(names)]
    picks = rng.choice(len(templates), size=min(n_captions, len(templates)), replace=False)
    slots = dict(zip("abc", names), bg=truth["background"])
    return [templates[i].format(**slots) for i in sorted(picks)]


def generate(out_dir, n_train, n_val, n_test, seed, image_size=64, n_captions=5):
    """Write ``images/*.png`` and return the dataset (Karpathy layout) describing them.

    Every image record carries its scene ground truth under ``"truth"`` (objects, boxes,
    layout, background), so it travels with the data through ``prepare`` to ``evaluate``.
    Deterministic: the same arguments give byte-identical files.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = []
    splits = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for i, split in enumerate(splits):
        name = f"shapes_{i:05d}.png"
        image, gt = make_scene(rng, image_size)
        image.save(out_dir / "images" / name, optimize=False)
        caps = scene_captions(rng, gt, n_captions)
        images.append(
            {
                "filename": name,
                "imgid": i,
                "split": split,
                "sentences": [{"raw": c, "tokens": c.replace(",", " ,").split()} for c in caps],
                "truth": gt,
            }
        )
    return {"dataset": "shapes", "images": images}
