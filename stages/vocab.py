"""Stage: build the vocabulary and encode the captions (see ``main``)."""

import click

from captioning import config, vocab
from captioning.cli import user_errors
from captioning.files import read_json, write_json


@config.dataclasses.dataclass
class Params:
    min_count: int = config.field(lo=1)  # keep words seen at least this often in train captions
    max_length: int = config.field(lo=1, hi=200)  # words kept per caption


@click.command()
@click.option("--params", "params_file", default="params.yaml", show_default=True, type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, type=click.Path(dir_okay=False), help="Normalised dataset JSON (prepare).")
@click.option("--vocab", "vocab_out", required=True, type=click.Path(dir_okay=False), help="Vocabulary JSON to write.")
@click.option("--captions", required=True, type=click.Path(dir_okay=False), help="Encoded captions HDF5 to write.")
@user_errors
def main(params_file, dataset, vocab_out, captions):
    """Tokenise captions (lower-case, nltk Treebank, offline), build the vocabulary from the
    train split and encode every split's captions as <start> w1 .. wn <end> id rows."""
    p = config.load_params(params_file, {"vocab": Params})["vocab"]
    records = read_json(dataset)["images"]
    tokenize = vocab.make_tokenizer()
    per_split = {}
    for r in records:
        for c in r["captions"]:
            imgs, toks = per_split.setdefault(r["split"], ([], []))
            imgs.append(r["image"])
            toks.append(tokenize(c))
    voc = vocab.Vocabulary.build(per_split.get("train", ([], []))[1], min_count=p.min_count)
    encoded = {s: (imgs, vocab.encode_captions(voc, toks, p.max_length)) for s, (imgs, toks) in per_split.items()}
    write_json(vocab_out, voc.to_json())
    vocab.save_encoded(captions, encoded)
    n_train = len(per_split.get("train", ([], []))[1])
    unk = sum(int((t == voc.unk_id).sum()) for _, t in encoded.values())
    click.echo(
        f"vocab: {len(voc)} words (min_count {p.min_count}) from {n_train} train captions,"
        f" {sum(len(i) for i, _ in encoded.values())} captions encoded, {unk} <unk> tokens -> {vocab_out}"
    )


if __name__ == "__main__":
    main()
