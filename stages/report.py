"""Stage: the gallery of captions with attention maps (see ``main``)."""

import time

import click

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.files import atomic_path, read_json, write_json


@config.dataclasses.dataclass
class Params:
    per_group: int = config.field(lo=1, hi=200)  # images shown as best, as worst and as a random sample
    plots: int = config.field(lo=0, hi=50)  # attention strips also kept as DVC image plots


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Trained model folder.")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="HDF5 features.")
@click.option("--dataset", required=True, type=click.Path(dir_okay=False), help="Normalised dataset JSON.")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Image folder.")
@click.option("--predictions", required=True, type=click.Path(dir_okay=False), help="evaluate's predictions.")
@click.option("--metrics", "metrics_file", required=True, type=click.Path(dir_okay=False), help="evaluate's metrics.")
@click.option("--curves", required=True, type=click.Path(file_okay=False), help="dvclive plots folder of train.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Gallery folder to write.")
@click.option("--plots", "plots_dir", required=True, type=click.Path(file_okay=False), help="Attention strips.")
@click.option("--summary", required=True, type=click.Path(dir_okay=False), help="Attention metrics JSON to write.")
@user_errors
def main(params_file, model_dir, features, dataset, images, predictions, metrics_file, curves, out, plots_dir, summary):
    """Write a self-contained gallery (OUT/index.html and PNGs, nothing loaded from the network).

    It shows the evaluated images with their generated and reference captions and per-image
    CIDEr and BLEU-4, grouped as best, worst and a seeded random sample; for decoders that
    attend, one heat map per generated word; the summary metrics and the training curves.
    PLOTS_DIR gets attention strips for DVC's image plots. SUMMARY measures, on data with scene
    ground truth, the share of attention inside the box of the object being named.
    """
    params = config.load_params(params_file, {"report": Params})
    p, seed = params["report"], params["seed"]
    seed_everything(seed)
    from pathlib import Path

    from captioning import gallery
    from captioning.decode import word_attention
    from captioning.feature_store import FeatureStore
    from captioning.model_folder import load_model
    from captioning.shapes import OBJECT_RE

    t0 = time.perf_counter()
    model = load_model(model_dir)
    store = FeatureStore(features)
    grid = tuple(int(g) for g in store.attrs["grid"])
    preds = read_json(predictions)
    records = {r["image"]: r for r in read_json(dataset)["images"]}
    attends = model.decoder.settings().get("attention", True)  # the transformer always attends

    def maps_for(entries, chunk=256):  # a chunk of features in memory at a time
        out = []
        for i in range(0, len(entries), chunk):
            part = entries[i : i + chunk]
            feats = store.load([e["image"] for e in part])
            out += word_attention(model.decoder, model.vocab, feats, [e["caption"] for e in part])
        return out

    groups = gallery.pick(preds, p.per_group, seed)
    shown = {e["image"]: e for group in groups.values() for e in group}
    maps = dict(zip(shown, maps_for(list(shown.values()))))
    attention = {"panels": len(shown), "attention": bool(attends)}
    truths = [records[e["image"]].get("truth") for e in preds]
    if attends and all(truths):  # the generated data: where is each named object?
        share, uniform, n = gallery.attention_on_objects(maps_for(preds), truths, grid, OBJECT_RE)
        attention["object_words"] = n  # 0 when no caption names its objects right: nothing to measure
        if n:
            attention.update(attention_in_object=round(share, 4), uniform_in_object=round(uniform, 4))

    with atomic_path(out) as tmp, atomic_path(plots_dir) as tmp_plots:
        tmp.mkdir()
        tmp_plots.mkdir()
        panels = {}
        for key, entry in shown.items():
            words, alphas = maps[key]
            png, word_pngs = gallery.panel_images(Path(images) / key, words, alphas, grid, tmp, gallery.safe_stem(key))
            panels[key] = {**entry, "png": png, "maps": word_pngs if attends else []}
        for key in [e["image"] for e in groups["Random sample"]][: p.plots if attends else 0]:
            gallery.strip(Path(images) / key, *maps[key], grid, tmp_plots / f"{gallery.safe_stem(key)}.png")
        metrics = read_json(metrics_file)
        summary_row = {
            k: metrics[k]
            for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "object_accuracy", "layout_accuracy")
            if k in metrics
        }
        summary_row.update({k: attention[k] for k in ("attention_in_object", "uniform_in_object") if k in attention})
        html = gallery.page(
            f"Captions: {metrics.get('images')} {metrics.get('split')} images, beam {metrics.get('beam_size')}",
            summary_row,
            {name: [panels[e["image"]] for e in group] for name, group in groups.items()},
            gallery.curves_svg(gallery.read_curves(curves)),
            note=None if attends else "This decoder does not attend: no attention maps.",
        )
        (tmp / "index.html").write_text(html, encoding="utf-8")
    attention["page_bytes"] = sum(f.stat().st_size for f in Path(out).iterdir())
    write_json(summary, attention)
    inside = (
        (
            f", attention in the named object's box {attention['attention_in_object']:.3f}"
            f" (uniform {attention['uniform_in_object']:.3f})"
        )
        if "attention_in_object" in attention
        else ""
    )
    click.echo(
        f"report: {len(shown)} panels, {attention['page_bytes'] // 1024} KiB{inside},"
        f" {time.perf_counter() - t0:.1f}s -> {out}/index.html"
    )


if __name__ == "__main__":
    main()
