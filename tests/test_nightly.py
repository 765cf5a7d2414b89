"""`rdcd nightly`: three nights of real photos equal one batch run, kill-and-resume in every
stage, re-runs are no-ops, and the tables read back with DuckDB."""

from __future__ import annotations

import copy
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
from nightly_data import (
    EXACT,
    NIGHTS,
    PLANTED,
    config_for,
    model_card,
    write_config,
    write_nights,
)

from pipelines import run_frame
from pipelines.dedup import run_dedup
from pipelines.jobs import JobError
from pipelines.nightly import run_nightly
from rdcd import drift, group_updates, runlog
from rdcd.config import load_config
from rdcd.history import History, HistoryError, ModelMismatchError, State, check_table_model
from rdcd.storage import StorageOptions

REPO = Path(__file__).resolve().parent.parent
GROUP_COLUMNS = "image_id, group_id, group_size, is_keeper, keep_reason"
pytestmark = pytest.mark.timeout(600)


def night_config(base: dict, date: str) -> dict:
    config = copy.deepcopy(base)
    config["nightly"]["date"] = date
    return config


def tree_digest(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> sha256 of every file under folder (the published history)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not any(part in skip for part in p.relative_to(folder).parts)
    }


def version_dir(history: Path) -> Path:
    (version,) = (history / "versions").iterdir()
    return version


def published(history: Path) -> dict[str, list[tuple]]:
    """The history's user-facing tables, read back with DuckDB (hive partitions)."""
    v = version_dir(history)
    sql = {
        "pairs": f"SELECT image_id_a, image_id_b, round(score, 5), exact, run_id, model_id, "
        f"CAST(date AS VARCHAR) FROM read_parquet('{v}/pairs/*/*.parquet', "
        "hive_partitioning = true) ORDER BY ALL",
        "groups": f"SELECT {GROUP_COLUMNS}, model_id FROM "
        f"read_parquet('{v}/groups/*/*.parquet', hive_partitioning = true) ORDER BY ALL",
        "changes": f"SELECT {GROUP_COLUMNS}, previous_group_id, change, run_id, "
        f"CAST(date AS VARCHAR) FROM read_parquet('{v}/group_changes/*/*.parquet', "
        "hive_partitioning = true) ORDER BY ALL",
        "descriptors": f"SELECT image_id, content_hash, model_id, CAST(date AS VARCHAR) FROM "
        f"read_parquet('{v}/descriptors/*/*.parquet', hive_partitioning = true) ORDER BY ALL",
        "errors": f"SELECT image_id, stage, CAST(date AS VARCHAR) FROM "
        f"read_parquet('{v}/errors/*/*.parquet', hive_partitioning = true) ORDER BY ALL",
    }
    return {name: duckdb.sql(query).fetchall() for name, query in sql.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session):
    """Three nights applied in order, and one batch `rdcd dedup` over every image."""
    models = tmp_path_factory.getbasetemp() / "nightly-models"
    card = model_card(models, "a", seed=0)
    root = tmp_path_factory.mktemp("nightly")
    paths = write_nights(root)
    config = config_for(card, str(root / "history"), str(paths["incoming"]))
    rows = [run_nightly(night_config(config, date)) for date in NIGHTS]
    run_dedup(str(paths["all"]), str(root / "batch"), copy.deepcopy(config))
    return {"root": root, "card": card, "models": models, "config": config, "rows": rows, **paths}


def test_three_nights_equal_one_batch_run(world):
    history, batch = world["root"] / "history", world["root"] / "batch"
    tables = published(history)
    nightly_pairs = {(a, b): (score, exact) for a, b, score, exact, *_ in tables["pairs"]}
    batch_pairs = {
        (a, b): (score, exact)
        for a, b, score, exact in duckdb.sql(
            f"SELECT image_id_a, image_id_b, round(score, 5), exact "
            f"FROM read_parquet('{batch}/pairs/*.parquet')"
        ).fetchall()
    }
    assert PLANTED <= set(nightly_pairs)
    assert nightly_pairs.keys() == batch_pairs.keys()
    for pair, (score, exact) in nightly_pairs.items():
        assert score == pytest.approx(batch_pairs[pair][0], abs=1e-4)
        assert exact == batch_pairs[pair][1] == (pair in EXACT)
    batch_groups = duckdb.sql(
        f"SELECT {GROUP_COLUMNS} FROM read_parquet('{batch}/groups/*.parquet') ORDER BY ALL"
    ).fetchall()
    assert [row[:5] for row in tables["groups"]] == batch_groups
    by_image = {row[0]: row for row in batch_groups}
    assert by_image["c001_resize.jpg"][1] == by_image["p001.jpg"][1]  # joined across 3 nights
    assert by_image["p001.jpg"][3]  # the uncropped, larger original is the keeper


def test_pairs_are_date_partitioned_and_groups_stay_stable(world):
    tables = published(world["root"] / "history")
    by_date = {}
    for a, b, _, _, run_id, _, date in tables["pairs"]:
        by_date.setdefault(date, set()).add((a, b))
        assert run_id == f"nightly-{date}"
    assert by_date[NIGHTS[0]] == {("p003.jpg", "p003_copy.jpg")}
    assert {("c001_crop.jpg", "p001.jpg"), ("c009_jpeg.jpg", "p009.jpg")} <= by_date[NIGHTS[1]]
    assert {("c001_resize.jpg", "p001.jpg"), ("c010_crop.jpg", "p010.jpg")} <= by_date[NIGHTS[2]]
    changes = {(row[0], row[-1]): row for row in tables["changes"]}
    night3_join = changes[("c001_resize.jpg", NIGHTS[2])]
    assert night3_join[6] == "joined"
    first_group = changes[("p003.jpg", NIGHTS[0])][1]
    untouched = {row[1] for row in tables["groups"] if row[0] == "p003.jpg"}
    assert untouched == {first_group}  # never touched again: same id three nights later
    assert ("p003.jpg", NIGHTS[2]) not in changes


def test_every_row_carries_the_model_and_errors_are_kept(world):
    tables = published(world["root"] / "history")
    model_id = world["rows"][0]["model_id"]
    assert {row[5] for row in tables["pairs"]} == {model_id}
    assert {row[5] for row in tables["groups"]} == {model_id}
    assert {row[2] for row in tables["descriptors"]} == {model_id}
    ids = [row[0] for row in tables["descriptors"]]
    assert len(ids) == len(set(ids)) == len(list((world["all"]).iterdir())) - 1  # broken.jpg
    errors = {(image_id, stage) for image_id, stage, _ in tables["errors"]}
    assert ("broken.jpg", "decode") in errors
    assert ("p011.jpg", "id_conflict") in errors  # re-delivered with other content


def test_run_summaries_form_a_queryable_table(world):
    rows = world["rows"]
    assert [r["new_images"] for r in rows] == [9, 6, 6]
    assert [r["errors"] for r in rows] == [0, 1, 1]
    assert rows[2]["already_known"] == 1  # p008 delivered again, unchanged: not re-embedded
    assert rows[2]["history_images"] == 21
    assert rows[1]["groups_new"] == 2 and rows[2]["groups_changed"] >= 1
    assert rows[0]["index_retrained"] and not rows[1]["index_retrained"]
    runs = world["root"] / "history" / "runs"
    trend = duckdb.sql(
        f"SELECT CAST(date AS VARCHAR), new_images, pairs, duplicate_rate, wall_s "
        f"FROM read_parquet('{runs}/*/*.parquet', hive_partitioning = true) ORDER BY date"
    ).fetchall()
    assert [t[0] for t in trend] == list(NIGHTS)
    assert [t[1] for t in trend] == [9, 6, 6]
    assert trend[0][3] == pytest.approx(2 / 9)
    assert all(t[4] > 0 for t in trend)
    stored = runlog.read_runs(str(runs))
    assert stored.num_rows == 3 and set(stored.schema.names) >= set(runlog.RUNS_SCHEMA.names)


def test_rerunning_a_date_is_a_no_op(world):
    history = world["root"] / "history"
    before = tree_digest(history)
    row = run_nightly(night_config(world["config"], NIGHTS[1]))
    assert row["already_complete"] and row["new_images"] == 6
    assert tree_digest(history) == before


def test_mixing_models_is_a_clear_error(world, tmp_path):
    history = History(str(world["root"] / "history"), StorageOptions())
    version = history.version(world["rows"][0]["model_id"])
    foreign = pa.table({"model_id": ["rdcd-other-1"], "image_id": ["x"]})
    with pytest.raises(ModelMismatchError, match="never mixed"):
        check_table_model(foreign, version.model_id, "a table")
    stricter = night_config(world["config"], "2026-11-04")
    stricter["match"]["threshold"] = 0.7
    with pytest.raises(JobError, match="threshold=0.6"):
        run_nightly(stricter)  # pairs of one version must all mean the same thing
    other = model_card(world["models"], "b", seed=1)
    config = night_config(world["config"], "2026-11-04")
    config["model"]["card"] = other
    with pytest.raises(JobError, match="backfill"):
        run_nightly(config)


def test_killed_in_every_stage_resumes_to_the_same_result(world, tmp_path, ray_session):
    """Night 2 run as a real process that exits hard after each stage in turn, each run
    resuming the previous one; then night 3 runs normally. The history must equal the one
    three clean nights wrote."""
    history = tmp_path / "history"
    config = config_for(world["card"], str(history), str(world["incoming"]))
    run_nightly(night_config(config, NIGHTS[0]))
    config_file = write_config(
        tmp_path / "nightly.yaml", world["card"], str(history), str(world["incoming"])
    )
    address = ray_session.get_runtime_context().gcs_address
    command = [
        sys.executable, "-m", "pipelines.nightly", "--config", str(config_file),
        "--date", NIGHTS[1], "--address", address,
    ]  # fmt: skip
    stops = [*run_frame.STAGES[:-2], "commit:tables", "commit:groups", "commit"]
    for stop in stops:
        env = {**os.environ, run_frame.STOP_ENV: stop}
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
        assert done.returncode == run_frame.STOP_EXIT_CODE, (stop, done.stderr[-2000:])
    state = History(str(history), StorageOptions()).version(world["rows"][0]["model_id"]).state()
    assert state.run(f"nightly-{NIGHTS[1]}") is not None  # the ledger committed before the stop
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    run_nightly(night_config(config, NIGHTS[2]))
    resumed, clean = published(history), published(world["root"] / "history")
    assert resumed == clean
    clean_runs = runlog.read_runs(str(world["root"] / "history" / "runs"))
    resumed_runs = runlog.read_runs(str(history / "runs"))
    for column in ("run_id", "new_images", "pairs", "groups_new", "groups_changed", "errors"):
        assert resumed_runs[column].to_pylist() == clean_runs[column].to_pylist()


def test_group_updates_merge_groups_like_a_batch_run(tmp_path):
    """Two groups joined by a new pair merge; the survivor keeps its id (its smallest member
    stays), the absorbed group's rows say so, and the snapshot equals the batch groups."""
    from rdcd.groups import build_groups

    nights = [[("a", "b"), ("c", "d")], [("b", "e"), ("f", "g")], [("e", "c"), ("x", "y")]]
    url, buckets = str(tmp_path / "groups"), 3
    seen: list[tuple[str, str]] = []
    counts = {}
    for n, pairs in enumerate(nights):
        seen += pairs
        table = pa.table({"image_id_a": [a for a, _ in pairs], "image_id_b": [b for _, b in pairs]})
        ends = pa.array(sorted({i for pair in pairs for i in pair}))
        old = group_updates.find_members(url, ends, buckets, None)
        attributes = pa.table(
            {"image_id": ends, "width": [10] * len(ends), "height": [10] * len(ends),
             "file_size": [ord(i.as_py()[0]) for i in ends]},
            schema=group_updates.ATTRIBUTES_SCHEMA,
        )  # fmt: skip
        rows, changes, counts = group_updates.update(
            old, table, attributes, ends, ["pixels", "file_size", "id"], "m", f"r{n}"
        )
        group_updates.apply(url, old, rows, buckets, None)
        group_updates.apply(url, old, rows, buckets, None)  # idempotent
    assert counts["groups_merged"] == 1
    merged = {r["image_id"]: r for r in changes.to_pylist()}
    assert merged["c"]["change"] == merged["d"]["change"] == "merged"
    assert merged["c"]["group_id"] == merged["a"]["group_id"] == merged["a"]["previous_group_id"]
    ids = sorted({i for pair in seen for i in pair})
    attributes = pa.table(
        {"image_id": ids, "width": [10] * len(ids), "height": [10] * len(ids),
         "file_size": [ord(i[0]) for i in ids]}
    )  # fmt: skip
    batch = build_groups(
        pa.table({"image_id_a": [a for a, _ in seen], "image_id_b": [b for _, b in seen]}),
        attributes,
        ["pixels", "file_size", "id"],
    )
    snapshot = group_updates.read_snapshot(url, buckets, None)
    assert snapshot.select(batch.column_names).to_pylist() == batch.to_pylist()
    keeper = snapshot.filter(pa.compute.equal(snapshot["is_keeper"], True))
    assert "e" in keeper["image_id"].to_pylist()  # largest file_size ('e') wins its group


def test_one_run_at_a_time_per_version():
    state = State(model_id="m")
    assert state.claim("nightly-a", "nightly", NIGHTS[0])["first_id"] == 0
    with pytest.raises(HistoryError, match="did not finish"):
        state.claim("nightly-b", "nightly", NIGHTS[1])
    assert state.claim("nightly-a", "nightly", NIGHTS[0])["first_id"] == 0  # resuming is fine


@pytest.mark.parametrize("name", ["nightly.yaml", "backfill.yaml", "cluster/nightly-gpu.yaml"])
def test_shipped_configs_load(name):
    config = load_config(REPO / "configs" / name)
    assert config["nightly"]["history"].startswith("s3://")


def test_drift_asks_for_a_retrain_only_beyond_its_bounds():
    bounds = drift.DriftBounds(1.5, 2.0, 4.0)
    reference = drift.baseline(0.2, np.full(8, 100), trained_on=800)
    calm = drift.assess(reference, 0.22, np.full(8, 110), 880, bounds)
    assert not calm["retrain"] and calm["quantisation_ratio"] == pytest.approx(1.1)
    skewed = np.array([800, 10, 10, 10, 10, 10, 10, 10])
    shifted = drift.assess(reference, 0.5, skewed, 870, bounds)
    assert shifted["retrain"] and len(shifted["reasons"]) == 2
    grown = drift.assess(reference, 0.2, np.full(8, 500), 4000, bounds)
    assert grown["retrain"] and "trained for" in grown["reasons"][0]
