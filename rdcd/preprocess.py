"""Image bytes -> RGB pixels: the one decoding path shared by training and embedding.

Training and embedding must see identical pixels for the same file, otherwise the descriptors
drift from what the model learned. Everything a real web image can throw at us is handled
here: EXIF orientation, alpha, palettes, CMYK, 16-bit, animations, decompression bombs and
broken files (a clear ``ImageError`` with a ``stage``, never a crash or a silent garbage array).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

DEFAULT_MAX_PIXELS = 178_956_970
"""Pillow's own hard limit (2 x ``Image.MAX_IMAGE_PIXELS``), about 13400 x 13400."""

POLICIES = ("square", "short_side")
RESAMPLE = Image.Resampling.BILINEAR
REDUCING_GAP = 3.0
"""Box-reduce first, then bilinear: fast on big sources, visually equal to a full resample."""

ALLOWED_FORMATS = frozenset(
    {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "ICO", "AVIF", "HEIF"}
)
"""Formats we decode; others (EPS runs Ghostscript, PSD, PDF, ...) are refused as unsupported."""

# EXIF orientation tag -> the transpose that brings the pixels upright (as ImageOps uses).
_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPS_AXES = {5, 6, 7, 8}
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    zlib.error,
)
_WHITE = (255, 255, 255)


class ImageError(ValueError):
    """An input that cannot become pixels; ``stage`` says why (decode, too_large, unsupported)."""

    def __init__(self, stage: str, message: str) -> None:
        super().__init__(message)
        self.stage = stage


def decode_image(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    target_size: int | None = None,
    draft: bool = True,
) -> Image.Image:
    """Decode ``data`` to an upright RGB image (not resized).

    With ``target_size`` and ``draft``, a JPEG is decoded at a reduced scale (1/2, 1/4 or 1/8,
    done inside the DCT, hence fast) that still keeps both sides >= ``target_size``, which is
    enough for either resize policy.
    """
    return _decode(data, max_pixels=max_pixels, target_size=target_size, draft=draft)[0]


def resize_image(img: Image.Image, size: int, policy: str) -> Image.Image:
    """Resize by ``policy``: "square" (size x size, aspect ignored: the DISC/RDCD protocol)
    or "short_side" (short side = size, aspect kept, long side truncated like torchvision)."""
    new_size = output_size(img.size, size, policy)
    if new_size == img.size:
        return img
    return img.resize(new_size, RESAMPLE, reducing_gap=REDUCING_GAP)


def load_rgb(
    data: bytes,
    *,
    size: int,
    policy: str = "square",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft: bool = True,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode and resize: returns the (H, W, 3) uint8 array and the ORIGINAL upright
    (width, height) of the file, before any draft reduction or resize."""
    output_size((1, 1), size, policy)  # argument errors before any decoding work
    img, original_size = _decode(data, max_pixels=max_pixels, target_size=size, draft=draft)
    # Sized from the original, so a draft's rounding never changes the output shape.
    new_size = output_size(original_size, size, policy)
    if img.size != new_size:
        img = img.resize(new_size, RESAMPLE, reducing_gap=REDUCING_GAP)
    return np.array(img, dtype=np.uint8), original_size


def output_size(source: tuple[int, int], size: int, policy: str) -> tuple[int, int]:
    """The (width, height) that ``policy`` gives a ``source`` of (width, height)."""
    if size < 1:
        raise ValueError(f"resize size must be >= 1, got {size}")
    width, height = source
    if policy == "square":
        return (size, size)
    if policy == "short_side":
        if width <= height:
            return (size, max(1, int(size * height / width)))
        return (max(1, int(size * width / height)), size)
    raise ValueError(f"unknown resize policy {policy!r}; expected one of {POLICIES}")


def _decode(
    data: bytes, *, max_pixels: int, target_size: int | None, draft: bool
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode to upright RGB; also return the original upright size (before draft)."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if not data:
        raise ImageError("decode", "empty input (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"image over Pillow's hard pixel limit: {e}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(
            "decode", f"not a recognised image ({len(data)} bytes, starting {data[:12]!r})"
        ) from e
    if im.format not in ALLOWED_FORMATS:
        raise ImageError("unsupported", f"image format {im.format} is not accepted")
    width, height = im.size
    # Checked on the header's size, before any pixel is decoded.
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"image is {width}x{height} = {width * height} pixels, "
            f"over the limit of {max_pixels} pixels (preprocess.max_pixels)",
        )
    try:
        orientation = _orientation(im)
        if draft and target_size is not None and im.format in ("JPEG", "MPO"):
            # Both sides >= target keeps enough resolution for square and short_side alike.
            im.draft("RGB", (target_size, target_size))
        im.load()
        rgb = _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("too_large", f"image over Pillow's hard pixel limit: {e}") from e
    except _DECODE_ERRORS as e:
        raise ImageError("decode", f"corrupt or truncated {im.format} image: {e}") from e
    if orientation in _ORIENTATION:
        rgb = rgb.transpose(_ORIENTATION[orientation])
    if orientation in _SWAPS_AXES:
        width, height = height, width
    return rgb, (width, height)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1 when absent); a corrupt EXIF block must not lose the image."""
    try:
        value = im.getexif().get(0x0112, 1)
    except (SyntaxError, ValueError, TypeError, struct.error, IndexError, KeyError):
        return 1
    return value if isinstance(value, int) else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white, 16-bit scaled to 8-bit."""
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(im).astype(np.int64)
        # 16-bit range scaled (not clipped) to 8-bit with rounding: 65535 -> 255.
        gray = ((np.clip(values, 0, 65535) + 128) // 257).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode == "F":
        raise ImageError("unsupported", "floating-point images (mode F) are not accepted")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, _WHITE)
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
