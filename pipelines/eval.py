"""`rdcd eval PREDICTIONS TRUTH`: how good were these predictions?

Copy detection: PREDICTIONS is a predictions table (query_id, reference_id, score; the output of
`rdcd search`, Parquet or ISC-style CSV) and TRUTH is ground_truth.csv (query_id, reference_id).
Dedup: PREDICTIONS is a pairs table (image_id_a, image_id_b[, score]) or the output folder of
`rdcd dedup` (pairs/ and groups/) and TRUTH is groups.csv (image_id, group_id). TRUTH may also
be a `rdcd synth` output folder: the right file in it is picked. Ids are compared without
their image-file extension, so "R00001.jpg" (folder ids of `rdcd embed`) matches "R00001".
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd
import pyarrow.dataset as pads

from pipelines.jobs import JobError, module_main
from rdcd import metrics, storage

COMMAND = "eval"
HELP = "score predictions (copy detection) or duplicate pairs (dedup) against ground truth"

COPY_COLUMNS = ("query_id", "reference_id", "score")
PAIR_COLUMNS = ("image_id_a", "image_id_b")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", help="predictions or pairs: Parquet file/folder, or CSV")
    parser.add_argument("truth", help="ground_truth.csv, groups.csv or a `rdcd synth` folder")
    parser.add_argument("--json", dest="json_out", help="also write the metrics to this file")
    parser.add_argument(
        "--threshold",
        type=float,
        help="dedup: keep only pairs with score >= this (default: every pair given)",
    )


def read_table(url: str, options: storage.StorageOptions, columns: tuple[str, ...] = ()):
    """A Parquet file/folder or a CSV file as a DataFrame (ids as strings)."""
    fs = storage.get_filesystem(url, options)
    path = storage.strip_protocol(url)
    if not fs.exists(path):
        raise JobError(f"not found: {url}")
    if path.lower().endswith(".csv"):
        with fs.open(path, "rb") as handle:
            frame = pd.read_csv(handle, dtype=str, keep_default_na=False)
    else:
        dataset = pads.dataset(
            path,
            filesystem=storage.get_pyarrow_filesystem(url, options),
            format="parquet",
            exclude_invalid_files=True,
        )
        wanted = [c for c in columns if c in dataset.schema.names] or None
        frame = dataset.to_table(columns=wanted).to_pandas()
    return frame


def _inside(url: str, name: str, options: storage.StorageOptions) -> str | None:
    candidate = storage.join(url, name)
    return candidate if storage.exists(candidate, options) else None


def resolve_inputs(predictions: str, truth: str, options: storage.StorageOptions):
    """(kind, predictions url, groups url or None, truth file): what to compare with what."""
    fs = storage.get_filesystem(predictions, options)
    groups_url = None
    if fs.isdir(storage.strip_protocol(predictions)):
        pairs_url = _inside(predictions, "pairs", options)
        predictions_url = _inside(predictions, "predictions", options)
        if pairs_url:
            groups_url = _inside(predictions, "groups", options)
            predictions = pairs_url
        elif predictions_url:
            predictions = predictions_url
    columns = _columns(predictions, options)
    if {"query_id", "reference_id"} <= columns:
        kind = "copy_detection"
    elif set(PAIR_COLUMNS) <= columns:
        kind = "dedup"
    else:
        raise JobError(
            f"{predictions} has columns {sorted(columns)}: expected query_id, reference_id, score "
            "(copy detection) or image_id_a, image_id_b (dedup pairs)"
        )
    truth_fs = storage.get_filesystem(truth, options)
    if truth_fs.isdir(storage.strip_protocol(truth)):
        name = "ground_truth.csv" if kind == "copy_detection" else "dedup/groups.csv"
        truth = storage.join(truth, *name.split("/"))
    return kind, predictions, groups_url, truth


def _columns(url: str, options: storage.StorageOptions) -> set[str]:
    if url.lower().endswith(".csv"):
        fs = storage.get_filesystem(url, options)
        with fs.open(storage.strip_protocol(url), "rb") as handle:
            return set(pd.read_csv(handle, dtype=str, nrows=0).columns)
    dataset = pads.dataset(
        storage.strip_protocol(url),
        filesystem=storage.get_pyarrow_filesystem(url, options),
        format="parquet",
        exclude_invalid_files=True,
    )
    return set(dataset.schema.names)


def evaluate_copy_detection(predictions: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    _require(truth, ("query_id", "reference_id"), "ground truth")
    _require(predictions, COPY_COLUMNS, "predictions")
    pairs = metrics.ground_truth_pairs(truth["query_id"], truth["reference_id"])
    result = metrics.copy_detection_metrics(
        predictions["query_id"],
        predictions["reference_id"],
        predictions["score"],
        pairs,
        all_query_ids=[metrics.normalise_id(q) for q in truth["query_id"]],
    )
    return result.to_dict()


def evaluate_dedup(
    pairs: pd.DataFrame,
    truth: pd.DataFrame,
    groups: pd.DataFrame | None,
    threshold: float | None,
) -> dict[str, Any]:
    _require(truth, ("image_id", "group_id"), "groups")
    if threshold is not None:
        if "score" not in pairs:
            raise JobError("--threshold needs a score column in the pairs")
        pairs = pairs[pairs["score"] >= threshold]
        groups = None  # the written groups belong to the run's own threshold
    predicted = None
    if groups is not None:
        _require(groups, ("image_id", "group_id"), "predicted groups")
        predicted = pd.Series(groups["group_id"].to_numpy(), index=groups["image_id"].to_numpy())
    result = metrics.dedup_metrics(
        pairs["image_id_a"],
        pairs["image_id_b"],
        metrics.true_groups(truth["image_id"], truth["group_id"]),
        predicted,
    )
    return {**result.to_dict(), "threshold": threshold}


def _require(frame: pd.DataFrame, columns, what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise JobError(f"{what} lacks columns {missing} (has {list(frame.columns)})")


def format_table(kind: str, result: dict[str, Any]) -> str:
    """The headline numbers as a small readable table."""
    if kind == "copy_detection":
        rows = [
            ("µAP", result["uap"]),
            ("recall@P90", result["recall_at_p90"]),
            ("threshold@P90", result["threshold_at_p90"]),
            ("acc@1", result["acc_at_1"]),
            ("recall@10", result["recall_at_10"]),
            ("ground-truth pairs", result["n_ground_truth"]),
            ("queries (predicted)", f"{result['n_queries']} ({result['n_predicted_queries']})"),
            ("predictions", result["n_predictions"]),
        ]
    else:
        rows = [
            ("pair precision", result["pair_precision"]),
            ("pair recall", result["pair_recall"]),
            ("pair F1", result["pair_f1"]),
            ("B-cubed precision", result["bcubed_precision"]),
            ("B-cubed recall", result["bcubed_recall"]),
            ("B-cubed F1", result["bcubed_f1"]),
            ("pairs true / predicted", f"{result['n_true_pairs']} / {result['n_predicted_pairs']}"),
            ("images", result["n_images"]),
            (
                "groups true / predicted",
                f"{result['n_true_groups']} / {result['n_predicted_groups']}",
            ),
        ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'metric'.ljust(width)}  value", f"{'-' * width}  --------"]
    for name, value in rows:
        if value is None:
            shown = "n/a (precision never reaches 0.9)"
        elif isinstance(value, float):
            shown = f"{value:.4f}"
        else:
            shown = str(value)
        lines.append(f"{name.ljust(width)}  {shown}")
    return "\n".join(lines)


def evaluate(
    predictions: str,
    truth: str,
    options: storage.StorageOptions,
    threshold: float | None = None,
) -> tuple[str, dict[str, Any]]:
    """(kind, metrics dict) for the two inputs; shared by `rdcd eval` and the benchmarks."""
    kind, predictions_url, groups_url, truth_url = resolve_inputs(predictions, truth, options)
    truth_frame = read_table(truth_url, options)
    try:
        if kind == "copy_detection":
            frame = read_table(predictions_url, options, COPY_COLUMNS)
            frame["score"] = pd.to_numeric(frame["score"])
            result = evaluate_copy_detection(frame, truth_frame)
        else:
            frame = read_table(predictions_url, options, (*PAIR_COLUMNS, "score"))
            if "score" in frame:
                frame["score"] = pd.to_numeric(frame["score"])
            groups = (
                read_table(groups_url, options, ("image_id", "group_id")) if groups_url else None
            )
            result = evaluate_dedup(frame, truth_frame, groups, threshold)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    return kind, {"kind": kind, "predictions": predictions_url, "truth": truth_url, **result}


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    options = storage.StorageOptions.from_config(config["storage"])
    kind, result = evaluate(args.predictions, args.truth, options, args.threshold)
    print(format_table(kind, result))
    if args.json_out:
        storage.write_json_atomic(args.json_out, result, options)
    summary = {"kind": kind.replace("_", " "), "truth": result["truth"]}
    if args.json_out:
        summary["json"] = args.json_out
    return summary


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
