"""rdcd.edits: every edit gives a valid RGB image of a sane size, deterministically."""

from __future__ import annotations

import numpy as np
import pytest
from images import photo_like
from PIL import Image

from rdcd import edits

SOURCE = photo_like(3, (160, 120))
OTHER = photo_like(4, (120, 90))

CASES = {
    "crop": lambda im: edits.crop(im, (0.1, 0.2, 0.6, 0.9)),
    "resize": lambda im: edits.resize(im, 0.5),
    "resize_stretch": lambda im: edits.resize(im, 0.5, 0.8),
    "jpeg": lambda im: edits.jpeg(im, 10),
    "rotate": lambda im: edits.rotate(im, 17, (255, 0, 0)),
    "rotate90": lambda im: edits.rotate(im, 90),
    "hflip": edits.hflip,
    "vflip": edits.vflip,
    "pad": lambda im: edits.pad(im, (0.1, 0, 0.2, 0.3)),
    "pad_to_aspect": lambda im: edits.pad_to_aspect(im, 1.0),
    "border": lambda im: edits.add_border(im, 0.1),
    "brightness": lambda im: edits.brightness(im, 1.5),
    "contrast": lambda im: edits.contrast(im, 0.5),
    "saturation": lambda im: edits.saturation(im, 0.2),
    "hue": lambda im: edits.hue_shift(im, 0.25),
    "grayscale": edits.grayscale,
    "blur": lambda im: edits.blur(im, 3),
    "sharpen": lambda im: edits.sharpen(im, 2.0),
    "noise": lambda im: edits.noise(im, 10, seed=1),
    "pixelate": lambda im: edits.pixelate(im, 0.05),
    "text": lambda im: edits.overlay_text(im, "hello there", 0.15, 0.8, (255, 255, 0), (0.1, 0.9)),
    "emoji": lambda im: edits.overlay_image(im, edits.make_emoji(64, 0.1, "wink"), 0.4),
    "overlay_image": lambda im: edits.overlay_image(im, OTHER, 0.3, 0.9, (0.0, 0.0)),
    "paste_onto": lambda im: edits.paste_onto(OTHER, im, 0.7, (0.2, 0.8)),
    "meme": lambda im: edits.meme_frame(im, "TOP TEXT", "BOTTOM TEXT"),
    "screenshot": lambda im: edits.screenshot(im, "@someone", (18, 18, 18)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_edit_gives_a_changed_valid_rgb_image(name):
    before = np.asarray(SOURCE).copy()
    out = CASES[name](SOURCE)
    again = CASES[name](SOURCE)
    assert out.mode == "RGB"
    assert 8 <= out.width <= 4 * SOURCE.width and 8 <= out.height <= 8 * SOURCE.height
    assert np.array_equal(np.asarray(out), np.asarray(again)), "same parameters, same pixels"
    assert np.array_equal(np.asarray(SOURCE), before), "the input is never modified"
    if out.size == SOURCE.size:
        assert not np.array_equal(np.asarray(out), before), "the edit changed nothing"


def test_geometry_is_exact():
    assert edits.crop(SOURCE, (0.25, 0.5, 0.75, 1.0)).size == (80, 60)
    assert edits.rotate(SOURCE, 90).size == (120, 160)
    assert np.array_equal(
        np.asarray(edits.rotate(edits.rotate(SOURCE, 90), 270)), np.asarray(SOURCE)
    )
    assert np.array_equal(np.asarray(edits.hflip(edits.hflip(SOURCE))), np.asarray(SOURCE))
    assert edits.add_border(SOURCE, 0.1).size == (160 + 24, 120 + 24)
    assert edits.pad_to_aspect(SOURCE, 1.0).size == (160, 160)
    assert edits.resize(SOURCE, 0.01).size == (edits.MIN_SIDE, edits.MIN_SIDE)
    with pytest.raises(ValueError):
        edits.crop(SOURCE, (0.5, 0.0, 0.4, 1.0))


def test_overlays_keep_the_rest_of_the_picture():
    out = np.asarray(edits.overlay_image(SOURCE, edits.make_emoji(32), 0.25, 1.0, (1.0, 1.0)))
    src = np.asarray(SOURCE)
    assert np.array_equal(out[:60, :80], src[:60, :80])  # top-left untouched
    assert not np.array_equal(out[-30:, -30:], src[-30:, -30:])  # sticker bottom-right
    pasted = np.asarray(edits.paste_onto(OTHER, SOURCE, 1.0, (0.0, 0.0)))
    assert pasted.shape == (90, 120, 3)


def test_alpha_and_palette_inputs_become_rgb():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))
    assert edits.blur(rgba, 1).getpixel((5, 5)) == (255, 255, 255)
    assert edits.hflip(SOURCE.convert("P")).mode == "RGB"
    assert edits.make_emoji(40).mode == "RGBA"
    with pytest.raises(ValueError):
        edits.make_emoji(40, mood="angry")
