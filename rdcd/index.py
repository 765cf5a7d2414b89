"""Faiss indexes for all-pairs search: parameters, training, sliced adds, shard merging, I/O.

The life of an index: `choose_params` picks a factory string from N, d and a memory budget;
`train` fits the empty index once on a sample; workers `add_slice` consecutive id ranges into
shard files; `merge_shards` combines them into one index whose inverted lists live in a single
on-disk file (`index.ivfdata`) that every search worker memory-maps, so a node's workers share
one copy in the page cache and no worker holds the whole index in its own heap.

Ids are dense row numbers (0..N-1, assigned in a deterministic order by the caller), so they are
collision-free by construction and double as positions in the fp16 vector store.
"""

from __future__ import annotations

import math
import os
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import faiss
import numpy as np

from rdcd.storage import StorageOptions, exists, join, read_json
from rdcd.vectors import VectorStore, local_copy

INDEX_JSON = "index.json"
TRAINED_FILE = "trained.faiss"
INDEX_FILE = "index.faiss"
IVFDATA_FILE = "index.ivfdata"
ID_BYTES = 8  # an IVF list stores one int64 id next to every code
MIN_POINTS_PER_CENTROID = 39  # faiss warns below this: centroids are poorly estimated
PQ_MIN_TRAIN = 256 * MIN_POINTS_PER_CENTROID  # 8-bit PQ: 256 centroids per sub-quantizer
PQ_SIZES = (64, 48, 32, 24, 16, 12, 8, 4)  # bytes per code, largest first
METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}


class IndexFileError(ValueError):
    """An index file that cannot be read or does not match index.json; names the file."""


@dataclass(frozen=True)
class IndexParams:
    """What to build: the factory string and the numbers it was derived from."""

    factory: str
    metric: str
    nlist: int  # 0: exact flat index
    code_bytes: int
    train_size: int
    reason: str

    @property
    def is_ivf(self) -> bool:
        return self.nlist > 0

    @property
    def bytes_per_vector(self) -> int:
        return self.code_bytes + (ID_BYTES if self.is_ivf else 0)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "bytes_per_vector": self.bytes_per_vector}


def default_nlist(n: int, per_sqrt_n: float) -> int:
    """per_sqrt_n * sqrt(N) rounded to a power of two, with enough points per centroid.

    sqrt(N) balances the two search costs (scanning nlist centroids vs N/nlist codes per list);
    a small multiple of it keeps lists short, which is what the probed-list scan pays for.
    """
    target = max(1.0, per_sqrt_n * math.sqrt(max(n, 1)))
    nlist = 2 ** round(math.log2(target))
    cap = max(1, n // MIN_POINTS_PER_CENTROID)
    while nlist > cap:
        nlist //= 2
    return max(1, nlist)


def code_size(factory: str, d: int, metric: str = "l2") -> int:
    """Bytes per vector of a factory's codes, read from an empty index of that type."""
    index = faiss.index_factory(d, factory, METRICS[metric])
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return int(ivf.code_size)
    return int(index.sa_code_size())


def _auto_code(n: int, d: int, budget_bytes: float) -> str:
    """The most precise code whose codes + ids for n vectors fit the budget."""
    per_vector = budget_bytes / max(n, 1) - ID_BYTES
    if per_vector >= d:
        return "SQ8"
    for m in PQ_SIZES:
        if m <= per_vector and d % m == 0:
            return f"PQ{m}"
    smallest = min(m for m in PQ_SIZES if d % m == 0) if any(d % m == 0 for m in PQ_SIZES) else d
    need_gb = n * (smallest + ID_BYTES) / 1e9
    raise ValueError(
        f"index.memory_budget_gb={budget_bytes / 1e9:g} is too small for {n:,} vectors of "
        f"d={d}: even PQ{smallest} needs {need_gb:.2f} GB; raise the budget"
    )


def choose_params(n: int, d: int, cfg: dict[str, Any], gpu: bool = False) -> IndexParams:
    """Index parameters for n d-dim unit vectors from the index: config section.

    Every choice is overridable: `factory` replaces everything, `kind`, `nlist` and `code`
    replace one decision each. On GPUs the coarse quantizer stays flat: faiss-gpu only runs
    IVF indexes with a flat quantizer, and a GPU scans even 10^6 centroids quickly.
    """
    metric = str(cfg["metric"])
    if metric not in METRICS:
        raise ValueError(f"index.metric must be one of {sorted(METRICS)}, got {metric!r}")
    if n < 1:
        raise ValueError("cannot index an empty descriptor set")
    if cfg.get("factory"):
        factory = str(cfg["factory"])
        try:
            probe = faiss.index_factory(d, factory, METRICS[metric])
        except RuntimeError as exc:
            raise ValueError(f"index.factory {factory!r} is not a faiss factory string") from exc
        ivf = faiss.try_extract_index_ivf(probe)
        nlist = int(ivf.nlist) if ivf is not None else 0
        train = _train_size(n, nlist, cfg) if not probe.is_trained else 0
        return IndexParams(
            factory, metric, nlist, code_size(factory, d, metric), train, "index.factory"
        )
    kind = str(cfg["kind"])
    if kind not in ("auto", "flat", "ivf"):
        raise ValueError(f"index.kind must be auto, flat or ivf, got {kind!r}")
    if kind == "flat" or (kind == "auto" and n <= int(cfg["flat_max_vectors"])):
        reason = (
            "kind=flat" if kind == "flat" else f"N <= flat_max_vectors={cfg['flat_max_vectors']}"
        )
        return IndexParams("Flat", metric, 0, 4 * d, 0, f"exact search ({reason})")
    nlist = (
        int(cfg["nlist"]) if cfg.get("nlist") else default_nlist(n, float(cfg["nlist_per_sqrt_n"]))
    )
    budget = float(cfg["memory_budget_gb"]) * 1e9
    code = str(cfg["code"]) if cfg.get("code") not in (None, "auto") else _auto_code(n, d, budget)
    quantizer = f"IVF{nlist}"
    if nlist >= int(cfg["hnsw_min_nlist"]) and not gpu:
        quantizer += f"_HNSW{int(cfg['hnsw_m'])}"
    factory = f"{quantizer},{code}"
    try:
        size = code_size(factory, d, metric)
    except RuntimeError as exc:
        raise ValueError(f"index.code {code!r} does not give a valid factory {factory!r}") from exc
    reason = f"nlist={nlist} (~{cfg['nlist_per_sqrt_n']}*sqrt(N)), {code} fits the budget"
    return IndexParams(factory, metric, nlist, size, _train_size(n, nlist, cfg), reason)


def _train_size(n: int, nlist: int, cfg: dict[str, Any]) -> int:
    wanted = max(nlist * int(cfg["train_points_per_centroid"]), PQ_MIN_TRAIN)
    return min(n, wanted)


def sample_ids(n: int, size: int, seed: int) -> np.ndarray:
    """A deterministic sorted random sample of row ids (sorted: sequential shard reads)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=size, replace=False)).astype(np.int64)


def gpu_available() -> bool:
    """True when this faiss build has GPU support and sees a device."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def _to_gpu(index: faiss.Index) -> faiss.Index:
    """A GPU copy of index; the CPU index when this index type has no GPU implementation."""
    options = faiss.GpuMultipleClonerOptions()
    options.useFloat16 = True
    try:
        return faiss.index_cpu_to_all_gpus(index, co=options)
    except RuntimeError:
        return index


def new_index(params: IndexParams, d: int) -> faiss.Index:
    return faiss.index_factory(d, params.factory, METRICS[params.metric])


def train(index: faiss.Index, sample: np.ndarray, use_gpu: bool = False) -> faiss.Index:
    """Fit the coarse quantizer and codes; k-means runs on the GPUs when use_gpu."""
    sample = np.ascontiguousarray(sample, dtype=np.float32)
    ivf = faiss.try_extract_index_ivf(index)
    if use_gpu and ivf is not None:
        ivf.clustering_index = faiss.index_cpu_to_all_gpus(
            faiss.IndexFlat(index.d, ivf.metric_type)
        )
    index.train(sample)
    if ivf is not None:
        ivf.clustering_index = None
    return index


def add_slice(
    trained: faiss.Index, vectors: np.ndarray, first_id: int, use_gpu: bool = False
) -> faiss.Index:
    """trained (empty) + the rows first_id .. first_id + len(vectors) - 1."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if faiss.try_extract_index_ivf(trained) is None:
        trained.add(vectors)
        return trained
    ids = np.arange(first_id, first_id + len(vectors), dtype=np.int64)
    target = _to_gpu(trained) if use_gpu else trained
    target.add_with_ids(vectors, ids)
    return faiss.index_gpu_to_cpu(target) if target is not trained else trained


def write_index(index: faiss.Index, path: str) -> None:
    """Write atomically: a reader sees the old file, or the whole new one."""
    tmp = f"{path}.{uuid.uuid4().hex}.part"
    faiss.write_index(index, tmp)
    os.replace(tmp, path)


def read_index(path: str, flags: int = 0) -> faiss.Index:
    """Read a faiss file; a clear error naming it when it is missing or corrupt."""
    if not os.path.exists(path):
        raise IndexFileError(f"{path}: index file missing")
    try:
        return faiss.read_index(path, flags)
    except RuntimeError as exc:
        detail = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise IndexFileError(f"{path}: not a readable faiss index ({detail})") from exc


def merge_shards(trained_path: str, shard_paths: list[str], out_dir: str) -> dict[str, Any]:
    """Combine shard indexes (consecutive id ranges, in order) into out_dir/index.faiss.

    IVF: the inverted lists of all shards are merged into one on-disk file (index.ivfdata)
    without loading the shards into memory. Flat: concatenated in memory (flat is only chosen
    for small N). Returns the file sizes for index.json.
    """
    index = read_index(trained_path)
    index_path = os.path.join(out_dir, INDEX_FILE)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        for path in shard_paths:
            index.merge_from(read_index(path))
        write_index(index, index_path)
        return {"ntotal": int(index.ntotal), "index_bytes": os.path.getsize(index_path)}
    shards = []
    lists = faiss.InvertedListsPtrVector()
    for path in shard_paths:
        shard = read_index(path, faiss.IO_FLAG_MMAP)
        shard_ivf = faiss.extract_index_ivf(shard)
        if shard_ivf.nlist != ivf.nlist or shard_ivf.code_size != ivf.code_size:
            raise IndexFileError(f"{path}: shard does not match the trained index")
        shards.append(shard)  # keeps the mapped lists alive until the merge is done
        lists.push_back(shard_ivf.invlists)
    ivfdata_path = os.path.join(out_dir, IVFDATA_FILE)
    ondisk = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, ivfdata_path)
    ntotal = ondisk.merge_from_multiple(lists.data(), lists.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(ondisk, True)
    ondisk.this.disown()
    write_index(index, index_path)
    return {
        "ntotal": int(ntotal),
        "index_bytes": os.path.getsize(index_path) + os.path.getsize(ivfdata_path),
        "ivfdata_bytes": os.path.getsize(ivfdata_path),
        "ivfdata_path": os.path.abspath(ivfdata_path),
    }


def load_for_search(
    index_dir: str, meta: dict[str, Any], nprobe: int, use_gpu: bool = False
) -> faiss.Index:
    """Open the merged index (inverted lists memory-mapped) ready to search."""
    path = os.path.join(index_dir, INDEX_FILE)
    files = meta.get("files", {})
    if files.get("ivfdata_bytes") is not None:
        data_path = os.path.join(index_dir, IVFDATA_FILE)
        size = os.path.getsize(data_path) if os.path.exists(data_path) else -1
        if size != files["ivfdata_bytes"]:
            raise IndexFileError(
                f"{data_path}: {size} bytes, index.json says {files['ivfdata_bytes']}; "
                "the file is truncated or from another index"
            )
    # The data file's path is recorded inside index.faiss; when the folder was moved or copied
    # (remote indexes are cached locally), faiss must look next to index.faiss instead.
    moved = files.get("ivfdata_path") != os.path.abspath(os.path.join(index_dir, IVFDATA_FILE))
    index = read_index(path, faiss.IO_FLAG_ONDISK_SAME_DIR if moved else 0)
    if index.ntotal != meta["counts"]["vectors"] or index.d != meta["d"]:
        raise IndexFileError(
            f"{path}: holds {index.ntotal} vectors of d={index.d}, index.json says "
            f"{meta['counts']['vectors']} of d={meta['d']}"
        )
    set_nprobe(index, nprobe)
    return _to_gpu(index) if use_gpu else index


def set_nprobe(index: faiss.Index, nprobe: int) -> None:
    """Lists probed per query; an HNSW coarse quantizer gets a matching efSearch."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is None:
        return
    ivf.nprobe = min(int(nprobe), int(ivf.nlist))
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        quantizer.hnsw.efSearch = max(2 * ivf.nprobe, 64)


def search(index: faiss.Index, queries: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k nearest stored vectors per query (-1 where fewer exist)."""
    k = min(int(k), int(index.ntotal))
    if k < 1 or len(queries) == 0:
        return np.full((len(queries), max(k, 0)), -1, dtype=np.int64)
    _, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    return ids.astype(np.int64, copy=False)


def vectors_name(shard: str) -> str:
    return f"vectors/{shard}.npy"


def idmap_name(shard: str) -> str:
    return f"idmap/{shard}.parquet"


def read_meta(index_url: str, options: StorageOptions | None = None) -> dict[str, Any]:
    """index.json of a built index folder; a clear error when the folder is not one."""
    url = join(index_url, INDEX_JSON)
    if not exists(url, options):
        raise IndexFileError(f"{index_url}: no {INDEX_JSON}; not an rdcd index folder")
    try:
        return read_json(url, options)
    except (ValueError, OSError) as exc:
        raise IndexFileError(f"{url}: unreadable ({exc})") from exc


def local_files(
    index_url: str, meta: dict[str, Any], options: StorageOptions | None = None
) -> dict[str, Any]:
    """Local paths of the files searchers open (a remote folder is cached on local disk)."""
    files: dict[str, Any] = {
        "vectors": [
            local_copy(join(index_url, vectors_name(s["name"])), options) for s in meta["shards"]
        ]
    }
    if meta["files"].get("index"):
        files["index"] = local_copy(join(index_url, INDEX_FILE), options)
        if meta["files"].get("ivfdata_bytes") is not None:
            files["ivfdata"] = local_copy(join(index_url, IVFDATA_FILE), options)
    return files


def open_vector_store(paths: list[str], meta: dict[str, Any]) -> VectorStore:
    """The exact fp16 descriptors of an index folder, memory-mapped."""
    shards = meta["shards"]
    return VectorStore.open(
        paths, [s["start"] for s in shards], [s["count"] for s in shards], meta["d"]
    )


def open_searcher(
    index_path: str, meta: dict[str, Any], nprobe: int, use_gpu: bool = False
) -> faiss.Index:
    """The merged index of a folder, inverted lists memory-mapped, nprobe set."""
    if not meta["files"].get("index"):
        raise IndexFileError(f"{os.path.dirname(index_path)}: holds vectors only, no index")
    return load_for_search(os.path.dirname(index_path), meta, nprobe, use_gpu and gpu_available())
