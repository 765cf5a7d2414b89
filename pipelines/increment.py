"""One incremental run against a history version: the stages `rdcd nightly` and `rdcd backfill`
share.

    claim     reserve the next block of dense row ids in the ledger (state.json: pending)
    list      list the input; diff its ids against the history (folders: before reading)
    embed     rdcd embed of the new inputs only (an --ids subset), resumable per shard
    ingest    drop inputs the history already holds (same id and content hash), turn an id
              seen before with other content into an error row, number the rest, write their
              vectors and id map
    index     add them to the live index with the trained quantizer, measure drift, retrain a
              new generation only when drift (or growth past an exact index) calls for it
    pairs     new x history and new x new: kNN candidates, exact re-score, threshold; exact
              duplicates by content hash
    groups    join/merge the groups the new pairs reach (rdcd/group_updates.py)
    commit    publish the date partitions, rewrite the touched group buckets, then the ledger:
              the one atomic write that makes the run part of the history
    finalize  the run-summary row and the run's manifest

Every stage records its result in work/<run_id>/_stages/<stage>.json once done and is skipped
on a re-run, so a run killed anywhere resumes to exactly what one clean run writes; a run the
ledger already lists is a no-op. RDCD_STOP_AFTER=<stage> makes the process exit hard right
after that stage (the kill-and-resume tests use it; it is a real crash, nothing is cleaned up).
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

import rdcd
from pipelines.jobs import JobError
from rdcd import drift, group_updates, live_index, match, runlog
from rdcd import index as ix
from rdcd import storage as st
from rdcd.groups import check_policy
from rdcd.history import (
    History,
    HistoryError,
    RunRecord,
    State,
    Version,
    check_model,
    check_table_model,
)
from rdcd.live_index import Span
from rdcd.runtime import init_ray
from rdcd.sources import SourceError, SourceOptions, list_inputs
from rdcd.tables import ERRORS_SCHEMA, PAIRS_SCHEMA, descriptor_matrix, descriptors_schema

STAGES = ("list", "embed", "ingest", "index", "pairs", "groups", "commit", "finalize")
STOP_ENV = "RDCD_STOP_AFTER"
STOP_EXIT_CODE = 75
ERRORS_TABLE_SCHEMA = pa.schema(
    [*ERRORS_SCHEMA, pa.field("run_id", pa.string()), pa.field("model_id", pa.string())]
)


@dataclass(frozen=True)
class ModelIdentity:
    spec: str
    model_id: str
    dim: int
    threshold: float | None = None


def model_identity(spec: str, storage: st.StorageOptions) -> ModelIdentity:
    """model_id and d of a model spec; student cards are read as JSON (no torch import), so
    resuming a run past its embed stage starts in seconds."""
    directory = (
        str(Path(rdcd.__file__).resolve().parent / "assets" / "models" / "default")
        if spec == "default"
        else spec
    )
    card_url = st.join(directory, "card.json")
    if not spec.startswith(("sscd", "timm:", "torchscript:")) and st.exists(card_url, storage):
        card = st.read_json(card_url, storage)
        whitening = card.get("whitening") or {}
        dim = whitening.get("dim") if whitening.get("present") else card["architecture"]["dim"]
        return ModelIdentity(spec, str(card["model_id"]), int(dim), card.get("threshold"))
    from pipelines.embed import describe_model

    info = describe_model({"card": spec, "device": "cpu", "runtime": "torch"}, storage)
    return ModelIdentity(spec, info.model_id, info.dim)


@dataclass(frozen=True)
class Settings:
    """What a run needs from the config, resolved and checked once."""

    k: int
    nprobe: int
    threshold: float
    query_rows: int
    exact_duplicates: bool
    task_cpus: float
    keep_policy: list[str]
    file_sizes: str
    max_index_parts: int
    group_buckets: int
    bounds: drift.DriftBounds
    usd_per_hour: float
    hardware: str

    @classmethod
    def from_config(cls, config: dict[str, Any], threshold: float) -> Settings:
        night, m, g = config["nightly"], config["match"], config["groups"]
        if m["background"]:
            raise JobError(
                "match.background (score normalisation) is not supported by incremental runs: "
                "a night's new images would need the background offsets of the whole history"
            )
        if g["file_sizes"] not in ("stat", "off"):
            raise JobError(f"groups.file_sizes must be stat or off, got {g['file_sizes']!r}")
        for key in ("max_index_parts", "group_buckets"):
            if int(night[key]) < 1:
                raise JobError(f"nightly.{key} must be >= 1, got {night[key]}")
        return cls(
            k=int(m["k"]),
            nprobe=int(m["nprobe"]),
            threshold=float(threshold),
            query_rows=int(m["query_rows"]),
            exact_duplicates=bool(m["exact_duplicates"]),
            task_cpus=float(night["task_cpus"]),
            keep_policy=check_policy(g["keep_policy"]),
            file_sizes=str(g["file_sizes"]),
            max_index_parts=int(night["max_index_parts"]),
            group_buckets=int(night["group_buckets"]),
            bounds=drift.DriftBounds.from_config(night["drift"]),
            usd_per_hour=float(night["cost"]["usd_per_hour"]),
            hardware=str(night["cost"]["hardware"]),
        )

    def recorded(self) -> dict[str, Any]:
        """The settings that must stay fixed for the life of a version (pairs of every run
        must mean the same thing)."""
        return {
            "threshold": self.threshold,
            "k": self.k,
            "exact_duplicates": self.exact_duplicates,
            "keep_policy": self.keep_policy,
            "group_buckets": self.group_buckets,
        }


@dataclass
class Run:
    """One run of one version: where its stage results live and how to stop after a stage."""

    config: dict[str, Any]
    storage: st.StorageOptions
    history: History
    version: Version
    model: ModelIdentity
    settings: Settings
    run_id: str
    kind: str
    date: str
    input_url: str
    ids_url: str | None = None
    """Parquet/CSV of exactly the image ids to admit (a backfill replaying a run)."""

    def work(self, *parts: str) -> str:
        return self.version.sub("work", self.run_id, *parts)

    def done(self, stage: str) -> dict[str, Any] | None:
        url = self.work("_stages", f"{stage}.json")
        return st.read_json(url, self.storage) if st.exists(url, self.storage) else None

    def finish(self, stage: str, result: dict[str, Any], seconds: float) -> dict[str, Any]:
        payload = {"stage": stage, "seconds": round(seconds, 3), **result}
        st.write_json_atomic(self.work("_stages", f"{stage}.json"), payload, self.storage)
        stop_if_asked(stage)
        return payload

    def stage(self, name: str, body) -> dict[str, Any]:
        """body()'s result, recorded with its seconds; a finished stage's recorded result."""
        result = self.done(name)
        if result is None:
            started = time.perf_counter()
            result = self.finish(name, body(), time.perf_counter() - started)
        return result


def stop_if_asked(stage: str) -> None:
    """Fault injection for the kill-and-resume tests: die without any cleanup."""
    if os.environ.get(STOP_ENV) == stage:
        print(f"{STOP_ENV}={stage}: stopping hard", flush=True)
        os._exit(STOP_EXIT_CODE)


def open_version(history: History, model: ModelIdentity, settings: Settings, kind: str) -> Version:
    """The model's version, created on first use; its fixed settings must not have changed."""
    version = history.version(model.model_id)
    info = version.create(model.dim, kind, {"card": model.spec, **settings.recorded()})
    recorded = {k: info["model"].get(k) for k in settings.recorded()}
    if recorded != settings.recorded():
        changed = sorted(k for k, v in settings.recorded().items() if recorded.get(k) != v)
        raise JobError(
            f"{version.url} was built with {', '.join(f'{k}={recorded[k]}' for k in changed)}; "
            f"this run asks for {', '.join(f'{k}={settings.recorded()[k]}' for k in changed)}. "
            "Pairs of one version must mean the same thing: restore the settings, or build a "
            "new version with `rdcd backfill`"
        )
    return version


def execute(run: Run) -> dict[str, Any]:
    """Apply the run to its version (or find it already applied); returns its summary row."""
    state = run.version.state()
    record = state.run(run.run_id)
    if record is not None:
        run.date = record.date
    else:
        if state.pending is not None and state.pending["run_id"] == run.run_id:
            run.date = state.pending["date"]  # a resumed run keeps the date it started with
        pending = state.claim(run.run_id, run.kind, run.date)
        run.version.save_state(state)
        first_id = int(pending["first_id"])
        bar = tqdm(total=len(STAGES) - 1, desc=run.run_id, unit="stage")
        listed = _stage(run, bar, "list", lambda: stage_list(run, state))
        _stage(run, bar, "embed", lambda: stage_embed(run, listed))
        ingested = _stage(run, bar, "ingest", lambda: stage_ingest(run, state, listed, first_id))
        indexed = _stage(run, bar, "index", lambda: stage_index(run, state, ingested))
        paired = _stage(run, bar, "pairs", lambda: stage_pairs(run, state, ingested, indexed))
        _stage(run, bar, "groups", lambda: stage_groups(run, state, ingested, paired))
        _stage(run, bar, "commit", lambda: stage_commit(run, listed, ingested, indexed, paired))
        bar.close()
    return finalize(run)


def _stage(run: Run, bar: tqdm, name: str, body) -> dict[str, Any]:
    bar.set_postfix_str(name)
    result = run.stage(name, body)
    bar.update(1)
    return result


# -- list -------------------------------------------------------------------------------------


def history_spans(state: State) -> list[Span]:
    return [Span(r.run_id, r.first_id, r.count) for r in state.runs]


KNOWN_COLUMNS = ["image_id", "content_hash", "bytes"]


def known_ids(run: Run, state: State, candidates: pa.Array) -> pa.Table:
    """image_id, content_hash, bytes of the candidates the history already holds (one id map
    file at a time, so memory stays bounded by one run's ids)."""
    found = [live_index.read_ids(run.version.url, [], run.storage, KNOWN_COLUMNS)]
    for span in history_spans(state):
        table = live_index.read_ids(run.version.url, [span], run.storage, KNOWN_COLUMNS)
        found.append(table.filter(pc.is_in(table["image_id"], value_set=candidates)))
    return pa.concat_tables(found)


def stage_list(run: Run, state: State) -> dict[str, Any]:
    """The input's inputs, and which of them the history lacks (by id, before reading any
    bytes, for folders; tar, Parquet and descriptors ids are only known once read: ingest
    diffs them). An input that already is a descriptors table (an `rdcd embed` output, or
    descriptors made elsewhere with the version's model) skips embedding."""
    from pipelines.index import find_descriptors
    from rdcd.sources import load_ids

    if not run.input_url:  # a replay of a run that admitted nothing
        return {"input": {}, "layout": "none", "listed": 0, "known": 0, "new": 0, "ids": None}
    descriptors = find_descriptors(run.input_url, run.storage)
    if descriptors is not None:
        return {
            "input": {"url": run.input_url, "layout": "descriptors"},
            "layout": "descriptors",
            "descriptors": descriptors,
            "listed": None,
            "known": None,
            "new": None,
            "ids": run.ids_url,
        }
    try:
        options = SourceOptions.from_config(run.config["input"])
        wanted = load_ids(run.ids_url, run.storage) if run.ids_url else None
        listing = list_inputs(run.input_url, options, run.storage, wanted)
    except SourceError as exc:
        raise JobError(str(exc)) from exc
    result: dict[str, Any] = {"input": listing.describe(max_objects=0), "layout": listing.layout}
    if listing.layout != "files":
        result.update(listed=None, known=None, new=None, ids=run.ids_url)
        return result
    sizes = pa.table(
        {
            "image_id": pa.array([rel for rel, _ in listing.objects], pa.string()),
            "bytes": pa.array([size for _, size in listing.objects], pa.int64()),
        }
    )
    _write_parquet(sizes, run.work("list", "sizes.parquet"), run.storage)
    ids = sizes["image_id"].combine_chunks()
    known = known_ids(run, state, ids)
    where = pc.index_in(known["image_id"], value_set=ids)
    unchanged = known.filter(
        pc.fill_null(pc.equal(known["bytes"], pc.take(sizes["bytes"], where)), True)
    )
    new = ids.filter(pc.invert(pc.is_in(ids, value_set=unchanged["image_id"])))
    result.update(
        listed=len(ids),
        known=unchanged.num_rows,
        changed=known.num_rows - unchanged.num_rows,
        new=len(new),
        ids=None,
    )
    if len(new) and (len(new) < len(ids) or wanted is not None):
        url = run.work("list", "new_ids.parquet")
        _write_parquet(pa.table({"image_id": new}), url, run.storage)
        result["ids"] = url
    return result


# -- embed ------------------------------------------------------------------------------------


def embed_url(run: Run) -> str:
    return run.work("embed")


def stage_embed(run: Run, listed: dict[str, Any]) -> dict[str, Any]:
    if listed["layout"] == "descriptors":
        return {"embedded": False, "reason": "the input is a descriptors table"}
    if listed["layout"] == "none":
        return {"embedded": False, "reason": "nothing to read"}
    if listed["new"] == 0:
        return {"embedded": False, "reason": "no new inputs"}
    from pipelines.embed import run_embed

    config = json.loads(json.dumps(run.config))
    config["model"]["card"] = run.model.spec
    summary = run_embed(run.input_url, embed_url(run), config, ids=listed["ids"])
    manifest = st.read_manifest(embed_url(run), run.storage) or {}
    check_model(manifest.get("model_id"), run.model.model_id, f"{embed_url(run)}/manifest.json")
    return {"embedded": True, "summary": summary, "counts": manifest.get("counts", {})}


# -- ingest -----------------------------------------------------------------------------------


def source_tables(run: Run, listed: dict[str, Any], name: str) -> list[str]:
    """The descriptors or errors files a run ingests: its embed output, or the input itself
    when that is a descriptors table (errors: a sibling errors/ folder, if any)."""
    if listed["layout"] == "none" or (listed["layout"] == "files" and not listed["new"]):
        return []
    if listed["layout"] != "descriptors":
        return _parquet_files(st.join(embed_url(run), name), run.storage)
    if name == "descriptors":
        return _parquet_files(listed["descriptors"], run.storage)
    parent = posixpath.dirname(listed["descriptors"].rstrip("/"))
    if listed["descriptors"].rstrip("/").endswith("/descriptors"):
        return _parquet_files(f"{parent}/errors", run.storage)
    return []


def _parquet_files(folder: str, storage: st.StorageOptions) -> list[str]:
    from pipelines.index import list_parquet

    return [url for url, _ in list_parquet(folder, storage)]


def _read_parquet(url: str, storage: st.StorageOptions, schema: pa.Schema | None = None):
    with st.get_filesystem(url, storage).open(st.strip_protocol(url), "rb") as handle:
        return pq.read_table(handle, schema=schema)


def _write_parquet(table: pa.Table, url: str, storage: st.StorageOptions) -> None:
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    st.write_bytes_atomic(url, buffer.getvalue(), storage)


def stage_ingest(run: Run, state: State, listed: dict[str, Any], first_id: int) -> dict[str, Any]:
    """Decide which embedded rows are new, number them first_id.., and write them out."""
    dim = run.model.dim
    schema = descriptors_schema(dim)
    tables = [
        _read_parquet(url, run.storage).select(schema.names).cast(schema)
        for url in source_tables(run, listed, "descriptors")
    ]
    rows = pa.concat_tables(tables) if tables else schema.empty_table()
    check_table_model(rows, run.model.model_id, f"descriptors of {run.input_url}")
    if listed["layout"] == "descriptors" and run.ids_url:
        from rdcd.sources import load_ids

        wanted = pa.array(sorted(load_ids(run.ids_url, run.storage)), pa.string())
        rows = rows.filter(pc.is_in(rows["image_id"], value_set=wanted))
    errors = [
        _read_parquet(url, run.storage).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
        for url in source_tables(run, listed, "errors")
    ]
    known = known_ids(run, state, rows["image_id"].combine_chunks())
    where = pc.index_in(rows["image_id"], value_set=known["image_id"])
    seen = pc.is_valid(where)
    same = pc.fill_null(
        pc.equal(pc.take(known["content_hash"], where), rows["content_hash"]), False
    )
    conflict = pc.and_(seen, pc.invert(same))
    conflicts = rows.filter(conflict)
    errors.append(
        pa.table(
            {
                "uri": conflicts["uri"],
                "image_id": conflicts["image_id"],
                "stage": pa.array(["id_conflict"] * conflicts.num_rows, pa.string()),
                "error": pa.array(
                    [
                        "the history holds this image_id with other content; image ids must be "
                        "immutable, so it is not embedded again (give the new image a new id)"
                    ]
                    * conflicts.num_rows,
                    pa.string(),
                ),
            },
            schema=ERRORS_SCHEMA,
        )
    )
    admitted = rows.filter(pc.invert(seen))
    count = admitted.num_rows
    if pc.count_distinct(admitted["image_id"]).as_py() != count:
        counts = pc.value_counts(admitted["image_id"]).to_pylist()
        repeated = [c["values"] for c in counts if c["counts"] > 1][:3]
        raise JobError(
            f"{run.input_url} holds image ids more than once (e.g. {repeated}); every image "
            "needs its own id (for tar sets whose keys repeat, set input.tar_id=shard_key)"
        )
    error_table = pa.concat_tables(errors)
    error_table = pa.table(
        {
            **{name: error_table[name] for name in ERRORS_SCHEMA.names},
            "run_id": pa.array([run.run_id] * error_table.num_rows, pa.string()),
            "model_id": pa.array([run.model.model_id] * error_table.num_rows, pa.string()),
        },
        schema=ERRORS_TABLE_SCHEMA,
    ).sort_by("image_id")
    _write_parquet(admitted, run.work("ingest", "descriptors.parquet"), run.storage)
    _write_parquet(error_table, run.work("ingest", "errors.parquet"), run.storage)
    if count:
        sizes = pa.nulls(count, pa.int64())
        if listed["layout"] == "files":
            listed_sizes = _read_parquet(run.work("list", "sizes.parquet"), run.storage)
            where = pc.index_in(admitted["image_id"], value_set=listed_sizes["image_id"])
            sizes = pc.take(listed_sizes["bytes"], where)
        ids = pa.table(
            {
                "row_id": pa.array(np.arange(first_id, first_id + count, dtype=np.int64)),
                "image_id": admitted["image_id"],
                "uri": admitted["uri"],
                "content_hash": admitted["content_hash"],
                "width": admitted["width"],
                "height": admitted["height"],
                "bytes": sizes,
            }
        )
        vectors = descriptor_matrix(admitted["descriptor"], np.float16)
        live_index.write_run_vectors(run.version.url, run.run_id, vectors, ids, run.storage)
    listed_count = listed["listed"]
    if listed_count is None:
        listed_count = rows.num_rows + sum(t.num_rows for t in errors[:-1])
    return {
        "first_id": first_id,
        "count": count,
        "listed": int(listed_count),
        "already_known": int(pc.sum(same).as_py() or 0) + int(listed["known"] or 0),
        "id_conflicts": conflicts.num_rows,
        "errors": error_table.num_rows,
    }


# -- index ------------------------------------------------------------------------------------


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
    return _wait(refs, "index: add parts")


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
    trained = ray.get(
        train_task.options(**task_options(run, gpu=True)).remote(
            run.version.url, generation, params.to_dict(), [vars(s) for s in spans], sample,
            run.model.dim, run.storage,
        )
    )  # fmt: skip
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


def _wait(refs: list, desc: str) -> list:
    results = {}
    pending = list(refs)
    with tqdm(total=len(refs), desc=desc, unit="task", leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                results[ref] = ray.get(ref)
                bar.update(1)
    return [results[ref] for ref in refs]


# -- pairs ------------------------------------------------------------------------------------


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
        _write_parquet(_pairs_with_rows(PAIRS_SCHEMA.empty_table()), url, run.storage)
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
    found = _wait(refs, "pairs: kNN + exact re-score")
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
    swap = pc.greater(ia, ib)
    table = pa.table(
        {
            "image_id_a": pc.if_else(swap, ib, ia),
            "image_id_b": pc.if_else(swap, ia, ib),
            "score": pa.array(s, pa.float32()),
            "exact": pa.array(exact, pa.bool_()),
            "run_id": pa.array([run.run_id] * len(a), pa.string()),
            "model_id": pa.array([run.model.model_id] * len(a), pa.string()),
            "row_a": pc.if_else(swap, pa.array(b), pa.array(a)),
            "row_b": pc.if_else(swap, pa.array(a), pa.array(b)),
        }
    ).sort_by([("image_id_a", "ascending"), ("image_id_b", "ascending")])
    _write_parquet(table, url, run.storage)
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


# -- groups -----------------------------------------------------------------------------------


def groups_url(run: Run) -> str:
    return run.version.sub("groups")


def stage_groups(
    run: Run, state: State, ingested: dict[str, Any], paired: dict[str, Any]
) -> dict[str, Any]:
    pairs = _read_parquet(paired["url"], run.storage)
    settings = run.settings
    ends = pa.concat_arrays(
        [pairs["image_id_a"].combine_chunks(), pairs["image_id_b"].combine_chunks()]
    )
    end_rows = np.concatenate([pairs["row_a"].to_numpy(), pairs["row_b"].to_numpy()]).astype(
        np.int64
    )
    old = group_updates.find_members(
        groups_url(run), pc.unique(ends), settings.group_buckets, run.storage
    )
    check_table_model(old, run.model.model_id, groups_url(run))
    unique_rows = np.unique(end_rows)
    spans = history_spans(state)
    new_images = pa.array([], pa.string())
    if ingested["count"]:
        spans.append(Span(run.run_id, int(ingested["first_id"]), int(ingested["count"])))
        new_images = live_index.read_ids(run.version.url, spans[-1:], run.storage, ["image_id"])
        new_images = new_images["image_id"].combine_chunks()
    attributes = live_index.lookup_rows(
        run.version.url, spans, unique_rows, run.storage, ["image_id", "width", "height", "bytes"]
    )
    attributes = attributes.filter(
        pc.invert(pc.is_in(attributes["image_id"], value_set=old["image_id"]))
    )
    sizes = attributes["bytes"]  # the listing's object size: what a stat would say
    if settings.file_sizes == "off" or "file_size" not in settings.keep_policy:
        sizes = pa.nulls(attributes.num_rows, pa.int64())
    attributes = attributes.drop_columns(["bytes"]).append_column("file_size", sizes)
    rows, changes, counts = group_updates.update(
        old,
        pairs.select(["image_id_a", "image_id_b"]),
        attributes,
        new_images,
        settings.keep_policy,
        run.model.model_id,
        run.run_id,
    )
    _write_parquet(old, run.work("groups", "old.parquet"), run.storage)
    _write_parquet(rows, run.work("groups", "rows.parquet"), run.storage)
    _write_parquet(changes, run.work("groups", "changes.parquet"), run.storage)
    return counts


# -- commit -----------------------------------------------------------------------------------


def publish_copy(source: str, target: str, storage: st.StorageOptions) -> None:
    """Copy a finished work file to its published place atomically (overwrites: idempotent)."""
    with st.get_filesystem(source, storage).open(st.strip_protocol(source), "rb") as handle:
        st.write_bytes_atomic(target, handle.read(), storage)


def stage_commit(
    run: Run,
    listed: dict[str, Any],
    ingested: dict[str, Any],
    indexed: dict[str, Any],
    paired: dict[str, Any],
) -> dict[str, Any]:
    """Publish the date partitions and the touched group buckets, then write the ledger."""
    name = f"{run.run_id}.parquet"
    version = run.version
    publish_copy(
        run.work("ingest", "descriptors.parquet"),
        st.join(version.table("descriptors", run.date), name),
        run.storage,
    )
    publish_copy(
        run.work("ingest", "errors.parquet"),
        st.join(version.table("errors", run.date), name),
        run.storage,
    )
    pairs = _read_parquet(paired["url"], run.storage).drop_columns(["row_a", "row_b"])
    _write_parquet(
        pairs.cast(PAIRS_SCHEMA), st.join(version.table("pairs", run.date), name), run.storage
    )
    publish_copy(
        run.work("groups", "changes.parquet"),
        st.join(version.table("group_changes", run.date), name),
        run.storage,
    )
    stop_if_asked("commit:tables")
    old = _read_parquet(run.work("groups", "old.parquet"), run.storage)
    rows = _read_parquet(run.work("groups", "rows.parquet"), run.storage)
    buckets = group_updates.apply(
        groups_url(run), old, rows, run.settings.group_buckets, run.storage
    )
    stop_if_asked("commit:groups")
    state = version.state()
    if state.run(run.run_id) is None:
        if state.pending is None or state.pending["run_id"] != run.run_id:
            raise HistoryError(f"{run.run_id} lost its claim on the ledger; re-run it")
        state.runs.append(
            RunRecord(
                run_id=run.run_id,
                kind=run.kind,
                date=run.date,
                first_id=int(ingested["first_id"]),
                count=int(ingested["count"]),
                input=run.input_url,
                summary={"listed": listed["input"], "settings": run.settings.recorded()},
            )
        )
        state.index = indexed["index"]
        state.pending = None
        version.save_state(state)
    return {"buckets_rewritten": buckets}


# -- finalize ---------------------------------------------------------------------------------


def finalize(run: Run) -> dict[str, Any]:
    """The run-summary row and manifest; also what a re-run of a finished run returns (it
    writes them again if a crash came between the ledger and them)."""
    state = run.version.state()
    record = state.run(run.run_id)
    if record is None:
        raise HistoryError(f"{run.run_id} is not in the ledger of {run.version.url}")
    manifest_url = run.work("manifest.json")
    if st.exists(manifest_url, run.storage) and runlog.has_run(
        run.history.runs_url, record.date, run.run_id, run.storage
    ):
        manifest = st.read_json(manifest_url, run.storage)
        return {**manifest["summary"], "already_complete": True}
    stages = {name: run.done(name) or {} for name in STAGES[:-1]}
    ingested = stages["ingest"]
    indexed, paired, grouped = stages["index"], stages["pairs"], stages["groups"]
    seconds = {name: float(stage.get("seconds", 0.0)) for name, stage in stages.items()}
    counts = {
        "inputs_listed": ingested.get("listed", 0),
        "already_known": ingested.get("already_known", 0),
        "new_images": record.count,
        "errors": ingested.get("errors", 0),
        "history_images": record.first_id + record.count,
        "pairs": paired.get("pairs", 0),
        "exact_pairs": paired.get("exact_pairs", 0),
        **{
            k: grouped.get(k, 0)
            for k in ("groups_new", "groups_changed", "groups_merged", "images_joined_groups")
        },
    }
    drift_report = indexed.get("drift", {})
    row = runlog.summary_row(
        run_id=run.run_id,
        kind=record.kind,
        model_id=run.model.model_id,
        finished_at=state.updated,
        counts=counts,
        drift={
            "retrained": drift_report.get("retrained", False),
            "imbalance": drift_report.get("imbalance"),
            "quantisation_ratio": drift_report.get("quantisation_ratio"),
        },
        wall_s=sum(seconds.values()),
        stage_seconds=seconds,
        hardware=run.settings.hardware,
        usd_per_hour=run.settings.usd_per_hour,
    )
    runlog.write_run(run.history.runs_url, record.date, row, run.storage)
    placement = {}
    for stage in stages.values():
        placement.update(stage.get("placement", {}))
    manifest = {
        "status": "complete",
        "job": run.kind,
        "run_id": run.run_id,
        "date": run.date,
        "model_id": run.model.model_id,
        "input": run.input_url,
        "counts": counts,
        "drift": drift_report,
        "index": {k: v for k, v in state.index.items() if k != "parts"}
        | {"parts": len(state.index.get("parts", []))},
        "placement": placement,
        "timings": seconds,
        "summary": row,
        "config": _redacted(run.config),
    }
    st.write_manifest(run.work(), manifest, run.storage)
    collect_garbage(run, state)
    return row


def collect_garbage(run: Run, state: State) -> None:
    """Remove index generations and parts the ledger no longer references."""
    fs = st.get_filesystem(run.version.url, run.storage)
    root = st.strip_protocol(live_index.index_url(run.version.url))
    if not state.index or not fs.exists(root):
        return
    live = int(state.index["generation"])
    names = {p["name"] for p in state.index.get("parts", [])}
    fs.invalidate_cache()
    for path in fs.ls(root, detail=False):
        base = posixpath.basename(path.rstrip("/"))
        if base.startswith("gen-") and base != f"gen-{live:04d}":
            fs.rm(path, recursive=True)
    parts_dir = f"{root}/gen-{live:04d}/parts"
    if fs.exists(parts_dir):
        for path in fs.ls(parts_dir, detail=False):
            stem = posixpath.basename(path).split(".", 1)[0]
            if stem not in names:
                fs.rm(path)


def _redacted(config: dict[str, Any]) -> dict[str, Any]:
    recorded = json.loads(json.dumps(config, default=str))
    for key in ("key", "secret"):
        if recorded.get("storage", {}).get(key):
            recorded["storage"][key] = "***"
    return recorded
