"""`rdcd dedup` end to end on real photos with planted copies."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from descriptors import COPIED, pixel_descriptors, planted_photos

from pipelines import dedup
from pipelines.jobs import module_main
from pipelines.search import run_search
from rdcd.config import load_config

pytestmark = pytest.mark.timeout(300)


def config(*overrides: str) -> dict:
    return load_config(None, ["match.threshold=0.9", *overrides])


def mtimes(out: Path) -> dict[str, int]:
    return {
        str(p.relative_to(out)): p.stat().st_mtime_ns
        for p in out.rglob("*")
        if p.is_file() and p.name != "dedup.json"
    }


@pytest.fixture()
def photo_descriptors(tmp_path):
    paths, groups = planted_photos(tmp_path / "images")
    pixel_descriptors(tmp_path / "desc", paths)
    return tmp_path / "desc", groups, paths


def test_planted_copies_are_grouped_and_nothing_else(tmp_path, photo_descriptors, ray_session):
    desc, groups, paths = photo_descriptors
    out = tmp_path / "out"
    summary = dedup.run_dedup(str(desc), str(out), config())
    assert summary["images"] == len(paths)
    assert summary["groups"] == len(groups)
    assert summary["duplicates to delete"] == sum(len(g) - 1 for g in groups.values())
    assert summary["exact pairs"] == 1

    rows = duckdb.sql(f"SELECT * FROM '{out}/groups/*.parquet'").fetchall()
    found: dict[str, set[str]] = {}
    for image_id, group_id, _, _, _ in rows:
        found.setdefault(group_id, set()).add(image_id)
    assert sorted(map(sorted, found.values())) == sorted(map(sorted, groups.values()))
    keepers = {
        r[0]: r[1]
        for r in duckdb.sql(
            f"SELECT image_id, keep_reason FROM '{out}/groups/*.parquet' WHERE is_keeper"
        ).fetchall()
    }
    assert set(keepers) == set(groups)  # the unedited, largest original is kept
    # Why each keeper beat the next best member: same pixels as the re-compressed copy but a
    # larger file; the byte-identical copy ties on both, so the smaller id decides.
    assert keepers["chelsea.jpg"] == "largest file"
    assert keepers["astronaut.jpg"] == "smallest image_id"
    sizes = duckdb.sql(
        f"SELECT DISTINCT group_id, group_size FROM '{out}/groups/*.parquet'"
    ).fetchall()
    assert sorted(s for _, s in sizes) == sorted(len(g) for g in groups.values())

    exact = duckdb.sql(
        f"SELECT image_id_a, image_id_b, score FROM '{out}/pairs/*.parquet' WHERE exact"
    ).fetchall()
    assert [(a, b) for a, b, _ in exact] == [("astronaut.jpg", "astronaut_same_bytes.jpg")]
    assert exact[0][2] == pytest.approx(1.0, abs=1e-3)


def test_pairs_and_groups_agree(tmp_path, photo_descriptors, ray_session):
    desc, _, _ = photo_descriptors
    out = tmp_path / "out"
    dedup.run_dedup(str(desc), str(out), config())
    pairs, groups = f"'{out}/pairs/*.parquet'", f"'{out}/groups/*.parquet'"
    split = duckdb.sql(
        f"""SELECT count(*) FROM {pairs} p
            JOIN {groups} ga ON ga.image_id = p.image_id_a
            JOIN {groups} gb ON gb.image_id = p.image_id_b
            WHERE ga.group_id <> gb.group_id"""
    ).fetchall()[0][0]
    unpaired = duckdb.sql(
        f"""SELECT count(*) FROM {groups} g WHERE NOT EXISTS (
              SELECT 1 FROM {pairs} p WHERE g.image_id IN (p.image_id_a, p.image_id_b))"""
    ).fetchall()[0][0]
    missing = duckdb.sql(
        f"""SELECT count(*) FROM {pairs} p WHERE p.image_id_a NOT IN (SELECT image_id FROM
            {groups}) OR p.image_id_b NOT IN (SELECT image_id FROM {groups})"""
    ).fetchall()[0][0]
    one_keeper = duckdb.sql(
        f"SELECT bool_and(k = 1) FROM (SELECT sum(is_keeper::INT) k FROM {groups} "
        "GROUP BY group_id)"
    ).fetchall()[0][0]
    assert (split, unpaired, missing, one_keeper) == (0, 0, 0, True)
    ordered = duckdb.sql(f"SELECT bool_and(image_id_a < image_id_b) FROM {pairs}").fetchall()[0][0]
    assert ordered


def test_rerun_is_a_no_op_and_a_new_threshold_redoes_only_what_depends_on_it(
    tmp_path, photo_descriptors, ray_session
):
    desc, _, _ = photo_descriptors
    out = tmp_path / "out"
    dedup.run_dedup(str(desc), str(out), config())
    first = json.loads((out / "dedup.json").read_text())
    before = mtimes(out)
    again = dedup.run_dedup(str(desc), str(out), config())
    assert again["stages skipped (current)"] == "embed, index, pairs, groups, report"
    assert mtimes(out) == before
    assert json.loads((out / "dedup.json").read_text())["run_id"] == first["run_id"]

    stricter = dedup.run_dedup(str(desc), str(out), config("match.threshold=0.995"))
    assert stricter["stages skipped (current)"] == "embed, index"
    after = mtimes(out)
    assert after["index/index.faiss"] == before["index/index.faiss"]
    assert after["pairs/part-00000.parquet"] != before["pairs/part-00000.parquet"]
    assert stricter["pairs"] < again["pairs"]


def test_cli_summary_and_a_corrupt_file_named(tmp_path, photo_descriptors, ray_session, capsys):
    desc, groups, _ = photo_descriptors
    out = tmp_path / "out"
    code = module_main(dedup, [str(desc), str(out), "--threshold", "0.9", "--run-id", "night-1"])
    printed = capsys.readouterr().out
    assert code == 0
    assert "duplicates to delete" in printed and "night-1" in printed
    assert duckdb.sql(f"SELECT DISTINCT run_id FROM '{out}/pairs/*.parquet'").fetchall() == [
        ("night-1",)
    ]
    shard = out / "index" / "vectors" / "shard-00000.npy"
    shard.write_bytes(shard.read_bytes()[: os.path.getsize(shard) // 2])
    code = module_main(dedup, [str(desc), str(out), "--threshold", "0.95", "--run-id", "night-1"])
    error = capsys.readouterr().err
    assert code == 2
    assert "shard-00000.npy" in error and "rdcd dedup: error:" in error


def test_no_threshold_and_no_card_for_these_descriptors_is_a_clear_error(
    tmp_path, photo_descriptors, ray_session
):
    desc, _, _ = photo_descriptors
    with pytest.raises(dedup.JobError, match="threshold"):
        dedup.run_dedup(str(desc), str(tmp_path / "out"), load_config())


def test_images_in_default_model_groups_edited_copies_and_search_finds_originals(
    tmp_path, ray_session
):
    """The whole job from image files: embed with the shipped model, its card's threshold."""
    paths, groups = planted_photos(tmp_path / "images")
    (tmp_path / "images" / "broken.jpg").write_bytes(paths[0].read_bytes()[:300])
    cfg = load_config(None, ["model.runtime=torch", "input.files_per_shard=20", "search.k=3"])
    out = tmp_path / "out"
    summary = dedup.run_dedup(str(tmp_path / "images"), str(out), cfg)
    assert summary["images"] == len(paths) and summary["errors"] == 1
    assert summary["threshold"].endswith("(model card default)")
    rows = duckdb.sql(f"SELECT image_id, group_id, is_keeper FROM '{out}/groups/*.parquet'")
    found: dict[str, set[str]] = {}
    for image_id, group_id, _ in rows.fetchall():
        found.setdefault(group_id, set()).add(image_id)
    # Crops, resizes, re-compressions and text overlays join their original; no other photo does.
    assert sorted(map(sorted, found.values())) == sorted(map(sorted, groups.values()))
    keepers = {r[0] for r in rows.fetchall() if r[2]}
    assert keepers == set(groups)
    exact = duckdb.sql(f"SELECT image_id_a, image_id_b FROM '{out}/pairs/*.parquet' WHERE exact")
    assert exact.fetchall() == [("astronaut.jpg", "astronaut_same_bytes.jpg")]
    to_delete = duckdb.sql(
        f"""SELECT g.image_id, d.uri FROM '{out}/groups/*.parquet' g
            JOIN '{out}/descriptors/*.parquet' d USING (image_id) WHERE NOT g.is_keeper"""
    ).fetchall()
    assert (
        len(to_delete)
        == summary["duplicates to delete"]
        == sum(len(g) - 1 for g in groups.values())
    )
    assert all(Path(uri.removeprefix("file://")).exists() for _, uri in to_delete)

    # Copy detection: query images (embedded on the fly) against the originals' descriptors.
    queries = tmp_path / "queries"
    queries.mkdir()
    for original in COPIED[:2]:
        for name in groups[original] - {original}:
            (queries / name).write_bytes((tmp_path / "images" / name).read_bytes())
    descriptors = pq.read_table(out / "descriptors")
    keep = pc.is_in(
        descriptors["image_id"],
        pa.array(
            sorted(
                set(p.name for p in paths) - {m for g in groups.values() for m in g} | set(groups)
            )
        ),
    )
    (tmp_path / "refs").mkdir()
    pq.write_table(descriptors.filter(keep), tmp_path / "refs" / "part-0.parquet")
    result = run_search(str(queries), str(tmp_path / "refs"), str(tmp_path / "search"), cfg)
    assert result["predictions"] == 3 * result["queries"] == 3 * len(list(queries.iterdir()))
    best = duckdb.sql(
        f"""SELECT query_id, arg_max(reference_id, score) FROM
            '{tmp_path}/search/predictions/*.parquet' GROUP BY query_id"""
    ).fetchall()
    original_of = {m: o for o, g in groups.items() for m in g}
    assert len(best) == result["queries"]
    assert all(reference == original_of[query] for query, reference in best)
