"""The one image decode guard: every place longcap turns image bytes into pixels goes through here.

The pixel limit is read from the header before anything is decoded (a decompression bomb costs no memory);
any decoder failure becomes an ImageError (a ValueError) whose text names the reason ("pixel limit", "not an image",
"truncated image", "decode error", "image too small"), the words records.download_reason maps to a short reason.
"""

from __future__ import annotations

import io
from contextlib import contextmanager

import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS); the default everywhere


class ImageError(ValueError):
    """An image refused by the guard; the text names the reason."""


@contextmanager
def _named_errors():
    """Decoder exceptions -> ValueError with a named reason."""
    try:
        yield
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"pixel limit: {e}") from None
    except UnidentifiedImageError:
        raise ImageError("not an image: cannot identify image file") from None
    except (OSError, SyntaxError, ValueError) as e:
        if "truncated" in str(e).lower() or "broken data stream" in str(e):
            raise ImageError(f"truncated image: {e}") from None
        raise ImageError(f"decode error: {e}") from None


def _open(data, max_pixels: float) -> Image.Image:
    """The header only, with the pixel limit checked; data: bytes or a binary file object."""
    im = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageError(f"pixel limit: {w}x{h} = {w * h} pixels > {int(max_pixels)}")
    return im


def decode_image(data, max_pixels: float = MAX_PIXELS, max_side: int | None = None,
                 min_side: int = 1) -> Image.Image:
    """8-bit RGB image from bytes (or a binary file): pixel limit before decoding, at least min_side px per
    side, any mode to RGB, and, with max_side, scaled down (aspect kept) so its longer side is at most max_side
    (JPEGs are decoded at a reduced scale when that is enough). Raises ImageError (a ValueError) naming the reason."""
    with _named_errors():
        im = _open(data, max_pixels)
        w, h = im.size
        if min(w, h) < min_side:
            raise ImageError(f"image too small: {w}x{h} px, at least {min_side} px per side needed")
        if max_side and max(w, h) > max_side:
            im.draft("RGB", (max_side, max_side))
        im.load()
    im = to_rgb(im)
    if max_side and max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return im


def decode_grey(data, side: int, max_pixels: float = MAX_PIXELS) -> Image.Image:
    """8-bit grey image of at least `side` px a side where the image has them, for hashing: the same checks as
    decode_image; a JPEG is decoded straight to grey at the largest DCT reduction (1/2, 1/4, 1/8) that keeps
    `side` px, other formats go through to_rgb (alpha on white) and then to grey."""
    with _named_errors():
        im = _open(data, max_pixels)
        im.draft("L", (side, side))
        im.load()
    return im if im.mode == "L" else to_rgb(im).convert("L")


def _ends_with_eoi(stream) -> bool:
    """Whether a JPEG's last two bytes are its EOI marker. Entropy-coded data never holds FF D9 (a data FF is
    followed by 00 or a restart marker), so a file cut short does not end with it."""
    end = stream.seek(0, 2)
    if end < 4:
        return False
    stream.seek(end - 2)
    return stream.read(2) == b"\xff\xd9"


def check_image(data, max_pixels: float = MAX_PIXELS) -> str | None:
    """None if the bytes (or a binary file) are a complete image within the pixel limit, else the reason;
    nothing is kept. The limit is read from the header before any decode. Completeness: a JPEG that ends with
    its EOI marker is complete (the caller decodes it next, once); any other file, and a JPEG with bytes after
    its EOI, gets a decode here that fails on a truncated stream (JPEGs at 1/8 scale)."""
    stream = io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        with _named_errors():
            with _open(stream, max_pixels) as im:
                if im.format == "JPEG" and _ends_with_eoi(stream):
                    return None
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
    except ImageError as e:
        return str(e)
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """Grayscale, palette, CMYK, 16-bit, float, alpha -> 8-bit RGB (alpha composited on white)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
        return bg
    return im.convert("RGB")
