"""Do two systems rank the same on every part of a split? Score evaluate's predictions files on
fixed parts of the split's images, to see whether a choice made on the whole split (decoding
settings, ensemble members) holds on each part or rides on a few images.

    python -m benchmarks.split_halves PREDICTIONS.json [PREDICTIONS.json ...] [--parts 2]

PREDICTIONS are files `stages/evaluate.py --predictions` wrote (each image's caption and its
references). Images are sorted by name and dealt round-robin into ``--parts`` parts (even and odd
positions for two), so every file is cut the same way. A part's CIDEr is not comparable with the
whole split's: its document frequencies come from that part's own references.
"""

from __future__ import annotations

import click

SCORES = ("BLEU-4", "METEOR", "CIDEr")


def deal(predictions: list, parts: int) -> list:
    """``predictions`` (rows with an ``image``) in ``parts`` lists: sorted by image, round-robin."""
    rows = sorted(predictions, key=lambda r: r["image"])
    return [rows[k::parts] for k in range(parts)]


def read_predictions(path) -> list:
    from captioning.errors import CaptioningError
    from captioning.files import read_json

    rows = read_json(path)
    if not isinstance(rows, list):
        raise CaptioningError(f"{path}: expected a list of predictions, as evaluate --predictions writes")
    for i, r in enumerate(rows):
        if not (isinstance(r, dict) and {"image", "caption", "references"} <= set(r)):
            raise CaptioningError(f"{path}: prediction {i} lacks image, caption or references")
    return rows


@click.command()
@click.argument("predictions", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--parts", default=2, show_default=True, type=click.IntRange(min=2))
def main(predictions, parts):
    from captioning.errors import CaptioningError
    from captioning.metrics import coco_scores

    for path in predictions:
        try:
            rows = read_predictions(path)
        except CaptioningError as e:
            raise click.ClickException(str(e)) from None
        cells = []
        for part in deal(rows, parts):
            s = coco_scores(
                {r["image"]: r["references"] for r in part},
                {r["image"]: r["caption"] for r in part},
                use_spice=False,
                log=lambda *_: None,
            )
            cells.append(" / ".join(f"{s[k]:.4f}" for k in SCORES))
        click.echo(f"{path} ({len(rows)} images; {' / '.join(SCORES)} per part): " + "  |  ".join(cells))


if __name__ == "__main__":
    main()
