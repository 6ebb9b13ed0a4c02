"""The package's console commands (not pipeline stages): ``captioning caption | export | download | serve``.

Installed as the ``captioning`` command; ``python -m captioning`` runs the same group.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cli import quiet_tensorflow, user_errors
from .errors import CaptioningError

MODEL_HELP = "Model folder (written by `dvc repro`) or a bundle (`captioning export`)."


@click.group()
@click.version_option(package_name="captioning")
def main():
    """Caption photos with a trained model, export it as a bundle, serve it, or download a dataset."""


@main.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "model_dirs",
    default=("models_final",),
    multiple=True,
    show_default=True,
    type=click.Path(),
    help=MODEL_HELP + " Given several times: the models decode as one ensemble (one vocabulary, one encoder).",
)
@click.option(
    "--beam-size",
    default=3,
    show_default=True,
    type=click.IntRange(1, 50),
    help="Beams (1 without a length penalty: greedy).",
)
@click.option("--max-length", default=20, show_default=True, type=click.IntRange(1, 200), help="Words at most.")
@click.option(
    "--length-penalty", default=0.0, show_default=True, type=click.FloatRange(0, 5), help="score / length**alpha."
)
@click.option("--n-best", default=1, show_default=True, type=click.IntRange(1, 50), help="Captions per image.")
@click.option("--groups", default=1, show_default=True, type=click.IntRange(1, 50), help="Diverse beam search groups.")
@click.option("--diversity", default=0.0, show_default=True, type=click.FloatRange(0), help="Diverse: Hamming penalty.")
@click.option(
    "--include",
    multiple=True,
    help='Words the caption must contain; one constraint per flag, "|" between alternatives: '
    '--include "dog|dogs" --include "red shirt".',
)
@click.option("--block-trigrams", is_flag=True, help="Never repeat a trigram within a caption.")
@click.option("--sample", default=0, show_default=True, type=click.IntRange(0, 100), help="Draw N captions instead.")
@click.option("--temperature", default=1.0, show_default=True, type=click.FloatRange(0, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="Sampling: the k likeliest only.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True), help="Nucleus.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Sampling seed.")
@click.option(
    "--json", "as_json", is_flag=True, help="One JSON object per image: caption, score, log_prob, alternatives."
)
@click.option(
    "--attention",
    "attention_dir",
    type=click.Path(file_okay=False),
    help="Write each photo and one heat map per generated word (PNGs) into this folder.",
)
@click.option(
    "--html", "html_out", type=click.Path(dir_okay=False), help="Write a small page for these images (PNGs beside it)."
)
@user_errors
def caption(images, model_dirs, as_json, attention_dir, html_out, **decoding):
    """Print one caption per image, using the trained model and the encoder it was trained on.

    A model folder's encoder is rebuilt from its config (backbone, layer, weights file); a bundle
    carries its own. An unreadable image gets an error line naming it; the others are still
    captioned, and the exit status is 1 if any failed. With --attention or --html, also shows
    where the decoder looked for each word (decoders with attention only).

    Steering: --n-best N prints the N best captions (tab-separated; with --json every caption and
    score); --groups G --diversity L makes G groups of beams that avoid each other's words;
    --include makes every caption contain the given words or phrases; --sample N draws N captions
    (--temperature, --top-k, --top-p, --seed).
    """
    quiet_tensorflow()
    from .decode import Decoding
    from .images import ImageError
    from .inference import Captioner

    captioner = Captioner.load(*model_dirs)
    model_dir = model_dirs[0]
    wants_maps = bool(attention_dir or html_out)
    Decoding(**decoding)  # bad settings stop here, before any image is read
    if wants_maps and not captioner.attends:
        raise CaptioningError(
            f"{model_dir}: this decoder does not attend (trained with attention off): no maps to draw"
        )
    ok, arrays, failed = [], [], 0
    for path in images:
        try:
            arrays.append(captioner.read(path))
            ok.append(path)
        except ImageError as e:
            failed += 1
            click.echo(f"Error: {path}: {e}", err=True)
    if ok:
        caps = captioner.caption(arrays, attention=wants_maps, **decoding)
        for path, cap in zip(ok, caps):
            if as_json:
                found = {k: v for k, v in cap.to_json().items() if k != "attention"}
                click.echo(json.dumps({"image": str(Path(path)), **found}))
            else:
                click.echo("\t".join([str(path), cap.text, *(a.text for a in cap.alternatives)]))
        if wants_maps:
            write_attention(captioner, ok, caps, attention_dir, html_out)
    if failed:
        raise SystemExit(1)


def write_attention(captioner, paths, captions, attention_dir, html_out):
    """Per-word heat maps into ATTENTION_DIR and/or a page at HTML_OUT (its PNGs in HTML_OUT_files/)."""
    from . import gallery, heatmaps
    from .feature_store import square_grid
    from .files import atomic_path

    grid = square_grid(captions[0].attention.shape[1])
    stems = [f"{i:03d}_{gallery.safe_stem(Path(p).name)}" for i, p in enumerate(paths)]
    if attention_dir:
        Path(attention_dir).mkdir(parents=True, exist_ok=True)
        for path, stem, cap in zip(paths, stems, captions):
            heatmaps.panel_images(path, cap.words, cap.attention, grid, Path(attention_dir), stem)
    if html_out:
        html_out = Path(html_out)
        files = html_out.with_name(html_out.stem + "_files")
        with atomic_path(files) as tmp:
            tmp.mkdir()
            panels = []
            for path, stem, cap in zip(paths, stems, captions):
                png, word_pngs = heatmaps.panel_images(path, cap.words, cap.attention, grid, tmp, stem)
                panels.append(
                    {
                        "image": str(path),
                        "caption": cap.text,
                        "png": f"{files.name}/{png}",
                        "maps": [(w, f"{files.name}/{n}") for w, n in word_pngs],
                    }
                )
        with atomic_path(html_out) as tmp:
            tmp.write_text(gallery.page("Captions", {}, {"Images": panels}, ""), encoding="utf-8")


@main.command()
@click.option("--model", "model_dir", default="models_final", show_default=True, type=click.Path(), help=MODEL_HELP)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Bundle folder to write.")
@user_errors
def export(model_dir, out):
    """Write a self-contained bundle of a model: decoder, vocabulary, config and the encoder
    network itself (architecture and weights, Keras format).

    The bundle captions with no network, no params.yaml, no dataset and no encoder weights file,
    from any working directory: `captioning caption --model OUT photo.jpg`, `captioning serve
    --model OUT`, or `Captioner.load(OUT)` in Python. Loading uses Keras' safe mode (no code runs
    from the files).
    """
    quiet_tensorflow()
    from .inference import export_bundle

    folder = export_bundle(model_dir, out)
    size = sum(f.stat().st_size for f in folder.iterdir())
    click.echo(f"export: {model_dir} -> {folder} ({size / 2**20:.1f} MiB)")


@main.command()
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to download and unpack into.")
@click.option("--keep-archives", is_flag=True, help="Keep the archives after unpacking (default: delete them).")
@click.option("--retries", default=5, show_default=True, type=click.IntRange(0, 50), help="Retries per file.")
@click.option("--progress/--no-progress", default=True, help="Show progress bars (speed, ETA).")
@user_errors
def download(name, out, keep_archives, retries, progress):
    """Download dataset NAME into OUT: flickr8k, flickr30k, coco2014, coco2017 or karpathy.

    Downloads resume after an interruption, are verified against the sizes and checksums in
    captioning/download.py, and are unpacked safely. A rerun downloads nothing. Ends with the
    `dvc exp run` line that trains and evaluates on the data.
    """
    from . import download as registry

    if name not in registry.DATASETS:
        raise click.BadParameter(f"{name!r} (choose from {', '.join(sorted(registry.DATASETS))})", param_hint="NAME")
    dataset = registry.DATASETS[name]
    if dataset.manual:
        click.echo(dataset.manual.format(out=out))
    rep = registry.fetch_dataset(
        dataset, out, keep_archives=keep_archives, progress=progress, retries=retries, log=click.echo
    )
    command = registry.dvc_command(dataset, out)
    if command:
        click.echo(f"to train and evaluate on it:\n  {command}")
    click.echo(
        f"download: {name} -> {out}: {len(rep['downloaded'])} downloaded, {len(rep['unpacked'])} unpacked,"
        f" {len(rep['kept'])} already there"
    )


@main.command()
@click.option("--model", "model_dir", default="models_final", show_default=True, type=click.Path(), help=MODEL_HELP)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (another needs --token).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--token", envvar="CAPTIONING_TOKEN", help="Bearer token clients must send (env CAPTIONING_TOKEN).")
@click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1, 20), help="Default beams.")
@click.option("--max-length", default=20, show_default=True, type=click.IntRange(1, 100), help="Default words at most.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 512), help="Images per model call.")
@click.option("--max-queue", default=64, show_default=True, type=click.IntRange(1), help="Images queued; more: 503.")
@click.option("--max-images", default=16, show_default=True, type=click.IntRange(1), help="Images per request.")
@click.option("--max-body-mb", default=20.0, show_default=True, type=click.FloatRange(0.01), help="Request body limit.")
@user_errors
def serve(model_dir, host, port, token, beam_size, max_length, max_batch, max_queue, max_images, max_body_mb):
    """Serve the model over HTTP: a web page (upload, attention maps, live camera) at /, the API at
    POST /caption (multipart image files), /health, /model, and its OpenAPI schema at /openapi.json.

    Concurrent requests are captioned together in batches. Binds 127.0.0.1 unless --host says
    otherwise, and then requires --token. Ctrl-C or SIGTERM: the requests in flight finish first.
    """
    quiet_tensorflow()
    from .decode import Decoding
    from .service import Limits
    from .service import serve as run

    limits = Limits(
        max_body_bytes=int(max_body_mb * 2**20), max_images=max_images, max_queue=max_queue, max_batch=max_batch
    )
    run(model_dir, host, port, token, limits, Decoding(beam_size, max_length), log=click.echo)
