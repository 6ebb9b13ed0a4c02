"""LSTM decoder: Show and Tell without attention, Show, Attend and Tell with it (recurrent.py)."""

import keras
from keras import layers

from .recurrent import RecurrentDecoder


@keras.saving.register_keras_serializable(package="captioning")
class LSTMDecoder(RecurrentDecoder):
    N_STATES = 2  # h, c: both initialised from the mean image feature, as in SAT

    def make_cell(self, units):
        return layers.LSTMCell(units, name="lstm")
