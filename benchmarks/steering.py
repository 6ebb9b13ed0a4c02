"""Steered decoding on a real split: quality, diversity and speed of each mode, side by side.

    python -m benchmarks.steering MODEL_DIR FEATURES DATASET [--split val] [--images 1000]

Modes (each over the same images): beam 5 (the compiled search); its 5 best (n-best 5); diverse
beam search (5 groups of 1 beam, Hamming penalty 0.5); sampling (5 captions, temperature 1,
top-p 0.9); constrained beam 5 that must name a word taken from the image's references. For each:
BLEU-4 and CIDEr of the first caption, oracle CIDEr (best of the image's 5), distinct-2, mBLEU-4
among an image's captions, % of first captions not found verbatim among the training captions,
the vocabulary the first captions use, and captions/s (first captions, decoding only).

The constraint rule: the most frequent word of the image's references (tokenised as the
vocabulary is) that is in the model's vocabulary, has 3 letters or more, is not a stop word
(STOP below) and does not end in "ing"; ties go to the word that appears first. No POS tagger is
used (nltk's needs data that is not installed offline), so "noun" is approximated by that rule.
"""

from __future__ import annotations

import collections
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402

STOP = {
    "a",
    "an",
    "the",
    "and",
    "or",
    "of",
    "in",
    "on",
    "at",
    "to",
    "for",
    "from",
    "with",
    "without",
    "by",
    "into",
    "onto",
    "over",
    "under",
    "near",
    "through",
    "while",
    "as",
    "its",
    "it",
    "his",
    "her",
    "their",
    "there",
    "this",
    "that",
    "these",
    "those",
    "is",
    "are",
    "was",
    "were",
    "be",
    "being",
    "has",
    "have",
    "some",
    "other",
    "another",
    "one",
    "two",
    "three",
    "four",
    "five",
    "several",
    "many",
    "each",
    "who",
    "which",
    "what",
    "where",
    "front",
    "back",
    "top",
    "side",
    "next",
    "around",
    "along",
    "behind",
    "above",
    "across",
    "very",
    "small",
    "large",
    "big",
    "little",
    "young",
    "old",
}


def constraint_word(refs, vocab, tokenize):
    words = [w for r in refs for w in tokenize(r)]
    counts = collections.Counter(w for w in words if w in vocab.index and len(w) >= 3 and w not in STOP)
    counts = {w: c for w, c in counts.items() if not w.endswith("ing")}
    if not counts:
        return None
    top = max(counts.values())
    return next(w for w in words if counts.get(w) == top)


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default="val", show_default=True)
@click.option("--images", "n_images", default=1000, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
def main(model_dir, features, dataset, split, n_images, batch_size):
    from captioning.decode import Decoding, graph_search, steered
    from captioning.feature_store import FeatureStore
    from captioning.files import read_json
    from captioning.metrics import among_n, coco_scores, diversity
    from captioning.model_folder import load_model
    from captioning.vocab import make_tokenizer

    model = load_model(model_dir)
    vocab, decoder = model.vocab, model.decoder
    store = FeatureStore(features)
    records = read_json(dataset)["images"]
    chosen = [r for r in records if r["split"] == split and r["image"] in store.index][:n_images]
    keys = [r["image"] for r in chosen]
    refs = {r["image"]: r["captions"] for r in chosen}
    feats = store.load(keys)
    tokenize = make_tokenizer()
    train = {" ".join(tokenize(c)) for r in records if r["split"] == "train" for c in r["captions"]}
    words = {k: constraint_word(refs[k], vocab, tokenize) for k in keys}

    def run_batches(fn):
        out = []
        t0 = time.perf_counter()
        for i in range(0, len(keys), batch_size):
            out += fn(i, feats[i : i + batch_size])
        return out, time.perf_counter() - t0

    beam5 = graph_search(decoder, vocab, 5, 20)
    beam5(feats[:batch_size])  # compile the batch shapes before timing
    modes = {
        "beam 5": lambda i, f: [[(s, n, r)] for s, n, r in zip(*beam5(f))],
        "n-best 5 (beam 5)": lambda i, f: steered(decoder, vocab, f, Decoding(5, 20, n_best=5)),
        "diverse (5 groups, lambda 0.5)":
            lambda i, f: steered(decoder, vocab, f, Decoding(1, 20, groups=5, diversity=0.5)),
        "sampling (5, T 1, top-p 0.9)": lambda i, f: steered(decoder, vocab, f, Decoding(sample=5, top_p=0.9, seed=0)),
    }  # fmt: skip
    print(f"{model_dir}: {len(keys)} {split} images")
    print("| mode | BLEU-4 | CIDEr | oracle CIDEr | distinct-2 | mBLEU-4 | novel | vocabulary | captions/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    firsts = {}
    for name, fn in modes.items():
        found, seconds = run_batches(fn)
        caps = {k: [vocab.decode(t) for t, _, _ in hyps] for k, hyps in zip(keys, found)}
        first = {k: c[0] for k, c in caps.items()}
        firsts[name] = first
        coco = coco_scores(refs, first, use_spice=False, log=lambda *_: None)
        div = diversity(list(first.values()), train)
        many = among_n(refs, caps) if min(map(len, caps.values())) > 1 else {"oracle_CIDEr": coco["CIDEr"]}
        bigrams = diversity([c for cs in caps.values() for c in cs])["distinct_2"]
        print(f"| {name} | {coco['BLEU-4']:.3f} | {coco['CIDEr']:.3f} | {many['oracle_CIDEr']:.3f} | {bigrams:.3f} | "
              f"{many.get('mBLEU_4', float('nan')):.3f} | {100 * div['novel']:.1f}% | {div['vocab_used']} | "
              f"{len(keys) / seconds:.1f} |")  # fmt: skip

    with_word = [k for k in keys if words[k]]
    found, seconds = run_batches(
        lambda i, f: [
            h
            for j, k in enumerate(keys[i : i + batch_size])
            for h in steered(decoder, vocab, f[j : j + 1], Decoding(5, 20, include=(words[k],)))
        ]  # fmt: skip
    )
    constrained = {k: vocab.decode(h[0][0]) if h else "" for k, h in zip(keys, found)}
    met = sum(words[k] in constrained[k].split() for k in with_word)
    sub = {k: refs[k] for k in with_word}
    plain = coco_scores(sub, {k: firsts["beam 5"][k] for k in with_word}, use_spice=False, log=lambda *_: None)
    forced = coco_scores(sub, {k: constrained[k] for k in with_word}, use_spice=False, log=lambda *_: None)
    already = sum(words[k] in firsts["beam 5"][k].split() for k in with_word)
    print(f"constrained beam 5 (one reference word each, {len(with_word)} images with such a word): satisfied "
          f"{met} / {len(with_word)}; the unconstrained beam 5 already named it in {already}; "
          f"CIDEr {forced['CIDEr']:.3f} against {plain['CIDEr']:.3f} unconstrained, BLEU-4 {forced['BLEU-4']:.3f} "
          f"against {plain['BLEU-4']:.3f}; {len(keys) / seconds:.1f} captions/s")  # fmt: skip


if __name__ == "__main__":
    main()
