"""The one inference API: load_embedder(spec) -> Embedder with embed(uint8 batch) -> unit rows.

Pipelines, evaluation and training all go through here, so a model directory, the shipped
default, the SSCD teacher, a TorchScript file or a timm trunk are interchangeable. The runtime
is chosen for speed: ONNX Runtime on CPU (students exported once per model_id, checked against
eager torch), torch with autocast + channels_last on CUDA. int8 models (rdcd.quantize) carry
their own ONNX graph and run on CPU only.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from rdcd.cards import ModelCard, load_model, read_card, read_int8_graph
from rdcd.models import PixelModel, model_mean_std
from rdcd.storage import StorageOptions
from rdcd.teachers import (
    SSCD_INPUT_SIZE,
    OnnxTeacher,
    TimmGeM,
    TorchScriptDescriptor,
    sscd_onnx,
    torchscript_model_id,
)

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "torch", "onnx")
DEVICES = ("auto", "cpu", "cuda")
EXPORT_TOLERANCE = 1e-3
"""Largest |ONNX - eager| per descriptor coordinate accepted for an exported student."""
BF16_MIN_COSINE = 0.999
"""CPU bf16 autocast is used only if every check descriptor keeps this cosine to fp32."""


class EmbedderError(ValueError):
    """A spec, device or runtime that cannot be served, or a malformed image batch."""


@runtime_checkable
class Embedder(Protocol):
    """uint8 (B, input_size, input_size, 3) RGB -> float32 (B, dim) unit-norm rows."""

    model_id: str
    dim: int
    input_size: int
    resize: str

    def embed(self, images: np.ndarray) -> np.ndarray: ...


def _check_batch(images: np.ndarray, input_size: int, resize: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise EmbedderError(
            f"embed() wants a uint8 (B, H, W, 3) batch, got {images.dtype} {images.shape}"
        )
    if resize == "square" and images.shape[1:3] != (input_size, input_size):
        raise EmbedderError(
            f"embed() wants images resized to {input_size}x{input_size} (policy 'square'), "
            f"got {images.shape[1]}x{images.shape[2]}; use rdcd.preprocess.load_rgb"
        )
    return np.ascontiguousarray(images)


def _unit_rows(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float32)
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    return array / np.maximum(norms, 1e-12)


class OnnxEmbedder:
    """ONNX Runtime over a uint8-NHWC graph (the SSCD teacher, or an exported student); path
    may also be the graph's bytes."""

    def __init__(
        self,
        path: str | Path | bytes,
        *,
        model_id: str,
        dim: int,
        input_size: int,
        resize: str,
        threads: int | None = None,
        device: str = "cpu",
    ):
        import onnxruntime as ort

        self.model_id, self.dim, self.input_size, self.resize = model_id, dim, input_size, resize
        self.runtime = "onnx"
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers = ["CPUExecutionProvider"]
        if device == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.device = "cuda" if providers[0].startswith("CUDA") else "cpu"
        if device == "cuda" and self.device == "cpu":
            log.warning("%s: onnxruntime has no CUDA provider here; running on CPU", model_id)
        graph = path if isinstance(path, bytes) else str(path)
        self.session = ort.InferenceSession(graph, options, providers=providers)
        self._input = self.session.get_inputs()[0].name

    @classmethod
    def for_card(cls, graph: str | Path | bytes, card: ModelCard, threads: int | None):
        """A student's graph on the CPU, with the id, d and input handling of its card."""
        return cls(
            graph,
            model_id=card.model_id,
            dim=card.output_dim,
            input_size=card.input.size,
            resize=card.input.resize,
            threads=threads,
        )

    def embed(self, images: np.ndarray) -> np.ndarray:
        images = _check_batch(images, self.input_size, self.resize)
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        return _unit_rows(self.session.run(None, {self._input: images})[0])


class TorchEmbedder:
    """torch over a PixelModel: channels_last always, autocast (bf16/fp16) where it pays."""

    def __init__(
        self,
        module: nn.Module,
        *,
        model_id: str,
        dim: int,
        input_size: int,
        resize: str,
        device: str = "cpu",
        autocast: torch.dtype | None = None,
    ):
        self.model_id, self.dim, self.input_size, self.resize = model_id, dim, input_size, resize
        self.runtime = "torch"
        self.device = device
        self.autocast = autocast
        self.module = module.eval().to(device).to(memory_format=torch.channels_last)
        self._pinned: torch.Tensor | None = None

    def _to_device(self, images: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(images)
        if self.device != "cuda":
            return tensor
        if self._pinned is None or self._pinned.numel() < tensor.numel():
            self._pinned = torch.empty(tensor.numel(), dtype=torch.uint8).pin_memory()
        staging = self._pinned[: tensor.numel()].view(tensor.shape)
        staging.copy_(tensor)
        return staging.to(self.device, non_blocking=True)

    def embed(self, images: np.ndarray) -> np.ndarray:
        images = _check_batch(images, self.input_size, self.resize)
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        device_type = "cuda" if self.device == "cuda" else "cpu"
        with (
            torch.inference_mode(),
            torch.autocast(device_type, dtype=self.autocast, enabled=self.autocast is not None),
        ):
            out = self.module(self._to_device(images))
        return _unit_rows(out.float().cpu().numpy())


def _check_images(size: int, count: int = 4) -> np.ndarray:
    """Deterministic smooth + noisy uint8 images for runtime equivalence checks."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    base = (ramp[None, :, None] + ramp[:, None, None] * 0.5) % 256
    noise = rng.integers(0, 64, (count, size, size, 3))
    return ((base[None] + noise + 40 * np.arange(count)[:, None, None, None]) % 256).astype(
        np.uint8
    )


def _resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise EmbedderError(f"device '{device}' not in {DEVICES}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise EmbedderError("device 'cuda' requested but torch sees no CUDA device")
    return device


def _cache_dir(cache_dir: str | None) -> Path:
    if cache_dir:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "rdcd" / "onnx"


def export_onnx(module: nn.Module, path: Path, input_size: int, dynamo: bool = True) -> None:
    """Export a PixelModel (uint8 NHWC in) with a dynamic batch and fixed size, atomically.

    The dynamo exporter takes ~5-10x longer than the TorchScript-based one (dynamo=False) but
    folds timm's TF "same" padding into the convolutions, where the other graph recomputes
    pads from shapes at run time (283 vs 69 nodes for Lite0 after ONNX Runtime's
    optimisation); the export is cached, so run-time speed wins. Callers check the result.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.from_numpy(_check_images(input_size, 2))
    names = {"input_names": ["image"], "output_names": ["embedding"]}
    if dynamo:
        batch = torch.export.Dim("batch", min=1, max=65536)
        options = {"dynamo": True, "dynamic_shapes": ({0: batch},), "external_data": False}
    else:
        axes = {"image": {0: "batch"}, "embedding": {0: "batch"}}
        options = {"dynamo": False, "dynamic_axes": axes, "opset_version": 17}
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        tmp_path = Path(tmp) / path.name
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module.eval(), (example,), str(tmp_path), **names, **options)
        os.replace(tmp_path, path)


def _checked_onnx(
    path: Path, module: nn.Module, card: ModelCard, threads: int | None
) -> tuple[OnnxEmbedder | None, str]:
    """(embedder, "") when the graph at path reproduces eager torch, else (None, why not)."""
    try:
        embedder = OnnxEmbedder.for_card(path, card, threads)
        check = _check_images(card.input.size)
        with torch.inference_mode():
            eager = module.eval()(torch.from_numpy(check)).numpy()
        error = float(np.abs(embedder.embed(check) - eager).max())
    except Exception as exc:  # a corrupt or foreign file: ONNX Runtime raises many types
        return None, f"cannot be run ({exc})"
    if error > EXPORT_TOLERANCE:
        return None, f"differs from eager torch by {error:.2e}"
    return embedder, ""


@contextlib.contextmanager
def _export_lock(path: Path) -> Iterator[None]:
    """One exporter per cached file on a machine: actors starting together wait, then reuse."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _student_onnx(
    module: nn.Module, card: ModelCard, threads: int | None, cache_dir: str | None
) -> OnnxEmbedder | None:
    """ONNX Runtime for a student (exported once per model_id and size, checked against eager
    torch every load), or None with a warning when the export cannot be trusted."""
    path = _cache_dir(cache_dir) / f"{card.model_id}-{card.input.size}.onnx"
    with _export_lock(path):
        if path.is_file():
            embedder, reason = _checked_onnx(path, module, card, threads)
            if embedder is not None:
                return embedder
            log.warning("cached %s %s; exporting again", path, reason)
            path.unlink(missing_ok=True)
        try:
            export_onnx(module, path, card.input.size)
        except Exception as exc:  # exporter failures come in many types; torch still serves
            warnings.warn(
                f"ONNX export of {card.model_id} failed ({exc}); using torch", stacklevel=4
            )
            return None
        embedder, reason = _checked_onnx(path, module, card, threads)
        if embedder is None:
            path.unlink(missing_ok=True)
            warnings.warn(f"ONNX export of {card.model_id} {reason}; using torch", stacklevel=4)
        return embedder


def _cpu_bf16_ok(module: nn.Module, size: int) -> bool:
    """bf16 autocast on CPU pays only with AMX/avx512_bf16 and only if descriptors hold."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    check = torch.from_numpy(_check_images(size))
    with torch.inference_mode():
        reference = module(check).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = module(check).float()
    cosine = torch.nn.functional.cosine_similarity(reference, low, dim=-1)
    return bool(cosine.min() >= BF16_MIN_COSINE)


def _cuda_dtype() -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _torch_embedder(
    module: nn.Module,
    *,
    model_id: str,
    dim: int,
    size: int,
    resize: str,
    device: str,
    threads: int | None,
) -> TorchEmbedder:
    if threads:
        torch.set_num_threads(int(threads))
    module = module.eval().to(memory_format=torch.channels_last)
    if device == "cuda":
        dtype = _cuda_dtype()
    else:
        dtype = torch.bfloat16 if _cpu_bf16_ok(module, size) else None
    return TorchEmbedder(
        module,
        model_id=model_id,
        dim=dim,
        input_size=size,
        resize=resize,
        device=device,
        autocast=dtype,
    )


def _int8_student(
    spec: str, device: str, runtime: str, threads: int | None, storage: StorageOptions | None
) -> OnnxEmbedder:
    """An int8 model: its own checked graph on ONNX Runtime's CPU provider."""
    graph, card = read_int8_graph(spec, storage)
    if runtime == "torch":
        raise EmbedderError(f"{card.model_id} is an int8 ONNX model; use runtime auto or onnx")
    if device == "cuda":
        raise EmbedderError(
            f"{card.model_id} is an int8 model for CPUs; on CUDA use its fp32 parent "
            f"{card.quantization.parent_model_id}"
        )
    return OnnxEmbedder.for_card(graph, card, threads)


def _student(
    spec: str,
    device: str,
    runtime: str,
    threads: int | None,
    storage: StorageOptions | None,
    cache_dir: str | None,
    input_size: int | None,
    resize: str | None,
) -> Embedder:
    card = read_card(spec, storage)
    if input_size not in (None, card.input.size) or resize not in (None, card.input.resize):
        raise EmbedderError(
            f"{card.model_id} was made for {card.input.size}px '{card.input.resize}' input; "
            f"a student's input size and resize policy come from its card"
        )
    if card.quantization is not None:  # CPU only, whatever device 'auto' would find
        device = _resolve_device("cpu" if device == "auto" else device)
        return _int8_student(spec, device, runtime, threads, storage)
    device = _resolve_device(device)
    model, card = load_model(spec, storage)
    module = PixelModel(model, card.input.mean, card.input.std).eval()
    use_onnx = runtime == "onnx" or (runtime == "auto" and device == "cpu")
    if use_onnx and card.input.resize != "square":
        # A fixed-size export cannot serve variable aspect ratios; dynamic H/W export of
        # "same"-padded trunks takes minutes, so these models run on torch.
        if runtime == "onnx":
            raise EmbedderError(f"{card.model_id}: ONNX runtime needs resize policy 'square'")
        use_onnx = False
    if use_onnx and device == "cpu":
        embedder = _student_onnx(module, card, threads, cache_dir)
        if embedder is not None:
            return embedder
    if use_onnx and device == "cuda":
        raise EmbedderError("runtime 'onnx' for students runs on CPU; use device=cpu or torch")
    return _torch_embedder(
        module,
        model_id=card.model_id,
        dim=card.output_dim,
        size=card.input.size,
        resize=card.input.resize,
        device=device,
        threads=threads,
    )


def _sscd(device: str, runtime: str, threads: int | None, size: int | None, resize: str | None):
    if runtime == "torch":
        raise EmbedderError("the SSCD ONNX teacher runs on ONNX Runtime; use runtime auto/onnx")
    teacher: OnnxTeacher = sscd_onnx(size or SSCD_INPUT_SIZE, resize or "square")
    return OnnxEmbedder(
        teacher.path,
        model_id=teacher.model_id,
        dim=teacher.dim,
        input_size=teacher.input_size,
        resize=teacher.resize,
        threads=threads,
        device=device,
    )


def load_embedder(
    spec: str = "default",
    *,
    device: str = "auto",
    runtime: str = "auto",
    threads: int | None = None,
    storage: StorageOptions | None = None,
    input_size: int | None = None,
    resize: str | None = None,
    cache_dir: str | None = None,
) -> Embedder:
    """Load an embedder. spec: 'default' | 'sscd' | model directory/URL | 'torchscript:<path>'
    | 'timm:<name>'. input_size/resize set a teacher's input; a student's come from its card.
    threads: ONNX Runtime intra-op threads, or torch.set_num_threads for torch runtimes."""
    if runtime not in RUNTIMES:
        raise EmbedderError(f"runtime '{runtime}' not in {RUNTIMES}")
    if spec == "sscd":
        return _sscd(_resolve_device(device), runtime, threads, input_size, resize)
    if not spec.startswith(("torchscript:", "timm:")):
        return _student(spec, device, runtime, threads, storage, cache_dir, input_size, resize)
    if runtime == "onnx":
        raise EmbedderError(f"{spec}: teachers other than 'sscd' run on torch only")
    kind, _, target = spec.partition(":")
    size = input_size or (SSCD_INPUT_SIZE if kind == "torchscript" else 224)
    if kind == "torchscript":
        network: nn.Module = TorchScriptDescriptor(target)
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        model_id = torchscript_model_id(target)
        with torch.inference_mode():
            dim = int(network(torch.zeros(1, 3, 64, 64)).shape[-1])
    else:
        network = TimmGeM(target)
        mean, std = model_mean_std(target)
        model_id, dim = f"timm-{target}-gem", network.dim
    return _torch_embedder(
        PixelModel(network, mean, std),
        model_id=model_id,
        dim=dim,
        size=size,
        resize=resize or "square",
        device=_resolve_device(device),
        threads=threads,
    )


def embedder_from_config(config: dict[str, Any], spec: str | None = None) -> Embedder:
    """load_embedder with the `model:` and `storage:` sections of an rdcd config."""
    section = config["model"]
    return load_embedder(
        spec or section["card"],
        device=section["device"],
        runtime=section["runtime"],
        threads=section["threads"],
        storage=StorageOptions.from_config(config.get("storage")),
        cache_dir=section["onnx_cache"],
    )
