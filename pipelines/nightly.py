"""`rdcd nightly --config FILE [--date D]`: the day's new images against the whole history.

Embeds only inputs the history lacks, adds them to the live index with the already-trained
quantizer (a new generation only when drift says so), finds new x history and new x new
pairs, updates the groups they touch, and appends the date partitions

    HISTORY/versions/<model_id>/pairs/date=D/<run_id>.parquet      (also descriptors, errors,
    HISTORY/versions/<model_id>/groups/bucket=NNNN/part.parquet     group_changes)
    HISTORY/runs/date=D/<run_id>.parquet                            (the run-summary row)

The stages are in pipelines/increment.py (index and pairs: pipelines/increment_search.py). A
date already in the ledger is a no-op; a run killed anywhere resumes when re-run. Submit it to
a cluster with `ray job submit` (see README, "Operations").
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from pipelines import increment
from pipelines.jobs import JobError, module_main
from pipelines.run_frame import ModelIdentity, Run, Settings, model_identity, open_version
from rdcd import storage as st
from rdcd.history import History, HistoryError, parse_date

COMMAND = "nightly"
HELP = (
    "Incremental dedup of one day's new images against the history: embed only what is new, "
    "add to the index, pairs new x history, update groups, append date partitions."
)
_RUN_ID = re.compile(r"[^A-Za-z0-9_-]+")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--date", help="run date YYYY-MM-DD (default: nightly.date, else today UTC)"
    )
    parser.add_argument(
        "--input", help="the day's input URL (default: nightly.input; {date} is filled in)"
    )


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    if args.input:
        config["nightly"]["input"] = args.input
    if args.date:
        config["nightly"]["date"] = args.date
    row = run_nightly(config)
    return summary_lines(row, config)


def run_id_for(kind: str, label: str) -> str:
    """A run id safe as a file name: '<kind>-<label>' with anything odd replaced by '-'."""
    return _RUN_ID.sub("-", f"{kind}-{label}").strip("-")


def prepare(
    config: dict[str, Any], kind: str, model_spec: str | None = None
) -> tuple[History, ModelIdentity, Settings]:
    """History, model identity and settings for a run; clear errors for missing settings."""
    storage = st.StorageOptions.from_config(config["storage"])
    history_url = config["nightly"]["history"]
    if not history_url:
        raise JobError("nightly.history is not set: the URL where the history lives")
    spec = str(model_spec or config["model"]["card"])
    model = model_identity(spec, storage)
    config["model"]["card"] = spec
    threshold = config["match"]["threshold"]
    if threshold is None:
        threshold = model.threshold
    if threshold is None:
        raise JobError(
            f"match.threshold is not set and model card {spec!r} recommends none; set one"
        )
    try:
        settings = Settings.from_config(config, threshold)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    return History(history_url, storage), model, settings


def run_nightly(config: dict[str, Any]) -> dict[str, Any]:
    """One night: the ledger's no-op for a date already applied, else the stages."""
    try:
        date = parse_date(config["nightly"]["date"])
    except HistoryError as exc:
        raise JobError(str(exc)) from exc
    template = config["nightly"]["input"]
    if not template:
        raise JobError("nightly.input is not set: the URL of the day's images ({date} allowed)")
    history, model, settings = prepare(config, "nightly")
    current = history.current_model()
    if current is not None and current != model.model_id:
        raise JobError(
            f"the history's current version is {current}, but model.card is {model.model_id}; "
            "nightly runs append to the current version. Use its model card, or build and "
            "switch to the new model with `rdcd backfill`"
        )
    version = open_version(history, model, settings, "nightly")
    run = Run(
        config=config,
        storage=history.storage,
        history=history,
        version=version,
        model=model,
        settings=settings,
        run_id=run_id_for("nightly", date),
        kind="nightly",
        date=date,
        input_url=template.replace("{date}", date),
    )
    try:
        row = increment.execute(run)
    except HistoryError as exc:
        raise JobError(str(exc)) from exc
    if current is None:
        version.mark("complete", built_by=run.run_id)
        history.switch(model.model_id, f"first run {run.run_id}")
    return row


def summary_lines(row: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The one-screen summary of a run-summary row."""
    lines = {
        "run": row["run_id"]
        + ("  (already complete: nothing to do)" if row.get("already_complete") else ""),
        "model": row["model_id"],
        "inputs listed / already known": f"{row['inputs_listed']:,} / {row['already_known']:,}",
        "new images": row["new_images"],
        "errors": row["errors"],
        "history images": row["history_images"],
        "new pairs (exact)": f"{row['pairs']:,} ({row['exact_pairs']:,})",
        "groups new / changed / merged": (
            f"{row['groups_new']:,} / {row['groups_changed']:,} / {row['groups_merged']:,}"
        ),
        "duplicate rate": f"{row['duplicate_rate']:.2%}",
        "index retrained": row["index_retrained"],
        "images/s": round(row["images_per_s"] or 0.0, 1),
        "cost per million images": (
            f"${row['cost_per_million_usd']:.2f} at ${row['usd_per_hour']}/h ({row['hardware']})"
            if row["cost_per_million_usd"] is not None
            else "n/a (no new images)"
        ),
        "history": config["nightly"]["history"],
    }
    return lines


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
