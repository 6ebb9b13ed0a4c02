"""Caption decoders: one module each, one entry in ``DECODERS`` (the contract is in base.py).

A new decoder is a file here with a ``Decoder`` subclass (registered for Keras loading) and a
line in ``DECODERS``; ``train.decoder`` in params.yaml picks it.
"""

from .base import Decoder
from .gru import GRUDecoder
from .lstm import LSTMDecoder
from .transformer import TransformerDecoder

DECODERS = {"gru": GRUDecoder, "lstm": LSTMDecoder, "transformer": TransformerDecoder}

__all__ = ["DECODERS", "Decoder", "build_decoder"]


def build_decoder(name, **settings) -> Decoder:
    """A new decoder ``name`` with ``settings`` (the keys its ``SETTINGS`` list, plus sizes)."""
    from ..errors import CaptioningError

    if name not in DECODERS:
        raise CaptioningError(f"unknown decoder {name!r} (expected one of {', '.join(DECODERS)})")
    return DECODERS[name](**settings)
