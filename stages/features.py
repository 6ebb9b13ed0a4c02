"""Stage: encode the images of one features shard with a CNN into an HDF5 file (see ``main``)."""

import click

from captioning import config, encoder
from captioning.cli import quiet_tensorflow, user_errors
from captioning.errors import CaptioningError
from captioning.files import read_json, write_json


@config.dataclasses.dataclass
class Params:
    backbone: str = config.field()  # an encoder.BACKBONES entry, or a path to a .keras model file
    weights: str = config.field()  # imagenet | none (random init from seed) | path to a .h5 file
    layer: str = config.field()  # feature layer; empty = the backbone's last conv block (a file: its output)
    image_size: int = config.field(lo=32, hi=1024)
    alpha: float = config.field(choices=(0.25, 0.5, 0.75, 1.0))  # MobileNet width
    batch_size: int = config.field(lo=1, hi=4096)
    dtype: str = config.field(choices=("float16", "float32"))
    flip: bool = config.field()  # also encode every image mirrored (training picks one of the two)
    max_bad_fraction: float = config.field(lo=0.0, hi=1.0)
    shards: list[int] = config.field()  # [0, 1, ..., N-1]: one features@I stage per shard (dvc.yaml matrix)

    def validate(self, section):
        if self.backbone not in encoder.BACKBONES and not encoder.is_model_file(self.backbone):
            raise CaptioningError(
                f"{section}.backbone: expected one of {', '.join(encoder.BACKBONES)} or a path to a"
                f" {encoder.MODEL_FILE_SUFFIX} file; got {self.backbone!r}"
            )
        if self.shards != list(range(len(self.shards))) or not self.shards:
            raise CaptioningError(f"{section}.shards: expected [0, 1, ..., N-1], got {self.shards}")


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, type=click.Path(dir_okay=False), help="Normalised dataset JSON (prepare).")
@click.option("--images", required=True, type=click.Path(file_okay=False), help="Image folder.")
@click.option("--shard", "shard", type=int, default=None, help="Encode shard I of features.shards only.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="HDF5 features file to write.")
@click.option("--report", required=True, type=click.Path(dir_okay=False), help="JSON report (skips, speed).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@user_errors
def main(params_file, dataset, images, shard, out, report, progress):
    """Encode the images of DATASET with a Keras CNN (no classifier) into one HDF5 file.

    Stores the spatial feature map (N, h*w, C) for attention and its mean (N, C), keyed by
    image, with the encoder settings as attributes. With --shard I, only shard I of the
    len(features.shards) shards (a contiguous slice of the image list); merge_features joins
    the shard files into the one features file, byte for byte what one run would write, so
    shards can run on separate machines. Resumes after an interruption from OUT.partial.h5.
    Unreadable images are skipped and listed in REPORT. With features.flip every image is
    also encoded mirrored (key IMAGE#flip, the row after it): training then reads either.
    """
    quiet_tensorflow()
    params = config.load_params(params_file, {"features": Params})
    p, seed = params["features"], params["seed"]
    if shard is not None and shard not in p.shards:
        raise CaptioningError(f"--shard {shard}: features.shards is {p.shards}")
    keys = [r["image"] for r in read_json(dataset)["images"]]
    if not keys:
        raise CaptioningError(f"{dataset}: no images")
    if p.flip:
        keys = encoder.with_mirrors(keys)
    spec = encoder.make_spec(p.backbone, p.weights, p.layer, p.image_size, p.alpha, seed)
    rep = encoder.extract_features(
        spec,
        images,
        keys,
        out,
        batch_size=p.batch_size,
        dtype=p.dtype,
        max_bad_fraction=p.max_bad_fraction,
        progress=progress,
        shard=None if shard is None else (shard, len(p.shards)),
    )
    write_json(report, rep)
    part = "" if shard is None else f" (shard {shard}/{len(p.shards)} of {rep['total_images']})"
    click.echo(
        f"features: {rep['images']} images{part} -> {out} spatial {tuple(rep['spatial_shape'])}"
        f" ({spec.backbone}/{spec.resolved_layer()}, {len(rep['skipped'])} skipped,"
        f" {rep['resumed_images']} resumed, {rep['images_per_second'] or 0:.1f} img/s)"
    )


if __name__ == "__main__":
    main()
