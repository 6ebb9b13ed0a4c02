"""Typed, validated configuration sections.

Each stage reads its sections of the params file into dataclasses that hold types and bounds
only: params.yaml is the one home of every default, so a key missing there is an error naming
it, as are an unknown key, a wrong type or an out-of-range value
(``train.units: expected an integer, got 'abc'``). Validation happens once, when the stage
starts, from one parse of the file. The package itself never opens params.yaml; stages call
:func:`load_params`.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import yaml

from .errors import CaptioningError


def field(*, lo=None, hi=None, choices=None):
    """A required dataclass field with validation metadata (inclusive ``lo``/``hi`` bounds)."""
    return dataclasses.field(metadata={"lo": lo, "hi": hi, "choices": choices})


def _check(name, value, tp, meta):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        tp = next(a for a in args if a is not type(None))
    if tp is bool:
        if not isinstance(value, bool):
            raise CaptioningError(f"{name}: expected true or false, got {value!r}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise CaptioningError(f"{name}: expected an integer, got {value!r}")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CaptioningError(f"{name}: expected a number, got {value!r}")
        value = float(value)
    elif tp is str:
        if not isinstance(value, str):
            raise CaptioningError(f"{name}: expected a string, got {value!r}")
    elif typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise CaptioningError(f"{name}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        value = [_check(f"{name}[{i}]", v, inner, {}) for i, v in enumerate(value)]
    lo, hi, choices = meta.get("lo"), meta.get("hi"), meta.get("choices")
    if lo is not None and value < lo:
        raise CaptioningError(f"{name}: must be >= {lo}, got {value!r}")
    if hi is not None and value > hi:
        raise CaptioningError(f"{name}: must be <= {hi}, got {value!r}")
    if choices is not None and value not in choices:
        raise CaptioningError(f"{name}: must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def from_dict(cls, data, section: str, partial=False):
    """Build dataclass ``cls`` from ``data``, validating every key. ``section`` prefixes messages.

    ``partial``: ``cls`` declares only some of the section's keys (another stage owns the rest):
    the others are left alone instead of being unknown settings."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise CaptioningError(f"{section}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if partial:
        data = {k: v for k, v in data.items() if k in fields}
    elif unknown:
        raise CaptioningError(f"{section}.{unknown[0]}: unknown setting (known: {', '.join(sorted(fields))})")
    missing = [k for k in fields if k not in data]
    if missing:
        raise CaptioningError(f"{section}.{missing[0]}: missing (params.yaml holds every setting)")
    hints = typing.get_type_hints(cls)
    values = {k: _check(f"{section}.{k}", v, hints[k], fields[k].metadata) for k, v in data.items()}
    obj = cls(**values)
    check = getattr(obj, "validate", None)
    if check:
        check(section)
    return obj


def load_section(path, section: str, cls, **overrides):
    """One section of the params file ``path`` as ``cls``, with ``overrides`` (benchmarks and tests
    that start from the defaults and change a few)."""
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    return from_dict(cls, {**(data.get(section) or {}), **overrides}, section)


def load_params(path, sections: dict, partial=()):
    """Read ``path`` (YAML) once and return ``{section: dataclass, ..., "seed": int}``.

    ``sections`` maps a section name to its dataclass; the shared top-level ``seed`` always
    comes along. Sections named in ``partial`` are read only for the dataclass's keys.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CaptioningError(f"{path}: params file not found") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise CaptioningError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise CaptioningError(f"{path}: expected a mapping of sections at the top level")
    if "seed" not in data:
        raise CaptioningError(f"{path}: seed: missing (the shared seed of every stage)")
    out = {name: from_dict(cls, data.get(name), name, name in partial) for name, cls in sections.items()}
    out["seed"] = _check("seed", data["seed"], int, {"lo": 0})
    return out
