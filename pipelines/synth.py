"""`rdcd synth ORIGINALS OUT`: a DISC2021-style labelled benchmark from any folder of images.

OUT/references/*.jpg, OUT/queries/*.jpg, OUT/ground_truth.csv (query_id, reference_id; empty
for distractor queries), OUT/dedup/images/*.jpg + OUT/dedup/groups.csv (image_id, group_id),
and OUT/manifest.json (roles, every query's edit chain, settings). What is drawn is decided by
rdcd.synth; this job reads, renders and publishes atomically.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from typing import Any

from PIL import Image
from tqdm import tqdm

from pipelines.jobs import JobError, module_main
from rdcd import storage
from rdcd.metrics import IMAGE_EXTENSIONS
from rdcd.preprocess import ImageError, decode_image
from rdcd.synth import (
    Plan,
    SynthSettings,
    edit_table,
    encode_jpeg,
    limit_side,
    plan_benchmark,
    render_query,
)

COMMAND = "synth"
HELP = "make a labelled copy-detection (and dedup) benchmark from a folder of images"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("originals", help="folder or prefix of original images (any fsspec URL)")
    parser.add_argument("out", help="output folder (replaced when the request changed)")
    parser.add_argument("--seed", type=int, help="random seed (default: synth.seed)")


def list_originals(url: str, options: storage.StorageOptions) -> dict[str, int]:
    """Image files under url (recursive): path relative to url -> size in bytes, sorted."""
    fs = storage.get_filesystem(url, options)
    root = storage.strip_protocol(url).rstrip("/")
    if not fs.isdir(root):
        raise JobError(f"originals folder not found: {url}")
    found = {}
    for path, info in fs.find(root, detail=True).items():
        relative = path[len(root) :].lstrip("/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue  # hidden files and folders, as `rdcd embed` skips them
        if os.path.splitext(relative)[1].lower() in IMAGE_EXTENSIONS:
            found[relative] = int(info.get("size") or 0)
    return dict(sorted(found.items()))


class Originals:
    """Reads originals on demand (decoded, upright, capped at max_side), keeping a few fillers."""

    def __init__(
        self,
        url: str,
        options: storage.StorageOptions,
        settings: SynthSettings,
        max_pixels: int,
    ) -> None:
        self.fs = storage.get_filesystem(url, options)
        self.root = storage.strip_protocol(url).rstrip("/")
        self.settings = settings
        self.max_pixels = max_pixels
        self.load = lru_cache(maxsize=32)(self._load)

    def read_bytes(self, relative: str) -> bytes:
        with self.fs.open(f"{self.root}/{relative}", "rb") as handle:
            return handle.read()

    def _load(self, relative: str) -> Image.Image:
        img = decode_image(self.read_bytes(relative), max_pixels=self.max_pixels, draft=False)
        return limit_side(img, self.settings.max_side)


def readable(originals: Originals, names: list[str]) -> tuple[list[str], list[dict[str, str]]]:
    """The originals that decode; the others are reported with their reason, never dropped."""
    good, skipped = [], []
    for name in tqdm(names, desc="checking originals", unit="img", leave=False):
        try:
            decode_image(
                originals.read_bytes(name), max_pixels=originals.max_pixels, target_size=64
            )
            good.append(name)
        except ImageError as exc:
            skipped.append({"original": name, "stage": exc.stage, "error": str(exc)})
    return good, skipped


def write_benchmark(
    folder: str, plan: Plan, names: list[str], originals: Originals, quality: int
) -> dict[str, int]:
    """Render everything into a local folder: references, queries, truth files, dedup set."""
    for sub in ("references", "queries", "dedup/images"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    by_source: dict[int, list] = {}
    for query in plan.queries:
        by_source.setdefault(query.source, []).append(query)
    sources = sorted(set(plan.reference_ids) | set(by_source))
    for source in tqdm(sources, desc="rendering", unit="original"):
        original = originals.load(names[source])
        if source in plan.reference_ids:
            _write(folder, "references", plan.reference_ids[source], encode_jpeg(original, quality))
        for query in by_source.get(source, []):
            filler = None if query.filler is None else originals.load(names[query.filler])
            image = render_query(original, query.chain, filler, originals.settings.max_side)
            _write(folder, "queries", query.query_id, encode_jpeg(image, quality))
    with open(os.path.join(folder, "ground_truth.csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["query_id", "reference_id"])
        for query in plan.queries:
            writer.writerow([query.query_id, query.reference_id or ""])
    groups = dedup_groups(plan)
    with open(os.path.join(folder, "dedup", "groups.csv"), "w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image_id", "group_id"])
        writer.writerows(sorted(groups.items()))
    return {
        "references": len(plan.reference_ids),
        "queries": len(plan.queries),
        "copy_queries": sum(q.reference_id is not None for q in plan.queries),
        "distractor_queries": sum(q.reference_id is None for q in plan.queries),
        "dedup_images": len(groups),
        "dedup_groups": len(set(groups.values())),
    }


def dedup_groups(plan: Plan) -> dict[str, str]:
    """image_id -> group_id over references + queries: a reference with its copies is one
    group; the distractor queries of one source are another; lone references are singletons."""
    group_of_source = {source: f"G{ref_id[1:]}" for source, ref_id in plan.reference_ids.items()}
    for number, source in enumerate(plan.roles.distractor_sources):
        group_of_source[source] = f"D{number:05d}"
    groups = {ref_id: group_of_source[source] for source, ref_id in plan.reference_ids.items()}
    for query in plan.queries:
        groups[query.query_id] = group_of_source[query.source]
    return groups


def _write(folder: str, sub: str, image_id: str, data: bytes) -> None:
    """One image into its folder and, with the same bytes, into the dedup folder."""
    for target in (os.path.join(folder, sub), os.path.join(folder, "dedup", "images")):
        with open(os.path.join(target, f"{image_id}.jpg"), "wb") as handle:
            handle.write(data)


def _publish(local: str, out: str, options: storage.StorageOptions) -> None:
    if storage.protocol_of(out) == "file":
        storage.publish_directory(local, out, options)
        return
    fs = storage.get_filesystem(out, options)
    remote_tmp = storage.strip_protocol(out).rstrip("/") + ".tmp-synth"
    if fs.exists(remote_tmp):
        fs.rm(remote_tmp, recursive=True)
    fs.put(local.rstrip("/") + "/", remote_tmp, recursive=True)
    protocol = storage.protocol_of(out)
    storage.publish_directory(f"{protocol}://{remote_tmp}", out, options)
    shutil.rmtree(local, ignore_errors=True)


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    section = dict(config["synth"])
    seed = section["seed"] if args.seed is None else args.seed
    try:
        settings = SynthSettings.from_config(section)
    except (TypeError, ValueError) as exc:
        raise JobError(f"bad synth settings: {exc}") from exc
    options = storage.StorageOptions.from_config(config["storage"])
    listing = list_originals(args.originals, options)
    names = list(listing)
    if len(names) < 2:
        raise JobError(f"{args.originals} holds {len(names)} image files; synth needs at least 2")
    originals = Originals(args.originals, options, settings, config["preprocess"]["max_pixels"])
    request = {
        "originals": args.originals,
        "listing": listing,  # names and sizes: a changed file rebuilds the benchmark
        "seed": seed,
        "settings": {k: v for k, v in section.items() if k != "seed"},
    }
    manifest = storage.read_manifest(args.out, options)
    if manifest and manifest.get("status") == "complete" and manifest.get("request") == request:
        return {"output": args.out, "status": "already complete", **manifest["counts"]}
    check_replaceable(args.originals, args.out, manifest, options)
    good, skipped = readable(originals, names)
    try:
        plan = plan_benchmark(len(good), settings, seed)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    local = _local_staging(args.out)
    try:
        counts = write_benchmark(local, plan, good, originals, settings.jpeg_quality)
        _publish(local, args.out, options)
    finally:
        shutil.rmtree(local, ignore_errors=True)
    storage.write_manifest(
        args.out,
        {
            "status": "complete",
            "stage": "synth",
            "request": request,
            "counts": {**counts, "originals": len(names), "skipped_originals": len(skipped)},
            "skipped": skipped,
            "roles": {
                role: [good[i] for i in getattr(plan.roles, role)]
                for role in ("copied", "distractor_references", "distractor_sources", "fillers")
            },
            "references": {ref: good[src] for src, ref in sorted(plan.reference_ids.items())},
            "queries": [
                {
                    "query_id": q.query_id,
                    "reference_id": q.reference_id,
                    "original": good[q.source],
                    "filler": None if q.filler is None else good[q.filler],
                    "edits": q.chain,
                }
                for q in plan.queries
            ],
            "edits": edit_table(),
            "edit_weights": settings.weights(),
        },
        options,
    )
    return {
        "output": args.out,
        "originals": len(names),
        "skipped (unreadable)": len(skipped),
        **counts,
    }


def check_replaceable(
    originals: str,
    out: str,
    manifest: dict[str, Any] | None,
    options: storage.StorageOptions,
) -> None:
    """OUT is replaced as a whole: refuse anything but an earlier synth output or nothing."""
    source = storage.strip_protocol(originals).rstrip("/") + "/"
    target = storage.strip_protocol(out).rstrip("/") + "/"
    if storage.protocol_of(originals) == storage.protocol_of(out) and (
        target.startswith(source) or source.startswith(target)
    ):
        raise JobError(f"{out} must not be inside {originals} or contain it")
    fs = storage.get_filesystem(out, options)
    path = storage.strip_protocol(out)
    if (manifest or {}).get("stage") != "synth" and fs.exists(path) and fs.ls(path):
        raise JobError(f"{out} exists and is not a `rdcd synth` output; choose a new folder")


def _local_staging(out: str) -> str:
    """A fresh local folder to render into: beside OUT when local (same-disk rename)."""
    if storage.protocol_of(out) == "file":
        final = storage.strip_protocol(out).rstrip("/")
        parent = os.path.dirname(final)
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{os.path.basename(final)}.tmp-", dir=parent)
    return tempfile.mkdtemp(prefix="rdcd-synth-")


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
