"""What one night costs against a history of N images, as the night (n) and history (N) grow.

Descriptor level: no images are embedded. For each N a history of N synthetic 64-d unit
descriptors is loaded straight into a history version (vectors, id map, a trained IVF index
added in parts; no pairs: only the nights are measured). Then nights of n new descriptors, a
few of them noisy copies of history images, run through `rdcd nightly` with the descriptors as
input: ingest (id diff), index add, new x history pairs, groups, commit.

    .venv/bin/python benchmarks/nightly.py                      # N = 1e5, 1e6; n = 1e3, 1e4
    .venv/bin/python benchmarks/nightly.py --history 20000 --nights 500 2000   # quick

Prints one table (night s: wall time of the whole `rdcd nightly` call; the stage columns are
its main parts); the ratios at the end are the point: cost grows with n, while N x10 adds
far less than x10 (and nothing like the x100 of recomputing all pairs).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.increment_search import part_slices
from pipelines.nightly import run_nightly
from pipelines.run_frame import ModelIdentity, Settings, model_identity, open_version
from rdcd import drift, live_index
from rdcd import index as ix
from rdcd.config import load_config
from rdcd.history import History, RunRecord
from rdcd.live_index import Span
from rdcd.runtime import init_ray
from rdcd.storage import StorageOptions
from rdcd.tables import descriptor_array, descriptors_schema

DIM = 64


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def tiny_card(folder: Path) -> str:
    """A real model card whose model_id labels the synthetic descriptors (d = DIM)."""
    import torch

    from rdcd import cards
    from rdcd.models import DescriptorModel

    torch.manual_seed(0)
    model = DescriptorModel("resnet18", kd_dim=32, dim=DIM)
    cards.save_model(model, cards.card_for(model, size=32, threshold=0.9), str(folder))
    return str(folder)


def load_history(config: dict, model: ModelIdentity, vectors: np.ndarray) -> None:
    """A version holding `vectors` as one run, indexed like a nightly rebuild would."""
    storage = StorageOptions()
    history = History(config["nightly"]["history"], storage)
    threshold = float(config["match"]["threshold"])
    settings = Settings.from_config(config, threshold)
    version = open_version(history, model, settings, "nightly")
    n = len(vectors)
    run_id = "bulk-load"
    ids = pa.table(
        {
            "row_id": pa.array(np.arange(n, dtype=np.int64)),
            "image_id": pa.array([f"h{i:09d}" for i in range(n)]),
            "uri": pa.nulls(n, pa.string()),
            "content_hash": pa.array([f"{i:064x}" for i in range(n)]),
            "width": pa.array(np.full(n, 640, dtype=np.int32)),
            "height": pa.array(np.full(n, 480, dtype=np.int32)),
            "bytes": pa.nulls(n, pa.int64()),
        }
    )
    live_index.write_run_vectors(version.url, run_id, vectors, ids, storage)
    params = ix.choose_params(n, DIM, config["index"])
    sample = vectors[ix.sample_ids(n, params.train_size, 0)].astype(np.float32)
    trained = live_index.train_generation(version.url, 0, params, sample, storage)
    rows = int(config["index"]["shard_vectors"])
    parts = []
    for part in part_slices(Span(run_id, 0, n), rows):
        chunk = vectors[part.start : part.start + part.count]
        parts.append(
            live_index.add_part(version.url, 0, part.name, chunk, part.start, storage)["part"]
        )
    sizes = live_index.total_sizes(version.url, 0, parts, storage)
    state = version.state()
    state.runs = [RunRecord(run_id, "bulk", "2026-01-01", 0, n, input="synthetic")]
    state.index = {
        "generation": 0,
        "kind": "ivf",
        "factory": params.factory,
        "nlist": params.nlist,
        "params": params.to_dict(),
        "baseline": drift.baseline(trained["residual"], sizes, n),
        "parts": parts,
    }
    version.save_state(state)
    version.mark("complete")
    history.switch(model.model_id, "benchmark bulk load")


def write_night(folder: Path, vectors: np.ndarray, names: list[str], model_id: str) -> None:
    n = len(vectors)
    table = pa.table(
        {
            "image_id": pa.array(names),
            "uri": pa.array([f"synthetic://{name}" for name in names]),
            "content_hash": pa.array([f"n{name}" for name in names]),
            "width": pa.array(np.full(n, 640, dtype=np.int32)),
            "height": pa.array(np.full(n, 480, dtype=np.int32)),
            "descriptor": descriptor_array(vectors),
            "model_id": pa.array([model_id] * n),
        },
        schema=descriptors_schema(DIM),
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "part-0.parquet")


def night_vectors(
    rng: np.random.Generator, history: np.ndarray, n: int, copies: float
) -> np.ndarray:
    """n new vectors; a share `copies` are noisy copies of random history images."""
    fresh = unit(rng.standard_normal((n, DIM)))
    k = int(n * copies)
    source = history[rng.choice(len(history), k, replace=False)].astype(np.float32)
    fresh[:k] = unit(source + 0.15 * rng.standard_normal((k, DIM)) / np.sqrt(DIM))
    return fresh.astype(np.float16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--nights", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--copies", type=float, default=0.05, help="share of copies per night")
    parser.add_argument("--workdir", help="where histories go (default: a temp dir, removed)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="rdcd-bench-nightly-"))
    base = load_config(
        overrides=[f"ray.num_cpus={args.cpus}", "match.threshold=0.9", "index.kind=ivf"]
    )
    init_ray(base["ray"])
    card = tiny_card(work / "model")
    model = model_identity(card, StorageOptions())
    rows = []
    for big_n in args.history:
        rng = np.random.default_rng(big_n)
        config = copy.deepcopy(base)
        config["model"]["card"] = card
        config["nightly"]["history"] = str(work / f"history-{big_n}")
        started = time.perf_counter()
        history = unit(rng.standard_normal((big_n, DIM))).astype(np.float16)
        load_history(config, model, history)
        load_s = time.perf_counter() - started
        for night, n in enumerate([100, *args.nights]):  # the first night warms Ray workers up
            folder = work / f"night-{big_n}-{n}"
            names = [f"n{night}-{i:08d}" for i in range(n)]
            write_night(folder, night_vectors(rng, history, n, args.copies), names, model.model_id)
            config["nightly"]["input"] = str(folder)
            config["nightly"]["date"] = f"2026-02-{night + 1:02d}"
            started = time.perf_counter()
            row = run_nightly(copy.deepcopy(config))
            night_s = time.perf_counter() - started
            if night == 0:
                continue
            stages = stage_seconds(row["stage_seconds"])
            rows.append(
                {
                    "N": big_n,
                    "n": n,
                    "load_s": load_s,
                    "night_s": night_s,
                    "ms_per_image": 1000 * night_s / n,
                    **stages,
                    "pairs_found": row["pairs"],
                }
            )
            print(f"N={big_n:,} n={n:,}: {night_s:.2f} s (history loaded in {load_s:.1f} s)")
    print_table(rows)
    print_ratios(rows)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def stage_seconds(text: str) -> dict[str, float]:
    stages = json.loads(text)
    return {
        name: stages.get(name, 0.0) for name in ("ingest", "index", "pairs", "groups", "commit")
    }


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'N history':>10} {'n new':>7} {'night s':>8} {'ms/new':>7} {'ingest':>7} "
        f"{'index':>7} {'pairs':>7} {'groups':>7} {'commit':>7} {'found':>6}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        print(
            f"{r['N']:>10,} {r['n']:>7,} {r['night_s']:>8.2f} {r['ms_per_image']:>7.2f} "
            f"{r['ingest']:>7.2f} {r['index']:>7.2f} {r['pairs']:>7.2f} {r['groups']:>7.2f} "
            f"{r['commit']:>7.2f} {r['pairs_found']:>6}"
        )


def print_ratios(rows: list[dict]) -> None:
    by = {(r["N"], r["n"]): r["night_s"] for r in rows}
    sizes, nights = sorted({r["N"] for r in rows}), sorted({r["n"] for r in rows})
    print()
    for big_n in sizes:
        if len(nights) > 1:
            lo, hi = nights[0], nights[-1]
            ratio = by[(big_n, hi)] / by[(big_n, lo)]
            print(f"N={big_n:,}: n x{hi / lo:g} -> night time x{ratio:.2f}")
    for n in nights:
        if len(sizes) > 1:
            lo, hi = sizes[0], sizes[-1]
            print(
                f"n={n:,}: N x{hi / lo:g} -> night time x{by[(hi, n)] / by[(lo, n)]:.2f} "
                f"(all pairs recomputed: x{(hi / lo) ** 2:g})"
            )


if __name__ == "__main__":
    main()
