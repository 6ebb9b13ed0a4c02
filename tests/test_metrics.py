"""pycocoevalcap scoring on toy sets with known values (needs Java, as the real metrics do)."""

import pytest

from captioning.metrics import CORENLP_JARS, coco_scores, spice_available

REFS = {"1": ["a small red circle", "a red circle"], "2": ["a large blue square to the left of a green circle"]}


RIGHT = {"1": "a small red circle", "2": "a large blue square to the left of a green circle"}
HALF_WRONG = {"1": "a small red circle", "2": "a man rides a horse"}


@pytest.fixture(scope="module")
def scored():
    """Each scoring starts Java twice (tokenizer, METEOR): the cases share two runs."""
    return {
        name: coco_scores(REFS, hyps, use_spice=False, per_image=True)
        for name, hyps in [("right", RIGHT), ("half", HALF_WRONG)]
    }


def test_identical_hypotheses_score_perfectly(scored):
    s, images = scored["right"]
    for k in ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L"):
        assert s[k] == pytest.approx(1.0, abs=1e-6), k
    assert s["METEOR"] > 0.95
    assert set(s) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"}
    assert all(images[i]["BLEU-4"] == pytest.approx(1.0, abs=1e-6) for i in RIGHT)


def test_known_bleu_and_rouge_values():
    # hyp "a red square" vs ref "a red circle": 2 of 3 unigrams match, 1 of 2 bigrams, equal length (BP = 1)
    s = coco_scores({"1": ["a red circle"]}, {"1": "a red square"}, use_spice=False)
    assert s["BLEU-1"] == pytest.approx(2 / 3, abs=1e-6)
    assert s["BLEU-2"] == pytest.approx((2 / 3 * 1 / 2) ** 0.5, abs=1e-6)
    assert s["ROUGE-L"] == pytest.approx(2 / 3, abs=1e-6)  # LCS 2 of 3 both ways (beta 1.2, P = R)


def test_per_image_scores_are_the_scorers_own(scored):
    scores, images = scored["half"]
    assert set(images) == {"1", "2"} and set(images["1"]) == {"BLEU-4", "CIDEr"}
    assert images["1"]["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and images["2"]["BLEU-4"] < 1e-3
    assert images["1"]["CIDEr"] > images["2"]["CIDEr"] == pytest.approx(0.0, abs=1e-9)
    # corpus CIDEr is the mean of the per-image terms
    assert scores["CIDEr"] == pytest.approx((images["1"]["CIDEr"] + images["2"]["CIDEr"]) / 2, abs=1e-5)


def test_wrong_captions_score_lower(scored):
    right, half = scored["right"][0], scored["half"][0]
    for k in right:
        assert right[k] > half[k], k


def test_spice_availability_in_both_worlds(tmp_path):
    """Checked on folders made here, so it means the same whether or not this machine has the jars."""
    lib, jars = tmp_path / "lib", tmp_path / "corenlp"
    lib.mkdir()
    jars.mkdir()
    ok, why = spice_available({}, lib=lib)
    assert not ok and why.startswith("SPICE skipped:") and "\n" not in why
    assert "stanford-corenlp-3.6.0.jar" in why and str(lib) in why
    ok, _ = spice_available({"SPICE_CORENLP_DIR": str(jars)}, lib=lib)  # the folder lacks the jars
    assert not ok
    for name in CORENLP_JARS:
        (jars / name).write_bytes(b"PK")
    assert spice_available({"SPICE_CORENLP_DIR": str(jars)}, lib=lib) == (True, "")
    assert all((lib / name).resolve() == (jars / name).resolve() for name in CORENLP_JARS)  # linked into place
    assert spice_available({}, lib=lib) == (True, "")  # found in place from now on


def test_caption_set_figures_on_a_known_set():
    from captioning.metrics import diversity

    caps = ["a red circle", "a red square", "a red circle"]
    got = diversity(caps, train_captions={"a red circle"}, references={"1": ["a b", "a b c d"]})
    assert got == {
        "vocab_used": 4,  # a, red, circle, square
        "distinct_1": round(4 / 9, 6),
        "distinct_2": round(3 / 6, 6),  # (a red), (red circle), (red square)
        "novel": round(1 / 3, 6),  # only "a red square" is not a training caption
        "mean_length": 3.0,
        "ref_mean_length": 3.0,
    }


def test_oracle_cider_and_mbleu_among_n():
    from captioning.metrics import among_n

    refs = {"1": ["a small red circle", "a red circle"], "2": ["a large blue square"]}
    same = among_n(refs, {"1": ["a small red circle on the left"] * 3, "2": ["a large blue square in the middle"] * 3})
    assert same["mBLEU_4"] == pytest.approx(1.0, abs=1e-6)  # every caption the same: no diversity
    best_first = coco_scores(refs, {"1": "a small red circle", "2": "a large blue square"}, use_spice=False)
    mixed = among_n(refs, {"1": ["a dog", "a small red circle"], "2": ["a large blue square", "a cat"]})
    assert mixed["oracle_CIDEr"] == pytest.approx(best_first["CIDEr"], abs=1e-6)  # the best of each image
    assert mixed["mBLEU_4"] < 0.01
