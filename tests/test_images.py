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
