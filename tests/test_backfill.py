"""`rdcd backfill` on a history kept in S3 (the SeaweedFS test endpoint): a second model gets a
complete version of its own, side by side, while the old one stays untouched and current until
the switch; nights that arrive meanwhile are caught up; a newly added source joins the current
version."""

from __future__ import annotations

import copy
import hashlib
import uuid

import duckdb
import pyarrow.parquet as pq
import pytest
from nightly_data import NIGHTS, config_for, model_card, night_images, write_nights

from pipelines.backfill import run_model_backfill, run_source
from pipelines.dedup import run_dedup
from pipelines.jobs import JobError
from pipelines.nightly import run_nightly
from pipelines.run_frame import model_identity
from rdcd.history import History
from rdcd.storage import StorageOptions

pytestmark = pytest.mark.timeout(600)


def s3_digest(s3_fs, prefix: str) -> dict[str, str]:
    s3_fs.invalidate_cache()
    return {
        path: hashlib.sha256(s3_fs.cat_file(path)).hexdigest()
        for path in sorted(s3_fs.find(prefix))
    }


def s3_table(s3_fs, pattern: str, columns: list[str]) -> set[tuple]:
    rows = set()
    s3_fs.invalidate_cache()
    for path in s3_fs.glob(pattern):
        with s3_fs.open(path, "rb") as handle:
            for row in pq.read_table(handle, columns=columns).to_pylist():
                rows.add(tuple(row[c] for c in columns))
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_session, s3_server, s3_fs):
    """Two nights with model A in s3://.../history; images in S3 and, for the batch
    reference, on local disk."""
    models = tmp_path_factory.getbasetemp() / "nightly-models"
    cards = {"a": model_card(models, "a", seed=0), "b": model_card(models, "b", seed=1)}
    local = write_nights(tmp_path_factory.mktemp("backfill"))
    prefix = f"{s3_server.bucket}/backfill-{uuid.uuid4().hex[:8]}"
    for date, images in night_images().items():
        for name, data in images.items():
            s3_fs.pipe(f"{prefix}/incoming/{date}/{name}", data)
    history_url = f"s3://{prefix}/history"
    config = config_for(cards["a"], history_url, f"s3://{prefix}/incoming")
    # an IVF index (exhaustive: nprobe >= nlist) whose parts and compactions live in S3
    config["index"].update(factory="IVF2,Flat", shard_vectors=8)
    config["nightly"]["max_index_parts"] = 2
    for date in NIGHTS[:2]:
        night = copy.deepcopy(config)
        night["nightly"]["date"] = date
        run_nightly(night)
    history = History(history_url, StorageOptions())
    return {
        "cards": cards,
        "config": config,
        "prefix": prefix,
        "history": history,
        "model_a": history.current_model(),
        "local": local,
    }


def with_model(config: dict, card: str, **backfill) -> dict:
    config = copy.deepcopy(config)
    config["model"]["card"] = card
    config["backfill"].update(backfill)
    return config


def test_backfill_builds_a_new_version_and_switches_when_caught_up(world, s3_fs, tmp_path):
    history, prefix, model_a = world["history"], world["prefix"], world["model_a"]
    old_prefix = f"{prefix}/history/versions/{model_a}"
    before = s3_digest(s3_fs, old_prefix)

    summary = run_model_backfill(with_model(world["config"], world["cards"]["b"], switch=False))
    model_b = summary["new version"].rsplit("/", 1)[1]
    assert model_b != model_a
    assert history.current_model() == model_a  # built, but not switched to
    assert s3_digest(s3_fs, old_prefix) == before  # the old version was only read
    new, old = history.version(model_b).state(), history.version(model_a).state()
    assert history.version(model_b).info()["status"] == "complete"
    assert [(r.run_id, r.date, r.count) for r in new.runs] == [
        (r.run_id, r.date, r.count) for r in old.runs
    ]
    new_prefix = f"{prefix}/history/versions/{model_b}"
    assert s3_table(s3_fs, f"{new_prefix}/descriptors/*/*.parquet", ["image_id"]) == s3_table(
        s3_fs, f"{old_prefix}/descriptors/*/*.parquet", ["image_id"]
    )
    assert s3_table(s3_fs, f"{new_prefix}/pairs/*/*.parquet", ["model_id"]) == {(model_b,)}

    third = copy.deepcopy(world["config"])
    third["nightly"]["date"] = NIGHTS[2]
    run_nightly(third)  # a night arrives on the current (old) version meanwhile
    before = s3_digest(s3_fs, old_prefix)

    summary = run_model_backfill(with_model(world["config"], world["cards"]["b"], switch=True))
    assert summary["runs replayed now / in version"] == "1 / 3"
    pointer = history.current()
    assert (pointer["model_id"], pointer["previous"]) == (model_b, model_a)
    assert s3_digest(s3_fs, old_prefix) == before

    batch = tmp_path / "batch-b"
    run_dedup(
        str(world["local"]["all"]), str(batch), with_model(world["config"], world["cards"]["b"])
    )
    columns = ["image_id_a", "image_id_b", "exact"]
    backfilled = s3_table(s3_fs, f"{new_prefix}/pairs/*/*.parquet", columns)
    reference = set(
        duckdb.sql(f"SELECT {', '.join(columns)} FROM '{batch}/pairs/*.parquet'").fetchall()
    )
    assert backfilled == reference
    groups = ["image_id", "group_id", "group_size", "is_keeper", "keep_reason"]
    assert s3_table(s3_fs, f"{new_prefix}/groups/*/*.parquet", groups) == set(
        duckdb.sql(f"SELECT {', '.join(groups)} FROM '{batch}/groups/*.parquet'").fetchall()
    )

    stale = copy.deepcopy(world["config"])
    stale["nightly"]["date"] = "2026-11-04"
    with pytest.raises(JobError, match="current version"):
        run_nightly(stale)  # model A can no longer append to the history


def test_a_new_source_joins_the_current_version(world, s3_fs):
    history, prefix = world["history"], world["prefix"]
    current = history.current_model()
    (card,) = [
        c
        for c in world["cards"].values()
        if model_identity(c, StorageOptions()).model_id == current
    ]
    images = night_images()
    extra = {"x900.jpg": images[NIGHTS[0]]["p002.jpg"], "x901.jpg": images[NIGHTS[2]]["p013.jpg"]}
    for name, data in extra.items():
        s3_fs.pipe(f"{prefix}/extra/{name}", data)
    config = with_model(world["config"], card, source=f"s3://{prefix}/extra", name="extra")
    config["nightly"]["date"] = "2026-11-05"
    row = run_source(config)
    assert row["run_id"] == "source-extra" and row["new_images"] == 2
    assert row["exact_pairs"] == 2  # byte copies of a night 1 and a night 3 photo
    version = f"{prefix}/history/versions/{current}"
    pairs = s3_table(
        s3_fs, f"{version}/pairs/date=2026-11-05/*.parquet", ["image_id_a", "image_id_b"]
    )
    assert pairs == {("p002.jpg", "x900.jpg"), ("p013.jpg", "x901.jpg")}
    again = run_source(config)
    assert again["already_complete"]
