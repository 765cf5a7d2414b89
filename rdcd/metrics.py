"""Quality metrics: copy detection as ISC2021 scores it, duplicate groups, and thresholds.

Copy detection follows ``isc/metrics.py::evaluate`` exactly (METHOD.md §4.5): one global list of
predictions sorted by score with ties broken pessimistically, micro-AP over all ground-truth
pairs (unpredicted ones count zero), recall at precision 0.9 and the rank-based acc@1 / recall@10.
Dedup is scored on pairs (every pair inside a true group is a positive) and on groups (B-cubed).
Metrics are computed on the predictions as given: score normalisation happens at search time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath

import numpy as np
import pandas as pd

MISSING_RANK = 2**35
"""The rank ISC gives a ground-truth pair that was never predicted."""

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".avif", ".heic"}
)


def normalise_id(image_id: str) -> str:
    """The comparable form of an image id: image-file extension dropped, '\\' as '/'.

    Tables made by `rdcd embed` on a folder use the relative path ("R000001.jpg") while
    ground-truth files usually name the image without it ("R000001"); both become "R000001".
    """
    text = str(image_id).replace("\\", "/")
    suffix = PurePosixPath(text).suffix
    return text[: -len(suffix)] if suffix.lower() in IMAGE_EXTENSIONS else text


def _normalised(values: Iterable) -> np.ndarray:
    return np.array([normalise_id(v) for v in values], dtype=object)


# --- copy detection -------------------------------------------------------------------------


@dataclass(frozen=True)
class CopyDetectionMetrics:
    """What `rdcd eval` reports for a predictions table against ground_truth.csv."""

    uap: float
    recall_at_p90: float | None  # None: precision never reaches 0.9 (RDCD logs 0.0)
    threshold_at_p90: float | None
    acc_at_1: float
    recall_at_10: float
    n_ground_truth: int
    n_predictions: int
    n_queries: int
    n_predicted_queries: int

    def to_dict(self) -> dict:
        return asdict(self)


def ground_truth_pairs(query_ids: Sequence, reference_ids: Sequence) -> pd.DataFrame:
    """(query_id, reference_id) matches from ground-truth rows, ids normalised.

    Rows with an empty reference are distractor queries and are skipped (as ISC does); a
    repeated row states the same match twice and is kept once.
    """
    frame = pd.DataFrame({"query_id": list(query_ids), "reference_id": list(reference_ids)})
    frame = frame[frame["reference_id"].notna()]
    frame = frame[frame["reference_id"].astype(str).str.strip() != ""]
    out = pd.DataFrame(
        {
            "query_id": _normalised(frame["query_id"]),
            "reference_id": _normalised(frame["reference_id"]),
        }
    )
    return out.drop_duplicates(ignore_index=True)


def _prediction_frame(query_ids, reference_ids, scores) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "query_id": _normalised(query_ids),
            "reference_id": _normalised(reference_ids),
            "score": np.asarray(scores, dtype=np.float64),
        }
    )
    if not np.isfinite(frame["score"].to_numpy()).all():
        raise ValueError("predictions contain non-finite scores (NaN or inf)")
    duplicated = frame.duplicated(["query_id", "reference_id"])
    if duplicated.any():
        first = frame[duplicated].iloc[0]
        raise ValueError(
            f"predictions contain {int(duplicated.sum())} duplicate (query, reference) pairs, "
            f"e.g. ({first['query_id']}, {first['reference_id']}); each pair may appear once"
        )
    return frame


def _label(frame: pd.DataFrame, left: str, right: str, truth: pd.DataFrame) -> np.ndarray:
    """y_i = 1 where (frame[left], frame[right]) is a ground-truth pair."""
    keys = pd.MultiIndex.from_arrays([frame[left], frame[right]])
    positives = pd.MultiIndex.from_arrays([truth.iloc[:, 0], truth.iloc[:, 1]])
    return keys.isin(positives)


def pessimistic_order(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Indices by descending score; among equal scores the negatives come first (ISC rule)."""
    return np.lexsort((labels.astype(np.int8), -np.asarray(scores, dtype=np.float64)))


def precision_recall_curve(
    scores: np.ndarray, labels: np.ndarray, n_positives: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Along the pessimistic global order: precision_t, recall_t, score_t and label_t."""
    order = pessimistic_order(scores, labels)
    sorted_labels = np.asarray(labels, dtype=bool)[order]
    true_positives = np.cumsum(sorted_labels)
    ranks = np.arange(1, len(sorted_labels) + 1)
    precision = true_positives / ranks
    recall = true_positives / n_positives if n_positives else np.zeros(len(ranks))
    return precision, recall, np.asarray(scores, dtype=np.float64)[order], sorted_labels


def _operating_point(precision, recall, thresholds, min_precision: float):
    """Highest recall over ranks with precision >= min_precision (first such rank), ISC style."""
    eligible = np.flatnonzero(precision >= min_precision)
    if len(eligible) == 0:
        return None, None
    best = eligible[np.argmax(recall[eligible])]
    return float(recall[best]), float(thresholds[best])


def copy_detection_metrics(
    query_ids: Sequence,
    reference_ids: Sequence,
    scores: Sequence[float],
    truth: pd.DataFrame,
    all_query_ids: Sequence | None = None,
) -> CopyDetectionMetrics:
    """Score predictions (one row per query/reference/score) against `ground_truth_pairs`.

    all_query_ids (optional): every query of the benchmark, distractors included, for the count.
    """
    if len(truth) == 0:
        raise ValueError("the ground truth holds no (query, reference) matches")
    frame = _prediction_frame(query_ids, reference_ids, scores)
    labels = _label(frame, "query_id", "reference_id", truth)
    n_gt = len(truth)
    precision, recall, thresholds, sorted_labels = precision_recall_curve(
        frame["score"].to_numpy(), labels, n_gt
    )
    # sum over t of (recall_t - recall_t-1) * precision_t: only positives move recall
    uap = float(precision[sorted_labels].sum()) / n_gt
    recall_p90, threshold_p90 = _operating_point(precision, recall, thresholds, 0.9)
    ranks = _ground_truth_ranks(frame, truth)
    n_queries = len(set(all_query_ids)) if all_query_ids is not None else None
    return CopyDetectionMetrics(
        uap=uap,
        recall_at_p90=recall_p90,
        threshold_at_p90=threshold_p90,
        acc_at_1=float(np.mean(ranks == 0)),
        recall_at_10=float(np.mean(ranks < 10)),
        n_ground_truth=n_gt,
        n_predictions=len(frame),
        n_queries=n_queries if n_queries is not None else truth["query_id"].nunique(),
        n_predicted_queries=int(frame["query_id"].nunique()),
    )


def _ground_truth_ranks(frame: pd.DataFrame, truth: pd.DataFrame) -> np.ndarray:
    """Per GT pair: #{predictions of q with score >= score(q, r)} - 1, or MISSING_RANK."""
    ranked = frame.assign(
        rank=frame.groupby("query_id")["score"].rank(method="max", ascending=False) - 1
    )
    merged = truth.merge(ranked, on=["query_id", "reference_id"], how="left")
    return merged["rank"].fillna(MISSING_RANK).to_numpy(dtype=np.int64)


# --- dedup ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DedupMetrics:
    """Pair-level and group-level (B-cubed) quality of a dedup run against groups.csv."""

    pair_precision: float
    pair_recall: float
    pair_f1: float
    bcubed_precision: float
    bcubed_recall: float
    bcubed_f1: float
    n_true_pairs: int
    n_predicted_pairs: int
    n_correct_pairs: int
    n_images: int
    n_true_groups: int
    n_predicted_groups: int

    def to_dict(self) -> dict:
        return asdict(self)


def _f1(precision: float, recall: float) -> float:
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def true_groups(image_ids: Sequence, group_ids: Sequence) -> pd.Series:
    """groups.csv rows -> Series image_id (normalised) -> group label; one group per image."""
    frame = pd.DataFrame({"image_id": _normalised(image_ids), "group": list(group_ids)})
    conflicting = frame.groupby("image_id")["group"].nunique()
    if (conflicting > 1).any():
        raise ValueError(
            f"groups.csv puts image {conflicting[conflicting > 1].index[0]!r} in two groups"
        )
    return frame.drop_duplicates("image_id").set_index("image_id")["group"]


def unordered_pairs(ids_a: Sequence, ids_b: Sequence) -> pd.DataFrame:
    """Pairs (a, b) normalised, self-pairs dropped, a < b, each pair once."""
    a, b = _normalised(ids_a), _normalised(ids_b)
    keep = a != b
    a, b = a[keep], b[keep]
    low = np.where(a < b, a, b)
    high = np.where(a < b, b, a)
    return pd.DataFrame({"a": low, "b": high}).drop_duplicates(ignore_index=True)


def components(universe: Sequence[str], pairs: pd.DataFrame) -> pd.Series:
    """Connected components of the pair graph over `universe`: image_id -> component label."""
    index = {image_id: i for i, image_id in enumerate(universe)}
    parent = np.arange(len(universe))

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    for a, b in zip(pairs["a"], pairs["b"], strict=True):
        ra, rb = find(index[a]), find(index[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return pd.Series([find(i) for i in range(len(universe))], index=list(universe))


def dedup_metrics(
    ids_a: Sequence,
    ids_b: Sequence,
    truth: pd.Series,
    predicted_groups: pd.Series | None = None,
) -> DedupMetrics:
    """Score predicted duplicate pairs (and groups) against `true_groups`.

    predicted_groups: image_id -> group label as written by `rdcd dedup`; when absent, the
    groups are the connected components of the pairs. Images in no pair or group are singletons.
    """
    pairs = unordered_pairs(ids_a, ids_b)
    universe = list(truth.index)
    known = set(universe)
    unknown = sorted({*pairs["a"], *pairs["b"]} - known)
    if unknown:
        raise ValueError(
            f"{len(unknown)} image ids in the pairs are not in groups.csv, e.g. {unknown[:3]} "
            "(ids are compared without their image-file extension)"
        )
    sizes = truth.value_counts()
    n_true = int((sizes * (sizes - 1) // 2).sum())
    correct = int((truth.loc[pairs["a"]].to_numpy() == truth.loc[pairs["b"]].to_numpy()).sum())
    precision = correct / len(pairs) if len(pairs) else 1.0
    recall = correct / n_true if n_true else 1.0
    if predicted_groups is None:
        predicted = components(universe, pairs)
    else:
        predicted = _complete_groups(predicted_groups, universe)
    b_precision, b_recall = bcubed(truth, predicted)
    return DedupMetrics(
        pair_precision=precision,
        pair_recall=recall,
        pair_f1=_f1(precision, recall),
        bcubed_precision=b_precision,
        bcubed_recall=b_recall,
        bcubed_f1=_f1(b_precision, b_recall),
        n_true_pairs=n_true,
        n_predicted_pairs=len(pairs),
        n_correct_pairs=correct,
        n_images=len(universe),
        n_true_groups=int(truth.nunique()),
        n_predicted_groups=int(predicted.nunique()),
    )


def _complete_groups(groups: pd.Series, universe: list[str]) -> pd.Series:
    """Predicted groups over the whole universe: ungrouped images become singletons."""
    groups = groups.copy()
    groups.index = _normalised(groups.index)
    unknown = sorted(set(groups.index) - set(universe))
    if unknown:
        raise ValueError(f"{len(unknown)} grouped image ids are not in groups.csv: {unknown[:3]}")
    labels = [f"g:{groups[i]}" if i in groups.index else f"s:{i}" for i in universe]
    return pd.Series(labels, index=universe)


def bcubed(truth: pd.Series, predicted: pd.Series) -> tuple[float, float]:
    """B-cubed precision and recall: per image, the share of its predicted cluster that is in
    its true cluster (precision) and of its true cluster that it was clustered with (recall)."""
    frame = pd.DataFrame({"true": truth, "pred": predicted.reindex(truth.index)})
    both = frame.groupby(["true", "pred"]).size().rename("both")
    frame = frame.join(both, on=["true", "pred"])
    frame["pred_size"] = frame.groupby("pred")["true"].transform("size")
    frame["true_size"] = frame.groupby("true")["pred"].transform("size")
    precision = float((frame["both"] / frame["pred_size"]).mean())
    recall = float((frame["both"] / frame["true_size"]).mean())
    return precision, recall


# --- thresholds -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """The lowest score threshold whose accepted set still meets the target precision."""

    threshold: float | None  # None: no threshold reaches the target
    target_precision: float
    precision: float | None
    recall: float | None
    accepted: int
    n_scored: int
    n_positives: int
    best_precision: float

    def to_dict(self) -> dict:
        return asdict(self)


def calibrate_threshold(
    scores: Sequence[float],
    labels: Sequence[bool],
    target_precision: float = 0.99,
    n_positives: int | None = None,
) -> Calibration:
    """Threshold t maximising recall subject to precision(score >= t) >= target_precision.

    Only tie-group ends are candidates, because a threshold accepts every pair with an equal
    score. n_positives defaults to the positives among the scored pairs; pass the full ground
    truth size when some positives were never scored, so recall is honest.
    """
    if not 0.0 < target_precision <= 1.0:
        raise ValueError("target precision must be in (0, 1]")
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=bool)
    positives = int(labels.sum()) if n_positives is None else int(n_positives)
    if len(scores) == 0 or positives == 0:
        raise ValueError("calibration needs scored pairs with at least one true match")
    precision, recall, sorted_scores, _ = precision_recall_curve(scores, labels, positives)
    tie_ends = np.flatnonzero(np.append(sorted_scores[1:] != sorted_scores[:-1], True))
    eligible = tie_ends[precision[tie_ends] >= target_precision]
    best_precision = float(precision[tie_ends].max())
    if len(eligible) == 0:
        return Calibration(
            None, target_precision, None, None, 0, len(scores), positives, best_precision
        )
    best = eligible[np.argmax(recall[eligible])]
    return Calibration(
        threshold=float(sorted_scores[best]),
        target_precision=target_precision,
        precision=float(precision[best]),
        recall=float(recall[best]),
        accepted=int(best + 1),
        n_scored=len(scores),
        n_positives=positives,
        best_precision=best_precision,
    )


def labelled_predictions(
    query_ids: Sequence, reference_ids: Sequence, scores: Sequence[float], truth: pd.DataFrame
) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, is-a-true-copy labels, |G|) for calibrating on copy-detection predictions."""
    frame = _prediction_frame(query_ids, reference_ids, scores)
    labels = _label(frame, "query_id", "reference_id", truth)
    return frame["score"].to_numpy(), np.asarray(labels, dtype=bool), len(truth)


def labelled_pairs(
    ids_a: Sequence, ids_b: Sequence, scores: Sequence[float], truth: pd.Series
) -> tuple[np.ndarray, np.ndarray, int]:
    """(scores, same-true-group labels, number of true pairs) for calibrating on dedup pairs.

    A pair listed twice (either order) keeps its highest score.
    """
    a, b = _normalised(ids_a), _normalised(ids_b)
    frame = pd.DataFrame(
        {
            "a": np.where(a < b, a, b),
            "b": np.where(a < b, b, a),
            "score": np.asarray(scores, dtype=np.float64),
        }
    )
    frame = frame[frame["a"] != frame["b"]].groupby(["a", "b"], as_index=False)["score"].max()
    unknown = sorted({*frame["a"], *frame["b"]} - set(truth.index))
    if unknown:
        raise ValueError(
            f"{len(unknown)} image ids in the pairs are not in groups.csv: {unknown[:3]}"
        )
    labels = truth.loc[frame["a"]].to_numpy() == truth.loc[frame["b"]].to_numpy()
    sizes = truth.value_counts()
    return frame["score"].to_numpy(), labels, int((sizes * (sizes - 1) // 2).sum())
