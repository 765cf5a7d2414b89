"""Storage helpers against local disk and the real S3 server: atomic writes and manifests."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rdcd import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    server = request.getfixturevalue("s3_server")
    return f"s3://{server.bucket}/storage-test/{tmp_path.name}"


def test_manifest_marks_completion(root):
    assert storage.read_manifest(root) is None
    assert not storage.is_complete(root)
    storage.write_manifest(root, {"status": "running"})
    assert not storage.is_complete(root)
    storage.write_manifest(root, {"status": "complete", "counts": {"rows": 3}})
    manifest = storage.read_manifest(root)
    assert storage.is_complete(root)
    assert manifest["counts"] == {"rows": 3}
    assert "written_at" in manifest


def test_atomic_write_leaves_no_temporaries(root):
    url = storage.join(root, "sub", "blob.bin")
    storage.write_bytes_atomic(url, b"payload")
    fs = storage.get_filesystem(url)
    listing = fs.ls(storage.strip_protocol(storage.join(root, "sub")))
    assert [p.rsplit("/", 1)[-1] for p in listing] == ["blob.bin"]
    with fs.open(storage.strip_protocol(url), "rb") as handle:
        assert handle.read() == b"payload"


def test_pyarrow_filesystem_round_trips_parquet(root):
    url = storage.join(root, "table.parquet")
    fs = storage.get_pyarrow_filesystem(url)
    storage.get_filesystem(url).makedirs(storage.strip_protocol(root), exist_ok=True)
    table = pa.table({"a": [1, 2, 3]})
    pq.write_table(table, storage.strip_protocol(url), filesystem=fs)
    assert pq.read_table(storage.strip_protocol(url), filesystem=fs).equals(table)


def test_publish_directory_replaces_previous(root):
    tmp = storage.join(root, "_tmp-x")
    final = storage.join(root, "final")
    storage.write_bytes_atomic(storage.join(final, "old.txt"), b"old")
    storage.write_bytes_atomic(storage.join(tmp, "new.txt"), b"new")
    storage.publish_directory(tmp, final)
    fs = storage.get_filesystem(final)
    names = [p.rsplit("/", 1)[-1] for p in fs.ls(storage.strip_protocol(final))]
    assert names == ["new.txt"]
    # Object stores may keep an empty prefix behind; what matters is that no file is left.
    assert not fs.exists(storage.strip_protocol(storage.join(tmp, "new.txt")))
