"""benchmarks/split_halves.py: the same images land in the same part for every file, and each part
is scored on its own images only."""

import json

from click.testing import CliRunner

from benchmarks.split_halves import deal, main


def test_deal_sorts_by_image_then_goes_round_robin():
    rows = [{"image": n} for n in ("d.jpg", "a.jpg", "c.jpg", "e.jpg", "b.jpg")]
    parts = deal(rows, 2)
    assert [[r["image"] for r in p] for p in parts] == [["a.jpg", "c.jpg", "e.jpg"], ["b.jpg", "d.jpg"]]
    assert [[r["image"] for r in p] for p in deal(rows, 3)] == [["a.jpg", "d.jpg"], ["b.jpg", "e.jpg"], ["c.jpg"]]


def test_each_part_is_scored_on_its_own_images(tmp_path):
    refs = ["a dog runs on the green grass", "a brown dog is running outside"]
    # Sorted: a, b, c, d -> part 1 = a, c (captions equal to a reference), part 2 = b, d (no overlap).
    rows = [
        {"image": "c.jpg", "caption": refs[1], "references": refs},
        {"image": "b.jpg", "caption": "two men play chess indoors today", "references": refs},
        {"image": "a.jpg", "caption": refs[0], "references": refs},
        {"image": "d.jpg", "caption": "two men play chess indoors today", "references": refs},
    ]
    path = tmp_path / "pred.json"
    path.write_text(json.dumps(rows))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 0, result.output
    line = result.output.strip().splitlines()[-1]  # the scorers print their own lines before it
    assert line.startswith(f"{path} (4 images")
    first, second = line.split(": ", 1)[1].split("  |  ")
    assert first.split(" / ")[0] == "1.0000"  # BLEU-4 of captions that are references
    assert second.split(" / ")[0] == "0.0000"


def test_a_file_that_is_not_predictions_names_itself(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({"BLEU-4": 0.2}))
    result = CliRunner().invoke(main, [str(path)])
    assert result.exit_code == 1
    assert f"{path}: expected a list of predictions" in result.output
    result = CliRunner().invoke(main, [str(tmp_path / "missing.json")])
    assert result.exit_code == 1 and "missing.json: file not found" in result.output
