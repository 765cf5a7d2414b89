"""The ADVANCED augmentation chain: shape, determinism under a seed, independent views,
and every step actually reachable."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from rdcd.augment import (
    AugmentSettings,
    advanced,
    generator,
    random_resized_crop_box,
    views,
)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """A structured (not flat) test picture: gradients plus a few shapes."""
    y, x = np.mgrid[0:96, 0:128]
    arr = np.stack([x * 2, y * 2, (x + y) % 256], axis=-1).astype(np.uint8)
    arr[20:50, 30:70] = (220, 30, 30)
    return Image.fromarray(arr)


def test_views_are_square_uint8_of_the_requested_size(picture):
    out = views(picture, generator(0, 1), AugmentSettings(size=48), count=3)
    assert len(out) == 3
    assert all(v.shape == (48, 48, 3) and v.dtype == np.uint8 for v in out)


def test_same_seed_same_pixels_and_views_differ(picture):
    settings = AugmentSettings(size=40)
    first = views(picture, generator(5, 17, 0), settings)
    second = views(picture, generator(5, 17, 0), settings)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert not np.array_equal(first[0], first[1]), "the two views are independent draws"
    other = views(picture, generator(6, 17, 0), settings)
    assert not np.array_equal(first[0], other[0])


def test_every_step_changes_the_picture(picture):
    """Each step on its own (probability 1, the others 0) changes the output."""
    off = AugmentSettings(
        size=64,
        scale=(1.0, 1.0),
        ratio=(128 / 96, 128 / 96),
        p_flip=0,
        p_rotate90=0,
        p_text=0,
        p_emoji=0,
        p_rotate=0,
        p_jitter=0,
        p_grayscale=0,
        p_blur=0,
        p_jpeg=0,
    )
    plain = np.asarray(advanced(picture, generator(0), off))
    for step in (
        "p_flip",
        "p_rotate90",
        "p_text",
        "p_emoji",
        "p_rotate",
        "p_jitter",
        "p_grayscale",
        "p_blur",
        "p_jpeg",
    ):
        changed = dataclasses.replace(off, **{step: 1.0})
        out = np.asarray(advanced(picture, generator(0), changed))
        assert out.shape == plain.shape
        assert np.abs(out.astype(int) - plain.astype(int)).mean() > 0.5, step
    gray = np.asarray(advanced(picture, generator(0), dataclasses.replace(off, p_grayscale=1.0)))
    assert np.array_equal(gray[..., 0], gray[..., 1])


def test_crop_box_follows_scale_and_ratio_bounds():
    rng = generator(3)
    for _ in range(200):
        left, top, right, bottom = random_resized_crop_box(300, 200, rng, (0.08, 1.0))
        assert 0 <= left < right <= 1 and 0 <= top < bottom <= 1
        area = (right - left) * (bottom - top)
        aspect = (right - left) * 300 / ((bottom - top) * 200)
        assert area >= 0.079 and 0.74 <= aspect <= 1.35
    # Impossible aspect ratios fall back to a centred crop of the closest allowed shape.
    box = random_resized_crop_box(1000, 10, generator(0), (0.9, 1.0), (1.0, 1.0))
    assert box[1] == 0 and box[3] == 1 and box[0] == pytest.approx(0.495)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="size"):
        AugmentSettings(size=4)
    with pytest.raises(ValueError, match="scale"):
        AugmentSettings(scale=(0.5, 0.2))
