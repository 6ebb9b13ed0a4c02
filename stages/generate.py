"""Stage: generate the offline default dataset (see ``main``'s docstring)."""

import json

import click

from captioning import config, shapes
from captioning.cli import user_errors
from captioning.files import atomic_path


@config.dataclasses.dataclass
class Params:
    n_train: int = config.field(lo=1)
    n_val: int = config.field(lo=1)
    n_test: int = config.field(lo=1)
    image_size: int = config.field(lo=32, hi=1024)
    captions_per_image: int = config.field(lo=1, hi=6)


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--out-dir", required=True, type=click.Path(file_okay=False), help="Dataset folder to create.")
@user_errors
def main(params_file, out_dir):
    """Generate the offline default dataset: coloured shapes with several reference captions each.

    Writes OUT_DIR/images/*.png and OUT_DIR/dataset_shapes.json (Karpathy split layout), whose
    image records also carry each scene's ground truth (for object and layout accuracy).
    Deterministic from the seed: the same params give byte-identical files.
    """
    params = config.load_params(params_file, {"generate": Params})
    p, seed = params["generate"], params["seed"]
    with atomic_path(out_dir) as tmp:
        dataset = shapes.generate(
            tmp,
            n_train=p.n_train,
            n_val=p.n_val,
            n_test=p.n_test,
            seed=seed,
            image_size=p.image_size,
            n_captions=p.captions_per_image,
        )
        (tmp / "dataset_shapes.json").write_text(json.dumps(dataset, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    n = len(dataset["images"])
    click.echo(
        f"generate: {n} images ({p.n_train} train / {p.n_val} val / {p.n_test} test),"
        f" {sum(len(i['sentences']) for i in dataset['images'])} captions -> {out_dir}"
    )


if __name__ == "__main__":
    main()
