"""Image captioning core: datasets, CNN features, vocabulary, decoders, search, inference, metrics.

The stages in ``stages/`` are thin click scripts around this package; the other commands
(``captioning caption | export | download | serve``) are in :mod:`captioning.commands`. Nothing
here reads ``params.yaml`` or keeps module-level state: every function takes what it needs as
arguments. ``from captioning import Captioner`` captions photos from Python.
"""

__version__ = "0.1.0"
__all__ = ["Caption", "Captioner"]


def __getattr__(name):
    # Lazy, so that `import captioning` (every stage does) neither starts TensorFlow nor loads the
    # encoder code: a stage depends only on the modules it imports (dvc.yaml, test_stage_deps).
    if name in __all__:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.inference"), name)
    raise AttributeError(f"module 'captioning' has no attribute {name!r}")
