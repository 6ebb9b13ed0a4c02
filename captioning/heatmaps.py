"""Where the decoder looked, as pictures and as a measure.

:func:`upsample` spreads a (L,) attention vector over the image, each grid cell covering its own
block of pixels (nearest, so one location lights exactly its cell); :func:`overlay` blends it
onto the photo (the maps come from :func:`captioning.decode.word_attention`).
:func:`attention_on_objects` measures, on the generated data, how much of that attention lands
inside the box of the object being named.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

HEAT = np.array([255, 40, 0], dtype=np.float32)  # the colour attention is painted in


def upsample(alpha, grid, size):
    """``alpha`` (h*w,) over a ``grid`` (h, w) -> (H, W) map for an image of ``size`` (W, H)."""
    h, w = grid
    width, height = size
    cells = np.asarray(alpha, dtype=np.float32).reshape(h, w)
    rows = np.arange(height) * h // height  # the grid row each pixel row falls in
    cols = np.arange(width) * w // width
    return cells[rows][:, cols]


def overlay(image, heat, strength=0.75):
    """Blend ``heat`` (H, W), scaled to its maximum, onto ``image`` (H, W, 3) uint8 -> uint8.

    The photo is dimmed where the decoder did not look, so the looked-at part stands out.
    """
    img = np.asarray(image, dtype=np.float32)
    top = float(heat.max())
    a = (heat / top if top > 0 else heat)[:, :, None] * strength
    dim = img * 0.45
    return np.clip(dim * (1 - a) + (img * 0.6 + HEAT * 0.4) * a, 0, 255).astype(np.uint8)


def _cells_in_box(box, grid):
    """Boolean (h*w,) mask of the grid cells whose centre lies inside ``box`` (x0, y0, x1, y1 as fractions)."""
    h, w = grid
    ys, xs = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    x0, y0, x1, y1 = box
    return ((xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)).reshape(-1)


def attention_on_objects(words_alphas, truths, grid, object_re):
    """Share of attention inside the named object's box while its words are generated.

    ``words_alphas``: from :func:`word_attention`; ``truths``: each image's scene (objects in
    reading order, boxes); ``object_re``: matches an object phrase. The k-th phrase a caption
    names is matched to the k-th object of the scene when the caption names the right objects
    in order; other captions are left out. Returns ``(mean share, uniform share, words)``: the
    uniform share is what attention spread evenly over the grid would put in the same boxes.
    """
    got, uniform, n = 0.0, 0.0, 0
    for (words, alphas), truth in zip(words_alphas, truths):
        text = " ".join(words)
        found = list(object_re.finditer(text))
        named = [m.groups() for m in found]
        if named != [(o["size"], o["colour"], o["shape"]) for o in truth["objects"]]:
            continue
        starts = np.cumsum([0] + [len(w) + 1 for w in words])  # character offset of each word
        for m, obj in zip(found, truth["objects"]):
            cells = _cells_in_box(obj["box"], grid)
            for t in np.flatnonzero((starts[:-1] >= m.start()) & (starts[:-1] < m.end())):
                got += float(alphas[t][cells].sum())
                uniform += float(cells.mean())
                n += 1
    return (got / n if n else None), (uniform / n if n else None), n


def _thumb(path, size):
    with Image.open(path) as im:
        return im.convert("RGB").resize(size, Image.BILINEAR)


def panel_images(image_path, words, alphas, grid, out_dir, stem, size=(224, 224)):
    """Write the photo and one heat map per word as PNGs in ``out_dir``; return their names."""
    photo = _thumb(image_path, size)
    photo.save(out_dir / f"{stem}.png")
    names = []
    arr = np.asarray(photo)
    for t, (word, alpha) in enumerate(zip(words, alphas)):
        name = f"{stem}_{t:02d}.png"
        Image.fromarray(overlay(arr, upsample(alpha, grid, size))).resize((112, 112), Image.BILINEAR).save(
            out_dir / name
        )
        names.append((word, name))
    return f"{stem}.png", names


def strip(image_path, words, alphas, grid, path, size=(160, 160)):
    """One PNG: the photo then a heat map per word, each word written under its map (DVC plots)."""
    from PIL import ImageDraw

    photo = _thumb(image_path, size)
    tiles = [photo] + [Image.fromarray(overlay(np.asarray(photo), upsample(a, grid, size))) for a in alphas]
    canvas = Image.new("RGB", (size[0] * len(tiles), size[1] + 18), "white")
    draw = ImageDraw.Draw(canvas)
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * size[0], 0))
        if i:
            draw.text((i * size[0] + 4, size[1] + 3), words[i - 1], fill="black")
    canvas.save(path)
