"""Decoding real files of every kind to RGB, the failure stages, resize policies and draft mode."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from images import (
    BLUE,
    RED,
    WHITE,
    bad_image_bytes,
    cmyk_jpeg,
    encode,
    good_image_bytes,
    jpeg,
    large_jpeg,
    photo_like,
    png16,
    png_bomb,
    write_bad_images,
    write_good_images,
)
from PIL import Image

from rdcd.preprocess import ImageError, decode_image, load_rgb, output_size, resize_image

GOOD = good_image_bytes()
BAD = bad_image_bytes()


def _header_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.mark.parametrize("name", sorted(GOOD))
def test_every_good_image_decodes_to_rgb_uint8(name):
    array, original = load_rgb(GOOD[name], size=24)
    assert array.shape == (24, 24, 3)
    assert array.dtype == np.uint8
    assert array.flags.c_contiguous and array.flags.writeable
    width, height = _header_size(GOOD[name])
    expected = (height, width) if name == "exif_rotated.jpg" else (width, height)
    assert original == expected
    img = decode_image(GOOD[name])
    assert img.mode == "RGB" and img.size == expected


@pytest.mark.parametrize("name", sorted(BAD))
def test_every_bad_image_fails_with_its_stage(name):
    data, stage = BAD[name]
    with pytest.raises(ImageError) as info:
        load_rgb(data, size=24)
    assert info.value.stage == stage
    assert isinstance(info.value, ValueError)
    assert str(info.value)


def test_written_files_round_trip(tmp_path):
    good = write_good_images(tmp_path / "good")
    bad = write_bad_images(tmp_path / "bad")
    assert sorted(good) == sorted(GOOD) and sorted(bad) == sorted(BAD)
    for name, path in good.items():
        assert path.read_bytes() == GOOD[name]
        assert load_rgb(path.read_bytes(), size=8)[0].shape == (8, 8, 3)
    for path, stage in bad.values():
        with pytest.raises(ImageError) as info:
            load_rgb(path.read_bytes(), size=8)
        assert info.value.stage == stage


def test_photo_like_is_deterministic_and_distinct_per_seed():
    a, b = np.asarray(photo_like(1)), np.asarray(photo_like(2))
    assert np.array_equal(a, np.asarray(photo_like(1)))
    assert np.abs(a.astype(int) - b).mean() > 20


def test_jpeg_and_webp_keep_colours():
    # Compared at 32x32, where the lossy codecs' smoothing of the grain averages out.
    for name, seed, size in (("photo.jpg", 0, (160, 120)), ("photo.webp", 1, (96, 64))):
        source = np.asarray(resize_image(photo_like(seed, size), 32, "square"), dtype=np.int16)
        decoded = load_rgb(GOOD[name], size=32)[0].astype(np.int16)
        assert np.abs(decoded - source).mean() < 4, name


def test_alpha_is_composited_on_white():
    img = np.asarray(decode_image(GOOD["alpha.png"]))
    assert (img[:, :32] == WHITE).all()
    assert (img[:, 32:] == RED).all()


def test_palette_with_and_without_transparency():
    opaque = np.asarray(decode_image(GOOD["palette.png"]))
    transparent = np.asarray(decode_image(GOOD["palette_transparent.png"]))
    assert (opaque[:, :32] == 0).all() and (opaque[:, 32:] == RED).all()
    assert (transparent[:, :32] == WHITE).all() and (transparent[:, 32:] == RED).all()


def test_animated_gif_gives_first_frame():
    assert (np.asarray(decode_image(GOOD["animated.gif"])) == RED).all()


def test_16bit_is_scaled_not_clipped():
    with Image.open(io.BytesIO(png16())) as im:
        assert im.mode.startswith("I")
        source = np.asarray(im).astype(np.float64)
    img = np.asarray(decode_image(GOOD["gray16.png"]))
    assert np.array_equal(img[..., 0], img[..., 2])
    assert np.array_equal(img[..., 0], np.round(source / 257).astype(np.uint8))
    assert len(np.unique(img)) == 256


def test_cmyk_converts_to_rgb():
    img = np.asarray(decode_image(cmyk_jpeg()), dtype=int)
    assert np.abs(img[:, :20] - (0, 255, 255)).max() < 12
    assert img[:, 28:].max() < 12


def test_exif_orientation_is_applied():
    img = np.asarray(decode_image(GOOD["exif_rotated.jpg"]), dtype=int)
    assert img.shape == (64, 32, 3)
    assert np.abs(img[:28] - RED).max() < 20
    assert np.abs(img[36:] - BLUE).max() < 20
    array, original = load_rgb(GOOD["exif_rotated.jpg"], size=16, policy="short_side")
    assert original == (32, 64) and array.shape == (32, 16, 3)


def test_grayscale_and_bilevel():
    gray = np.asarray(decode_image(GOOD["gray.png"]))
    assert np.array_equal(gray[0, :, 0], np.arange(50, dtype=np.uint8) * 5)
    assert np.array_equal(gray[..., 0], gray[..., 1])
    bilevel = np.asarray(decode_image(GOOD["bilevel.png"]))
    assert (bilevel[:, :20] == 0).all() and (bilevel[:, 20:] == 255).all()


def test_tiny_image_is_upscaled():
    array, original = load_rgb(GOOD["tiny.png"], size=33)
    assert original == (1, 1) and array.shape == (33, 33, 3)
    assert (array == RED).all()


def test_pixel_limit_is_checked_on_the_header_before_decoding():
    data = jpeg(5, (160, 120))
    assert load_rgb(data, size=8, max_pixels=160 * 120)[1] == (160, 120)
    with pytest.raises(ImageError) as info:
        load_rgb(data, size=8, max_pixels=160 * 120 - 1)
    assert info.value.stage == "too_large"
    assert "19200" in str(info.value) and "19199" in str(info.value)
    # Its pixel data is truncated: decoding before the check would fail as "decode" instead.
    with pytest.raises(ImageError) as info:
        decode_image(png_bomb((5000, 5000)), max_pixels=1_000_000)
    assert info.value.stage == "too_large" and "25000000" in str(info.value)
    with pytest.raises(ImageError) as info:
        decode_image(png_bomb((5000, 5000)))
    assert info.value.stage == "decode"


def test_limits_are_per_call_and_thread_safe():
    data = jpeg(6, (64, 64))
    limits = [64 * 64 - 1, 64 * 64] * 16
    limit_before = Image.MAX_IMAGE_PIXELS

    def attempt(limit: int) -> str:
        try:
            load_rgb(data, size=16, max_pixels=limit)
        except ImageError as e:
            return e.stage
        return "ok"

    with ThreadPoolExecutor(4) as pool:
        stages = list(pool.map(attempt, limits))
    assert stages == ["too_large", "ok"] * 16
    assert Image.MAX_IMAGE_PIXELS == limit_before


@pytest.mark.parametrize(
    ("source", "size", "policy", "shape"),
    [
        ((120, 80), 50, "square", (50, 50, 3)),
        ((120, 80), 50, "short_side", (50, 75, 3)),
        ((80, 120), 50, "short_side", (75, 50, 3)),
        ((101, 67), 40, "short_side", (40, int(40 * 101 / 67), 3)),
        ((60, 60), 60, "square", (60, 60, 3)),
    ],
)
def test_resize_policies(source, size, policy, shape):
    img = photo_like(7, source)
    assert np.asarray(resize_image(img, size, policy)).shape == shape
    assert load_rgb(encode(img, "PNG"), size=size, policy=policy)[0].shape == shape


def test_bad_arguments_raise_value_error():
    img = photo_like(8, (20, 20))
    with pytest.raises(ValueError, match="policy"):
        resize_image(img, 10, "center_crop")
    with pytest.raises(ValueError, match="policy"):
        load_rgb(GOOD["photo.jpg"], size=10, policy="center_crop")
    with pytest.raises(ValueError, match="size"):
        resize_image(img, 0, "square")
    with pytest.raises(ValueError, match="max_pixels"):
        load_rgb(GOOD["photo.jpg"], size=10, max_pixels=0)


@pytest.mark.parametrize("target", [64, 100, 128, 200, 300])
def test_draft_reduces_by_powers_of_two_and_keeps_enough_pixels(target):
    data = jpeg(9, (1024, 768))
    width, height = decode_image(data, target_size=target).size
    assert width >= target and height >= target
    scale = 1024 // width
    assert scale in (1, 2, 4, 8) and (1024 // scale, 768 // scale) == (width, height)
    # The largest reduction that keeps both sides >= target was taken (or the maximum, 8).
    assert scale == 8 or min(width, height) < 2 * target
    assert decode_image(data, target_size=target, draft=False).size == (1024, 768)


def test_draft_is_jpeg_only():
    data = encode(photo_like(10, (800, 600)), "PNG")
    assert decode_image(data, target_size=64).size == (800, 600)


@pytest.mark.parametrize("policy", ["square", "short_side"])
def test_draft_result_is_close_to_full_decode(policy):
    data = jpeg(11, (1280, 960), quality=92)
    assert decode_image(data, target_size=128).size == (320, 240)
    drafted, original = load_rgb(data, size=128, policy=policy, draft=True)
    full, original_full = load_rgb(data, size=128, policy=policy, draft=False)
    assert original == original_full == (1280, 960)
    assert drafted.shape == full.shape
    assert np.abs(drafted.astype(int) - full).mean() < 3


@pytest.mark.parametrize("source", [(1023, 769), (801, 1203)])
def test_draft_never_changes_the_output_shape(source):
    # A draft of 1023x769 is 256x193, whose aspect would give 169 instead of 170 columns.
    data = jpeg(12, source)
    assert decode_image(data, target_size=128).size != source
    drafted, original = load_rgb(data, size=128, policy="short_side")
    full, _ = load_rgb(data, size=128, policy="short_side", draft=False)
    width, height = output_size(source, 128, "short_side")
    assert original == source and drafted.shape == full.shape == (height, width, 3)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_very_large_jpeg_within_limit():
    data = large_jpeg()
    drafted = decode_image(data, target_size=288)
    assert drafted.size == (1500, 1125)
    small, original = load_rgb(data, size=288)
    assert original == (12000, 9000) and small.shape == (288, 288, 3)
    full, _ = load_rgb(data, size=288, draft=False)
    assert np.abs(small.astype(int) - full).mean() < 2
    with pytest.raises(ImageError) as info:
        load_rgb(data, size=288, max_pixels=100_000_000)
    assert info.value.stage == "too_large"
