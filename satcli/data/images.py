"""Robust image loading: any file Pillow can read becomes an 8-bit RGB picture, anything else a clear reason.

Used by ``satcli caption`` (and meant for the dataset readers) so that every image reaches a model the same way:

- EXIF orientation is applied (a phone photo taken upright is captioned upright).
- Every mode becomes 8-bit RGB: grayscale and 1-bit are replicated, palette images are expanded (their
  transparency honoured), RGBA / LA / PA are composited on white, CMYK and YCbCr are converted, and 16-bit or
  32-bit integer images (``I;16``, ``I``) are scaled to 8 bits instead of clipped.
- Oversized images are refused by a pixel limit checked on the header, before any pixel is decoded (a
  "decompression bomb" is a small file that would expand to gigabytes).
- Empty, truncated, unreadable or non-image files (a text file named ``.jpg``) raise :class:`ImageError`
  with a short kind (``empty``, ``not-an-image``, ``truncated``, ``too-large``, ``unreadable``) and a reason.
- Only the formats in :data:`IMAGE_FORMATS` are ever opened, whatever the file's name: Pillow otherwise picks a
  decoder from the first bytes, and for an EPS or PDF file named ``.jpg`` that decoder runs Ghostscript.
  Every place in satcli that opens an image goes through :func:`open_image_file`.

JPEGs are decoded at a reduced scale when the model wants far fewer pixels than the file has (libjpeg's DCT
scaling, as ``Image.thumbnail`` does): a 1600×1200 photo for a 224-pixel model decodes about 3× faster.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow's own default (about 89.5 million pixels, a 9,460 × 9,460 picture); bigger images are refused.
DEFAULT_MAX_PIXELS = 89_478_485
HARD_MAX_PIXELS = 2 * DEFAULT_MAX_PIXELS  # beyond this Pillow refuses to open a file at all

# File extensions treated as images when walking directories or expanding globs (compared lower-case).
IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff",
})

# The Pillow formats satcli opens (JPEG covers MPO, the multi-picture JPEG of many cameras); anything else is
# "not-an-image". The one list: every opener passes it as ``Image.open(..., formats=IMAGE_FORMATS)``.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "JPEG, PNG, WebP, GIF, BMP, TIFF"  # the same, as a user reads them

_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = {5, 6, 7, 8}  # these orientations swap width and height
_WHITE = (255, 255, 255)


class ImageError(Exception):
    """An image that cannot be used. ``kind`` is a short category for counting; ``str()`` is ``kind: reason``."""

    def __init__(self, kind: str, reason: str, width: int | None = None, height: int | None = None):
        self.kind = kind
        self.reason = reason
        self.width, self.height = width, height  # known for images refused as too large
        super().__init__(f"{kind}: {reason}")


@dataclass
class LoadedImage:
    """An 8-bit RGB picture and the size of the original, after EXIF orientation."""

    image: Image.Image  # mode "RGB"; possibly smaller than width × height when decoded at a reduced scale
    width: int
    height: int


def load_image(path: str | Path | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               min_size: int | None = None) -> LoadedImage:
    """Open ``path`` (a file, or an encoded image's bytes) as 8-bit RGB with EXIF orientation applied. Raises
    :class:`ImageError` when it cannot.

    ``max_pixels``: refuse images with more pixels than this (``None``: Pillow's own limit only). Pillow itself
    refuses anything over twice ``PIL.Image.MAX_IMAGE_PIXELS`` (:data:`HARD_MAX_PIXELS`) whatever this says.
    ``min_size``: the caller will shrink the image to ``min_size`` × ``min_size``; JPEGs may then be decoded at
    1/2, 1/4 or 1/8 scale, never below that size on either side.
    """
    if isinstance(path, bytes | bytearray | memoryview):
        n_bytes, opened = len(path), io.BytesIO(path)
    else:
        opened = path = Path(path)
        try:
            n_bytes = os.stat(path).st_size
        except OSError as error:
            raise ImageError("unreadable", error.strerror or str(error)) from error
    if n_bytes == 0:
        raise ImageError("empty", "the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides, below
            with open_image_file(opened) as im:
                return _load_opened(im, max_pixels, min_size)
    except ImageError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageError("too-large", f"Pillow refuses it as a decompression bomb ({error})") from error
    except UnidentifiedImageError as error:
        raise ImageError("not-an-image", f"not an image file satcli reads ({FORMAT_NAMES})") from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:  # Pillow's decoders raise all of these
        if isinstance(error, OSError) and error.errno is not None:  # a real I/O error, not a codec complaint
            raise ImageError("unreadable", error.strerror or str(error)) from error
        message = str(error) or type(error).__name__
        raise ImageError("truncated", f"truncated or corrupt image data ({message[:200]})") from error


def open_image_file(source: str | Path | IO[bytes]) -> Image.Image:
    """``Image.open`` restricted to :data:`IMAGE_FORMATS` (lazy: only the header is read). Raises Pillow's
    ``UnidentifiedImageError`` for any other format, before a decoder of it (or Ghostscript) can run."""
    return Image.open(source, formats=IMAGE_FORMATS)


def load_picture(im: Image.Image, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """A picture already in memory (a PIL image) the way :func:`load_image` treats a file: the pixel limit, EXIF
    orientation, 8-bit RGB. Raises :class:`ImageError` when it cannot."""
    try:
        return _load_opened(im, max_pixels, None)
    except ImageError:
        raise
    except (OSError, ValueError) as error:
        raise ImageError("unreadable", f"cannot use this picture ({str(error)[:200]})") from error


def _load_opened(im: Image.Image, max_pixels: int | None, min_size: int | None) -> LoadedImage:
    width, height = im.size  # from the header: nothing is decoded yet
    orientation = _orientation(im)
    if orientation in _TRANSPOSED_ORIENTATIONS:
        width, height = height, width
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError("too-large", f"{width}×{height} is {width * height:,} pixels, over the limit of "
                                      f"{max_pixels:,} (raise it with --max-pixels)", width, height)
    if min_size and im.format == "JPEG" and im.mode in ("RGB", "L", "CMYK"):
        im.draft(im.mode, (min_size, min_size))
    im.load()
    if orientation not in (None, 1):
        im = ImageOps.exif_transpose(im)
    return LoadedImage(to_rgb(im), width, height)


def _orientation(im: Image.Image) -> int | None:
    try:
        value = im.getexif().get(_EXIF_ORIENTATION)
    except Exception:  # a broken EXIF block is not a reason to refuse the pixels
        return None
    return value if isinstance(value, int) and 1 <= value <= 8 else None


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB. Transparency is composited on white; high bit depths are scaled, not clipped."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    elif mode == "PA":
        im = im.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        im = im.convert("RGBA")  # premultiplied modes are undone by this conversion
        background = Image.new("RGBA", im.size, _WHITE + (255,))
        return Image.alpha_composite(background, im).convert("RGB")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(im)), "L").convert("RGB")
    return im.convert("RGB")  # 1, L, CMYK, YCbCr, LAB, HSV, RGBX ...


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """High-bit-depth pixels → uint8. Integers are taken as 16-bit (0..65535 → 0..255), the usual case for
    ``I;16`` and ``I`` images; floats in [0, 1] as fractions; anything larger is stretched to its own maximum."""
    floating = np.issubdtype(values.dtype, np.floating)
    values = values.astype(np.float64)
    top = float(values.max()) if values.size else 0.0
    if floating and top <= 1.0:
        scale = 1.0
    else:
        scale = max(65535.0, top) if not floating else max(top, 1e-12)
    return np.clip(np.rint(values / scale * 255.0), 0, 255).astype(np.uint8)


def is_image_name(name: str) -> bool:
    """True when ``name`` has one of :data:`IMAGE_EXTENSIONS` (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS
