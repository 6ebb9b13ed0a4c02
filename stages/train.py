"""Stage: train a caption decoder on cached features (see ``main``)."""

import click

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.files import atomic_path, read_json


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
    from captioning.train import TrainSettings

    params = config.load_params(params_file, {"train": TrainSettings})
    p, seed = params["train"], params["seed"]
    seed_everything(seed)
    from captioning.distribute import is_chief, make_strategy, worker_name

    strategy = make_strategy(p.strategy)  # before any other TF op (multi_worker needs that)
    from dvclive import Live

    from captioning.feature_store import FeatureStore
    from captioning.model_folder import save_model
    from captioning.train import LOGGED, best_epoch_metrics, train_decoder
    from captioning.vocab import Vocabulary

    store = FeatureStore(features)
    voc = Vocabulary.from_json(read_json(vocab_file))
    run = dict(progress=progress, log=click.echo, strategy=strategy)
    if not is_chief(strategy):  # a helper worker: the chief writes the checkpoint and every output
        _, state = train_decoder(store, voc, captions, p, seed, checkpoint, **run)
        click.echo(f"train ({worker_name(strategy)}): {state['epoch']} epochs; the chief writes {model_dir}")
        return
    with Live(live_dir, dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def on_epoch(epoch, m):
            for k in LOGGED:
                live.log_metric(k, m[k])
            live.next_step()

        model, state = train_decoder(store, voc, captions, p, seed, checkpoint, on_epoch=on_epoch, **run)
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
