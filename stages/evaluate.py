"""Stage: caption a split by beam search and score it with the COCO metrics (see ``main``)."""

import click

from captioning import config
from captioning.cli import seed_everything, user_errors
from captioning.errors import CaptioningError
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
    from captioning.decode import Decoding, caption_features, steered

    DECODING = {f.name for f in config.dataclasses.fields(Decoding)}
    DEFAULTS = {f.name: f.default for f in config.dataclasses.fields(Decoding)}
    from captioning.ensemble import load_models
    from captioning.feature_store import FeatureStore
    from captioning.metrics import among_n, coco_scores, diversity, word_accuracy
    from captioning.vocab import make_tokenizer

    store = FeatureStore(features)
    in_split = [r for r in read_json(dataset)["images"] if r["split"] == p.split]
    records = [r for r in in_split if r["image"] in store.index]
    if not records:
        raise CaptioningError(f"{dataset}: no images with features in the '{p.split}' split")
    model = load_models(model_dirs)
    model.decoder.check_max_length(p.max_length, "evaluate.max_length")
    keys = [r["image"] for r in records]
    rows = store.rows(keys)  # read from disk a batch at a time
    decoding = Decoding(
        **{f: getattr(p, f) for f in DECODING if f in Params.__dataclass_fields__}, seed=seed
    )  # CaptioningError names a bad combination
    several = None  # every image's captions (best first; sampled: in draw order) when there are several
    if decoding.steered:  # n-best, diverse or sampled: the host-driven search of captioning/steer.py
        found = [h for i in range(0, len(keys), p.batch_size) for h in
                 steered(model.decoder, model.vocab, rows[i : i + p.batch_size], decoding)]  # fmt: skip
        several = [[model.vocab.decode(t) for t, _, _ in hyps] for hyps in found]
        hyps, log_probs = [c[0] for c in several], [hyps[0][2] for hyps in found]
    else:
        hyps, log_probs = caption_features(
            model.decoder, model.vocab, rows, p.beam_size, p.max_length, p.length_penalty, p.batch_size, progress
        )
    refs = {r["image"]: r["captions"] for r in records}
    by_key = dict(zip(keys, hyps))
    scores, per_image = coco_scores(refs, by_key, log=click.echo, per_image=True)
    scores["mean_log_prob"] = round(sum(log_probs) / len(log_probs), 6)
    tokenize = make_tokenizer()
    train = {
        " ".join(tokenize(c)) for r in read_json(dataset)["images"] if r["split"] == "train" for c in r["captions"]
    }
    tokenized = {k: [" ".join(tokenize(c)) for c in v] for k, v in refs.items()}
    scores.update(diversity(hyps, train, tokenized))
    pairs = [(i, tokenize(c)) for i, k in enumerate(keys) for c in refs[k]]
    scores["word_accuracy"] = word_accuracy(model.decoder, model.vocab, rows, pairs, p.max_length)
    if several and min(map(len, several)) > 1:
        scores.update(among_n(refs, dict(zip(keys, several))))
    if all("truth" in r for r in records):  # the generated data knows what each image shows
        from captioning.shapes import scene_accuracy

        scores.update(scene_accuracy(by_key, {r["image"]: r["truth"] for r in records}))
    scores.update(
        images=len(keys),
        images_without_features=len(in_split) - len(records),
        split=p.split,
        beam_size=p.beam_size,
        max_length=p.max_length,
        length_penalty=p.length_penalty,
        **({"ensemble": len(model_dirs)} if len(model_dirs) > 1 else {}),
        **{f: getattr(p, f) for f in ("n_best", "groups", "diversity", "sample") if getattr(p, f) != DEFAULTS[f]},
    )
    write_json(metrics_out, scores)
    write_json(
        predictions,
        [
            {"image": k, "caption": by_key[k], "log_prob": round(lp, 6), **per_image[k], "references": refs[k]}
            | ({"captions": several[i]} if several else {})
            for i, (k, lp) in enumerate(zip(keys, log_probs))
        ],
    )
    shown = ", ".join(f"{k} {v:.3f}" for k, v in scores.items() if isinstance(v, float) and k != "length_penalty")
    missing = f" ({scores['images_without_features']} without features)" if scores["images_without_features"] else ""
    click.echo(f"evaluate: {len(keys)} {p.split} images{missing}, beam {p.beam_size}: {shown} -> {metrics_out}")


if __name__ == "__main__":
    main()
