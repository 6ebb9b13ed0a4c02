"""Every supported dataset layout, parsed from small fixture files; bad input gives clear errors."""

import json

import pytest
from PIL import Image

from captioning.datasets import detect_format, load_dataset, seeded_split
from captioning.errors import CaptioningError


def make_images(folder, names):
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (200, 10, 10)).save(folder / n, format="JPEG")
    return folder


def by_image(records):
    return {r["image"]: r for r in records}


def test_flickr8k_token_with_split_files(tmp_path):
    imgs = make_images(tmp_path / "Flicker8k_Dataset", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    text = tmp_path / "Flickr8k_text"
    text.mkdir()
    lines = [f"{n}.jpg#{i}\t{n.upper()} caption number {i} ." for n in "abcd" for i in range(5)]
    (text / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    (text / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    (text / "Flickr_8k.devImages.txt").write_text("c.jpg\n")
    (text / "Flickr_8k.testImages.txt").write_text("d.jpg\n")
    records, report = load_dataset(text / "Flickr8k.token.txt", imgs, splits=text)
    r = by_image(records)
    assert report["format"] == "flickr_token" and report["split_source"] == "split files"
    assert [r[k]["split"] for k in ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]] == ["train", "train", "val", "test"]
    assert r["a.jpg"]["captions"][0] == "A caption number 0 ."
    assert len(r["a.jpg"]["captions"]) == 5 and report["captions"] == 20


def test_splits_come_only_from_where_they_are_asked(tmp_path):
    imgs = make_images(tmp_path / "Images", ["a.jpg", "b.jpg", "c.jpg", "d.jpg"])
    (tmp_path / "captions.txt").write_text("image,caption\n" + "".join(f"{n}.jpg,{n} cap\n" for n in "abcd"))
    (tmp_path / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\nc.jpg\nd.jpg\n")
    # split lists lying beside the captions are not read unless named: nothing reads files DVC was not told of
    _, seeded = load_dataset(tmp_path / "captions.txt", imgs, split_ratios=(0.5, 0.5, 0.0))
    assert seeded["split_source"] == "seeded" and seeded["splits"] == {"train": 2, "val": 2, "test": 0}
    records, listed = load_dataset(tmp_path / "captions.txt", imgs, splits=tmp_path)
    assert listed["split_source"] == "split files" and {r["split"] for r in records} == {"train"}
    karpathy = tmp_path / "dataset_flickr8k.json"
    karpathy.write_text(
        json.dumps(
            {
                "dataset": "flickr8k",
                "images": [
                    {"filename": f"{n}.jpg", "split": s, "sentences": [{"raw": "x"}]}
                    for n, s in zip("abcd", ["train", "val", "test", "restval"])
                ],
            }
        )
    )
    records, rep = load_dataset(tmp_path / "captions.txt", imgs, splits=karpathy)
    assert rep["split_source"] == "karpathy" and [r["split"] for r in records] == ["train", "val", "test", "train"]
    assert records[0]["captions"] == ["a cap"]  # captions still come from the captions file
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CaptioningError, match="no Flickr split lists"):
        load_dataset(tmp_path / "captions.txt", imgs, splits=empty)
    with pytest.raises(CaptioningError, match="expected a folder of Flickr split lists"):
        load_dataset(tmp_path / "captions.txt", imgs, splits=tmp_path / "Flickr_8k.trainImages.txt")


def test_flickr_csv_with_quoted_commas(tmp_path):
    imgs = make_images(tmp_path / "Images", ["x.jpg", "y.jpg"])
    (tmp_path / "captions.txt").write_text(
        'image,caption\nx.jpg,"A dog, brown, runs ."\nx.jpg,A dog runs\ny.jpg,"He said ""hi"" , then left"\n'
    )
    records, report = load_dataset(tmp_path / "captions.txt", imgs, split_ratios=(0.5, 0.5, 0.0), seed=1)
    r = by_image(records)
    assert report["format"] == "flickr_csv" and report["split_source"] == "seeded"
    assert r["x.jpg"]["captions"] == ["A dog, brown, runs .", "A dog runs"]
    assert r["y.jpg"]["captions"] == ['He said "hi" , then left']


def test_flickr30k_token_and_csv(tmp_path):
    imgs = make_images(tmp_path / "flickr30k_images", ["1000092795.jpg", "10002456.jpg"])
    (tmp_path / "results_20130124.token").write_text(
        "1000092795.jpg#0\tTwo young guys with shaggy hair .\n10002456.jpg#0\tSeveral men in hard hats .\n"
    )
    (tmp_path / "results.csv").write_text(
        "image_name| comment_number| comment\n1000092795.jpg| 0| Two young guys with shaggy hair .\n"
        "10002456.jpg| 0| Several men in hard hats .\n10002456.jpg| 1| Workers look down , from up .\n"
    )
    a, rep_a = load_dataset(tmp_path / "results_20130124.token", imgs)
    b, rep_b = load_dataset(tmp_path / "results.csv", imgs)
    assert rep_a["format"] == "flickr_token" and rep_b["format"] == "flickr30k_csv"
    assert by_image(b)["10002456.jpg"]["captions"] == ["Several men in hard hats .", "Workers look down , from up ."]
    assert by_image(a)["1000092795.jpg"]["captions"] == by_image(b)["1000092795.jpg"]["captions"]


def test_coco_annotations(tmp_path):
    imgs = make_images(tmp_path / "val2017", ["000000000139.jpg", "000000000285.jpg"])
    ann = {
        "images": [{"id": 139, "file_name": "000000000139.jpg"}, {"id": 285, "file_name": "000000000285.jpg"}],
        "annotations": [
            {"id": 1, "image_id": 139, "caption": "A room with a TV."},
            {"id": 2, "image_id": 285, "caption": "A big brown bear."},
            {"id": 3, "image_id": 285, "caption": " A bear  sitting. "},
        ],
    }
    (tmp_path / "captions_val2017.json").write_text(json.dumps(ann))
    records, report = load_dataset(tmp_path / "captions_val2017.json", imgs)
    assert report["format"] == "coco"
    assert by_image(records)["000000000285.jpg"]["captions"] == ["A big brown bear.", "A bear sitting."]


def test_karpathy_json_with_filepath_and_restval(tmp_path):
    make_images(tmp_path / "coco", ["val2014/v1.jpg", "val2014/v2.jpg", "train2014/t1.jpg"])
    data = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": "v1.jpg",
                "split": "restval",
                "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}],
            },
            {"filepath": "val2014", "filename": "v2.jpg", "split": "test", "sentences": [{"tokens": ["a", "dog"]}]},
            {"filepath": "train2014", "filename": "t1.jpg", "split": "val", "sentences": [{"raw": "A cow."}]},
        ],
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(data))
    records, report = load_dataset(tmp_path / "dataset_coco.json", tmp_path / "coco")
    r = by_image(records)
    assert report["format"] == "karpathy"
    assert r["val2014/v1.jpg"]["split"] == "train"
    assert r["val2014/v2.jpg"] == {"image": "val2014/v2.jpg", "split": "test", "captions": ["a dog"]}
    assert r["train2014/t1.jpg"]["split"] == "val"


def test_detect_format_names_the_file(tmp_path):
    f = tmp_path / "weird.txt"
    f.write_text("hello world\n")
    with pytest.raises(CaptioningError, match=r"weird.txt:1: cannot tell"):
        detect_format(f)


def test_seeded_split_is_deterministic_and_follows_ratios():
    names = [f"{i}.jpg" for i in range(100)]
    a, b = seeded_split(names, (0.8, 0.1, 0.1), 5), seeded_split(reversed(names), (0.8, 0.1, 0.1), 5)
    assert a == b
    assert sorted(list(a.values()).count(s) for s in ("train", "val", "test")) == [10, 10, 80]
    assert seeded_split(names, (0.8, 0.1, 0.1), 6) != a


# ---- bad input: each class gives an error naming file and line, or a counted skip -----------


def _token_file(tmp_path, body: bytes, names=("a.jpg",)):
    imgs = make_images(tmp_path / "img", names)
    f = tmp_path / "captions.token"
    f.write_bytes(body)
    return f, imgs


@pytest.mark.parametrize(
    "body, message",
    [
        (
            b"a.jpg#0\tok caption\na.jpg#1 no tab here\n",
            r"captions.token:2: expected 'image#n<TAB>caption', found no tab",
        ),
        (b"a.jpg#0\tok caption\na.jpg#x\tbad suffix\n", r"captions.token:2: bad image key 'a.jpg#x'"),
        (b"a.jpg#0\tok caption\na.jpg#1\tcaf\xe9 latin-1\n", r"captions.token:2: not valid UTF-8"),
    ],
)
def test_bad_token_files(tmp_path, body, message):
    f, imgs = _token_file(tmp_path, body)
    with pytest.raises(CaptioningError, match=message):
        load_dataset(f, imgs, fmt="flickr_token")


def test_broken_csv_quoting_names_the_line(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "captions.txt"
    f.write_text('image,caption\na.jpg,fine\na.jpg,"unclosed quote, here\na.jpg,next\n')
    with pytest.raises(CaptioningError, match=r"captions.txt:\d+: (broken CSV|expected 2 fields)"):
        load_dataset(f, imgs)


def test_csv_with_extra_field_names_the_line(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\na.jpg,fine\na.jpg,a dog, unquoted comma\n")
    with pytest.raises(CaptioningError, match=r"captions.txt:3: expected 2 fields"):
        load_dataset(f, imgs)


def test_coco_missing_annotations(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "captions_train2014.json"
    f.write_text(
        json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": []}).replace(
            '"annotations": []', '"info": {}'
        )
    )
    with pytest.raises(CaptioningError, match=r"neither COCO captions nor a Karpathy|missing the 'annotations'"):
        load_dataset(f, imgs)
    with pytest.raises(CaptioningError, match=r"captions_train2014.json: missing the 'annotations' list"):
        load_dataset(f, imgs, fmt="coco")


def test_coco_unknown_image_id(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "c.json"
    f.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"id": 9, "image_id": 2, "caption": "x"}]}
        )
    )
    with pytest.raises(CaptioningError, match=r"c.json: annotations\[0\] \(id 9\) refers to unknown image_id 2"):
        load_dataset(f, imgs)


def test_karpathy_unknown_split(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "dataset_x.json"
    f.write_text(json.dumps({"dataset": "x", "images": [{"filename": "a.jpg", "split": "tst", "sentences": []}]}))
    with pytest.raises(CaptioningError, match=r"dataset_x.json: images\[0\] \(a.jpg\) has unknown split 'tst'"):
        load_dataset(f, imgs)


def test_invalid_json_names_the_line(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "c.json"
    f.write_text('{"images": [\n  {"id": 1,\n  oops}\n]}')
    with pytest.raises(CaptioningError, match=r"c.json:3: invalid JSON"):
        load_dataset(f, imgs, fmt="coco")


def test_skips_are_counted(tmp_path):
    """Missing image, image without captions, empty caption and duplicate rows are skipped and reported."""
    names = [f"{i}.jpg" for i in range(200)]
    imgs = make_images(tmp_path / "img", names[:199] + ["extra.jpg"])  # 199.jpg missing, extra.jpg unlisted
    rows = ["image,caption"] + [f"{n},a caption" for n in names] + ["0.jpg,a caption", "1.jpg,   ", "2.jpg,"]
    f = tmp_path / "captions.txt"
    f.write_text("\n".join(rows) + "\n")
    records, report = load_dataset(f, imgs, max_bad_fraction=0.01)
    assert len(records) == 199
    assert report["missing_images"] == ["199.jpg"]
    assert report["duplicate_captions"] == 1
    assert report["empty_captions"] == [f"{f}:203", f"{f}:204"]
    assert report["image_files_without_captions"] == 1


def test_too_many_missing_images_is_an_error(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    f = tmp_path / "captions.txt"
    f.write_text("image,caption\na.jpg,x\nb.jpg,y\n")
    with pytest.raises(CaptioningError, match=r"1 of 2 listed images are missing .* \(first: b.jpg\)"):
        load_dataset(f, imgs, max_bad_fraction=0.01)


def test_missing_files_are_clear_errors(tmp_path):
    imgs = make_images(tmp_path / "img", ["a.jpg"])
    with pytest.raises(CaptioningError, match=r"nope.txt: captions file not found"):
        load_dataset(tmp_path / "nope.txt", imgs)
    with pytest.raises(CaptioningError, match=r"image directory not found"):
        load_dataset(tmp_path / "nope.txt", tmp_path / "noimgs")
