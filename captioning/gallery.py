"""The gallery page: captions beside their images, where the decoder looked per word (heat maps
from :mod:`captioning.heatmaps`), the summary metrics and the training curves.

The page (:func:`write_gallery`) is one self-contained folder: index.html, PNGs beside it,
curves as inline SVG. No script, font or stylesheet comes from the network.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

import numpy as np

from . import heatmaps
from .files import atomic_path


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


SUMMARY_KEYS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "object_accuracy", "layout_accuracy")


def attention_summary(model, store, predictions, records, object_re, chunk=256) -> tuple:
    """``(summary, maps)``: whether the decoder attends and, on data with scene ground truth, the
    share of attention inside the named object's box; ``maps(entries)`` gives the per-word maps
    of predictions (:func:`captioning.decode.word_attention`, ``chunk`` images in memory at a time)."""
    from .decode import word_attention

    store.check_encoder(model.encoder, model.folder)
    attends = model.decoder.settings().get("attention", True)  # the transformer always attends
    grid = tuple(int(g) for g in store.attrs["grid"])

    def maps(entries):
        out = []
        for i in range(0, len(entries), chunk):
            part = entries[i : i + chunk]
            feats = store.load([e["image"] for e in part])
            out += word_attention(model.decoder, model.vocab, feats, [e["caption"] for e in part])
        return out

    summary = {"attention": bool(attends)}
    truths = [records[e["image"]].get("truth") for e in predictions]
    if attends and all(truths):  # the generated data: where is each named object?
        share, uniform, n = heatmaps.attention_on_objects(maps(predictions), truths, grid, object_re)
        summary["object_words"] = n  # 0 when no caption names its objects right: nothing to measure
        if n:
            summary.update(attention_in_object=round(share, 4), uniform_in_object=round(uniform, 4))
    return summary, maps


def write_gallery(out, plots_dir, groups, maps, grid, images, metrics, curves, summary, plots):
    """Write the gallery folder ``out`` (index.html and its PNGs) and ``plots`` attention strips of
    the random sample into ``plots_dir``, both atomically. ``groups``: :func:`pick`'s; ``maps``:
    each shown image's (words, alphas); ``summary``: :func:`attention_summary`'s."""
    attends = summary["attention"]
    shown = {e["image"]: e for group in groups.values() for e in group}
    with atomic_path(out) as tmp, atomic_path(plots_dir) as tmp_plots:
        tmp.mkdir()
        tmp_plots.mkdir()
        panels = {}
        for key, entry in shown.items():
            words, alphas = maps[key]
            png, word_pngs = heatmaps.panel_images(Path(images) / key, words, alphas, grid, tmp, safe_stem(key))
            panels[key] = {**entry, "png": png, "maps": word_pngs if attends else []}
        for key in [e["image"] for e in groups["Random sample"]][: plots if attends else 0]:
            heatmaps.strip(Path(images) / key, *maps[key], grid, tmp_plots / f"{safe_stem(key)}.png")
        row = {k: metrics[k] for k in SUMMARY_KEYS if k in metrics}
        row.update({k: summary[k] for k in ("attention_in_object", "uniform_in_object") if k in summary})
        html_text = page(
            f"Captions: {metrics.get('images')} {metrics.get('split')} images, beam {metrics.get('beam_size')}",
            row,
            {name: [panels[e["image"]] for e in group] for name, group in groups.items()},
            curves_svg(read_curves(curves)),
            note=None if attends else "This decoder does not attend: no attention maps.",
        )
        (tmp / "index.html").write_text(html_text, encoding="utf-8")
    return sum(f.stat().st_size for f in Path(out).iterdir())
