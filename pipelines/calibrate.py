"""`rdcd calibrate PREDICTIONS TRUTH`: the threshold for a target precision, into a model card.

Scores come from a labelled run of the same model: `rdcd search` predictions with
ground_truth.csv, or `rdcd dedup` pairs with groups.csv (e.g. a `rdcd synth` benchmark of your
own images). The lowest threshold whose accepted pairs still reach the target precision
(default eval.target_precision = 0.99) is written as the card's recommended threshold, which
`rdcd dedup` then uses unless told otherwise. The shipped default model is never edited in
place: give --out to save a calibrated copy of it.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import pandas as pd

from pipelines.eval import COPY_COLUMNS, PAIR_COLUMNS, read_table, resolve_inputs
from pipelines.jobs import JobError, module_main
from rdcd import cards, metrics, storage
from rdcd.shipped import is_shipped

COMMAND = "calibrate"
HELP = "pick the score threshold for a target precision and write it into a model card"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", help="`rdcd search` predictions or `rdcd dedup` pairs")
    parser.add_argument("truth", help="ground_truth.csv, groups.csv or a `rdcd synth` folder")
    parser.add_argument(
        "--model", help="model to calibrate: 'default' or a model directory (default: model.card)"
    )
    parser.add_argument("--out", help="write a calibrated copy of the model here instead")
    parser.add_argument(
        "--target-precision",
        type=float,
        help="precision the threshold must reach (default: eval.target_precision)",
    )
    parser.add_argument("--dry-run", action="store_true", help="report only; write no card")
    parser.add_argument("--json", dest="json_out", help="also write the result to this file")


def labelled_scores(
    predictions: str, truth: str, options: storage.StorageOptions
) -> tuple[str, Any, Any, int, str]:
    """(kind, scores, labels, number of true matches, predictions url) for the inputs."""
    kind, predictions_url, _, truth_url = resolve_inputs(predictions, truth, options)
    truth_frame = read_table(truth_url, options)
    if kind == "copy_detection":
        frame = read_table(predictions_url, options, COPY_COLUMNS)
        gt = metrics.ground_truth_pairs(truth_frame["query_id"], truth_frame["reference_id"])
        scores, labels, positives = metrics.labelled_predictions(
            frame["query_id"], frame["reference_id"], pd.to_numeric(frame["score"]), gt
        )
    else:
        frame = read_table(predictions_url, options, (*PAIR_COLUMNS, "score"))
        if "score" not in frame:
            raise JobError(f"{predictions_url} has no score column to calibrate on")
        groups = metrics.true_groups(truth_frame["image_id"], truth_frame["group_id"])
        scores, labels, positives = metrics.labelled_pairs(
            frame["image_id_a"], frame["image_id_b"], pd.to_numeric(frame["score"]), groups
        )
    return kind, scores, labels, positives, predictions_url


def check_provenance(predictions: str, card: cards.ModelCard, options) -> None:
    """Refuse scores of another model, or scores that are not plain cosines."""
    folder = predictions.rstrip("/")
    for candidate in dict.fromkeys((folder, folder.rsplit("/", 1)[0])):
        manifest = storage.read_manifest(candidate, options)
        if not manifest:
            continue
        used = manifest.get("model_id")
        if used and card.model_id and used != card.model_id:
            raise JobError(
                f"the predictions were made by model {used}, not {card.model_id}; "
                "calibrate the model that produced them"
            )
        if manifest.get("score_normalisation"):
            raise JobError(
                "these scores are score-normalised (--background); a card threshold applies "
                "to plain cosine similarities: calibrate on a run without --background"
            )
        return


def copy_model(source: str, target: str, options: storage.StorageOptions) -> None:
    """Copy a model directory (weights or int8 graph first, card last) so the copy can be
    recalibrated."""
    source_dir = cards.resolve_model_dir(source)
    card = cards.read_card(source_dir, options)
    weights = card.quantization.file if card.quantization else cards.WEIGHTS_FILE
    for name in (weights, cards.CARD_FILE):
        data = storage.read_bytes(storage.join(source_dir, name), options)
        storage.write_bytes_atomic(storage.join(target, name), data, options)


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    options = storage.StorageOptions.from_config(config["storage"])
    target = args.target_precision or config["eval"]["target_precision"]
    model = args.model or config["model"]["card"]
    try:
        card = cards.read_card(model, options)
    except cards.ModelCardError as exc:
        raise JobError(str(exc)) from exc
    kind, scores, labels, positives, predictions_url = labelled_scores(
        args.predictions, args.truth, options
    )
    check_provenance(predictions_url, card, options)
    try:
        result = metrics.calibrate_threshold(scores, labels, target, n_positives=positives)
    except ValueError as exc:
        raise JobError(str(exc)) from exc
    payload = {"kind": kind, "model": model, "model_id": card.model_id, **result.to_dict()}
    if args.json_out:
        storage.write_json_atomic(args.json_out, payload, options)
    if result.threshold is None:
        raise JobError(
            f"no threshold reaches precision {target} on these {result.n_scored} scored pairs "
            f"(best {result.best_precision:.3f}); nothing written"
        )
    summary: dict[str, Any] = {
        "model": f"{model} ({card.model_id})",
        "labelled": f"{result.n_scored} scored pairs, {positives} true matches ({kind})",
        "threshold": f"{result.threshold:.4f}",
        "precision": f"{result.precision:.4f} (target {target})",
        "recall": f"{result.recall:.4f}",
        "previous threshold": card.threshold,
    }
    if args.dry_run:
        summary["written"] = "nothing (--dry-run)"
        return summary
    if is_shipped(model) and not args.out:
        raise JobError(
            f"threshold {result.threshold:.4f} found, but the shipped model '{model}' is not "
            "edited in place: use --out DIR to write a calibrated copy"
        )
    destination = args.out or cards.resolve_model_dir(model)
    try:
        if args.out:
            copy_model(model, args.out, options)
        cards.with_threshold(destination, result.threshold, options)
    except cards.ModelCardError as exc:
        raise JobError(f"{exc}; use --out DIR to write a calibrated copy") from exc
    summary["written"] = storage.join(destination, cards.CARD_FILE)
    return summary


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
