"""Perceptual-hash baselines, run the way their users run them, writing rdcd's tables.

    python benchmarks/baselines.py METHOD search QUERIES REFS OUT [--k 10]
    python benchmarks/baselines.py METHOD dedup IMAGES OUT [--max-distance D]

METHOD is one of HASHES: pHash from imagehash, PDQ from pdqhash (Meta's ThreatExchange hash),
or imagededup's PHash (its find_duplicates for dedup). Copy detection keeps the k references
with the smallest Hamming distance per query; dedup keeps pairs within the method's customary
distance. Scores are 1 - distance / bits, so higher is more similar, as in rdcd's tables.
Called by benchmarks/compare.py, one process per run, so its time and memory are measurable.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdcd.metrics import IMAGE_EXTENSIONS  # noqa: E402
from rdcd.tables import PREDICTIONS_SCHEMA  # noqa: E402


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def _phash_bits(paths: list[Path]) -> np.ndarray:
    import imagehash

    return np.stack([imagehash.phash(_rgb(p)).hash.reshape(-1) for p in paths]).astype(bool)


def _pdq_bits(paths: list[Path]) -> np.ndarray:
    import pdqhash

    return np.stack([pdqhash.compute(np.asarray(_rgb(p)))[0] for p in paths]).astype(bool)


def _imagededup_bits(paths: list[Path]) -> np.ndarray:
    from imagededup.methods import PHash

    hasher = PHash(verbose=False)
    codes = [hasher.encode_image(image_file=str(p)) for p in paths]
    return np.stack([np.unpackbits(np.frombuffer(bytes.fromhex(c), np.uint8)) for c in codes]) > 0


HASHES: dict[str, tuple[Callable[[list[Path]], np.ndarray], int]] = {
    # method -> (bits of each image, customary "same image" Hamming distance)
    "phash": (_phash_bits, 10),  # imagededup's default threshold for 64-bit pHash
    "pdq": (_pdq_bits, 31),  # ThreatExchange's recommended PDQ match distance
    "imagededup-phash": (_imagededup_bits, 10),
}


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances between rows of two bool matrices."""
    pa_, pb = np.packbits(a, axis=1), np.packbits(b, axis=1)
    return np.bitwise_count(pa_[:, None, :] ^ pb[None, :, :]).sum(axis=2, dtype=np.int32)


def search(method: str, queries: Path, refs: Path, out: Path, k: int) -> None:
    bits_of, _ = HASHES[method]
    query_paths, ref_paths = _images(queries), _images(refs)
    q_bits, r_bits = bits_of(query_paths), bits_of(ref_paths)
    n_bits = q_bits.shape[1]
    rows: dict[str, list] = {"query_id": [], "reference_id": [], "score": []}
    for start in range(0, len(query_paths), 256):
        distances = hamming(q_bits[start : start + 256], r_bits)
        top = np.argsort(distances, axis=1, kind="stable")[:, :k]
        for i, refs_of_query in enumerate(top):
            for j in refs_of_query:
                rows["query_id"].append(query_paths[start + i].relative_to(queries).as_posix())
                rows["reference_id"].append(ref_paths[j].relative_to(refs).as_posix())
                rows["score"].append(1.0 - distances[i, j] / n_bits)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=PREDICTIONS_SCHEMA), out / "predictions.parquet")


def dedup(method: str, images: Path, out: Path, max_distance: int | None) -> None:
    bits_of, customary = HASHES[method]
    limit = customary if max_distance is None else max_distance
    if method == "imagededup-phash":
        a, b, s = _imagededup_find_duplicates(images, limit)
    else:
        paths = _images(images)
        bits = bits_of(paths)
        names = [p.relative_to(images).as_posix() for p in paths]
        a, b, s = [], [], []
        for start in range(0, len(paths), 256):
            distances = hamming(bits[start : start + 256], bits)
            for i, j in zip(*np.nonzero(distances <= limit), strict=True):
                if start + i < j:
                    a.append(names[start + i])
                    b.append(names[j])
                    s.append(1.0 - distances[i, j] / bits.shape[1])
    out.mkdir(parents=True, exist_ok=True)
    table = pa.table({"image_id_a": a, "image_id_b": b, "score": pa.array(s, pa.float32())})
    pq.write_table(table, out / "pairs.parquet")


def _imagededup_find_duplicates(images: Path, limit: int):
    """imagededup's own one-call dedup of a folder, converted to a pairs table."""
    from imagededup.methods import PHash

    found = PHash(verbose=False).find_duplicates(
        image_dir=str(images), max_distance_threshold=limit, scores=True, recursive=True
    )
    pairs = {}
    for name, duplicates in found.items():
        for other, distance in duplicates:
            pairs[tuple(sorted((name, other)))] = 1.0 - distance / 64
    a, b = ([k[i] for k in pairs] for i in (0, 1))
    return a, b, list(pairs.values())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("method", choices=sorted(HASHES))
    sub = parser.add_subparsers(dest="task", required=True)
    s = sub.add_parser("search")
    s.add_argument("queries", type=Path)
    s.add_argument("references", type=Path)
    s.add_argument("out", type=Path)
    s.add_argument("--k", type=int, default=10)
    d = sub.add_parser("dedup")
    d.add_argument("images", type=Path)
    d.add_argument("out", type=Path)
    d.add_argument("--max-distance", type=int)
    args = parser.parse_args(argv)
    if args.task == "search":
        search(args.method, args.queries, args.references, args.out, args.k)
    else:
        dedup(args.method, args.images, args.out, args.max_distance)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
