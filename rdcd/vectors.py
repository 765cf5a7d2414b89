"""The exact fp16 descriptors in a random-access layout, for re-scoring index candidates.

Parquet is columnar and compressed: good for scans, bad for "give me rows 17, 90211 and 5".
Re-scoring every kNN candidate needs exactly that, so the index stage also writes the
descriptors as dense row-major float16 .npy files, one per shard of consecutive ids. Workers
memory-map them (remote files are first copied to a local cache), so a gather touches only
the pages it needs and every process on a node shares one page cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rdcd.storage import StorageOptions, get_filesystem, protocol_of, strip_protocol

CACHE_DIR_ENV = "RDCD_CACHE_DIR"


class VectorFileError(ValueError):
    """A vector shard that is missing, truncated or not the shape the index says."""


def local_copy(url: str, options: StorageOptions | None = None) -> str:
    """A local path for url: the path itself when local, else a cached download.

    Files of one remote folder land in one local folder (an on-disk index finds its data file
    next to it); a size change fetches the object again; the download lands under a temporary
    name first, so concurrent workers never see half a file.
    """
    if protocol_of(url) == "file":
        return strip_protocol(url)
    fs = get_filesystem(url, options)
    remote = strip_protocol(url)
    try:
        size = fs.size(remote)
    except FileNotFoundError as exc:
        raise VectorFileError(f"{url}: not found") from exc
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "rdcd-cache")
    key = hashlib.sha1(url.rsplit("/", 1)[0].encode()).hexdigest()[:20]
    path = os.path.join(root, key, os.path.basename(remote))
    if os.path.exists(path) and os.path.getsize(path) == size:
        return path
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.part"
    fs.get(remote, tmp)
    os.replace(tmp, path)
    return path


def save_vectors(vectors: np.ndarray, path: str, dtype=np.float16) -> None:
    """Write (n, d) rows as .npy (self-describing, memory-mappable) atomically."""
    tmp = f"{path}.{uuid.uuid4().hex}.part"
    with open(tmp, "wb") as handle:
        np.save(handle, np.ascontiguousarray(vectors, dtype=dtype))
    os.replace(tmp, path)


def open_vectors(path: str, rows: int, dim: int, dtype=np.float16) -> np.ndarray:
    """Memory-map one shard; a clear error naming the file when it is not (rows, dim) dtype."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as exc:
        raise VectorFileError(f"{path}: unreadable vector shard ({exc})") from exc
    if array.dtype != np.dtype(dtype) or array.shape != (rows, dim):
        raise VectorFileError(
            f"{path}: vector shard holds {array.dtype} {array.shape}, expected "
            f"{np.dtype(dtype)} ({rows}, {dim}); the folder is damaged or mixed up"
        )
    return array


@dataclass
class VectorStore:
    """Rows [starts[i], starts[i] + len(shards[i])) of the id space live in shards[i].

    Also holds per-row scalars (dim 1, float32), e.g. score-normalisation offsets.
    """

    shards: Sequence[np.ndarray]
    starts: np.ndarray
    dim: int

    @classmethod
    def open(
        cls,
        paths: Sequence[str],
        starts: Sequence[int],
        counts: Sequence[int],
        dim: int,
        dtype=np.float16,
    ) -> VectorStore:
        shards = [open_vectors(p, int(n), dim, dtype) for p, n in zip(paths, counts, strict=True)]
        return cls(shards, np.asarray(starts, dtype=np.int64), dim)

    @property
    def total(self) -> int:
        return int(self.starts[-1] + len(self.shards[-1])) if self.shards else 0

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Consecutive ids [lo, hi) as float32 (may span shards)."""
        return self.gather(np.arange(lo, hi, dtype=np.int64))

    def gather(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), d) float32 for arbitrary ids, reading each shard once in sorted order."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        if len(ids) == 0:
            return out
        if ids.min() < 0 or ids.max() >= self.total:
            raise IndexError(f"vector ids outside [0, {self.total})")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        shard_of = np.searchsorted(self.starts, sorted_ids, side="right") - 1
        bounds = np.searchsorted(shard_of, np.arange(len(self.shards) + 1))
        for shard, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            if lo == hi:
                continue
            local = sorted_ids[lo:hi] - self.starts[shard]
            out[order[lo:hi]] = self.shards[shard][local]
        return out
