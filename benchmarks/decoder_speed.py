"""Training speed and memory of each decoder on the same cached features: the real training loop.

    python -m benchmarks.decoder_speed FEATURES CAPTIONS VOCAB [--captions 6400] [--only gru ...]

FEATURES / CAPTIONS / VOCAB: a Flickr8k run's data/features.h5, data/captions.h5 and
data/vocab.json. Each variant runs in its own process (so its peak RSS is its own), builds the
decoder with the settings of benchmarks/flickr8k.sh (dropout 0.5, batch 128, Adam 1e-3) and
trains one epoch of ``captioning.train.fit`` on the first ``--captions`` training captions
(features streamed from the file, as the train stage does; val: 640 captions). Prints the epoch's
seconds, captions/s, the implied seconds for a whole Flickr8k epoch (30,000 captions) and the
peak RSS. Run it with nothing else on the machine.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import click

RECIPE = {"embed_dim": 256, "units": 512, "attention_units": 256, "dropout": 0.5, "batch_size": 128,
          "learning_rate": 0.001, "lr_decay": 1.0, "attention_reg": 0.01, "epochs": 1, "patience": 1}  # fmt: skip
VARIANTS = {  # name -> train settings over RECIPE, as benchmarks/flickr8k.sh's variants
    "gru": {"decoder": "gru", "attention": True},
    "lstm": {"decoder": "lstm", "attention": True},
    "updown": {"decoder": "updown", "attention": True},
    "transformer": {"decoder": "transformer", "units": 1024, "num_layers": 2, "num_heads": 4, "attention_reg": 0.0},
}
FULL_EPOCH = 30_000  # Flickr8k training captions (6,000 images x 5)


@click.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.argument("vocab", type=click.Path(exists=True, dir_okay=False))
@click.option("--captions", "n_captions", default=6400, show_default=True, help="Training captions timed.")
@click.option("--only", multiple=True, type=click.Choice(list(VARIANTS)), help="Variants to time (default: all).")
@click.option("--one", type=click.Choice(list(VARIANTS)), hidden=True, help="Time this variant in this process.")
def main(features, captions, vocab, n_captions, only, one):
    if one:
        print(json.dumps(time_variant(one, features, captions, vocab, n_captions)))
        return
    print(
        f"| decoder | parameters | epoch of {n_captions} captions (s) | captions/s | Flickr8k epoch (s, implied)"
        " | peak RSS (GB) |"
    )
    print("|---|---|---|---|---|---|")
    for name in only or VARIANTS:
        cmd = [sys.executable, "-m", "benchmarks.decoder_speed", features, captions, vocab, "--one", name,
               "--captions", str(n_captions)]  # fmt: skip
        out = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        print(
            f"| {name} | {out['params']:,} | {out['epoch_s']:.1f} | {out['captions_per_s']:.0f}"
            f" | {FULL_EPOCH / out['captions_per_s']:.0f} | {out['peak_rss_gb']:.2f} |"
        )


def time_variant(name, features, captions, vocab_file, n_captions):
    import dataclasses
    import tempfile

    from captioning.caption_set import caption_set
    from captioning.cli import seed_everything
    from captioning.config import load_section
    from captioning.decoders import build_decoder
    from captioning.feature_store import FeatureStore
    from captioning.files import read_json
    from captioning.train import TrainSettings, fit
    from captioning.vocab import Vocabulary

    seed_everything(0)
    root = Path(__file__).resolve().parents[1]
    settings = load_section(root / "params.yaml", "train", TrainSettings, **{**RECIPE, **VARIANTS[name]})
    store, vocab = FeatureStore(features), Vocabulary.from_json(read_json(vocab_file))
    train, val = caption_set(store, captions, "train"), caption_set(store, captions, "val")
    train = dataclasses.replace(train, tokens=train.tokens[:n_captions], image_rows=train.image_rows[:n_captions])
    val = dataclasses.replace(val, tokens=val.tokens[:640], image_rows=val.image_rows[:640])
    model = build_decoder(
        settings.decoder, vocab_size=len(vocab), feature_dim=store.feature_dim, num_locations=store.num_locations,
        **settings.decoder_settings(),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        state = fit(model, train, val, settings, 0, Path(tmp) / "ckpt", progress=False, log=lambda m: None)
    seconds = state["history"][0]["seconds"]
    return {
        "params": model.count_params(),
        "epoch_s": seconds,
        "captions_per_s": len(train.tokens) / seconds,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


if __name__ == "__main__":
    main()
