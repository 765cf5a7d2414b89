"""`rdcd search QUERIES REFS OUT`: copy detection (the DISC protocol, METHOD.md 4.3).

For every query, the k best references by exact cosine: the reference index proposes
`search.candidates` per query, each is re-scored from the fp16 descriptors, the best k are kept.
Output: OUT/predictions/*.parquet (query_id, reference_id, score), exactly min(k, #refs) rows
per query, ready for `rdcd eval`. With --background, scores are normalised against the
background set (s - beta * mean of the top similarities to it; METHOD.md 4.4), which changes no
query's ranking, only the calibration across queries that micro-AP measures.

QUERIES and REFS may be descriptors tables or images (embedded first into OUT/); REFS may also
be an index folder built by `rdcd index`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from pipelines import stage
from pipelines.index import find_descriptors, run_index, use_gpu
from pipelines.jobs import JobError, module_main
from pipelines.pairs import (
    MatchSettings,
    chunk_name,
    compute_offsets,
    image_ids_of,
    open_offsets,
    opened_searcher,
    opened_store,
    query_chunks,
    read_npz,
    write_parts,
)
from rdcd import index as ix
from rdcd import match
from rdcd import storage as st
from rdcd.runtime import init_ray
from rdcd.tables import PREDICTIONS_SCHEMA

COMMAND = "search"
HELP = "Copy detection: the top-k references of every query as a predictions table."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("queries", help="query descriptors table, or query images")
    parser.add_argument("references", help="reference descriptors, images, or an index folder")
    parser.add_argument("output", help="output folder (predictions/ and the built indexes)")
    parser.add_argument("--k", type=int, help="predictions per query (default: search.k)")
    parser.add_argument("--background", help="background descriptors: score normalisation")
    parser.add_argument("--model", help="model card when QUERIES/REFS are images")


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    if args.k is not None:
        config["search"]["k"] = args.k
    if args.background:
        config["match"]["background"] = args.background
    if args.model:
        config["model"]["card"] = args.model
    init_ray(config["ray"], args.address)
    return run_search(args.queries, args.references, args.output, config)


def _descriptors(url: str, out_url: str, role: str, config: dict[str, Any], options) -> str:
    """The descriptors folder of url, embedding images into OUT/<role>_embed first."""
    found = find_descriptors(url, options)
    if found is not None:
        return found
    from pipelines.embed import run_embed

    target = st.join(out_url, f"{role}_embed")
    run_embed(url, target, config)
    return st.join(target, "descriptors")


@ray.remote
def search_chunk(
    query_url: str,
    ref_url: str,
    lo: int,
    hi: int,
    settings: MatchSettings,
    k: int,
    candidates: int,
    offset_urls: list[str] | None,
    gpu: bool,
    target: str,
    options,
) -> dict[str, Any]:
    """Top-k references (exactly re-scored) of query rows [lo, hi) -> one .npz file."""
    if st.exists(target, options):
        return {"skipped": True, "peak_rss_mb": stage.peak_rss_mb()}
    qmeta, queries_store = opened_store(query_url, options)
    _, refs_store = opened_store(ref_url, options)
    searcher = opened_searcher(ref_url, settings.nprobe, gpu, options)
    offsets = None
    if offset_urls is not None:
        offsets = open_offsets(offset_urls, query_chunks(qmeta, settings.query_rows), options)
    qs, rs, ss = [], [], []
    for b in range(lo, hi, settings.batch_rows):
        e = min(b + settings.batch_rows, hi)
        queries = queries_store.rows(b, e)
        found = ix.search(searcher, queries, max(k, candidates))
        refs, scores = match.top_k(found, match.exact_scores(queries, found, refs_store), k)
        if offsets is not None:
            scores = scores - offsets.rows(b, e)
        valid = refs >= 0
        qs.append(np.broadcast_to(np.arange(b, e)[:, None], refs.shape)[valid])
        rs.append(refs[valid])
        ss.append(scores[valid].astype(np.float32))
    with stage.scratch_dir() as tmp:
        path = os.path.join(tmp, "p.npz")
        np.savez(path, q=np.concatenate(qs), r=np.concatenate(rs), s=np.concatenate(ss))
        stage.publish_file(path, target, options)
    return {"skipped": False, "peak_rss_mb": stage.peak_rss_mb()}


def run_search(
    queries_url: str, refs_url: str, out_url: str, config: dict[str, Any]
) -> dict[str, Any]:
    init_ray(config["ray"])
    options = st.StorageOptions.from_config(config["storage"])
    k, candidates = int(config["search"]["k"]), int(config["search"]["candidates"])
    if k < 1 or candidates < 1:
        raise JobError("search.k and search.candidates must be >= 1")
    background = config["match"]["background"]
    started = time.perf_counter()
    if st.exists(st.join(refs_url, ix.INDEX_JSON), options):
        ref_index = refs_url
        ref_print = (st.read_manifest(refs_url, options) or {}).get("fingerprint")
    else:
        ref_index = st.join(out_url, "refs_index")
        run_index(_descriptors(refs_url, out_url, "refs", config, options), ref_index, config)
        ref_print = st.read_manifest(ref_index, options)["fingerprint"]
    query_index = st.join(out_url, "queries_vectors")
    run_index(
        _descriptors(queries_url, out_url, "queries", config, options),
        query_index,
        config,
        vectors_only=True,
    )
    qmeta, rmeta = ix.read_meta(query_index, options), ix.read_meta(ref_index, options)
    if qmeta["d"] != rmeta["d"] or qmeta["model_id"] != rmeta["model_id"]:
        raise JobError(
            f"queries ({qmeta['model_id']}, d={qmeta['d']}) and references "
            f"({rmeta['model_id']}, d={rmeta['d']}) come from different models"
        )
    settings = MatchSettings.from_config(config["match"], 0.0, background is not None)
    predictions_url = st.join(out_url, "predictions")
    print_ = stage.fingerprint(
        st.read_manifest(query_index, options)["fingerprint"],
        ref_print,
        k,
        candidates,
        settings.nprobe,
        settings.score_norm,
        background,
    )
    current = stage.current_manifest(predictions_url, print_, options)
    if current is not None:
        return _summary(current["counts"], predictions_url, True)
    stage.reset_if_stale(predictions_url, print_, options)
    work = st.join(predictions_url, "_work")
    gpu = use_gpu(config["index"])
    offset_urls = None
    if background is not None:
        background_index = st.join(out_url, "background_index")
        run_index(background, background_index, config)
        offset_urls = compute_offsets(query_index, background_index, work, settings, gpu, options)
    chunks = query_chunks(qmeta, settings.query_rows)
    targets = [st.join(work, f"top-{chunk_name(lo)}.npz") for lo, _ in chunks]
    refs = [
        search_chunk.options(num_cpus=settings.task_cpus, num_gpus=1 if gpu else 0).remote(
            query_index, ref_index, lo, hi, settings, k, candidates, offset_urls, gpu, t, options
        )
        for (lo, hi), t in zip(chunks, targets, strict=True)
    ]
    results = stage.wait_for(refs, "search", "chunk")
    loaded = [read_npz(t, options) for t in targets]
    q = np.concatenate([x["q"] for x in loaded])
    r = np.concatenate([x["r"] for x in loaded])
    s = np.concatenate([x["s"] for x in loaded])
    table = pa.table(
        {
            "query_id": image_ids_of(query_index, qmeta, q, options),
            "reference_id": image_ids_of(ref_index, rmeta, r, options),
            "score": pa.array(s, pa.float32()),
        },
        schema=PREDICTIONS_SCHEMA,
    ).sort_by([("query_id", "ascending"), ("score", "descending")])
    write_parts(table, predictions_url, options)
    st.get_filesystem(work, options).rm(st.strip_protocol(work), recursive=True)
    counts = {
        "queries": qmeta["counts"]["vectors"],
        "references": rmeta["counts"]["vectors"],
        "predictions": table.num_rows,
    }
    st.write_manifest(
        predictions_url,
        {
            "status": "complete",
            "job": COMMAND,
            "fingerprint": print_,
            "model_id": rmeta["model_id"],
            "k": k,
            "candidates": candidates,
            "score_normalisation": background is not None,
            "counts": counts,
            "timings": {"total_s": round(time.perf_counter() - started, 3)},
            "peak_rss_mb": {
                "driver": stage.peak_rss_mb(),
                "worker_max": max(x["peak_rss_mb"] for x in results),
            },
        },
        options,
    )
    return _summary(counts, predictions_url, False)


def _summary(counts: dict[str, Any], url: str, skipped: bool) -> dict[str, Any]:
    return {
        **counts,
        "predictions table": url,
        "built / skipped": "skipped (current)" if skipped else "built",
    }


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
