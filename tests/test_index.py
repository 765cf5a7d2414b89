"""Index parameters, the sharded build (local and S3), id map, resume and corrupt files."""

from __future__ import annotations

import os

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from descriptors import planted_vectors, unit, write_descriptors

from pipelines.index import run_index
from pipelines.jobs import JobError
from pipelines.pairs import run_pairs
from rdcd import index as ix
from rdcd.config import load_config
from rdcd.vectors import VectorFileError


def index_cfg(**changes) -> dict:
    cfg = load_config()["index"]
    cfg.update(changes)
    return cfg


def test_small_sets_get_an_exact_flat_index():
    params = ix.choose_params(10_000, 64, index_cfg())
    assert params.factory == "Flat" and not params.is_ivf and params.train_size == 0


def test_ivf_parameters_scale_with_sqrt_n():
    for n, nlist in ((1_000_000, 4096), (100_000_000, 32768)):
        params = ix.choose_params(n, 64, index_cfg())
        assert params.nlist == nlist
        assert params.factory == f"IVF{nlist},SQ8"  # 16 GB budget holds 72 B/vector up to 222M
        assert params.train_size == nlist * 64
        assert params.bytes_per_vector == 64 + 8


def test_large_n_gets_hnsw_quantizer_and_pq_within_budget():
    params = ix.choose_params(1_000_000_000, 64, index_cfg(memory_budget_gb=32))
    assert params.nlist == 131072
    # 32 GB / 1e9 - 8 B of id = 24 B per code; PQ needs d % M == 0, so PQ16.
    assert params.factory == "IVF131072_HNSW32,PQ16"
    assert params.bytes_per_vector <= 32
    on_gpu = ix.choose_params(1_000_000_000, 64, index_cfg(memory_budget_gb=32), gpu=True)
    assert on_gpu.factory == "IVF131072,PQ16"  # faiss-gpu needs a flat coarse quantizer
    tight = ix.choose_params(1_000_000_000, 64, index_cfg(memory_budget_gb=16))
    assert tight.factory.endswith(",PQ8")
    with pytest.raises(ValueError, match="too small"):
        ix.choose_params(1_000_000_000, 64, index_cfg(memory_budget_gb=4))


def test_every_choice_can_be_overridden():
    assert ix.choose_params(100, 32, index_cfg(kind="ivf", nlist=2, code="PQ8")).factory == (
        "IVF2,PQ8"
    )
    custom = ix.choose_params(5000, 32, index_cfg(factory="IVF16,SQfp16"))
    assert custom.nlist == 16 and custom.code_bytes == 64
    with pytest.raises(ValueError, match="factory"):
        ix.choose_params(5000, 32, index_cfg(factory="NotAnIndex"))
    assert ix.default_nlist(1000, 4) == 16  # capped: >= 39 training points per list


def config(*overrides: str) -> dict:
    return load_config(None, ["index.shard_vectors=1000", "match.query_rows=800", *overrides])


def test_build_writes_dense_id_map_vectors_and_a_searchable_index(tmp_path, ray_session):
    x, _ = planted_vectors(2600, 16, clusters=0, copies=0, noise=0)
    ids = write_descriptors(tmp_path / "desc", x, files=4)
    out = tmp_path / "index"
    cfg = config("index.kind=ivf", "index.shard_vectors=1300")
    summary = run_index(str(tmp_path / "desc"), str(out), cfg)
    meta = summary["meta"]
    assert meta["factory"].startswith("IVF") and meta["d"] == 16
    assert meta["model_id"] == "test-model"
    assert meta["counts"] == {"vectors": 2600, "shards": 2, "train": 2600, "descriptor_files": 4}
    assert summary["bytes_per_vector"] > 16 + 8  # SQ8 codes + ids + list overhead
    idmap = duckdb.sql(f"SELECT id, image_id FROM '{out}/idmap/*.parquet' ORDER BY id").fetchall()
    assert [i for i, _ in idmap] == list(range(2600))
    assert [image_id for _, image_id in idmap] == ids
    files = ix.local_files(str(out), meta)
    store = ix.open_vector_store(files["vectors"], meta)
    np.testing.assert_array_equal(store.rows(0, 2600), x.astype(np.float16).astype(np.float32))
    searcher = ix.open_searcher(files["index"], meta, nprobe=8)
    nearest = ix.search(searcher, store.rows(0, 200), 1)[:, 0]
    assert (nearest == np.arange(200)).mean() > 0.95
    assert not os.path.exists(out / "shards")  # merged, then removed
    manifest_time = (out / "manifest.json").stat().st_mtime_ns
    again = run_index(str(tmp_path / "desc"), str(out), cfg)
    assert again["skipped"] and (out / "manifest.json").stat().st_mtime_ns == manifest_time


def test_a_killed_build_resumes_from_published_files(tmp_path, ray_session):
    x = unit(np.random.default_rng(2).standard_normal((2100, 16)))
    write_descriptors(tmp_path / "desc", x, files=3)
    out = tmp_path / "index"
    cfg = config("index.kind=ivf", "index.keep_shards=true")
    run_index(str(tmp_path / "desc"), str(out), cfg)
    kept = out / "vectors" / "shard-00001.npy"
    before = kept.stat().st_mtime_ns
    # As if killed after the adds: no merged index, no manifest.
    for name in ("manifest.json", "index.faiss", "index.ivfdata", "index.json"):
        (out / name).unlink()
    (out / "shards" / "shard-00002.faiss").unlink()
    resumed = run_index(str(tmp_path / "desc"), str(out), cfg)
    assert not resumed["skipped"] and resumed["meta"]["counts"]["vectors"] == 2100
    assert kept.stat().st_mtime_ns == before  # not rewritten
    assert (out / "shards" / "shard-00002.faiss").exists()
    changed = run_index(str(tmp_path / "desc"), str(out), config("index.kind=flat"))
    assert changed["meta"]["factory"] == "Flat" and not (out / "shards").exists()


def test_corrupt_files_give_errors_naming_them(tmp_path, ray_session):
    x = unit(np.random.default_rng(3).standard_normal((900, 16)))
    write_descriptors(tmp_path / "desc", x, files=2)
    out = tmp_path / "index"
    cfg = config("index.kind=ivf")
    run_index(str(tmp_path / "desc"), str(out), cfg)
    (out / "index.faiss").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ix.IndexFileError, match="index.faiss"):
        run_pairs(str(out), str(tmp_path / "o"), cfg, threshold=0.9, run_id="r")
    vectors = out / "vectors" / "shard-00000.npy"
    vectors.write_bytes(vectors.read_bytes()[:1000])
    with pytest.raises(VectorFileError, match="shard-00000.npy"):
        run_pairs(str(out), str(tmp_path / "o2"), cfg, threshold=0.9, run_id="r")
    foreign = tmp_path / "not-ours"
    foreign.mkdir()
    (foreign / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="did not write"):
        run_index(str(tmp_path / "desc"), str(foreign), cfg)
    assert (foreign / "precious.txt").read_text() == "keep me"
    bad = tmp_path / "desc" / "part-00001.parquet"
    bad.write_bytes(bad.read_bytes()[:200])
    with pytest.raises(JobError, match="part-00001.parquet"):
        run_index(str(tmp_path / "desc"), str(tmp_path / "index2"), cfg)


def test_index_and_pairs_on_s3(tmp_path, s3_server, s3_fs, ray_session):
    x, clusters = planted_vectors(1200, 16, clusters=30, copies=1, noise=0.2, seed=4)
    ids = write_descriptors(tmp_path / "desc", x, files=2)
    root = f"s3://{s3_server.bucket}/index-test"
    for name in os.listdir(tmp_path / "desc"):
        s3_fs.put(str(tmp_path / "desc" / name), f"{root}/descriptors/{name}")
    cfg = config("index.kind=ivf", "index.shard_vectors=700")
    summary = run_index(f"{root}/descriptors", f"{root}/index", cfg)
    assert summary["meta"]["counts"]["vectors"] == 1200
    assert s3_fs.exists(f"{root}/index/index.ivfdata")
    result = run_pairs(f"{root}/index", root, cfg, threshold=0.8, run_id="s3")
    with s3_fs.open(f"{root}/pairs/part-00000.parquet", "rb") as handle:
        pairs = pq.read_table(handle).to_pylist()
    found = {(r["image_id_a"], r["image_id_b"]) for r in pairs}
    planted = {tuple(sorted((ids[c[0]], ids[c[1]]))) for c in clusters}
    assert result["pairs"] == len(pairs) and planted <= found
