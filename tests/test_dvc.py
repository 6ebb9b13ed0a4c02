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


@pytest.fixture
def project(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("captioning", "stages"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo)
    (repo / "params.yaml").write_text(yaml.safe_dump(TINY_PARAMS, sort_keys=False))
    git_init(repo)
    dvc("init", "-q", cwd=repo)
    shutil.copy(ROOT / ".dvcignore", repo)
    dvc("config", "core.analytics", "false", cwd=repo)
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "commit", "-qm", "project"], cwd=repo, check=True)  # dvclive needs a commit
    return repo


def test_repro_then_nothing_to_do_then_identical_forced_rerun(project):
    out = dvc("repro", cwd=project)
    for stage in ("generate", "prepare", "features", "vocab", "train", "evaluate"):
        assert f"Running stage '{stage}'" in out
    metrics = (project / "reports/metrics.json").read_bytes()
    predictions = (project / "reports/predictions.json").read_bytes()
    assert set(json.loads(metrics)) >= {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "content_accuracy"}

    again = dvc("repro", cwd=project)
    assert "Running stage" not in again and "up to date" in again

    shown = dvc("metrics", "show", cwd=project)
    assert "CIDEr" in shown and "content_accuracy" in shown

    dvc("repro", "--force", cwd=project)
    assert (project / "reports/metrics.json").read_bytes() == metrics
    assert (project / "reports/predictions.json").read_bytes() == predictions
