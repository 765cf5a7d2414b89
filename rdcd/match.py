"""From kNN candidates to scored pairs: exact re-scoring, thresholds, exact duplicates, and
score normalisation against a background set.

The index only proposes candidates (its codes are lossy); every candidate is re-scored with the
exact cosine of the stored fp16 descriptors, so the threshold means the same thing whatever
index was used. All functions work on whole arrays (no per-pair Python loops).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from rdcd.vectors import VectorStore

# Two independent 64-bit hashes of a content hash string: 128 bits make a chance collision
# among 10^10 images ~1e-19, so equal keys mean equal strings without comparing the strings.
HASH_KEYS = ("rdcd-exact-dup-1", "rdcd-exact-dup-2")


@dataclass(frozen=True)
class ScoreNorm:
    """s_SN = s - beta * mean of the similarities to background neighbours first..last
    (0-based, inclusive): METHOD.md 4.4, SSCD's "1.0[0,2]" by default."""

    beta: float = 1.0
    first: int = 0
    last: int = 2

    def __post_init__(self) -> None:
        if not 0 <= self.first <= self.last:
            raise ValueError(f"score normalisation ranks need 0 <= first <= last, got {self}")

    @property
    def k(self) -> int:
        return self.last + 1

    def offsets(self, background_scores: np.ndarray) -> np.ndarray:
        """beta * m(q) from each query's exact similarities to its background candidates."""
        ranked = -np.sort(-background_scores, axis=1)
        window = ranked[:, self.first : self.last + 1]
        if window.shape[1] < self.last - self.first + 1:
            raise ValueError(
                f"background set has {ranked.shape[1]} neighbours per query, score "
                f"normalisation needs {self.last + 1}"
            )
        return (self.beta * window.mean(axis=1)).astype(np.float32)


def exact_scores(queries: np.ndarray, candidates: np.ndarray, store: VectorStore) -> np.ndarray:
    """Cosine of each query with each of its candidate ids; -inf where the id is -1."""
    n, k = candidates.shape
    valid = candidates >= 0
    flat = candidates[valid]
    unique, inverse = np.unique(flat, return_inverse=True)
    vectors = store.gather(unique)
    rows = np.repeat(np.arange(n), k).reshape(n, k)[valid]
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    scores[valid] = np.einsum("ij,ij->i", queries[rows], vectors[inverse])
    return scores


def canonical_pairs(
    query_ids: np.ndarray, candidates: np.ndarray, scores: np.ndarray, keep: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a, b, score) with a < b, one row per unordered pair, for the kept candidates."""
    rows = np.broadcast_to(query_ids[:, None], candidates.shape)
    mask = keep & (candidates >= 0) & (candidates != rows)
    q, c, s = rows[mask], candidates[mask], scores[mask]
    return unique_pairs(np.minimum(q, c), np.maximum(q, c), s)


def unique_pairs(
    a: np.ndarray, b: np.ndarray, score: np.ndarray, exact: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    """Sorted by (a, b), one row per pair; where a pair repeats, an exact=True row wins."""
    if exact is None:
        order = np.lexsort((b, a))
    else:
        order = np.lexsort((~exact, b, a))
    a, b, score = a[order], b[order], score[order]
    first = np.ones(len(a), dtype=bool)
    first[1:] = (a[1:] != a[:-1]) | (b[1:] != b[:-1])
    if exact is None:
        return a[first], b[first], score[first]
    return a[first], b[first], score[first], exact[order][first]


def pair_offsets(a: np.ndarray, b: np.ndarray, offsets: np.ndarray | None) -> np.ndarray:
    """The normalisation subtracted from a symmetric pair score: the mean of both sides."""
    if offsets is None:
        return np.zeros(len(a), dtype=np.float32)
    return (0.5 * (offsets[a] + offsets[b])).astype(np.float32)


def hash_keys(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """(n, 2) uint64 keys of non-null strings (callers drop nulls: no hash, no exact pair)."""
    if values.null_count:
        raise ValueError("hash_keys needs non-null strings")
    objects = values.to_numpy(zero_copy_only=False).astype(object)
    return np.stack([pd.util.hash_array(objects, hash_key=key) for key in HASH_KEYS], axis=1)


def exact_duplicate_pairs(keys: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of ids with equal keys, as a star: each copy paired with the smallest id.

    A file copied m times yields m-1 pairs instead of m(m-1)/2, so one placeholder image
    repeated a million times cannot blow up the pairs table; the groups are the same.
    """
    order = np.lexsort((ids, keys[:, 1], keys[:, 0]))
    k, i = keys[order], ids[order]
    new_run = np.ones(len(i), dtype=bool)
    new_run[1:] = (k[1:, 0] != k[:-1, 0]) | (k[1:, 1] != k[:-1, 1])
    run_start = np.maximum.accumulate(np.where(new_run, np.arange(len(i)), 0))
    copies = ~new_run
    return i[run_start[copies]], i[copies]


def top_k(candidates: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k best candidates by exact score, best first (copy-detection mode)."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, 1), np.take_along_axis(scores, order, 1)
