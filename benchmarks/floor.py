"""How close one training epoch runs to the machine's arithmetic floor.

    python -m benchmarks.floor FEATURES CAPTIONS [--preset default] [--in-memory] [--bucket 16] [--jit --epochs 2]

Measures, in one run: the large-sgemm rate of this machine (2048x2048x2048 float32 through
TensorFlow, the engine training uses; the mean of its rate before and after the epochs), the
FLOPs of one epoch's *real* tokens (padding not counted; forward + backward = 3x forward, plus
the val pass), and the wall time of one epoch of
``captioning.train.fit`` on the given features (the last of ``--epochs``: with ``--jit`` the
XLA compiles fall in the first). Prints epoch time / floor, and the floor of the model's own
product shapes (each product timed alone at the shape the step runs it: small and thin
products run below the large-sgemm rate on any CPU). The defaults are
benchmarks/flickr8k.sh's model; ``--preset default`` is the default pipeline's GRU-256.

Works against an older checkout too, for before/after figures: run this file as a script from
outside both checkouts, ``cd /tmp && PYTHONPATH=OLD_CHECKOUT python NEW_CHECKOUT/benchmarks/floor.py
...`` (``python -m`` from a checkout imports that checkout's package, whatever PYTHONPATH says).
Options the older code lacks (streaming, bucketing) are then left out and said so; the first
line printed names the package it timed.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402

PRESETS = {
    "flickr8k": dict(embed_dim=256, units=512, attention_units=256, dropout=0.3, batch=128, lr=1e-3, reg=0.01),
    "default": dict(embed_dim=128, units=256, attention_units=128, dropout=0.2, batch=64, lr=2e-3, reg=0.0),
}


def sgemm_gflops(n=2048, repeats=10, dtype="float32") -> float:
    """Best-of-``repeats`` matmul rate through TensorFlow, in GFLOP/s (float32: sgemm)."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    a, b = (tf.cast(rng.standard_normal((n, n), dtype=np.float32), dtype) for _ in range(2))
    tf.matmul(a, b).numpy()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        tf.matmul(a, b).numpy()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def forward_flops(kind, attention, E, U, A, V, L, C):
    """(per real token, per caption) forward FLOPs of a recurrent decoder: its matrix products."""
    G = (3 if kind == "gru" else 4) * U
    ctx = C if attention else 0
    tok = 2 * (E + ctx) * G + 2 * U * G  # cell: input and recurrent projections
    if attention:
        tok += 2 * U * (A + 1) + 2 * L * A + 2 * L * C  # query, gate, scores, context
    tok += 2 * (U + ctx + E) * E + 2 * E * V  # deep output, logits
    cap = (2 * L * C * A if attention else 0) + 2 * C * U * (2 if kind == "lstm" else 1)  # keys, init
    return tok, cap


def products(kind, attention, E, U, A, V, L, C):
    """The decoder's forward matrix products: ``(name, per, rows, k, m)``, each ``(rows, k) x (k, m)``.

    ``per``: "step" runs inside the time loop at one row per caption still going (at most a
    batch), "token" once over all the batch's real tokens, "caption" once over its captions.
    ``rows``: rows per token or caption (the attention score: one per location). The context,
    a batched (1, L) x (L, C) product per row, is "context". Their FLOPs sum to
    :func:`forward_flops` (tested).
    """
    G = (3 if kind == "gru" else 4) * U
    ctx = C if attention else 0
    out = [("word", "token", 1, E, G), ("hidden", "step", 1, U, G + (A + 1 if attention else 0))]
    if attention:
        out += [("score", "step", L, A, 1), ("context", "context", 1, L, C), ("ctx", "step", 1, C, G)]
    out += [("deep output", "token", 1, U + ctx + E, E), ("logits", "token", 1, E, V)]
    if attention:
        out.append(("keys", "caption", L, C, A))
    out += [("init", "caption", 1, C, U)] * (2 if kind == "lstm" else 1)
    return out


def shape_floor(shapes, batch, tokens_per_caption, repeats=5):
    """Seconds ``{"token": (forward, backward), "caption": (forward, backward)}`` of ``shapes``
    (:func:`products`), each product timed alone through TensorFlow at the shape the training
    step runs it: the loop's at ``batch`` rows (its most; later steps run fewer), the others
    over a whole batch. Backward: ``dX = dY W^T`` where the forward ran, and ``dW = X^T dY``
    once over the batch's rows (as decoders/bptt.py does).

    The sgemm floor prices every FLOP at the rate of one large square product; small and thin
    products run slower on any CPU, so this is the floor for these shapes: what the step's
    products alone cost, with nothing else in the step and nothing waiting on anything.
    """
    import tensorflow as tf

    rng = np.random.default_rng(0)
    N = max(1, round(batch * tokens_per_caption))  # a batch's real tokens
    T = max(1, round(tokens_per_caption))

    def timed(a_shape, b_shape, ta=False, tb=False):  # best of ``repeats``, seconds per product
        a, b = (tf.constant(rng.standard_normal(s, dtype=np.float32)) for s in (a_shape, b_shape))
        inner = a_shape[-2] if ta else a_shape[-1]
        flops = 2 * int(np.prod(tf.matmul(a, b, transpose_a=ta, transpose_b=tb).shape)) * inner
        reps = min(50, max(1, int(2e8 / flops)))  # about 1 ms of work per timing at 200 GFLOP/s
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(reps):
                out = tf.matmul(a, b, transpose_a=ta, transpose_b=tb)
            out.numpy()
            best = min(best, (time.perf_counter() - t0) / reps)
        return best

    cost = {"token": [0.0, 0.0], "caption": [0.0, 0.0]}
    for _name, per, rows, k, m in shapes:
        if per == "context":  # alpha (B, 1, L) x f (B, L, C); d_alpha = f d_cu; d_f = alpha^T d_cu per image
            cost["token"][0] += timed((batch, 1, k), (batch, k, m)) / batch
            cost["token"][1] += timed((batch, k, m), (batch, m, 1)) / batch + timed((batch, k, T), (batch, T, m)) / N
            continue
        r = {"step": batch, "token": N, "caption": batch}[per] * rows  # rows of the forward product
        r_w = (batch if per == "caption" else N) * rows  # rows of the weight gradient's product
        unit = batch if per in ("step", "caption") else N  # tokens or captions that r rows serve
        into = cost["caption" if per == "caption" else "token"]
        into[0] += timed((r, k), (k, m)) / unit
        into[1] += timed((r, m), (k, m), tb=True) / unit + timed((r_w, k), (r_w, m), ta=True) / (r_w // rows)
    return {k: tuple(v) for k, v in cost.items()}


def caption_set(train_mod, store, images, tokens, streaming=True):
    """``train_mod.CaptionSet`` of the captions whose image has features (any checkout's
    package: ``train_mod`` is its ``train`` module; ``streaming`` False loads the rows into RAM)."""
    keys = sorted(set(images) & set(store.index))
    row = {k: i for i, k in enumerate(keys)}
    keep = np.array([im in row for im in images])
    feats = store.rows(keys) if streaming else store.load(keys)
    rows = np.array([row[im] for im in images if im in row], dtype=np.int64)
    return train_mod.CaptionSet(feats, tokens[keep].astype(np.int32), rows)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@click.command()
@click.argument("features", type=click.Path(exists=True, dir_okay=False))
@click.argument("captions", type=click.Path(exists=True, dir_okay=False))
@click.option("--preset", type=click.Choice(list(PRESETS)), default="flickr8k", show_default=True)
@click.option("--decoder", "kind", type=click.Choice(["gru", "lstm"]), default="gru", show_default=True)
@click.option("--attention/--no-attention", default=True)
@click.option("--in-memory", is_flag=True, help="Load the split into RAM (the old way) instead of streaming it.")
@click.option("--bucket", default=16, show_default=True, help="Batches per length-sorted pool (0: plain shuffle).")
@click.option("--read-block", default=1, show_default=True, help="Images per shuffled block of feature rows.")
@click.option("--max-captions", default=0, help="Train on the first N captions only (0: all).")
@click.option("--jit", is_flag=True, help="train.jit: XLA-compile the step (compiles count in epoch 1).")
@click.option("--epochs", default=1, show_default=True, help="Time the last of N epochs (N > 1: compiles left out).")
@click.option(
    "--precision",
    type=click.Choice(["float32", "mixed_bfloat16"]),
    default="float32",
    show_default=True,
    help="train.precision; bfloat16 also prints the ratio to the machine's bfloat16 matmul floor.",
)
@click.option("--seed", default=42, show_default=True)
def main(
    features,
    captions,
    preset,
    kind,
    attention,
    in_memory,
    bucket,
    read_block,
    max_captions,
    jit,
    precision,
    epochs,
    seed,
):
    from captioning.cli import seed_everything

    seed_everything(seed)
    import captioning
    from captioning import train as train_mod
    from captioning.config import load_section
    from captioning.decoders import build_decoder
    from captioning.feature_store import FeatureStore
    from captioning.vocab import load_encoded

    print(f"timing {os.path.dirname(os.path.abspath(captioning.__file__))}")
    cfg = PRESETS[preset]
    gflops = sgemm_gflops()
    bf16 = precision != "float32"
    bf16_before = sgemm_gflops(dtype="bfloat16") if bf16 else 0.0
    store = FeatureStore(features)
    streaming = hasattr(store, "rows") and not in_memory
    notes = [] if hasattr(store, "rows") else ["older code: features in RAM, no bucketing"]

    def split(name):
        images, tokens = load_encoded(captions, name)
        if max_captions and name == "train":
            images, tokens = images[:max_captions], tokens[:max_captions]
        return caption_set(train_mod, store, images, tokens, streaming)

    train, val = split("train"), split("val")
    V = int(max(train.tokens.max(), val.tokens.max())) + 1
    model = build_decoder(
        kind,
        vocab_size=V,
        feature_dim=store.feature_dim,
        num_locations=store.num_locations,
        attention=attention,
        embed_dim=cfg["embed_dim"],
        units=cfg["units"],
        attention_units=cfg["attention_units"],
        dropout=cfg["dropout"],
        **({"precision": precision} if bf16 else {}),
    )
    wanted = dict(
        batch_size=cfg["batch"],
        learning_rate=cfg["lr"],
        epochs=epochs,
        patience=epochs,
        attention_reg=cfg["reg"] if attention else 0.0,
        bucket=bucket,
        read_block=read_block,
        jit=jit,
        attention=attention,
    )
    fields = {f.name for f in dataclasses.fields(train_mod.TrainSettings)}
    settings = load_section(
        "params.yaml", "train", train_mod.TrainSettings, **{k: v for k, v in wanted.items() if k in fields}
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = train_mod.fit(
            model, train, val, settings, seed, os.path.join(tmp, "ckpt"), progress=False, log=lambda m: None
        )
    # The machine's speed drifts over minutes (other tenants): the floor uses the mean of the
    # rates measured before and after the epochs, and both are printed.
    gflops_before, gflops_after = gflops, sgemm_gflops()
    gflops = (gflops_before + gflops_after) / 2
    bf16_gflops = (bf16_before + sgemm_gflops(dtype="bfloat16")) / 2 if bf16 else 0.0
    last = state["history"][-1]
    epoch_s = last["seconds"]
    losses = f"epoch {last['epoch']}: train_loss {last['train_loss']:.4f} val_loss {last['val_loss']:.4f}"
    if epochs > 1:
        losses += f"; epoch 1 took {state['history'][0]['seconds']:.1f} s"
    if jit and "jit" not in fields:
        notes.append("older code: no jit")

    tok, cap = forward_flops(
        kind,
        attention,
        cfg["embed_dim"],
        cfg["units"],
        cfg["attention_units"],
        V,
        store.num_locations,
        store.feature_dim,
    )

    def real(data):  # (real target tokens, captions): what the decoder must compute, no padding
        return int((data.tokens[:, 1:] > 0).sum()), len(data.tokens)

    (t_tok, t_cap), (v_tok, v_cap) = real(train), real(val)
    flops = 3 * (t_tok * tok + t_cap * cap) + (v_tok * tok + v_cap * cap)  # train fwd+bwd, val fwd
    floor_s = flops / (gflops * 1e9)
    print(
        f"{kind}{'+att' if attention else ''} E{cfg['embed_dim']} U{cfg['units']} A{cfg['attention_units']} V{V}"
        f" L{store.num_locations} C{store.feature_dim} batch {cfg['batch']}:"
        f" {t_cap} train captions ({t_tok} real tokens), {v_cap} val;"
        f" {tok / 1e6:.2f} MFLOP/token + {cap / 1e6:.1f} MFLOP/caption forward;"
        f" epoch {flops / 1e12:.2f} TFLOP"
    )
    mode = ("streamed from disk" if streaming else "in RAM") + (f", bucket {bucket}" if "bucket" in fields else "")
    mode += ", XLA" if jit and "jit" in fields else ""
    mode += ", mixed_bfloat16" if bf16 else ""
    print(
        f"sgemm {gflops:.0f} GFLOP/s ({gflops_before:.0f} before, {gflops_after:.0f} after) -> floor {floor_s:.1f} s;"
        f" epoch {epoch_s:.1f} s ({mode});"
        f" ratio {epoch_s / floor_s:.2f}x; {t_cap / epoch_s:.0f} captions/s; peak RSS {peak_rss_gb():.2f} GB; {losses}"
        + (f"; {'; '.join(notes)}" if notes else "")
    )
    # The same products at the rates their own shapes reach, each alone (after the epoch: no
    # contention with it): the floor this model's products can reach on this machine.
    dims = (kind, attention, cfg["embed_dim"], cfg["units"], cfg["attention_units"], V)
    cost = shape_floor(products(*dims, store.num_locations, store.feature_dim), cfg["batch"], t_tok / max(t_cap, 1))
    (tok_f, tok_b), (cap_f, cap_b) = cost["token"], cost["caption"]
    shapes_s = t_tok * (tok_f + tok_b) + t_cap * (cap_f + cap_b) + v_tok * tok_f + v_cap * cap_f
    print(
        f"the same products, each timed alone at the step's shapes: {shapes_s:.1f} s"
        f" ({shapes_s / floor_s:.2f}x the sgemm floor, {flops / shapes_s / 1e9:.0f} GFLOP/s);"
        f" epoch / that {epoch_s / shapes_s:.2f}x"
    )
    if bf16:  # the same FLOPs at the machine's bfloat16 matmul rate (AMX or a GPU's tensor cores)
        bf16_floor = flops / (bf16_gflops * 1e9)
        print(f"bfloat16 matmul {bf16_gflops:.0f} GFLOP/s -> floor {bf16_floor:.1f} s;", end=" ")
        print(f"ratio {epoch_s / bf16_floor:.2f}x")


if __name__ == "__main__":
    main()
