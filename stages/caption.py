"""Caption new images from the command line (see ``main``)."""

import json
from pathlib import Path

import click

from captioning.cli import quiet_tensorflow, user_errors
from captioning.errors import CaptioningError


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model",
    "model_dir",
    default="models_final",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Model folder.",
)
@click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1, 50), help="1 = greedy.")
@click.option("--max-length", default=20, show_default=True, type=click.IntRange(1, 200), help="Words at most.")
@click.option("--length-penalty", default=0.0, show_default=True, type=click.FloatRange(0, 5))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
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
def main(images, model_dir, beam_size, max_length, length_penalty, as_json, attention_dir, html_out):
    """Print one caption per image, using the trained model and the encoder it was trained on.

    The encoder (backbone, layer, weights, image size) is rebuilt from the model folder's
    config. An unreadable image gets an error line naming it; the others are still captioned,
    and the exit status is 1 if any failed. With --attention or --html, also shows where the
    decoder looked for each word (decoders with attention only).
    """
    quiet_tensorflow()
    import numpy as np

    from captioning.decode import caption_features
    from captioning.encoder import build_encoder, make_forward
    from captioning.images import ImageError, load_image
    from captioning.predict import load_model

    model = load_model(model_dir)
    if (attention_dir or html_out) and not model.decoder.settings().get("attention", True):
        raise CaptioningError(
            f"{model_dir}: this decoder does not attend (trained with attention off): no maps to draw"
        )
    forward = make_forward(*build_encoder(model.encoder))
    ok, arrays, failed = [], [], 0
    for path in images:
        try:
            arrays.append(load_image(path, model.encoder.image_size))
            ok.append(path)
        except ImageError as e:
            failed += 1
            click.echo(f"Error: {path}: {e}", err=True)
    if ok:
        feats = np.concatenate([forward(np.stack(arrays[i : i + 32]))[0].numpy() for i in range(0, len(arrays), 32)])
        # Round through the stored precision, so the decoder sees what it was trained on.
        feats = feats.astype(model.feature_dtype).astype(np.float32)
        caps, _ = caption_features(
            model.decoder, model.vocab, feats, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty
        )
        for path, cap in zip(ok, caps):
            click.echo(json.dumps({"image": str(Path(path)), "caption": cap}) if as_json else f"{path}\t{cap}")
        if attention_dir or html_out:
            write_attention(model, feats, ok, caps, attention_dir, html_out)
    if failed:
        raise SystemExit(1)


def write_attention(model, feats, paths, captions, attention_dir, html_out):
    """Per-word heat maps into ATTENTION_DIR and/or a page at HTML_OUT (its PNGs in HTML_OUT_files/)."""
    from captioning import gallery
    from captioning.feature_store import square_grid
    from captioning.files import atomic_path

    grid = square_grid(feats.shape[1])
    maps = gallery.word_attention(model.decoder, model.vocab, feats, captions)
    stems = [f"{i:03d}_{gallery.safe_stem(Path(p).name)}" for i, p in enumerate(paths)]
    if attention_dir:
        Path(attention_dir).mkdir(parents=True, exist_ok=True)
        for path, stem, (words, alphas) in zip(paths, stems, maps):
            gallery.panel_images(path, words, alphas, grid, Path(attention_dir), stem)
    if html_out:
        html_out = Path(html_out)
        files = html_out.with_name(html_out.stem + "_files")
        with atomic_path(files) as tmp:
            tmp.mkdir()
            panels = []
            for path, stem, cap, (words, alphas) in zip(paths, stems, captions, maps):
                png, word_pngs = gallery.panel_images(path, words, alphas, grid, tmp, stem)
                panels.append(
                    {
                        "image": str(path),
                        "caption": cap,
                        "png": f"{files.name}/{png}",
                        "maps": [(w, f"{files.name}/{n}") for w, n in word_pngs],
                    }
                )
        with atomic_path(html_out) as tmp:
            tmp.write_text(gallery.page("Captions", {}, {"Images": panels}, ""), encoding="utf-8")


if __name__ == "__main__":
    main()
