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

import json
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from pipelines.increment_search import stage_index, stage_pairs
from pipelines.jobs import JobError
from pipelines.run_frame import (
    STAGES,
    Run,
    history_spans,
    read_parquet,
    stop_if_asked,
    write_parquet,
)
from rdcd import group_updates, live_index, runlog
from rdcd import storage as st
from rdcd.history import HistoryError, RunRecord, State, check_model, check_table_model
from rdcd.live_index import Span
from rdcd.sources import SourceError, SourceOptions, list_inputs
from rdcd.tables import ERRORS_SCHEMA, PAIRS_SCHEMA, descriptor_matrix, descriptors_schema

ERRORS_TABLE_SCHEMA = pa.schema(
    [*ERRORS_SCHEMA, pa.field("run_id", pa.string()), pa.field("model_id", pa.string())]
)


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
    write_parquet(sizes, run.work("list", "sizes.parquet"), run.storage)
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
        write_parquet(pa.table({"image_id": new}), url, run.storage)
        result["ids"] = url
    return result


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


def stage_ingest(run: Run, state: State, listed: dict[str, Any], first_id: int) -> dict[str, Any]:
    """Decide which embedded rows are new, number them first_id.., and write them out."""
    dim = run.model.dim
    schema = descriptors_schema(dim)
    tables = [
        read_parquet(url, run.storage).select(schema.names).cast(schema)
        for url in source_tables(run, listed, "descriptors")
    ]
    rows = pa.concat_tables(tables) if tables else schema.empty_table()
    check_table_model(rows, run.model.model_id, f"descriptors of {run.input_url}")
    if listed["layout"] == "descriptors" and run.ids_url:
        from rdcd.sources import load_ids

        wanted = pa.array(sorted(load_ids(run.ids_url, run.storage)), pa.string())
        rows = rows.filter(pc.is_in(rows["image_id"], value_set=wanted))
    errors = [
        read_parquet(url, run.storage).select(ERRORS_SCHEMA.names).cast(ERRORS_SCHEMA)
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
    write_parquet(admitted, run.work("ingest", "descriptors.parquet"), run.storage)
    write_parquet(error_table, run.work("ingest", "errors.parquet"), run.storage)
    if count:
        sizes = pa.nulls(count, pa.int64())
        if listed["layout"] == "files":
            listed_sizes = read_parquet(run.work("list", "sizes.parquet"), run.storage)
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


def groups_url(run: Run) -> str:
    return run.version.sub("groups")


def stage_groups(
    run: Run, state: State, ingested: dict[str, Any], paired: dict[str, Any]
) -> dict[str, Any]:
    pairs = read_parquet(paired["url"], run.storage)
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
    write_parquet(old, run.work("groups", "old.parquet"), run.storage)
    write_parquet(rows, run.work("groups", "rows.parquet"), run.storage)
    write_parquet(changes, run.work("groups", "changes.parquet"), run.storage)
    return counts


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
    pairs = read_parquet(paired["url"], run.storage).drop_columns(["row_a", "row_b"])
    write_parquet(
        pairs.cast(PAIRS_SCHEMA), st.join(version.table("pairs", run.date), name), run.storage
    )
    publish_copy(
        run.work("groups", "changes.parquet"),
        st.join(version.table("group_changes", run.date), name),
        run.storage,
    )
    stop_if_asked("commit:tables")
    old = read_parquet(run.work("groups", "old.parquet"), run.storage)
    rows = read_parquet(run.work("groups", "rows.parquet"), run.storage)
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
