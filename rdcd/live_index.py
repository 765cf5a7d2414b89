"""The index a nightly history grows: a quantizer trained once, one part per run, searched as one.

Every run adds its images as a new part (the trained empty index + the run's vectors under
their dense row ids), so a night costs what its new images cost, whatever the history holds.
Searching stacks the parts' inverted lists (faiss HStackInvertedLists over memory-mapped part
files) into one index: one coarse assignment per query, each probed list read from every part.
When the parts get many they are compacted into one on-disk part; when the quantizer drifts
(rdcd/drift.py) or the history outgrows an exact index, a new generation is trained.

Layout under VERSION/index/ (the ledger in state.json says which files are live):

    vectors/<run_id>.npy          the run's exact fp16 descriptors, rows = its dense ids
    ids/<run_id>.parquet          the id map: row_id, image_id, uri, content_hash, sizes
    gen-<G>/trained.faiss         generation G's trained empty IVF index
    gen-<G>/parts/<name>.faiss    vectors added to it (+ .ivfdata for a compacted part)
    gen-<G>/parts/<name>.sizes.npy  its inverted-list sizes, for the imbalance check

Small histories (up to index.flat_max_vectors) use no faiss files at all: search is exact
brute force over the vector files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rdcd import drift
from rdcd import index as ix
from rdcd import storage as st
from rdcd.vectors import CACHE_DIR_ENV, VectorStore, save_vectors

IDS_SCHEMA = pa.schema(
    [
        ("row_id", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("content_hash", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("bytes", pa.int64()),
    ]
)
"""The id map of a run. bytes is the object size the listing saw (null inside tar/Parquet
containers): a listed id whose size changed is re-read, and the keep policy's file_size."""
FLAT_CHUNK = 65536  # history rows converted to float32 at a time by the exact search


@dataclass(frozen=True)
class Span:
    """Consecutive dense ids start .. start + count - 1 that one run (or part) holds."""

    name: str
    start: int
    count: int


def index_url(version_url: str, *parts: str) -> str:
    return st.join(version_url, "index", *parts)


def vectors_url(version_url: str, run_id: str) -> str:
    return index_url(version_url, "vectors", f"{run_id}.npy")


def ids_url(version_url: str, run_id: str) -> str:
    return index_url(version_url, "ids", f"{run_id}.parquet")


def generation_url(version_url: str, generation: int) -> str:
    return index_url(version_url, f"gen-{generation:04d}")


def part_url(version_url: str, generation: int, name: str, suffix: str = ".faiss") -> str:
    return st.join(generation_url(version_url, generation), "parts", f"{name}{suffix}")


def put_file(local_path: str, url: str, storage: st.StorageOptions | None) -> None:
    """Publish a finished local file at url atomically (rename locally; temp name + move on
    object stores), so a reader never sees half of it."""
    if st.protocol_of(url) == "file":
        target = st.strip_protocol(url)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{target}.{uuid.uuid4().hex}.part"
        shutil.copyfile(local_path, tmp)
        os.replace(tmp, target)
        return
    fs = st.get_filesystem(url, storage)
    remote = st.strip_protocol(url)
    tmp = f"{remote}.{uuid.uuid4().hex}.part"
    fs.put(local_path, tmp)
    fs.mv(tmp, remote)


def local_files(urls: list[str], storage: st.StorageOptions | None) -> list[str]:
    """Local paths for urls, downloaded together into one cache folder when remote (a
    compacted part's .faiss must sit next to its .ivfdata)."""
    if all(st.protocol_of(url) == "file" for url in urls):
        return [st.strip_protocol(url) for url in urls]
    fs = st.get_filesystem(urls[0], storage)
    sizes = [fs.size(st.strip_protocol(url)) for url in urls]
    root = os.environ.get(CACHE_DIR_ENV) or os.path.join(tempfile.gettempdir(), "rdcd-cache")
    key = hashlib.sha1(repr(list(zip(urls, sizes, strict=True))).encode()).hexdigest()[:20]
    folder = os.path.join(root, key)
    os.makedirs(folder, exist_ok=True)
    paths = []
    for url, size in zip(urls, sizes, strict=True):
        path = os.path.join(folder, os.path.basename(st.strip_protocol(url)))
        if not (os.path.exists(path) and os.path.getsize(path) == size):
            tmp = f"{path}.{uuid.uuid4().hex}.part"
            fs.get(st.strip_protocol(url), tmp)
            os.replace(tmp, path)
        paths.append(path)
    return paths


def write_run_vectors(
    version_url: str,
    run_id: str,
    vectors: np.ndarray,
    ids: pa.Table,
    storage: st.StorageOptions | None,
) -> None:
    """The run's fp16 vectors and id map, each published atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "v.npy")
        save_vectors(vectors, local)
        put_file(local, vectors_url(version_url, run_id), storage)
        local = os.path.join(tmp, "ids.parquet")
        pq.write_table(ids.cast(IDS_SCHEMA), local)
        put_file(local, ids_url(version_url, run_id), storage)


def open_store(
    version_url: str, spans: list[Span], dim: int, storage: st.StorageOptions | None
) -> VectorStore:
    """Every run's vectors as one random-access store over the dense id space."""
    spans = [s for s in spans if s.count]
    paths = local_files([vectors_url(version_url, s.name) for s in spans], storage) if spans else []
    return VectorStore.open(paths, [s.start for s in spans], [s.count for s in spans], dim)


def read_ids(
    version_url: str,
    spans: list[Span],
    storage: st.StorageOptions | None,
    columns: list[str] | None = None,
) -> pa.Table:
    """The id map rows of the given runs, in dense id order."""
    tables = []
    for span in spans:
        if not span.count:
            continue
        url = ids_url(version_url, span.name)
        with st.get_filesystem(url, storage).open(st.strip_protocol(url), "rb") as handle:
            tables.append(pq.read_table(handle, columns=columns))
    if not tables:
        schema = (
            IDS_SCHEMA if columns is None else pa.schema([IDS_SCHEMA.field(c) for c in columns])
        )
        return schema.empty_table()
    return pa.concat_tables(tables)


def lookup_rows(
    version_url: str,
    spans: list[Span],
    rows: np.ndarray,
    storage: st.StorageOptions | None,
    columns: list[str],
) -> pa.Table:
    """Id map columns for arbitrary dense row ids (in the order given), reading only the runs
    they fall in."""
    rows = np.asarray(rows, dtype=np.int64)
    spans = [s for s in spans if s.count]
    starts = np.array([s.start for s in spans], dtype=np.int64)
    if len(rows) == 0:
        return pa.table({c: pa.array([], IDS_SCHEMA.field(c).type) for c in columns})
    which = np.searchsorted(starts, rows, side="right") - 1
    pieces, positions = [], []
    for i in np.unique(which):
        span = spans[int(i)]
        mask = which == i
        table = read_ids(version_url, [span], storage, columns)
        pieces.append(table.take(pa.array(rows[mask] - span.start)))
        positions.append(np.flatnonzero(mask))
    order = np.argsort(np.concatenate(positions), kind="stable")
    return pa.concat_tables(pieces).take(pa.array(order))


def train_generation(
    version_url: str,
    generation: int,
    params: ix.IndexParams,
    sample: np.ndarray,
    storage: st.StorageOptions | None,
    use_gpu: bool = False,
) -> dict[str, float]:
    """Train generation's empty index on sample; returns the residual baseline figure."""
    index = ix.new_index(params, sample.shape[1])
    ix.train(index, sample, use_gpu)
    _, residuals = drift.assign(index, sample)
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "trained.faiss")
        ix.write_index(index, local)
        put_file(local, st.join(generation_url(version_url, generation), ix.TRAINED_FILE), storage)
    return {"residual": float(residuals.mean()) if len(residuals) else 0.0}


def add_part(
    version_url: str,
    generation: int,
    name: str,
    vectors: np.ndarray,
    first_id: int,
    storage: st.StorageOptions | None,
    use_gpu: bool = False,
) -> dict[str, Any]:
    """trained + vectors (ids first_id..) -> parts/<name>.faiss and its list sizes.

    Returns the part record and the new vectors' mean squared residual (for the drift check)."""
    trained_url = st.join(generation_url(version_url, generation), ix.TRAINED_FILE)
    index = ix.read_index(local_files([trained_url], storage)[0])
    lists, residuals = drift.assign(index, vectors)
    for lo in range(0, len(vectors), FLAT_CHUNK):
        chunk = np.asarray(vectors[lo : lo + FLAT_CHUNK], dtype=np.float32)
        index = ix.add_slice(index, chunk, first_id + lo, use_gpu)
    nlist = faiss.extract_index_ivf(index).nlist
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "part.faiss")
        ix.write_index(index, local)
        put_file(local, part_url(version_url, generation, name), storage)
        local = os.path.join(tmp, "sizes.npy")
        np.save(local, drift.list_sizes(lists, nlist))
        put_file(local, part_url(version_url, generation, name, ".sizes.npy"), storage)
    return {
        "part": {"name": name, "start": int(first_id), "count": len(vectors), "ondisk": False},
        "residual": float(residuals.mean()) if len(residuals) else 0.0,
    }


def total_sizes(
    version_url: str, generation: int, parts: list[dict[str, Any]], storage
) -> np.ndarray:
    """Inverted-list sizes summed over parts."""
    total = None
    for part in parts:
        url = part_url(version_url, generation, part["name"], ".sizes.npy")
        sizes = np.load(local_files([url], storage)[0])
        total = sizes if total is None else total + sizes
    return np.zeros(0, dtype=np.int64) if total is None else total


def compact(
    version_url: str,
    generation: int,
    parts: list[dict[str, Any]],
    name: str,
    storage: st.StorageOptions | None,
) -> dict[str, Any]:
    """Merge parts into one part whose lists live in an on-disk .ivfdata file."""
    trained_url = st.join(generation_url(version_url, generation), ix.TRAINED_FILE)
    base = ix.read_index(local_files([trained_url], storage)[0])
    ivf = faiss.extract_index_ivf(base)
    loaded = [_read_part(version_url, generation, part, storage) for part in parts]
    lists = faiss.InvertedListsPtrVector()
    for part in loaded:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, f"{name}.ivfdata")
        ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, data)
        ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
        ivf.replace_invlists(ondisk, True)
        ondisk.this.disown()
        base.ntotal = ivf.ntotal = ntotal
        local = os.path.join(tmp, f"{name}.faiss")
        ix.write_index(base, local)
        del base, loaded
        put_file(data, part_url(version_url, generation, name, ".ivfdata"), storage)
        put_file(local, part_url(version_url, generation, name), storage)
        sizes = total_sizes(version_url, generation, parts, storage)
        local = os.path.join(tmp, "sizes.npy")
        np.save(local, sizes)
        put_file(local, part_url(version_url, generation, name, ".sizes.npy"), storage)
    return {
        "name": name,
        "start": min(p["start"] for p in parts),
        "count": int(ntotal),
        "ondisk": True,
    }


def _read_part(version_url: str, generation: int, part: dict[str, Any], storage) -> faiss.Index:
    if part["ondisk"]:
        urls = [
            part_url(version_url, generation, part["name"]),
            part_url(version_url, generation, part["name"], ".ivfdata"),
        ]
        # On-disk lists are read through their own mapping; adding IO_FLAG_MMAP crashes faiss.
        return ix.read_index(local_files(urls, storage)[0], faiss.IO_FLAG_ONDISK_SAME_DIR)
    url = part_url(version_url, generation, part["name"])
    return ix.read_index(local_files([url], storage)[0], faiss.IO_FLAG_MMAP)


class SearchView:
    """All parts of a generation searched as one index (read-only)."""

    def __init__(
        self,
        version_url: str,
        index_state: dict[str, Any],
        nprobe: int,
        storage: st.StorageOptions | None,
    ) -> None:
        generation = int(index_state["generation"])
        trained_url = st.join(generation_url(version_url, generation), ix.TRAINED_FILE)
        self.index = ix.read_index(local_files([trained_url], storage)[0])
        self._parts = [
            _read_part(version_url, generation, p, storage) for p in index_state["parts"]
        ]
        self._lists = faiss.InvertedListsPtrVector()
        for part in self._parts:
            self._lists.push_back(faiss.extract_index_ivf(part).invlists)
        self._stack = faiss.HStackInvertedLists(self._lists.size(), self._lists.data())
        ivf = faiss.extract_index_ivf(self.index)
        ivf.replace_invlists(self._stack, False)
        ntotal = sum(int(p.ntotal) for p in self._parts)
        self.index.ntotal = ivf.ntotal = ntotal
        ix.set_nprobe(self.index, nprobe)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        return ix.search(self.index, queries, k)


def exact_search(store: VectorStore, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k most similar stored vectors (inner product), by brute force in chunks."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n = len(queries)
    k = min(int(k), store.total)
    best_scores = np.full((n, k), -np.inf, dtype=np.float32)
    best_ids = np.full((n, k), -1, dtype=np.int64)
    if n == 0 or k < 1:
        return best_ids
    for lo in range(0, store.total, FLAT_CHUNK):
        hi = min(store.total, lo + FLAT_CHUNK)
        block = store.rows(lo, hi)
        kk = min(k, hi - lo)
        scores, ids = faiss.knn(queries, block, kk, metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores = np.concatenate([best_scores, scores], axis=1)
        merged_ids = np.concatenate([best_ids, ids + lo], axis=1)
        top = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(merged_scores, top, 1)
        best_ids = np.take_along_axis(merged_ids, top, 1)
    return best_ids
