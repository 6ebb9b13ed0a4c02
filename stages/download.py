"""Download a real dataset, verify it and unpack it (see ``main``)."""

import click

from captioning import download
from captioning.cli import user_errors


@click.command()
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to download and unpack into.")
@click.option("--keep-archives", is_flag=True, help="Keep the archives after unpacking (default: delete them).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0, 50), help="Retries per file.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (speed, ETA).")
@user_errors
def main(name, out, keep_archives, retries, progress):
    """Download dataset NAME into OUT: flickr8k, flickr30k, coco2014, coco2017 or karpathy.

    Downloads resume after an interruption, are verified against the sizes and checksums in
    captioning/download.py, and are unpacked safely. A rerun downloads nothing. Ends with the
    `dvc exp run` line that trains and evaluates on the data.
    """
    if name not in download.DATASETS:
        raise click.BadParameter(f"{name!r} (choose from {', '.join(sorted(download.DATASETS))})", param_hint="NAME")
    dataset = download.DATASETS[name]
    if dataset.manual:
        click.echo(dataset.manual.format(out=out))
    rep = download.fetch_dataset(
        dataset, out, keep_archives=keep_archives, progress=progress, retries=retries, log=click.echo
    )
    command = download.dvc_command(dataset, out)
    if command:
        click.echo(f"to train and evaluate on it:\n  {command}")
    click.echo(
        f"download: {name} -> {out}: {len(rep['downloaded'])} downloaded, {len(rep['unpacked'])} unpacked,"
        f" {len(rep['kept'])} already there"
    )


if __name__ == "__main__":
    main()
