"""When a quantizer trained on yesterday's images stops fitting today's: the retraining rule.

Adding every night with the same trained IVF quantizer is what keeps a night's cost
proportional to its new images. It stays right only while new images look like the training
sample, so each night measures, and the manifest reports:

- quantisation error: the mean squared distance of the new vectors to their nearest centroid,
  as a ratio to the same figure on the training sample (new content far from every centroid);
- list-size imbalance: faiss's imbalance factor (nlist * sum(s^2) / (sum s)^2; 1 = perfectly
  even) of all inverted lists after the add, as a ratio to its value right after training
  (some lists swelling: every query probing them pays for it);
- growth: images now / images at training (nlist was sized for sqrt(N) at training time).

Any ratio beyond its configured bound triggers a retrain of the index on a fresh sample.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np


@dataclass(frozen=True)
class DriftBounds:
    max_quantisation_ratio: float
    max_imbalance_ratio: float
    max_growth: float

    @classmethod
    def from_config(cls, section: dict[str, Any]) -> DriftBounds:
        bounds = cls(
            max_quantisation_ratio=float(section["max_quantisation_ratio"]),
            max_imbalance_ratio=float(section["max_imbalance_ratio"]),
            max_growth=float(section["max_growth"]),
        )
        if min(bounds.max_quantisation_ratio, bounds.max_imbalance_ratio, bounds.max_growth) < 1:
            raise ValueError("drift bounds are ratios to the training-time values and must be >= 1")
        return bounds


def assign(index: faiss.Index, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(nearest list per vector, squared distance to that centroid) under an IVF index."""
    ivf = faiss.extract_index_ivf(index)
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if len(x) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    _, lists = ivf.quantizer.search(x, 1)
    lists = lists[:, 0].astype(np.int64)
    centroids = ivf.quantizer.reconstruct_batch(lists)
    residual = np.square(x - centroids).sum(axis=1)
    return lists, residual.astype(np.float32)


def list_sizes(lists: np.ndarray, nlist: int) -> np.ndarray:
    return np.bincount(lists, minlength=nlist).astype(np.int64)


def imbalance(sizes: np.ndarray) -> float:
    """faiss's imbalance factor: 1.0 when every list holds the same number of vectors."""
    total = float(sizes.sum())
    if total == 0:
        return 1.0
    return float(len(sizes) * np.square(sizes.astype(np.float64)).sum() / total**2)


def baseline(residual: float, sizes: np.ndarray, trained_on: int) -> dict[str, float]:
    """The reference figures recorded right after (re)training: the training sample's mean
    squared residual, the list imbalance after adding everything, the image count."""
    return {
        "residual": float(residual),
        "imbalance": imbalance(sizes),
        "trained_on": int(trained_on),
    }


def assess(
    reference: dict[str, float],
    new_residual: float,
    sizes_after: np.ndarray,
    total_after: int,
    bounds: DriftBounds,
) -> dict[str, Any]:
    """The drift report of one add (new_residual: the new vectors' mean squared residual):
    the three ratios, and whether (and why) to retrain."""
    quantisation_ratio = new_residual / reference["residual"] if reference["residual"] > 0 else 1.0
    current = imbalance(sizes_after)
    imbalance_ratio = current / reference["imbalance"] if reference["imbalance"] > 0 else 1.0
    growth = total_after / max(1, reference["trained_on"])
    reasons = []
    if quantisation_ratio > bounds.max_quantisation_ratio:
        limit = bounds.max_quantisation_ratio
        reasons.append(f"quantisation error {quantisation_ratio:.2f}x training > {limit}")
    if imbalance_ratio > bounds.max_imbalance_ratio:
        reasons.append(
            f"list imbalance {imbalance_ratio:.2f}x training > {bounds.max_imbalance_ratio}"
        )
    if growth > bounds.max_growth:
        reasons.append(f"{growth:.1f}x the images it was trained for > {bounds.max_growth}")
    return {
        "quantisation_ratio": round(quantisation_ratio, 4),
        "imbalance": round(current, 4),
        "imbalance_ratio": round(imbalance_ratio, 4),
        "growth": round(growth, 4),
        "retrain": bool(reasons),
        "reasons": reasons,
    }
