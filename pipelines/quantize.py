"""`rdcd quantize MODEL OUT --calibration IMAGES`: an int8 copy of a student for CPU fleets.

Reads up to quantize.images images of IMAGES (any input `rdcd embed` reads: folder, WebDataset
or Parquet bytes, local or s3://), calibrates a static int8 ONNX graph of MODEL on them
(rdcd.quantize), checks it against the fp32 model on a held-out part, and writes OUT: card.json
with its own model_id (the parent's id recorded) and model.int8.onnx. Use images like the ones
you will embed; the images the model was evaluated on should stay out. The card keeps the
parent's threshold: re-run `rdcd calibrate` on the int8 model to be exact.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from pipelines.jobs import JobError, module_main
from rdcd import cards, storage
from rdcd.preprocess import ImageError, load_rgb
from rdcd.quantize import QuantizationError, quantize_model
from rdcd.sources import SourceOptions, list_inputs, read_shard

COMMAND = "quantize"
HELP = "make an int8 copy of a model for fast CPU embedding (its own model_id)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="'default' or a model directory (any fsspec URL)")
    parser.add_argument("out", help="directory for the int8 model (card.json, model.int8.onnx)")
    parser.add_argument(
        "--calibration", required=True, help="images to calibrate on (folder, .tar, .parquet)"
    )
    parser.add_argument("--images", type=int, help="images to use (default: quantize.images)")


def spread(total: int, count: int) -> np.ndarray:
    """Up to count indices evenly spread over range(total), first and last included."""
    return np.unique(np.linspace(0, total - 1, num=min(count, total)).astype(int))


def calibration_pixels(
    url: str, count: int, size: int, config: dict[str, Any], options: storage.StorageOptions
) -> tuple[np.ndarray, int]:
    """(uint8 N x size x size x 3, undecodable inputs skipped): evenly spread over the listed
    inputs in their stable order, so the same inputs give the same int8 graph. From a folder
    only the picked files are read; tar and Parquet inputs are read whole, then picked from."""
    source_options = SourceOptions.from_config(config["input"])
    listing = list_inputs(url, source_options, options)
    if listing.layout == "files" and len(listing.objects) > count:
        names = [name for name, _ in listing.objects]
        picked = frozenset(names[i] for i in spread(len(names), count))
        listing = list_inputs(url, source_options, options, ids=picked)
    rows: list[bytes] = []
    for shard in listing.shards:
        for table in read_shard(shard, source_options, options):
            rows.extend(data for data in table.column("bytes").to_pylist() if data is not None)
    if not rows:
        raise JobError(f"no readable images under {url}")
    picks = spread(len(rows), count)
    pixels, bad = [], 0
    for index in tqdm(picks, desc="calibration images", unit="img", leave=False):
        try:
            pixels.append(load_rgb(rows[index], size=size)[0])
        except ImageError:
            bad += 1
    if not pixels:
        raise JobError(f"none of the {len(picks)} images picked under {url} could be decoded")
    return np.stack(pixels), bad


def run(args: argparse.Namespace, config: dict[str, Any]) -> dict[str, Any]:
    options = storage.StorageOptions.from_config(config["storage"])
    section = config["quantize"]
    count = int(args.images or section["images"])
    try:
        parent = cards.read_card(args.model, options)
    except cards.ModelCardError as exc:
        raise JobError(str(exc)) from exc
    if parent.quantization is not None:
        raise JobError(f"{args.model} is already an int8 model ({parent.model_id})")
    if storage.exists(storage.join(args.out, cards.CARD_FILE), options):
        raise JobError(f"{args.out} already holds a model; choose another directory")
    pixels, bad = calibration_pixels(args.calibration, count, parent.input.size, config, options)
    print(f"quantising {parent.model_id} on {len(pixels)} images ...", flush=True)
    try:
        result = quantize_model(
            args.model,
            pixels,
            args.out,
            calibration_source=args.calibration,
            check_fraction=float(section["check_fraction"]),
            min_mean_cosine=float(section["min_mean_cosine"]),
            storage=options,
        )
    except (QuantizationError, cards.ModelCardError) as exc:
        raise JobError(str(exc)) from exc
    return {
        "parent": f"{args.model} ({parent.model_id})",
        "int8 model": f"{args.out} ({result.card.model_id})",
        "calibration": f"{result.calibration_images} images ({bad} undecodable skipped)",
        "cosine to parent": (
            f"mean {result.cosine_mean:.4f}, min {result.cosine_min:.4f} "
            f"on {result.check_images} held-out images"
        ),
        "threshold": f"{result.card.threshold} (the parent's; re-run rdcd calibrate to refine)",
    }


if __name__ == "__main__":
    raise SystemExit(module_main(sys.modules[__name__]))
