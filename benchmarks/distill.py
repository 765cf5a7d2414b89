"""Teacher vs students on a labelled copy-detection benchmark (not run in CI).

    python benchmarks/distill.py BENCH name=spec [name=spec ...] [--background DIR] [--json F]

BENCH is an `rdcd synth` folder (references/, queries/, ground_truth.csv). Each spec is what
rdcd.embedder.load_embedder takes: 'sscd' (the teacher; 'sscd@224' sets its input size),
'default' (the shipped model) or a model directory (e.g. a `rdcd train` run's model/).

For every model: descriptors of queries and references at the model's own input size, exact
top-10 references per query by inner product (METHOD.md §4.3), then µAP, recall@P90 and acc@1
as ISC2021 scores them (rdcd.metrics). With --background, also µAP_SN: each query's score
minus the mean of its top-3 background similarities (METHOD.md §4.4). images/s is the
embedding throughput on the benchmark's own pixels (decoding excluded), measured in this run
on this machine: compare the ratios, not the absolute numbers. The README section
"Training a model" says how the models were made.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import pandas as pd

from rdcd import metrics, sources
from rdcd.embedder import load_embedder
from rdcd.preprocess import ImageError, load_rgb

TOP_K = 10
BATCH = 32


def read_folder(url: str) -> list[tuple[str, bytes]]:
    listing = sources.list_inputs(url)
    rows = []
    for shard in listing.shards:
        for table in sources.read_shard(shard):
            for image_id, data in zip(
                table.column("image_id").to_pylist(), table.column("bytes").to_pylist(), strict=True
            ):
                if data is not None:
                    rows.append((image_id, data))
    return rows


def embed(embedder, images: list[tuple[str, bytes]]) -> tuple[list[str], np.ndarray, float]:
    """(ids, descriptors, seconds spent in embed() alone)."""
    ids, pixels = [], []
    for image_id, data in images:
        try:
            rgb, _ = load_rgb(data, size=embedder.input_size, policy=embedder.resize)
        except ImageError:
            continue
        ids.append(image_id)
        pixels.append(rgb)
    embedder.embed(np.stack(pixels[:2]))  # warm-up (ONNX Runtime allocates on the first call)
    outputs, seconds = [], 0.0
    for start in range(0, len(pixels), BATCH):
        batch = np.stack(pixels[start : start + BATCH])
        began = time.perf_counter()
        outputs.append(embedder.embed(batch))
        seconds += time.perf_counter() - began
    return ids, np.concatenate(outputs), seconds


def evaluate(
    query_ids, queries, ref_ids, refs, truth, background: np.ndarray | None
) -> dict[str, float | None]:
    scores = queries @ refs.T
    top = np.argsort(-scores, axis=1)[:, :TOP_K]
    rows = np.repeat(np.arange(len(query_ids)), top.shape[1])
    cols = top.reshape(-1)
    q = [query_ids[i] for i in rows]
    r = [ref_ids[j] for j in cols]
    raw = metrics.copy_detection_metrics(q, r, scores[rows, cols], truth, query_ids)
    result = {
        "uap": raw.uap,
        "recall_at_p90": raw.recall_at_p90 or 0.0,
        "acc_at_1": raw.acc_at_1,
    }
    if background is not None:
        neighbours = np.sort(queries @ background.T, axis=1)[:, -3:].mean(axis=1)
        normalised = scores[rows, cols] - neighbours[rows]
        sn = metrics.copy_detection_metrics(q, r, normalised, truth, query_ids)
        result["uap_sn"] = sn.uap
        result["recall_at_p90_sn"] = sn.recall_at_p90 or 0.0
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench", help="an `rdcd synth` folder")
    parser.add_argument(
        "models", nargs="+", help="name=spec[@size] (load_embedder spec; @size: teachers only)"
    )
    parser.add_argument("--background", help="images for score normalisation (µAP_SN)")
    parser.add_argument("--exclude", help="text file of background ids to leave out")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads per model")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    truth_frame = pd.read_csv(
        os.path.join(args.bench, "ground_truth.csv"), dtype=str, keep_default_na=False
    )
    truth = metrics.ground_truth_pairs(truth_frame["query_id"], truth_frame["reference_id"])
    queries_in = read_folder(os.path.join(args.bench, "queries"))
    refs_in = read_folder(os.path.join(args.bench, "references"))
    background_in = read_folder(args.background) if args.background else None
    if background_in is not None and args.exclude:
        from train.data import read_exclude

        excluded = read_exclude(args.exclude)
        background_in = [row for row in background_in if row[0] not in excluded]
    print(
        f"benchmark {args.bench}: {len(queries_in)} queries, {len(refs_in)} references, "
        f"{len(truth)} true pairs"
        + (f"; background {len(background_in)} images" if background_in else ""),
        flush=True,
    )
    table = []
    for item in args.models:
        name, _, spec = item.partition("=")
        spec, _, size = (spec or name).partition("@")
        embedder = load_embedder(
            spec, device="cpu", threads=args.threads, input_size=int(size) if size else None
        )
        query_ids, queries, q_seconds = embed(embedder, queries_in)
        ref_ids, refs, r_seconds = embed(embedder, refs_in)
        background = None
        if background_in:
            _, background, _ = embed(embedder, background_in)
        row = {
            "model": name,
            "spec": spec,
            "dim": embedder.dim,
            "input": embedder.input_size,
            **evaluate(query_ids, queries, ref_ids, refs, truth, background),
            "images_per_s": (len(query_ids) + len(ref_ids)) / (q_seconds + r_seconds),
        }
        table.append(row)
        print(json.dumps(row), flush=True)
    teacher_speed = next((r["images_per_s"] for r in table if r["spec"] == "sscd"), None)
    columns = ["model", "dim", "input", "uap", "recall_at_p90", "acc_at_1"]
    if args.background:
        columns += ["uap_sn", "recall_at_p90_sn"]
    columns += ["images_per_s"]
    print()
    print("| " + " | ".join(columns + (["speed vs teacher"] if teacher_speed else [])) + " |")
    print("|" + "---|" * (len(columns) + (1 if teacher_speed else 0)))
    for row in table:
        cells = [
            f"{row[c]:.3f}" if isinstance(row[c], float) and c != "images_per_s" else str(row[c])
            for c in columns
        ]
        cells[-1] = f"{row['images_per_s']:.1f}"
        if teacher_speed:
            cells.append(f"{row['images_per_s'] / teacher_speed:.1f}x")
        print("| " + " | ".join(cells) + " |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(table, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
