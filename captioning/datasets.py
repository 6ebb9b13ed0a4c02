"""Read captioning datasets in their native layouts into one normalised form.

Supported layouts (``fmt``):

- ``flickr_token``: Flickr8k ``Flickr8k.token.txt`` / Flickr30k ``results_20130124.token``
  (``name.jpg#i<TAB>caption``);
- ``flickr_csv``: the common re-distribution ``captions.txt`` (``image,caption`` CSV);
- ``flickr30k_csv``: Flickr30k ``results.csv`` (``image_name| comment_number| comment``);
- ``coco``: MS-COCO ``captions_*.json`` annotation files;
- ``karpathy``: Karpathy split JSON (``dataset_flickr8k.json``, ``dataset_coco.json``, ...);
- ``auto``: pick one of the above from the file name and its first bytes.

Splits come from where ``splits`` says, and from nothing else (so a pipeline that declares
that path as an input sees every file this module reads): a folder of Flickr split lists
(``Flickr_8k.trainImages.txt`` / ``devImages`` / ``testImages``), a Karpathy split JSON, or
the captions file itself, which means its own split (Karpathy JSON) or a seeded random split.

Problems that make the file unreadable raise :class:`CaptioningError` naming the file and
line; problems a user wants skipped (missing image files, empty captions, duplicates) are
counted in the report.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .errors import CaptioningError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
# Karpathy JSON uses "restval" for the COCO val images moved into training.
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
FLICKR_SPLIT_FILES = {"train": "trainImages", "val": "devImages", "test": "testImages"}
_TOKEN_KEY = re.compile(r"^(?P<image>.+?)#(?P<n>\d+)$")


@dataclasses.dataclass
class Parsed:
    """What a parser read: ``rows`` [(image, caption, line or None)], and what the file itself says
    of splits ({image: split}) and of scene ground truth ({image: truth}; the generated data)."""

    rows: list
    splits: dict | None = None
    truth: dict | None = None


def read_lines(path):
    """Lines of a UTF-8 text file; invalid bytes are an error naming the line."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise CaptioningError(f"{path}: file not found") from None
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    lines = []
    for n, line in enumerate(raw.splitlines(), 1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise CaptioningError(f"{path}:{n}: not valid UTF-8 ({e.reason} at column {e.start + 1})") from None
    return lines


def parse_flickr_token(path):
    """``name.jpg#i<TAB>caption`` lines -> [(image, caption, line)]."""
    rows = []
    for n, line in enumerate(read_lines(path), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise CaptioningError(f"{path}:{n}: expected 'image#n<TAB>caption', found no tab")
        key, caption = line.split("\t", 1)
        m = _TOKEN_KEY.match(key.strip())
        if not m:
            raise CaptioningError(f"{path}:{n}: bad image key {key!r}: expected 'name.jpg#<number>'")
        rows.append((m["image"], caption, n))
    return Parsed(rows)


def _csv_rows(path, delimiter, header, n_fields):
    text = "\n".join(read_lines(path)) + "\n"
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, strict=True, skipinitialspace=True)
    rows = []
    try:
        first = next(reader, None)
        got = [h.strip() for h in first] if first else None
        if got != header:
            raise CaptioningError(f"{path}:1: expected header {delimiter.join(header)!r}, got {first!r}")
        for fields in reader:
            n = reader.line_num
            if not fields or not any(f.strip() for f in fields):
                continue
            if len(fields) != n_fields:
                raise CaptioningError(
                    f"{path}:{n}: expected {n_fields} fields separated by {delimiter!r}, got {len(fields)}"
                    " (check the quoting)"
                )
            rows.append(([f.strip() for f in fields], n))
    except csv.Error as e:
        raise CaptioningError(f"{path}:{reader.line_num}: broken CSV: {e}") from None
    return rows


def parse_flickr_csv(path):
    """``image,caption`` CSV (captions quoted when they hold commas)."""
    return Parsed([(f[0], f[1], n) for f, n in _csv_rows(path, ",", ["image", "caption"], 2)])


def parse_flickr30k_csv(path):
    """Flickr30k ``results.csv``: ``image_name| comment_number| comment``."""
    rows = _csv_rows(path, "|", ["image_name", "comment_number", "comment"], 3)
    out = []
    for f, n in rows:
        if not f[1].isdigit():
            raise CaptioningError(f"{path}:{n}: comment_number {f[1]!r} is not a number")
        out.append((f[0], f[2], n))
    return Parsed(out)


def _load_json(path):
    from .files import read_json

    data = read_json(path)
    if not isinstance(data, dict):
        raise CaptioningError(f"{path}: expected a JSON object at the top level")
    return data


def parse_coco(path):
    """MS-COCO caption annotations -> [(file_name, caption, None)]."""
    data = _load_json(path)
    for key in ("images", "annotations"):
        if not isinstance(data.get(key), list):
            raise CaptioningError(f"{path}: missing the '{key}' list of a COCO captions file")
    files = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            raise CaptioningError(f"{path}: images[{i}] needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]
    rows = []
    for i, ann in enumerate(data["annotations"]):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise CaptioningError(f"{path}: annotations[{i}] needs 'image_id' and 'caption'")
        if ann["image_id"] not in files:
            raise CaptioningError(
                f"{path}: annotations[{i}] (id {ann.get('id')}) refers to unknown image_id {ann['image_id']}"
            )
        rows.append((files[ann["image_id"]], str(ann["caption"]), None))
    return Parsed(rows)


def parse_karpathy(path):
    """Karpathy split JSON: rows of (filepath/filename, caption, None), its splits, and the scene
    ground truth of images that carry one (``"truth"``, written by the shapes generator)."""
    data = _load_json(path)
    if not isinstance(data.get("images"), list):
        raise CaptioningError(f"{path}: missing the 'images' list of a Karpathy split file")
    rows, splits, truth = [], {}, {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or "filename" not in im or "sentences" not in im:
            raise CaptioningError(f"{path}: images[{i}] needs 'filename' and 'sentences'")
        name = f"{im['filepath']}/{im['filename']}" if im.get("filepath") else im["filename"]
        split = im.get("split")
        if split not in KARPATHY_SPLITS:
            raise CaptioningError(
                f"{path}: images[{i}] ({name}) has unknown split {split!r}"
                f" (expected one of {', '.join(KARPATHY_SPLITS)})"
            )
        splits[name] = KARPATHY_SPLITS[split]
        if "truth" in im:
            truth[name] = im["truth"]
        for s in im["sentences"]:
            raw = s.get("raw") if isinstance(s, dict) else None
            if raw is None and isinstance(s, dict) and "tokens" in s:
                raw = " ".join(s["tokens"])
            if raw is None:
                raise CaptioningError(f"{path}: images[{i}] ({name}) has a sentence without 'raw' or 'tokens'")
            rows.append((name, raw, None))
    return Parsed(rows, splits, truth or None)


@dataclasses.dataclass(frozen=True)
class Format:
    parse: Callable[[Path], Parsed]
    detect: Callable[[str, dict | None], bool]  # (first line of a text file, or a JSON file's object)


def _is_karpathy(data):
    images = data.get("images")
    return "annotations" not in data and isinstance(images, list) and ("dataset" in data or "sentences" in images[0])


# Every layout a captions file can have: a new one is a parser and a line here.
FORMATS = {
    "flickr_token": Format(
        parse_flickr_token, lambda first, js: js is None and "\t" in first and "#" in first.split("\t")[0]
    ),
    "flickr_csv": Format(parse_flickr_csv, lambda first, js: js is None and first.replace(" ", "") == "image,caption"),
    "flickr30k_csv": Format(
        parse_flickr30k_csv,
        lambda first, js: js is None and first.replace(" ", "") == "image_name|comment_number|comment",
    ),
    "coco": Format(parse_coco, lambda first, js: js is not None and "annotations" in js),
    "karpathy": Format(parse_karpathy, lambda first, js: js is not None and _is_karpathy(js)),
}


def detect_format(path) -> str:
    """Which entry of ``FORMATS`` a captions file is, from its name and first line (or its JSON)."""
    path = Path(path)
    if not path.is_file():
        raise CaptioningError(f"{path}: captions file not found")
    head = path.read_bytes()[:4096].decode("utf-8", errors="replace")
    data = _load_json(path) if path.suffix == ".json" or head.lstrip().startswith("{") else None
    first = head.splitlines()[0].strip() if head and data is None else ""
    for name, fmt in FORMATS.items():
        if fmt.detect(first, data):
            return name
    if data is not None:
        raise CaptioningError(f"{path}: JSON file is neither COCO captions nor a Karpathy split")
    raise CaptioningError(f"{path}:1: cannot tell the dataset layout from this line; set the format explicitly")


def read_split_files(directory):
    """Flickr-style split lists beside the captions file -> {image: split}, or None if absent."""
    directory = Path(directory)
    found = {}
    for split, stem in FLICKR_SPLIT_FILES.items():
        files = sorted(directory.glob(f"Flickr_*.{stem}.txt"))
        for f in files:
            for n, line in enumerate(read_lines(f), 1):
                name = line.strip()
                if not name:
                    continue
                if name in found and found[name] != split:
                    raise CaptioningError(f"{f}:{n}: {name} is also listed in the {found[name]} split")
                found[name] = split
    return found or None


def seeded_split(names, ratios, seed):
    """Assign sorted ``names`` to splits by ``ratios`` (train, val, test) with a seeded shuffle."""
    names = sorted(names)
    order = np.random.default_rng(seed).permutation(len(names))
    n_train = int(round(ratios[0] * len(names)))
    n_val = int(round(ratios[1] * len(names)))
    out = {}
    for rank, i in enumerate(order):
        out[names[i]] = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
    return out


def load_splits(source, captions):
    """``({image: split}, source kind)`` from ``source``; ``(None, "own")`` when ``source`` is the
    captions file itself (its own split, or a seeded one). See the module docstring."""
    source = Path(source)
    if source.is_dir():
        found = read_split_files(source)
        if not found:
            raise CaptioningError(
                f"{source}: no Flickr split lists (Flickr_*.trainImages.txt, devImages, testImages) in this folder"
            )
        return found, "split files"
    if not source.is_file():
        raise CaptioningError(f"{source}: split source not found")
    if source.resolve() == Path(captions).resolve():
        return None, "own"  # the captions file's own split, or a seeded one
    if source.suffix == ".json" and detect_format(source) == "karpathy":
        return parse_karpathy(source).splits, "karpathy"
    raise CaptioningError(
        f"{source}: expected a folder of Flickr split lists, a Karpathy split JSON, or the captions file itself"
    )


def _captions_by_image(rows, captions, report) -> dict:
    """``{image: [its distinct captions]}`` of the parsed ``rows``, whitespace normalised; empty
    captions (named by file and line) and duplicates are counted in ``report``."""
    by_image: dict[str, list[str]] = {}
    for image, caption, line in rows:
        caption = " ".join(caption.split())
        if not caption:
            report["empty_captions"].append(f"{captions}:{line}" if line else f"{captions}: {image}")
            continue
        caps = by_image.setdefault(image, [])
        if caption in caps:
            report["duplicate_captions"] += 1
            continue
        caps.append(caption)
    return by_image


def load_dataset(
    captions, images, fmt="auto", splits=None, split_ratios=(0.8, 0.1, 0.1), seed=0, max_bad_fraction=0.01
):
    """Parse a dataset and return ``(records, report)``.

    ``splits``: where train/val/test come from (see the module docstring); None means the
    captions file itself. ``records``: sorted list of ``{"image": path relative to images,
    "split", "captions"}``. ``report``: counts (and names) of everything skipped. Raises
    :class:`CaptioningError` when more than ``max_bad_fraction`` of the listed images are
    missing on disk.
    """
    captions, images = Path(captions), Path(images)
    if fmt != "auto" and fmt not in FORMATS:
        raise CaptioningError(f"unknown dataset format {fmt!r} (expected auto or one of {', '.join(FORMATS)})")
    if not images.is_dir():
        raise CaptioningError(f"{images}: image directory not found")
    fmt = detect_format(captions) if fmt == "auto" else fmt
    parsed = FORMATS[fmt].parse(captions)
    rows = parsed.rows
    splits, split_source = load_splits(captions if splits is None else splits, captions)
    if split_source == "own":
        splits, split_source = (parsed.splits, fmt) if parsed.splits else (None, "seeded")
    if not rows:
        raise CaptioningError(f"{captions}: no captions found")

    report = {
        "format": fmt,
        "empty_captions": [],
        "duplicate_captions": 0,
        "missing_images": [],
        "not_in_split": 0,
        "images_without_captions": [],
        "split_source": split_source,
    }
    by_image = _captions_by_image(rows, captions, report)
    if splits is None:
        splits = seeded_split(by_image, split_ratios, seed)

    records = []
    for image in sorted(by_image):
        if image not in splits:
            report["not_in_split"] += 1
            continue
        if not (images / image).is_file():
            report["missing_images"].append(image)
            continue
        record = {"image": image, "split": splits[image], "captions": by_image[image]}
        if parsed.truth and image in parsed.truth:
            record["truth"] = parsed.truth[image]
        records.append(record)
    for image, split in splits.items():
        if image not in by_image and split and (images / image).is_file():
            report["images_without_captions"].append(image)
    on_disk = {p.name for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    listed = {Path(r).name for r in by_image}
    report["image_files_without_captions"] = len(on_disk - listed)

    listed_n = len(records) + len(report["missing_images"])
    bad = len(report["missing_images"]) / max(1, listed_n)
    if bad > max_bad_fraction:
        raise CaptioningError(
            f"{captions}: {len(report['missing_images'])} of {listed_n} listed images are missing under {images}"
            f" (first: {report['missing_images'][0]}); more than max_bad_fraction={max_bad_fraction}"
        )
    if not records:
        raise CaptioningError(f"{captions}: no usable images (all captions empty or images missing)")
    report["images"] = len(records)
    report["captions"] = sum(len(r["captions"]) for r in records)
    report["splits"] = {s: sum(r["split"] == s for r in records) for s in SPLITS}
    return records, report
