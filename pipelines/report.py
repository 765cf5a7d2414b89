"""`rdcd report OUT`: OUT/report/index.html, a static gallery of a dedup output.

Shows a sample of duplicate groups (the largest first, then a seeded random sample of the
rest) with the keeper marked, and the pairs closest to the threshold from both sides (the
lowest-scoring pairs that were kept and the highest-scoring near misses that were not), which
is where a threshold is judged.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipelines import stage
from pipelines.groups import image_attributes, read_table
from pipelines.jobs import JobError, module_main
from rdcd import gallery
from rdcd import index as ix
from rdcd import storage as st

COMMAND = "report"
HELP = "Write OUT/report/index.html: thumbnails of duplicate groups and borderline pairs."
REPORT_FILE = "index.html"
TILES_PER_GROUP = 12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="the OUT folder of a finished `rdcd dedup`")


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    summary = run_report(args.output, config)
    return {
        "report": summary["report"],
        "groups shown": summary["groups_shown"],
        "borderline pairs shown": summary["pairs_shown"],
        "thumbnails": f"{summary['thumbnails']} ({summary['unreadable']} unreadable)",
    }


def _select_groups(groups: pa.Table, limit: int, seed: int) -> list[str]:
    sizes = groups.group_by("group_id").aggregate([("image_id", "count")])
    ranked = sizes.sort_by([("image_id_count", "descending"), ("group_id", "ascending")])
    ids = ranked["group_id"].to_pylist()
    largest = ids[: limit // 2]
    rest = ids[limit // 2 :]
    sample = random.Random(seed).sample(rest, min(len(rest), limit - len(largest)))
    return largest + sorted(sample)


def _borderline(pairs: pa.Table, near: pa.Table, count: int) -> list[dict[str, Any]]:
    """The count pairs closest to the threshold: half from each side when both have enough."""
    above = pairs.filter(pc.invert(pairs["exact"])).sort_by("score")
    below = near.sort_by([("score", "descending")])
    n_above = min(above.num_rows, max(count // 2, count - below.num_rows))
    n_below = min(below.num_rows, count - n_above)
    rows = [{**r, "above": True} for r in above.slice(0, n_above).to_pylist()]
    rows += [{**r, "above": False} for r in below.slice(0, n_below).to_pylist()]
    return sorted(rows, key=lambda r: -r["score"])


def run_report(out_url: str, config: dict[str, Any]) -> dict[str, Any]:
    options = st.StorageOptions.from_config(config["storage"])
    cfg = config["report"]
    manifests = {}
    for name in ("pairs", "groups"):
        manifests[name] = st.read_manifest(st.join(out_url, name), options)
        if not manifests[name] or manifests[name].get("status") != "complete":
            raise JobError(f"{out_url}: no complete {name}/ stage; run `rdcd dedup` first")
    report_url = st.join(out_url, "report")
    print_ = stage.fingerprint(
        manifests["pairs"]["fingerprint"], manifests["groups"]["fingerprint"], cfg
    )
    current = stage.current_manifest(report_url, print_, options)
    if current is not None:
        return {**current["counts"], "report": st.join(report_url, REPORT_FILE), "skipped": True}
    stage.reset_if_stale(report_url, print_, options)
    started = time.perf_counter()

    groups = read_table(st.join(out_url, "groups"), None, options, "groups")
    pairs = read_table(st.join(out_url, "pairs"), None, options, "pairs")
    near = read_table(st.join(out_url, "near_misses"), None, options, "near-miss")
    chosen = _select_groups(groups, int(cfg["max_groups"]), int(cfg["seed"]))
    members = groups.filter(pc.is_in(groups["group_id"], value_set=pa.array(chosen, pa.string())))
    borderline = _borderline(pairs, near, int(cfg["borderline_pairs"]))

    by_group: dict[str, list[dict[str, Any]]] = {g: [] for g in chosen}
    for row in members.to_pylist():
        by_group[row["group_id"]].append(row)
    keeper_of = {
        g: next(r["image_id"] for r in rows if r["is_keeper"]) for g, rows in by_group.items()
    }
    shown_ids = {r["image_id"] for rows in by_group.values() for r in rows[:TILES_PER_GROUP]}
    shown_ids |= {r[k] for r in borderline for k in ("image_id_a", "image_id_b")}
    wanted = set()
    for g, rows in by_group.items():
        wanted |= {tuple(sorted((keeper_of[g], r["image_id"]))) for r in rows}
    score_of = {
        (r["image_id_a"], r["image_id_b"]): r["score"]
        for r in pairs.filter(
            pc.is_in(pairs["image_id_a"], value_set=pa.array(sorted(shown_ids), pa.string()))
        ).to_pylist()
        if (r["image_id_a"], r["image_id_b"]) in wanted
    }

    meta = ix.read_meta(manifests["pairs"]["index"], options)
    attributes = image_attributes(meta, pa.array(sorted(shown_ids), pa.string()), options)
    info = {r["image_id"]: r for r in attributes.to_pylist()}
    thumbs = _thumbnails(info, config, options)

    def tile(image_id: str, keeper: bool = False, note: str = "") -> gallery.Tile:
        row = info.get(image_id, {})
        caption = f"{row.get('width', '?')}x{row.get('height', '?')}"
        return gallery.Tile(image_id, thumbs.get(image_id), caption, keeper, note)

    views = []
    for g in chosen:
        rows = sorted(by_group[g], key=lambda r: (not r["is_keeper"], r["image_id"]))
        view = gallery.GroupView(g, rows[0]["group_size"])
        for r in rows[:TILES_PER_GROUP]:
            pair = tuple(sorted((keeper_of[g], r["image_id"])))
            note = (
                ""
                if r["is_keeper"]
                else (
                    f"score to keeper {score_of[pair]:.3f}"
                    if pair in score_of
                    else "linked via others"
                )
            )
            view.tiles.append(tile(r["image_id"], r["is_keeper"], note or r["keep_reason"]))
        views.append(view)
    pair_views = [
        gallery.PairView(
            r["score"], r["above"], r["exact"], tile(r["image_id_a"]), tile(r["image_id_b"])
        )
        for r in borderline
    ]
    counts_g = manifests["groups"]["counts"]
    counts_p = manifests["pairs"]["counts"]
    summary = {
        "run": manifests["pairs"].get("run_id", ""),
        "model": meta["model_id"],
        "images": f"{meta['counts']['vectors']:,}",
        "pairs (exact)": f"{counts_p['pairs']:,} ({counts_p['exact_pairs']:,})",
        "groups": f"{counts_g['groups']:,}",
        "duplicates to delete": f"{counts_g['to_delete']:,}",
        "keep policy": ", ".join(manifests["groups"]["keep_policy"]),
    }
    threshold = float(manifests["pairs"]["threshold"])
    page = gallery.render(
        "rdcd duplicate report", summary, views, pair_views, threshold, int(cfg["thumb_px"])
    )
    page_url = st.join(report_url, REPORT_FILE)
    st.write_bytes_atomic(page_url, page.encode("utf-8"), options)
    counts = {
        "groups_shown": len(views),
        "pairs_shown": len(pair_views),
        "thumbnails": len(thumbs),
        "unreadable": sum(1 for v in thumbs.values() if v is None),
    }
    st.write_manifest(
        report_url,
        {
            "status": "complete",
            "job": COMMAND,
            "fingerprint": print_,
            "counts": counts,
            "timings": {"total_s": round(time.perf_counter() - started, 3)},
            "config": {"report": cfg},
        },
        options,
    )
    return {**counts, "report": page_url, "skipped": False}


def _thumbnails(info: dict[str, dict], config: dict[str, Any], options) -> dict[str, str | None]:
    """image_id -> thumbnail data URI (None when the image cannot be read any more)."""
    cfg = config["report"]
    px, max_pixels = int(cfg["thumb_px"]), int(config["preprocess"]["max_pixels"])
    column = str(config["input"]["parquet_bytes_column"])

    def one(item: tuple[str, dict]) -> tuple[str, str | None]:
        image_id, row = item
        try:
            data = gallery.read_image_bytes(row["uri"], options, column)
            return image_id, gallery.thumbnail(data, px, max_pixels)
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            return image_id, None

    with ThreadPoolExecutor(max_workers=max(1, int(cfg["fetch_threads"]))) as pool:
        return dict(pool.map(one, info.items()))


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
