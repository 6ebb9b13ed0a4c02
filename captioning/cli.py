"""Glue the stages share: user errors become one-line click errors; seeding; quiet TF logs."""

from __future__ import annotations

import functools
import os


def user_errors(fn):
    """Turn :class:`CaptioningError` into a clean ``Error: ...`` line and exit status 1."""
    import click

    from .errors import CaptioningError

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except CaptioningError as e:
            raise click.ClickException(str(e)) from None

    return wrapper


def quiet_tensorflow():
    """Hide TF's C++ info banners (set before TensorFlow is first imported)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def seed_everything(seed: int, deterministic=True):
    """Seed Python, NumPy and TF, and make TF ops deterministic: same params, same results."""
    quiet_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
