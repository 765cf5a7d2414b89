"""Training data as Ray Data datasets: images from any source become pairs of views.

Two ways in. Online: images are read (rdcd.sources), decoded and augmented twice in CPU
tasks; the teacher runs in the training worker. Cached: a teacher cache (train.teacher_cache)
holds K augmented views per image with the teacher's descriptor of each; a pair is two
different cached views, the first one's teacher descriptor travelling with it. Either way a
worker sees rows {image_key, view0, view1[, teacher]} through ray.train.get_dataset_shard,
so nothing requires the data to fit on one machine.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pyarrow as pa
from PIL import Image

from rdcd import sources
from rdcd.augment import AugmentSettings, advanced
from rdcd.preprocess import ImageError, decode_image
from rdcd.storage import (
    StorageOptions,
    get_filesystem,
    get_pyarrow_filesystem,
    strip_protocol,
)

KEY_MASK = (1 << 63) - 1


def image_key(image_id: str) -> int:
    """A stable non-negative int64 per image id: queue entries remember their image by it."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "big") & (
        KEY_MASK
    )


def read_exclude(url: str | None, storage: StorageOptions | None = None) -> frozenset[str]:
    """Ids to leave out: the first field of each non-comment line of a text file."""
    if not url:
        return frozenset()
    fs = get_filesystem(url, storage)
    path = strip_protocol(url)
    if not fs.exists(path):
        raise FileNotFoundError(f"train.exclude file not found: {url}")
    with fs.open(path, "rb") as handle:
        lines = handle.read().decode("utf-8-sig").splitlines()
    return frozenset(
        line.split()[0] for line in lines if line.strip() and not line.lstrip().startswith("#")
    )


def decode_for_augment(data: bytes, view_size: int, max_pixels: int) -> Image.Image:
    """Decode, reduced (JPEG draft) to about twice the view size: crops keep enough detail."""
    return decode_image(data, max_pixels=max_pixels, target_size=2 * view_size)


def _usable(batch: dict[str, np.ndarray], exclude: frozenset[str]) -> list[int]:
    """Rows that hold bytes and are not excluded (read errors are dropped here)."""
    return [
        i
        for i, (image_id, data) in enumerate(zip(batch["image_id"], batch["bytes"], strict=True))
        if image_id is not None and data is not None and image_id not in exclude
    ]


def two_views(
    batch: dict[str, np.ndarray],
    settings: AugmentSettings,
    exclude: frozenset[str],
    max_pixels: int,
) -> dict[str, np.ndarray]:
    """Ray Data UDF: image bytes -> two independent ADVANCED views (uint8 arrays).

    Fresh entropy per call: every pass over the data draws new views (the chain itself is
    deterministic given its generator, see rdcd.augment)."""
    rng = np.random.default_rng()
    keys, first, second = [], [], []
    for i in _usable(batch, exclude):
        try:
            img = decode_for_augment(batch["bytes"][i], settings.size, max_pixels)
        except ImageError:
            continue
        keys.append(image_key(batch["image_id"][i]))
        first.append(np.asarray(advanced(img, rng, settings), dtype=np.uint8))
        second.append(np.asarray(advanced(img, rng, settings), dtype=np.uint8))
    empty = np.zeros((0, settings.size, settings.size, 3), np.uint8)
    return {
        "image_key": np.asarray(keys, dtype=np.int64),
        "view0": np.stack(first) if first else empty,
        "view1": np.stack(second) if second else empty,
    }


def online_dataset(
    input_url: str,
    source_options: sources.SourceOptions,
    storage: StorageOptions,
    settings: AugmentSettings,
    *,
    exclude: frozenset[str],
    max_pixels: int,
    num_cpus: float,
):
    """Images from input_url as pairs of views, augmented in CPU tasks."""
    images = sources.read_images(input_url, source_options, storage, num_cpus=num_cpus)
    return images.map_batches(
        two_views,
        fn_kwargs={"settings": settings, "exclude": exclude, "max_pixels": max_pixels},
        batch_size=16,
        batch_format="numpy",
        num_cpus=num_cpus,
    )


def decode_view(data: bytes, size: int) -> np.ndarray:
    """A cached view (JPEG) at size x size."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(img, dtype=np.uint8)


def cached_pairs(
    batch: pa.Table, size: int, feature_shape: list[int] | None = None
) -> dict[str, np.ndarray]:
    """Ray Data UDF: cached image rows (K views + K teacher rows) -> one training pair each:
    two different views, the first one's teacher descriptor as the target. With
    feature_shape the pair is the cached prefix features (feat0/feat1), not pixels."""
    rng = np.random.default_rng()
    teacher = teacher_matrix(batch.column("teacher"))
    picks = [rng.choice(teacher.shape[1], size=2, replace=False) for _ in range(len(teacher))]
    out = {
        "image_key": batch.column("image_key").to_numpy(),
        "teacher": np.stack([teacher[row, i] for row, (i, _) in enumerate(picks)]),
    }
    if feature_shape is not None:
        features = teacher_matrix(batch.column("features"), np.float16)
        shape = (len(picks), *feature_shape)
        out["feat0"] = np.stack([features[r, i] for r, (i, _) in enumerate(picks)]).reshape(shape)
        out["feat1"] = np.stack([features[r, j] for r, (_, j) in enumerate(picks)]).reshape(shape)
        return out
    views = batch.column("views").to_pylist()
    out["view0"] = np.stack([decode_view(views[r][i], size) for r, (i, _) in enumerate(picks)])
    out["view1"] = np.stack([decode_view(views[r][j], size) for r, (_, j) in enumerate(picks)])
    return out


def teacher_matrix(column: pa.ChunkedArray | pa.Array, dtype=np.float32) -> np.ndarray:
    """list<fixed_size_list<float16>[D]> -> (rows, K, D) (K equal in every row)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    inner = column.flatten()
    dim = inner.type.list_size
    flat = inner.flatten().to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return flat.reshape(len(column), -1, dim)


def cached_dataset(
    cache_url: str,
    storage: StorageOptions,
    size: int,
    num_cpus: float,
    feature_shape: list[int] | None = None,
):
    """Pairs of cached views (resized to the student's input), or of their cached prefix
    features, with the teacher's targets."""
    import ray.data

    tables = ray.data.read_parquet(
        strip_protocol(cache_url),
        filesystem=get_pyarrow_filesystem(cache_url, storage),
        file_extensions=["parquet"],
    )
    return tables.map_batches(
        cached_pairs,
        fn_kwargs={"size": size, "feature_shape": feature_shape},
        batch_size=16,
        batch_format="pyarrow",
        num_cpus=num_cpus,
    )
