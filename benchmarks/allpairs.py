"""All-pairs near-duplicate search: the rdcd pipeline vs exact brute-force kNN, same machine,
same run.

    python benchmarks/allpairs.py [--n 1000000] [--d 64] [--brute-queries 20000]
                                  [--set match.nprobe=32 ...] [--workdir DIR]

Data: N synthetic unit vectors, clustered like real descriptors (random pairs score low, a
point's nearest unrelated neighbours ~0.5-0.7), with planted near-duplicate clusters (5% of
the points get 2 copies each at cosine ~0.75-0.98), written as a real descriptors table.

Measured:
- rdcd: `run_index` + `run_pairs` end to end (Parquet in, pairs Parquet out) on a local Ray
  with every core, default configuration unless --set says otherwise;
- brute force: exact kNN (faiss, inner product) for a random subset of queries against all N,
  as Ray tasks with the same CPUs per task as the pipeline's kNN tasks, over every core; its
  cost is exactly linear in the number of queries, so the all-pairs time is extrapolated
  linearly (stated in the table);
- recall: ground truth = pairs (q, c) with c among q's exact k nearest and cosine >= threshold,
  for the subset's queries; found = the pipeline's pairs table;
- index bytes per vector (index.faiss + index.ivfdata over N; the fp16 vector store is listed
  apart), peak RSS of the driver and the largest of any worker task (mapped index pages count).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.index import run_index  # noqa: E402
from pipelines.pairs import run_pairs  # noqa: E402
from rdcd.config import load_config  # noqa: E402
from rdcd.runtime import init_ray  # noqa: E402
from rdcd.storage import read_manifest  # noqa: E402
from rdcd.tables import descriptor_array, descriptors_schema  # noqa: E402

ROWS_PER_FILE = 100_000


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(n: int, d: int, seed: int) -> np.ndarray:
    """Clustered unit vectors with planted near-duplicates, rounded to fp16 like stored ones."""
    rng = np.random.default_rng(seed)
    n_orig = n // 20
    n_base = n - 2 * n_orig
    centres = unit(rng.standard_normal((max(1, n // 500), d)))
    x = np.empty((n, d), dtype=np.float32)
    for lo in range(0, n_base, 1_000_000):
        hi = min(lo + 1_000_000, n_base)
        pick = centres[rng.integers(0, len(centres), hi - lo)]
        x[lo:hi] = unit(0.6 * pick + rng.standard_normal((hi - lo, d)) / np.sqrt(d))
    originals = rng.choice(n_base, n_orig, replace=False)
    for c in range(2):
        sigma = rng.uniform(0.2, 0.9, (n_orig, 1)).astype(np.float32)
        noise = rng.standard_normal((n_orig, d)).astype(np.float32) / np.sqrt(d)
        x[n_base + c * n_orig : n_base + (c + 1) * n_orig] = unit(x[originals] + sigma * noise)
    return unit(x.astype(np.float16).astype(np.float32))


def write_table(x: np.ndarray, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    n, d = x.shape
    for lo in range(0, n, ROWS_PER_FILE):
        hi = min(lo + ROWS_PER_FILE, n)
        ids = [f"v{i:09d}" for i in range(lo, hi)]
        table = pa.table(
            {
                "image_id": ids,
                "uri": ids,
                "content_hash": ids,
                "width": pa.array(np.full(hi - lo, 64, np.int32)),
                "height": pa.array(np.full(hi - lo, 64, np.int32)),
                "descriptor": descriptor_array(x[lo:hi]),
                "model_id": ["synthetic"] * (hi - lo),
            },
            schema=descriptors_schema(d),
        )
        pq.write_table(table, folder / f"part-{lo // ROWS_PER_FILE:05d}.parquet")


@ray.remote
def _exact_knn(x: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    return faiss.knn(x[queries], x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)


def brute_force(
    x: np.ndarray, queries: np.ndarray, k: int, task_cpus: float
) -> tuple[np.ndarray, np.ndarray, float]:
    """Exact kNN of the queries as Ray tasks with the pipeline's CPUs per task: the same
    parallelism (and faiss threads per process) as the kNN stage it is compared with."""
    shared = ray.put(x)
    parts = np.array_split(queries, max(1, int(ray.cluster_resources()["CPU"] // task_cpus)))
    started = time.perf_counter()
    results = ray.get([_exact_knn.options(num_cpus=task_cpus).remote(shared, p, k) for p in parts])
    elapsed = time.perf_counter() - started
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]), elapsed


def truth_pairs(queries, scores, ids, threshold: float) -> set[tuple[int, int]]:
    q = np.repeat(queries, ids.shape[1])
    c, s = ids.ravel(), scores.ravel()
    keep = (c != q) & (c >= 0) & (s >= threshold)
    a, b = np.minimum(q[keep], c[keep]), np.maximum(q[keep], c[keep])
    return set(zip(a.tolist(), b.tolist(), strict=True))


def found_pairs(out: Path) -> tuple[set[tuple[int, int]], int]:
    table = pa.concat_tables(
        pq.read_table(p, columns=["image_id_a", "image_id_b"])
        for p in sorted((out / "pairs").glob("*.parquet"))
    )
    a = np.array([int(s[1:]) for s in table["image_id_a"].to_pylist()], dtype=np.int64)
    b = np.array([int(s[1:]) for s in table["image_id_b"].to_pylist()], dtype=np.int64)
    return set(zip(a.tolist(), b.tolist(), strict=True)), table.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--brute-queries", type=int, default=20_000)
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--workdir", help="keep data and outputs here (default: a temp dir)")
    args = parser.parse_args()

    config = load_config(None, args.overrides)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="rdcd-allpairs-"))
    print(f"data: {args.n:,} x {args.d} in {work}", flush=True)
    x = synthetic(args.n, args.d, args.seed)
    write_table(x, work / "descriptors")
    init_ray(config["ray"])

    started = time.perf_counter()
    indexed = run_index(str(work / "descriptors"), str(work / "index"), config, overwrite=True)
    index_s = time.perf_counter() - started
    started = time.perf_counter()
    paired = run_pairs(
        str(work / "index"), str(work), config, threshold=args.threshold, run_id="bench"
    )
    pairs_s = time.perf_counter() - started
    rdcd_s = index_s + pairs_s

    k = int(config["match"]["k"])
    rng = np.random.default_rng(args.seed + 1)
    queries = np.sort(rng.choice(args.n, min(args.brute_queries, args.n), replace=False))
    scores, ids, brute_s = brute_force(x, queries, k, float(config["match"]["task_cpus"]))
    brute_all_s = brute_s * args.n / len(queries)
    truth = truth_pairs(queries, scores, ids, args.threshold)
    found, n_pairs = found_pairs(work)
    recall = len(truth & found) / max(1, len(truth))

    meta = indexed["meta"]
    index_manifest = read_manifest(str(work / "index")) or {}
    pairs_manifest = read_manifest(str(work / "pairs")) or {}
    vectors_bytes = sum(p.stat().st_size for p in (work / "index" / "vectors").glob("*.npy"))
    worker_peak = max(
        index_manifest.get("peak_rss_mb", {}).get("worker_max", 0),
        pairs_manifest.get("peak_rss_mb", {}).get("worker_max", 0),
    )
    rows = [
        ("vectors (N x d)", f"{args.n:,} x {args.d}"),
        ("index", f"{meta['factory']} (nlist {meta['nlist']}, nprobe "
                  f"{config['match']['nprobe']}, k {k})"),
        ("rdcd index build (s)", f"{index_s:,.1f}  {index_manifest.get('timings', {})}"),
        ("rdcd all-pairs (s)", f"{pairs_s:,.1f}  ({paired['pairs']:,} pairs, "
                               f"{paired['exact_pairs']:,} exact)"),
        ("rdcd total (s)", f"{rdcd_s:,.1f}"),
        ("brute-force kNN (s)", f"{brute_all_s:,.1f}  (measured {brute_s:.1f} s on "
                                f"{len(queries):,} queries, x{args.n / len(queries):.0f} linear)"),
        ("time ratio rdcd / brute force", f"{rdcd_s / brute_all_s:.3f}  (target <= 0.2)"),
        ("recall of pairs >= threshold", f"{recall:.4f}  ({len(truth & found):,} of "
                                         f"{len(truth):,} exact-kNN pairs, threshold "
                                         f"{args.threshold})  (target >= 0.99)"),
        ("index bytes / vector", f"{indexed['bytes_per_vector']:.1f}"),
        ("fp16 vector store bytes / vector", f"{vectors_bytes / args.n:.1f}"),
        ("peak RSS: driver / worker max (MB)",
         f"{index_manifest.get('peak_rss_mb', {}).get('driver', 0):,.0f} / {worker_peak:,.0f}"),
        ("pairs table rows", f"{n_pairs:,}"),
        ("cores", f"{os.cpu_count()}"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    print()
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
