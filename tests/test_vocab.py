import json

import numpy as np

from captioning.vocab import SPECIALS, Vocabulary, encode_captions, load_encoded, make_tokenizer, save_encoded


def test_tokenizer_works_offline_and_lowercases():
    tok = make_tokenizer()
    assert tok("A dog's ball, red.") == ["a", "dog", "'s", "ball", "red"]


def test_vocabulary_round_trip(tmp_path):
    tok = make_tokenizer()
    caps = [tok(c) for c in ["a red circle", "a blue square", "a red square", "rare word"]]
    voc = Vocabulary.build(caps, min_count=2)
    assert voc.words[:4] == list(SPECIALS) and (voc.pad_id, voc.start_id, voc.end_id, voc.unk_id) == (0, 1, 2, 3)
    assert voc.words[4:] == ["a", "red", "square"]  # by count, then alphabetical
    ids = voc.encode(tok("a red rare square"), max_length=10)
    assert ids == [1, 4, 5, 3, 6, 2]
    assert voc.decode(ids[1:]) == "a red <unk> square"
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(voc.to_json()))
    assert Vocabulary.from_json(json.loads(path.read_text())).words == voc.words


def test_encode_pads_truncates_and_round_trips(tmp_path):
    voc = Vocabulary.build([["a", "b", "c"]])
    m = encode_captions(voc, [["a", "b", "c"], ["c"]], max_length=2)
    assert m.tolist() == [[1, 4, 5, 2], [1, 6, 2, 0]]
    save_encoded(tmp_path / "c.h5", {"train": (["x.jpg", "y.jpg"], m)})
    images, tokens = load_encoded(tmp_path / "c.h5", "train")
    assert images == ["x.jpg", "y.jpg"] and np.array_equal(tokens, m)
