"""Stage: train the GRU caption decoder on cached features (see ``main``)."""

import click
import numpy as np

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.io import atomic_path, read_json, write_json


@config.dataclasses.dataclass
class Params:
    attention: bool = config.field(True, doc="soft attention over the feature map; false = image as initial state")
    blind: bool = config.field(False, doc="zero the image features (the no-image baseline)")
    embed_dim: int = config.field(256, lo=1)
    units: int = config.field(512, lo=1)
    attention_units: int = config.field(256, lo=1)
    dropout: float = config.field(0.3, lo=0.0, hi=0.95)
    attention_reg: float = config.field(0.01, lo=0.0, doc="doubly stochastic attention weight")
    batch_size: int = config.field(64, lo=1)
    learning_rate: float = config.field(1e-3, lo=1e-7, hi=1.0)
    lr_decay: float = config.field(1.0, lo=0.01, hi=1.0, doc="learning rate multiplier per epoch")
    epochs: int = config.field(10, lo=1)
    patience: int = config.field(3, lo=1)
    clip_norm: float = config.field(5.0, lo=0.0)


def load_split(store, captions_h5, split):
    """Features and captions of one split as a CaptionSet."""
    from captioning.train import CaptionSet
    from captioning.vocab import load_encoded

    images, tokens = load_encoded(captions_h5, split)
    keys = sorted(set(images))
    # Captions whose image was skipped by the features stage are dropped.
    have = [k for k in keys if k in store.index]
    row = {k: i for i, k in enumerate(have)}
    keep = np.array([im in row for im in images], dtype=bool)
    return CaptionSet(
        store.load(have),
        tokens[keep].astype(np.int32),
        np.array([row[im] for im in images if im in row], dtype=np.int64),
    )


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="HDF5 features (features stage).")
@click.option("--vocab", "vocab_file", required=True, type=click.Path(dir_okay=False), help="Vocabulary JSON.")
@click.option("--captions", required=True, type=click.Path(dir_okay=False), help="Encoded captions HDF5.")
@click.option("--model", "model_out", required=True, type=click.Path(dir_okay=False), help="Model to write (.keras).")
@click.option(
    "--config", "config_out", required=True, type=click.Path(dir_okay=False), help="Model config JSON to write."
)
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False), help="Resumable checkpoint folder.")
@click.option("--live-dir", required=True, type=click.Path(file_okay=False), help="dvclive folder (metrics, plots).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@user_errors
def main(params_file, features, vocab_file, captions, model_out, config_out, checkpoint, live_dir, progress):
    """Train the GRU decoder (soft attention optional) on cached CNN features.

    Masked cross-entropy plus the doubly stochastic attention term, early stopping on val
    loss, best weights kept. Checkpoints every epoch to CHECKPOINT and resumes from it after
    an interruption. Curves go to LIVE_DIR through dvclive; the model is saved in Keras format
    with its config (model settings, encoder settings) in CONFIG.
    """
    p = config.load_params(params_file, {"train": Params})["train"]
    seed = config.load_seed(params_file)
    seed_everything(seed)
    from dvclive import Live

    from captioning.encoder import FeatureStore
    from captioning.model import Captioner
    from captioning.train import LOGGED, FitSettings, best_epoch_metrics, fit
    from captioning.vocab import Vocabulary

    store = FeatureStore(features)
    voc = Vocabulary.from_json(read_json(vocab_file))
    train_set, val_set = load_split(store, captions, "train"), load_split(store, captions, "val")
    model = Captioner(
        vocab_size=len(voc),
        feature_dim=store.feature_dim,
        num_locations=store.num_locations,
        embed_dim=p.embed_dim,
        units=p.units,
        attention=p.attention,
        attention_units=p.attention_units,
        dropout=p.dropout,
        blind=p.blind,
    )
    settings = FitSettings(
        batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        lr_decay=p.lr_decay,
        epochs=p.epochs,
        patience=p.patience,
        attention_reg=p.attention_reg if p.attention else 0.0,
        clip_norm=p.clip_norm,
        seed=seed,
    )
    with Live(live_dir, dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def on_epoch(epoch, m):
            for k in LOGGED:
                live.log_metric(k, m[k])
            live.next_step()

        state = fit(
            model, train_set, val_set, settings, checkpoint, on_epoch=on_epoch, progress=progress, log=click.echo
        )
        # metrics.json (what `dvc metrics show` prints) describes the saved model: the best
        # epoch, logged at dvclive step best_epoch - 1; the curves keep every epoch.
        live.summary = {**best_epoch_metrics(state), "step": state["best_epoch"] - 1}
    with atomic_path(model_out, suffix=".keras") as tmp:
        model.save(tmp)
    write_json(
        config_out,
        {
            "model": model.settings(),
            "encoder": store.spec.attrs(),
            "feature_dtype": str(store.attrs.get("dtype", "float32")),
            "vocab_size": len(voc),
            "best_epoch": state["best_epoch"],
            "best_val_loss": round(state["best_val_loss"], 6),
        },
    )
    secs = sum(m["seconds"] for m in state["history"])
    click.echo(
        f"train: {state['epoch']} epochs ({secs:.0f}s), best val_loss {state['best_val_loss']:.4f}"
        f" at epoch {state['best_epoch']}, {model.count_params()} params -> {model_out}"
    )


if __name__ == "__main__":
    main()
