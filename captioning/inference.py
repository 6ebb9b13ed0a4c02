"""Caption photos with a trained model: :class:`Captioner`, the one home of inference.

    from captioning import Captioner

    captioner = Captioner.load("models_final")      # a model folder or an exported bundle
    for c in captioner.caption(["dog.jpg", open("cat.png", "rb").read()], beam_size=3):
        print(c.text, c.score)

Loading rebuilds the encoder once; each call encodes the images (rounded through the precision
the training features were stored in, so the decoder sees what it was trained on) and decodes
them with the search compiled into one TensorFlow graph (:mod:`captioning.graph_search`). The
caption command, the service, evaluate and the report all caption through it.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from .decode import Decoding, graph_search, steered, word_attention
from .encoder import build_encoder, load_encoder_file, make_forward, preprocess_for
from .errors import CaptioningError
from .files import atomic_path
from .images import ImageError, load_image
from .model_folder import CONFIG_FILE, ENCODER_FILE, MODEL_FILE, VOCAB_FILE, TrainedModel, load_model


@dataclasses.dataclass
class Caption:
    text: str
    score: float  # the search's ranking: log-probability / length**length_penalty
    log_prob: float  # the model's log-probability of the caption (its words and <end>)
    attention: np.ndarray | None = None  # (words, H*W) where the decoder looked for each word, on request
    alternatives: list = dataclasses.field(default_factory=list)  # the next n-best / sampled captions

    @property
    def words(self) -> list[str]:
        return self.text.split()

    def to_json(self) -> dict:
        out = {"caption": self.text, "score": round(self.score, 6), "log_prob": round(self.log_prob, 6)}
        if self.attention is not None:
            out["attention"] = np.round(self.attention, 4).tolist()
        if self.alternatives:
            out["alternatives"] = [a.to_json() for a in self.alternatives]
        return out


class Captioner:
    """A loaded model with its encoder: ``caption(images)`` -> one :class:`Caption` each.

    Images are file paths, the files' bytes or arrays (H, W, 3) in 0..255. ``timings`` holds the
    last call's seconds per phase (decode the files, encode, search).
    """

    def __init__(self, model: TrainedModel):
        self.model = model
        self._forward = make_forward(*self._network(model))  # the encoder, built once
        self._searches = {}  # (beam_size, max_length, length_penalty) -> compiled search
        self.timings = {}

    @classmethod
    def load(cls, path, *more) -> Captioner:
        """A model folder (its encoder rebuilt from settings) or a bundle (its own encoder.keras);
        with ``more`` folders, all of them decoding as one ensemble (the first one's encoder)."""
        if more:
            from .ensemble import load_models

            return cls(load_models([path, *more]))
        return cls(load_model(path))

    @staticmethod
    def _network(model):
        if model.encoder_file:
            return load_encoder_file(model.encoder_file), preprocess_for(model.encoder)
        try:
            return build_encoder(model.encoder)
        except CaptioningError as e:
            raise CaptioningError(
                f"{e} ({model.folder} rebuilds its encoder from settings that name the weights as the pipeline"
                " saw them: run where the pipeline ran, or export a bundle there with `captioning export`)"
            ) from None

    @property
    def image_size(self) -> int:
        return self.model.encoder.image_size

    @property
    def attends(self) -> bool:
        """Whether the decoder has attention maps to show."""
        return bool(self.model.decoder.settings().get("attention", True))

    def read(self, image) -> np.ndarray:
        """One image (path, bytes or array) as the encoder's (S, S, 3) uint8 input; ImageError if bad."""
        return load_image(image, self.image_size, dtype=np.uint8)

    def encode(self, arrays, batch_size=32) -> np.ndarray:
        """(N, L, C) float32 features of (N, S, S, 3) uint8 images, in the stored precision."""
        starts = range(0, len(arrays), batch_size)
        feats = np.concatenate([self._forward(np.asarray(arrays[i : i + batch_size]))[0].numpy() for i in starts])
        return feats.astype(self.model.feature_dtype).astype(np.float32)

    def caption(self, images, attention=False, **decoding) -> list[Caption]:
        """One caption per image (see the class docstring); ``decoding``: :class:`Decoding`'s
        fields. CaptioningError names an unreadable image."""
        t0 = time.perf_counter()
        arrays = []
        for i, image in enumerate(images):
            try:
                arrays.append(self.read(image))
            except ImageError as e:
                name = image if isinstance(image, str) or hasattr(image, "__fspath__") else f"image {i}"
                raise CaptioningError(f"{name}: {e}") from None
        t1 = time.perf_counter()
        feats = self.encode(np.stack(arrays)) if arrays else None
        t2 = time.perf_counter()
        out = self.caption_features(feats, Decoding(**decoding), attention) if arrays else []
        self.timings = {"read": t1 - t0, "encode": t2 - t1, "search": time.perf_counter() - t2}
        return out

    def caption_features(self, features, decoding: Decoding = Decoding(), attention=False) -> list[Caption]:
        """Captions of (N, L, C) features: the whole search in one compiled call, or, steered or
        sampled, the host-driven search of :mod:`captioning.steer`."""
        if attention and not self.attends:
            raise CaptioningError(f"{self.model.folder}: this decoder does not attend: no maps to show")
        features = np.asarray(features, np.float32)
        self.model.decoder.check_max_length(decoding.max_length, "max_length")
        if decoding.steered:
            found = steered(self.model.decoder, self.model.vocab, features, decoding)
        else:
            d = decoding
            seqs, scores, raw = self.search(d.beam_size, d.max_length, d.length_penalty)(features)
            found = [[(s, n, r)] for s, n, r in zip(seqs, scores, raw)]
        vocab = self.model.vocab
        texts = [vocab.decode(hyps[0][0]) if hyps else "" for hyps in found]
        maps = word_attention(self.model.decoder, vocab, features, texts) if attention else None
        return [
            Caption(
                texts[i],
                *(hyps[0][1:] if hyps else (float("-inf"), float("-inf"))),
                attention=None if maps is None else maps[i][1],
                alternatives=[Caption(vocab.decode(s), n, r) for s, n, r in hyps[1:]],
            )
            for i, hyps in enumerate(found)
        ]

    def search(self, beam_size, max_length, length_penalty=0.0):
        """The compiled search for these settings (built once, then reused)."""
        key = (int(beam_size), int(max_length), float(length_penalty))
        if key not in self._searches:
            self._searches[key] = graph_search(self.model.decoder, self.model.vocab, *key)
        return self._searches[key]


def export_bundle(model_dir, out) -> Path:
    """Write the bundle of ``model_dir`` to ``out`` (atomically): its files plus ``encoder.keras``,
    the encoder rebuilt from the model's settings (its weights file is read once, here)."""
    model = load_model(model_dir)
    if model.encoder_file:  # a bundle re-exports its own encoder
        network = load_encoder_file(model.encoder_file)
    else:
        network = build_encoder(model.encoder)[0]
    with atomic_path(out) as tmp:
        tmp.mkdir()
        for name in (MODEL_FILE, CONFIG_FILE, VOCAB_FILE):
            shutil.copy2(Path(model_dir) / name, tmp / name)
        network.save(tmp / ENCODER_FILE)
    return Path(out)
