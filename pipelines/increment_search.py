"""The index and pairs stages of an incremental run: Ray tasks that grow the live index and
search it.

    index   add the run's vectors with the trained quantizer, as parts of at most
            index.shard_vectors rows (one task each); measure drift; train a new generation
            only when drift, or growth past an exact index, calls for it
    pairs   new x (history + new): k+1 candidates per new image, exact cosine from the fp16
            vectors, threshold; byte-identical copies flagged exact by content hash

Tasks are scheduled SPREAD so a night uses every node's CPUs and page cache.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipelines.run_frame import Run, history_spans, write_parquet
from pipelines.stage import wait_for
from rdcd import drift, live_index, match
from rdcd import index as ix
from rdcd.history import State
from rdcd.live_index import Span
from rdcd.runtime import init_ray
from rdcd.tables import PAIRS_SCHEMA, ordered_pairs


@ray.remote
def train_task(
    version_url: str,
    generation: int,
    params: dict,
    spans: list[dict],
    sample: np.ndarray,
    dim: int,
    storage,
) -> dict[str, Any]:
    """Fit generation's quantizer once, on the sampled rows (one task: a GPU when present)."""
    store = live_index.open_store(version_url, [Span(**s) for s in spans], dim, storage)
    params = ix.IndexParams(**{k: v for k, v in params.items() if k != "bytes_per_vector"})
    trained = live_index.train_generation(
        version_url, generation, params, store.gather(sample), storage, ix.gpu_available()
    )
    return {**trained, "node_id": ray.get_runtime_context().get_node_id()}


@ray.remote
def add_part_task(
    version_url: str, generation: int, part: dict, run_span: dict, dim: int, storage
) -> dict[str, Any]:
    """Rows part.start .. part.start + part.count - 1 (of one run) into one index part."""
    store = live_index.open_store(version_url, [Span(**run_span)], dim, storage)
    vectors = store.rows(part["start"], part["start"] + part["count"])
    result = live_index.add_part(
        version_url, generation, part["name"], vectors, part["start"], storage
    )
    return {**result, "node_id": ray.get_runtime_context().get_node_id()}


def task_options(run: Run, gpu: bool = False) -> dict[str, Any]:
    """Resources of the add/train/search tasks: spread over the nodes (the cluster's whole
    CPU and page cache work for the night), and training gets a GPU when the cluster has one.

    Ray is joined here, on first use, so resuming a run past its Ray stages (or re-running a
    finished one) never needs the cluster."""
    from pipelines.index import use_gpu

    init_ray(run.config["ray"])
    options: dict[str, Any] = {"num_cpus": run.settings.task_cpus, "scheduling_strategy": "SPREAD"}
    if gpu and use_gpu(run.config["index"]):
        options["num_gpus"] = 1
    return options


def part_slices(span: Span, rows: int) -> list[Span]:
    """A run's rows cut into parts of at most index.shard_vectors (one add task each)."""
    end = span.start + span.count
    return [
        Span(f"{span.name}-p{i:05d}", lo, min(rows, end - lo))
        for i, lo in enumerate(range(span.start, end, rows))
    ]


def add_parts(run: Run, generation: int, spans: list[Span]) -> list[dict[str, Any]]:
    rows = int(run.config["index"]["shard_vectors"])
    refs = [
        add_part_task.options(**task_options(run)).remote(
            run.version.url, generation, vars(part), vars(span), run.model.dim, run.storage
        )
        for span in spans
        if span.count
        for part in part_slices(span, rows)
    ]
    return wait_for(refs, "index: add parts")


def stage_index(run: Run, state: State, ingested: dict[str, Any]) -> dict[str, Any]:
    """Add the run's vectors with the trained quantizer, or train a new generation when the
    history outgrew an exact index, the quantizer drifted, or there is none yet."""
    count = int(ingested["count"])
    new = [Span(run.run_id, int(ingested["first_id"]), count)] if count else []
    spans = history_spans(state) + new
    total = sum(s.count for s in spans)
    current = dict(state.index)
    if total == 0:
        return {"index": current, "drift": {"retrained": False, "reason": "empty history"}}
    params = ix.choose_params(total, run.model.dim, run.config["index"])
    kind = "ivf" if params.is_ivf else "flat"
    if not current or current.get("kind") != kind:
        reason = (
            "first index" if not current else f"{current['kind']} -> {kind} at {total:,} images"
        )
        return rebuild(run, spans, params, int(current.get("generation", -1)) + 1, reason)
    if kind == "flat" or count == 0:
        return {"index": current, "drift": {"retrained": False}}
    generation = int(current["generation"])
    added = add_parts(run, generation, new)
    parts = [*current["parts"], *(a["part"] for a in added)]
    sizes = live_index.total_sizes(run.version.url, generation, parts, run.storage)
    residual = sum(a["residual"] * a["part"]["count"] for a in added) / count
    report = drift.assess(current["baseline"], residual, sizes, total, run.settings.bounds)
    if report["retrain"]:
        rebuilt = rebuild(run, spans, params, generation + 1, "; ".join(report["reasons"]))
        rebuilt["drift"]["measured"] = report
        return rebuilt
    current["parts"] = compact_if_needed(run, generation, parts)
    return {
        "index": current,
        "drift": {"retrained": False, **report},
        "placement": {"index": sorted({a["node_id"] for a in added})},
    }


def rebuild(
    run: Run, spans: list[Span], params: ix.IndexParams, generation: int, reason: str
) -> dict[str, Any]:
    """A new generation: train once on a sample of every vector, then add every run in
    parallel parts."""
    if not params.is_ivf:
        index = {"generation": generation, "kind": "flat", "factory": "Flat", "parts": []}
        return {"index": index, "drift": {"retrained": True, "reason": reason}}
    total = sum(s.count for s in spans)
    sample = ix.sample_ids(total, params.train_size, int(run.config["index"]["seed"]))
    ref = train_task.options(**task_options(run, gpu=True)).remote(
        run.version.url, generation, params.to_dict(), [vars(s) for s in spans], sample,
        run.model.dim, run.storage,
    )  # fmt: skip
    (trained,) = wait_for([ref], "index: train")
    added = add_parts(run, generation, spans)
    parts = [a["part"] for a in added]
    sizes = live_index.total_sizes(run.version.url, generation, parts, run.storage)
    index = {
        "generation": generation,
        "kind": "ivf",
        "factory": params.factory,
        "nlist": params.nlist,
        "params": params.to_dict(),
        "baseline": drift.baseline(trained["residual"], sizes, total),
        "parts": compact_if_needed(run, generation, parts),
    }
    return {
        "index": index,
        "drift": {"retrained": True, "reason": reason, "imbalance": drift.imbalance(sizes)},
        "placement": {"index": sorted({a["node_id"] for a in added} | {trained["node_id"]})},
    }


def compact_if_needed(run: Run, generation: int, parts: list[dict[str, Any]]) -> list[dict]:
    if len(parts) <= run.settings.max_index_parts:
        return parts
    merged = live_index.compact(
        run.version.url, generation, parts, f"compact-{run.run_id}", run.storage
    )
    return [merged]


@ray.remote
def search_task(
    version_url: str,
    index_state: dict,
    spans: list[dict],
    lo: int,
    hi: int,
    k: int,
    nprobe: int,
    threshold: float,
    dim: int,
    storage,
) -> dict[str, Any]:
    """Pairs of query rows [lo, hi) with everything indexed: k+1 candidates (the query finds
    itself), exact cosine from the fp16 vectors, threshold."""
    store = live_index.open_store(version_url, [Span(**s) for s in spans], dim, storage)
    queries = store.rows(lo, hi)
    if index_state.get("kind") == "ivf":
        candidates = live_index.SearchView(version_url, index_state, nprobe, storage).search(
            queries, k + 1
        )
    else:
        candidates = live_index.exact_search(store, queries, k + 1)
    scores = match.exact_scores(queries, candidates, store)
    rows = np.arange(lo, hi, dtype=np.int64)
    a, b, s = match.canonical_pairs(rows, candidates, scores, scores >= threshold)
    return {"a": a, "b": b, "s": s, "node_id": ray.get_runtime_context().get_node_id()}


def stage_pairs(
    run: Run, state: State, ingested: dict[str, Any], indexed: dict[str, Any]
) -> dict[str, Any]:
    count, first_id = int(ingested["count"]), int(ingested["first_id"])
    url = run.work("pairs", "pairs.parquet")
    if count == 0:
        write_parquet(_pairs_with_rows(PAIRS_SCHEMA.empty_table()), url, run.storage)
        return {"pairs": 0, "exact_pairs": 0, "url": url}
    spans = history_spans(state) + [Span(run.run_id, first_id, count)]
    settings = run.settings
    refs = [
        search_task.options(**task_options(run)).remote(
            run.version.url,
            indexed["index"],
            [vars(s) for s in spans],
            lo,
            min(lo + settings.query_rows, first_id + count),
            settings.k,
            settings.nprobe,
            settings.threshold,
            run.model.dim,
            run.storage,
        )
        for lo in range(first_id, first_id + count, settings.query_rows)
    ]
    found = wait_for(refs, "pairs: kNN + exact re-score")
    a = np.concatenate([f["a"] for f in found])
    b = np.concatenate([f["b"] for f in found])
    s = np.concatenate([f["s"] for f in found]).astype(np.float32)
    exact = np.zeros(len(a), dtype=bool)
    if settings.exact_duplicates:
        ea, eb, es = new_exact_pairs(run, spans, first_id, count)
        a, b, s = np.concatenate([a, ea]), np.concatenate([b, eb]), np.concatenate([s, es])
        exact = np.concatenate([exact, np.ones(len(ea), dtype=bool)])
    a, b, s, exact = match.unique_pairs(a, b, s, exact)
    rows = np.concatenate([a, b])
    ids = live_index.lookup_rows(
        run.version.url, spans, rows, run.storage, ["image_id", "content_hash"]
    )
    ia, ib = ids["image_id"].slice(0, len(a)), ids["image_id"].slice(len(a))
    if settings.exact_duplicates:
        ha, hb = ids["content_hash"].slice(0, len(a)), ids["content_hash"].slice(len(a))
        same = pc.fill_null(pc.equal(ha, hb), False).to_numpy(zero_copy_only=False)
        exact = exact | same
    table = ordered_pairs(ia, ib, s, exact, run.run_id, run.model.model_id, rows=(a, b))
    write_parquet(table, url, run.storage)
    return {
        "pairs": table.num_rows,
        "exact_pairs": int(exact.sum()),
        "url": url,
        "placement": {"pairs": sorted({f["node_id"] for f in found})},
    }


def _pairs_with_rows(table: pa.Table) -> pa.Table:
    return table.append_column("row_a", pa.array([], pa.int64())).append_column(
        "row_b", pa.array([], pa.int64())
    )


def new_exact_pairs(
    run: Run, spans: list[Span], first_id: int, count: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Byte-identical copies among the new images, paired without the index (a copy of a
    history image is the history image's nearest neighbour, found by the kNN search and
    flagged exact by its content hash)."""
    new = live_index.read_ids(run.version.url, [spans[-1]], run.storage, ["content_hash"])
    hashes = new["content_hash"]
    valid = pc.is_valid(hashes).to_numpy(zero_copy_only=False)
    rows = np.arange(first_id, first_id + count, dtype=np.int64)[valid]
    if len(rows) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0, dtype=np.float32)
    keys = match.hash_keys(pc.drop_null(hashes))
    a, b = match.exact_duplicate_pairs(keys, rows)
    store = live_index.open_store(run.version.url, spans, run.model.dim, run.storage)
    scores = np.einsum("ij,ij->i", store.gather(a), store.gather(b)).astype(np.float32)
    return np.minimum(a, b), np.maximum(a, b), scores
