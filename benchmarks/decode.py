"""Decode + resize throughput on a folder of real photos: plain PIL vs JPEG draft vs simplejpeg.

    python benchmarks/decode.py FOLDER [--size 288] [--policy square] [--repeat 3]

One process, one core, files read into memory first (so storage speed is not measured). Every
method runs on the same JPEGs, interleaved over ``--repeat`` rounds; the best round counts, and
ratios are against plain PIL in the same run. simplejpeg is optional (measured if installed).
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdcd.preprocess import (  # noqa: E402
    REDUCING_GAP,
    RESAMPLE,
    ImageError,
    decode_image,
    load_rgb,
    output_size,
)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
JPEG_MAGIC = b"\xff\xd8\xff"


def _read_jpegs(folder: Path, limit: int | None) -> list[bytes]:
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    blobs = [p.read_bytes() for p in paths]
    jpegs = [b for b in blobs if b.startswith(JPEG_MAGIC)]
    return jpegs[:limit] if limit else jpegs


def _simplejpeg_loader(size: int, policy: str) -> Callable[[bytes], np.ndarray] | None:
    try:
        import simplejpeg
    except ImportError:
        return None

    def load(data: bytes) -> np.ndarray:
        # Speed reference only: no EXIF orientation, no CMYK/alpha handling.
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=size, min_height=size)
        target = output_size((width, height), size, policy)
        resized = Image.fromarray(pixels).resize(target, RESAMPLE, reducing_gap=REDUCING_GAP)
        return np.asarray(resized)

    return load


def _time(load: Callable[[bytes], np.ndarray], blobs: list[bytes]) -> tuple[float, list]:
    start = time.perf_counter()
    outputs = []
    for data in blobs:
        try:
            outputs.append(load(data))
        except ImageError:
            outputs.append(None)
    return time.perf_counter() - start, outputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="folder of photos (searched recursively)")
    parser.add_argument("--size", type=int, default=288, help="target size (default 288)")
    parser.add_argument("--policy", default="square", choices=("square", "short_side"))
    parser.add_argument("--repeat", type=int, default=3, help="rounds; the best counts")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many JPEGs")
    args = parser.parse_args(argv)

    blobs = _read_jpegs(args.folder, args.limit)
    if not blobs:
        parser.error(f"no JPEG files under {args.folder}")
    size, policy = args.size, args.policy
    methods: dict[str, Callable[[bytes], np.ndarray]] = {
        "PIL decode + resize": lambda d: load_rgb(d, size=size, policy=policy, draft=False)[0],
        "PIL draft decode + resize": lambda d: load_rgb(d, size=size, policy=policy)[0],
    }
    simplejpeg_load = _simplejpeg_loader(size, policy)
    if simplejpeg_load is not None:
        methods["simplejpeg (scaled) + resize"] = simplejpeg_load

    best = dict.fromkeys(methods, float("inf"))
    outputs: dict[str, list] = {}
    for _ in range(args.repeat):
        for name, load in methods.items():
            seconds, outputs[name] = _time(load, blobs)
            best[name] = min(best[name], seconds)

    reduced = sum(
        decode_image(d, target_size=size).size != decode_image(d, draft=False).size for d in blobs
    )
    megapixels = [_megapixels(d) for d in blobs]
    print(
        f"{len(blobs)} JPEGs from {args.folder}, median {np.median(megapixels):.2f} Mpx, "
        f"max {max(megapixels):.2f} Mpx; target {size} ({policy}); "
        f"draft reduces {reduced}/{len(blobs)}; best of {args.repeat} rounds, one process"
    )
    baseline = best["PIL decode + resize"]
    reference = outputs["PIL decode + resize"]
    print("| method | images/s | ratio | mean abs diff vs plain |\n|---|---:|---:|---:|")
    for name in methods:
        diff = _mean_abs_diff(outputs[name], reference)
        print(f"| {name} | {len(blobs) / best[name]:.0f} | {baseline / best[name]:.2f}x | {diff} |")
    if simplejpeg_load is None:
        print("(simplejpeg not installed: not measured)")
    return 0


def _megapixels(data: bytes) -> float:
    with Image.open(io.BytesIO(data)) as im:
        return im.size[0] * im.size[1] / 1e6


def _mean_abs_diff(outputs: list, reference: list) -> str:
    pairs = [
        (a, b) for a, b in zip(outputs, reference, strict=True) if a is not None and b is not None
    ]
    if not pairs:
        return "n/a"
    return f"{np.mean([np.abs(a.astype(np.int16) - b).mean() for a, b in pairs]):.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
