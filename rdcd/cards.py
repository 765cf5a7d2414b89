"""Model checkpoints: fp16 safetensors weights + a JSON model card, on any fsspec filesystem.

The model_id is a content hash of what determines the descriptors (weights, architecture,
input handling, whitening; for an int8-quantised model, its ONNX graph). The recommended
threshold and the training summary are outside the hash: recalibrating a threshold does not
change a single descriptor, so descriptors already stored under a model_id stay valid.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from rdcd.models import DescriptorModel
from rdcd.shipped import is_shipped, resolve_model_dir
from rdcd.storage import (
    StorageOptions,
    exists,
    join,
    read_bytes,
    write_bytes_atomic,
)

CARD_FILE = "card.json"
WEIGHTS_FILE = "model.safetensors"
INT8_FILE = "model.int8.onnx"
INT8_FORMAT = "onnx-qdq-int8"
CARD_FORMAT = "rdcd-model-card/1"
RESIZE_POLICIES = ("square", "short_side")
WHITENING_KEYS = ("whitening.mean", "whitening.matrix")
SHORT_NAMES = {
    "tf_efficientnet_lite0": "lite0",
    "efficientnet_b0": "effb0",
    "mobilenetv3_large_100": "mnv3l",
    "resnet18": "r18",
    "resnet50": "r50",
}


class ModelCardError(ValueError):
    """A model directory whose card and weights do not belong together, or a bad card."""


@dataclass
class Architecture:
    backbone: str
    kd_dim: int
    dim: int
    gem_p: float = 3.0


@dataclass
class InputSpec:
    """How pixels reach the network: resize to size by policy, then (x/255 - mean) / std."""

    size: int
    resize: str = "square"
    mean: list[float] = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] = field(default_factory=lambda: [0.229, 0.224, 0.225])

    def __post_init__(self) -> None:
        if self.resize not in RESIZE_POLICIES:
            raise ModelCardError(f"resize policy '{self.resize}' not in {RESIZE_POLICIES}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ModelCardError("input mean and std need three values (RGB)")
        self.mean = [float(v) for v in self.mean]
        self.std = [float(v) for v in self.std]


@dataclass
class WhiteningInfo:
    """Whether the weights file holds whitening.mean / whitening.matrix, and its output dim."""

    present: bool = False
    dim: int | None = None


@dataclass
class QuantizationInfo:
    """An int8 model: its ONNX graph (file, sha256) replaces the weights; the parent is the fp32
    model it was quantised from, calibration and check say how and how close it came."""

    parent_model_id: str
    sha256: str
    file: str = INT8_FILE
    format: str = INT8_FORMAT
    calibration: dict[str, Any] = field(default_factory=dict)
    check: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelCard:
    architecture: Architecture
    input: InputSpec
    whitening: WhiteningInfo = field(default_factory=WhiteningInfo)
    quantization: QuantizationInfo | None = None
    threshold: float | None = None
    training: dict[str, Any] = field(default_factory=dict)
    model_id: str = ""
    created: str = ""
    format: str = CARD_FORMAT

    @property
    def output_dim(self) -> int:
        """Descriptor dimension users see: the whitening's output when present."""
        return self.whitening.dim if self.whitening.present else self.architecture.dim

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        try:
            if data.get("format") != CARD_FORMAT:
                raise ModelCardError(f"card format {data.get('format')!r} is not {CARD_FORMAT}")
            return cls(
                architecture=Architecture(**data["architecture"]),
                input=InputSpec(**data["input"]),
                whitening=WhiteningInfo(**data.get("whitening", {})),
                quantization=(
                    QuantizationInfo(**data["quantization"]) if data.get("quantization") else None
                ),
                threshold=data.get("threshold"),
                training=dict(data.get("training") or {}),
                model_id=data.get("model_id", ""),
                created=data.get("created", ""),
            )
        except (KeyError, TypeError) as exc:
            raise ModelCardError(f"model card is missing or has unknown fields: {exc}") from exc


def card_for(
    model: DescriptorModel,
    size: int,
    resize: str = "square",
    mean: list[float] | tuple[float, ...] = (0.485, 0.456, 0.406),
    std: list[float] | tuple[float, ...] = (0.229, 0.224, 0.225),
    threshold: float | None = None,
    training: dict[str, Any] | None = None,
) -> ModelCard:
    """A card describing model; save_model fills model_id and created."""
    return ModelCard(
        architecture=_architecture_of(model),
        input=InputSpec(size=int(size), resize=resize, mean=list(mean), std=list(std)),
        whitening=_whitening_of(model),
        threshold=None if threshold is None else float(threshold),
        training=dict(training or {}),
    )


def _architecture_of(model: DescriptorModel) -> Architecture:
    return Architecture(model.backbone_name, model.kd_dim, model.dim, model.gem_p)


def _whitening_of(model: DescriptorModel) -> WhiteningInfo:
    if model.whitening is None:
        return WhiteningInfo()
    return WhiteningInfo(present=True, dim=model.output_dim)


def _tensors_of(model: DescriptorModel) -> dict[str, torch.Tensor]:
    """The checkpoint content: trunk, kd head and projector in fp16; whitening kept fp32."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("num_batches_tracked"):
            continue
        tensor = tensor.detach().cpu()
        if name in WHITENING_KEYS:
            tensor = tensor.float()
        elif tensor.is_floating_point():
            tensor = tensor.half()
        # A clone with standard strides: channels_last or size-1 dims must not reach the bytes.
        tensors[name] = tensor.clone(memory_format=torch.contiguous_format)
    return tensors


def compute_model_id(card: ModelCard, tensors: dict[str, torch.Tensor]) -> str:
    """'rdcd-<backbone>-<dim>-<12 hex>' over weights + architecture + input + whitening."""
    digest = hashlib.sha256()
    hashed = {k: card.to_dict()[k] for k in ("format", "architecture", "input", "whitening")}
    digest.update(json.dumps(hashed, sort_keys=True).encode())
    for name in sorted(tensors):
        tensor = tensors[name]
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return _model_id(card, digest.hexdigest())


def quantized_model_id(card: ModelCard, graph: bytes) -> str:
    """'rdcd-<backbone>-<dim>-int8-<12 hex>' over the parent's id, input handling and graph."""
    if card.quantization is None:
        raise ModelCardError("quantized_model_id needs a card with quantization")
    digest = hashlib.sha256()
    hashed = {k: card.to_dict()[k] for k in ("format", "architecture", "input", "whitening")}
    hashed["parent"] = card.quantization.parent_model_id
    digest.update(json.dumps(hashed, sort_keys=True).encode())
    digest.update(graph)
    return _model_id(card, digest.hexdigest(), kind="int8-")


def _model_id(card: ModelCard, hexdigest: str, kind: str = "") -> str:
    backbone = card.architecture.backbone
    short = SHORT_NAMES.get(backbone, re.sub(r"[^a-z0-9]+", "", backbone.lower()))
    return f"rdcd-{short}-{card.output_dim}-{kind}{hexdigest[:12]}"


def save_model(
    model: DescriptorModel,
    card: ModelCard,
    directory_url: str,
    storage: StorageOptions | None = None,
) -> ModelCard:
    """Write model.safetensors then card.json (the card last: it is the commit marker)."""
    if asdict(card.architecture) != asdict(_architecture_of(model)):
        raise ModelCardError(
            f"card architecture {asdict(card.architecture)} does not describe the model "
            f"{asdict(_architecture_of(model))}"
        )
    tensors = _tensors_of(model)
    card.whitening = _whitening_of(model)
    card.model_id = compute_model_id(card, tensors)
    card.created = card.created or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    weights = save_safetensors(tensors, metadata={"model_id": card.model_id})
    write_bytes_atomic(join(directory_url, WEIGHTS_FILE), weights, storage)
    write_card(directory_url, card, storage)
    return card


def write_card(directory_url: str, card: ModelCard, storage: StorageOptions | None = None):
    payload = json.dumps(card.to_dict(), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(join(directory_url, CARD_FILE), payload.encode(), storage)


def _read_bytes(url: str, storage: StorageOptions | None) -> bytes:
    if not exists(url, storage):
        raise ModelCardError(f"{url} not found: not a model directory (needs {CARD_FILE})")
    return read_bytes(url, storage)


def read_card(spec: str, storage: StorageOptions | None = None) -> ModelCard:
    """The card of a model directory, without loading (or checking) its weights."""
    raw = _read_bytes(join(resolve_model_dir(spec), CARD_FILE), storage)
    try:
        return ModelCard.from_dict(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ModelCardError(f"{spec}: {CARD_FILE} is not valid JSON: {exc}") from exc


def load_model(
    spec: str = "default", storage: StorageOptions | None = None
) -> tuple[DescriptorModel, ModelCard]:
    """Build the network from the card, load and verify the weights; eval mode, fp32, CPU."""
    directory = resolve_model_dir(spec)
    card = read_card(directory, storage)
    if card.quantization is not None:
        raise ModelCardError(
            f"{directory} is an int8 ONNX model ({card.model_id}, quantised from "
            f"{card.quantization.parent_model_id}): it holds no torch weights; embed with it "
            "through load_embedder on CPU, or load its parent model"
        )
    try:
        tensors = load_safetensors(_read_bytes(join(directory, WEIGHTS_FILE), storage))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        if isinstance(exc, ModelCardError):
            raise
        raise ModelCardError(f"{directory}: {WEIGHTS_FILE} is not readable: {exc}") from exc
    arch = card.architecture
    model = DescriptorModel(arch.backbone, kd_dim=arch.kd_dim, dim=arch.dim, gem_p=arch.gem_p)
    if card.whitening.present:
        if not all(key in tensors for key in WHITENING_KEYS):
            raise ModelCardError(f"{directory}: card says whitened but weights hold no whitening")
        model.set_whitening(tensors["whitening.mean"], tensors["whitening.matrix"])
    _check_tensors(directory, model, tensors)
    model.load_state_dict(tensors, strict=False)
    expected = compute_model_id(card, _tensors_of(model))
    if card.model_id != expected:
        raise ModelCardError(
            f"{directory}: card model_id {card.model_id} does not match its weights and "
            f"architecture ({expected}); the card or {WEIGHTS_FILE} was changed or mixed up"
        )
    return model.eval(), card


def read_int8_graph(spec: str, storage: StorageOptions | None = None) -> tuple[bytes, ModelCard]:
    """The int8 ONNX graph of a quantised model, checked against its card's sha256 and id."""
    directory = resolve_model_dir(spec)
    card = read_card(directory, storage)
    if card.quantization is None:
        raise ModelCardError(f"{directory}: not an int8 model (its card has no quantization)")
    if card.quantization.format != INT8_FORMAT:
        raise ModelCardError(f"{directory}: unknown int8 format {card.quantization.format!r}")
    graph = _read_bytes(join(directory, card.quantization.file), storage)
    if hashlib.sha256(graph).hexdigest() != card.quantization.sha256:
        raise ModelCardError(
            f"{directory}: {card.quantization.file} does not match the sha256 in its card; "
            "the graph was changed or truncated"
        )
    if quantized_model_id(card, graph) != card.model_id:
        raise ModelCardError(f"{directory}: card model_id {card.model_id} does not match its graph")
    return graph, card


def _check_tensors(directory: str, model: DescriptorModel, tensors: dict[str, torch.Tensor]):
    wanted = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(wanted) - set(tensors))
    extra = sorted(set(tensors) - set(wanted))
    wrong = [k for k in wanted if k in tensors and tensors[k].shape != wanted[k].shape]
    if missing or extra or wrong:
        raise ModelCardError(
            f"{directory}: weights do not fit the card's architecture "
            f"(missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {wrong[:3]})"
        )


def with_threshold(
    directory_url: str, threshold: float | None, storage: StorageOptions | None = None
) -> ModelCard:
    """Set the recommended cosine threshold in a saved card; model_id stays the same."""
    if is_shipped(directory_url):
        raise ModelCardError(
            f"the shipped model '{directory_url}' is not edited in place; calibrate a copy"
        )
    card = read_card(directory_url, storage)
    card.threshold = None if threshold is None else float(threshold)
    write_card(directory_url, card, storage)
    return card
