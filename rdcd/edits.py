"""Deterministic image edits: the vocabulary of copies that copy detection must see through.

Every function is pure: a PIL image and explicit parameters in, a new RGB image out (the input
is never modified). Randomness lives in the caller (`rdcd.synth` draws benchmark edit chains,
the trainer draws augmentations), so the same parameters always give the same pixels.
Fractions (``*_frac``) are relative to the edited image, which keeps one parameter set meaningful
for any input size. Overlays are drawn with PIL, fonts come from Pillow itself: nothing is
downloaded or read from the system.
"""

from __future__ import annotations

import colorsys
import io
import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

Colour = tuple[int, int, int]
Position = tuple[float, float]

MIN_SIDE = 8
EMOJI_MOODS = ("smile", "sad", "wink", "laugh", "heart")


def _rgb(img: Image.Image) -> Image.Image:
    """An RGB copy; alpha is flattened onto white so transparent areas stay neutral."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        base = Image.new("RGB", rgba.size, (255, 255, 255))
        base.paste(rgba, mask=rgba.getchannel("A"))
        return base
    return img.convert("RGB")


def _place(outer: tuple[int, int], inner: tuple[int, int], position: Position) -> tuple[int, int]:
    """Top-left corner of `inner` inside `outer`; position (0,0) is top-left, (1,1) bottom-right."""
    x = round((outer[0] - inner[0]) * min(max(position[0], 0.0), 1.0))
    y = round((outer[1] - inner[1]) * min(max(position[1], 0.0), 1.0))
    return x, y


@lru_cache(maxsize=64)
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's bundled scalable font at `size` pixels (bitmap fallback without FreeType)."""
    return ImageFont.load_default(size=max(int(size), 6))


# --- geometry -------------------------------------------------------------------------------


def crop(img: Image.Image, box_frac: tuple[float, float, float, float]) -> Image.Image:
    """Keep the box (left, top, right, bottom) given as fractions of width and height."""
    w, h = img.size
    left, top, right, bottom = box_frac
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise ValueError(f"crop box {box_frac} must satisfy 0 <= left < right <= 1 (same for y)")
    box = (
        math.floor(left * w),
        math.floor(top * h),
        max(math.ceil(right * w), math.floor(left * w) + 1),
        max(math.ceil(bottom * h), math.floor(top * h) + 1),
    )
    return _rgb(img).crop(box)


def resize(img: Image.Image, scale_x: float, scale_y: float | None = None) -> Image.Image:
    """Scale by (scale_x, scale_y); one value keeps the aspect ratio. At least MIN_SIDE pixels."""
    scale_y = scale_x if scale_y is None else scale_y
    if scale_x <= 0 or scale_y <= 0:
        raise ValueError("resize scales must be positive")
    w, h = img.size
    size = (max(MIN_SIDE, round(w * scale_x)), max(MIN_SIDE, round(h * scale_y)))
    return _rgb(img).resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)


def resize_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to exactly (width, height), ignoring the aspect ratio."""
    return _rgb(img).resize(
        (max(1, size[0]), max(1, size[1])), Image.Resampling.BILINEAR, reducing_gap=3.0
    )


_QUARTER_TURNS = {
    90: Image.Transpose.ROTATE_90,
    180: Image.Transpose.ROTATE_180,
    270: Image.Transpose.ROTATE_270,
}


def rotate(
    img: Image.Image, angle: float, fill: Colour = (0, 0, 0), expand: bool = True
) -> Image.Image:
    """Rotate counter-clockwise by `angle` degrees; multiples of 90 are lossless."""
    rgb = _rgb(img)
    if float(angle) % 90 == 0 and expand:
        turn = int(angle) % 360
        return rgb if turn == 0 else rgb.transpose(_QUARTER_TURNS[turn])
    return rgb.rotate(angle, resample=Image.Resampling.BILINEAR, expand=expand, fillcolor=fill)


def hflip(img: Image.Image) -> Image.Image:
    """Mirror left-right."""
    return _rgb(img).transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def vflip(img: Image.Image) -> Image.Image:
    """Mirror top-bottom."""
    return _rgb(img).transpose(Image.Transpose.FLIP_TOP_BOTTOM)


def pad(
    img: Image.Image,
    sides_frac: tuple[float, float, float, float],
    colour: Colour = (0, 0, 0),
) -> Image.Image:
    """Add (left, top, right, bottom) margins given as fractions of width/height."""
    w, h = img.size
    left, top, right, bottom = (max(0.0, s) for s in sides_frac)
    out = Image.new(
        "RGB",
        (w + round(w * left) + round(w * right), h + round(h * top) + round(h * bottom)),
        colour,
    )
    out.paste(_rgb(img), (round(w * left), round(h * top)))
    return out


def pad_to_aspect(img: Image.Image, aspect: float, colour: Colour = (0, 0, 0)) -> Image.Image:
    """Letterbox / pillarbox to width/height == aspect, centring the image."""
    w, h = img.size
    if aspect <= 0:
        raise ValueError("aspect must be positive")
    new_w, new_h = (round(h * aspect), h) if w / h < aspect else (w, round(w / aspect))
    out = Image.new("RGB", (max(w, new_w), max(h, new_h)), colour)
    out.paste(_rgb(img), _place(out.size, (w, h), (0.5, 0.5)))
    return out


def add_border(
    img: Image.Image, width_frac: float, colour: Colour = (255, 255, 255)
) -> Image.Image:
    """A uniform frame whose width is a fraction of the shorter side."""
    width = max(1, round(min(img.size) * width_frac))
    return ImageOps.expand(_rgb(img), border=width, fill=colour)


# --- pixels ---------------------------------------------------------------------------------


def jpeg(img: Image.Image, quality: int) -> Image.Image:
    """Re-encode as JPEG at `quality` (1-95) and decode again: the artefacts of a re-upload."""
    buffer = io.BytesIO()
    _rgb(img).save(buffer, format="JPEG", quality=int(min(max(quality, 1), 95)))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """1.0 keeps the image, < 1 darker, > 1 brighter."""
    return ImageEnhance.Brightness(_rgb(img)).enhance(factor)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """1.0 keeps the image, 0 is flat grey."""
    return ImageEnhance.Contrast(_rgb(img)).enhance(factor)


def saturation(img: Image.Image, factor: float) -> Image.Image:
    """1.0 keeps the image, 0 is grayscale, > 1 more vivid."""
    return ImageEnhance.Color(_rgb(img)).enhance(factor)


def hue_shift(img: Image.Image, shift: float) -> Image.Image:
    """Rotate hue by `shift` turns (-0.5..0.5) in HSV, keeping saturation and value."""
    hsv = np.asarray(_rgb(img).convert("HSV")).copy()
    hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + round(shift * 256)) % 256).astype(np.uint8)
    return Image.fromarray(hsv, mode="HSV").convert("RGB")


def grayscale(img: Image.Image) -> Image.Image:
    """Luma only, kept as 3 channels."""
    return _rgb(img).convert("L").convert("RGB")


def blur(img: Image.Image, radius: float) -> Image.Image:
    """Gaussian blur with `radius` pixels."""
    return _rgb(img).filter(ImageFilter.GaussianBlur(radius))


def sharpen(img: Image.Image, factor: float) -> Image.Image:
    """Unsharp-style sharpening; 1.0 keeps the image."""
    return ImageEnhance.Sharpness(_rgb(img)).enhance(factor)


def noise(img: Image.Image, sigma: float, seed: int) -> Image.Image:
    """Additive Gaussian pixel noise (sigma in 0-255 units); `seed` makes it reproducible."""
    arr = np.asarray(_rgb(img), dtype=np.float32)
    arr = arr + np.random.default_rng(seed).normal(0.0, sigma, arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def pixelate(img: Image.Image, block_frac: float) -> Image.Image:
    """Mosaic with blocks of `block_frac` of the shorter side."""
    rgb = _rgb(img)
    block = max(1, round(min(rgb.size) * block_frac))
    small = rgb.resize(
        (max(1, rgb.width // block), max(1, rgb.height // block)), Image.Resampling.BOX
    )
    return small.resize(rgb.size, Image.Resampling.NEAREST)


# --- overlays -------------------------------------------------------------------------------


def overlay_text(
    img: Image.Image,
    text: str,
    font_size_frac: float,
    opacity: float = 1.0,
    colour: Colour = (255, 255, 255),
    position: Position = (0.5, 0.9),
    stroke: bool = True,
) -> Image.Image:
    """Write `text` with a font height of `font_size_frac` × image height at `position`."""
    rgb = _rgb(img)
    face = font(round(rgb.height * font_size_frac))
    layer = Image.new("RGBA", rgb.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    stroke_width = max(1, round(face.size / 15)) if stroke and hasattr(face, "size") else 0
    left, top, right, bottom = draw.textbbox((0, 0), text, font=face, stroke_width=stroke_width)
    x, y = _place(rgb.size, (right - left, bottom - top), position)
    alpha = round(255 * min(max(opacity, 0.0), 1.0))
    shade = tuple(0 if sum(colour) > 382 else 255 for _ in range(3))
    draw.text(
        (x - left, y - top),
        text,
        font=face,
        fill=(*colour, alpha),
        stroke_width=stroke_width,
        stroke_fill=(*shade, alpha),
    )
    return Image.alpha_composite(rgb.convert("RGBA"), layer).convert("RGB")


def make_emoji(size: int, hue: float = 0.14, mood: str = "smile") -> Image.Image:
    """A drawn emoji-like sticker (RGBA, transparent outside the disc).

    mood is one of EMOJI_MOODS; hue (0..1) picks the face colour.
    """
    if mood not in EMOJI_MOODS:
        raise ValueError(f"mood must be one of {EMOJI_MOODS}, got {mood!r}")
    size = max(int(size), 8)
    scale = 4  # draw large, then downsample: anti-aliased edges without extra dependencies
    s = size * scale
    face = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue % 1.0, 0.85, 1.0))
    dark = (40, 30, 20, 255)
    out = Image.new("RGBA", (s, s), (0, 0, 0, 0))
    d = ImageDraw.Draw(out)
    d.ellipse((0, 0, s - 1, s - 1), fill=(*face, 255), outline=dark, width=max(1, s // 32))
    eye_w, eye_h = s // 9, s // 6
    for cx in (int(s * 0.34), int(s * 0.66)):
        if mood == "wink" and cx > s // 2:
            d.line((cx - eye_w, s * 0.38, cx + eye_w, s * 0.38), fill=dark, width=s // 24)
        elif mood == "heart":
            _heart(d, cx, int(s * 0.38), s // 7, (220, 20, 60, 255))
        else:
            d.ellipse((cx - eye_w // 2, s * 0.3, cx + eye_w // 2, s * 0.3 + eye_h), fill=dark)
    mouth = (s * 0.25, s * 0.45, s * 0.75, s * 0.8)
    if mood == "sad":
        d.arc((s * 0.3, s * 0.62, s * 0.7, s * 0.95), 200, 340, fill=dark, width=s // 22)
    elif mood == "laugh":
        d.chord(mouth, 0, 180, fill=dark)
    else:
        d.arc(mouth, 20, 160, fill=dark, width=s // 22)
    return out.resize((size, size), Image.Resampling.LANCZOS)


def _heart(draw: ImageDraw.ImageDraw, cx: int, cy: int, r: int, fill) -> None:
    draw.ellipse((cx - r, cy - r, cx, cy), fill=fill)
    draw.ellipse((cx, cy - r, cx + r, cy), fill=fill)
    draw.polygon([(cx - r, cy - r // 3), (cx + r, cy - r // 3), (cx, cy + r)], fill=fill)


def overlay_image(
    img: Image.Image,
    overlay: Image.Image,
    size_frac: float,
    opacity: float = 1.0,
    position: Position = (1.0, 1.0),
) -> Image.Image:
    """Paste `overlay` (its alpha respected) scaled to `size_frac` of the shorter side of img."""
    rgb = _rgb(img)
    target = max(1, round(min(rgb.size) * size_frac))
    ratio = target / max(overlay.size)
    sticker = overlay.convert("RGBA").resize(
        (max(1, round(overlay.width * ratio)), max(1, round(overlay.height * ratio))),
        Image.Resampling.BILINEAR,
    )
    alpha = np.asarray(sticker.getchannel("A"), dtype=np.float32) * min(max(opacity, 0.0), 1.0)
    sticker.putalpha(Image.fromarray(alpha.astype(np.uint8)))
    layer = Image.new("RGBA", rgb.size, (0, 0, 0, 0))
    layer.paste(sticker, _place(rgb.size, sticker.size, position))
    return Image.alpha_composite(rgb.convert("RGBA"), layer).convert("RGB")


def paste_onto(
    background: Image.Image,
    img: Image.Image,
    size_frac: float,
    position: Position = (0.5, 0.5),
) -> Image.Image:
    """`img` scaled to `size_frac` of the background's shorter side, pasted into it.

    The copy becomes a part of another picture (a collage, a photo of a screen).
    """
    bg = _rgb(background)
    target = max(MIN_SIDE, round(min(bg.size) * size_frac))
    ratio = target / max(img.size)
    inner = resize_to(img, (max(1, round(img.width * ratio)), max(1, round(img.height * ratio))))
    bg.paste(inner, _place(bg.size, inner.size, position))
    return bg


def meme_frame(
    img: Image.Image,
    top_text: str,
    bottom_text: str = "",
    bar_frac: float = 0.18,
    bar_colour: Colour = (255, 255, 255),
    text_colour: Colour = (0, 0, 0),
) -> Image.Image:
    """A caption bar above (and optionally below) the picture, as in meme generators."""
    rgb = _rgb(img)
    bar = max(MIN_SIDE, round(rgb.height * bar_frac))
    bottom_bar = bar if bottom_text else 0
    out = Image.new("RGB", (rgb.width, rgb.height + bar + bottom_bar), bar_colour)
    out.paste(rgb, (0, bar))
    draw = ImageDraw.Draw(out)
    for text, top in ((top_text, 0), (bottom_text, bar + rgb.height)):
        if not text:
            continue
        face = _fitting_font(draw, text, rgb.width * 0.92, bar * 0.6)
        left, t, right, b = draw.textbbox((0, 0), text, font=face)
        x = (rgb.width - (right - left)) // 2 - left
        y = top + (bar - (b - t)) // 2 - t
        draw.text((x, y), text, font=face, fill=text_colour)
    return out


def screenshot(
    img: Image.Image,
    title: str = "",
    theme: Colour = (250, 250, 250),
    width_frac: float = 0.88,
    canvas_aspect: float = 9 / 16,
) -> Image.Image:
    """The picture as seen in a phone screenshot of a social app: status bar, header, buttons.

    The canvas has width/height `canvas_aspect`; the picture fills `width_frac` of its width.
    """
    rgb = _rgb(img)
    width = max(rgb.width, 64)
    canvas = Image.new("RGB", (width, max(round(width / canvas_aspect), 64)), theme)
    ink = (20, 20, 20) if sum(theme) > 382 else (235, 235, 235)
    muted = tuple((a + b) // 2 for a, b in zip(theme, ink, strict=True))
    draw = ImageDraw.Draw(canvas)
    unit = canvas.height / 40
    draw.rectangle((0, 0, width, unit * 1.6), fill=muted)  # status bar
    draw.text((unit * 0.6, unit * 0.2), "9:41", font=font(round(unit)), fill=theme)
    draw.ellipse((unit * 0.6, unit * 2.2, unit * 2.8, unit * 4.4), fill=muted)  # avatar
    header = title or "user"
    draw.text((unit * 3.4, unit * 2.6), header, font=font(round(unit * 1.1)), fill=ink)
    inner_w = round(width * width_frac)
    inner_h = max(1, min(round(rgb.height * inner_w / rgb.width), round(canvas.height - unit * 9)))
    picture = resize_to(rgb, (inner_w, inner_h))
    canvas.paste(picture, ((width - inner_w) // 2, round(unit * 5)))
    y = unit * 5 + inner_h + unit * 0.8
    for i in range(3):  # like / comment / share buttons
        x = unit * (0.8 + 2.6 * i)
        draw.rounded_rectangle((x, y, x + unit * 1.6, y + unit * 1.6), radius=unit / 3, fill=muted)
    for line in range(3):  # greyed-out caption and comment lines
        top = y + unit * (2.6 + 1.4 * line)
        if top + unit * 0.7 < canvas.height:
            right = width * (0.9 - 0.2 * line)
            draw.rectangle((unit * 0.8, top, right, top + unit * 0.7), fill=muted)
    return canvas


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, max_width: float, max_height: float):
    size = max(6, round(max_height))
    while size > 6:
        face = font(size)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
        if right - left <= max_width and bottom - top <= max_height * 1.2:
            return face
        size = round(size * 0.85)
    return font(6)
