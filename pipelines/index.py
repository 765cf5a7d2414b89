"""`rdcd index DESCRIPTORS OUT`: a sharded faiss index, an id map and the exact fp16 vectors.

    list descriptor files (sorted) -> ids = dense row numbers in that order
    prepare shards (Ray tasks): vectors/<shard>.npy, idmap/<shard>.parquet, training sample
    train once (one task, GPU when present) -> trained.faiss
    add shards (Ray tasks) -> shards/<shard>.faiss
    merge (one task) -> index.faiss + index.ivfdata (inverted lists, memory-mapped by searchers)
    index.json, then manifest.json

Every file is published atomically and a re-run skips the ones that exist, so a killed build
resumes; a complete index built from the same files and settings is not rebuilt at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import stage
from pipelines.jobs import JobError, module_main
from rdcd import index as ix
from rdcd import storage as st
from rdcd.runtime import init_ray
from rdcd.tables import descriptor_dim, descriptor_matrix
from rdcd.vectors import local_copy, open_vectors, save_vectors

COMMAND = "index"
HELP = (
    "Build a faiss index from a descriptors table: parameters from N, d and a memory budget, "
    "trained once, filled in parallel shards, plus an id map and the exact fp16 vectors."
)
# Settings that change what is built (worker sizing and GPU use do not).
BUILD_KEYS = (
    "factory",
    "kind",
    "flat_max_vectors",
    "metric",
    "nlist",
    "nlist_per_sqrt_n",
    "code",
    "memory_budget_gb",
    "hnsw_min_nlist",
    "hnsw_m",
    "train_points_per_centroid",
    "seed",
    "shard_vectors",
)
ADD_CHUNK = 65536  # rows per faiss add call: bounds the float32 copy of the fp16 rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("descriptors", help="descriptors folder (or an embed/dedup output)")
    parser.add_argument("output", help="index folder to write (local path or s3://...)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if current")


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    init_ray(config["ray"], args.address)
    summary = run_index(args.descriptors, args.output, config, overwrite=args.overwrite)
    meta = summary.pop("meta")
    return {
        "descriptors": summary["descriptors"],
        "index": args.output,
        "vectors": meta["counts"]["vectors"],
        "factory": meta["factory"] or "(vectors only)",
        "index bytes / vector": summary["bytes_per_vector"],
        "shards": meta["counts"]["shards"],
        "built / skipped": "skipped (current)" if summary["skipped"] else "built",
    }


@dataclass
class DescriptorFile:
    url: str
    rows: int
    size: int
    offset: int = 0


@dataclass
class Shard:
    name: str
    start: int
    count: int
    first_file: int
    files: list[DescriptorFile] = field(default_factory=list)


def find_descriptors(url: str, options: st.StorageOptions) -> str | None:
    """The descriptors folder that url is or holds (url/descriptors first), else None.

    Looks one level deep only, so telling an image prefix from a table never lists the images.
    """
    fs = st.get_filesystem(url, options)
    for candidate in (st.join(url, "descriptors"), url):
        root = st.strip_protocol(candidate)
        if fs.isfile(root):
            files = [root] if root.endswith(".parquet") else []
        else:
            files = sorted(fs.glob(f"{root.rstrip('/')}/*.parquet"))
        files = [f for f in files if not os.path.basename(f).startswith(("_", "."))]
        if not files:
            continue
        protocol = st.protocol_of(candidate)
        first = files[0] if protocol == "file" else f"{protocol}://{files[0]}"
        if "descriptor" in _read_schema(first, options).names:
            return candidate
    return None


def list_parquet(url: str, options: st.StorageOptions) -> list[tuple[str, int]]:
    """(url, bytes) of every .parquet file under url, sorted; _/.-prefixed names skipped."""
    fs = st.get_filesystem(url, options)
    root = st.strip_protocol(url)
    if not fs.exists(root):
        return []
    if fs.isfile(root):
        found = {root: fs.info(root)}
    else:
        found = fs.find(root, detail=True)
    protocol = st.protocol_of(url)
    files = []
    for path, info in sorted(found.items()):
        relative = os.path.relpath(path, root) if path != root else os.path.basename(path)
        if not path.endswith(".parquet") or any(p[:1] in "._" for p in relative.split("/")):
            continue
        full = path if protocol == "file" else f"{protocol}://{path}"
        files.append((full, int(info.get("size") or 0)))
    return files


def _read_schema(url: str, options: st.StorageOptions) -> pa.Schema:
    try:
        return pq.read_schema(
            st.strip_protocol(url), filesystem=st.get_pyarrow_filesystem(url, options)
        )
    except (pa.ArrowException, OSError) as exc:
        raise JobError(f"{url}: not a readable Parquet file ({exc})") from exc


def read_parquet(
    url: str, columns: list[str] | None, options: st.StorageOptions, kind: str = "descriptors"
) -> pa.Table:
    """Columns of one Parquet file; a clear error naming a corrupt or foreign file."""
    try:
        return pq.read_table(
            st.strip_protocol(url),
            columns=columns,
            filesystem=st.get_pyarrow_filesystem(url, options),
        )
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{url}: not a readable {kind} Parquet file ({exc})") from exc


def describe_files(url: str, options: st.StorageOptions) -> tuple[list[DescriptorFile], int]:
    """Every descriptors file under url with its row count (from the footer), and d."""
    listing = list_parquet(url, options)
    if not listing:
        raise JobError(f"{url}: no .parquet descriptor files found")

    def footer(item: tuple[str, int]) -> tuple[DescriptorFile, int]:
        file_url, size = item
        try:
            meta = pq.read_metadata(
                st.strip_protocol(file_url), filesystem=st.get_pyarrow_filesystem(file_url, options)
            )
            dim = descriptor_dim(meta.schema.to_arrow_schema())
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise JobError(f"{file_url}: not a readable descriptors Parquet file ({exc})") from exc
        return DescriptorFile(file_url, meta.num_rows, size), dim

    with ThreadPoolExecutor(max_workers=16) as pool:
        described = list(pool.map(footer, listing))
    dims = {dim for _, dim in described}
    if len(dims) != 1:
        raise JobError(f"{url}: descriptor files of different dimensions {sorted(dims)}")
    files = [f for f, _ in described if f.rows > 0]
    offset = 0
    for f in files:
        f.offset = offset
        offset += f.rows
    if offset == 0:
        raise JobError(f"{url}: the descriptor files hold no rows")
    return files, dims.pop()


def plan_shards(files: list[DescriptorFile], shard_vectors: int) -> list[Shard]:
    """Consecutive files grouped into shards of about shard_vectors rows (files are not split)."""
    shards: list[Shard] = []
    for i, f in enumerate(files):
        if not shards or (shards[-1].count and shards[-1].count + f.rows > shard_vectors):
            shards.append(Shard(f"shard-{len(shards):05d}", f.offset, 0, i))
        shards[-1].files.append(f)
        shards[-1].count += f.rows
    return shards


def first_model_id(files: list[DescriptorFile], options: st.StorageOptions) -> str:
    table = read_parquet(files[0].url, ["model_id"], options)
    return str(table["model_id"][0].as_py())


def use_gpu(cfg: dict[str, Any]) -> bool:
    """faiss-gpu for train/add/search: 'on', or 'auto' when the Ray cluster has GPUs."""
    setting = str(cfg["gpu"])
    if setting not in ("auto", "on", "off"):
        raise ValueError(f"index.gpu must be auto, on or off, got {setting!r}")
    return setting == "on" or (setting == "auto" and ray.cluster_resources().get("GPU", 0) > 0)


@ray.remote
def prepare_shard(
    out_url: str, shard: dict, dim: int, model_id: str, sample: np.ndarray, options
) -> dict[str, Any]:
    """Read one shard's descriptor files; write its fp16 vectors, id map and training rows."""
    name = shard["name"]
    targets = [
        st.join(out_url, ix.vectors_name(name)),
        st.join(out_url, ix.idmap_name(name)),
        st.join(out_url, "_train", f"{name}.npy"),
    ]
    if stage.exists_all(targets, options):
        return {"name": name, "skipped": True, "peak_rss_mb": stage.peak_rss_mb()}
    ids, vectors = [], []
    for f in shard["files"]:
        table = read_parquet(f["url"], ["image_id", "descriptor", "model_id"], options)
        _check_file(f, table, dim, model_id)
        ids.append(table["image_id"])
        vectors.append(descriptor_matrix(table["descriptor"], np.float16))
    matrix = np.concatenate(vectors)
    image_ids = pa.chunked_array([c for col in ids for c in col.chunks], pa.string())
    idmap = pa.table(
        {
            "id": pa.array(np.arange(shard["start"], shard["start"] + shard["count"])),
            "image_id": image_ids,
        }
    )
    with stage.scratch_dir(near=out_url) as tmp:
        save_vectors(matrix, os.path.join(tmp, "v.npy"))
        pq.write_table(idmap, os.path.join(tmp, "m.parquet"))
        save_vectors(matrix[sample - shard["start"]], os.path.join(tmp, "t.npy"))
        for local, target in zip(("v.npy", "m.parquet", "t.npy"), targets, strict=True):
            stage.publish_file(os.path.join(tmp, local), target, options)
    return {"name": name, "skipped": False, "peak_rss_mb": stage.peak_rss_mb()}


def _check_file(f: dict, table: pa.Table, dim: int, model_id: str) -> None:
    url = f["url"]
    if table.num_rows != f["rows"]:
        raise ValueError(f"{url}: {table.num_rows} rows, its footer said {f['rows']}; changed?")
    if descriptor_dim(table.schema) != dim:
        raise ValueError(f"{url}: descriptors of d={descriptor_dim(table.schema)}, expected {dim}")
    if table["image_id"].null_count:
        raise ValueError(f"{url}: {table['image_id'].null_count} rows without image_id")
    models = pc.unique(table["model_id"]).to_pylist()
    if models != [model_id]:
        raise ValueError(
            f"{url}: model_id {models} differs from {model_id!r}; descriptors of different "
            "models are not comparable; index them separately"
        )


@ray.remote
def train_shard_sample(out_url: str, names: list[str], params: dict, dim: int, gpu: bool, options):
    """Fit the empty index once on the concatenated training rows."""
    target = st.join(out_url, ix.TRAINED_FILE)
    if st.exists(target, options):
        return {"skipped": True, "peak_rss_mb": stage.peak_rss_mb()}
    parts = [
        np.load(local_copy(st.join(out_url, "_train", f"{name}.npy"), options)) for name in names
    ]
    sample = np.concatenate(parts).astype(np.float32)
    index = ix.new_index(ix.IndexParams(**params), dim)
    started = time.perf_counter()
    ix.train(index, sample, gpu and ix.gpu_available())
    with stage.scratch_dir(near=out_url) as tmp:
        ix.write_index(index, os.path.join(tmp, ix.TRAINED_FILE))
        stage.publish_file(os.path.join(tmp, ix.TRAINED_FILE), target, options)
    return {
        "skipped": False,
        "train_s": round(time.perf_counter() - started, 2),
        "peak_rss_mb": stage.peak_rss_mb(),
    }


@ray.remote
def add_shard(out_url: str, shard: dict, dim: int, gpu: bool, options) -> dict[str, Any]:
    """trained.faiss + this shard's vectors -> shards/<shard>.faiss."""
    name = shard["name"]
    target = st.join(out_url, "shards", f"{name}.faiss")
    if st.exists(target, options):
        return {"name": name, "skipped": True, "peak_rss_mb": stage.peak_rss_mb()}
    index = ix.read_index(local_copy(st.join(out_url, ix.TRAINED_FILE), options))
    vectors = open_vectors(
        local_copy(st.join(out_url, ix.vectors_name(name)), options), shard["count"], dim
    )
    on_gpu = gpu and ix.gpu_available()
    for lo in range(0, shard["count"], ADD_CHUNK):
        chunk = vectors[lo : lo + ADD_CHUNK]
        index = ix.add_slice(index, chunk, shard["start"] + lo, on_gpu)
    with stage.scratch_dir(near=out_url) as tmp:
        ix.write_index(index, os.path.join(tmp, f"{name}.faiss"))
        stage.publish_file(os.path.join(tmp, f"{name}.faiss"), target, options)
    return {"name": name, "skipped": False, "peak_rss_mb": stage.peak_rss_mb()}


@ray.remote
def merge_index(out_url: str, names: list[str], options) -> dict[str, Any]:
    """All shard indexes -> index.faiss (+ index.ivfdata); the data file is published first."""
    trained = local_copy(st.join(out_url, ix.TRAINED_FILE), options)
    shards = [local_copy(st.join(out_url, "shards", f"{n}.faiss"), options) for n in names]
    if st.protocol_of(out_url) == "file":
        # In place: the data file's path recorded in index.faiss is then its real one.
        files = ix.merge_shards(trained, shards, st.strip_protocol(out_url))
        return {**files, "peak_rss_mb": stage.peak_rss_mb()}
    with stage.scratch_dir() as tmp:
        files = ix.merge_shards(trained, shards, tmp)
        for name in (ix.IVFDATA_FILE, ix.INDEX_FILE):
            if os.path.exists(os.path.join(tmp, name)):
                stage.publish_file(os.path.join(tmp, name), st.join(out_url, name), options)
    return {**files, "peak_rss_mb": stage.peak_rss_mb()}


def run_index(
    descriptors_url: str,
    out_url: str,
    config: dict[str, Any],
    *,
    overwrite: bool = False,
    vectors_only: bool = False,
) -> dict[str, Any]:
    """Build (or resume, or skip) the index folder out_url; returns a summary with 'meta'.

    vectors_only writes just the vector store and id map: what search needs for queries.
    """
    init_ray(config["ray"])
    options = st.StorageOptions.from_config(config["storage"])
    cfg = config["index"]
    started = time.perf_counter()
    found = find_descriptors(descriptors_url, options)
    if found is None:
        raise JobError(
            f"{descriptors_url}: no descriptors table (Parquet with a descriptor column)"
        )
    files, dim = describe_files(found, options)
    n = sum(f.rows for f in files)
    build = {k: cfg[k] for k in BUILD_KEYS}
    gpu = use_gpu(cfg) and not vectors_only  # changes the coarse quantizer: part of the build
    print_ = stage.fingerprint(
        [(f.url, f.rows, f.size) for f in files], build, vectors_only, gpu, ix.INDEX_JSON
    )
    current = None if overwrite else stage.current_manifest(out_url, print_, options)
    if current is not None:
        meta = ix.read_meta(out_url, options)
        return _summary(found, meta, skipped=True)
    if overwrite:
        fs = st.get_filesystem(out_url, options)
        if fs.exists(st.strip_protocol(out_url)):
            fs.rm(st.strip_protocol(out_url), recursive=True)
    stage.reset_if_stale(out_url, print_, options)

    try:
        params = ix.choose_params(n, dim, cfg, gpu) if not vectors_only else None
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    model_id = first_model_id(files, options)
    shards = plan_shards(files, int(cfg["shard_vectors"]))
    sample = ix.sample_ids(n, params.train_size if params else 0, int(cfg["seed"]))
    cpus = float(cfg["task_cpus"])
    timings: dict[str, float] = {}
    workers: list[dict[str, Any]] = []

    t0 = time.perf_counter()
    refs = []
    for shard in shards:
        lo, hi = np.searchsorted(sample, [shard.start, shard.start + shard.count])
        refs.append(
            prepare_shard.options(num_cpus=cpus).remote(
                out_url, asdict(shard), dim, model_id, sample[lo:hi], options
            )
        )
    workers += stage.wait_for(refs, "index: vectors", "shard")
    timings["prepare_s"] = time.perf_counter() - t0

    files_info: dict[str, Any] = {}
    if params is not None:
        t0 = time.perf_counter()
        train_cpus = cfg["train_cpus"] or max(1, int(ray.cluster_resources().get("CPU", 1)))
        trained = train_shard_sample.options(num_cpus=train_cpus, num_gpus=1 if gpu else 0).remote(
            out_url, [s.name for s in shards], asdict(params), dim, gpu, options
        )
        workers += stage.wait_for([trained], "index: train", "index")
        timings["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        refs = [
            add_shard.options(num_cpus=cpus, num_gpus=1 if gpu else 0).remote(
                out_url, asdict(s), dim, gpu, options
            )
            for s in shards
        ]
        workers += stage.wait_for(refs, "index: add", "shard")
        timings["add_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        merged = merge_index.options(num_cpus=cpus).remote(
            out_url, [s.name for s in shards], options
        )
        files_info = stage.wait_for([merged], "index: merge", "index")[0]
        workers.append(files_info)
        timings["merge_s"] = time.perf_counter() - t0

    meta = {
        "format": "rdcd-index/1",
        "factory": params.factory if params else None,
        "d": dim,
        "metric": params.metric if params else None,
        "nlist": params.nlist if params else 0,
        "model_id": model_id,
        "params": params.to_dict() if params else None,
        "counts": {
            "vectors": n,
            "shards": len(shards),
            "train": int(len(sample)),
            "descriptor_files": len(files),
        },
        "files": {
            "index": ix.INDEX_FILE if params else None,
            "index_bytes": files_info.get("index_bytes"),
            "ivfdata_bytes": files_info.get("ivfdata_bytes"),
            "ivfdata_path": files_info.get("ivfdata_path"),
        },
        "shards": [
            {
                "name": s.name,
                "start": s.start,
                "count": s.count,
                "first_file": s.first_file,
                "file_count": len(s.files),
            }
            for s in shards
        ],
        "descriptors": {"url": found, "files": [asdict(f) for f in files]},
        "gpu": gpu,
    }
    st.write_json_atomic(st.join(out_url, ix.INDEX_JSON), meta, options)
    if not cfg["keep_shards"]:
        fs = st.get_filesystem(out_url, options)
        for scratch in ("shards", "_train"):
            path = st.strip_protocol(st.join(out_url, scratch))
            if fs.exists(path):
                fs.rm(path, recursive=True)
    timings["total_s"] = time.perf_counter() - started
    st.write_manifest(
        out_url,
        {
            "status": "complete",
            "job": COMMAND,
            "fingerprint": print_,
            "model_id": model_id,
            "counts": meta["counts"],
            "factory": meta["factory"],
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "peak_rss_mb": {
                "driver": stage.peak_rss_mb(),
                "worker_max": max((w.get("peak_rss_mb", 0) for w in workers), default=0),
            },
            "config": {"index": cfg},
        },
        options,
    )
    return _summary(found, meta, skipped=False, timings=timings)


def _summary(
    found: str, meta: dict[str, Any], skipped: bool, timings: dict[str, float] | None = None
) -> dict[str, Any]:
    index_bytes = meta["files"].get("index_bytes")
    per_vector = round(index_bytes / meta["counts"]["vectors"], 1) if index_bytes else 0
    return {
        "descriptors": found,
        "meta": meta,
        "skipped": skipped,
        "bytes_per_vector": per_vector,
        "timings": timings or {},
    }


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
