"""Feature extraction speed: images/s end to end (decode + resize + CNN + HDF5) next to the
CNN's forward-only speed at the same batch size, in the same run (measured before and after the
end-to-end run, the mean taken: the machine's speed drifts).

    python benchmarks/features_speed.py IMAGE_DIR [--backbone mobilenet --alpha 0.75
        --weights ../shared/weights/mobilenet_7_5_224_tf_no_top.h5 --image-size 224 --limit 1000]
        [--upscale 500x375]

``--upscale WxH`` first writes the images, upscaled to WxH, as JPEGs into a temporary folder:
full-size photos (Flickr's originals are about 500x375) cost more to decode than the 224 px
copies in ../shared. The end-to-end rate is the steady state (model building and tracing are
timed apart), as the forward-only one is.
"""

import os
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
@click.option("--decode-threads", default=0, help="PIL decoding threads (0: the default, one per two cores).")
def main(image_dir, backbone, weights, layer, alpha, image_size, batch_size, limit, upscale, decode_threads):
    from PIL import Image

    from captioning.encoder import EncoderSpec, build_encoder, extract_features, make_forward

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
        # The machine's speed drifts by 10-20% over a minute (shared cores): the forward-only
        # rate is measured before and after the end-to-end run, and their mean is the reference.
        forward = make_forward(*build_encoder(spec))
        batch = np.random.default_rng(0).integers(0, 256, (batch_size, image_size, image_size, 3), dtype=np.uint8)
        forward(batch)  # trace

        def forward_rate(seconds=10):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds or n < 3:
                forward(batch)[0].numpy()
                n += 1
            return n * batch_size / (time.perf_counter() - t0)

        before = forward_rate()
        rep = extract_features(
            spec,
            image_dir,
            keys,
            Path(tmp) / "f.h5",
            batch_size=batch_size,
            progress=False,
            decode_threads=decode_threads,
        )
        after = forward_rate()
    fwd = (before + after) / 2
    size = f", upscaled to {upscale} JPEGs" if upscale else ""
    print(
        f"{backbone} (alpha {alpha}, {weights}) {image_size}px batch {batch_size}, {len(keys)} images{size},"
        f" {os.cpu_count()} CPUs, decode threads {decode_threads or 'default'}:"
        f" end to end {rep['images_per_second']:.1f} img/s,"
        f" forward only {fwd:.1f} img/s ({before:.1f} before, {after:.1f} after);"
        f" end to end is {rep['images_per_second'] / fwd:.0%} of forward"
    )


if __name__ == "__main__":
    main()
