"""A trained model is one folder: decoder weights, its config and its vocabulary. Saved and loaded here.

``models/`` (written by the train stage, atomically, as one DVC output):

- ``captioner.keras``: the decoder (Keras format, loaded in safe mode: no arbitrary code);
- ``config.json``: decoder name and settings, the encoder that made its features, the feature
  precision, the best epoch;
- ``vocab.json``: the vocabulary it was trained with.

A model folder names its encoder by settings (backbone, weights file, layer), so it captions
new photos only where those weights are. A **bundle** (:func:`captioning.inference.export_bundle`)
is the same folder plus ``encoder.keras``, the CNN itself (architecture and weights, Keras format), so it captions
anywhere: no network, no params.yaml, no dataset, any working directory. Both load through
:func:`load_model`; :class:`captioning.inference.Captioner` captions with either.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .errors import CaptioningError
from .feature_store import EncoderSpec
from .files import read_json, write_json
from .vocab import Vocabulary

MODEL_FILE, CONFIG_FILE, VOCAB_FILE, ENCODER_FILE = "captioner.keras", "config.json", "vocab.json", "encoder.keras"


@dataclasses.dataclass
class TrainedModel:
    decoder: object  # a captioning.decoders.Decoder
    vocab: Vocabulary
    encoder: EncoderSpec  # the CNN whose features it reads
    feature_dtype: str  # the precision its features were stored in
    config: dict
    folder: Path  # where it was loaded from

    @property
    def encoder_file(self) -> Path | None:
        """The bundled encoder (``encoder.keras``), or None for a plain model folder."""
        path = self.folder / ENCODER_FILE
        return path if path.is_file() else None


def save_model(folder, decoder, name, vocab, config: dict):
    """Write ``folder`` (see the module docstring); the caller makes it atomic."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    decoder.save(folder / MODEL_FILE)
    write_json(folder / CONFIG_FILE, {"decoder": name, "model": decoder.settings(), **config})
    write_json(folder / VOCAB_FILE, vocab.to_json())


def load_model(folder) -> TrainedModel:
    """Load a model folder or bundle, checking its parts belong together."""
    import keras

    from . import decoders  # noqa: F401  (registers the decoder classes for safe loading)

    folder = Path(folder)
    if not folder.is_dir():
        raise CaptioningError(f"{folder}: no such model folder (run `dvc repro`, or pass a bundle folder)")
    for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
        if not (folder / name).is_file():
            raise CaptioningError(
                f"{folder / name}: not found (a model folder holds {MODEL_FILE}, {CONFIG_FILE},"
                f" {VOCAB_FILE}; run `dvc repro` first)"
            )
    config = read_json(folder / CONFIG_FILE)
    vocab = Vocabulary.from_json(read_json(folder / VOCAB_FILE))
    try:
        decoder = keras.saving.load_model(folder / MODEL_FILE, safe_mode=True, compile=False)
    except (ValueError, OSError, TypeError) as e:
        raise CaptioningError(f"{folder / MODEL_FILE}: not a decoder this version can load ({e})") from None
    if len(vocab) != decoder.vocab_size:
        raise CaptioningError(
            f"{folder / VOCAB_FILE}: {len(vocab)} words, but the decoder was trained with {decoder.vocab_size}"
        )
    spec = EncoderSpec.from_attrs(config["encoder"])
    return TrainedModel(decoder, vocab, spec, config.get("feature_dtype", "float32"), config, folder)
