"""The run-summary table: one Parquet row per nightly or backfill run, for trend queries.

Rows live at HISTORY/runs/date=D/<run_id>.parquet (one file per run, rewritten whole, so a
re-run replaces its row instead of adding a second), and DuckDB reads the trend with

    SELECT date, new_images, duplicate_rate, cost_per_million_usd
    FROM read_parquet('HISTORY/runs/*/*.parquet', hive_partitioning = true) ORDER BY date;
"""

from __future__ import annotations

import io
import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rdcd import storage as st

RUNS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),
        ("model_id", pa.string()),
        ("finished_at", pa.string()),
        ("inputs_listed", pa.int64()),
        ("already_known", pa.int64()),
        ("new_images", pa.int64()),
        ("errors", pa.int64()),
        ("history_images", pa.int64()),
        ("pairs", pa.int64()),
        ("exact_pairs", pa.int64()),
        ("groups_new", pa.int64()),
        ("groups_changed", pa.int64()),
        ("groups_merged", pa.int64()),
        ("images_joined_groups", pa.int64()),
        ("duplicate_rate", pa.float64()),
        ("index_retrained", pa.bool_()),
        ("index_imbalance", pa.float64()),
        ("quantisation_ratio", pa.float64()),
        ("wall_s", pa.float64()),
        ("images_per_s", pa.float64()),
        ("hardware", pa.string()),
        ("usd_per_hour", pa.float64()),
        ("cost_usd", pa.float64()),
        ("cost_per_million_usd", pa.float64()),
        ("stage_seconds", pa.string()),
    ]
)
"""Columns of the runs table. The date is the hive partition. duplicate_rate is the share of
the run's new images that ended up in a duplicate group; cost is wall time x the configured
hardware price, and cost_per_million_usd scales it to a million new images."""


def cost_fields(wall_s: float, new_images: int, usd_per_hour: float) -> dict[str, float | None]:
    """Throughput and cost of a run on hardware billed at usd_per_hour (the whole cluster)."""
    cost = wall_s / 3600.0 * usd_per_hour
    return {
        "images_per_s": new_images / wall_s if wall_s > 0 else None,
        "cost_usd": cost,
        "cost_per_million_usd": cost / new_images * 1e6 if new_images else None,
    }


def summary_row(
    *,
    run_id: str,
    kind: str,
    model_id: str,
    finished_at: str,
    counts: dict[str, int],
    drift: dict[str, Any],
    wall_s: float,
    stage_seconds: dict[str, float],
    hardware: str,
    usd_per_hour: float,
) -> dict[str, Any]:
    """A RUNS_SCHEMA row from a run's counts, drift report and timings."""
    new = int(counts.get("new_images", 0))
    joined = int(counts.get("images_joined_groups", 0))
    return {
        "run_id": run_id,
        "kind": kind,
        "model_id": model_id,
        "finished_at": finished_at,
        **{
            name: int(counts.get(name, 0))
            for name in (
                "inputs_listed",
                "already_known",
                "new_images",
                "errors",
                "history_images",
                "pairs",
                "exact_pairs",
                "groups_new",
                "groups_changed",
                "groups_merged",
                "images_joined_groups",
            )
        },
        "duplicate_rate": joined / new if new else 0.0,
        "index_retrained": bool(drift.get("retrained", False)),
        "index_imbalance": drift.get("imbalance"),
        "quantisation_ratio": drift.get("quantisation_ratio"),
        "wall_s": float(wall_s),
        **cost_fields(wall_s, new, usd_per_hour),
        "hardware": hardware,
        "usd_per_hour": float(usd_per_hour),
        "stage_seconds": json.dumps({k: round(v, 3) for k, v in stage_seconds.items()}),
    }


def run_url(runs_url: str, date: str, run_id: str) -> str:
    return st.join(runs_url, f"date={date}", f"{run_id}.parquet")


def write_run(
    runs_url: str, date: str, row: dict[str, Any], storage: st.StorageOptions | None = None
) -> str:
    """Write (or replace) the run's one-row file atomically; returns its URL."""
    table = pa.Table.from_pylist([row], schema=RUNS_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    url = run_url(runs_url, date, row["run_id"])
    st.write_bytes_atomic(url, buffer.getvalue(), storage)
    return url


def has_run(runs_url: str, date: str, run_id: str, storage: st.StorageOptions | None = None):
    return st.exists(run_url(runs_url, date, run_id), storage)


def read_runs(runs_url: str, storage: st.StorageOptions | None = None) -> pa.Table:
    """Every run row with its date, oldest first (for reports and tests; DuckDB for ad hoc)."""
    fs = st.get_filesystem(runs_url, storage)
    root = st.strip_protocol(runs_url)
    fs.invalidate_cache()
    if not fs.exists(root):
        return RUNS_SCHEMA.append(pa.field("date", pa.string())).empty_table()
    tables = []
    for path in sorted(fs.glob(f"{root}/date=*/*.parquet")):
        date = path.rsplit("/date=", 1)[1].split("/", 1)[0]
        with fs.open(path, "rb") as handle:
            table = pq.read_table(handle, schema=RUNS_SCHEMA)
        tables.append(table.append_column("date", pa.array([date] * table.num_rows, pa.string())))
    if not tables:
        return RUNS_SCHEMA.append(pa.field("date", pa.string())).empty_table()
    return pa.concat_tables(tables).sort_by([("date", "ascending"), ("finished_at", "ascending")])
