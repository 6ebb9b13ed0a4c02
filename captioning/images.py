"""Decode any image a user is likely to have into an RGB float array of a fixed size.

PIL reads what real photo folders contain: JPEG (CMYK too), PNG (16-bit too), GIF, grayscale,
palette and alpha images. Colour and grayscale JPEGs, nearly every photo, are decoded by
libjpeg-turbo through simplejpeg instead, at the smallest of its 1/8 ... 8/8 scales that still
covers the target size: a 500x375 Flickr photo decodes at 5/8 (313x235), where PIL's ``draft``
only knows 1/2, 1/4 and 1/8 and so decodes it whole, and the resize then starts from 40% of
the pixels: 1.5-1.7 ms of CPU per such photo here against 2.0-2.4 ms, on cores the CNN
shares. A 12000x9000 photo decodes at 1/8 either way. Photos are turned upright by their EXIF
orientation (phones store them sideways and set the tag), and transparent pixels are laid on
white (as a viewer shows them), not on black.
"""

from __future__ import annotations

import warnings

import numpy as np
import simplejpeg
from PIL import Image, ImageOps

# EXIF Orientation tag value -> the transpose that shows the photo upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(Exception):
    """An image file that cannot be decoded; ``str(e)`` says why."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or 32-bit grayscale: rescale the full range into 0..255 before converting
        a = np.asarray(img, dtype=np.float32)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(a * (255.0 / top), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La", "P") or "transparency" in img.info:
        rgba = img.convert("RGBA")  # palette or colour-key transparency becomes alpha too
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return img.convert("RGB")


def _decode_jpeg(img: Image.Image, size: int) -> Image.Image:
    """An opened (not yet decoded) YCbCr or grayscale JPEG -> upright RGB, at least ``size``
    on each side unless the photo is smaller (libjpeg-turbo's scaled decoding)."""
    img.fp.seek(0)
    rgb = simplejpeg.decode_jpeg(img.fp.read(), colorspace="RGB", min_height=size, min_width=size)  # (h, w, 3)
    rgb = Image.fromarray(rgb)
    turn = _UPRIGHT.get(img.getexif().get(0x0112))  # Orientation
    return rgb.transpose(turn) if turn is not None else rgb


def load_image(path, size: int, dtype=np.float32) -> np.ndarray:
    """``(size, size, 3)`` RGB in 0..255 (float32, or uint8 for the feature pipeline), aspect
    squashed as the CNNs were trained."""
    try:
        with warnings.catch_warnings():
            # Big photos are fine (JPEGs decode at reduced scale); only PIL's hard limit
            # (DecompressionBombError, ~179 Mpx) turns an image away.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:  # reads the header only
                if img.format == "JPEG" and img.mode in ("RGB", "L"):
                    rgb = _decode_jpeg(img, size)
                else:
                    if img.format == "JPEG":  # CMYK: PIL's colour handling
                        img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale when big
                    img.load()
                    rgb = _to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"too many pixels ({e})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"cannot decode: {e}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.BILINEAR)
    return np.asarray(rgb, dtype=dtype)
