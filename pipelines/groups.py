"""The groups stage: pairs/ -> groups/ (connected components, stable group ids, keepers).

The keep policy needs each grouped image's pixel count (from the descriptors table) and, for
`file_size`, its byte size: descriptors do not record it, so it is looked up (a stat per grouped
image, in threads) for plain file/object URIs; images inside tar or Parquet containers get
"unknown" and the next criterion decides.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import stage
from pipelines.index import list_parquet, read_parquet
from pipelines.pairs import write_parts
from rdcd import groups as gr
from rdcd import index as ix
from rdcd import storage as st

ATTRIBUTE_COLUMNS = ["image_id", "uri", "width", "height"]


def read_table(folder_url: str, columns: list[str] | None, options, kind: str) -> pa.Table:
    """All part files of a stage folder (pairs/, groups/, ...) as one table."""
    files = list_parquet(folder_url, options)
    if not files:
        raise ValueError(f"{folder_url}: no {kind} Parquet files; run the stage first")
    return pa.concat_tables([read_parquet(url, columns, options, kind) for url, _ in files])


def image_attributes(meta: dict[str, Any], wanted: pa.Array, options) -> pa.Table:
    """image_id, uri, width, height of the wanted image ids, read file by file."""
    parts = []
    for f in meta["descriptors"]["files"]:
        table = read_parquet(f["url"], ATTRIBUTE_COLUMNS, options)
        parts.append(table.filter(pc.is_in(table["image_id"], value_set=wanted)))
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in ATTRIBUTE_COLUMNS})


def file_sizes(uris: pa.Array, threads: int, options) -> pa.Array:
    """Byte size per URI (null when unknown: containers, unreachable objects)."""

    def size(uri: str | None) -> int | None:
        if not uri or "::" in uri or "#" in uri:
            return None
        try:
            return int(st.get_filesystem(uri, options).size(st.strip_protocol(uri)))
        except (OSError, ValueError):
            return None

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        return pa.array(list(pool.map(size, uris.to_pylist())), pa.int64())


def run_groups(index_url: str, out_url: str, config: dict[str, Any]) -> dict[str, Any]:
    """out_url/pairs -> out_url/groups; skipped when current."""
    options = st.StorageOptions.from_config(config["storage"])
    cfg = config["groups"]
    policy = gr.check_policy(cfg["keep_policy"])
    if cfg["file_sizes"] not in ("stat", "off"):
        raise ValueError(f"groups.file_sizes must be stat or off, got {cfg['file_sizes']!r}")
    pairs_url, groups_url = st.join(out_url, "pairs"), st.join(out_url, "groups")
    pairs_manifest = st.read_manifest(pairs_url, options) or {}
    if pairs_manifest.get("status") != "complete":
        raise ValueError(f"{pairs_url}: the pairs stage has not completed")
    print_ = stage.fingerprint(pairs_manifest.get("fingerprint"), policy, cfg["file_sizes"])
    current = stage.current_manifest(groups_url, print_, options)
    if current is not None:
        return {**current["counts"], "skipped": True}
    stage.reset_if_stale(groups_url, print_, options)
    started = time.perf_counter()
    pairs = read_table(pairs_url, ["image_id_a", "image_id_b"], options, "pairs")
    ends = pairs["image_id_a"].chunks + pairs["image_id_b"].chunks
    members = pc.unique(pa.chunked_array(ends, type=pa.string()))
    meta = ix.read_meta(index_url, options)
    attributes = image_attributes(meta, members, options)
    if cfg["file_sizes"] == "stat" and "file_size" in policy:
        sizes = file_sizes(attributes["uri"], int(cfg["stat_threads"]), options)
        attributes = attributes.append_column("file_size", sizes)
    groups = gr.build_groups(pairs, attributes, policy)
    write_parts(groups, groups_url, options)
    keepers = int(pc.sum(groups["is_keeper"]).as_py() or 0)
    sizes_known = (
        attributes.num_rows - attributes["file_size"].null_count
        if "file_size" in attributes.column_names
        else 0
    )
    counts = {
        "groups": keepers,
        "grouped_images": groups.num_rows,
        "to_delete": groups.num_rows - keepers,
        "largest_group": int(pc.max(groups["group_size"]).as_py() or 0),
        "file_sizes_known": sizes_known,
    }
    st.write_manifest(
        groups_url,
        {
            "status": "complete",
            "job": "groups",
            "fingerprint": print_,
            "keep_policy": policy,
            "counts": counts,
            "timings": {"total_s": round(time.perf_counter() - started, 3)},
            "config": {"groups": cfg},
        },
        options,
    )
    return {**counts, "skipped": False}
