"""Robust image-file decoding: any PIL mode to 8-bit RGB, and a cheap validity check.

Real folders contain truncated downloads, zero-byte files, text files named ``.jpg``, 16-bit PNGs, CMYK JPEGs
and decompression bombs. Nothing here raises on such input except through ``ImageReadError``; callers turn
that into a skipped file with a one-line reason instead of a crashed training run.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# Our own pixel cap (instead of mutating PIL's process-wide MAX_IMAGE_PIXELS): 64 MP is ~8000x8000.
MAX_PIXELS = 64_000_000
IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


class ImageReadError(Exception):
    """A file that cannot be used as an image; ``str()`` is the one-line reason."""


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (PIL cannot identify it)"
    if isinstance(exc, Image.DecompressionBombError):
        return "decompression bomb (refused by PIL)"
    msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return f"unreadable: {msg}"


def _open(src: str | os.PathLike | bytes) -> Image.Image:
    """Open lazily (header only) and refuse empty files and images above MAX_PIXELS."""
    if isinstance(src, bytes):
        if not src:
            raise ImageReadError("empty file")
        fp: object = io.BytesIO(src)
    else:
        if os.path.getsize(src) == 0:
            raise ImageReadError("empty file (0 bytes)")
        fp = src
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own, stricter cap
        im = Image.open(fp)  # type: ignore[arg-type]
    w, h = im.size
    if w * h > MAX_PIXELS:
        im.close()
        raise ImageReadError(f"decompression bomb guard: {w}x{h} exceeds {MAX_PIXELS // 10**6} MP")
    if w == 0 or h == 0:
        im.close()
        raise ImageReadError(f"degenerate size {w}x{h}")
    return im


def check_image(path: str | os.PathLike) -> str | None:
    """Return why ``path`` is unusable, or None. Cheap: header + verify(); JPEGs get a 1/8-scale decode,
    because verify() does not notice a truncated JPEG (the most common corruption)."""
    try:
        im = _open(path)
        fmt = im.format
        with im:
            im.verify()
        if fmt == "JPEG":
            with _open(path) as im:
                im.draft("RGB", (1, 1))
                im.load()
    except ImageReadError as e:
        return str(e)
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, struct.error, ...)
        return _reason(e)
    return None


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB: 16/32-bit integer and float greys are rescaled (not clipped),
    transparency is composited on white, palette/CMYK/YCbCr/1-bit go through PIL's converters."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT or mode == "I":
        a = np.asarray(im).astype(np.float64)
        if mode in _SIXTEEN_BIT or a.max(initial=0) > 255:
            a = a / 257.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im).astype(np.float64)
        a = np.nan_to_num(a, nan=0.0, posinf=255.0, neginf=0.0)
        if a.max(initial=0) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def load_rgb(src: str | os.PathLike | bytes, *, min_size: int | None = None, exif: bool = True) -> Image.Image:
    """Decode to RGB or raise ImageReadError. ``min_size`` lets JPEGs decode at a reduced DCT scale that
    still keeps both sides >= min_size (big camera files decode several times faster)."""
    try:
        with _open(src) as im:
            if min_size and im.format == "JPEG":
                im.draft("RGB", (min_size, min_size))
            im.load()
            if exif:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im).copy()
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(_reason(e)) from e


def load_label_map(path: str | os.PathLike) -> np.ndarray:
    """A PNG label map (mode L, P or 16-bit) -> (H,W) int64 array of raw label ids (255 = ignore)."""
    try:
        with _open(path) as im:
            im.load()
            if im.mode not in ("L", "P", "I", "1") and im.mode not in _SIXTEEN_BIT:
                raise ImageReadError(f"mask must be a single-channel label map (L/P/I), got mode {im.mode}")
            return np.asarray(im).astype(np.int64)
    except ImageReadError:
        raise
    except Exception as e:
        raise ImageReadError(_reason(e)) from e
