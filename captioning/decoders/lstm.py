"""LSTM decoder: Show and Tell without attention, Show, Attend and Tell with it (recurrent.py)."""

import keras
import tensorflow as tf
from keras import layers

from .recurrent import RecurrentDecoder


@keras.saving.register_keras_serializable(package="captioning")
class LSTMDecoder(RecurrentDecoder):
    N_STATES = 2  # h, c: both initialised from the mean image feature, as in SAT

    def make_cell(self, units):
        return layers.LSTMCell(units, name="lstm")

    def gates(self, gx, gh, states):
        """Keras' LSTMCell: input, forget, candidate, output gates from one summed projection."""
        i, f, c_hat, o = tf.split(gx + gh, 4, axis=-1)
        c = tf.sigmoid(f) * states[1] + tf.sigmoid(i) * tf.tanh(c_hat)
        return (tf.sigmoid(o) * tf.tanh(c), c)
