"""Stage: train a caption decoder on cached features (see ``main``)."""

import click
import numpy as np

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.errors import CaptioningError
from captioning.files import atomic_path, read_json


@config.dataclasses.dataclass
class Params:
    decoder: str = config.field()  # a captioning.decoders.DECODERS entry
    attention: bool = config.field()  # soft attention over the feature map; false = image as initial state
    blind: bool = config.field()  # zero the image features (the no-image baseline)
    embed_dim: int = config.field(lo=1)
    units: int = config.field(lo=1)
    attention_units: int = config.field(lo=1)
    num_layers: int = config.field(lo=1, hi=24)
    num_heads: int = config.field(lo=1, hi=64)
    dropout: float = config.field(lo=0.0, hi=0.95)
    attention_reg: float = config.field(lo=0.0)  # weight of the decoder's own term (the attention prior)
    label_smoothing: float = config.field(lo=0.0, hi=0.5)  # training targets (1 - eps) one-hot + eps / V
    batch_size: int = config.field(lo=1)
    learning_rate: float = config.field(lo=1e-7, hi=1.0)
    lr_decay: float = config.field(lo=0.01, hi=1.0)  # learning rate multiplier per epoch
    epochs: int = config.field(lo=1)
    patience: int = config.field(lo=1)
    clip_norm: float = config.field(lo=0.0)
    bucket: int = config.field(lo=0)  # batches per length-sorted pool (0: plain shuffle); less padding
    read_block: int = config.field(lo=1)  # images per shuffled block of feature rows (1: full shuffle)
    strategy: str = config.field(choices=("auto", "default", "mirrored", "multi_worker"))  # captioning.distribute
    jit: bool = config.field()  # XLA-compile the training step (one compile per batch shape)
    precision: str = config.field(choices=("float32", "mixed_bfloat16"))  # captioning.decoders.PRECISIONS

    def validate(self, section):
        from captioning.decoders import DECODERS

        if self.decoder not in DECODERS:
            raise CaptioningError(f"{section}.decoder: must be one of {', '.join(DECODERS)}; got {self.decoder!r}")
        cls = DECODERS[self.decoder]
        optional = "attention" in cls.SETTINGS  # else the decoder reads the image only through attention
        if not optional and not self.attention:
            raise CaptioningError(
                f"{section}.attention: the {self.decoder} decoder reads the image only through attention; set it true"
            )
        if self.attention_reg > 0 and not (cls.ATTENTION_PRIOR and self.attention):
            raise CaptioningError(
                f"{section}.attention_reg: {self.attention_reg}, but the {self.decoder} decoder"
                f"{' without attention' if optional else ''} has no attention prior to weigh (set it to 0)"
            )


def load_split(store, captions_h5, split, vocab=None):
    """Features (read from disk a batch at a time) and captions of one split as a CaptionSet;
    with ``vocab`` (training), the images' mirror images too where the features file has them."""
    from captioning.feature_store import FLIP_SUFFIX
    from captioning.train import CaptionSet
    from captioning.vocab import load_encoded

    images, tokens = load_encoded(captions_h5, split)
    keys = sorted(set(images))
    # Captions whose image was skipped by the features stage are dropped.
    have = [k for k in keys if k in store.index]
    row = {k: i for i, k in enumerate(have)}
    keep = np.array([im in row for im in images], dtype=bool)
    image_rows = np.array([row[im] for im in images if im in row], dtype=np.int64)
    tokens = tokens[keep].astype(np.int32)
    if vocab is None or not have or not store.mirrored(have):
        return CaptionSet(store.rows(have), tokens, image_rows)
    words = np.arange(len(vocab))
    left, right = (vocab.index.get(w) for w in ("left", "right"))
    if left is not None and right is not None:  # "the dog on the left" is on the right in the mirror
        words[[left, right]] = right, left
    rows = store.rows(have + [k + FLIP_SUFFIX for k in have])
    return CaptionSet(rows, tokens, image_rows, mirror_rows=image_rows + len(have), mirror_words=words)


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="HDF5 features (features stage).")
@click.option("--vocab", "vocab_file", required=True, type=click.Path(dir_okay=False), help="Vocabulary JSON.")
@click.option("--captions", required=True, type=click.Path(dir_okay=False), help="Encoded captions HDF5.")
@click.option(
    "--model-dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Model folder to write (weights, config, vocab).",
)
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False), help="Resumable checkpoint folder.")
@click.option("--live-dir", required=True, type=click.Path(file_okay=False), help="dvclive folder (metrics, plots).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@user_errors
def main(params_file, features, vocab_file, captions, model_dir, checkpoint, live_dir, progress):
    """Train a caption decoder (train.decoder: gru, lstm, transformer or updown) on cached CNN features.

    Masked cross-entropy plus the decoder's own term (the doubly stochastic attention prior
    for the recurrent decoders with attention), early stopping on val loss, best weights kept.
    Checkpoints every epoch to CHECKPOINT and resumes from it after an interruption. Curves go
    to LIVE_DIR through dvclive. MODEL_DIR gets the decoder, its config (decoder and encoder
    settings) and its vocabulary: everything needed to caption with it.

    train.strategy spreads each batch over several GPUs (mirrored) or machines (multi_worker,
    set up by TF_CONFIG): every worker runs this same command, and only the chief writes the
    checkpoint and the outputs; CHECKPOINT must be a folder every worker sees.
    """
    params = config.load_params(params_file, {"train": Params})
    p, seed = params["train"], params["seed"]
    seed_everything(seed)
    from captioning.distribute import is_chief, make_strategy, worker_name

    strategy = make_strategy(p.strategy)  # before any other TF op (multi_worker needs that)
    from dvclive import Live

    from captioning.decoders import DECODERS, build_decoder
    from captioning.feature_store import FeatureStore
    from captioning.model_folder import save_model
    from captioning.train import LOGGED, FitSettings, best_epoch_metrics, fit
    from captioning.vocab import Vocabulary

    store = FeatureStore(features)
    voc = Vocabulary.from_json(read_json(vocab_file))
    train_set, val_set = load_split(store, captions, "train", voc), load_split(store, captions, "val")
    model = build_decoder(
        p.decoder,
        vocab_size=len(voc),
        feature_dim=store.feature_dim,
        num_locations=store.num_locations,
        blind=p.blind,
        precision=p.precision,
        **{k: getattr(p, k) for k in DECODERS[p.decoder].SETTINGS},
    )
    model.check_max_length(train_set.tokens.shape[1] - 2, f"{captions} (vocab.max_length)")
    settings = FitSettings(
        batch_size=p.batch_size,
        learning_rate=p.learning_rate,
        lr_decay=p.lr_decay,
        epochs=p.epochs,
        patience=p.patience,
        attention_reg=p.attention_reg,
        label_smoothing=p.label_smoothing,
        clip_norm=p.clip_norm,
        seed=seed,
        bucket=p.bucket,
        read_block=p.read_block,
        jit=p.jit,
    )
    if not is_chief(strategy):  # a helper worker: the chief writes the checkpoint and every output
        state = fit(
            model, train_set, val_set, settings, checkpoint, progress=progress, log=click.echo, strategy=strategy
        )
        click.echo(f"train ({worker_name(strategy)}): {state['epoch']} epochs; the chief writes {model_dir}")
        return
    with Live(live_dir, dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def on_epoch(epoch, m):
            for k in LOGGED:
                live.log_metric(k, m[k])
            live.next_step()

        state = fit(
            model,
            train_set,
            val_set,
            settings,
            checkpoint,
            on_epoch=on_epoch,
            progress=progress,
            log=click.echo,
            strategy=strategy,
        )
        # metrics.json (what `dvc metrics show` prints) describes the saved model: the best
        # epoch, logged at dvclive step best_epoch - 1; the curves keep every epoch.
        live.summary = {**best_epoch_metrics(state), "step": state["best_epoch"] - 1}
    with atomic_path(model_dir) as tmp:
        save_model(
            tmp,
            model,
            p.decoder,
            voc,
            {
                "encoder": store.spec.attrs(),
                "feature_dtype": str(store.attrs.get("dtype", "float32")),
                "best_epoch": state["best_epoch"],
                "best_val_loss": round(state["best_val_loss"], 6),
            },
        )
    secs = sum(m["seconds"] for m in state["history"])
    click.echo(
        f"train: {p.decoder}, {state['epoch']} epochs ({secs:.0f}s), best val_loss {state['best_val_loss']:.4f}"
        f" at epoch {state['best_epoch']}, {model.count_params()} params, {strategy.num_replicas_in_sync} replica(s)"
        f" -> {model_dir}"
    )


if __name__ == "__main__":
    main()
