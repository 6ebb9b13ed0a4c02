"""Feature extraction speed: images/s end to end (decode + resize + CNN + HDF5) next to the
CNN's forward-only speed at the same batch size, in the same run.

    python benchmarks/features_speed.py IMAGE_DIR [--backbone mobilenet --alpha 0.75
        --weights ../shared/weights/mobilenet_7_5_224_tf_no_top.h5 --image-size 224 --limit 1000]
        [--upscale 500x375] [--rounds 3]

The machine's speed drifts by 10-20% within a minute (shared cores), so each of ``--rounds``
rounds measures the forward-only rate just before and just after one end-to-end run and divides
by their mean; the median round is the figure.

It also prints the CPU budget that bounds the share: the CNN's CPU time per image (forward only)
and the decoding's (one thread, nothing else running). The decoding shares the cores with the
CNN, so end to end can reach at most ``cores x forward wall time / (CNN CPU + decode CPU)`` of
the forward-only rate (100% if the CNN leaves that much idle).

``--upscale WxH`` first writes the images, upscaled to WxH, as JPEGs into a temporary folder:
full-size photos (Flickr's originals are about 500x375) cost more to decode than the 224 px
copies in ../shared. The end-to-end rate is the steady state (model building and tracing are
timed apart), as the forward-only one is.
"""

import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import click  # noqa: E402
import numpy as np  # noqa: E402


@click.command()
@click.argument("image_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--backbone", default="vgg16")
@click.option("--weights", default="none")
@click.option("--layer", default="")
@click.option("--alpha", default=1.0, type=float)
@click.option("--image-size", default=224, type=int)
@click.option("--batch-size", default=32, type=int)
@click.option("--limit", default=500, type=int, help="Images to encode.")
@click.option("--upscale", default="", help="WxH: encode upscaled JPEG copies of that size instead.")
@click.option("--decode-threads", default=0, help="Decoding threads (0: the default, one per two cores).")
@click.option("--rounds", default=3, show_default=True, help="End-to-end runs, each between two forward-only ones.")
def main(image_dir, backbone, weights, layer, alpha, image_size, batch_size, limit, upscale, decode_threads, rounds):
    from PIL import Image

    import captioning
    from captioning.encoder import EncoderSpec, build_encoder, extract_features, make_forward
    from captioning.images import load_image

    print(f"package: {Path(captioning.__file__).parent}")
    spec = EncoderSpec(backbone=backbone, weights=weights, layer=layer, image_size=image_size, alpha=alpha)
    keys = sorted(p.name for p in Path(image_dir).iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    with tempfile.TemporaryDirectory() as tmp:
        if upscale:
            w, h = (int(x) for x in upscale.split("x"))
            for k in keys:
                Image.open(Path(image_dir) / k).convert("RGB").resize((w, h), Image.BICUBIC).save(
                    Path(tmp) / k, quality=90
                )
            image_dir = tmp
        forward = make_forward(*build_encoder(spec))
        batch = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
        forward(batch)  # trace

        def forward_rate(seconds=5):
            """(images/s, CPU seconds per image) of the forward pass alone."""
            n, t0, c0 = 0, time.perf_counter(), time.process_time()
            while time.perf_counter() - t0 < seconds or n < 3:
                forward(batch)[0].numpy()
                n += 1
            return n * batch_size / (time.perf_counter() - t0), (time.process_time() - c0) / (n * batch_size)

        sample = [Path(image_dir) / k for k in keys[:200]]
        c0 = time.process_time()
        for p in sample:
            load_image(p, image_size, np.uint8)
        decode_cpu = (time.process_time() - c0) / len(sample)

        shares, rates, cnn_cpu, fwd_wall = [], [], [], []
        for r in range(rounds):
            before, cpu_b = forward_rate()
            rep = extract_features(
                spec,
                image_dir,
                keys,
                Path(tmp) / f"f{r}.h5",
                batch_size=batch_size,
                progress=False,
                decode_threads=decode_threads,
            )
            after, cpu_a = forward_rate()
            fwd = (before + after) / 2
            shares.append(rep["images_per_second"] / fwd)
            rates.append(rep["images_per_second"])
            cnn_cpu += [cpu_b, cpu_a]
            fwd_wall += [1 / before, 1 / after]
            print(
                f"round {r + 1}: end to end {rep['images_per_second']:.1f} img/s, forward only {fwd:.1f}"
                f" ({before:.1f} before, {after:.1f} after): {shares[-1]:.0%}",
                flush=True,
            )
    cores = os.cpu_count()
    cnn, wall = statistics.mean(cnn_cpu), statistics.mean(fwd_wall)
    ceiling = min(1.0, cores * wall / (cnn + decode_cpu))
    size = f", upscaled to {upscale} JPEGs" if upscale else ""
    print(
        f"{backbone} (alpha {alpha}, {weights}) {image_size}px batch {batch_size}, {len(keys)} images{size},"
        f" {cores} CPUs, decode threads {decode_threads or 'default'}:"
        f" end to end {statistics.median(rates):.1f} img/s (median of {rounds} rounds),"
        f" {statistics.median(shares):.0%} of forward only (rounds {', '.join(f'{s:.0%}' for s in shares)})"
    )
    print(
        f"CPU per image: CNN {cnn * 1e3:.2f} ms (forward only, {cnn / wall:.2f} of {cores} cores busy),"
        f" decoding {decode_cpu * 1e3:.2f} ms (one thread): sharing the cores, end to end can reach at most"
        f" {ceiling:.0%} of forward only"
    )


if __name__ == "__main__":
    main()
