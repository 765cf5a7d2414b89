"""Real image files for tests: every format and failure mode the decoders must handle.

Shared by every test module (``from images import ...``; tests/ is on sys.path). Everything
is deterministic (seeded) and small, so the whole good + bad set builds in well under a second;
only ``large_jpeg`` is big in pixels; it is cheap to encode and kept out of the default sets.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RED = (255, 0, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def photo_like(seed: int, size: tuple[int, int] = (160, 120)) -> Image.Image:
    """An RGB "photo": smooth random colour field + random shapes + grain, distinct per seed.

    Different seeds give visibly different content, so descriptors (and hashes) differ; the
    same seed always gives the same pixels.
    """
    rng = np.random.default_rng(seed)
    width, height = size
    field = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize(size, Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, x1 = sorted(rng.integers(0, width, size=2).tolist())
        y0, y1 = sorted(rng.integers(0, height, size=2).tolist())
        colour = tuple(rng.integers(0, 256, size=3).tolist())
        if rng.random() < 0.5:
            draw.ellipse((x0, y0, x1 + 1, y1 + 1), fill=colour)
        else:
            draw.rectangle((x0, y0, x1 + 1, y1 + 1), fill=colour)
    grain = rng.integers(-12, 13, size=(height, width, 3))
    pixels = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    """``img`` saved as ``fmt`` (a Pillow format name: JPEG, PNG, WEBP, GIF, TIFF, ...)."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def jpeg(seed: int = 0, size: tuple[int, int] = (160, 120), quality: int = 90) -> bytes:
    """A plain baseline RGB JPEG of ``photo_like(seed, size)``."""
    return encode(photo_like(seed, size), "JPEG", quality=quality)


def png_alpha() -> bytes:
    """RGBA PNG 64x48: left half fully transparent (decodes to white), right half opaque red."""
    img = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    img.paste((*RED, 255), (32, 0, 64, 48))
    return encode(img, "PNG")


def palette_png(transparent: bool) -> bytes:
    """Palette (P) PNG 64x48: left half palette index 0, right half index 1 (red).

    Index 0 is black; with ``transparent`` it is the tRNS transparent index (decodes to white).
    """
    img = Image.new("P", (64, 48), 0)
    img.putpalette([0, 0, 0, *RED] + [0, 0, 0] * 254)
    img.paste(1, (32, 0, 64, 48))
    return encode(img, "PNG", **({"transparency": 0} if transparent else {}))


def webp(seed: int = 1, size: tuple[int, int] = (96, 64)) -> bytes:
    """A lossy RGB WebP of ``photo_like``."""
    return encode(photo_like(seed, size), "WEBP", quality=90)


def animated_gif() -> bytes:
    """Three-frame 40x30 GIF: red, blue, green. Decoding must give the first (red) frame."""
    frames = [Image.new("RGB", (40, 30), c) for c in (RED, BLUE, (0, 255, 0))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def png16() -> bytes:
    """16-bit grayscale (I;16) PNG 256x8: a horizontal ramp 0..65535 (must not clip to white)."""
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)
    return encode(Image.fromarray(np.tile(ramp, (8, 1))), "PNG")


def cmyk_jpeg() -> bytes:
    """CMYK JPEG 48x32: left half pure cyan (RGB ~(0,255,255)), right half pure black."""
    img = Image.new("CMYK", (48, 32), (255, 0, 0, 0))
    img.paste((0, 0, 0, 255), (24, 0, 48, 32))
    return encode(img, "JPEG", quality=95)


def exif_rotated_jpeg() -> bytes:
    """JPEG stored 64x32 (left half red, right half blue) with EXIF orientation 6.

    Orientation 6 means "rotate 90 degrees clockwise to display": upright it is 32x64 with red
    on top and blue at the bottom.
    """
    img = Image.new("RGB", (64, 32), RED)
    img.paste(BLUE, (32, 0, 64, 32))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=95, exif=exif.tobytes())


def grayscale_png() -> bytes:
    """8-bit grayscale (L) PNG 50x40 with a horizontal ramp 0..245."""
    ramp = (np.arange(50, dtype=np.uint8) * 5)[None, :].repeat(40, axis=0)
    return encode(Image.fromarray(ramp, mode="L"), "PNG")


def bilevel_png() -> bytes:
    """1-bit PNG 40x40: left half black, right half white."""
    img = Image.new("1", (40, 40), 0)
    img.paste(1, (20, 0, 40, 40))
    return encode(img, "PNG")


def tiny_png() -> bytes:
    """A 1x1 red RGB PNG (must upscale to any target size)."""
    return encode(Image.new("RGB", (1, 1), RED), "PNG")


def large_jpeg(size: tuple[int, int] = (12000, 9000)) -> bytes:
    """A very large (default 108 Mpx) but cheap-to-encode JPEG: a few flat colour bands.

    Exercises the pixel limits and JPEG draft decoding. Cheap to encode (< 1 s), but a full
    decode needs ~330 MB, so it is not part of ``good_image_bytes()``.
    """
    width, height = size
    img = Image.new("RGB", size, (40, 90, 160))
    img.paste((200, 60, 30), (0, 0, width // 2, height // 2))
    img.paste((250, 240, 20), (width // 3, height // 3, width * 2 // 3, height * 2 // 3))
    return encode(img, "JPEG", quality=70)


def good_image_bytes() -> dict[str, bytes]:
    """Every decodable case, keyed by file name (extension matches the content)."""
    return {
        "photo.jpg": jpeg(0),
        "alpha.png": png_alpha(),
        "palette.png": palette_png(transparent=False),
        "palette_transparent.png": palette_png(transparent=True),
        "photo.webp": webp(),
        "animated.gif": animated_gif(),
        "gray16.png": png16(),
        "cmyk.jpg": cmyk_jpeg(),
        "exif_rotated.jpg": exif_rotated_jpeg(),
        "gray.png": grayscale_png(),
        "bilevel.png": bilevel_png(),
        "tiny.png": tiny_png(),
    }


def png_bomb(size: tuple[int, int] = (20000, 20000)) -> bytes:
    """A ~100-byte PNG whose header claims ``size`` (default 400 Mpx, above any sane limit).

    The header is valid (correct CRCs), so only a size check can stop it. The pixel data is one
    row of an unfinished zlib stream: a decoder that does not check the size first fails as
    truncated (stage "decode") instead of allocating the claimed size.
    """
    width, height = size

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    stream = zlib.compressobj()
    pixels = stream.compress(b"\x00" * (width + 1)) + stream.flush(zlib.Z_SYNC_FLUSH)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def bad_image_bytes() -> dict[str, tuple[bytes, str]]:
    """Every failure case, keyed by file name -> (bytes, expected ``ImageError.stage``).

    All fail with the default limits, so pipeline tests can use them unchanged.
    """
    good = jpeg(3, (128, 96))
    float_tiff = encode(Image.fromarray(np.ones((8, 8), dtype=np.float32)), "TIFF")
    return {
        "truncated.jpg": (good[: len(good) // 2], "decode"),
        "empty.jpg": (b"", "decode"),
        "text.jpg": (b"this is not an image, just text\n" * 4, "decode"),
        "corrupt.png": (png_alpha()[:60] + b"\x00" * 40, "decode"),
        "bomb.png": (png_bomb(), "too_large"),
        "float.tiff": (float_tiff, "unsupported"),
        "image.pcx": (encode(Image.new("RGB", (8, 8), RED), "PCX"), "unsupported"),
    }


def write_good_images(directory: str | Path) -> dict[str, Path]:
    """Write ``good_image_bytes()`` into ``directory``; returns file name -> path."""
    return {name: _write(directory, name, data) for name, data in good_image_bytes().items()}


def write_bad_images(directory: str | Path) -> dict[str, tuple[Path, str]]:
    """Write ``bad_image_bytes()`` into ``directory``; returns name -> (path, expected stage)."""
    return {
        name: (_write(directory, name, data), stage)
        for name, (data, stage) in bad_image_bytes().items()
    }


def write_photos(
    directory: str | Path, count: int, size: tuple[int, int] = (160, 120), start_seed: int = 0
) -> list[Path]:
    """Write ``count`` distinct ``photo_like`` JPEGs named photo_<seed>.jpg; returns the paths."""
    return [
        _write(directory, f"photo_{seed:05d}.jpg", jpeg(seed, size))
        for seed in range(start_seed, start_seed + count)
    ]


def _write(directory: str | Path, name: str, data: bytes) -> Path:
    path = Path(directory) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
