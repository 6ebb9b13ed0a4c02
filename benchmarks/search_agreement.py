"""The compiled search against the host-driven reference on a whole split: the same captions?
And the speed of each over the split in batches (what evaluate does).

    python -m benchmarks.search_agreement MODEL_DIR FEATURES DATASET [--split val] [--beams 1,3,5]

For each beam size: both searches over every image of the split (``--batch-size`` images at a
time), the count of identical captions, and for each image where they differ both captions with
the log-probability each search gave. Captions/s of each, alternated (reference, compiled,
reference, compiled) so that a drift of the machine's speed hits both.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("dataset", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", default="val", show_default=True)
@click.option("--beams", default="1,3,5", show_default=True)
@click.option("--batch-size", default=128, show_default=True, type=int)
@click.option("--max-length", default=20, show_default=True, type=int)
def main(model_dir, features, dataset, split, beams, batch_size, max_length):
    from captioning.decode import caption_features, graph_search
    from captioning.feature_store import FeatureStore
    from captioning.files import read_json
    from captioning.model_folder import load_model

    model = load_model(model_dir)
    store = FeatureStore(features)
    keys = [r["image"] for r in read_json(dataset)["images"] if r["split"] == split and r["image"] in store.index]
    feats = store.load(keys)
    print(f"{model_dir}: {len(keys)} {split} images, batch {batch_size}")
    print("| beam | identical captions | reference captions/s | compiled captions/s | compiled / reference |")
    print("|---|---|---|---|---|")
    flips = []
    for beam in (int(b) for b in beams.split(",")):
        search = graph_search(model.decoder, model.vocab, beam, max_length)

        def compiled(search=search):
            caps, lps = [], []
            for i in range(0, len(feats), batch_size):
                seqs, _, raw = search(feats[i : i + batch_size])
                caps += [model.vocab.decode(s) for s in seqs]
                lps += raw
            return caps, lps

        def reference(beam=beam):
            return caption_features(model.decoder, model.vocab, feats, beam, max_length, batch_size=batch_size)

        compiled(), reference()  # warm-up: trace both
        times = {"reference": [], "compiled": []}
        for _ in range(2):
            for name, fn in (("reference", reference), ("compiled", compiled)):
                t0 = time.perf_counter()
                out = fn()
                times[name].append(time.perf_counter() - t0)
                if name == "reference":
                    ref = out
                else:
                    got = out
        same = sum(a == b for a, b in zip(ref[0], got[0]))
        rate = {k: len(keys) / min(v) for k, v in times.items()}
        print(f"| {beam} | {same} / {len(keys)} | {rate['reference']:.0f} | {rate['compiled']:.0f} | "
              f"{rate['compiled'] / rate['reference']:.2f} |")  # fmt: skip
        for k, a, la, b, lb in zip(keys, ref[0], ref[1], got[0], got[1]):
            if a != b:
                flips.append((beam, k, a, la, b, lb))
    for beam, k, a, la, b, lb in flips:
        print(f"beam {beam} {k}: reference {a!r} ({la:.6f}) | compiled {b!r} ({lb:.6f}) | diff {lb - la:+.2e}")
    if not flips:
        print("every caption identical")


if __name__ == "__main__":
    main()
