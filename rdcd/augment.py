"""SSCD's "advanced" augmentation set (METHOD.md §3), drawn from an explicit random generator.

Training shows the network two independent draws of this chain per image and asks it to map
both to the same descriptor, so the chain is the catalogue of copies the model learns to see
through. The parameters are sampled here; the pixel operations are the deterministic
primitives of ``rdcd.edits`` (the same ones ``rdcd synth`` uses to build benchmarks), so one
generator state always gives the same pixels. Overlay assets are generated (Pillow's bundled
font, drawn emoji): nothing is downloaded.
"""

from __future__ import annotations

import math
import string
from dataclasses import dataclass

import numpy as np
from PIL import Image

from rdcd import edits

TEXT_ALPHABET = string.ascii_letters + string.digits + string.punctuation
REFERENCE_SIZE = 224
"""The view size SSCD's pixel-valued parameters (blur radius) were chosen for."""


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of each step, SSCD's values by default."""

    size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    p_flip: float = 0.5
    p_rotate90: float = 0.05
    p_text: float = 0.1
    text_length: int = 100
    p_emoji: float = 0.2
    p_rotate: float = 0.05
    p_jitter: float = 0.8
    jitter: tuple[float, float, float, float] = (0.8, 0.8, 0.8, 0.2)
    p_grayscale: float = 0.2
    p_blur: float = 0.5
    blur_radius: tuple[float, float] = (1.0, 5.0)
    p_jpeg: float = 0.2

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"augmentation size must be >= 8 pixels, got {self.size}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.scale}")


def generator(seed: int, *keys: int) -> np.random.Generator:
    """An independent stream per (seed, image, draw, ...): reproducible in any worker order."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), *(int(k) for k in keys)]))


def random_resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[float, float, float, float]:
    """torchvision's RandomResizedCrop box (10 tries, then a centre crop), as fractions."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left / width, top / height, (left + w) / width, (top + h) / height
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left / width, top / height, (left + w) / width, (top + h) / height


def _overlay_text(img: Image.Image, rng: np.random.Generator, length: int) -> Image.Image:
    chars = rng.integers(0, len(TEXT_ALPHABET), size=length)
    text = "".join(TEXT_ALPHABET[i] for i in chars)
    size_of_short_side = rng.uniform(0.1, 0.3)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    return edits.overlay_text(
        img,
        text,
        font_size_frac=size_of_short_side * min(img.size) / img.height,
        opacity=rng.uniform(0.1, 1.0),
        colour=colour,
        position=(rng.uniform(), rng.uniform()),
        stroke=False,
    )


def _overlay_emoji(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    mood = edits.EMOJI_MOODS[int(rng.integers(0, len(edits.EMOJI_MOODS)))]
    size_frac = rng.uniform(0.1, 0.5)
    sticker = edits.make_emoji(max(8, round(size_frac * min(img.size))), rng.uniform(), mood)
    opacity = rng.uniform(0.7, 1.0)
    position = (rng.uniform(), rng.uniform())
    return edits.overlay_image(img, sticker, size_frac, opacity=opacity, position=position)


def _colour_jitter(
    img: Image.Image, rng: np.random.Generator, jitter: tuple[float, float, float, float]
) -> Image.Image:
    """torchvision ColorJitter: the four adjustments in a random order."""
    b, c, s, h = jitter
    ops = [
        lambda im: edits.brightness(im, rng.uniform(max(0.0, 1 - b), 1 + b)),
        lambda im: edits.contrast(im, rng.uniform(max(0.0, 1 - c), 1 + c)),
        lambda im: edits.saturation(im, rng.uniform(max(0.0, 1 - s), 1 + s)),
        lambda im: edits.hue_shift(im, rng.uniform(-h, h)),
    ]
    for index in rng.permutation(len(ops)):
        img = ops[index](img)
    return img


def advanced(img: Image.Image, rng: np.random.Generator, settings: AugmentSettings) -> Image.Image:
    """One draw of the ADVANCED chain: an RGB image of settings.size × settings.size."""
    s = settings
    if rng.uniform() < s.p_flip:
        img = edits.hflip(img)
    if rng.uniform() < s.p_rotate90:
        img = edits.rotate(img, float(rng.choice([90, 180, 270])), expand=False)
    if rng.uniform() < s.p_text:
        img = _overlay_text(img, rng, s.text_length)
    if rng.uniform() < s.p_emoji:
        img = _overlay_emoji(img, rng)
    if rng.uniform() < s.p_rotate:
        img = edits.rotate(img, float(rng.integers(0, 360)), expand=False)
    box = random_resized_crop_box(img.width, img.height, rng, s.scale, s.ratio)
    img = edits.resize_to(edits.crop(img, box), (s.size, s.size))
    if rng.uniform() < s.p_jitter:
        img = _colour_jitter(img, rng, s.jitter)
    if rng.uniform() < s.p_grayscale:
        img = edits.grayscale(img)
    if rng.uniform() < s.p_blur:
        radius = rng.uniform(*s.blur_radius) * s.size / REFERENCE_SIZE
        img = edits.blur(img, radius)
    if rng.uniform() < s.p_jpeg:
        img = edits.jpeg(img, int(rng.integers(0, 101)))
    return img


def views(
    img: Image.Image, rng: np.random.Generator, settings: AugmentSettings, count: int = 2
) -> list[np.ndarray]:
    """count independent draws of the chain as (size, size, 3) uint8 arrays."""
    return [np.asarray(advanced(img, rng, settings), dtype=np.uint8) for _ in range(count)]
