"""A training run's lifecycle, shared by cross-entropy training and SCST: the identity of its
path (fingerprint), the checkpoint written after every epoch, resuming from it, early stopping
and the end.

A checkpoint (written atomically: a temporary folder swapped in) holds the current and best
weights, the optimizer's variables and the loop state (``state.json``: epoch, step, history,
the best so far, epochs without improvement). A run resumes only from a checkpoint with its own
fingerprint that is not complete, so a changed setting or dataset starts afresh and a finished
run is never extended by accident.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from .feature_store import feature_identity
from .files import atomic_path

NOT_ON_THE_PATH = ("epochs", "patience")  # settings that only say when to stop: resumable with others


def fingerprint(model, settings: dict, arrays=(), features=(), extra=()) -> str:
    """Identity of a training path: the model's class and settings, ``settings`` (those that
    change the path), ``arrays`` by their bytes, ``features`` by identity (the features file's
    stored hash and the rows used: never every byte) and ``extra`` JSON-able values."""
    h = hashlib.blake2b(digest_size=16)
    path = {k: v for k, v in settings.items() if k not in NOT_ON_THE_PATH}
    h.update(json.dumps([type(model).__name__, model.settings(), path], sort_keys=True).encode())
    if model.dtype_policy.name != "float32":  # mixed precision takes another path
        h.update(model.dtype_policy.name.encode())
    for f in features:
        h.update(feature_identity(f).encode())
    for arr in arrays:
        h.update(str(arr.shape).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    for value in extra:
        h.update(json.dumps(value, default=int).encode())
    return h.hexdigest()


def fresh_state(fingerprint: str, **extra) -> dict:
    """The state of a run before its first epoch (``extra``: the run's own keys, its best so far)."""
    return {
        "fingerprint": fingerprint,
        "epoch": 0,
        "step": 0,
        "best_epoch": 0,
        "bad_epochs": 0,
        "history": [],
        "complete": False,
        **extra,
    }


def running(state, settings) -> bool:
    """Whether another epoch is due: epochs left and patience not spent."""
    return state["epoch"] < settings.epochs and state["bad_epochs"] < settings.patience


def save_checkpoint(path, model, optimizer, state, best_weights):
    """Write the whole checkpoint to a temporary folder, then swap it in."""
    with atomic_path(path) as tmp:
        tmp.mkdir()
        model.save_weights(tmp / "last.weights.h5")
        with h5py.File(tmp / "best.weights.h5", "w") as f:
            for i, w in enumerate(best_weights):
                f[f"w{i:04d}"] = w
        with h5py.File(tmp / "optimizer.h5", "w") as f:
            for i, v in enumerate(optimizer.variables):
                f[f"v{i:04d}"] = np.asarray(v)
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))


def load_checkpoint(path, model, optimizer, fingerprint):
    """Restore model/optimizer/state from ``path`` when it matches ``fingerprint``; else None."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if not path.is_dir() and old.is_dir():  # killed mid-swap: the previous checkpoint is intact
        path = old
    state_file = path / "state.json"
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return None
    if state.get("fingerprint") != fingerprint or state.get("complete"):
        return None
    model.load_weights(path / "last.weights.h5")
    with h5py.File(path / "optimizer.h5", "r") as f:
        for i, v in enumerate(optimizer.variables):
            v.assign(f[f"v{i:04d}"][()])  # [()] reads scalars (the step counter) too
    with h5py.File(path / "best.weights.h5", "r") as f:
        best = [f[k][()] for k in sorted(f)]
    return state, best


def begin_or_resume(checkpoint_dir, model, optimizer, fingerprint, fresh, on_epoch, log):
    """``(state, best weights)`` from a checkpoint matching ``fingerprint``, its history replayed to
    ``on_epoch`` so loggers see every epoch; else ``fresh()`` and the model's current weights."""
    restored = load_checkpoint(checkpoint_dir, model, optimizer, fingerprint)
    if not restored:
        return fresh(), [np.asarray(w) for w in model.weights]
    state, best_weights = restored
    log(f"resuming from {checkpoint_dir} after epoch {state['epoch']}")
    for m in state["history"]:
        if on_epoch:
            on_epoch(m["epoch"], m)
    return state, best_weights


def end_epoch(state, metrics, improved, best, model, optimizer, best_weights, checkpoint_dir, on_epoch):
    """Record a finished epoch: its history row, the best so far (``best``: the state keys to set
    when it ``improved``) or one more epoch of patience spent, an atomic checkpoint, the callback.
    Returns the best weights."""
    state["history"].append(metrics)
    state["epoch"] = metrics["epoch"]
    if improved:
        state.update(best, best_epoch=metrics["epoch"], bad_epochs=0)
        best_weights = [np.asarray(w) for w in model.weights]
    else:
        state["bad_epochs"] += 1
    if checkpoint_dir is not None:  # None: not the chief worker, which alone writes
        save_checkpoint(checkpoint_dir, model, optimizer, state, best_weights)
    if on_epoch:
        on_epoch(metrics["epoch"], metrics)
    return best_weights


def finish(checkpoint_dir, model, optimizer, state, best_weights):
    """Leave the best weights in ``model`` and mark the checkpoint complete (it is not resumed)."""
    for var, w in zip(model.weights, best_weights):
        var.assign(w)
    state["complete"] = True
    if checkpoint_dir is not None:
        save_checkpoint(checkpoint_dir, model, optimizer, state, best_weights)
    return state
