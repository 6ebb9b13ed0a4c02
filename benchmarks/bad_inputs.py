"""Run every bad-input class through the real stages and print what each produced.

    python -m benchmarks.bad_inputs        # from the repo root; prints a markdown table

Each case builds a small dataset in a temporary folder, runs `prepare` (and `features` for
image problems) through its click CLI, and reports the exit status plus the error line or the
skip count from the stage's report.
"""

import io
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import yaml  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402

from stages import features, prepare  # noqa: E402

DEFAULTS = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
PARAMS = {  # params.yaml's defaults, with a tiny random CNN and a tolerant share of bad images
    "seed": 1,
    "prepare": {**DEFAULTS["prepare"], "split_ratios": [0.5, 0.25, 0.25], "max_bad_fraction": 0.2},
    "features": {
        **DEFAULTS["features"],
        "backbone": "vgg16",
        "weights": "none",
        "layer": "block1_pool",
        "image_size": 32,
        "batch_size": 4,
        "max_bad_fraction": 0.2,
    },
}


def jpeg(size=(40, 30)):
    buf = io.BytesIO()
    Image.new("RGB", size, "red").save(buf, format="JPEG")
    return buf.getvalue()


def good_images(folder, n=8):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (40, 30), (30 * i, 20, 200)).save(folder / f"ok{i}.jpg")
    return [f"ok{i}.jpg" for i in range(n)]


IMAGE_CASES = {
    "corrupt JPEG": ("bad.jpg", lambda p: p.write_bytes(jpeg()[:20] + b"\0" * 300 + jpeg()[320:])),
    "truncated JPEG": ("bad.jpg", lambda p: p.write_bytes(jpeg((400, 300))[:700])),
    "zero-byte file": ("bad.jpg", lambda p: p.write_bytes(b"")),
    "text file named .jpg": ("bad.jpg", lambda p: p.write_text("hello")),
    "PNG": ("x.png", lambda p: Image.new("RGB", (40, 30), "blue").save(p)),
    "GIF": ("x.gif", lambda p: Image.new("P", (40, 30), 2).save(p)),
    "grayscale JPEG": ("x.jpg", lambda p: Image.new("L", (40, 30), 90).save(p)),
    "CMYK JPEG": ("x.jpg", lambda p: Image.new("CMYK", (40, 30), (0, 200, 200, 0)).save(p)),
    "16-bit PNG": ("x.png", lambda p: Image.fromarray(np.full((30, 40), 40000, np.uint16)).save(p)),
    "12000x9000 JPEG": ("x.jpg", lambda p: Image.new("RGB", (12000, 9000), "green").save(p, quality=40)),
}

CAPTION_CASES = {
    "image listed but missing on disk": "image,caption\n{ok}\nmissing.jpg,a cat\n",
    "image on disk with no captions": "image,caption\n{ok}\n",
    "empty / whitespace-only caption": "image,caption\n{ok}\nok0.jpg,   \nok1.jpg,\n",
    "duplicate rows": "image,caption\n{ok}\nok0.jpg,caption 0\n",
    "CSV with broken quoting": 'image,caption\n{ok}\nok1.jpg,"never closed, at all\n',
}


def run(cmd, args):
    r = CliRunner().invoke(cmd.main, [str(a) for a in args])
    return r.exit_code, (r.output.strip().splitlines() or [""])[-1]


def stage_prepare(root, captions, fmt="auto"):
    return run(
        prepare,
        [
            "--params",
            root / "params.yaml",
            "--captions",
            captions,
            "--images",
            root / "img",
            "--format",
            fmt,
            "--out",
            root / "ds.json",
            "--report",
            root / "prep.json",
        ],
    )


def case_image(root, name, build):
    keys = good_images(root / "img")
    build(root / "img" / name)
    rows = "\n".join(f"{k},caption {i}" for i, k in enumerate(keys + [name]))
    (root / "c.csv").write_text("image,caption\n" + rows + "\n")
    code, line = stage_prepare(root, root / "c.csv")
    if code:
        return code, line
    code, line = run(
        features,
        [
            "--params",
            root / "params.yaml",
            "--dataset",
            root / "ds.json",
            "--images",
            root / "img",
            "--out",
            root / "f.h5",
            "--report",
            root / "feat.json",
            "--no-progress",
        ],
    )
    if code:
        return code, line
    rep = json.loads((root / "feat.json").read_text())
    skipped = "; ".join(f"{s['image']}: {s['error']}" for s in rep["skipped"]) or "none"
    return code, f"encoded {rep['images']} images, skipped {len(rep['skipped'])} ({skipped})"


def case_captions(root, text):
    keys = good_images(root / "img")
    (root / "img" / "extra.jpg").write_bytes(jpeg())
    ok = "\n".join(f"{k},caption {i}" for i, k in enumerate(keys))
    (root / "c.csv").write_text(text.format(ok=ok))
    code, line = stage_prepare(root, root / "c.csv")
    if code:
        return code, line
    r = json.loads((root / "prep.json").read_text())
    return code, (
        f"{r['images']} images kept; missing {len(r['missing_images'])}, empty captions"
        f" {len(r['empty_captions'])}, duplicates {r['duplicate_captions']}, unlisted image files"
        f" {r['image_files_without_captions']}"
    )


def raw_cases(root):
    """Malformed files of the other layouts, through `prepare`."""
    keys = good_images(root / "img")
    out = {}
    f = root / "bad_utf8.token"
    f.write_bytes(b"ok0.jpg#0\tfine\nok1.jpg#0\tcaf\xe9\n")
    out["caption file with invalid UTF-8"] = stage_prepare(root, f, "flickr_token")
    f = root / "notab.token"
    f.write_text("ok0.jpg#0\tfine\nok1.jpg#0 no tab\n")
    out["token line without a tab"] = stage_prepare(root, f, "flickr_token")
    f = root / "badn.token"
    f.write_text("ok0.jpg#0\tfine\nok1.jpg#zero\tbad suffix\n")
    out["token line with a bad #n suffix"] = stage_prepare(root, f, "flickr_token")
    f = root / "captions_train2014.json"
    f.write_text(json.dumps({"images": [{"id": 1, "file_name": keys[0]}]}))
    out["COCO JSON missing annotations"] = stage_prepare(root, f, "coco")
    f.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": keys[0]}], "annotations": [{"id": 5, "image_id": 7, "caption": "x"}]}
        )
    )
    out["COCO annotation with unknown image id"] = stage_prepare(root, f, "coco")
    f = root / "dataset_flickr8k.json"
    f.write_text(
        json.dumps(
            {"dataset": "flickr8k", "images": [{"filename": keys[0], "split": "training", "sentences": [{"raw": "x"}]}]}
        )
    )
    out["unknown split name (Karpathy)"] = stage_prepare(root, f, "karpathy")
    return out


def all_cases(tmp):
    """{label: (exit code, last output line)} for every bad-input class, built under ``tmp``."""
    results = {}

    def fresh(i):
        root = Path(tmp) / str(i)
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(PARAMS))
        return root

    i = 0
    for label, (name, build) in IMAGE_CASES.items():
        i += 1
        results[label] = case_image(fresh(i), name, build)
    for label, text in CAPTION_CASES.items():
        i += 1
        results[label] = case_captions(fresh(i), text)
    results.update(raw_cases(fresh(i + 1)))
    return results


def main():
    with tempfile.TemporaryDirectory() as tmp:
        results = all_cases(tmp)
    print("| input | exit | what the stage said |\n|---|---|---|")
    for label, (code, line) in results.items():
        line = line.replace(tmp, "$TMP").replace("|", "\\|")
        print(f"| {label} | {code} | {line} |")


if __name__ == "__main__":
    main()
