"""Listing and reading inputs: folders, WebDataset tars and Parquet, locally and on S3."""

from __future__ import annotations

import io
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from images import jpeg
from inputs import photo_set, upload, write_folder, write_parquets, write_tars

from rdcd.sources import (
    SourceError,
    SourceOptions,
    list_inputs,
    load_ids,
    read_images,
    read_shard,
)


def rows_of(listing, options=None, ids=None):
    """Every row of every shard (end markers included), in order."""
    rows = []
    for shard in listing.shards:
        for table in read_shard(shard, options, ids=ids, end_marker=True):
            rows.extend(table.to_pylist())
    return rows


def images_of(rows):
    return {r["image_id"]: r["bytes"] for r in rows if r["image_id"] is not None}


def test_folder_listing_is_recursive_sorted_and_sharded(tmp_path):
    written = write_folder(tmp_path / "in", photo_set(7))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / ".hidden").mkdir()
    (tmp_path / "in" / ".hidden" / "x.jpg").write_bytes(jpeg(99))
    (tmp_path / "in" / "UPPER.JPG").write_bytes(jpeg(98))
    written["UPPER.JPG"] = jpeg(98)

    listing = list_inputs(str(tmp_path / "in"), SourceOptions(files_per_shard=3))

    assert listing.layout == "files"
    assert listing.count == 8
    assert [s.count for s in listing.shards] == [3, 3, 2]
    assert [s.name for s in listing.shards] == ["000000", "000001", "000002"]
    rows = rows_of(listing)
    assert list(images_of(rows)) == sorted(written)
    assert images_of(rows) == written
    ends = [r["shard_end"] for r in rows if r["image_id"] is None]
    assert ends == [3, 3, 2]
    assert all(r["uri"].startswith(str(tmp_path / "in")) for r in rows)


def test_listing_digest_changes_when_a_file_changes(tmp_path):
    write_folder(tmp_path / "in", photo_set(4))
    before = list_inputs(str(tmp_path / "in"))
    assert list_inputs(str(tmp_path / "in")).digest == before.digest
    (tmp_path / "in" / "a" / "new.jpg").write_bytes(jpeg(50))
    assert list_inputs(str(tmp_path / "in")).digest != before.digest


def test_single_image_file_is_an_input(tmp_path):
    write_folder(tmp_path / "in", photo_set(2))
    listing = list_inputs(str(tmp_path / "in" / "a" / "000000000.jpg"))
    assert listing.count == 1
    assert list(images_of(rows_of(listing))) == ["000000000.jpg"]


def test_tar_members_become_samples_by_key(tmp_path):
    images = photo_set(7)
    write_tars(tmp_path / "tars", images, per_tar=3)
    listing = list_inputs(str(tmp_path / "tars"))
    assert listing.layout == "tar"
    assert len(listing.shards) == 3
    assert listing.count is None
    rows = rows_of(listing)
    assert images_of(rows) == images
    assert [r["shard_end"] for r in rows if r["image_id"] is None] == [3, 3, 1]
    first = next(r for r in rows if r["image_id"] == "000000000")
    assert first["uri"] == f"tar://000000000.jpg::{tmp_path / 'tars' / '00000.tar'}"

    keyed = rows_of(listing, SourceOptions(tar_id="shard_key"))
    assert "00001/000000003" in images_of(keyed)


def test_truncated_tar_keeps_its_readable_samples_and_reports_the_rest(tmp_path):
    write_tars(tmp_path / "tars", photo_set(4), per_tar=4)
    path = tmp_path / "tars" / "00000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    rows = [r for r in rows_of(list_inputs(str(tmp_path / "tars"))) if r["image_id"]]
    errors = [r for r in rows if r["error"]]
    assert len(errors) == 1
    assert errors[0]["image_id"] == "00000.tar"
    assert errors[0]["stage"] == "read"
    assert "unreadable tar" in errors[0]["error"]
    assert 1 <= len(rows) - 1 < 4


def test_parquet_rows_nulls_and_repeated_ids(tmp_path):
    images = photo_set(6)
    write_parquets(tmp_path / "pq", images, per_file=4)
    listing = list_inputs(str(tmp_path / "pq"), SourceOptions())
    assert listing.layout == "parquet"
    rows = rows_of(listing, SourceOptions(block_rows=3))
    assert images_of(rows) == images
    assert rows[0]["uri"].endswith("00000.parquet#row=0")

    pq.write_table(
        pa.table(
            {"key": ["x", None, "y", "x"], "jpg": pa.array([jpeg(1), jpeg(2), None, jpeg(3)])}
        ),
        tmp_path / "pq" / "00009.parquet",
    )
    rows = rows_of(list_inputs(str(tmp_path / "pq")))
    errors = {r["image_id"]: (r["stage"], r["error"]) for r in rows if r["error"]}
    assert errors.keys() == {"00009.parquet#row=1", "y", "x#dup1"}
    assert errors["x#dup1"][0] == "duplicate_id"
    assert errors["y"][0] == "read"
    ids = [r["image_id"] for r in rows if r["image_id"]]
    assert len(ids) == len(set(ids)) == 6 + 4


def test_parquet_without_the_configured_columns_is_a_clear_error(tmp_path):
    write_parquets(tmp_path / "pq", photo_set(2), per_file=2)
    with pytest.raises(SourceError, match="no column 'image'.*parquet_bytes_column"):
        list_inputs(str(tmp_path / "pq"), SourceOptions(parquet_bytes_column="image"))


def test_ids_select_a_subset_in_every_layout(tmp_path):
    images = photo_set(8)
    folder = write_folder(tmp_path / "folder", images)
    write_tars(tmp_path / "tars", images, per_tar=3)
    write_parquets(tmp_path / "pq", images, per_file=3)
    wanted_keys = {"000000001", "000000006"}

    (tmp_path / "ids.txt").write_text("\n".join(wanted_keys) + "\n")
    ids = load_ids(str(tmp_path / "ids.txt"))
    for layout in ("tars", "pq"):
        assert set(images_of(rows_of(list_inputs(str(tmp_path / layout)), ids=ids))) == ids

    wanted_paths = [p for p in folder if p.split("/")[1].split(".")[0] in wanted_keys]
    pq.write_table(pa.table({"path": wanted_paths}), tmp_path / "ids.parquet")
    (tmp_path / "ids.csv").write_text("image_id,note\n" + "\n".join(f"{p},x" for p in wanted_paths))
    for name in ("ids.parquet", "ids.csv"):
        ids = load_ids(str(tmp_path / name))
        listing = list_inputs(str(tmp_path / "folder"), ids=ids)
        assert listing.count == 2
        assert set(images_of(rows_of(listing))) == set(wanted_paths)


def test_missing_or_empty_inputs_are_clear_errors(tmp_path):
    with pytest.raises(SourceError, match="input not found"):
        list_inputs(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("hi")
    with pytest.raises(SourceError, match="nothing to read"):
        list_inputs(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="no .tar files"):
        write_folder(tmp_path / "f", photo_set(1))
        list_inputs(str(tmp_path / "f"), SourceOptions(layout="tar"))
    with pytest.raises(SourceError, match="not found"):
        load_ids(str(tmp_path / "ids.csv"))


def test_unreadable_object_is_an_error_row(tmp_path):
    written = write_folder(tmp_path / "in", photo_set(3))
    listing = list_inputs(str(tmp_path / "in"))
    (tmp_path / "in" / next(iter(written))).unlink()
    rows = [r for r in rows_of(listing) if r["image_id"]]
    assert len(rows) == 3
    assert [r["stage"] for r in rows if r["error"]] == ["read"]


def test_s3_inputs_read_through_ray_data(tmp_path, s3_server, s3_fs, ray_session):
    images = photo_set(9)
    folder = write_folder(tmp_path / "folder", images)
    write_tars(tmp_path / "tars", images, per_tar=4)
    write_parquets(tmp_path / "pq", images, per_file=5)
    base = f"s3://{s3_server.bucket}/sources"
    for name in ("folder", "tars", "pq"):
        upload(s3_fs, tmp_path / name, f"{base}/{name}")

    expected = {"folder": folder, "tars": images, "pq": images}
    for name, wanted in expected.items():
        options = SourceOptions(files_per_shard=4)
        listing = list_inputs(f"{base}/{name}", options)
        dataset = read_images(listing, options, num_cpus=0.5)
        rows = dataset.take_all()
        assert {r["image_id"]: r["bytes"] for r in rows} == wanted, name
        assert all(r["uri"].startswith("s3://") or "::s3://" in r["uri"] for r in rows)


def test_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises(SourceError, match="not found|cannot list"):
        list_inputs("s3://no-such-bucket-rdcd/images")


def test_tar_with_directories_and_no_image_members(tmp_path):
    (tmp_path / "tars").mkdir()
    with tarfile.open(tmp_path / "tars" / "00000.tar", "w") as archive:
        for name, payload in (("d/k1.jpg", jpeg(1)), ("d/k1.json", b"{}"), ("d/k2.json", b"{}")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    rows = rows_of(list_inputs(str(tmp_path / "tars")))
    assert list(images_of(rows)) == ["d/k1"]
    assert rows[-1]["shard_end"] == 1


def test_symlinked_files_are_listed(tmp_path):
    written = write_folder(tmp_path / "real", photo_set(2))
    (tmp_path / "in").mkdir()
    for i, relative in enumerate(sorted(written)):
        (tmp_path / "in" / f"link{i}.jpg").symlink_to(tmp_path / "real" / relative)
    rows = rows_of(list_inputs(str(tmp_path / "in")))
    assert images_of(rows) == {f"link{i}.jpg": written[r] for i, r in enumerate(sorted(written))}
