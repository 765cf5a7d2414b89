"""Duplicate groups: components, stable ids, keepers and their reasons."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from rdcd.groups import build_groups, check_policy, components
from rdcd.tables import GROUPS_SCHEMA


def pairs_of(edges: list[tuple[str, str]]) -> pa.Table:
    return pa.table({"image_id_a": [a for a, _ in edges], "image_id_b": [b for _, b in edges]})


def attributes(rows: dict[str, tuple[int, int, int | None]]) -> pa.Table:
    return pa.table(
        {
            "image_id": list(rows),
            "width": [r[0] for r in rows.values()],
            "height": [r[1] for r in rows.values()],
            "file_size": pa.array([r[2] for r in rows.values()], pa.int64()),
        }
    )


def reference_components(edges: list[tuple[int, int]], n: int) -> np.ndarray:
    """A plain union-find, only as the test's oracle."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in edges:
        parent[find(a)] = find(b)
    return np.array([find(i) for i in range(n)])


def test_components_match_union_find_on_a_random_graph():
    rng = np.random.default_rng(3)
    n = 3000
    edges = [tuple(e) for e in rng.integers(0, n, size=(2500, 2)).tolist() if e[0] != e[1]]
    names = [f"n{i:05d}" for i in range(n)]
    nodes, labels = components(
        pa.array([names[a] for a, _ in edges]), pa.array([names[b] for _, b in edges])
    )
    expected = reference_components(edges, n)
    index = {name: i for i, name in enumerate(names)}
    rows = np.array([index[x] for x in nodes.to_pylist()])
    # Same partition: labels and the oracle's roots map one-to-one.
    pairs = set(zip(labels.tolist(), expected[rows].tolist(), strict=True))
    assert len(pairs) == len(set(labels.tolist())) == len(set(expected[rows].tolist()))


def test_groups_table_schema_sizes_and_membership():
    table = build_groups(
        pairs_of([("a", "b"), ("b", "c"), ("x", "y")]),
        attributes({k: (10, 10, 1) for k in "abcxy"}),
        ["pixels", "file_size", "id"],
    )
    assert table.schema == GROUPS_SCHEMA
    rows = {r["image_id"]: r for r in table.to_pylist()}
    assert set(rows) == set("abcxy")  # only images that are in some pair
    assert rows["a"]["group_id"] == rows["b"]["group_id"] == rows["c"]["group_id"]
    assert rows["x"]["group_id"] == rows["y"]["group_id"] != rows["a"]["group_id"]
    assert {r["group_size"] for k, r in rows.items() if k in "abc"} == {3}
    assert sum(r["is_keeper"] for r in rows.values()) == 2


def test_group_id_depends_only_on_the_smallest_member():
    first = build_groups(pairs_of([("m", "q"), ("q", "z")]), attributes({}), ["id"])
    second = build_groups(
        pairs_of([("z", "m"), ("k0", "k1"), ("q", "m"), ("m", "r")]), attributes({}), ["id"]
    )
    gid = {r["image_id"]: r["group_id"] for r in second.to_pylist()}
    assert set(first["group_id"].to_pylist()) == {gid["m"]}
    assert gid["k0"] != gid["m"]
    assert gid["m"].startswith("g") and len(gid["m"]) == 33


def test_keeper_policy_pixels_then_file_size_then_id():
    attrs = attributes(
        {
            # group 1: b has the most pixels
            "a": (100, 100, 900),
            "b": (200, 100, 10),
            "c": (50, 50, 5000),
            # group 2: equal pixels, e has the largest file
            "d": (80, 60, 100),
            "e": (80, 60, 300),
            # group 3: equal pixels, unknown sizes: smallest id
            "f": (10, 10, None),
            "g": (10, 10, None),
        }
    )
    table = build_groups(
        pairs_of([("a", "b"), ("b", "c"), ("d", "e"), ("g", "f")]), attrs, ["pixels", "file_size"]
    )
    rows = {r["image_id"]: r for r in table.to_pylist()}
    keepers = {k for k, r in rows.items() if r["is_keeper"]}
    assert keepers == {"b", "e", "f"}
    assert rows["b"]["keep_reason"] == "largest pixel count"
    assert rows["e"]["keep_reason"] == "largest file"
    assert rows["f"]["keep_reason"] == "smallest image_id"
    assert rows["a"]["keep_reason"] == "duplicate of b"
    assert rows["g"]["keep_reason"] == "duplicate of f"


def test_policy_order_is_honoured():
    attrs = attributes({"a": (100, 100, 10), "b": (50, 50, 99)})
    by_size = build_groups(pairs_of([("a", "b")]), attrs, ["file_size", "pixels"])
    by_pixels = build_groups(pairs_of([("a", "b")]), attrs, ["pixels", "file_size"])
    assert [r["image_id"] for r in by_size.to_pylist() if r["is_keeper"]] == ["b"]
    assert [r["image_id"] for r in by_pixels.to_pylist() if r["is_keeper"]] == ["a"]


def test_policy_validation_and_empty_pairs():
    with pytest.raises(ValueError, match="unknown"):
        check_policy(["pixels", "colourfulness"])
    assert check_policy(["file_size"]) == ["file_size", "id"]
    assert check_policy(["id", "pixels"]) == ["id"]
    empty = build_groups(
        pairs_of([]).cast(pa.schema([("image_id_a", pa.string()), ("image_id_b", pa.string())])),
        attributes({}),
        ["pixels"],
    )
    assert empty.num_rows == 0 and empty.schema == GROUPS_SCHEMA
