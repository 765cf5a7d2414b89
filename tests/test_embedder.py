"""The Embedder API: the shipped default, runtime choice, ONNX export checks, bad batches."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from rdcd import edits
from rdcd.cards import card_for, load_model, read_card, save_model
from rdcd.config import load_config
from rdcd.embedder import (
    Embedder,
    EmbedderError,
    OnnxEmbedder,
    TorchEmbedder,
    embedder_from_config,
    load_embedder,
)
from rdcd.models import DescriptorModel, PixelModel
from rdcd.preprocess import load_rgb


def _jpeg(img: Image.Image, quality: int = 85) -> bytes:
    buffer = io.BytesIO()
    img.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _pixels(size: int) -> np.ndarray:
    """Two photos, then an edited copy (crop + downscale + JPEG) of the first."""
    cat = Image.fromarray(data.chelsea())
    copy = edits.resize(edits.crop(cat, (0.05, 0.1, 0.9, 0.95)), 0.6)
    encoded = [_jpeg(cat), _jpeg(Image.fromarray(data.coffee())), _jpeg(copy, 60)]
    return np.stack([load_rgb(item, size=size)[0] for item in encoded])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("onnx-cache"))


@pytest.fixture(scope="module")
def default(cache):
    return load_embedder("default", device="cpu", threads=2, cache_dir=cache)


def test_default_embedder_returns_unit_rows_that_find_the_copy(default):
    card = read_card("default")
    assert isinstance(default, Embedder) and isinstance(default, OnnxEmbedder)
    assert default.model_id == card.model_id and default.dim == 128
    assert (default.input_size, default.resize) == (card.input.size, "square")
    z = default.embed(_pixels(default.input_size))
    assert z.dtype == np.float32 and z.shape == (3, 128)
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert z[0] @ z[2] > card.threshold > z[0] @ z[1]


def test_onnx_runtime_matches_eager_torch(default):
    model, card = load_model("default")
    pixels = _pixels(card.input.size)
    with torch.no_grad():
        eager = PixelModel(model, card.input.mean, card.input.std)(torch.from_numpy(pixels))
    assert np.abs(default.embed(pixels) - eager.numpy()).max() < 1e-3


def test_torch_runtime_agrees_with_onnx(default):
    embedder = load_embedder("default", device="cpu", runtime="torch")
    assert isinstance(embedder, TorchEmbedder) and embedder.model_id == default.model_id
    pixels = _pixels(default.input_size)
    cosine = np.sum(embedder.embed(pixels) * default.embed(pixels), axis=1)
    assert cosine.min() > 0.999


def test_bad_batches_are_clear_errors_and_empty_batches_are_fine(default):
    size = default.input_size
    with pytest.raises(EmbedderError, match="uint8"):
        default.embed(np.zeros((1, size, size, 3), np.float32))
    with pytest.raises(EmbedderError, match="resized to"):
        default.embed(np.zeros((1, size + 1, size, 3), np.uint8))
    with pytest.raises(EmbedderError, match="uint8"):
        default.embed(np.zeros((size, size, 3), np.uint8))
    assert default.embed(np.zeros((0, size, size, 3), np.uint8)).shape == (0, 128)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny student and its whitened twin (same weights, 8 -> 4 whitening)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    model = DescriptorModel("test_resnet", kd_dim=24, dim=8)
    save_model(model, card_for(model, 64), str(root / "plain"))
    matrix, mean = torch.randn(4, 8), torch.randn(8) * 0.01
    model.set_whitening(mean, matrix)
    save_model(model, card_for(model, 64), str(root / "white"))
    return root


def _eager(folder) -> np.ndarray:
    model, card = load_model(str(folder))
    with torch.no_grad():
        out = PixelModel(model, card.input.mean, card.input.std)(torch.from_numpy(_pixels(64)))
    return out.numpy()


def test_whitened_student_serves_the_whitened_dimension(tiny, tmp_path):
    embedder = load_embedder(str(tiny / "white"), device="cpu", cache_dir=str(tmp_path))
    assert isinstance(embedder, OnnxEmbedder)
    z = embedder.embed(_pixels(64))
    assert embedder.dim == 4 and z.shape == (3, 4)
    raw = torch.from_numpy(_eager(tiny / "plain"))
    model, _ = load_model(str(tiny / "white"))
    mean, matrix = model.whitening.mean, model.whitening.matrix
    expected = torch.nn.functional.normalize((raw - mean) @ matrix.T, dim=-1).numpy()
    assert np.abs(z - expected).max() < 1e-3


def test_a_foreign_or_broken_cached_export_is_replaced(tiny, tmp_path):
    white = load_embedder(str(tiny / "white"), device="cpu", cache_dir=str(tmp_path / "a"))
    assert white.dim == 4
    foreign = next((tmp_path / "a").glob("*.onnx"))
    target = tmp_path / "b" / f"{read_card(str(tiny / 'plain')).model_id}-64.onnx"
    target.parent.mkdir()
    target.write_bytes(foreign.read_bytes())
    embedder = load_embedder(str(tiny / "plain"), device="cpu", cache_dir=str(tmp_path / "b"))
    assert isinstance(embedder, OnnxEmbedder) and embedder.dim == 8
    assert target.read_bytes() != foreign.read_bytes()
    assert np.abs(embedder.embed(_pixels(64)) - _eager(tiny / "plain")).max() < 1e-3


def test_short_side_students_run_on_torch_and_card_input_is_enforced(tmp_path):
    torch.manual_seed(0)
    model = DescriptorModel("test_resnet", kd_dim=24, dim=8)
    save_model(model, card_for(model, 64, "short_side"), str(tmp_path / "s"))
    embedder = load_embedder(str(tmp_path / "s"), device="cpu")
    assert isinstance(embedder, TorchEmbedder)
    wide = load_rgb(
        _jpeg(Image.fromarray(data.astronaut()).crop((0, 0, 512, 300))),
        size=64,
        policy="short_side",
    )[0]
    assert wide.shape[:2] == (64, 109) and embedder.embed(wide[None]).shape == (1, 8)
    with pytest.raises(EmbedderError, match="resize policy 'square'"):
        load_embedder(str(tmp_path / "s"), device="cpu", runtime="onnx")
    with pytest.raises(EmbedderError, match="come from its card"):
        load_embedder(str(tmp_path / "s"), input_size=128)
    with pytest.raises(EmbedderError, match="runtime"):
        load_embedder(str(tmp_path / "s"), runtime="tensorrt")


def test_embedder_from_config_reads_the_model_section(cache, default):
    config = load_config(None, [f"model.onnx_cache={cache}", "model.device=cpu"])
    embedder = embedder_from_config(config)
    assert embedder.model_id == default.model_id and embedder.dim == 128
