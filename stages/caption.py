"""Caption new images from the command line (see ``main``)."""

import json
from pathlib import Path

import click

from captioning.cli import quiet_tensorflow, user_errors


@click.command()
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--model", "model_dir", default="models", show_default=True, type=click.Path(file_okay=False), help="Model folder."
)
@click.option("--beam-size", default=3, show_default=True, type=click.IntRange(1, 50), help="1 = greedy.")
@click.option("--max-length", default=20, show_default=True, type=click.IntRange(1, 200), help="Words at most.")
@click.option("--length-penalty", default=0.0, show_default=True, type=click.FloatRange(0, 5))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per image.")
@user_errors
def main(images, model_dir, beam_size, max_length, length_penalty, as_json):
    """Print one caption per image, using the trained model and the encoder it was trained on.

    The encoder (backbone, layer, weights, image size) is rebuilt from the model folder's
    config. An unreadable image gets an error line naming it; the others are still captioned,
    and the exit status is 1 if any failed.
    """
    quiet_tensorflow()
    import numpy as np

    from captioning.decode import caption_features
    from captioning.encoder import build_encoder, make_forward
    from captioning.images import ImageError, load_image
    from captioning.predict import load_model

    model = load_model(model_dir)
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
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
