"""Checkpoints: fp16 safetensors + card, content-hashed model_id, tamper detection, S3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from rdcd import cards
from rdcd.cards import ModelCardError, card_for, load_model, read_card, save_model, with_threshold
from rdcd.models import DescriptorModel
from rdcd.shipped import SHIPPED_MODELS
from rdcd.storage import StorageOptions


def _model(seed: int = 0) -> DescriptorModel:
    torch.manual_seed(seed)
    return DescriptorModel("test_resnet", kd_dim=24, dim=8).eval()


@pytest.fixture()
def saved(tmp_path):
    model = _model()
    card = card_for(model, 64, "square", (0.5,) * 3, (0.5,) * 3, threshold=0.8)
    card.training = {"note": "unit test"}
    save_model(model, card, str(tmp_path / "m"))
    return model, tmp_path / "m"


def _images(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_saved_model_reloads_to_bit_identical_outputs(saved, tmp_path):
    model, folder = saved
    loaded, card = load_model(str(folder))
    again_card = save_model(
        loaded, card_for(loaded, 64, "square", (0.5,) * 3, (0.5,) * 3), str(tmp_path / "again")
    )
    again, _ = load_model(str(tmp_path / "again"))
    rounded = _model()
    rounded.load_state_dict(
        {k: v.half().float() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    )
    with torch.no_grad():
        out = loaded(_images())
        assert torch.equal(out, again(_images()))
        assert torch.equal(out, rounded.eval()(_images()))
    assert again_card.model_id == card.model_id
    assert card.model_id.startswith("rdcd-testresnet-8-") and len(card.model_id) == 30
    assert card.threshold == 0.8 and card.training == {"note": "unit test"}
    assert {t.dtype for t in load_file(folder / cards.WEIGHTS_FILE).values()} == {torch.float16}


def test_model_id_depends_on_weights_and_input_handling(tmp_path):
    model = _model()
    ids = {
        save_model(model, card_for(model, 64), str(tmp_path / "a")).model_id,
        save_model(model, card_for(model, 96), str(tmp_path / "b")).model_id,
        save_model(model, card_for(model, 64, "short_side"), str(tmp_path / "c")).model_id,
        save_model(_model(seed=1), card_for(model, 64), str(tmp_path / "d")).model_id,
    }
    assert len(ids) == 4
    same = save_model(model, card_for(model, 64, training={"x": 1}), str(tmp_path / "e"))
    assert same.model_id == read_card(str(tmp_path / "a")).model_id


def test_threshold_update_keeps_the_model_id(saved):
    _, folder = saved
    before = read_card(str(folder))
    after = with_threshold(str(folder), 0.65)
    assert after.threshold == 0.65 and after.model_id == before.model_id
    _, reloaded = load_model(str(folder))
    assert reloaded.threshold == 0.65
    for shipped in ("default", "pca"):
        with pytest.raises(ModelCardError, match=f"'{shipped}' is not edited"):
            with_threshold(shipped, 0.5)


def _edit_card(folder, change):
    path = folder / cards.CARD_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["architecture"].update(dim=16), "do not fit"),
        (lambda d: d["input"].update(size=128), "does not match its weights"),
        (lambda d: d["input"].update(mean=[0.4, 0.5, 0.5]), "does not match its weights"),
        (lambda d: d.update(model_id="rdcd-testresnet-8-000000000000"), "does not match"),
        (lambda d: d["whitening"].update(present=True, dim=8), "no whitening"),
        (lambda d: d.update(format="other/9"), "card format"),
        (lambda d: d.pop("architecture"), "missing"),
    ],
)
def test_a_tampered_card_is_a_clear_error(saved, change, message):
    _, folder = saved
    _edit_card(folder, change)
    with pytest.raises(ModelCardError, match=message):
        load_model(str(folder))


def test_tampered_weights_are_a_clear_error(saved):
    _, folder = saved
    path = folder / cards.WEIGHTS_FILE
    tensors = load_file(path)
    tensors["projector.bias"] = tensors["projector.bias"] + 1
    save_file(tensors, path)
    with pytest.raises(ModelCardError, match="does not match its weights"):
        load_model(str(folder))
    del tensors["projector.bias"]
    tensors["extra.weight"] = torch.zeros(2, dtype=torch.float16)
    save_file(tensors, path)
    with pytest.raises(ModelCardError, match=r"missing \['projector.bias'\].*extra.weight"):
        load_model(str(folder))
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelCardError, match="not readable"):
        load_model(str(folder))


def test_a_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ModelCardError, match="not a model directory"):
        load_model(str(tmp_path / "nothing"))


def test_whitening_travels_with_the_weights(tmp_path):
    model = _model()
    model.set_whitening(torch.randn(8) * 0.01, torch.randn(4, 8))
    card = save_model(model, card_for(model, 64), str(tmp_path / "w"))
    assert card.whitening.present and card.whitening.dim == 4 and card.output_dim == 4
    assert card.model_id.startswith("rdcd-testresnet-4-")
    loaded, _ = load_model(str(tmp_path / "w"))
    assert torch.equal(loaded.whitening.matrix, model.whitening.matrix)
    model.set_whitening(None, None)
    assert save_model(model, card_for(model, 64), str(tmp_path / "p")).model_id != card.model_id


def test_card_must_describe_the_model(tmp_path):
    card = card_for(_model(), 64)
    other = DescriptorModel("test_resnet", kd_dim=24, dim=4)
    with pytest.raises(ModelCardError, match="does not describe"):
        save_model(other, card, str(tmp_path / "x"))
    with pytest.raises(ModelCardError, match="resize policy"):
        card_for(other, 64, "center_crop")


def test_shipped_models_load_and_are_small():
    model, card = load_model("default")
    _, pca = load_model("pca")
    for shipped in (card, pca):
        assert shipped.architecture.backbone == "tf_efficientnet_lite0"
        assert shipped.output_dim == 128 and shipped.architecture.kd_dim == 512
        assert 0.0 < shipped.threshold < 1.0
    assert card.training["objective"] == "rdcd" and card.training["teacher"] == "sscd"
    assert card.training["init_model_id"] == pca.model_id != card.model_id
    assert "train.pca_init" in pca.training["command"]
    for name in SHIPPED_MODELS:
        assert (SHIPPED_MODELS[name] / cards.WEIGHTS_FILE).stat().st_size < 12_000_000


def test_save_and_load_through_s3(s3_server, tmp_path):
    options = StorageOptions.from_config(s3_server.storage_config())
    model = _model()
    url = f"s3://{s3_server.bucket}/models/unit"
    card = save_model(model, card_for(model, 64), url, options)
    local_card = save_model(model, card_for(model, 64), str(tmp_path / "local"))
    loaded, loaded_card = load_model(url, options)
    local, _ = load_model(str(tmp_path / "local"))
    assert loaded_card.model_id == card.model_id == local_card.model_id
    assert with_threshold(url, 0.7, options).threshold == 0.7
    assert read_card(url, options).model_id == card.model_id
    with torch.no_grad():
        assert torch.equal(loaded(_images()), local(_images()))
