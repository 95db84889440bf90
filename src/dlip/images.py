"""Image decoding, in one place: training data, evaluation, the Predictor and the demo all read
images through `decode_rgb`.

What it guarantees: a fully decoded 8-bit RGB image (truncation surfaces here, not in a
transform), upright (the EXIF orientation a camera wrote is applied: a portrait photo stored
sideways is not fed sideways), and with its tonal range kept (16-bit and 32-bit integer images,
such as 16-bit PNGs, are scaled to 8 bits; converting them directly would clip every value
above 255 to white). Problems raise `ImageError` with a reason the callers count or report:
`empty_image`, `too_large` (over `max_pixels`, or PIL's decompression-bomb refusal),
`not_an_image`, `truncated`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 178_956_970  # PIL's own default bomb limit, applied explicitly
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")  # integer images wider than 8 bits


class ImageError(ValueError):
    """Bytes that are not a usable image; `reason` says why (see the module docstring)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def decode_rgb(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Encoded bytes -> an upright, fully decoded 8-bit RGB image, or ImageError."""
    if not data:
        raise ImageError("empty_image", "0 bytes")
    try:
        with warnings.catch_warnings():  # PIL only warns between 1x and 2x its own limit
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))  # reads the header only
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageError("too_large", str(err)) from None
    except Image.UnidentifiedImageError:
        raise ImageError("not_an_image", f"{len(data)} bytes PIL cannot identify") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageError("truncated", str(err)) from None
    with im:
        w, h = im.size
        if w * h == 0:
            raise ImageError("empty_image", f"{w}x{h}")
        if w * h > max_pixels:
            raise ImageError("too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
        try:
            im.load()  # the full decode: truncation surfaces here
            return to_rgb8(ImageOps.exif_transpose(im))
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageError("truncated", str(err)) from None


def to_rgb8(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB; integer images wider than 8 bits are scaled down, not clipped."""
    if im.mode in _WIDE_MODES:
        arr = np.asarray(im).astype(np.float64)  # (H, W)
        top = 65535.0 if im.mode.startswith("I;16") else _range_of_int32(float(arr.max()))
        eight = np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(eight, mode="L").convert("RGB")
    return im if im.mode == "RGB" else im.convert("RGB")


def _range_of_int32(peak: float) -> float:
    """The full scale a 32-bit integer image most likely uses: 8-bit values stay as they are,
    16-bit ones (how Pillow often opens a 16-bit PNG) scale from 65535."""
    if peak <= 255:
        return 255.0
    return 65535.0 if peak <= 65535 else peak
