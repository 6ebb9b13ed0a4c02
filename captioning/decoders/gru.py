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

    def gates_cache(self, gx, gh, states):
        """Keras' GRUCell (reset_after=True): z, r from input + recurrent; r scales the recurrent candidate."""
        xz, xr, xh = tf.split(gx, 3, axis=-1)
        hz, hr, hh = tf.split(gh, 3, axis=-1)
        z, r = tf.sigmoid(xz + hz), tf.sigmoid(xr + hr)
        n = tf.tanh(xh + r * hh)  # (B, U) the candidate
        return (z * states[0] + (1.0 - z) * n,), (z, r, n, hh)

    def gates_grad(self, d_states, states, cache):
        z, r, n, hh = cache
        (dh,) = d_states
        dz = dh * (states[0] - n) * z * (1.0 - z)  # at the sigmoid's input
        dn = dh * (1.0 - z) * (1.0 - n * n)  # at the tanh's input
        dr = dn * hh * r * (1.0 - r)
        return tf.concat([dz, dr, dn], -1), tf.concat([dz, dr, dn * r], -1), (dh * z,)
