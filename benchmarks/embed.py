"""Embedding throughput: the Ray Data pipeline against a plain loop, student against teacher.

    .venv/bin/python benchmarks/embed.py FOLDER [--images 1200] [--model default] [--int8 DIR]

From one run on the same images it prints:
- pipeline images/s (`python -m pipelines.embed`, its own embedded Ray, as a user runs it) vs a
  plain single-process loop (read, decode, embed in batches) with the same model and threads:
  the pipeline overhead ratio (target >= 0.8);
- student vs SSCD teacher model throughput at the student's input size (target >= 4x), and
  with --int8 (an `rdcd quantize` copy of the student) the int8 student too;
- peak RSS of the pipeline's driver and of its decode, model and write workers.
The folder's images are repeated (symlinks) up to --images so start-up does not dominate.
Timings on a shared machine are noisy: compare the ratios, which come from the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rdcd.embedder import load_embedder
from rdcd.preprocess import load_rgb

REPO = Path(__file__).resolve().parent.parent
EXTENSIONS = {".jpg", ".jpeg", ".png", ".webp"}


def build_input(folder: Path, count: int, target: Path) -> list[Path]:
    """count image paths under target: the folder's images, repeated through symlinks."""
    sources = sorted(p for p in folder.rglob("*") if p.suffix.lower() in EXTENSIONS)
    if not sources:
        raise SystemExit(f"no images under {folder}")
    paths = []
    for i in range(count):
        source = sources[i % len(sources)]
        link = target / f"r{i // len(sources):03d}" / f"{source.stem}{source.suffix.lower()}"
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source.resolve())
        paths.append(link)
    return paths


def plain_loop(spec: str, paths: list[Path], threads: int, batch: int) -> dict[str, float]:
    """The baseline a user could write: one process, read -> decode -> embed per batch."""
    started = time.perf_counter()
    embedder = load_embedder(spec, device="cpu", threads=threads)
    loaded = time.perf_counter()
    for start in range(0, len(paths), batch):
        chunk = paths[start : start + batch]
        pixels = np.stack([load_rgb(p.read_bytes(), size=embedder.input_size)[0] for p in chunk])
        embedder.embed(pixels)
    done = time.perf_counter()
    return {"load_s": loaded - started, "images_per_s": len(paths) / (done - loaded)}


def model_only(embedder, pixels: np.ndarray, batch: int, repeats: int) -> float:
    """Images/s of embed() alone on pre-decoded pixels (after one warm-up batch)."""
    embedder.embed(pixels[:batch])
    started = time.perf_counter()
    for _ in range(repeats):
        for start in range(0, len(pixels), batch):
            embedder.embed(pixels[start : start + batch])
    return repeats * len(pixels) / (time.perf_counter() - started)


def pipeline(spec: str, input_dir: Path, out: Path, cpus: int) -> dict:
    """`python -m pipelines.embed` exactly as a user runs it; returns its manifest."""
    command = [sys.executable, "-m", "pipelines.embed", str(input_dir), str(out)]
    command += ["--model", spec, "--set", f"ray.num_cpus={cpus}"]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["command_s"] = time.perf_counter() - started
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--images", type=int, default=1200, help="images embedded per run")
    parser.add_argument("--model", default="default", help="student model card")
    parser.add_argument("--int8", help="an `rdcd quantize` copy of the student to time too")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rdcd-bench-embed-") as tmp:
        tmp_path = Path(tmp)
        paths = build_input(args.folder, args.images, tmp_path / "in")

        # The loop runs before and after the pipeline: on a shared machine the load drifts.
        before = plain_loop(args.model, paths, args.cpus, args.batch)
        run = pipeline(args.model, tmp_path / "in", tmp_path / "out", args.cpus)
        after = plain_loop(args.model, paths, args.cpus, args.batch)
        loop = {
            "images_per_s": (before["images_per_s"] + after["images_per_s"]) / 2,
            "load_s": before["load_s"],
            "range": f"{before['images_per_s']:.1f} before, {after['images_per_s']:.1f} after",
        }

        student = load_embedder(args.model, device="cpu", threads=args.cpus)
        teacher = load_embedder(
            "sscd", device="cpu", threads=args.cpus, input_size=student.input_size
        )
        pixels = np.stack(
            [load_rgb(p.read_bytes(), size=student.input_size)[0] for p in paths[:128]]
        )
        student_rate = model_only(student, pixels, args.batch, repeats=3)
        teacher_rate = model_only(teacher, pixels, args.batch, repeats=1)
        int8_rate = None
        if args.int8:
            int8 = load_embedder(args.int8, device="cpu", threads=args.cpus)
            int8_rate = model_only(int8, pixels, args.batch, repeats=3)

    throughput = run["throughput"]
    steady = throughput["steady_images_per_s"] or throughput["images_per_s"]
    rss = run["peak_rss_mb"]
    rows = [
        ("images per run", f"{args.images}", f"from {args.folder}"),
        ("CPUs (Ray / loop threads)", f"{args.cpus}", ""),
        ("plain loop, img/s", f"{loop['images_per_s']:.1f}", loop["range"]),
        ("pipeline steady, img/s", f"{steady:.1f}", "from the first model batch"),
        (
            "pipeline end to end, img/s",
            f"{args.images / run['command_s']:.1f}",
            f"whole command {run['command_s']:.1f} s incl. Ray start",
        ),
        ("overhead ratio (steady)", f"{steady / loop['images_per_s']:.2f}", "target >= 0.8"),
        (
            "pipeline start-up, s",
            f"{run['command_s'] - args.images / steady:.1f}",
            f"Ray, actors, imports; model load {run['timings']['model_load_s']:.1f} s",
        ),
        (
            "student model-only, img/s",
            f"{student_rate:.1f}",
            f"{run['model']['model_id']} @ {student.input_size}px",
        ),
        ("SSCD teacher model-only, img/s", f"{teacher_rate:.1f}", f"@ {student.input_size}px"),
        ("student / teacher", f"{student_rate / teacher_rate:.1f}x", "target >= 4x"),
    ]
    if int8_rate:
        rows += [
            ("int8 student model-only, img/s", f"{int8_rate:.1f}", f"{int8.model_id}"),
            ("int8 student / teacher", f"{int8_rate / teacher_rate:.1f}x", ""),
            ("int8 / fp32 student", f"{int8_rate / student_rate:.2f}x", ""),
        ]
    rows += [
        ("peak RSS driver, MB", f"{rss['driver']:.0f}", ""),
        ("peak RSS decode worker, MB", f"{rss.get('decode_worker', 0):.0f}", "read+decode tasks"),
        ("peak RSS model actor, MB", f"{rss.get('embed_worker', 0):.0f}", ""),
        ("peak RSS write worker, MB", f"{rss.get('write_worker', 0):.0f}", ""),
        ("busy s decode / embed / write", _busy(run), "summed over workers"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"| {'measure'.ljust(width)} | value | note |")
    print(f"|{'-' * (width + 2)}|-------|------|")
    for name, value, note in rows:
        print(f"| {name.ljust(width)} | {value} | {note} |")


def _busy(run: dict) -> str:
    busy = run["timings"]["busy_s"]
    return " / ".join(f"{busy.get(k, 0):.1f}" for k in ("decode", "embed", "write"))


if __name__ == "__main__":
    main()
