"""Stage: caption a split by beam search and score it with the COCO metrics (see ``main``)."""

import click

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.files import read_json, write_json


@config.dataclasses.dataclass
class Params:
    split: str = config.field(choices=("train", "val", "test"))
    beam_size: int = config.field(lo=1, hi=50)  # 1 with length_penalty 0 = greedy
    max_length: int = config.field(lo=1, hi=200)  # words per generated caption
    length_penalty: float = config.field(lo=0.0, hi=5.0)  # score / length**alpha
    n_best: int = config.field(lo=1, hi=50)  # captions kept per image (<= beam_size): oracle CIDEr, mBLEU-4
    groups: int = config.field(lo=1, hi=50)  # diverse beam search: groups of beam_size beams, one caption each
    diversity: float = config.field(lo=0.0, hi=100.0)  # diverse beam search: Hamming penalty
    block_trigrams: bool = config.field()  # never repeat a trigram within a caption
    sample: int = config.field(lo=0, hi=100)  # >0: draw this many captions per image instead of searching
    temperature: float = config.field(lo=0.01, hi=100.0)  # sampling
    top_k: int = config.field(lo=0)  # sampling: the k likeliest tokens only (0: all)
    top_p: float = config.field(lo=0.01, hi=1.0)  # sampling: nucleus
    batch_size: int = config.field(lo=1)


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option(
    "--model",
    "model_dirs",
    required=True,
    multiple=True,
    type=click.Path(file_okay=False),
    help="Trained model folder; given several times, the models decode as one ensemble.",
)
@click.option("--features", required=True, type=click.Path(dir_okay=False), help="HDF5 features.")
@click.option("--dataset", required=True, type=click.Path(dir_okay=False), help="Normalised dataset JSON (references).")
@click.option("--metrics", "metrics_out", required=True, type=click.Path(dir_okay=False), help="Metrics JSON to write.")
@click.option("--predictions", required=True, type=click.Path(dir_okay=False), help="Predictions JSON to write.")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar.")
@user_errors
def main(params_file, model_dirs, features, dataset, metrics_out, predictions, progress):
    """Caption one split with batched beam search and score it with pycocoevalcap.

    BLEU-1..4, METEOR, ROUGE-L, CIDEr (and SPICE when Stanford CoreNLP 3.6.0 is installed;
    see README), the mean log-probability of the chosen captions, and, when the dataset's
    records carry scene ground truth (the generated data), object and layout accuracy. Beside
    them: the vocabulary the captions use, distinct-1/2, the share not found verbatim among the
    training captions, mean lengths, and the decoder's teacher-forced next-word accuracy on the
    split's references. Steered (evaluate.n_best > 1, evaluate.groups > 1 for diverse beam search,
    evaluate.sample > 0 for sampling): every image's captions are kept in the predictions, the
    first is scored, and oracle CIDEr (the best of each image's) and mBLEU-4 among them are added.
    Split images the features stage skipped are counted, not captioned. Several --model folders
    (one vocabulary, one encoder) decode as an ensemble: the mean of their word probabilities.
    """
    params = config.load_params(params_file, {"evaluate": Params})
    p, seed = params["evaluate"], params["seed"]
    seed_everything(seed)
    from captioning.decode import Decoding
    from captioning.ensemble import load_models
    from captioning.evaluation import evaluate_split
    from captioning.feature_store import FeatureStore

    fields = {f.name: f.default for f in config.dataclasses.fields(Decoding)}
    store = FeatureStore(features)
    model = load_models(model_dirs)
    model.decoder.check_max_length(p.max_length, "evaluate.max_length")
    # CaptioningError names a bad combination of settings
    settings = {f: getattr(p, f) for f in fields if f in Params.__dataclass_fields__}
    decoding = Decoding(**settings, seed=seed)
    scores, preds = evaluate_split(
        model, store, read_json(dataset)["images"], p.split, decoding, p.batch_size, progress, click.echo, dataset
    )
    # the search's size always, and every other decoding setting off its default, go into the metrics,
    # so two runs' figures say how their decoding differed
    always = {"beam_size": p.beam_size, "max_length": p.max_length, "length_penalty": p.length_penalty}
    scores.update(
        always,
        **({"ensemble": len(model_dirs)} if len(model_dirs) > 1 else {}),
        **{f: v for f, v in settings.items() if f not in always and v != fields[f]},
    )
    write_json(metrics_out, scores)
    write_json(predictions, preds)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float) and k != "length_penalty")
    missing = f" ({scores['images_without_features']} without features)" if scores["images_without_features"] else ""
    click.echo(f"evaluate: {len(preds)} {p.split} images{missing}, beam {p.beam_size}: {shown} -> {metrics_out}")


if __name__ == "__main__":
    main()
