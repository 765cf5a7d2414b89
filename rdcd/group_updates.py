"""Groups that grow night by night: new pairs join or merge existing groups, the rest stay put.

The current snapshot lives in buckets, groups/bucket=NNNN/part.parquet, a group's rows all in
the bucket its group_id hashes to. A night touches only the groups its new pairs reach: it
finds them (one scan of the image_id and group_id columns), rebuilds their components from
the new pairs plus each old group as a star, and rewrites only the buckets involved. Group
ids and keepers come from rdcd.groups.build_groups, the batch code, so the result is the
batch result: a group's id is a hash of its smallest image_id, hence stable for every group
the night did not touch and for the surviving side of a merge.

Besides GROUPS_SCHEMA, snapshot rows carry model_id (every row says which model made it) and
the keeper inputs width, height and file_size (null: unknown), so that re-electing a keeper
never rescans the history.
Applying a night's changes is idempotent (drop the changed images' rows, add their new rows),
so a run killed half-way through rewriting buckets is finished by re-running it.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rdcd import storage as st
from rdcd.groups import build_groups
from rdcd.tables import GROUPS_SCHEMA

SNAPSHOT_SCHEMA = pa.schema(
    [
        *GROUPS_SCHEMA,
        pa.field("model_id", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("file_size", pa.int64()),
    ]
)
CHANGES_SCHEMA = pa.schema(
    [
        *GROUPS_SCHEMA,
        pa.field("previous_group_id", pa.string()),
        pa.field("change", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("model_id", pa.string()),
    ]
)
"""group_changes/date=D rows: every image whose groups row a run created or changed.
change: new_group (a group that did not exist), joined (an image entered an existing group),
merged (its group was absorbed by another), updated (same group; size or keeper changed)."""
ATTRIBUTES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("file_size", pa.int64()),
    ]
)
_BUCKET_KEY = "rdcd-grp-bucket1"  # pandas wants exactly 16 bytes


def bucket_of(group_ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The snapshot bucket of each group id (a fixed hash, stable across runs and machines)."""
    if isinstance(group_ids, pa.ChunkedArray):
        group_ids = group_ids.combine_chunks()
    values = group_ids.to_numpy(zero_copy_only=False).astype(object)
    hashed = pd.util.hash_array(values, hash_key=_BUCKET_KEY)
    return (hashed % np.uint64(buckets)).astype(np.int64)


def bucket_url(groups_url: str, bucket: int) -> str:
    return st.join(groups_url, f"bucket={bucket:04d}", "part.parquet")


def read_bucket(groups_url: str, bucket: int, storage: st.StorageOptions | None) -> pa.Table:
    url = bucket_url(groups_url, bucket)
    if not st.exists(url, storage):
        return SNAPSHOT_SCHEMA.empty_table()
    with st.get_filesystem(url, storage).open(st.strip_protocol(url), "rb") as handle:
        return pq.read_table(handle, schema=SNAPSHOT_SCHEMA)


def write_bucket(
    groups_url: str, bucket: int, table: pa.Table, storage: st.StorageOptions | None
) -> None:
    """Replace one bucket file atomically (an empty bucket is removed)."""
    url = bucket_url(groups_url, bucket)
    if table.num_rows == 0:
        if st.exists(url, storage):
            st.get_filesystem(url, storage).rm(st.strip_protocol(url))
        return
    buffer = io.BytesIO()
    pq.write_table(_sorted(table.cast(SNAPSHOT_SCHEMA)), buffer, compression="zstd")
    st.write_bytes_atomic(url, buffer.getvalue(), storage)


def find_members(
    groups_url: str,
    image_ids: pa.Array,
    buckets: int,
    storage: st.StorageOptions | None,
) -> pa.Table:
    """Full snapshot rows of every group that holds any of image_ids.

    Pass 1 scans image_id/group_id of every bucket for the ids; pass 2 reads whole rows from
    just the buckets of the groups found."""
    if len(image_ids) == 0:
        return SNAPSHOT_SCHEMA.empty_table()
    found = []
    for bucket in range(buckets):
        table = read_bucket(groups_url, bucket, storage)
        if table.num_rows:
            hit = pc.is_in(table["image_id"], value_set=image_ids)
            found.append(table.filter(hit).column("group_id").combine_chunks())
    if not found:
        return SNAPSHOT_SCHEMA.empty_table()
    group_ids = pc.unique(pa.chunked_array(found, pa.string()).combine_chunks())
    if len(group_ids) == 0:
        return SNAPSHOT_SCHEMA.empty_table()
    rows = []
    for bucket in np.unique(bucket_of(group_ids, buckets)):
        table = read_bucket(groups_url, int(bucket), storage)
        rows.append(table.filter(pc.is_in(table["group_id"], value_set=group_ids)))
    return pa.concat_tables(rows)


def update(
    old_rows: pa.Table,
    new_pairs: pa.Table,
    attributes: pa.Table,
    new_images: pa.Array,
    policy: Sequence[str],
    model_id: str,
    run_id: str,
) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """(new snapshot rows of the touched components, the changes table, counts).

    old_rows: snapshot rows of every group the new pairs reach (find_members); attributes:
    ATTRIBUTES_SCHEMA rows of the pair endpoints that were in no group; new_images: this run's
    image ids.
    """
    if new_pairs.num_rows == 0:
        return SNAPSHOT_SCHEMA.empty_table(), CHANGES_SCHEMA.empty_table(), _counts()
    first = _first_member(old_rows)
    edges = pa.table(
        {
            "image_id_a": pa.concat_arrays(
                [new_pairs["image_id_a"].combine_chunks(), old_rows["image_id"].combine_chunks()]
            ),
            "image_id_b": pa.concat_arrays([new_pairs["image_id_b"].combine_chunks(), first]),
        }
    )
    known = pa.concat_tables(
        [
            old_rows.select(ATTRIBUTES_SCHEMA.names).cast(ATTRIBUTES_SCHEMA),
            attributes.select(ATTRIBUTES_SCHEMA.names).cast(ATTRIBUTES_SCHEMA),
        ]
    )
    groups = build_groups(edges, known, policy)
    where = pc.index_in(groups["image_id"], value_set=known["image_id"])
    rows = pa.table(
        {
            **{name: groups[name] for name in GROUPS_SCHEMA.names},
            "model_id": pa.array([model_id] * groups.num_rows, pa.string()),
            "width": pc.take(known["width"], where),
            "height": pc.take(known["height"], where),
            "file_size": pc.take(known["file_size"], where),
        },
        schema=SNAPSHOT_SCHEMA,
    )
    previous_where = pc.index_in(rows["image_id"], value_set=old_rows["image_id"])
    previous = pc.take(old_rows["group_id"], previous_where)
    old_ids = pc.unique(old_rows["group_id"].combine_chunks())
    group_existed = pc.is_in(rows["group_id"], value_set=old_ids)
    change = pc.case_when(
        pc.make_struct(
            pc.invert(group_existed),
            pc.is_null(previous),
            pc.not_equal(previous, rows["group_id"]),
        ),
        "new_group",
        "joined",
        "merged",
        "updated",
    )
    changes = pa.table(
        {
            **{name: rows[name] for name in GROUPS_SCHEMA.names},
            "previous_group_id": previous,
            "change": change,
            "run_id": pa.array([run_id] * rows.num_rows, pa.string()),
            "model_id": rows["model_id"],
        },
        schema=CHANGES_SCHEMA,
    )
    changed = _only_changed(changes, old_rows)
    new_ids = pc.unique(rows["group_id"].combine_chunks())
    counts = _counts(
        groups_new=int(pc.sum(pc.invert(pc.is_in(new_ids, value_set=old_ids))).as_py() or 0),
        groups_changed=int(pc.count_distinct(changed["group_id"]).as_py()),
        groups_merged=int(pc.sum(pc.invert(pc.is_in(old_ids, value_set=new_ids))).as_py() or 0),
        images_joined_groups=int(
            pc.sum(pc.is_in(rows["image_id"], value_set=new_images)).as_py() or 0
        ),
    )
    return rows, changed, counts


def apply(
    groups_url: str,
    old_rows: pa.Table,
    rows: pa.Table,
    buckets: int,
    storage: st.StorageOptions | None,
) -> int:
    """Rewrite the buckets that held the touched groups or will hold them; idempotent."""
    if rows.num_rows == 0:
        return 0
    touched_images = rows["image_id"].combine_chunks()
    targets = bucket_of(rows["group_id"], buckets)
    involved = set(targets.tolist())
    if old_rows.num_rows:
        involved |= set(bucket_of(old_rows["group_id"], buckets).tolist())
    for bucket in sorted(involved):
        current = read_bucket(groups_url, bucket, storage)
        kept = current.filter(pc.invert(pc.is_in(current["image_id"], value_set=touched_images)))
        incoming = rows.filter(pa.array(targets == bucket))
        write_bucket(groups_url, bucket, pa.concat_tables([kept, incoming]), storage)
    return len(involved)


def read_snapshot(groups_url: str, buckets: int, storage: st.StorageOptions | None) -> pa.Table:
    """The whole current groups table (for reports and tests)."""
    tables = [read_bucket(groups_url, b, storage) for b in range(buckets)]
    return _sorted(pa.concat_tables(tables)) if tables else SNAPSHOT_SCHEMA.empty_table()


def _first_member(old_rows: pa.Table) -> pa.Array:
    """For each old row, the smallest image_id of its group: the hub of the star edges that
    keep an old group connected without its old pairs."""
    if old_rows.num_rows == 0:
        return pa.array([], pa.string())
    smallest = pa.TableGroupBy(old_rows.select(["group_id", "image_id"]), "group_id").aggregate(
        [("image_id", "min")]
    )
    where = pc.index_in(old_rows["group_id"], value_set=smallest["group_id"])
    return pc.take(smallest["image_id_min"], where).combine_chunks()


def _only_changed(changes: pa.Table, old_rows: pa.Table) -> pa.Table:
    """Drop rows identical to what the snapshot already said (a touched group's bystanders)."""
    if old_rows.num_rows == 0:
        return changes
    where = pc.index_in(changes["image_id"], value_set=old_rows["image_id"])
    same = pc.is_valid(where)
    for name in ("group_id", "group_size", "is_keeper", "keep_reason"):
        same = pc.and_(
            same, pc.fill_null(pc.equal(changes[name], pc.take(old_rows[name], where)), False)
        )
    return changes.filter(pc.invert(same))


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by(
        [("group_id", "ascending"), ("is_keeper", "descending"), ("image_id", "ascending")]
    )


def _counts(**values: int) -> dict[str, int]:
    names = ("groups_new", "groups_changed", "groups_merged", "images_joined_groups")
    return {name: int(values.get(name, 0)) for name in names}
