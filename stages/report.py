"""Stage: the gallery of captions with attention maps (see ``main``)."""

import time

import click

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.files import read_json, write_json


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
    from captioning import gallery
    from captioning.feature_store import FeatureStore
    from captioning.model_folder import load_model
    from captioning.shapes import OBJECT_RE

    t0 = time.perf_counter()
    model, store, preds = load_model(model_dir), FeatureStore(features), read_json(predictions)
    records = {r["image"]: r for r in read_json(dataset)["images"]}
    attention, maps_of = gallery.attention_summary(model, store, preds, records, OBJECT_RE)
    groups = gallery.pick(preds, p.per_group, seed)
    shown = {e["image"]: e for group in groups.values() for e in group}
    attention["panels"] = len(shown)
    maps = dict(zip(shown, maps_of(list(shown.values()))))
    grid = tuple(int(g) for g in store.attrs["grid"])
    attention["page_bytes"] = gallery.write_gallery(
        out, plots_dir, groups, maps, grid, images, read_json(metrics_file), curves, attention, p.plots
    )
    write_json(summary, attention)
    inside = ""
    if "attention_in_object" in attention:
        inside = (
            f", attention in the named object's box {attention['attention_in_object']:.3f}"
            f" (uniform {attention['uniform_in_object']:.3f})"
        )
    click.echo(
        f"report: {len(shown)} panels, {attention['page_bytes'] // 1024} KiB{inside},"
        f" {time.perf_counter() - t0:.1f}s -> {out}/index.html"
    )


if __name__ == "__main__":
    main()
