"""dvc.yaml lists, for each stage, exactly the package modules its script imports (walked with
ast, nothing executed), and the params sections it reads; params.yaml holds every setting."""

import ast
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

PACKAGE = "captioning"


def module_file(name: str) -> Path:
    """captioning.x.y -> captioning/x/y.py or captioning/x/y/__init__.py (relative to ROOT)."""
    path = Path(*name.split("."))
    return path / "__init__.py" if (ROOT / path).is_dir() else path.with_suffix(".py")


def imports_of(path: Path, module: str) -> set:
    """Package modules ``path`` imports anywhere (top level or inside functions)."""
    found = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y / from . import x / from ..x import y
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                # "from captioning import config" names a module; "from x import func" does not
                while name != PACKAGE and not (ROOT / module_file(name)).exists():
                    name = name.rpartition(".")[0]
                found.add(name)
    return found


def closure(script: Path) -> set:
    """Every package file a stage script loads: its imports, theirs, and the packages around them."""
    todo, seen = list(imports_of(script, "stages")), set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            mod = ".".join(parts[:i])
            if mod not in seen:
                seen.add(mod)
                todo.extend(imports_of(ROOT / module_file(mod), mod))
    return {str(module_file(m)) for m in seen}


DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
STAGES = sorted(DVC)


@pytest.mark.parametrize("stage", STAGES)
def test_stage_deps_are_exactly_the_modules_it_imports(stage):
    deps = DVC[stage]["deps"]
    script = f"stages/{stage}.py"
    assert script in deps and script in DVC[stage]["cmd"]
    listed = {d for d in deps if d.startswith(PACKAGE + "/")}
    needed = closure(ROOT / script)
    assert listed == needed, f"missing {sorted(needed - listed)}, not imported {sorted(listed - needed)}"


def test_editing_a_decoder_reruns_only_the_stages_that_use_a_model():
    users = {s for s in STAGES if "captioning/decoders/gru.py" in DVC[s]["deps"]}
    assert users == {"train", "finetune", "evaluate", "report"}  # never generate, prepare, features or vocab
    assert "captioning/encoder.py" not in DVC["train"]["deps"] + DVC["evaluate"]["deps"]


@pytest.mark.parametrize("stage", [s for s in STAGES if (ROOT / "stages" / f"{s}.py").is_file()])
def test_params_yaml_holds_every_setting_the_stage_reads(stage):
    module = importlib.import_module(f"stages.{stage}")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    if hasattr(module, "Params"):
        fields = {f.name for f in dataclasses.fields(module.Params)}
        section = getattr(module, "SECTION", stage)  # merge_features reads features.shards
        if section == stage:
            assert set(params[stage]) == fields  # nothing missing, nothing left over
            assert stage in DVC[stage]["params"]
        else:
            assert fields <= set(params[section])
            assert {f"{section}.{k}" for k in fields} <= set(DVC[stage]["params"])
        uses_seed = 'params["seed"]' in (ROOT / "stages" / f"{stage}.py").read_text()
        assert ("seed" in DVC[stage]["params"]) is uses_seed
