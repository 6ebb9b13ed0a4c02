"""GRU decoder: the default (see recurrent.py for the attention and the deep output)."""

import keras
from keras import layers

from .recurrent import RecurrentDecoder


@keras.saving.register_keras_serializable(package="captioning")
class GRUDecoder(RecurrentDecoder):
    N_STATES = 1  # h

    def make_cell(self, units):
        return layers.GRUCell(units, name="gru")
