"""Stage: encode every image with a CNN into one HDF5 features file (see ``main``)."""

import click

from captioning import config, encoder
from captioning.cli import quiet_tensorflow, user_errors
from captioning.errors import CaptioningError
from captioning.files import read_json, write_json


@config.dataclasses.dataclass
class Params:
    backbone: str = config.field(choices=tuple(encoder.BACKBONES))
    weights: str = config.field()  # imagenet | none (random init from seed) | path to a .h5 file
    layer: str = config.field()  # feature layer; empty = the backbone's last conv block
    image_size: int = config.field(lo=32, hi=1024)
    alpha: float = config.field(choices=(0.25, 0.5, 0.75, 1.0))  # MobileNet width
    batch_size: int = config.field(lo=1, hi=4096)
    dtype: str = config.field(choices=("float16", "float32"))
    max_bad_fraction: float = config.field(lo=0.0, hi=1.0)


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, type=click.Path(dir_okay=False), help="Normalised dataset JSON (prepare).")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Image folder.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 features file to write.")
@click.option("--report", required=True, type=click.Path(dir_okay=False), help="JSON report (skips, speed).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@user_errors
def main(params_file, dataset, images, out, report, progress):
    """Encode every image of DATASET with a Keras CNN (no classifier) into one HDF5 file.

    Stores the spatial feature map (N, h*w, C) for attention and its mean (N, C), keyed by
    image, with the encoder settings as attributes. Resumes after an interruption from the
    chunks kept in OUT.partial/. Unreadable images are skipped and listed in REPORT.
    """
    quiet_tensorflow()
    params = config.load_params(params_file, {"features": Params})
    p, seed = params["features"], params["seed"]
    keys = [r["image"] for r in read_json(dataset)["images"]]
    if not keys:
        raise CaptioningError(f"{dataset}: no images")
    spec = encoder.EncoderSpec(
        backbone=p.backbone, weights=p.weights, layer=p.layer, image_size=p.image_size, alpha=p.alpha, seed=seed
    )
    rep = encoder.extract_features(
        spec,
        images,
        keys,
        out,
        batch_size=p.batch_size,
        dtype=p.dtype,
        max_bad_fraction=p.max_bad_fraction,
        progress=progress,
    )
    write_json(report, rep)
    click.echo(
        f"features: {rep['images']} images -> {out} spatial {tuple(rep['spatial_shape'])}"
        f" ({spec.backbone}/{spec.resolved_layer()}, {len(rep['skipped'])} skipped,"
        f" {rep['resumed_images']} resumed, {rep['images_per_second'] or 0:.1f} img/s)"
    )


if __name__ == "__main__":
    main()
