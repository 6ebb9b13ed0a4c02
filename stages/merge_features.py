"""Stage: join the features shards into the one features file (see ``main``)."""

from pathlib import Path

import click

from captioning import config
from captioning.cli import user_errors
from captioning.errors import CaptioningError
from captioning.files import read_json, write_json

SECTION = "features"  # the params it reads belong to the features stage's section


@config.dataclasses.dataclass
class Params:
    shards: list[int] = config.field()  # features.shards: [0, 1, ..., N-1]


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--shards", "shard_dir", required=True, type=click.Path(file_okay=False), help="Folder of shard-I.h5.")
@click.option(
    "--reports", "report_dir", required=True, type=click.Path(file_okay=False), help="Folder of shard-I.json."
)
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Features file to write.")
@click.option("--report", required=True, type=click.Path(dir_okay=False), help="JSON report (all shards).")
@user_errors
def main(params_file, shard_dir, report_dir, out, report):
    """Join SHARDS/shard-0.h5 .. shard-(N-1).h5 (N = len(features.shards)) into OUT.

    OUT holds the same bytes an unsharded run writes: the documented layout (images,
    spatial, pooled, encoder attributes, content hash). A missing shard, or shards made with
    other settings, is an error naming the file. REPORT sums the shards' reports.
    """
    from captioning.feature_store import merge_shards

    n = len(config.load_params(params_file, {SECTION: Params}, partial=(SECTION,))[SECTION].shards)
    shards = [Path(shard_dir) / f"shard-{i}.h5" for i in range(n)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise CaptioningError(
            f"missing features shard(s): {', '.join(missing)} (run `dvc repro features` for every shard,"
            " or `dvc pull` them from the machines that did)"
        )
    reports = [read_json(Path(report_dir) / f"shard-{i}.json") for i in range(n)]
    rows = merge_shards(shards, out)
    seconds = sum(r["seconds"] for r in reports)
    encoded = sum(r["encoded_images"] for r in reports)
    merged = {
        "images": rows,
        "shards": n,
        "skipped": [s for r in reports for s in r["skipped"]],
        "spatial_shape": [rows, *reports[0]["spatial_shape"][1:]],
        "pooled_shape": [rows, reports[0]["pooled_shape"][1]],
        "encoded_images": encoded,
        "resumed_images": sum(r["resumed_images"] for r in reports),
        "seconds": round(seconds, 2),  # summed over shards (machines may have run them side by side)
        "images_per_second": round(encoded / seconds, 2) if encoded and seconds > 0 else None,
    }
    write_json(report, merged)
    click.echo(f"merge_features: {n} shard(s), {rows} images -> {out} ({len(merged['skipped'])} skipped)")


if __name__ == "__main__":
    main()
