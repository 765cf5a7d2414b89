"""`rdcd quantize`: an int8 copy of a student, its card, its checks, and embedding with it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from images import encode, photo_like
from PIL import Image
from skimage import data

from pipelines.cli import main
from rdcd import cards, edits
from rdcd.embedder import EmbedderError, OnnxEmbedder, _int8_student, load_embedder
from rdcd.models import DescriptorModel
from rdcd.preprocess import load_rgb

pytestmark = pytest.mark.timeout(300)
SIZE = 64


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> str:
    """The packaged ImageNet Lite0 trunk at 64 px with random heads: real activations."""
    torch.manual_seed(0)
    model = DescriptorModel("tf_efficientnet_lite0", kd_dim=64, dim=32, pretrained="package")
    folder = tmp_path_factory.mktemp("parent") / "model"
    cards.save_model(model.eval(), cards.card_for(model, size=SIZE, threshold=0.8), str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> Path:
    """32 photo-like JPEGs and one file that is not an image (skipped, not fatal)."""
    folder = tmp_path_factory.mktemp("calibration")
    for seed in range(32):
        (folder / f"c{seed:02d}.jpg").write_bytes(encode(photo_like(300 + seed), "JPEG"))
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder


@pytest.fixture(scope="module")
def int8(parent, calibration, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("int8") / "model")
    assert main(["quantize", parent, out, "--calibration", str(calibration)]) == 0
    return out


def _photos() -> np.ndarray:
    """Three photos, then an edited copy (crop + downscale + JPEG) of the first."""
    cat = Image.fromarray(data.chelsea())
    copy = edits.resize(edits.crop(cat, (0.05, 0.1, 0.9, 0.95)), 0.6)
    images = [cat, Image.fromarray(data.coffee()), Image.fromarray(data.astronaut()), copy]
    return np.stack([load_rgb(encode(img, "JPEG"), size=SIZE)[0] for img in images])


def test_quantized_model_is_a_new_int8_model_close_to_its_parent(parent, int8, tmp_path):
    parent_card, card = cards.read_card(parent), cards.read_card(int8)
    assert card.model_id != parent_card.model_id and "-int8-" in card.model_id
    quant = card.quantization
    assert quant.parent_model_id == parent_card.model_id
    assert quant.calibration["images"] + quant.check["images"] == 32  # the broken file skipped
    assert 0.97 <= quant.check["cosine_mean"] <= 1.0
    assert card.threshold == parent_card.threshold and card.output_dim == 32
    graph = onnx.load(str(Path(int8) / cards.INT8_FILE))
    ops = {node.op_type for node in graph.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert sum(int(np.prod(t.dims)) for t in weights) > 100_000  # the convolutions are int8

    fast = load_embedder(int8, threads=2)  # device 'auto' stays on the CPU for int8 models
    assert isinstance(fast, OnnxEmbedder) and fast.model_id == card.model_id
    exact = load_embedder(parent, device="cpu", cache_dir=str(tmp_path))
    photos = _photos()
    z8, z32 = fast.embed(photos), exact.embed(photos)
    assert np.allclose(np.linalg.norm(z8, axis=1), 1.0, atol=1e-5)
    assert (z8 * z32).sum(axis=1).min() > 0.95
    assert np.argmax(z8[:3] @ z8[3]) == 0  # the copy still finds its original


def test_int8_models_refuse_what_they_cannot_do(int8, tmp_path):
    with pytest.raises(cards.ModelCardError, match="no torch weights"):
        cards.load_model(int8)
    with pytest.raises(EmbedderError, match="runtime auto or onnx"):
        load_embedder(int8, device="cpu", runtime="torch")
    with pytest.raises(EmbedderError, match="(?i)cuda"):
        load_embedder(int8, device="cuda")
    # what a CUDA machine reaches past device resolution (this one has no CUDA device)
    with pytest.raises(EmbedderError, match="for CPUs; on CUDA use its fp32 parent"):
        _int8_student(int8, "cuda", "auto", None, None)
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    (tampered / cards.CARD_FILE).write_bytes((Path(int8) / cards.CARD_FILE).read_bytes())
    graph = bytearray((Path(int8) / cards.INT8_FILE).read_bytes())
    graph[-100] ^= 0xFF
    (tampered / cards.INT8_FILE).write_bytes(bytes(graph))
    with pytest.raises(cards.ModelCardError, match="sha256"):
        load_embedder(str(tampered))
    card = json.loads((tampered / cards.CARD_FILE).read_text())
    card["input"]["size"] = 96  # a card edited by hand no longer matches its id
    (tampered / cards.CARD_FILE).write_text(json.dumps(card))
    (tampered / cards.INT8_FILE).write_bytes((Path(int8) / cards.INT8_FILE).read_bytes())
    with pytest.raises(cards.ModelCardError, match="does not match its graph"):
        load_embedder(str(tampered))


def test_quantize_refuses_bad_requests_and_writes_nothing(parent, int8, calibration, tmp_path):
    out = tmp_path / "strict"
    strict = ["--set", "quantize.min_mean_cosine=1.0001"]
    assert main(["quantize", parent, str(out), "--calibration", str(calibration), *strict]) == 2
    assert not (out / cards.CARD_FILE).exists()
    assert main(["quantize", int8, str(tmp_path / "again"), "--calibration", str(calibration)]) == 2
    assert main(["quantize", parent, int8, "--calibration", str(calibration)]) == 2
    few = ["--calibration", str(calibration), "--images", "6"]
    assert main(["quantize", parent, str(tmp_path / "few"), *few]) == 2
    assert not (tmp_path / "few" / cards.CARD_FILE).exists()


def test_embed_and_calibrate_copy_work_with_an_int8_model(int8, tmp_path, ray_session):
    import duckdb

    from pipelines.calibrate import copy_model
    from rdcd.storage import StorageOptions

    folder = tmp_path / "images"
    folder.mkdir()
    for seed in range(6):
        (folder / f"i{seed}.jpg").write_bytes(encode(photo_like(900 + seed), "JPEG"))
    out = tmp_path / "out"
    assert main(["embed", str(folder), str(out), "--set", f"model.card={int8}"]) == 0
    rows = duckdb.sql(
        f"SELECT image_id, model_id, descriptor FROM '{out}/descriptors/*.parquet' ORDER BY 1"
    ).fetchall()
    card = cards.read_card(int8)
    assert [r[0] for r in rows] == [f"i{s}.jpg" for s in range(6)]
    assert {r[1] for r in rows} == {card.model_id}
    direct = load_embedder(int8).embed(
        np.stack([load_rgb((folder / r[0]).read_bytes(), size=SIZE)[0] for r in rows])
    )
    stored = np.array([r[2] for r in rows], dtype=np.float32)
    assert np.abs(stored - direct).max() < 2e-3  # fp16 storage
    copy = tmp_path / "copy"
    copy_model(int8, str(copy), StorageOptions.from_config(None))
    assert load_embedder(str(copy)).model_id == card.model_id
