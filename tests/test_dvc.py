"""The real DVC pipeline in a throwaway git repo: repro, no-op rerun, and byte-identical reruns."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, TINY_PARAMS, git_init


def dvc(*args, cwd):
    exe = Path(sys.executable).with_name("dvc")
    # The stages import the project's own copy of the package (not the installed checkout) and
    # write its __pycache__ as on a user's machine; some CI images turn byte-code off, which
    # would hide a package hash that changes under the pipeline's feet.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = str(cwd)
    r = subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def make_project(repo, params):
    repo.mkdir(exist_ok=True)
    for name in ("captioning", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_init(repo)
    dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvcignore", repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=repo, check=True)  # dvclive needs a commit
    return repo


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "repo", TINY_PARAMS)


def test_editing_a_split_list_reruns_prepare(tmp_path):
    """Flickr8k's layout: captions.txt, Images/ and the split lists in one folder."""
    from PIL import Image

    raw = tmp_path / "repo" / "raw"
    (raw / "Images").mkdir(parents=True)
    names = [f"im{i}.jpg" for i in range(4)]
    for n in names:
        Image.new("RGB", (8, 8)).save(raw / "Images" / n)
    (raw / "captions.txt").write_text("image,caption\n" + "".join(f"{n},a photo\n" for n in names))
    (raw / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:3]) + "\n")
    (raw / "Flickr_8k.devImages.txt").write_text(names[3] + "\n")
    params = {
        **TINY_PARAMS,
        "dataset": {"captions": "raw/captions.txt", "images": "raw/Images", "splits": "raw", "format": "flickr_csv"},
    }
    repo = make_project(tmp_path / "repo", params)
    dvc("repro", "prepare", cwd=repo)
    assert "up to date" in dvc("status", "prepare", cwd=repo)
    (raw / "Flickr_8k.devImages.txt").write_text(names[2] + "\n" + names[3] + "\n")
    (raw / "Flickr_8k.trainImages.txt").write_text("\n".join(names[:2]) + "\n")
    status = dvc("status", "prepare", cwd=repo)
    assert "changed deps" in status and "raw" in status
    dvc("repro", "prepare", cwd=repo)
    splits = [r["split"] for r in json.loads((repo / "data/prepared/dataset.json").read_text())["images"]]
    assert splits == ["train", "train", "val", "val"]


def test_repro_then_nothing_to_do_then_identical_forced_rerun(project):
    out = dvc("repro", cwd=project)
    stages = ("generate", "prepare", "features@0", "merge_features", "vocab", "train", "finetune", "evaluate", "report")
    for stage in stages:
        assert f"Running stage '{stage}'" in out
    metrics = (project / "reports/metrics.json").read_bytes()
    predictions = (project / "reports/predictions.json").read_bytes()
    assert set(json.loads(metrics)) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "object_accuracy", "layout_accuracy"}

    again = dvc("repro", cwd=project)
    assert "Running stage" not in again and "up to date" in again

    shown = dvc("metrics", "show", cwd=project)
    assert "CIDEr" in shown and "layout_accuracy" in shown

    dvc("repro", "--force", cwd=project)
    assert (project / "reports/metrics.json").read_bytes() == metrics
    assert (project / "reports/predictions.json").read_bytes() == predictions
