"""Image captioning core: datasets, CNN features, vocabulary, GRU+attention decoder, decoding, metrics.

The stages in ``stages/`` are thin click scripts around this package. Nothing here reads
``params.yaml`` or keeps module-level state: every function takes what it needs as arguments.
"""

__version__ = "0.1.0"
