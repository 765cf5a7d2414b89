"""Precomputed teacher targets: K augmented views per image with the teacher's descriptor of
each, written once as Parquet and then reused for many epochs.

On a CPU the int8 SSCD teacher embeds about 6-25 images/s, slower than the student trains,
so paying for it once per view instead of once per step is what makes CPU distillation
possible. A row per image holds its K views (JPEG) and K teacher rows, so any two views of an
image form a training pair without a shuffle. The cache is one stage: written under a
temporary name, published, manifest last; a re-run with the same settings reuses it.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import torch

from rdcd import sources
from rdcd.augment import AugmentSettings, advanced, generator
from rdcd.cards import read_card
from rdcd.embedder import load_embedder
from rdcd.preprocess import ImageError
from rdcd.storage import (
    StorageOptions,
    get_filesystem,
    get_pyarrow_filesystem,
    is_complete,
    publish_directory,
    read_manifest,
    strip_protocol,
    write_manifest,
)
from rdcd.synth import encode_jpeg
from train.data import _usable, decode_for_augment, image_key
from train.settings import StudentSettings

CACHE_FORMAT = "rdcd-teacher-cache/1"


class CacheError(ValueError):
    """A cache location that holds a cache of other settings."""


def cache_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("image_id", pa.string()),
            ("image_key", pa.int64()),
            ("views", pa.list_(pa.binary())),
            ("teacher", pa.list_(pa.list_(pa.float16(), dim))),
        ]
    )


def make_views(
    batch: dict[str, np.ndarray],
    settings: AugmentSettings,
    count: int,
    seed: int,
    exclude: frozenset[str],
    max_pixels: int,
    quality: int,
) -> dict[str, Any]:
    """Ray Data UDF: image bytes -> K views as JPEG; seeded by (seed, image) so a rebuild
    of the cache gives the same views."""
    ids, keys, views = [], [], []
    for i in _usable(batch, exclude):
        try:
            img = decode_for_augment(batch["bytes"][i], settings.size, max_pixels)
        except ImageError:
            continue
        key = image_key(batch["image_id"][i])
        rng = generator(seed, key)
        ids.append(batch["image_id"][i])
        keys.append(key)
        views.append([encode_jpeg(advanced(img, rng, settings), quality) for _ in range(count)])
    return pa.table(
        {
            "image_id": pa.array(ids, pa.string()),
            "image_key": pa.array(keys, pa.int64()),
            "views": pa.array(views, pa.list_(pa.binary())),
        }
    )


class TeacherDescriptors:
    """Ray Data actor: adds the teacher's descriptor of every cached view."""

    def __init__(self, spec: str, size: int, device: str, threads: int | None, batch: int):
        self.embedder = load_embedder(spec, device=device, input_size=size, threads=threads)
        self.size = size
        self.batch = batch

    def __call__(self, table: pa.Table) -> pa.Table:
        from train.data import decode_view

        rows = table.column("views").to_pylist()
        pixels = [decode_view(view, self.size) for row in rows for view in row]
        outputs = [
            self.embedder.embed(np.stack(pixels[start : start + self.batch]))
            for start in range(0, len(pixels), self.batch)
        ]
        flat = np.concatenate(outputs) if outputs else np.zeros((0, self.embedder.dim))
        return table.append_column("teacher", nested_rows(flat, rows))


@dataclass(frozen=True)
class PrefixSpec:
    """The frozen student prefix whose output the cache also stores (train.frozen)."""

    student: StudentSettings
    size: int


class PrefixFeatures:
    """Ray Data actor: adds the frozen prefix's output for every cached view (float16)."""

    def __init__(self, spec: PrefixSpec, threads: int | None, batch: int):
        from rdcd.models import model_mean_std
        from train.objectives import Inputs
        from train.student import build_student

        if threads:
            torch.set_num_threads(int(threads))
        self.model = build_student(spec.student).eval()
        mean, std = model_mean_std(spec.student.backbone)
        self.inputs = Inputs(mean, std, spec.size, torch.device("cpu"))
        self.spec = spec
        self.batch = batch

    def __call__(self, table: pa.Table) -> pa.Table:
        from train.data import decode_view
        from train.frozen import prefix_features

        rows = table.column("views").to_pylist()
        pixels = [decode_view(view, self.spec.size) for row in rows for view in row]
        outputs = []
        for start in range(0, len(pixels), self.batch):
            chunk = torch.from_numpy(np.stack(pixels[start : start + self.batch]))
            blocks = self.spec.student.frozen_blocks
            features = prefix_features(self.model, self.inputs(chunk), blocks)
            outputs.append(features.reshape(len(chunk), -1).half().numpy())
        return table.append_column("features", nested_rows(np.concatenate(outputs), rows))


def nested_rows(flat: np.ndarray, rows: list[list]) -> pa.ListArray:
    """(sum K, D) float rows -> list<fixed_size_list<float16>[D]>, K per image row."""
    dim = flat.shape[1]
    inner = pa.FixedSizeListArray.from_arrays(
        pa.array(flat.astype(np.float16).reshape(-1), pa.float16()), dim
    )
    offsets = np.concatenate([[0], np.cumsum([len(row) for row in rows])]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner)


def fingerprint(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def build_cache(
    *,
    input_url: str,
    cache_url: str,
    source_options: sources.SourceOptions,
    storage: StorageOptions,
    augment: AugmentSettings,
    teacher: str,
    views: int,
    seed: int,
    exclude: frozenset[str],
    max_pixels: int,
    quality: int = 95,
    device: str = "auto",
    actors: int = 1,
    actor_num_cpus: float = 1.0,
    actor_threads: int | None = None,
    map_num_cpus: float = 0.5,
    prefix: PrefixSpec | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the cache; returns its manifest."""
    import ray.data

    if views < 2:
        raise ValueError("a teacher cache needs at least 2 views per image to form pairs")
    listing = sources.list_inputs(input_url, source_options, storage)
    identity = {
        "format": CACHE_FORMAT,
        "input": listing.digest,
        "exclude": sorted(exclude),
        "teacher": teacher,
        "views": views,
        "seed": seed,
        "augment": asdict(augment),
        "quality": quality,
        "prefix": _prefix_identity(prefix),
    }
    digest = fingerprint(identity)
    manifest = read_manifest(cache_url, storage)
    if manifest is not None and is_complete(cache_url, storage):
        if manifest.get("fingerprint") != digest:
            raise CacheError(
                f"{cache_url} holds a teacher cache built with other settings (input, teacher, "
                "views, seed or augmentation); point train.data.cache at a new location"
            )
        return manifest
    tmp_url = f"{cache_url.rstrip('/')}.tmp-{uuid.uuid4().hex[:8]}"
    # Fractional CPUs everywhere: whole-CPU actors would starve the read tasks on small nodes.
    images = sources.read_images(listing, source_options, storage, num_cpus=map_num_cpus)
    with_views = images.map_batches(
        make_views,
        fn_kwargs={
            "settings": augment,
            "count": views,
            "seed": seed,
            "exclude": exclude,
            "max_pixels": max_pixels,
            "quality": quality,
        },
        batch_size=8,
        batch_format="numpy",
        num_cpus=map_num_cpus,
    )
    with_teacher = with_views.map_batches(
        TeacherDescriptors,
        fn_constructor_kwargs={
            "spec": teacher,
            "size": augment.size,
            "device": device,
            "threads": actor_threads,
            "batch": 64,
        },
        batch_size=8,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=actor_num_cpus,
        num_gpus=1 if device == "cuda" else 0,
    )
    if prefix is not None:
        with_teacher = with_teacher.map_batches(
            PrefixFeatures,
            fn_constructor_kwargs={"spec": prefix, "threads": actor_threads, "batch": 64},
            batch_size=8,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=actor_num_cpus,
        )
    filesystem = get_pyarrow_filesystem(tmp_url, storage)
    with_teacher.write_parquet(strip_protocol(tmp_url), filesystem=filesystem)
    written = pads.dataset(strip_protocol(tmp_url), format="parquet", filesystem=filesystem)
    images_written = written.count_rows()
    if images_written == 0:
        get_filesystem(tmp_url, storage).rm(strip_protocol(tmp_url), recursive=True)
        raise ValueError(f"no usable image in {input_url} (after train.exclude)")
    dim = written.schema.field("teacher").type.value_type.list_size
    publish_directory(tmp_url, cache_url, storage)
    return write_manifest(
        cache_url,
        {
            "status": "complete",
            "format": CACHE_FORMAT,
            "fingerprint": digest,
            "images": images_written,
            "views_per_image": views,
            "view_size": augment.size,
            "dim": dim,
            "teacher": teacher,
            "prefix": _prefix_identity(prefix),
            "feature_shape": _feature_shape(prefix) if prefix else None,
            "listing": listing.describe(max_objects=0),
            "excluded": len(exclude),
        },
        storage,
    )


def _prefix_identity(prefix: PrefixSpec | None) -> dict[str, Any] | None:
    """What determines the prefix output (the heads and the descriptor size do not). An init
    model is named by its model_id: a name such as 'default' can point to another model later."""
    if prefix is None:
        return None
    s = prefix.student
    return {
        "backbone": s.backbone,
        "weights": read_card(s.init_from).model_id if s.init_from else s.weights,
        "frozen_blocks": s.frozen_blocks,
        "size": prefix.size,
    }


def _feature_shape(prefix: PrefixSpec) -> list[int]:
    """(C, H, W) of the prefix output at the cached size."""
    from rdcd.models import DescriptorModel
    from train.frozen import prefix_features

    model = DescriptorModel(prefix.student.backbone, kd_dim=8, dim=8).eval()
    probe = torch.zeros(1, 3, prefix.size, prefix.size)
    return list(prefix_features(model, probe, prefix.student.frozen_blocks).shape[1:])
