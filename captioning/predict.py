"""A trained model is one folder: decoder weights, its config and its vocabulary. Load it here.

``models/`` (written by the train stage, atomically, as one DVC output):

- ``captioner.keras``: the decoder (Keras format, loaded in safe mode: no arbitrary code);
- ``config.json``: decoder name and settings, the encoder that made its features, the feature
  precision, the best epoch;
- ``vocab.json``: the vocabulary it was trained with.

Evaluate, the caption command and the tests all load a model through :func:`load_model`, and
caption with :func:`captioning.decode.caption_features` (kept apart, so that training, which
only saves a model, does not depend on the search code).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import CaptioningError
from .feature_store import EncoderSpec
from .files import read_json
from .vocab import Vocabulary

MODEL_FILE, CONFIG_FILE, VOCAB_FILE = "captioner.keras", "config.json", "vocab.json"


@dataclasses.dataclass
class TrainedModel:
    decoder: object  # a captioning.decoders.Decoder
    vocab: Vocabulary
    encoder: EncoderSpec  # the CNN whose features it reads
    feature_dtype: str  # the precision its features were stored in
    config: dict


def save_model(folder, decoder, name, vocab, config: dict):
    """Write ``folder`` (see the module docstring); the caller makes it atomic."""
    from .files import write_json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    decoder.save(folder / MODEL_FILE)
    write_json(folder / CONFIG_FILE, {"decoder": name, "model": decoder.settings(), **config})
    write_json(folder / VOCAB_FILE, vocab.to_json())


def load_model(folder) -> TrainedModel:
    """Load a model folder, checking its parts belong together."""
    import keras

    from . import decoders  # noqa: F401  (registers the decoder classes for safe loading)

    folder = Path(folder)
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not (folder / name).is_file():
            raise CaptioningError(
                f"{folder / name}: not found (a model folder holds {MODEL_FILE}, {CONFIG_FILE},"
                f" {VOCAB_FILE}; run `dvc repro` first)"
            )
    config = read_json(folder / CONFIG_FILE)
    vocab = Vocabulary.from_json(read_json(folder / VOCAB_FILE))
    decoder = keras.saving.load_model(folder / MODEL_FILE, safe_mode=True, compile=False)
    if len(vocab) != decoder.vocab_size:
        raise CaptioningError(
            f"{folder / VOCAB_FILE}: {len(vocab)} words, but the decoder was trained with {decoder.vocab_size}"
        )
    return TrainedModel(
        decoder, vocab, EncoderSpec.from_attrs(config["encoder"]), config.get("feature_dtype", "float32"), config
    )
