"""Recurrent decoders with optional soft attention (Show, Attend and Tell). GRU and LSTM subclass it.

Shapes: B batch, L feature locations (h*w), C feature channels, T caption steps, V vocab.

With ``attention=True`` each step attends over the L locations (Bahdanau additive scoring,
query = previous hidden state), gates the context (SAT's beta) and feeds it with the word
embedding into the cell. A learned embedding per location is added to the features first, so
attention can select by place as well as by content. With ``attention=False`` it is the plain
"image as initial state" decoder (Show and Tell): the pooled image initialises the cell and the
words alone drive it. Logits come from a deep output layer over the hidden state, the context
and the previous word.
"""

from __future__ import annotations

import tensorflow as tf
from keras import layers

from .base import Decoder, coverage_term, dropout, dropout_seeds
from .bptt import Packing, recurrent_scan


class RecurrentDecoder(Decoder):
    """Subclasses set ``make_cell(units)`` and ``N_STATES`` (1 for a GRU, 2 for an LSTM)."""

    SETTINGS = ("embed_dim", "units", "attention", "attention_units", "dropout")
    N_STATES = 1
    STATIC_STATE = (-2, -1)  # feats and keys: the image, the same at every step

    def __init__(
        self,
        vocab_size,
        feature_dim,
        num_locations,
        embed_dim=256,
        units=512,
        attention=True,
        attention_units=256,
        dropout=0.3,
        blind=False,
        **kwargs,
    ):
        super().__init__(vocab_size, feature_dim, num_locations, blind=blind, **kwargs)
        self.embed_dim, self.units, self.attention = embed_dim, units, attention
        self.attention_units, self.dropout = attention_units, dropout
        # The first state is the hidden state; an LSTM's cell state gets its own initialiser.
        self.init_states = [
            layers.Dense(units, activation="tanh", name=n) for n in ("init_h", "init_c")[: self.N_STATES]
        ]
        self.embed = layers.Embedding(vocab_size, embed_dim, name="embed")
        self.cell = self.make_cell(units)
        if attention:
            # Conv features say *what* is at a location but hardly *where* it is; a learned
            # embedding per location lets attention pick "the left one" and lets the context
            # carry layout ("above" vs "left of").
            self.feat_pos = layers.Embedding(num_locations, feature_dim, name="feat_pos")
            self.att_keys = layers.Dense(attention_units, name="att_keys")
            self.att_query = layers.Dense(attention_units, use_bias=False, name="att_query")
            self.att_score = layers.Dense(1, name="att_score")
            self.att_gate = layers.Dense(1, activation="sigmoid", name="att_gate")
        self.out_hidden = layers.Dense(embed_dim, name="out_hidden")
        self.out_logits = layers.Dense(vocab_size, name="out_logits")

    def make_cell(self, units):
        raise NotImplementedError

    def gates_cache(self, gx, gh, states):
        """The cell's update from its summed input projection ``gx`` (N, G) (input bias
        included) and recurrent projection ``gh`` (N, G): ``(new states tuple, cache)``, the
        cache being what :meth:`gates_grad` needs (a tuple of tensors)."""
        raise NotImplementedError

    def gates_grad(self, d_states, states, cache):
        """The backward pass of :meth:`gates_cache`: the gradients at the new states (a tuple)
        -> ``(d gx, d gh, d states)`` (the last without the path through ``gh``)."""
        raise NotImplementedError

    def gates(self, gx, gh, states):
        return self.gates_cache(gx, gh, states)[0]

    def recurrent_bias(self):
        """Bias added to ``h @ recurrent_kernel`` (a GRU's reset-after bias), or None."""
        return None

    def input_bias(self):
        return self.cell.bias

    # ---- pieces shared by training and decoding -------------------------------------------
    def initial_state(self, features):
        """features (B, L, C) -> (h0, [c0,] feats (B, L, C), keys (B, L, A) or a (B, L, 1) dummy)."""
        f = self.normalised_features(features)  # (B, L, C)
        pooled = tf.reduce_mean(f, axis=1)  # (B, C)
        states = tuple(init(pooled) for init in self.init_states)  # (B, U) each
        if self.attention:
            f = f + self.feat_pos(tf.range(self.num_locations))[None]  # (B, L, C)
        keys = self.att_keys(f) if self.attention else tf.zeros_like(f[:, :, :1])  # (B, L, A)
        return (*states, f, keys)

    def _fused(self):
        """The per-step weights, fused so each time step runs few, larger matrix products.

        Everything a step computes from the previous hidden state h (the cell's recurrent
        projection, the attention query, the attention gate) is one ``h @ W_h``; the cell's
        input projection splits into a word part (applied to every step at once, outside the
        time loop) and a context part. The Keras layers keep owning the weights, so checkpoints
        and saved models are unchanged; only the order of float additions differs.
        """
        if not self.cell.built:  # the cell's input: the word embedding [+ the context]
            self.cell.build((None, self.embed_dim + (self.feature_dim if self.attention else 0)))
        kernel, w_h = self.cell.kernel, [self.cell.recurrent_kernel]  # (E [+ C], G), (U, G)
        # tf.split, not slicing: its gradient is one concat; two slices' are two zero-padded
        # kernel-sized copies and their sum.
        k_word, k_ctx = tf.split(kernel, [self.embed_dim, kernel.shape[0] - self.embed_dim], axis=0)
        if self.attention:
            for layer in (self.att_query, self.att_gate):
                if not layer.built:
                    layer.build((None, self.units))
            if not self.att_score.built:
                self.att_score.build((None, self.attention_units))
            w_h += [self.att_query.kernel, self.att_gate.kernel]  # (U, A), (U, 1)
        w = {
            "w_h": tf.concat(w_h, axis=1),  # (U, G [+ A + 1])
            "k_word": k_word,  # (E, G)
            "k_ctx": k_ctx,  # (C, G) or (0, G)
            "b_in": self.input_bias(),  # (G,)
            "b_rec": self.recurrent_bias(),  # (G,) or None
        }
        if self.attention:
            w.update(k_score=self.att_score.kernel, b_score=self.att_score.bias, b_gate=self.att_gate.bias)
        # Mixed precision (train.precision): float32 weights, products in the compute dtype.
        return {k: None if v is None else tf.cast(v, self.compute_dtype) for k, v in w.items()}

    def _recur(self, gx_word, states, f, keys, w, keep=False):
        """One step: gx_word (N, G) (the word's input projection) -> states', ctx (N, C or 0), alpha (N, L).

        ``f`` (B, L, C) and ``keys`` (B, L, A) hold one row per image, N = B * R: rows
        ``b * R ... b * R + R - 1`` look at image b (beam search's beams; R = 1 in training).
        ``keep``: also return what the hand-written backward pass (bptt.py) needs: the
        attention's (gate (N, 1), tanh (N, L, A), ungated context (N, C)) and the cell's cache.
        """
        hw = tf.matmul(states[0], w["w_h"])  # (N, G [+ A + 1]): all that reads h, in one product
        g = w["k_word"].shape[-1]
        # tf.split, not slicing: its gradient is one concat, a slice's is a zero-padded copy per piece
        parts = tf.split(hw, [g, self.attention_units, 1], axis=1) if self.attention else [hw]
        gh = parts[0] if w["b_rec"] is None else parts[0] + w["b_rec"]
        L, A = self.num_locations, self.attention_units
        if self.attention:
            images = tf.shape(keys)[0]
            q = tf.reshape(parts[1], [images, -1, 1, A])  # (B, R, 1, A) the attention query
            gate = tf.sigmoid(parts[2] + w["b_gate"])  # (N, 1) SAT's beta
            # Each image's keys are read once for its R rows, not copied per row.
            x = tf.reshape(tf.tanh(keys[:, None] + q), [-1, L, A])  # (N, L, A)
            # Dense's product, written as one 2-D matmul: the same numbers, and no shape-
            # dependent transpose in its gradient (which XLA cannot compile inside the loop).
            e = tf.reshape(tf.matmul(tf.reshape(x, [-1, A]), w["k_score"]), [-1, L])
            e = e + w["b_score"]  # (N, L)
            alpha = tf.nn.softmax(e, axis=-1)
            cu = tf.reshape(tf.matmul(tf.reshape(alpha, [images, -1, L]), f), [-1, self.feature_dim])  # (N, C)
            ctx = gate * cu  # the context, gated
            gx = gx_word + tf.matmul(ctx, w["k_ctx"])  # (N, G)
            saved = (gate, x, cu)
        else:
            ctx, gx, saved = tf.zeros_like(gx_word[:, :0]), gx_word, ()
            alpha = tf.zeros(tf.stack([tf.shape(gx_word)[0], L]), gx_word.dtype)
        new_states, cell_cache = self.gates_cache(gx, gh, states)
        return (new_states, ctx, alpha, saved, cell_cache) if keep else (new_states, ctx, alpha)

    def _logits(self, h, ctx, emb, seed=None, packed=None):
        z = dropout(self.out_hidden(tf.concat([h, ctx, emb], axis=-1)), self.dropout, seed, packed)
        return self.out_logits(z)

    # ---- teacher-forced training -----------------------------------------------------------
    def forward(self, features, tokens_in, dropout_seed=None, lengths=None, packed=False):
        """features (B, L, C), tokens_in (B, T) -> logits (B, T, V), {"attention": (B, T, L)}.

        ``dropout_seed``: int32 (2,) tensor turns dropout on (training); None turns it off.
        ``lengths`` (B,): only each row's first ``lengths`` steps are computed (packed, see
        bptt.py); logits and attention past them are zeros. The rest equal the unpacked run's.
        ``packed`` (with ``lengths``): logits (N, V) of the real steps only, at ``aux["index"]``.
        """
        if packed and lengths is None:
            raise ValueError("packed logits need lengths")
        emb_seed = out_seed = None
        if dropout_seed is not None and self.dropout > 0:
            emb_seed, out_seed = dropout_seeds(dropout_seed)
        shape = tf.shape(tokens_in)  # (2,) B, T
        if lengths is not None:  # packed rows: longest caption first (see bptt.Packing)
            pack = Packing.of(lengths, shape[1])
            # Sort the input features, not the states and keys made from them: the input needs no
            # gradient, where a gather of those would add a (B, L, C) scatter to the backward pass.
            features = tf.gather(features, pack.order)
        *states, f, keys = self.initial_state(features)
        emb = dropout(self.embed(tokens_in), self.dropout, emb_seed)  # (B, T, E)
        w = self._fused()
        if lengths is None:  # every step of every row: time-major, shapes static (XLA)
            gx = tf.tensordot(tf.transpose(emb, [1, 0, 2]), w["k_word"], 1) + w["b_in"]  # (T, B, G): one product
            hs, ctxs, alphas = recurrent_scan(self, tf.reshape(gx, [-1, gx.shape[-1]]), tuple(states), f, keys, w)
            steps_rows = tf.shape(gx)[:2]
            hs, ctxs, alphas = (
                tf.transpose(tf.reshape(x, tf.concat([steps_rows, [-1]], 0)), [1, 0, 2]) for x in (hs, ctxs, alphas)
            )  # (B, T, .)
            return self._logits(hs, ctxs, emb, out_seed), {"attention": alphas}
        emb = tf.gather_nd(emb, pack.index)  # (N, E): the real steps only
        gx = tf.matmul(emb, w["k_word"]) + w["b_in"]  # (N, G)
        hs, ctxs, alphas = recurrent_scan(self, gx, tuple(states), f, keys, w, packing=pack)
        logits = self._logits(hs, ctxs, emb, out_seed, packed=(pack.index, shape))  # (N, V)

        def unpack(x):  # (N, ...) -> (B, T, ...), zeros past each row's length
            return tf.scatter_nd(pack.index, x, tf.concat([shape, tf.shape(x)[1:]], 0))

        if packed:
            return logits, {"attention": unpack(alphas), "index": pack.index}  # (N, V), (B, T, L)
        return unpack(logits), {"attention": unpack(alphas)}  # (B, T, V), (B, T, L)

    def extra_loss(self, aux, mask):
        return coverage_term(aux["attention"], mask) if self.attention else tf.constant(0.0)

    # ---- one decoding step (beam search) ---------------------------------------------------
    def step(self, tokens, state):
        """tokens (N,), state -> log-probs (N, V), state', alpha (N, L); ``f`` and ``keys`` may
        hold one row per image for N = images * R rows (see _recur)."""
        *states, f, keys = state
        emb = self.embed(tokens)  # (N, E)
        w = self._fused()
        states, ctx, alpha = self._recur(tf.matmul(emb, w["k_word"]) + w["b_in"], tuple(states), f, keys, w)
        log_probs = tf.nn.log_softmax(self._logits(states[0], ctx, emb), axis=-1)
        return log_probs, (*states, f, keys), alpha
