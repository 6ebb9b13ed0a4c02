"""Stage: optional self-critical fine-tuning for CIDEr-D (see ``main``)."""

import shutil

import click

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.files import atomic_path, write_json


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--model", "model_dir", required=True, type=click.Path(file_okay=False), help="Cross-entropy model.")
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="HDF5 features.")
@click.option("--captions", required=True, type=click.Path(dir_okay=False), help="Encoded captions HDF5.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--checkpoint", required=True, type=click.Path(file_okay=False), help="Resumable checkpoint folder.")
@click.option("--live-dir", required=True, type=click.Path(file_okay=False), help="dvclive folder (metrics, curves).")
@click.option("--progress/--no-progress", default=True, help="Show progress bars.")
@user_errors
def main(params_file, model_dir, features, captions, out, checkpoint, live_dir, progress):
    """Fine-tune the trained decoder for CIDEr-D with self-critical sequence training.

    Off by default (finetune.enabled): then MODEL is copied to OUT unchanged, so the stages
    after it always read OUT. On: samples finetune.samples captions per image, rewards each
    with CIDEr-D against the image's references (document frequencies from the training
    references; plus finetune.bleu_weight times its sentence BLEU-4), subtracts the baseline and
    follows the policy gradient; early stopping on the val split's greedy CIDEr-D; atomic
    per-epoch checkpoints in CHECKPOINT, exact resume.
    """
    from captioning.scst import FinetuneSettings

    params = config.load_params(params_file, {"finetune": FinetuneSettings})
    p, seed = params["finetune"], params["seed"]
    from pathlib import Path

    if not p.enabled:
        with atomic_path(out) as tmp:
            shutil.copytree(model_dir, tmp)
        write_json(Path(live_dir) / "metrics.json", {"enabled": False})
        write_json(Path(checkpoint) / "state.json", {"enabled": False, "complete": True})  # a declared output
        click.echo(f"finetune: off (finetune.enabled: false), {model_dir} -> {out} unchanged")
        return
    seed_everything(seed)
    from dvclive import Live

    from captioning.feature_store import FeatureStore
    from captioning.model_folder import load_model, save_model
    from captioning.scst import fine_tune_model

    model = load_model(model_dir)
    model.decoder.check_max_length(p.max_length, "finetune.max_length")
    with Live(live_dir, dvcyaml=None, save_dvc_exp=False, report=None) as live:

        def on_epoch(epoch, m):
            for k in ("val_cider", "train_reward", "sample_words"):
                live.log_metric(k, m[k])
            live.next_step()

        state = fine_tune_model(
            model, FeatureStore(features), captions, p, seed, checkpoint, on_epoch, progress=progress, log=click.echo
        )
        best = state["history"][state["best_epoch"] - 1] if state["best_epoch"] else {}
        live.summary = {
            "enabled": True,
            "start_val_cider": round(state["start_val_cider"], 6),
            "best_val_cider": round(state["best_val_cider"], 6),
            "best_epoch": state["best_epoch"],
            "epochs_run": state["epoch"],
            **{k: best[k] for k in ("train_reward", "sample_words") if k in best},
            "step": max(state["best_epoch"] - 1, 0),
        }
    with atomic_path(out) as tmp:
        save_model(
            tmp,
            model.decoder,
            model.config["decoder"],
            model.vocab,
            {
                **{k: v for k, v in model.config.items() if k not in ("decoder", "model")},
                "scst": {"best_epoch": state["best_epoch"], "best_val_cider": round(state["best_val_cider"], 6)},
            },
        )
    secs = sum(m["seconds"] for m in state["history"])
    click.echo(
        f"finetune: {state['epoch']} SCST epochs ({secs:.0f}s), val CIDEr-D {state['start_val_cider']:.4f}"
        f" -> {state['best_val_cider']:.4f} (epoch {state['best_epoch']}) -> {out}"
    )


if __name__ == "__main__":
    main()
