"""GRU decoder: the default (see recurrent.py for the attention and the deep output)."""

import keras
import tensorflow as tf
from keras import layers

from .recurrent import RecurrentDecoder


@keras.saving.register_keras_serializable(package="captioning")
class GRUDecoder(RecurrentDecoder):
    N_STATES = 1  # h

    def make_cell(self, units):
        return layers.GRUCell(units, name="gru")

    def input_bias(self):
        return self.cell.bias[0]  # reset_after: separate input and recurrent biases

    def recurrent_bias(self):
        return self.cell.bias[1]

    def gates(self, gx, gh, states):
        """Keras' GRUCell (reset_after=True): z, r from input + recurrent; r scales the recurrent candidate."""
        xz, xr, xh = tf.split(gx, 3, axis=-1)
        hz, hr, hh = tf.split(gh, 3, axis=-1)
        z, r = tf.sigmoid(xz + hz), tf.sigmoid(xr + hr)
        h = states[0]
        return (z * h + (1.0 - z) * tf.tanh(xh + r * hh),)
