"""`rdcd dedup INPUT OUT`: the main job. Images (or an existing descriptors table) in; pairs,
groups and a report out.

    embed      OUT/descriptors, OUT/errors      (skipped when INPUT already is descriptors)
    index      OUT/index                         (rdcd index)
    pairs      OUT/pairs, OUT/near_misses        (kNN + exact re-score + exact duplicates)
    groups     OUT/groups                        (components, keepers)
    report     OUT/report/index.html             (rdcd report)

Each stage writes its own manifest.json and is skipped when its output is current (same
inputs, same settings), so re-running the same command is a no-op and a killed run resumes.
OUT/dedup.json records the whole run: run_id, the stages, counts, timings and the config.
(OUT/manifest.json belongs to the embed stage when dedup embeds.)
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from tqdm import tqdm

from pipelines import stage
from pipelines.groups import run_groups
from pipelines.index import find_descriptors, run_index
from pipelines.jobs import JobError, module_main
from pipelines.pairs import run_pairs
from pipelines.report import run_report
from rdcd import storage as st
from rdcd.runtime import init_ray

COMMAND = "dedup"
HELP = (
    "Find near-duplicate images: embed -> index -> all-pairs -> groups -> report. INPUT is "
    "images (folder, .tar shards, Parquet with bytes) or an existing descriptors table."
)
RUN_FILE = "dedup.json"
STAGES = ("embed", "index", "pairs", "groups", "report")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help="images or a descriptors table (any fsspec URL)")
    parser.add_argument("output", help="output folder (local path or s3://...)")
    parser.add_argument(
        "--threshold",
        type=float,
        help="cosine threshold (default: match.threshold, else the "
        "model card's recommended threshold)",
    )
    parser.add_argument(
        "--background", help="descriptors of a background set: turns on score normalisation"
    )
    parser.add_argument("--model", help="model card for embedding (overrides model.card)")
    parser.add_argument("--run-id", help="run id written into pairs (default: kept from OUT)")


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    if args.model:
        config["model"]["card"] = args.model
    if args.background:
        config["match"]["background"] = args.background
    init_ray(config["ray"], args.address)
    return run_dedup(args.input, args.output, config, threshold=args.threshold, run_id=args.run_id)


def resolve_threshold(
    config: dict[str, Any], flag: float | None, model_id: str, options: st.StorageOptions
) -> tuple[float, str]:
    """--threshold, else match.threshold, else the recommendation on the model's card."""
    if flag is not None:
        return float(flag), "--threshold"
    if config["match"]["threshold"] is not None:
        return float(config["match"]["threshold"]), "match.threshold"
    from rdcd.cards import ModelCardError, read_card

    spec = str(config["model"]["card"])
    try:
        card = read_card(spec, options)
    except (ModelCardError, OSError) as exc:
        raise JobError(f"no threshold given and model card {spec!r} is unreadable: {exc}") from exc
    if card.model_id != model_id:
        raise JobError(
            f"no threshold given, and the descriptors come from {model_id}, not from the "
            f"model card {spec!r} ({card.model_id}); pass --threshold or --model"
        )
    if card.threshold is None:
        raise JobError(f"model card {spec!r} has no recommended threshold; pass --threshold")
    return float(card.threshold), f"model card {spec}"


def _run_id(out_url: str, flag: str | None, options: st.StorageOptions) -> str:
    """--run-id, else the one this OUT already has (re-runs stay no-ops), else a new one."""
    if flag:
        return flag
    url = st.join(out_url, RUN_FILE)
    if st.exists(url, options):
        previous = st.read_json(url, options).get("run_id")
        if previous:
            return str(previous)
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def run_dedup(
    input_url: str,
    out_url: str,
    config: dict[str, Any],
    *,
    threshold: float | None = None,
    run_id: str | None = None,
) -> dict[str, Any]:
    """The whole dedup of input_url into out_url; returns the one-screen summary."""
    init_ray(config["ray"])
    options = st.StorageOptions.from_config(config["storage"])
    run_id = _run_id(out_url, run_id, options)
    record: dict[str, Any] = {
        "job": COMMAND,
        "status": "running",
        "run_id": run_id,
        "input": input_url,
        "stages": {},
        "config": stage.redacted(config),
    }
    started = time.perf_counter()
    bar = tqdm(total=len(STAGES), desc="dedup", unit="stage")

    def finished(name: str, t0: float, result: dict[str, Any]) -> None:
        record["stages"][name] = {"seconds": round(time.perf_counter() - t0, 3), **result}
        bar.update(1)

    bar.set_postfix_str("embed")
    t0 = time.perf_counter()
    descriptors_url = find_descriptors(input_url, options)
    errors = 0
    if descriptors_url is None:
        from pipelines.embed import run_embed

        embedded = run_embed(input_url, out_url, config)
        descriptors_url = st.join(out_url, "descriptors")
        errors = int(embedded["errors"])
        finished(
            "embed",
            t0,
            {
                "skipped": False,
                "descriptors": descriptors_url,
                "errors": errors,
                "summary": embedded,
            },
        )
    else:
        embed_manifest = st.read_manifest(input_url, options) or {}
        errors = int(embed_manifest.get("counts", {}).get("errors", 0))
        finished(
            "embed",
            t0,
            {
                "skipped": True,
                "descriptors": descriptors_url,
                "reason": "INPUT is a descriptors table",
            },
        )

    bar.set_postfix_str("index")
    t0 = time.perf_counter()
    index_url = st.join(out_url, "index")
    indexed = run_index(descriptors_url, index_url, config)
    meta = indexed.pop("meta")
    finished(
        "index",
        t0,
        {
            "skipped": indexed["skipped"],
            "factory": meta["factory"],
            "vectors": meta["counts"]["vectors"],
            "bytes_per_vector": indexed["bytes_per_vector"],
        },
    )

    bar.set_postfix_str("pairs")
    t0 = time.perf_counter()
    value, source = resolve_threshold(config, threshold, meta["model_id"], options)
    paired = run_pairs(
        index_url,
        out_url,
        config,
        threshold=value,
        run_id=run_id,
        background_url=config["match"]["background"],
    )
    finished("pairs", t0, {"threshold": value, "threshold_source": source, **paired})

    bar.set_postfix_str("groups")
    t0 = time.perf_counter()
    grouped = run_groups(index_url, out_url, config)
    finished("groups", t0, grouped)

    bar.set_postfix_str("report")
    t0 = time.perf_counter()
    reported = run_report(out_url, config)
    finished("report", t0, reported)
    bar.close()

    record.update(
        status="complete",
        model_id=meta["model_id"],
        wall_s=round(time.perf_counter() - started, 3),
        outputs={name: st.join(out_url, name) for name in ("pairs", "groups", "index")}
        | {"report": reported["report"], "descriptors": descriptors_url},
    )
    st.write_json_atomic(st.join(out_url, RUN_FILE), record, options)
    skipped = [name for name in STAGES if record["stages"][name].get("skipped")]
    return {
        "run id": run_id,
        "images": meta["counts"]["vectors"],
        "errors": errors,
        "threshold": f"{value:g} ({source})",
        "pairs": paired["pairs"],
        "exact pairs": paired["exact_pairs"],
        "groups": grouped["groups"],
        "duplicates to delete": grouped["to_delete"],
        "stages skipped (current)": ", ".join(skipped) or "none",
        "pairs table": st.join(out_url, "pairs"),
        "groups table": st.join(out_url, "groups"),
        "report": reported["report"],
        "run record": st.join(out_url, RUN_FILE),
    }


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
