"""Teachers: SSCD int8 ONNX (unmodified, through ONNX Runtime), TorchScript files, timm + GeM."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from PIL import Image
from skimage import data

from rdcd.embedder import Embedder, EmbedderError, load_embedder
from rdcd.models import WeightsError
from rdcd.preprocess import load_rgb
from rdcd.teachers import SSCD_ONNX_MODEL_ID, TeacherError, _check_pixel_graph, sscd_onnx


def _jpeg(array: np.ndarray, scale: float = 1.0) -> bytes:
    img = Image.fromarray(array).convert("RGB")
    if scale != 1.0:
        img = img.resize((int(img.width * scale), int(img.height * scale)), Image.BILINEAR)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def _batch(encoded: list[bytes], size: int) -> np.ndarray:
    return np.stack([load_rgb(item, size=size)[0] for item in encoded])


def test_sscd_onnx_separates_copies_from_other_photos():
    embedder = load_embedder("sscd", device="cpu", threads=2)
    assert isinstance(embedder, Embedder)
    assert embedder.model_id == SSCD_ONNX_MODEL_ID and embedder.dim == 512
    assert embedder.input_size == 288 and embedder.resize == "square"
    cat = data.chelsea()
    pixels = _batch([_jpeg(cat), _jpeg(cat, 0.5), _jpeg(data.coffee()), _jpeg(data.rocket())], 288)
    z = embedder.embed(pixels)
    assert z.dtype == np.float32 and z.shape == (4, 512)
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert z[0] @ z[1] > 0.9
    assert max(z[0] @ z[2], z[0] @ z[3], z[2] @ z[3]) < 0.5


def test_sscd_input_size_can_be_overridden_and_torch_is_refused():
    embedder = load_embedder("sscd", device="cpu", input_size=160, resize="short_side")
    pixels = load_rgb(_jpeg(data.astronaut()), size=160, policy="short_side")[0][None]
    assert embedder.embed(pixels).shape == (1, 512)
    with pytest.raises(EmbedderError, match="ONNX Runtime"):
        load_embedder("sscd", runtime="torch")


def test_graph_signature_check_refuses_a_float_input_graph(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["embedding"])],
        "float",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["b", 4, 4, 3])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["b", 4, 4, 3])],
    )
    path = tmp_path / "float.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(TeacherError, match="not uint8 NHWC"):
        _check_pixel_graph(path, 512)
    _check_pixel_graph(sscd_onnx().path, 512)


class _TinyDescriptor(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.fc = torch.nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).clamp(min=1e-6).pow(3).mean(dim=(-2, -1)).pow(1 / 3))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_teacher_normalises_with_imagenet_statistics(tmp_path):
    torch.manual_seed(0)
    net = _TinyDescriptor().eval()
    path = tmp_path / "tiny.torchscript.pt"
    torch.jit.script(net).save(str(path))
    embedder = load_embedder(f"torchscript:{path}", device="cpu", input_size=64)
    assert embedder.dim == 6 and embedder.input_size == 64
    assert embedder.model_id.startswith("torchscript-tiny-")
    pixels = _batch([_jpeg(data.chelsea()), _jpeg(data.coffee())], 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
        expected = torch.nn.functional.normalize(net(x), dim=-1).numpy()
    # bf16 autocast may be chosen on CPUs with AMX; it must stay close to fp32.
    assert np.abs(embedder.embed(pixels) - expected).max() < 2e-2
    torch.manual_seed(1)
    torch.jit.script(_TinyDescriptor()).save(str(path))
    assert load_embedder(f"torchscript:{path}", input_size=64).model_id != embedder.model_id


def test_torchscript_errors_are_clear(tmp_path):
    with pytest.raises(TeacherError, match="not found"):
        load_embedder(f"torchscript:{tmp_path / 'absent.pt'}")
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"no model here")
    with pytest.raises(TeacherError, match="not a TorchScript file"):
        load_embedder(f"torchscript:{bogus}")


def test_timm_teacher_uses_imagenet_weights_or_says_why_not():
    embedder = load_embedder("timm:tf_efficientnet_lite0", device="cpu", input_size=64)
    assert embedder.dim == 1280 and embedder.model_id == "timm-tf_efficientnet_lite0-gem"
    z = embedder.embed(_batch([_jpeg(data.chelsea()), _jpeg(data.chelsea(), 0.5)], 64))
    assert np.allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert z[0] @ z[1] > 0.9
    with pytest.raises(WeightsError, match="HF_HUB_OFFLINE"):
        load_embedder("timm:resnet18")
