"""Stage: read a dataset in its native layout into one normalised JSON (see ``main``)."""

import click

from captioning import config, datasets
from captioning.cli import user_errors
from captioning.files import write_json


@config.dataclasses.dataclass
class Params:
    split_ratios: list[float] = config.field()  # train/val/test when the data has no split
    max_bad_fraction: float = config.field(lo=0.0, hi=1.0)

    def validate(self, section):
        r = self.split_ratios
        if len(r) != 3 or min(r) < 0 or abs(sum(r) - 1) > 1e-6:
            raise datasets.CaptioningError(
                f"{section}.split_ratios: expected 3 non-negative numbers summing to 1, got {r}"
            )


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--captions", required=True, type=click.Path(), help="Captions file (token, CSV, COCO or Karpathy JSON).")
@click.option("--images", required=True, type=click.Path(), help="Folder the image names are relative to.")
@click.option(
    "--splits",
    type=click.Path(exists=True),
    help="Where the splits come from: a folder of Flickr_*Images.txt lists, a Karpathy JSON, or"
    " the captions file itself (its own split, else seeded). Default: the captions file.",
)
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(("auto", *datasets.FORMATS)))
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Normalised dataset JSON to write.")
@click.option("--report", required=True, type=click.Path(dir_okay=False), help="JSON report of what was skipped.")
@user_errors
def main(params_file, captions, images, splits, fmt, out, report):
    """Read a captioning dataset in its native layout and write one normalised JSON.

    Layouts: Flickr8k/Flickr30k token files, the image,caption CSV, Flickr30k results.csv,
    MS-COCO caption JSON and Karpathy split JSON (FORMAT auto detects them). Splits are read
    from SPLITS only: Flickr split lists, a Karpathy JSON, or a seeded split.
    Missing images, empty and duplicate captions are skipped and counted in REPORT.
    """
    params = config.load_params(params_file, {"prepare": Params})
    p, seed = params["prepare"], params["seed"]
    records, rep = datasets.load_dataset(
        captions,
        images,
        fmt=fmt,
        splits=splits,
        split_ratios=tuple(p.split_ratios),
        seed=seed,
        max_bad_fraction=p.max_bad_fraction,
    )
    write_json(out, {"captions_file": str(captions), "format": rep["format"], "images": records})
    write_json(report, rep)
    skipped = len(rep["missing_images"]) + len(rep["empty_captions"]) + rep["duplicate_captions"]
    s = rep["splits"]
    click.echo(
        f"prepare: {rep['images']} images, {rep['captions']} captions ({rep['format']}; train {s['train']}"
        f" / val {s['val']} / test {s['test']}, {rep['split_source']} split), {skipped} skipped -> {out}"
    )


if __name__ == "__main__":
    main()
