"""CPU inference runtimes for a student model: eager fp32 vs channels_last vs bf16 vs ONNX Runtime.

    python benchmarks/runtimes.py [--model default] [--batch 32] [--threads 2] [--rounds 3]

All variants embed the same uint8 batch (scikit-image's bundled photos, tiled), interleaved
over --rounds rounds; the best round counts. Ratios are against eager fp32 in the same run,
and "min cos" is each variant's worst descriptor cosine to eager fp32 (1.0 = identical).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import skimage
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rdcd.cards import load_model  # noqa: E402
from rdcd.embedder import OnnxEmbedder, export_onnx  # noqa: E402
from rdcd.models import PixelModel, normalise_batch  # noqa: E402
from rdcd.preprocess import load_rgb  # noqa: E402

PHOTOS = ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg", "motorcycle_left.png")


def photo_batch(size: int, batch: int) -> np.ndarray:
    folder = Path(skimage.__file__).parent / "data"
    photos = [load_rgb((folder / name).read_bytes(), size=size)[0] for name in PHOTOS]
    return np.stack([photos[i % len(photos)] for i in range(batch)])


def torch_variant(
    model, card, channels_last: bool, bf16: bool
) -> Callable[[np.ndarray], np.ndarray]:
    net = model.eval().to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )

    def run(images: np.ndarray) -> np.ndarray:
        x = normalise_batch(images, card.input.mean, card.input.std)
        x = x.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        )
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return net(x).float().numpy()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3, help="batches per round")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, card = load_model(args.model)
    images = photo_batch(card.input.size, args.batch)
    pixel_model = PixelModel(model, card.input.mean, card.input.std).eval()
    workdir = Path(tempfile.mkdtemp(prefix="rdcd-bench-"))
    variants: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "eager fp32 (NCHW)": torch_variant(model, card, channels_last=False, bf16=False),
        "channels_last fp32": torch_variant(model, card, channels_last=True, bf16=False),
        "channels_last + bf16 autocast": torch_variant(model, card, channels_last=True, bf16=True),
    }
    export_seconds = {}
    for label, dynamo in (
        ("ONNX Runtime (TorchScript export)", False),
        ("ONNX Runtime (dynamo export)", True),
    ):
        path = workdir / f"{'dynamo' if dynamo else 'legacy'}.onnx"
        started = time.perf_counter()
        export_onnx(pixel_model, path, card.input.size, dynamo=dynamo)
        export_seconds[label] = time.perf_counter() - started
        session = OnnxEmbedder(
            path,
            model_id=card.model_id,
            dim=card.output_dim,
            input_size=card.input.size,
            resize=card.input.resize,
            threads=args.threads,
        )
        variants[label] = session.embed
    reference = variants["eager fp32 (NCHW)"](images)
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    best = {name: float("inf") for name in variants}
    for run in variants.values():
        run(images)  # warm-up: allocator, oneDNN primitive cache, ORT arena
    for _ in range(args.rounds):
        for name, run in variants.items():
            started = time.perf_counter()
            for _ in range(args.batches):
                run(images)
            best[name] = min(best[name], time.perf_counter() - started)
    base = args.batch * args.batches / best["eager fp32 (NCHW)"]
    print(
        f"model {card.model_id} ({card.architecture.backbone}), {card.input.size}px, "
        f"batch {args.batch}, {args.threads} threads, torch {torch.__version__}"
    )
    print("| runtime | img/s | vs eager | min cos to eager | export s |")
    print("|---|---|---|---|---|")
    for name, run in variants.items():
        rate = args.batch * args.batches / best[name]
        out = run(images)
        out = out / np.linalg.norm(out, axis=1, keepdims=True)
        cosine = float(np.sum(out * reference, axis=1).min())
        export = f"{export_seconds[name]:.1f}" if name in export_seconds else ""
        print(f"| {name} | {rate:.1f} | {rate / base:.2f}x | {cosine:.6f} | {export} |")


if __name__ == "__main__":
    main()
