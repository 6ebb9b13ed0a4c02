"""Decode any image a user is likely to have into an RGB float array of a fixed size.

PIL does the decoding because it handles what real photo folders contain: JPEG (CMYK too),
PNG (16-bit too), GIF, grayscale, palette and alpha images. Large JPEGs are decoded at a
reduced scale (``draft``), so a 12000x9000 photo costs little more than a small one. Photos
are turned upright by their EXIF orientation (phones store them sideways and set the tag),
and transparent pixels are laid on white (as a viewer shows them), not on black.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps


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
    return img if img.mode == "RGB" else img.convert("RGB")  # convert would copy an RGB image


def load_image(source, size: int, dtype=np.float32) -> np.ndarray:
    """``(size, size, 3)`` RGB in 0..255 (float32, or uint8 for the feature pipeline), aspect
    squashed as the CNNs were trained.

    ``source``: a file path, the file's bytes, or an image array (H, W, 3) or (H, W) in 0..255.
    """
    if isinstance(source, np.ndarray):
        return _from_array(source, size, dtype)
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    try:
        with warnings.catch_warnings():
            # Big photos are fine (JPEGs decode at reduced scale); only PIL's hard limit
            # (DecompressionBombError, ~179 Mpx) turns an image away.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (size, size))  # decode at 1/2, 1/4 or 1/8 scale when big
                img.load()
                ImageOps.exif_transpose(img, in_place=True)  # in place: an upright photo is not copied
                rgb = _to_rgb(img)
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


def _from_array(a: np.ndarray, size: int, dtype) -> np.ndarray:
    if a.ndim == 3 and a.shape[2] == 4:
        a = a[..., :3]  # an RGBA array: its colour (a decoded file lays alpha on white instead)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (1, 3))) or 0 in a.shape:
        raise ImageError(f"expected an (H, W, 3) or (H, W) image array, got shape {a.shape}")
    a = np.clip(np.asarray(a, np.float32), 0, 255).astype(np.uint8)
    img = Image.fromarray(a[..., 0] if a.ndim == 3 and a.shape[2] == 1 else a).convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=dtype)
