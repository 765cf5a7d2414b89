"""Matching: exact re-scoring, thresholds, exact duplicates, score normalisation, all-pairs
recall against brute force, and copy-detection search."""

from __future__ import annotations

import duckdb
import faiss
import numpy as np
import pyarrow as pa
import pytest
from descriptors import planted_vectors, unit, write_descriptors

from pipelines.index import run_index
from pipelines.pairs import run_pairs
from pipelines.search import run_search
from rdcd import match
from rdcd.config import load_config
from rdcd.vectors import VectorStore


def store_of(x: np.ndarray, tmp_path, parts: int = 3) -> VectorStore:
    bounds = np.linspace(0, len(x), parts + 1).astype(int)
    paths = []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        path = str(tmp_path / f"v{i}.npy")
        np.save(path, x[lo:hi].astype(np.float16))
        paths.append(path)
    return VectorStore.open(paths, bounds[:-1], np.diff(bounds), x.shape[1])


def test_exact_scores_are_cosines_of_stored_vectors(tmp_path):
    rng = np.random.default_rng(0)
    x = unit(rng.standard_normal((50, 8)))
    store = store_of(x, tmp_path)
    cand = rng.integers(0, 50, size=(5, 4))
    cand[0, 3] = -1
    scores = match.exact_scores(x[:5], cand, store)
    stored = x.astype(np.float16).astype(np.float32)
    expected = np.einsum("qd,qkd->qk", x[:5], stored[cand])
    assert np.isneginf(scores[0, 3])
    valid = cand >= 0
    np.testing.assert_allclose(scores[valid], expected[valid], rtol=1e-5, atol=1e-6)


def test_canonical_pairs_drop_self_and_duplicates():
    queries = np.array([0, 1, 2])
    cand = np.array([[0, 1, 2], [1, 0, -1], [2, 0, 1]])
    scores = np.array([[1, 0.9, 0.2], [1, 0.9, -np.inf], [1, 0.2, 0.95]], dtype=np.float32)
    a, b, s = match.canonical_pairs(queries, cand, scores, scores >= 0.5)
    assert list(zip(a.tolist(), b.tolist(), strict=True)) == [(0, 1), (1, 2)]
    np.testing.assert_allclose(s, [0.9, 0.95])


def test_unique_pairs_prefers_the_exact_row():
    a, b, s, exact = match.unique_pairs(
        np.array([3, 1, 3]),
        np.array([4, 2, 4]),
        np.array([0.9, 0.8, 1.0], np.float32),
        np.array([False, False, True]),
    )
    assert a.tolist() == [1, 3] and b.tolist() == [2, 4] and exact.tolist() == [False, True]


def test_exact_duplicate_pairs_form_a_star_on_the_smallest_id():
    hashes = pa.array(["h1", "h2", "h1", "h3", "h1", "h2"])
    ids = np.array([50, 7, 3, 9, 12, 8])
    a, b = match.exact_duplicate_pairs(match.hash_keys(hashes), ids)
    assert sorted(zip(a.tolist(), b.tolist(), strict=True)) == [(3, 12), (3, 50), (7, 8)]
    with pytest.raises(ValueError):
        match.hash_keys(pa.array(["x", None]))


def test_score_norm_offsets_and_top_k():
    norm = match.ScoreNorm(beta=2.0, first=0, last=2)
    offsets = norm.offsets(np.array([[0.1, 0.9, 0.5, 0.7]], np.float32))
    np.testing.assert_allclose(offsets, [2.0 * (0.9 + 0.7 + 0.5) / 3], rtol=1e-6)
    with pytest.raises(ValueError):
        match.ScoreNorm(first=3, last=1)
    ids, scores = match.top_k(np.array([[5, 6, 7]]), np.array([[0.1, 0.9, 0.5]], np.float32), 2)
    assert ids.tolist() == [[6, 7]] and scores[0].tolist() == pytest.approx([0.9, 0.5])


def brute_force_pairs(x: np.ndarray, k: int, threshold: float) -> dict[tuple[int, int], float]:
    """Pairs above threshold among each row's exact k nearest: the all-pairs ground truth."""
    scores, ids = faiss.knn(x, x, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    found = {}
    for q in range(len(x)):
        for c, s in zip(ids[q], scores[q], strict=True):
            if c != q and s >= threshold:
                found[(min(q, c), max(q, c))] = float(s)
    return found


def config(*overrides: str) -> dict:
    return load_config(None, ["index.shard_vectors=1500", "match.query_rows=1000", *overrides])


def read_pairs(out) -> list[dict]:
    return duckdb.sql(f"SELECT * FROM '{out}/pairs/*.parquet'").arrow().read_all().to_pylist()


def test_all_pairs_recall_against_brute_force(tmp_path, ray_session):
    x, clusters = planted_vectors(4000, 32, clusters=120, copies=3, noise=0.6, seed=1)
    hashes = [f"h{i}" for i in range(len(x))]
    for row in range(10, 30):  # 20 byte-identical copies of one file: more than k
        hashes[row] = "same-bytes"
    ids = write_descriptors(tmp_path / "desc", x, hashes=hashes)
    cfg = config("index.kind=ivf", "match.k=8", "match.nprobe=16")
    run_index(str(tmp_path / "desc"), str(tmp_path / "index"), cfg)
    out = tmp_path / "out"
    summary = run_pairs(str(tmp_path / "index"), str(out), cfg, threshold=0.7, run_id="t1")

    truth = brute_force_pairs(x, 8, 0.7)
    rows = read_pairs(out)
    position = {image_id: i for i, image_id in enumerate(ids)}
    got = {}
    for r in rows:
        assert r["image_id_a"] < r["image_id_b"] and r["run_id"] == "t1"
        assert r["model_id"] == "test-model"
        a, b = sorted((position[r["image_id_a"]], position[r["image_id_b"]]))
        if r["exact"]:
            continue
        assert r["score"] >= 0.7
        assert r["score"] == pytest.approx(float(x[a] @ x[b]), abs=2e-3)
        got[(a, b)] = r["score"]
    recall = len(truth.keys() & got.keys()) / len(truth)
    assert len(truth) > 300 and recall >= 0.99
    planted = {(min(c[0], m), max(c[0], m)) for c in clusters for m in c[1:]}
    assert len(planted & got.keys()) / len(planted) >= 0.95
    exact = {(r["image_id_a"], r["image_id_b"]) for r in rows if r["exact"]}
    assert exact == {(ids[10], ids[row]) for row in range(11, 30)}  # star, beyond k
    assert summary["exact_pairs"] == 19 and summary["pairs"] == len(rows)
    near = duckdb.sql(f"SELECT * FROM '{out}/near_misses/*.parquet'").fetchall()
    assert near and all(0.65 - 1e-6 <= r[2] < 0.7 for r in near)
    assert not {(r[0], r[1]) for r in near} & {(r["image_id_a"], r["image_id_b"]) for r in rows}
    again = run_pairs(str(tmp_path / "index"), str(out), cfg, threshold=0.7, run_id="t1")
    assert again["skipped"]
    changed = run_pairs(str(tmp_path / "index"), str(out), cfg, threshold=0.8, run_id="t1")
    assert not changed["skipped"] and changed["pairs"] < summary["pairs"]


def test_score_normalisation_matches_its_definition(tmp_path, ray_session):
    rng = np.random.default_rng(5)
    x, _ = planted_vectors(600, 16, clusters=40, copies=1, noise=0.5, seed=2)
    background = unit(rng.standard_normal((300, 16)))
    write_descriptors(tmp_path / "desc", x)
    write_descriptors(tmp_path / "bg", background, ids=[f"bg{i}" for i in range(300)])
    cfg = config("match.k=5")
    run_index(str(tmp_path / "desc"), str(tmp_path / "index"), cfg)
    run_pairs(
        str(tmp_path / "index"),
        str(tmp_path / "out"),
        cfg,
        threshold=0.2,
        run_id="sn",
        background_url=str(tmp_path / "bg"),
    )
    stored_bg = background.astype(np.float16).astype(np.float32)
    top3 = -np.sort(-(x @ stored_bg.T), axis=1)[:, :3].mean(axis=1)
    rows = read_pairs(tmp_path / "out")
    assert rows
    for r in rows:
        a, b = int(r["image_id_a"][3:]), int(r["image_id_b"][3:])
        expected = float(x[a] @ x[b]) - 0.5 * (top3[a] + top3[b])
        assert r["score"] == pytest.approx(expected, abs=3e-3)
        assert r["score"] >= 0.2


def test_search_top_k_with_and_without_normalisation(tmp_path, ray_session):
    rng = np.random.default_rng(7)
    refs = unit(rng.standard_normal((500, 16)))
    queries = unit(refs[:40] + 0.1 * rng.standard_normal((40, 16)))
    write_descriptors(tmp_path / "refs", refs, ids=[f"r{i:03d}" for i in range(500)])
    write_descriptors(tmp_path / "q", queries, ids=[f"q{i:03d}" for i in range(40)], files=1)
    write_descriptors(
        tmp_path / "bg", unit(rng.standard_normal((200, 16))), ids=[f"b{i}" for i in range(200)]
    )
    cfg = config("search.k=5")
    plain = run_search(str(tmp_path / "q"), str(tmp_path / "refs"), str(tmp_path / "o1"), cfg)
    assert plain["predictions"] == 40 * 5
    cfg_sn = config("search.k=5", f"match.background={tmp_path / 'bg'}")
    run_search(str(tmp_path / "q"), str(tmp_path / "refs"), str(tmp_path / "o2"), cfg_sn)

    def predictions(out) -> dict[str, list[tuple[str, float]]]:
        rows = duckdb.sql(
            f"SELECT * FROM '{out}/predictions/*.parquet' ORDER BY query_id, score DESC"
        ).fetchall()
        grouped: dict[str, list[tuple[str, float]]] = {}
        for q, r, s in rows:
            grouped.setdefault(q, []).append((r, s))
        return grouped

    p1, p2 = predictions(tmp_path / "o1"), predictions(tmp_path / "o2")
    stored = refs.astype(np.float16).astype(np.float32)
    for i in range(40):
        exact = np.argsort(-(stored @ queries[i]))[:5]
        assert [r for r, _ in p1[f"q{i:03d}"]] == [f"r{j:03d}" for j in exact]
        # Normalisation shifts a query's scores by one constant: same order, lower scores.
        assert [r for r, _ in p2[f"q{i:03d}"]] == [r for r, _ in p1[f"q{i:03d}"]]
        pairs = zip(p1[f"q{i:03d}"], p2[f"q{i:03d}"], strict=True)
        shifts = np.array([s1 - s2 for (_, s1), (_, s2) in pairs])
        assert shifts.min() > 0 and np.ptp(shifts) < 1e-4
    assert sum(p[0][0] == f"r{i:03d}" for i, p in enumerate(p1.values())) >= 38
    again = run_search(str(tmp_path / "q"), str(tmp_path / "refs"), str(tmp_path / "o1"), cfg)
    assert again["built / skipped"] == "skipped (current)"
    # REFS may also be an index folder built by `rdcd index` (here an IVF one).
    run_index(str(tmp_path / "refs"), str(tmp_path / "ref-index"), config("index.kind=ivf"))
    run_search(str(tmp_path / "q"), str(tmp_path / "ref-index"), str(tmp_path / "o3"), cfg)
    assert predictions(tmp_path / "o3") == p1
