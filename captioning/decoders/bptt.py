"""The recurrent decoders' time loop: packed sequences and a hand-written backward pass.

Two things make the loop cheaper than ``tf.scan`` with autodiff, without changing the maths:

- **Packing** (PyTorch's PackedSequence): a batch runs to its longest caption, but at step t only
  the captions still running need a step. Rows are sorted longest first, so the running rows are
  always the first ``counts[t]``; each step computes those alone and the outputs are kept
  "packed", (N, ...) with N the batch's real tokens, step by step. Without it a third to a half
  of the work is padding.
- **Backpropagation through time by hand**: autodiff through the loop computes every step's
  weight gradients as small products and adds up the loop-invariant image tensors' gradients
  (attention keys, features) one step at a time. Here the reverse loop carries only what flows
  back in time (dh, and dc for an LSTM) and records the gradients at the products' outputs;
  after the loop each weight and image gradient is one large product over all N rows:
  ``dW_h = H_prev^T dHW``, ``dK_ctx = CTX^T dGX``, ``dfeats = alpha^T dctx`` per image (the
  attention score's (A,) kernel is summed in the loop, where its (n, L, A) input is at hand).

Same maths as autodiff over the padded batch, so the same numbers to float rounding (tested).

Shapes: T steps, B batch, N packed rows, L locations, C channels, A attention units, U units,
G gate width.
"""

from __future__ import annotations

from typing import NamedTuple

import tensorflow as tf


class Packing(NamedTuple):
    """Where a batch's real steps lie in packed (N, ...) arrays, step-major: step t holds rows
    ``offsets[t] ...`` (``counts[t]`` of them), row r being batch row ``order[r]``."""

    order: tf.Tensor  # (B,) batch rows, longest caption first (stable)
    counts: tf.Tensor  # (T,) rows still running at each step, non-increasing
    index: tf.Tensor  # (N, 2) (batch row, step) of each packed row: scatter/gather into (B, T, ...)
    place: tf.Tensor  # (N, 2) (step, sorted row r) of each packed row: scatter into (T, B, ...)

    @classmethod
    def of(cls, lengths, steps):
        """``lengths`` (B,) real steps of each row (0 allowed), ``steps`` T >= max(lengths)."""
        lengths = tf.cast(lengths, tf.int32)
        order = tf.argsort(lengths, direction="DESCENDING", stable=True)
        counts = tf.reduce_sum(tf.cast(lengths[None, :] > tf.range(steps)[:, None], tf.int32), axis=1)  # (T,)
        step = tf.repeat(tf.range(steps), counts)  # (N,)
        rank = tf.range(tf.shape(step)[0]) - tf.repeat(tf.cumsum(counts, exclusive=True), counts)  # row within step
        return cls(order, counts, tf.stack([tf.gather(order, rank), step], axis=1), tf.stack([step, rank], axis=1))


def _head(x, n):
    """The first n rows of x (tf.slice from row 0 shares x's buffer: no copy)."""
    return tf.slice(x, tf.zeros([x.shape.rank], tf.int32), tf.concat([[n], tf.fill([x.shape.rank - 1], -1)], 0))


def _keep_rows(head, x):
    """``head`` (n rows) over x's first rows, x's other rows unchanged; x's static shape (so the
    loop's carry keeps its shape)."""
    out = tf.concat([head, x[tf.shape(head)[0] :]], 0)
    out.set_shape(x.shape)
    return out


def _merge_steps(x):
    """(T, B, ...) -> (T * B, ...)."""
    return tf.reshape(x, tf.concat([[-1], tf.shape(x)[2:]], 0))


class _Time:
    """The time axis of one scan: which rows run at step ``t`` (``size(t)`` of them from packed
    row ``offset(t)``), a step's rows of a packed array (``at``), the loop over the steps
    (``loop``) and joining its outputs into packed rows (``packed``)."""

    def __init__(self, gx, batch, packing):
        self.batch, self.counts = batch, None if packing is None else packing.counts
        self.packing = packing
        if self.counts is None:
            self.steps = tf.shape(gx)[0] // batch
        else:
            self.steps, self.offsets = tf.shape(self.counts)[0], tf.cumsum(self.counts, exclusive=True)

    def size(self, t):
        return self.batch if self.counts is None else self.counts[t]

    def offset(self, t):
        return t * self.batch if self.counts is None else self.offsets[t]

    def at(self, x, t):
        """Step t's rows of a packed array (a slice along rows: no copy)."""
        rest = x.shape.rank - 1
        return tf.slice(
            x,
            tf.concat([[self.offset(t)], tf.zeros([rest], tf.int32)], 0),
            tf.concat([[self.size(t)], tf.fill([rest], -1)], 0),
        )

    def loop(self, fn, carry, reverse=False):
        """``carry, out = fn(t, carry)`` for each step (backwards with ``reverse``); returns the
        last carry and the outputs, each a TensorArray of the steps (:meth:`packed` joins one
        into (N, ...) rows in step order). The first step runs before the loop, to give the
        TensorArrays their structure."""
        steps, counts = self.steps, self.counts
        t0 = steps - 1 if reverse else 0
        carry, out = fn(t0, carry)
        shape = (lambda o: o.shape) if counts is None else (lambda o: tf.TensorShape([None]).concatenate(o.shape[1:]))
        tas = tf.nest.map_structure(
            lambda o: tf.TensorArray(o.dtype, size=steps, element_shape=shape(o), infer_shape=counts is None).write(
                t0, o
            ),
            out,
        )

        def body(i, carry, tas):
            t = steps - 1 - i if reverse else i
            carry, out = fn(t, carry)
            return i + 1, carry, tf.nest.map_structure(lambda ta, o: ta.write(t, o), tas, out)

        _, carry, tas = tf.while_loop(
            lambda i, *_: i < steps, body, (tf.constant(1), carry, tas), maximum_iterations=steps
        )
        return carry, tas

    def packed(self, ta):
        """A TensorArray of the steps' outputs -> (N, ...) rows (a copy of them all)."""
        return _merge_steps(ta.stack()) if self.counts is None else ta.concat()

    def step_major(self, x):
        """Packed (N, D) rows -> (T, B, D), zero where a row has ended."""
        if self.counts is None:
            return tf.reshape(x, [self.steps, self.batch, -1])
        return tf.scatter_nd(self.packing.place, x, tf.stack([self.steps, self.batch, tf.shape(x)[1]]))


def recurrent_scan(decoder, gx, states, f, keys, w, packing=None):
    """Run the decoder's cell over packed inputs ``gx`` (N, G) (the words' input projections).

    ``states`` (h0[, c0]) (B, U), ``f`` (B, L, C) and ``keys`` (B, L, A) are in packed row order
    (see :class:`Packing`); ``packing`` says which rows run at each step, or None for all B
    at every step (then N = T * B, the padded batch time-major; shapes static, as XLA needs).
    Returns packed ``hs`` (N, U), ``ctxs`` (N, C, or 0 wide without attention), ``alphas``
    (N, L). Gradients reach ``gx``, the initial states, ``f``, ``keys`` and the fused weights
    ``w`` (see ``RecurrentDecoder._fused``).
    """
    n_states = len(states)
    names = ["w_h"] + (["b_rec"] if w["b_rec"] is not None else [])  # the weights the loop reads
    if decoder.attention:
        names += ["k_ctx", "k_score", "b_score", "b_gate"]
    # Every input as a tensor (custom_gradient must see no variables); the gradient returns one each.
    args = [tf.convert_to_tensor(x) for x in (gx, *states, f, keys, *(w[n] for n in names))]
    time = _Time(gx, tf.shape(args[1])[0], packing)

    @tf.custom_gradient
    def run(gx, *rest):
        states, (f, keys) = rest[:n_states], rest[n_states : n_states + 2]
        wts = {**dict(zip(names, rest[n_states + 2 :])), "k_word": w["k_word"]}  # k_word: only its width is read
        wts.setdefault("b_rec", None)

        def step(t, states):  # states: all B rows; the first n run, the rest have ended
            n = time.size(t)
            prev = tuple(_head(s, n) for s in states)
            new, ctx, alpha, saved, cache = decoder._recur(
                time.at(gx, t), prev, _head(f, n), _head(keys, n), wts, keep=True
            )
            carry = tuple(_keep_rows(s_new, s) for s_new, s in zip(new, states))
            return carry, (prev, new[0], ctx, alpha, saved, cache)

        # What only the backward loop reads (the previous states, the attention's tanh (N, L, A),
        # the cell's cache) stays in its TensorArrays, read a step at a time: joining it into
        # (N, ...) arrays would copy it all, for the (N, L, A) tanh tens of MB a batch. (Joined
        # before the backward loop: an eager TensorArray forgets an element once it is read.)
        _, (prev_ta, hs, ctxs, alphas, saved_ta, cache_ta) = time.loop(step, tuple(states))
        hs, ctxs, alphas = time.packed(hs), time.packed(ctxs), time.packed(alphas)
        forward = {"states": states, "f": f, "keys": keys, "ctxs": ctxs, "alphas": alphas, "prev": prev_ta,
                   "saved": saved_ta, "cache": cache_ta, "h_prev": time.packed(prev_ta[0])}  # fmt: skip

        def grad(d_hs, d_ctxs, d_alphas):
            d = [tf.zeros_like(y) if d is None else d for d, y in zip((d_hs, d_ctxs, d_alphas), (hs, ctxs, alphas))]
            return _backward(decoder, time, names, wts, forward, *d)

        return (hs, ctxs, alphas), grad

    return run(*args)


def _backward(decoder, time, names, wts, fwd, d_hs, d_ctxs, d_alphas):
    """The gradients of :func:`recurrent_scan`'s inputs, in its ``args`` order, from those at
    its outputs: a reverse loop carrying dh (and dc), then one large product per weight."""
    att, g = decoder.attention, wts["k_word"].shape[-1]
    states, f, keys, alphas = fwd["states"], fwd["f"], fwd["keys"], fwd["alphas"]

    def read(tas, t):
        return tuple(ta.read(t) for ta in tas)

    def back(t, carry):  # all B rows, zero where a row's last step is still to come
        (d_states, d_keys, d_score), n = carry, time.size(t)
        d_run = (_head(d_states[0], n) + time.at(d_hs, t), *(_head(d, n) for d in d_states[1:]))
        saved_t, alpha = read(fwd["saved"], t), time.at(alphas, t)
        dgx, dgh, d_prev = decoder.gates_grad(d_run, read(fwd["prev"], t), read(fwd["cache"], t))
        if att:
            gate, x, cu = saved_t
            d_ctx = time.at(d_ctxs, t) + tf.matmul(dgx, wts["k_ctx"], transpose_b=True)  # (n, C)
            d_gate = tf.reduce_sum(d_ctx * cu, axis=-1, keepdims=True)  # (n, 1)
            d_cu = d_ctx * gate
            d_alpha = time.at(d_alphas, t) + tf.squeeze(tf.matmul(_head(f, n), d_cu[:, :, None]), -1)  # (n, L)
            d_e = alpha * (d_alpha - tf.reduce_sum(alpha * d_alpha, axis=-1, keepdims=True))  # softmax
            # (n, L, A) through the tanh: dy * (1 - x * x) in one pass, not four
            d_pre = tf.raw_ops.TanhGrad(y=x, dy=d_e[:, :, None] * wts["k_score"][:, 0])
            d_hw = tf.concat([dgh, tf.reduce_sum(d_pre, axis=1), d_gate * gate * (1.0 - gate)], axis=1)
            d_keys = _keep_rows(_head(d_keys, n) + d_pre, d_keys)  # summed over steps
            d_score += tf.tensordot(d_e, x, [[0, 1], [0, 1]])  # (A,): the score kernel's, summed
            rec = (dgx, d_hw, d_cu, d_e)
        else:
            d_hw, rec = dgh, (dgx, dgh)
        d_prev = (d_prev[0] + tf.matmul(d_hw, wts["w_h"], transpose_b=True), *d_prev[1:])
        return (tuple(_keep_rows(d, old) for d, old in zip(d_prev, d_states)), d_keys, d_score), rec

    zeros = tuple(tf.zeros_like(s) for s in states)
    d_score0 = tf.zeros([keys.shape[-1]], keys.dtype)
    (d_states0, d_keys, d_score), rec = time.loop(back, (zeros, tf.zeros_like(keys), d_score0), reverse=True)
    rec = tuple(time.packed(ta) for ta in rec)
    dgx, d_hw = rec[0], rec[1]  # (N, G): also the gradient of gx; (N, G [+ A + 1])
    # The weight and image gradients: one large product each over all N rows.
    grads = {"w_h": tf.matmul(fwd["h_prev"], d_hw, transpose_a=True)}  # (U, G [+ A + 1])
    if "b_rec" in names:
        grads["b_rec"] = tf.reduce_sum(d_hw[:, :g], axis=0)
    d_f = tf.zeros_like(f)
    if att:
        d_cu, d_e = rec[2:]  # (N, C), (N, L)
        grads["k_ctx"] = tf.matmul(fwd["ctxs"], dgx, transpose_a=True)  # (C, G)
        grads["k_score"] = d_score[:, None]  # (A, 1)
        grads["b_score"] = tf.reshape(tf.reduce_sum(d_e), [1])
        grads["b_gate"] = tf.reshape(tf.reduce_sum(d_hw[:, -1]), [1])
        # Each image's feature gradient over its own steps: (L, T) x (T, C).
        a_t, d_cu_t = time.step_major(alphas), time.step_major(d_cu)  # (T, B, .)
        d_f = tf.matmul(tf.transpose(a_t, [1, 2, 0]), tf.transpose(d_cu_t, [1, 0, 2]))  # (B, L, C)
    return (dgx, *d_states0, d_f, d_keys, *(grads[n] for n in names))
