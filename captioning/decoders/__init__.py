"""Caption decoders: one module each, one entry in ``DECODERS`` (the contract is in base.py).

A new decoder is a file here with a ``Decoder`` subclass (registered for Keras loading) and a
line in ``DECODERS``; ``train.decoder`` in params.yaml picks it.
"""

from .base import Decoder
from .gru import GRUDecoder
from .lstm import LSTMDecoder
from .transformer import TransformerDecoder
from .updown import UpDownDecoder

DECODERS = {"gru": GRUDecoder, "lstm": LSTMDecoder, "transformer": TransformerDecoder, "updown": UpDownDecoder}

__all__ = ["DECODERS", "PRECISIONS", "Decoder", "build_decoder"]


PRECISIONS = ("float32", "mixed_bfloat16")


def build_decoder(name, precision="float32", **settings) -> Decoder:
    """A new decoder ``name`` with ``settings`` (the keys its ``SETTINGS`` list, plus sizes).

    ``precision`` ``mixed_bfloat16``: float32 weights, products and activations in bfloat16
    (fast on recent GPUs and TPUs; slower than float32 on most CPUs). No float16: it needs loss
    scaling. A saved model is rebuilt in float32 for captioning, from the same weights.
    """
    import keras

    from ..errors import CaptioningError

    if name not in DECODERS:
        raise CaptioningError(f"unknown decoder {name!r} (expected one of {', '.join(DECODERS)})")
    if precision not in PRECISIONS:
        raise CaptioningError(f"unknown precision {precision!r} (expected one of {', '.join(PRECISIONS)})")
    # Keras layers take their dtype policy from the global one when they are made: set it for
    # this model's layers only.
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        return DECODERS[name](**settings)
    finally:
        keras.config.set_dtype_policy(before)
