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

    def gates_cache(self, gx, gh, states):
        """Keras' LSTMCell: input, forget, candidate, output gates from one summed projection."""
        i, f, c_hat, o = tf.split(gx + gh, 4, axis=-1)
        i, f, c_hat, o = tf.sigmoid(i), tf.sigmoid(f), tf.tanh(c_hat), tf.sigmoid(o)
        c = f * states[1] + i * c_hat
        tc = tf.tanh(c)
        return (o * tc, c), (i, f, c_hat, o, tc)

    def gates_grad(self, d_states, states, cache):
        i, f, c_hat, o, tc = cache
        dh, dc = d_states
        dc = dc + dh * o * (1.0 - tc * tc)
        di, df = dc * c_hat * i * (1.0 - i), dc * states[1] * f * (1.0 - f)  # at the gates' inputs
        dg, do = dc * i * (1.0 - c_hat * c_hat), dh * tc * o * (1.0 - o)
        dz = tf.concat([di, df, dg, do], -1)  # the same for the input and the recurrent projection
        return dz, dz, (tf.zeros_like(dh), dc * f)
