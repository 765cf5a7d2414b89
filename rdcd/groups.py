"""Duplicate groups: connected components over the pairs, a stable id, one keeper per group.

Only images that appear in at least one pair belong to a group (a group has >= 2 members);
an image with no duplicate is simply absent from the groups table. Everything is vectorised
(scipy's sparse connected components, numpy sorts), so 10^8 pairs cost seconds, not hours.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from rdcd.tables import GROUPS_SCHEMA

# Criterion -> the keep_reason a keeper gets when this criterion decided. "id" is the final,
# always-decisive tie-break (image ids are unique), so every group gets exactly one keeper.
KEEP_CRITERIA = {
    "pixels": "largest pixel count",
    "file_size": "largest file",
    "id": "smallest image_id",
}
GROUP_HASH_KEYS = ("rdcd-group-id-01", "rdcd-group-id-02")
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def check_policy(policy: Sequence[str]) -> list[str]:
    """The keeper criteria in order, with the id tie-break appended when missing."""
    unknown = [c for c in policy if c not in KEEP_CRITERIA]
    if unknown:
        raise ValueError(
            f"groups.keep_policy: unknown {unknown}; choose from {list(KEEP_CRITERIA)}"
        )
    criteria = list(dict.fromkeys(policy))
    if "id" not in criteria:
        criteria.append("id")
    return criteria[: criteria.index("id") + 1]


def components(a: pa.Array, b: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(node image_ids, component label per node) of the graph with edges a[i]-b[i]."""
    both = pa.chunked_array([a, b]).combine_chunks().dictionary_encode()
    nodes = both.dictionary
    codes = both.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    n, m = len(nodes), len(a)
    graph = coo_matrix((np.ones(m, dtype=np.int8), (codes[:m], codes[m:])), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return nodes, labels.astype(np.int64)


def stable_group_ids(nodes: pa.Array, labels: np.ndarray) -> pa.Array:
    """Per node: 'g' + 128-bit hash of the group's smallest image_id.

    It depends only on that member, so a group keeps its id across runs as long as its
    smallest image_id stays in it, whatever else joins or leaves.
    """
    rank = np.empty(len(nodes), dtype=np.int64)
    rank[pc.sort_indices(nodes).to_numpy()] = np.arange(len(nodes))
    by_rank = np.argsort(rank)
    _, first = np.unique(labels[by_rank], return_index=True)
    smallest = pc.take(nodes, pa.array(by_rank[first])).to_numpy(zero_copy_only=False)
    words = [pd.util.hash_array(smallest.astype(object), hash_key=k) for k in GROUP_HASH_KEYS]
    ids = _hex_strings(np.stack(words, axis=1))
    return pc.take(ids, pa.array(labels))


def _hex_strings(words: np.ndarray) -> pa.Array:
    """(n, w) uint64 -> n strings 'g' + 16*w hex digits, without a Python loop."""
    raw = words.astype(">u8").view(np.uint8).reshape(len(words), -1)
    digits = np.empty((len(words), 1 + 2 * raw.shape[1]), dtype=np.uint8)
    digits[:, 0] = ord("g")
    digits[:, 1::2] = _HEX[raw >> 4]
    digits[:, 2::2] = _HEX[raw & 15]
    width = digits.shape[1]
    offsets = np.arange(0, (len(words) + 1) * width, width, dtype=np.int32)
    return pa.StringArray.from_buffers(
        len(words), pa.py_buffer(offsets), pa.py_buffer(digits.tobytes())
    )


def _attribute(attributes: pa.Table, nodes: pa.Array, name: str) -> np.ndarray:
    """attributes[name] aligned to nodes; -1 where unknown (no row, null, or no column)."""
    if name not in attributes.column_names:
        return np.full(len(nodes), -1, dtype=np.int64)
    where = pc.index_in(nodes, value_set=attributes["image_id"].cast(pa.string()))
    values = pc.take(attributes[name].cast(pa.int64()), where)
    return pc.fill_null(values, -1).to_numpy().astype(np.int64)


def build_groups(pairs: pa.Table, attributes: pa.Table, policy: Sequence[str]) -> pa.Table:
    """The groups table (GROUPS_SCHEMA) for pairs (image_id_a, image_id_b).

    attributes: image_id plus optional width, height, file_size, used by the keep policy.
    """
    criteria = check_policy(policy)
    if pairs.num_rows == 0:
        return GROUPS_SCHEMA.empty_table()
    a = pairs["image_id_a"].combine_chunks()
    b = pairs["image_id_b"].combine_chunks()
    nodes, labels = components(a, b)
    width = _attribute(attributes, nodes, "width")
    height = _attribute(attributes, nodes, "height")
    values = {
        "pixels": np.where((width >= 0) & (height >= 0), width * height, -1),
        "file_size": _attribute(attributes, nodes, "file_size"),
    }
    rank = np.empty(len(nodes), dtype=np.int64)
    rank[pc.sort_indices(nodes).to_numpy()] = np.arange(len(nodes))
    values["id"] = -rank  # every criterion is "larger wins"; the smallest id has the largest -rank
    keys = [-values[c] for c in reversed(criteria)]  # lexsort: last key is primary
    order = np.lexsort((*keys, labels))
    sorted_labels = labels[order]
    is_first = np.ones(len(order), dtype=bool)
    is_first[1:] = sorted_labels[1:] != sorted_labels[:-1]
    keeper_pos = np.flatnonzero(is_first)
    keeper_rows = order[keeper_pos]
    runner_up_rows = order[keeper_pos + 1]  # every group has >= 2 members
    reason = np.full(len(keeper_rows), len(criteria) - 1)
    for i, criterion in reversed(list(enumerate(criteria))):
        better = values[criterion][keeper_rows] > values[criterion][runner_up_rows]
        reason = np.where(better, i, reason)
    keeper_of_label = np.empty(labels.max() + 1, dtype=np.int64)
    keeper_of_label[sorted_labels[keeper_pos]] = keeper_rows
    is_keeper = np.zeros(len(nodes), dtype=bool)
    is_keeper[keeper_rows] = True
    reasons = pa.array([KEEP_CRITERIA[c] for c in criteria], pa.string())
    reason_of_label = np.empty(labels.max() + 1, dtype=np.int64)
    reason_of_label[sorted_labels[keeper_pos]] = reason
    keeper_ids = pc.take(nodes, pa.array(keeper_of_label[labels]))
    keep_reason = pc.if_else(
        pa.array(is_keeper),
        pc.take(reasons, pa.array(reason_of_label[labels])),
        pc.binary_join_element_wise("duplicate of ", keeper_ids, ""),
    )
    table = pa.table(
        {
            "image_id": nodes,
            "group_id": stable_group_ids(nodes, labels),
            "group_size": pa.array(np.bincount(labels)[labels].astype(np.int32)),
            "is_keeper": pa.array(is_keeper),
            "keep_reason": keep_reason,
        },
        schema=GROUPS_SCHEMA,
    )
    return table.sort_by(
        [("group_id", "ascending"), ("is_keeper", "descending"), ("image_id", "ascending")]
    )
