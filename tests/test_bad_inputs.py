"""Every bad-input class through the real prepare/features stages: a clear error or a counted skip."""

import pytest

from benchmarks.bad_inputs import all_cases

EXPECTED = {
    # unreadable images: skipped, counted and named in the features report
    "corrupt JPEG": (0, "skipped 1 (bad.jpg: "),
    "truncated JPEG": (0, "skipped 1 (bad.jpg: cannot decode"),
    "zero-byte file": (0, "skipped 1 (bad.jpg: not an image file"),
    "text file named .jpg": (0, "skipped 1 (bad.jpg: not an image file"),
    # unusual but valid images: converted and encoded
    "PNG": (0, "encoded 9 images, skipped 0"),
    "GIF": (0, "encoded 9 images, skipped 0"),
    "grayscale JPEG": (0, "encoded 9 images, skipped 0"),
    "CMYK JPEG": (0, "encoded 9 images, skipped 0"),
    "16-bit PNG": (0, "encoded 9 images, skipped 0"),
    "12000x9000 JPEG": (0, "encoded 9 images, skipped 0"),
    # caption-file problems a user wants skipped: counted in the prepare report
    "image listed but missing on disk": (0, "missing 1,"),
    "image on disk with no captions": (0, "unlisted image files 1"),
    "empty / whitespace-only caption": (0, "empty captions 2,"),
    "duplicate rows": (0, "duplicates 1,"),
    # unreadable caption files: exit 1 with file and line
    "CSV with broken quoting": (1, "c.csv:10: "),
    "caption file with invalid UTF-8": (1, "bad_utf8.token:2: not valid UTF-8"),
    "token line without a tab": (1, "notab.token:2: expected 'image#n<TAB>caption', found no tab"),
    "token line with a bad #n suffix": (1, "badn.token:2: bad image key 'ok1.jpg#zero'"),
    "COCO JSON missing annotations": (1, "captions_train2014.json: missing the 'annotations' list"),
    "COCO annotation with unknown image id": (1, "annotations[0] (id 5) refers to unknown image_id 7"),
    "unknown split name (Karpathy)": (1, "has unknown split 'training'"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return all_cases(str(tmp_path_factory.mktemp("bad")))


@pytest.mark.parametrize("label", sorted(EXPECTED))
def test_bad_input_class(results, label):
    code, line = results[label]
    want_code, want_text = EXPECTED[label]
    assert code == want_code, line
    assert want_text in line, line
    if code:
        assert line.startswith("Error: ") and "Traceback" not in line
