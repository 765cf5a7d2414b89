"""`rdcd backfill --config FILE`: move the history to a new model, or add a new source.

Model change (model.card names a model the history's current version does not use):

    HISTORY/versions/<old model>/     read only: nothing here is changed, before or after
    HISTORY/versions/<new model>/     built run by run, replaying the old ledger in order with
                                      the new model: the same run ids, dates and image ids
                                      (re-embedded from each run's recorded input), so every
                                      index, pairs and groups table is recomputed
    HISTORY/current.json              switched atomically once the new version has caught up
                                      with every run of the old one (runs that arrive while
                                      the backfill works are replayed before the switch)

Every replayed run is an incremental run (pipelines/increment.py): resumable per stage and a
no-op once in the new ledger, so a killed backfill continues where it stopped.

New source (--source URL): one incremental run, `source-<name>`, that adds the source's images
to the current version: embedded, indexed, paired against the whole history, grouped.
"""

from __future__ import annotations

import argparse
import posixpath
import sys
from typing import Any

from tqdm import tqdm

from pipelines import increment
from pipelines.jobs import JobError, module_main
from pipelines.nightly import prepare, run_id_for, summary_lines
from pipelines.run_frame import ModelIdentity, Run, Settings, open_version
from rdcd import live_index
from rdcd.history import History, HistoryError, parse_date

COMMAND = "backfill"
HELP = (
    "Build the history's version for a new model (re-embed every run side by side, switch "
    "`current` when complete), or add a newly added source to the current version."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model card of the new version (overrides model.card)")
    parser.add_argument(
        "--source", help="a newly added source to ingest (overrides backfill.source)"
    )
    parser.add_argument("--name", help="run name of the source (default: its last path part)")
    parser.add_argument("--date", help="date partition of a source run (default: today UTC)")
    parser.add_argument(
        "--no-switch", action="store_true", help="build the new version but keep `current`"
    )


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    if args.model:
        config["model"]["card"] = args.model
    if args.source:
        config["backfill"]["source"] = args.source
    if args.name:
        config["backfill"]["name"] = args.name
    if args.date:
        config["nightly"]["date"] = args.date
    if args.no_switch:
        config["backfill"]["switch"] = False
    if config["backfill"]["source"]:
        return summary_lines(run_source(config), config)
    return run_model_backfill(config)


def run_source(config: dict[str, Any]) -> dict[str, Any]:
    """Add a new source to the current version as one incremental run."""
    source = str(config["backfill"]["source"])
    try:
        date = parse_date(config["nightly"]["date"])
    except HistoryError as exc:
        raise JobError(str(exc)) from exc
    history, model, settings = prepare(config, "source")
    current = history.current_model()
    if current is not None and current != model.model_id:
        raise JobError(
            f"the current version is {current} but model.card is {model.model_id}: a source is "
            "added to the current version with its own model"
        )
    name = config["backfill"]["name"] or posixpath.basename(source.rstrip("/")) or "source"
    version = open_version(history, model, settings, "source")
    run = Run(
        config=config,
        storage=history.storage,
        history=history,
        version=version,
        model=model,
        settings=settings,
        run_id=run_id_for("source", name),
        kind="source",
        date=date,
        input_url=source,
    )
    try:
        row = increment.execute(run)
    except HistoryError as exc:
        raise JobError(str(exc)) from exc
    if current is None:
        version.mark("complete", built_by=run.run_id)
        history.switch(model.model_id, f"first run {run.run_id}")
    return row


def replay_run(
    config: dict[str, Any],
    history: History,
    old_url: str,
    target: increment.Version,
    model: ModelIdentity,
    settings: Settings,
    record,
) -> dict[str, Any]:
    """One run of the old ledger, applied to the new version: the same run id, date and
    admitted image ids, re-embedded from the run's recorded input with the new model."""
    if record.summary.get("listed", {}).get("layout") == "descriptors" and record.count:
        raise JobError(
            f"run {record.run_id} ingested a descriptors table ({record.input}), not images: "
            "a new model cannot re-embed it; re-run it from its images as a source instead"
        )
    run = Run(
        config=config,
        storage=history.storage,
        history=history,
        version=target,
        model=model,
        settings=settings,
        run_id=record.run_id,
        kind=record.kind,
        date=record.date,
        input_url=record.input if record.count else "",
        ids_url=live_index.ids_url(old_url, record.run_id) if record.count else None,
    )
    return increment.execute(run)


def run_model_backfill(config: dict[str, Any]) -> dict[str, Any]:
    """Replay the current version's ledger with model.card's model, then switch."""
    history, model, settings = prepare(config, "backfill")
    current = history.current_model()
    if current is None:
        raise JobError("the history has no current version yet: run `rdcd nightly` first")
    if current == model.model_id:
        return {
            "status": f"nothing to do: the current version already is {current}",
            "history": config["nightly"]["history"],
        }
    old = history.version(current)
    target = open_version(history, model, settings, "backfill")
    replayed, images, pairs = 0, 0, 0
    while True:
        old_state = old.state()
        if old_state.pending is not None:
            raise JobError(
                f"run {old_state.pending['run_id']} of the current version is unfinished; "
                "finish it (re-run it) before backfilling"
            )
        done = {run.run_id for run in target.state().runs}
        missing = [record for record in old_state.runs if record.run_id not in done]
        if not missing:
            break
        for record in tqdm(missing, desc=f"backfill {model.model_id}", unit="run"):
            try:
                row = replay_run(config, history, old.url, target, model, settings, record)
            except HistoryError as exc:
                raise JobError(str(exc)) from exc
            replayed += 1
            images += int(row["new_images"])
            pairs += int(row["pairs"])
    state = target.state()
    lost = {
        record.run_id: record.count - state.run(record.run_id).count
        for record in old.state().runs
        if state.run(record.run_id).count != record.count
    }
    target.mark("complete", replayed_from=current, runs=len(state.runs), images=state.total)
    switched = None
    if config["backfill"]["switch"]:
        switched = history.switch(model.model_id, f"backfill from {current}")
    return {
        "new version": target.url,
        "replaced version": old.url + ("" if switched else " (still current)"),
        "runs replayed now / in version": f"{replayed} / {len(state.runs)}",
        "images in new version": state.total,
        "images re-embedded now": images,
        "pairs found now": pairs,
        "images not re-embedded (per run)": lost or "none",
        "current": switched["model_id"] if switched else current,
    }


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
