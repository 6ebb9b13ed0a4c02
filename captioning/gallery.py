"""See what the model sees: captions beside their images, and where the decoder looked per word.

Maths (numpy): :func:`upsample` spreads a (L,) attention vector over the image, each grid cell
covering its own block of pixels (nearest, so one location lights exactly its cell);
:func:`overlay` blends it onto the photo (the maps come from
:func:`captioning.inference.word_attention`). :func:`attention_on_objects` measures, on the
generated data, how much of that attention lands inside the box of the object being named.

The page (:func:`write_gallery`) is one self-contained folder: index.html, PNGs beside it,
curves as inline SVG. No script, font or stylesheet comes from the network.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

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


# ---- the page ------------------------------------------------------------------------------


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


def curves_svg(curves: dict) -> str:
    """Training curves ``{name: [(step, value)]}`` as one inline SVG (Vega-Lite, rendered offline)."""
    import vl_convert

    rows = [{"epoch": s + 1, "value": v, "curve": name} for name, pts in curves.items() for s, v in pts]
    spec = {
        "$schema": "https://vega.github.io/schema/vega-lite/v5.json",
        "data": {"values": rows},
        "mark": {"type": "line", "point": True},
        "width": 360,
        "height": 200,
        "encoding": {
            "x": {"field": "epoch", "type": "ordinal", "axis": {"labelAngle": 0}},
            "y": {"field": "value", "type": "quantitative", "title": "loss"},
            "color": {"field": "curve", "type": "nominal"},
        },
    }
    return vl_convert.vegalite_to_svg(spec, vl_version="5.21")


def read_curves(folder) -> dict:
    """dvclive's per-metric TSVs (``step<TAB>name``) -> ``{name: [(step, value)]}``."""
    out = {}
    for tsv in sorted(Path(folder).glob("*_loss.tsv")):
        lines = tsv.read_text().splitlines()[1:]
        out[tsv.stem] = [(int(a), float(b)) for a, b in (line.split("\t")[-2:] for line in lines)]
    return out


def _esc(x) -> str:
    return html.escape(str(x))


def page(title, summary: dict, groups: dict, curves: str, note: str = "") -> str:
    """The gallery's HTML. ``groups``: {heading: [panel dict]} with image, caption, references,
    scores, ``maps`` [(word, png)] and, when evaluate kept several, ``captions`` (the first is ``caption``)."""
    css = (
        "body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:22px}"
        "table.m td,table.m th{padding:2px 10px;text-align:right}.panel{display:flex;gap:16px;"
        "border-top:1px solid #ddd;padding:12px 0}.maps{display:flex;flex-wrap:wrap;gap:4px}"
        ".maps figure{margin:0;text-align:center;font-size:12px}.caption{font-size:16px;font-weight:600}"
        ".refs{color:#555;margin:4px 0}.score{color:#036}"
    )
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{_esc(title)}</title>",
        f"<style>{css}</style></head><body><h1>{_esc(title)}</h1>",
    ]
    if note:
        parts.append(f"<p>{_esc(note)}</p>")
    parts.append(
        "<table class='m'><tr>"
        + "".join(f"<th>{_esc(k)}</th>" for k in summary)
        + "</tr><tr>"
        + "".join(f"<td>{_esc(round(v, 3) if isinstance(v, float) else v)}</td>" for v in summary.values())
        + "</tr></table>"
    )
    if curves:
        parts.append(f"<h2>Training curves</h2><div class='curves'>{curves}</div>")
    for heading, panels in groups.items():
        parts.append(f"<h2>{_esc(heading)}</h2>")
        for p in panels:
            scores = " · ".join(f"{k} {p[k]:.3f}" for k in ("CIDEr", "BLEU-4") if k in p)
            maps = "".join(
                f"<figure><img src='{_esc(png)}' width='112' height='112' alt='{_esc(w)}'>"
                f"<figcaption>{_esc(w)}</figcaption></figure>"
                for w, png in p.get("maps", [])
            )
            refs = "".join(f"<li>{_esc(r)}</li>" for r in p.get("references", []))
            also = "".join(f"<li>{_esc(c)}</li>" for c in p.get("captions", [])[1:])  # its other captions
            also = f"<div class='score'>also:</div><ol class='nbest' start='2'>{also}</ol>" if also else ""
            parts.append(
                f"<div class='panel'><img src='{_esc(p['png'])}' width='224' height='224' alt='{_esc(p['image'])}'>"
                f"<div><div class='caption'>{_esc(p['caption'])}</div>{also}<div class='score'>{_esc(p['image'])}"
                f"{' · ' + scores if scores else ''}</div><ul class='refs'>{refs}</ul>"
                f"<div class='maps'>{maps}</div></div></div>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)


def pick(predictions, per_group, seed):
    """Best, worst (by CIDEr) and a seeded random sample of the predictions, ``per_group`` each."""
    ranked = sorted(predictions, key=lambda p: (-p.get("CIDEr", 0.0), p["image"]))
    rng = np.random.default_rng(seed)
    sample = [
        predictions[i] for i in sorted(rng.choice(len(predictions), min(per_group, len(predictions)), replace=False))
    ]
    return {
        "Best (highest CIDEr)": ranked[:per_group],
        "Worst (lowest CIDEr)": ranked[::-1][:per_group],
        "Random sample": sample,
    }


def safe_stem(key: str) -> str:
    """A file-name-safe stem for an image key (which may hold folders)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(Path(key).with_suffix("")))
