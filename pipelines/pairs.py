"""The all-pairs stage: an index folder -> pairs/ (and near_misses/ for the report).

    [score normalisation]  background offsets per image (tasks over query chunks)
    kNN                    per query chunk: k+1 nearest from the index (nprobe), exact cosine of
                           every candidate from the fp16 vectors, threshold  (tasks)
    exact duplicates       equal content_hash, hash-partitioned map/reduce, no index involved
    assemble               one task: dedupe, ids -> image_ids, image_id_a < image_id_b, Parquet

Work per task is one query chunk against the memory-mapped index, so memory is bounded by the
chunk, and total work grows like N * nprobe * (list length), not N^2. Chunk results are files,
so a killed stage resumes where it stopped.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipelines import stage
from pipelines.index import read_parquet, run_index, use_gpu
from rdcd import index as ix
from rdcd import match
from rdcd import storage as st
from rdcd.tables import ordered_pairs
from rdcd.vectors import VectorStore, local_copy, save_vectors

WORK_DIR = "_work"
PART_ROWS = 1_000_000  # rows per output Parquet file
# Per worker process: opened vector stores and indexes, reused by the tasks the process runs
# as long as the files are unchanged (a rebuilt index is reopened, never read through a stale map).
_OPEN: dict[tuple, tuple[tuple, Any]] = {}


@dataclass(frozen=True)
class MatchSettings:
    """The match: section, resolved."""

    k: int
    nprobe: int
    threshold: float
    query_rows: int
    batch_rows: int
    near_miss_margin: float
    near_miss_max: int
    exact_duplicates: bool
    task_cpus: float
    score_norm: match.ScoreNorm | None

    @classmethod
    def from_config(cls, cfg: dict[str, Any], threshold: float, background: bool) -> MatchSettings:
        for key in ("k", "nprobe", "query_rows", "batch_rows"):
            if int(cfg[key]) < 1:
                raise ValueError(f"match.{key} must be >= 1, got {cfg[key]}")
        norm = None
        if background:
            norm = match.ScoreNorm(float(cfg["sn_beta"]), int(cfg["sn_first"]), int(cfg["sn_last"]))
        return cls(
            k=int(cfg["k"]),
            nprobe=int(cfg["nprobe"]),
            threshold=float(threshold),
            query_rows=int(cfg["query_rows"]),
            batch_rows=int(cfg["batch_rows"]),
            near_miss_margin=float(cfg["near_miss_margin"]),
            near_miss_max=int(cfg["near_miss_max"]),
            exact_duplicates=bool(cfg["exact_duplicates"]),
            task_cpus=float(cfg["task_cpus"]),
            score_norm=norm,
        )


def _stamp(paths: list[str]) -> tuple:
    return tuple((p, os.path.getsize(p), os.stat(p).st_mtime_ns) for p in paths)


def _cached(key: tuple, paths: list[str], opener):
    stamp = _stamp(paths)
    if key not in _OPEN or _OPEN[key][0] != stamp:
        _OPEN[key] = (stamp, opener())
    return _OPEN[key][1]


def opened_store(index_url: str, options) -> tuple[dict[str, Any], VectorStore]:
    """index.json and the vector store of an index folder."""
    meta = ix.read_meta(index_url, options)
    paths = ix.local_files(index_url, meta, options)["vectors"]
    store = _cached(("store", index_url), paths, lambda: ix.open_vector_store(paths, meta))
    return meta, store


def opened_searcher(index_url: str, nprobe: int, gpu: bool, options):
    """The merged index of a folder, ready to search."""
    meta = ix.read_meta(index_url, options)
    files = ix.local_files(index_url, meta, options)
    if "index" not in files:
        raise ix.IndexFileError(f"{index_url}: holds vectors only, no index to search")
    paths = [files["index"], *([files["ivfdata"]] if "ivfdata" in files else [])]
    key = ("index", index_url, nprobe, gpu)
    return _cached(key, paths, lambda: ix.open_searcher(files["index"], meta, nprobe, gpu))


def query_chunks(meta: dict[str, Any], query_rows: int) -> list[tuple[int, int]]:
    """[lo, hi) id ranges of at most query_rows, never crossing a shard (one file per read)."""
    chunks = []
    for shard in meta["shards"]:
        end = shard["start"] + shard["count"]
        chunks += [(lo, min(lo + query_rows, end)) for lo in range(shard["start"], end, query_rows)]
    return chunks


def chunk_name(lo: int) -> str:
    return f"{lo:012d}"


@ray.remote
def background_offsets(
    query_url: str,
    background_url: str,
    lo: int,
    hi: int,
    settings: MatchSettings,
    gpu: bool,
    target: str,
    options,
) -> dict[str, Any]:
    """beta * mean similarity of each query row to its nearest background images."""
    if st.exists(target, options):
        return {"skipped": True, "peak_rss_mb": stage.peak_rss_mb()}
    _, store = opened_store(query_url, options)
    _, background = opened_store(background_url, options)
    searcher = opened_searcher(background_url, settings.nprobe, gpu, options)
    norm = settings.score_norm
    out = np.empty(hi - lo, dtype=np.float32)
    for b in range(lo, hi, settings.batch_rows):
        e = min(b + settings.batch_rows, hi)
        queries = store.rows(b, e)
        candidates = ix.search(searcher, queries, max(norm.k, settings.k))
        out[b - lo : e - lo] = norm.offsets(match.exact_scores(queries, candidates, background))
    with stage.scratch_dir() as tmp:
        save_vectors(out[:, None], os.path.join(tmp, "o.npy"), np.float32)
        stage.publish_file(os.path.join(tmp, "o.npy"), target, options)
    return {"skipped": False, "peak_rss_mb": stage.peak_rss_mb()}


def compute_offsets(
    query_url: str,
    background_url: str,
    work_url: str,
    settings: MatchSettings,
    gpu: bool,
    options,
) -> list[str]:
    """Run background_offsets over every query chunk; returns the per-chunk file URLs."""
    meta = ix.read_meta(query_url, options)
    chunks = query_chunks(meta, settings.query_rows)
    targets = [st.join(work_url, f"sn-{chunk_name(lo)}.npy") for lo, _ in chunks]
    refs = [
        background_offsets.options(num_cpus=settings.task_cpus, num_gpus=1 if gpu else 0).remote(
            query_url, background_url, lo, hi, settings, gpu, target, options
        )
        for (lo, hi), target in zip(chunks, targets, strict=True)
    ]
    stage.wait_for(refs, "score normalisation", "chunk")
    return targets


def open_offsets(urls: list[str], chunks: list[tuple[int, int]], options) -> VectorStore:
    paths = [local_copy(url, options) for url in urls]
    return VectorStore.open(
        paths, [lo for lo, _ in chunks], [hi - lo for lo, hi in chunks], 1, np.float32
    )


@ray.remote
def knn_chunk(
    index_url: str,
    lo: int,
    hi: int,
    settings: MatchSettings,
    offset_urls: list[str] | None,
    gpu: bool,
    target: str,
    options,
) -> dict[str, Any]:
    """Pairs above the threshold (and near misses) found from query rows [lo, hi)."""
    if st.exists(target, options):
        return {"skipped": True, "peak_rss_mb": stage.peak_rss_mb()}
    meta, store = opened_store(index_url, options)
    searcher = opened_searcher(index_url, settings.nprobe, gpu, options)
    offsets = None
    if offset_urls is not None:
        offsets = open_offsets(offset_urls, query_chunks(meta, settings.query_rows), options)
    found: dict[str, list[np.ndarray]] = {k: [] for k in ("a", "b", "s", "na", "nb", "ns")}
    candidates_seen = 0
    for b in range(lo, hi, settings.batch_rows):
        e = min(b + settings.batch_rows, hi)
        queries = store.rows(b, e)
        candidates = ix.search(searcher, queries, settings.k + 1)
        scores = match.exact_scores(queries, candidates, store)
        candidates_seen += int((candidates >= 0).sum())
        if offsets is not None:
            valid = candidates >= 0
            mine = offsets.rows(b, e)[:, 0]
            theirs = np.zeros(candidates.shape, dtype=np.float32)
            theirs[valid] = offsets.gather(candidates[valid])[:, 0]
            scores = scores - 0.5 * (mine[:, None] + theirs)
        query_ids = np.arange(b, e, dtype=np.int64)
        keep = scores >= settings.threshold
        near = ~keep & (scores >= settings.threshold - settings.near_miss_margin)
        for prefix, mask in (("", keep), ("n", near)):
            pa_, pb, ps = match.canonical_pairs(query_ids, candidates, scores, mask)
            found[prefix + "a"].append(pa_)
            found[prefix + "b"].append(pb)
            found[prefix + "s"].append(ps)
    arrays = {k: np.concatenate(v) if v else np.zeros(0) for k, v in found.items()}
    chunks = max(1, len(query_chunks(meta, settings.query_rows)))
    cap = max(1, math.ceil(settings.near_miss_max / chunks))
    if len(arrays["ns"]) > cap:  # keep the near misses closest to the threshold
        best = np.argsort(-arrays["ns"], kind="stable")[:cap]
        for key in ("na", "nb", "ns"):
            arrays[key] = arrays[key][best]
    with stage.scratch_dir() as tmp:
        path = os.path.join(tmp, "c.npz")
        np.savez(path, **arrays)
        stage.publish_file(path, target, options)
    return {
        "skipped": False,
        "candidates": candidates_seen,
        "peak_rss_mb": stage.peak_rss_mb(),
    }


@ray.remote
def exact_map(files: list[dict[str, Any]], buckets: int, options) -> tuple:
    """(hash keys, ids) of these files' rows, split into hash buckets (the shuffle's map)."""
    keys, ids = [], []
    for f in files:
        table = read_parquet(f["url"], ["content_hash"], options)
        column = table["content_hash"]
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        rows = f["offset"] + np.flatnonzero(valid)
        keys.append(match.hash_keys(pc.drop_null(column)))
        ids.append(rows.astype(np.int64))
    key = np.concatenate(keys) if keys else np.zeros((0, 2), dtype=np.uint64)
    idx = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    bucket = key[:, 0] % np.uint64(buckets)
    return tuple((key[bucket == p], idx[bucket == p]) for p in range(buckets))


@ray.remote
def exact_reduce(index_url: str, offset_urls: list[str] | None, settings, options, *parts):
    """Exact-duplicate pairs of one hash bucket, exactly re-scored (the shuffle's reduce)."""
    keys = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    a, b = match.exact_duplicate_pairs(keys, ids)
    a, b = np.minimum(a, b), np.maximum(a, b)
    meta, store = opened_store(index_url, options)
    scores = np.einsum("ij,ij->i", store.gather(a), store.gather(b)).astype(np.float32)
    if offset_urls is not None:
        offsets = open_offsets(offset_urls, query_chunks(meta, settings.query_rows), options)
        scores -= 0.5 * (offsets.gather(a)[:, 0] + offsets.gather(b)[:, 0])
    return a, b, scores


def read_npz(url: str, options) -> dict[str, np.ndarray]:
    """A task's result file, read into memory (no local cache copy of scratch files)."""
    with st.get_filesystem(url, options).open(st.strip_protocol(url), "rb") as handle:
        with np.load(io.BytesIO(handle.read())) as data:
            return {key: data[key] for key in data.files}


def image_ids_of(index_url: str, meta: dict[str, Any], ids: np.ndarray, options) -> pa.Array:
    """image_id of each dense id, reading one shard's id map at a time."""
    out = np.empty(len(ids), dtype=object)
    for shard in meta["shards"]:
        lo, hi = shard["start"], shard["start"] + shard["count"]
        mask = (ids >= lo) & (ids < hi)
        if not mask.any():
            continue
        url = st.join(index_url, ix.idmap_name(shard["name"]))
        table = read_parquet(url, ["image_id"], options, kind="id map")
        if table.num_rows != shard["count"]:
            raise ValueError(f"{url}: {table.num_rows} ids, index.json says {shard['count']}")
        out[mask] = table["image_id"].to_numpy(zero_copy_only=False)[ids[mask] - lo]
    return pa.array(out, pa.string())


def pairs_table(
    index_url: str, meta: dict[str, Any], a, b, score, exact, run_id: str, options
) -> pa.Table:
    """Dense-id pairs -> PAIRS_SCHEMA rows with image_id_a < image_id_b, sorted."""
    ids = image_ids_of(index_url, meta, np.concatenate([a, b]), options)
    ia, ib = ids[: len(a)], ids[len(a) :]
    if pc.any(pc.equal(ia, ib)).as_py():
        dup = pc.filter(ia, pc.equal(ia, ib))[0].as_py()
        raise ValueError(f"image_id {dup!r} appears on two descriptor rows; ids must be unique")
    return ordered_pairs(ia, ib, score, exact, run_id, meta["model_id"])


def write_parts(table: pa.Table, folder_url: str, options) -> list[str]:
    """table as part-00000.parquet, ... of at most PART_ROWS rows (one empty part if empty)."""
    names = []
    with stage.scratch_dir(near=folder_url) as tmp:
        for i, start in enumerate(range(0, max(table.num_rows, 1), PART_ROWS)):
            name = f"part-{i:05d}.parquet"
            path = os.path.join(tmp, name)
            pq.write_table(table.slice(start, PART_ROWS), path, compression="zstd")
            stage.publish_file(path, st.join(folder_url, name), options)
            names.append(name)
    return names


@ray.remote
def assemble(
    index_url: str, out_url: str, chunk_urls: list[str], run_id: str, options, *exact_parts
) -> dict[str, Any]:
    """All chunk results + exact pairs -> pairs/ and near_misses/ Parquet parts."""
    meta, _ = opened_store(index_url, options)
    loaded = [read_npz(url, options) for url in chunk_urls]

    def cat(key: str, dtype) -> np.ndarray:
        return np.concatenate([c[key] for c in loaded] + [np.zeros(0, dtype)]).astype(dtype)

    a, b, s = cat("a", np.int64), cat("b", np.int64), cat("s", np.float32)
    ea = np.concatenate([p[0] for p in exact_parts] + [np.zeros(0, np.int64)])
    eb = np.concatenate([p[1] for p in exact_parts] + [np.zeros(0, np.int64)])
    es = np.concatenate([p[2] for p in exact_parts] + [np.zeros(0, np.float32)])
    exact = np.concatenate([np.zeros(len(a), bool), np.ones(len(ea), bool)])
    a, b, s, exact = match.unique_pairs(
        np.concatenate([a, ea]), np.concatenate([b, eb]), np.concatenate([s, es]), exact
    )
    pairs = pairs_table(index_url, meta, a, b, s, exact, run_id, options)
    # A near miss that is also a pair (an exact duplicate below the threshold) is dropped:
    # merged with the pairs flagged True, the pair's row wins.
    near_a, near_b, near_s = cat("na", np.int64), cat("nb", np.int64), cat("ns", np.float32)
    na, nb, ns, is_pair = match.unique_pairs(
        np.concatenate([a, near_a]),
        np.concatenate([b, near_b]),
        np.concatenate([s, near_s]),
        np.concatenate([np.ones(len(a), bool), np.zeros(len(near_a), bool)]),
    )
    only = ~is_pair
    near = pairs_table(
        index_url,
        meta,
        na[only],
        nb[only],
        ns[only],
        np.zeros(int(only.sum()), bool),
        run_id,
        options,
    )
    write_parts(pairs, st.join(out_url, "pairs"), options)
    write_parts(near, st.join(out_url, "near_misses"), options)
    return {
        "pairs": pairs.num_rows,
        "exact_pairs": int(exact.sum()),
        "near_misses": near.num_rows,
        "peak_rss_mb": stage.peak_rss_mb(),
    }


def run_pairs(
    index_url: str,
    out_url: str,
    config: dict[str, Any],
    *,
    threshold: float,
    run_id: str,
    background_url: str | None = None,
) -> dict[str, Any]:
    """All-pairs of the index folder into out_url/pairs (+ near_misses); skip if current."""
    options = st.StorageOptions.from_config(config["storage"])
    settings = MatchSettings.from_config(config["match"], threshold, background_url is not None)
    pairs_url = st.join(out_url, "pairs")
    meta = ix.read_meta(index_url, options)
    index_manifest = st.read_manifest(index_url, options) or {}
    background_print = None
    if background_url is not None:
        background_print = run_index(background_url, st.join(out_url, "background_index"), config)[
            "meta"
        ]["counts"]
    # Worker sizing does not change the result; everything else in the settings does.
    result_settings = replace(settings, task_cpus=0, batch_rows=0)
    print_ = stage.fingerprint(
        index_manifest.get("fingerprint"),
        result_settings,
        run_id,
        background_url,
        background_print,
    )
    current = stage.current_manifest(pairs_url, print_, options)
    if current is not None:
        return {**current["counts"], "skipped": True, "timings": current["timings"]}
    stage.reset_if_stale(pairs_url, print_, options)
    stage.reset_if_stale(st.join(out_url, "near_misses"), print_, options)

    started = time.perf_counter()
    gpu = use_gpu(config["index"])
    work = st.join(pairs_url, WORK_DIR)
    timings: dict[str, float] = {}
    offset_urls = None
    if background_url is not None:
        t0 = time.perf_counter()
        offset_urls = compute_offsets(
            index_url, st.join(out_url, "background_index"), work, settings, gpu, options
        )
        timings["score_norm_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    chunks = query_chunks(meta, settings.query_rows)
    chunk_urls = [st.join(work, f"knn-{chunk_name(lo)}.npz") for lo, _ in chunks]
    refs = [
        knn_chunk.options(num_cpus=settings.task_cpus, num_gpus=1 if gpu else 0).remote(
            index_url, lo, hi, settings, offset_urls, gpu, url, options
        )
        for (lo, hi), url in zip(chunks, chunk_urls, strict=True)
    ]
    results = stage.wait_for(refs, "pairs: kNN + exact re-score", "chunk")
    timings["knn_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    exact_parts = []
    if settings.exact_duplicates:
        files = meta["descriptors"]["files"]
        file_groups = [
            files[s["first_file"] : s["first_file"] + s["file_count"]] for s in meta["shards"]
        ]
        buckets = max(2, min(64, len(file_groups)))
        mapped = [
            exact_map.options(num_cpus=settings.task_cpus, num_returns=buckets).remote(
                group, buckets, options
            )
            for group in file_groups
        ]
        exact_parts = [
            exact_reduce.options(num_cpus=settings.task_cpus).remote(
                index_url, offset_urls, settings, options, *[m[p] for m in mapped]
            )
            for p in range(buckets)
        ]
    assembled = assemble.options(num_cpus=settings.task_cpus).remote(
        index_url, out_url, chunk_urls, run_id, options, *exact_parts
    )
    counts = stage.wait_for([assembled], "pairs: assemble", "table")[0]
    timings["exact_and_assemble_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - started
    worker_peak = max([r["peak_rss_mb"] for r in results] + [counts.pop("peak_rss_mb")])
    counts["candidates"] = sum(r.get("candidates", 0) for r in results)
    fs = st.get_filesystem(pairs_url, options)
    fs.rm(st.strip_protocol(work), recursive=True)
    st.write_manifest(
        pairs_url,
        {
            "status": "complete",
            "job": "pairs",
            "fingerprint": print_,
            "run_id": run_id,
            "model_id": meta["model_id"],
            "index": index_url,
            "threshold": settings.threshold,
            "score_normalisation": (
                {"background": background_url, **asdict(settings.score_norm)}
                if settings.score_norm
                else None
            ),
            "counts": counts,
            "timings": {k: round(v, 3) for k, v in timings.items()},
            "peak_rss_mb": {"driver": stage.peak_rss_mb(), "worker_max": worker_peak},
            "config": {"match": config["match"]},
        },
        options,
    )
    return {**counts, "skipped": False, "timings": timings, "worker_peak_rss_mb": worker_peak}
