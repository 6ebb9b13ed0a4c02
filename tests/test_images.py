"""Every kind of image file a photo folder holds: decoded to RGB, or a clear ImageError."""

import numpy as np
import pytest
from PIL import Image

from captioning.images import ImageError, load_image


def jpeg_bytes(size=(40, 30), mode="RGB"):
    import io

    buf = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else 128).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def make(tmp_path):
    def _make(name, build):
        path = tmp_path / name
        build(path)
        return path

    return _make


GOOD = {
    "rgb.jpg": lambda p: Image.new("RGB", (40, 30), (255, 0, 0)).save(p),
    "rgb.png": lambda p: Image.new("RGB", (40, 30), (255, 0, 0)).save(p),
    "anim.gif": lambda p: Image.new("P", (40, 30), 3).save(p),
    "gray.jpg": lambda p: Image.new("L", (40, 30), 200).save(p),
    "rgba.png": lambda p: Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(p),
    "cmyk.jpg": lambda p: Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(p),
    "sixteen.png": lambda p: Image.fromarray(np.full((30, 40), 65535, np.uint16)).save(p),
    "large.jpg": lambda p: Image.new("RGB", (12000, 9000), (0, 0, 255)).save(p, quality=50),
}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_readable_images_become_rgb(make, name):
    arr = load_image(make(name, GOOD[name]), 16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 255


def test_colours_survive_conversion(make):
    assert load_image(make("c.jpg", GOOD["cmyk.jpg"]), 8)[4, 4].tolist() == pytest.approx([255, 0, 0], abs=3)
    assert load_image(make("s.png", GOOD["sixteen.png"]), 8)[4, 4].tolist() == [255, 255, 255]
    assert load_image(make("l.jpg", GOOD["large.jpg"]), 8)[4, 4].tolist() == pytest.approx([0, 0, 255], abs=3)


def test_exif_orientation_turns_the_photo_upright(make):
    """Stored sideways (red left, blue right) with Orientation 6 = shown turned 90 degrees clockwise:
    red on top, blue below, as any photo viewer shows it."""

    def build(p):
        img = Image.new("RGB", (40, 20), (255, 0, 0))
        img.paste((0, 0, 255), (20, 0, 40, 20))
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation
        img.save(p, quality=95, exif=exif)

    arr = load_image(make("phone.jpg", build), 32)
    assert arr[3, 16].tolist() == pytest.approx([255, 0, 0], abs=12)  # top
    assert arr[28, 16].tolist() == pytest.approx([0, 0, 255], abs=12)  # bottom


TRANSPARENT = {
    "clear.png": (lambda p: Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(p), [255, 255, 255]),
    "half.png": (lambda p: Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(p), [255, 127, 127]),
    "la.png": (lambda p: Image.new("LA", (8, 8), (0, 0)).save(p), [255, 255, 255]),
    "keyed.gif": (lambda p: Image.new("P", (8, 8), 0).save(p, transparency=0), [255, 255, 255]),
    "opaque.png": (lambda p: Image.new("RGBA", (8, 8), (10, 200, 30, 255)).save(p), [10, 200, 30]),
}


@pytest.mark.parametrize("name", sorted(TRANSPARENT))
def test_transparency_is_laid_on_white(make, name):
    build, colour = TRANSPARENT[name]
    assert load_image(make(name, build), 8)[4, 4].tolist() == pytest.approx(colour, abs=1)


BAD = {
    "zero.jpg": (lambda p: p.write_bytes(b""), "not an image"),
    "text.jpg": (lambda p: p.write_text("just some text, not a photo"), "not an image"),
    "truncated.jpg": (lambda p: p.write_bytes(jpeg_bytes((400, 300))[:600]), "cannot decode"),
    "corrupt.jpg": (
        lambda p: p.write_bytes(jpeg_bytes()[:20] + b"\x00" * 200 + jpeg_bytes()[220:]),
        "cannot decode|not an image",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_unreadable_images_raise_image_error(make, name):
    build, reason = BAD[name]
    with pytest.raises(ImageError, match=reason):
        load_image(make(name, build), 16)


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "nope.jpg", 16)


def _photo(w, h):
    """A smooth colour photo stand-in: gradients plus a few soft blobs."""
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    rgb = np.stack([x, y, 0.5 + 0.5 * np.sin(6 * x + 4 * y)], -1) * 255
    return Image.fromarray(rgb.astype(np.uint8))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pil(make, orientation):
    """The libjpeg-turbo path turns photos as PIL's exif_transpose does (the short side is the
    target size: no scaled decoding, so the same pixels)."""
    from PIL import ImageOps

    def build(p):
        exif = Image.Exif()
        exif[0x0112] = orientation
        _photo(224, 160).save(p, quality=95, exif=exif)

    path = make(f"o{orientation}.jpg", build)
    with Image.open(path) as img:
        ref = ImageOps.exif_transpose(img).convert("RGB").resize((160, 160), Image.BILINEAR)
    assert np.array_equal(load_image(path, 160, np.uint8), np.asarray(ref))


def test_scaled_jpeg_decoding_matches_the_full_decode(make):
    """A 500x375 photo decodes at 5/8 scale (PIL would decode it whole): the result is within a
    few grey levels of the full decode, resized."""
    path = make("flickr.jpg", lambda p: _photo(500, 375).save(p, quality=90))
    with Image.open(path) as img:
        full = np.asarray(img.convert("RGB").resize((224, 224), Image.BILINEAR), np.float32)
    ours = load_image(path, 224)
    assert np.abs(ours - full).mean() < 1.0 and np.abs(ours - full).max() < 16


def test_grayscale_jpeg_has_equal_channels(make):
    arr = load_image(make("g.jpg", lambda p: _photo(300, 200).convert("L").save(p)), 32, np.uint8)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
