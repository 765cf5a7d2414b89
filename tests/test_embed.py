"""`rdcd embed` end to end on the real local Ray: every input layout, locally and on S3."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from images import bad_image_bytes, good_image_bytes
from inputs import photo_set, upload, write_folder, write_parquets, write_tars

from pipelines.embed import run_embed
from pipelines.jobs import JobError, module_main
from rdcd import cards
from rdcd.config import load_config
from rdcd.embedder import load_embedder
from rdcd.models import DescriptorModel
from rdcd.preprocess import load_rgb
from rdcd.tables import ERRORS_SCHEMA, descriptor_matrix, descriptors_schema

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small random-weight student at 64 px (d=16), exported to ONNX once for the session."""
    root = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    model = DescriptorModel("resnet18", kd_dim=32, dim=16)
    cards.save_model(model, cards.card_for(model, size=64), str(root / "model"))
    cache = str(root / "onnx")
    embedder = load_embedder(str(root / "model"), device="cpu", cache_dir=cache)
    return {"card": str(root / "model"), "cache": cache, "embedder": embedder}


def make_config(tiny_model, *overrides: str, storage: dict | None = None) -> dict:
    config = load_config(
        overrides=[
            f"model.card={tiny_model['card']}",
            f"model.onnx_cache={tiny_model['cache']}",
            "input.files_per_shard=5",
            "embed.write_batch_size=8",
            *overrides,
        ]
    )
    if storage:
        config["storage"].update(storage)
    return config


def read_table(fs, folder: str):
    """All Parquet files of an output table, concatenated in file order."""
    import pyarrow as pa

    tables = []
    for path in sorted(p for p in fs.ls(folder, detail=False) if p.endswith(".parquet")):
        with fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables)


def local_tables(out: Path):
    import fsspec

    fs = fsspec.filesystem("file")
    return read_table(fs, str(out / "descriptors")), read_table(fs, str(out / "errors"))


def direct_descriptors(embedder, images: dict[str, bytes]) -> dict[str, np.ndarray]:
    """The reference: the embedder called in this process on the same bytes."""
    ids = sorted(images)
    pixels = np.stack([load_rgb(images[i], size=embedder.input_size)[0] for i in ids])
    vectors = embedder.embed(pixels).astype(np.float16).astype(np.float32)
    return dict(zip(ids, vectors, strict=True))


def assert_matches(descriptors, expected: dict[str, np.ndarray]) -> None:
    ids = descriptors.column("image_id").to_pylist()
    assert sorted(ids) == sorted(expected)
    got = descriptor_matrix(descriptors.column("descriptor"))
    want = np.stack([expected[i] for i in ids])
    np.testing.assert_array_equal(got, want)


def test_folder_with_good_and_bad_images(tmp_path, tiny_model, ray_session):
    photos = write_folder(tmp_path / "in", photo_set(12))
    for name, data in good_image_bytes().items():
        (tmp_path / "in" / "good" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "good" / name).write_bytes(data)
        photos[f"good/{name}"] = data
    bad = bad_image_bytes()
    for name, (data, _) in bad.items():
        (tmp_path / "in" / "bad" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "bad" / name).write_bytes(data)
    config = make_config(tiny_model, "input.extensions=[jpg, png, webp, gif, tiff, pcx]")
    out = tmp_path / "out"

    summary = run_embed(str(tmp_path / "in"), str(out), config)

    descriptors, errors = local_tables(out)
    assert descriptors.schema == descriptors_schema(16)
    assert errors.schema == ERRORS_SCHEMA
    assert_matches(descriptors, direct_descriptors(tiny_model["embedder"], photos))
    assert {r["image_id"]: r["stage"] for r in errors.to_pylist()} == {
        f"bad/{name}": stage for name, (_, stage) in bad.items()
    }
    assert all(r["error"] for r in errors.to_pylist())
    listed = len(photos) + len(bad)
    assert summary["inputs"] == listed
    assert descriptors.num_rows + errors.num_rows == listed
    ids = descriptors.column("image_id").to_pylist() + errors.column("image_id").to_pylist()
    assert len(set(ids)) == len(ids)

    rows = {r["image_id"]: r for r in descriptors.to_pylist()}
    assert (
        rows["good/photo.jpg"]["content_hash"]
        == hashlib.sha256(photos["good/photo.jpg"]).hexdigest()
    )
    assert (rows["good/exif_rotated.jpg"]["width"], rows["good/exif_rotated.jpg"]["height"]) == (
        32,
        64,
    )
    assert set(descriptors.column("model_id").to_pylist()) == {tiny_model["embedder"].model_id}

    count, dims = duckdb.sql(
        f"SELECT count(*), avg(len(descriptor)) FROM '{out}/descriptors/*.parquet'"
    ).fetchall()[0]
    assert (count, dims) == (len(photos), 16)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["model_id"] == tiny_model["embedder"].model_id
    assert manifest["counts"]["inputs"] == listed
    assert manifest["counts"]["errors_by_stage"] == dict(
        Counter(stage for _, stage in bad.values())
    )
    assert manifest["input"]["objects"] == listed
    assert manifest["config"]["model"]["card"] == tiny_model["card"]
    assert set(manifest["timings"]["busy_s"]) == {"decode", "embed", "write"}

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    again = run_embed(str(tmp_path / "in"), str(out), config)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert again["shards embedded / skipped"] == f"0 / {manifest['counts']['shards']}"

    other = tmp_path / "other-model"
    torch.manual_seed(1)
    model = DescriptorModel("resnet18", kd_dim=32, dim=8)
    cards.save_model(model, cards.card_for(model, size=64), str(other))
    with pytest.raises(JobError, match="One output folder holds one model"):
        run_embed(str(tmp_path / "in"), str(out), make_config(tiny_model, f"model.card={other}"))


@pytest.mark.parametrize("layout", ["tars", "parquet"])
def test_webdataset_and_parquet_give_the_same_descriptors(
    tmp_path, tiny_model, ray_session, layout
):
    images = photo_set(23)
    if layout == "tars":
        write_tars(tmp_path / "in", images, per_tar=8)
    else:
        write_parquets(tmp_path / "in", images, per_file=10)
    out = tmp_path / "out"
    summary = run_embed(str(tmp_path / "in"), str(out), make_config(tiny_model))
    descriptors, errors = local_tables(out)
    assert errors.num_rows == 0
    assert summary["descriptors"] == 23
    assert_matches(descriptors, direct_descriptors(tiny_model["embedder"], images))
    uris = descriptors.column("uri").to_pylist()
    assert all(("::" in u) if layout == "tars" else ("#row=" in u) for u in uris)


@pytest.mark.parametrize("layout", ["folder", "tars", "parquet"])
def test_s3_input_and_output(tmp_path, tiny_model, ray_session, s3_server, s3_fs, layout, capsys):
    images = photo_set(14, start_seed=100)
    writers = {
        "folder": lambda d: write_folder(d, images),
        "tars": lambda d: write_tars(d, images, per_tar=5),
        "parquet": lambda d: write_parquets(d, images, per_file=6),
    }
    expected = writers[layout](tmp_path / "in")
    base = f"s3://{s3_server.bucket}/embed-{layout}"
    upload(s3_fs, tmp_path / "in", f"{base}/in")
    bucket_out = base.removeprefix("s3://") + "/out"

    if layout == "folder":
        # Through the command line, with an --ids subset (one id unknown) read from S3 too.
        chosen = sorted(expected)[::3]
        s3_fs.pipe(f"{bucket_out}-ids.csv", ("path\n" + "\n".join([*chosen, "x.jpg"])).encode())
        expected = {k: expected[k] for k in chosen}
        config_file = tmp_path / "config.yaml"
        config_file.write_text(f"model:\n  onnx_cache: {tiny_model['cache']}\n")
        argv = [f"{base}/in", f"{base}/out", "--ids", f"s3://{bucket_out}-ids.csv"]
        argv += ["--model", tiny_model["card"], "--config", str(config_file)]
        import pipelines.embed as job

        assert module_main(job, argv) == 0
        printed = capsys.readouterr().out
        assert f"ids requested / not found  {len(chosen) + 1} / 1" in printed
        assert "images/s" in printed
    else:
        config = make_config(tiny_model, storage=s3_server.storage_config())
        summary = run_embed(f"{base}/in", f"{base}/out", config)
        assert summary["descriptors"] == 14
        manifest = json.loads(s3_fs.cat(f"{bucket_out}/manifest.json"))
        assert manifest["config"]["storage"]["secret"] == "***"

    s3_fs.invalidate_cache()
    descriptors = read_table(s3_fs, f"{bucket_out}/descriptors")
    assert read_table(s3_fs, f"{bucket_out}/errors").num_rows == 0
    assert_matches(descriptors, direct_descriptors(tiny_model["embedder"], expected))
    assert json.loads(s3_fs.cat(f"{bucket_out}/manifest.json"))["status"] == "complete"
    # SeaweedFS keeps emptied "directories"; what matters is that no staged part is left.
    assert not [p for p in s3_fs.find(f"{bucket_out}/_staging") if p.endswith(".parquet")]


def test_clear_errors(tmp_path, tiny_model, ray_session, s3_server, capsys):
    config = make_config(tiny_model, storage=s3_server.storage_config())
    with pytest.raises(JobError, match="input not found"):
        run_embed(str(tmp_path / "missing"), str(tmp_path / "out"), config)
    with pytest.raises(JobError, match="bucket 'no-such-bucket' does not exist"):
        run_embed("s3://no-such-bucket/images", str(tmp_path / "out"), config)
    write_folder(tmp_path / "in", photo_set(3))
    with pytest.raises(JobError, match="output bucket 'no-such-out' does not exist"):
        run_embed(str(tmp_path / "in"), "s3://no-such-out/embeddings", config)
    with pytest.raises(JobError, match="cannot load model '/nope'"):
        bad_model = make_config(tiny_model, "model.card=/nope")
        run_embed(str(tmp_path / "in"), str(tmp_path / "out"), bad_model)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "descriptors").mkdir()
    with pytest.raises(JobError, match="already holds descriptors"):
        run_embed(str(tmp_path / "in"), str(tmp_path / "busy"), config)

    images = photo_set(4)
    write_parquets(tmp_path / "pq", images, per_file=2)
    write_parquets(tmp_path / "pq2", dict(list(images.items())[:1]), per_file=1)
    (tmp_path / "pq2" / "00000.parquet").rename(tmp_path / "pq" / "00009.parquet")
    with pytest.raises(JobError, match="1 image_ids occur in more than one shard"):
        run_embed(str(tmp_path / "pq"), str(tmp_path / "pq-out"), config)

    import pipelines.embed as job

    code = module_main(job, [str(tmp_path / "nothing"), str(tmp_path / "o2")])
    assert code == 2
    assert "rdcd embed: error: input not found" in capsys.readouterr().err


def test_default_model_on_a_few_images(tmp_path, ray_session):
    images = write_folder(tmp_path / "in", photo_set(6))
    config = load_config(overrides=["model.runtime=torch", "model.threads=2"])
    run_embed(str(tmp_path / "in"), str(tmp_path / "out"), config)
    descriptors, errors = local_tables(tmp_path / "out")
    assert errors.num_rows == 0
    embedder = load_embedder("default", device="cpu", runtime="torch", threads=2)
    expected = direct_descriptors(embedder, images)
    ids = descriptors.column("image_id").to_pylist()
    got = descriptor_matrix(descriptors.column("descriptor"))
    want = np.stack([expected[i] for i in ids])
    # Same weights and runtime; bf16 autocast may round differently across batch sizes.
    assert np.abs(got - want).max() < 2e-2
    assert np.allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-2)
    assert descriptors.schema == descriptors_schema(embedder.dim)


def test_killed_run_resumes_to_the_same_tables(tmp_path, tiny_model, ray_session):
    """SIGKILL a run (joined to the session's Ray) once its first shard is committed; the
    re-run must finish the rest and produce exactly an uninterrupted run's tables."""
    write_folder(tmp_path / "in", photo_set(24))
    shared = [
        f"model.card={tiny_model['card']}",
        f"model.onnx_cache={tiny_model['cache']}",
        "input.files_per_shard=2",
    ]
    # Tiny batches make the killed run commit shard by shard instead of all at the end.
    slow = [*shared, "embed.write_batch_size=2", "embed.batch_size=2"]
    command = [sys.executable, "-m", "pipelines.embed", str(tmp_path / "in"), str(tmp_path / "k")]
    command += ["--address", ray_session.get_runtime_context().gcs_address]
    for override in slow:
        command += ["--set", override]
    log = tmp_path / "killed.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, cwd=REPO, start_new_session=True, stdout=sink, stderr=subprocess.STDOUT
        )
        markers = tmp_path / "k" / "_shards"
        deadline = time.monotonic() + 120
        while not (markers.is_dir() and any(markers.glob("*.json"))):
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    done_at_kill = len(list(markers.glob("*.json")))
    assert 1 <= done_at_kill < 12
    assert not (tmp_path / "k" / "manifest.json").exists()

    config = load_config(overrides=shared)
    resumed = run_embed(str(tmp_path / "in"), str(tmp_path / "k"), config)
    run_embed(str(tmp_path / "in"), str(tmp_path / "u"), config)

    embedded, skipped = (int(v) for v in resumed["shards embedded / skipped"].split(" / "))
    assert skipped >= 1 and embedded >= 1 and embedded + skipped == 12
    for table in ("descriptors", "errors"):
        names = sorted(p.name for p in (tmp_path / "k" / table).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "u" / table).iterdir())
        assert len(names) == 12
        for name in names:
            assert pq.read_table(tmp_path / "k" / table / name).equals(
                pq.read_table(tmp_path / "u" / table / name)
            )
    assert not (tmp_path / "k" / "_staging").exists()
