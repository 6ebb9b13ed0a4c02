"""Caption one split of a dataset from its features and score it: the COCO caption metrics
(:mod:`captioning.metrics`), diversity, teacher-forced word accuracy, several captions' oracle
scores when the search keeps several, and scene accuracy on the generated data."""

from __future__ import annotations

from .decode import Decoding, caption_features, steered
from .errors import CaptioningError
from .metrics import among_n, coco_scores, diversity, word_accuracy
from .vocab import make_tokenizer


def evaluate_split(model, store, records, split, decoding: Decoding, batch_size, progress=False, log=print, source=""):
    """``(scores, predictions)`` of ``model`` (a :class:`captioning.model_folder.TrainedModel`,
    an ensemble too) on the ``split`` images of ``records`` (the dataset's, with captions) that
    have features in ``store``; split images without features are counted, not captioned.
    Steered or sampled ``decoding`` keeps every caption of an image in its prediction."""
    store.check_encoder(model.encoder, model.folder)
    in_split = [r for r in records if r["split"] == split]
    chosen = [r for r in in_split if r["image"] in store.index]
    if not chosen:
        raise CaptioningError(f"{source}: no images with features in the '{split}' split")
    keys = [r["image"] for r in chosen]
    rows = store.rows(keys)  # read from disk a batch at a time
    hyps, log_probs, several = _caption(model, rows, decoding, batch_size, progress)
    refs = {r["image"]: r["captions"] for r in chosen}
    by_key = dict(zip(keys, hyps))
    scores, per_image = coco_scores(refs, by_key, log=log, per_image=True)
    scores["mean_log_prob"] = round(sum(log_probs) / len(log_probs), 6)
    tokenize = make_tokenizer()
    train = {" ".join(tokenize(c)) for r in records if r["split"] == "train" for c in r["captions"]}
    tokenized = {k: [" ".join(tokenize(c)) for c in v] for k, v in refs.items()}
    scores.update(diversity(hyps, train, tokenized))
    pairs = [(i, tokenize(c)) for i, k in enumerate(keys) for c in refs[k]]
    scores["word_accuracy"] = word_accuracy(model.decoder, model.vocab, rows, pairs, decoding.max_length)
    if several and min(map(len, several)) > 1:
        scores.update(among_n(refs, dict(zip(keys, several))))
    if all("truth" in r for r in chosen):  # the generated data knows what each image shows
        from .scene_metrics import scene_accuracy

        scores.update(scene_accuracy(by_key, {r["image"]: r["truth"] for r in chosen}))
    scores.update(images=len(keys), images_without_features=len(in_split) - len(chosen), split=split)
    predictions = [
        {"image": k, "caption": by_key[k], "log_prob": round(lp, 6), **per_image[k], "references": refs[k]}
        | ({"captions": several[i]} if several else {})
        for i, (k, lp) in enumerate(zip(keys, log_probs))
    ]
    return scores, predictions


def _caption(model, rows, d: Decoding, batch_size, progress):
    """``(captions, their log-probs, every image's captions or None)``: beam search, or, steered
    (n-best, diverse, sampled), the host-driven search of :mod:`captioning.steer`."""
    if not d.steered:
        hyps, log_probs = caption_features(
            model.decoder, model.vocab, rows, d.beam_size, d.max_length, d.length_penalty, batch_size, progress
        )
        return hyps, log_probs, None
    found = [
        h
        for i in range(0, len(rows), batch_size)
        for h in steered(model.decoder, model.vocab, rows[i : i + batch_size], d)
    ]
    several = [[model.vocab.decode(t) for t, _, _ in hyps] for hyps in found]
    return [c[0] for c in several], [hyps[0][2] for hyps in found], several
