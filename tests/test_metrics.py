"""rdcd.metrics against hand computation (ISC2021 rules) and against naive O(n^2) versions."""

from __future__ import annotations

import random

import pandas as pd
import pytest

from rdcd import metrics


def score(predictions, truth_rows):
    """Metrics for [(q, r, s), ...] against [(q, r or ''), ...]."""
    truth = metrics.ground_truth_pairs([q for q, _ in truth_rows], [r for _, r in truth_rows])
    q, r, s = zip(*predictions, strict=True) if predictions else ((), (), ())
    return metrics.copy_detection_metrics(q, r, s, truth)


# --- hand-computed copy-detection cases -----------------------------------------------------


def test_plain_ranking_with_a_missed_pair_and_a_distractor():
    # order: (q1,r1) pos P=1; (q2,rX) neg; (q2,r2) pos P=2/3; (q4,r5) neg. q3 never predicted.
    result = score(
        [("q1", "r1", 0.9), ("q2", "rX", 0.8), ("q2", "r2", 0.7), ("q4", "r5", 0.6)],
        [("q1", "r1"), ("q2", "r2"), ("q3", "r3"), ("q4", "")],
    )
    assert result.uap == pytest.approx((1 + 2 / 3) / 3)
    assert result.recall_at_p90 == pytest.approx(1 / 3)
    assert result.threshold_at_p90 == pytest.approx(0.9)
    assert result.acc_at_1 == pytest.approx(1 / 3)  # q2: rX scores higher; q3 missing
    assert result.recall_at_10 == pytest.approx(2 / 3)
    assert result.n_ground_truth == 3
    assert result.n_predicted_queries == 3


def test_equal_scores_put_negatives_first():
    # all tied: pessimistic order is neg, pos, pos -> precisions 1/2 and 2/3
    result = score(
        [("q1", "r1", 0.5), ("q2", "r2", 0.5), ("q3", "r9", 0.5)],
        [("q1", "r1"), ("q2", "r2")],
    )
    assert result.uap == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result.recall_at_p90 is None
    assert result.threshold_at_p90 is None


def test_tie_inside_a_query_costs_the_rank():
    result = score([("q1", "r1", 0.8), ("q1", "r2", 0.8)], [("q1", "r1")])
    assert result.acc_at_1 == 0.0  # rank = #{score >= 0.8} - 1 = 1
    assert result.recall_at_10 == 1.0
    assert result.uap == pytest.approx(0.5)


def test_confident_distractor_query_lowers_precision_everywhere():
    result = score(
        [("qd", "r1", 0.99), ("q1", "r1", 0.9), ("q2", "r2", 0.8)],
        [("q1", "r1"), ("q2", "r2"), ("qd", "")],
    )
    assert result.uap == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert result.recall_at_p90 is None
    assert result.acc_at_1 == 1.0
    assert result.n_queries == 2  # only queries with a match are known without all_query_ids


def test_recall_at_p90_takes_the_deepest_rank_still_at_precision_90():
    positives = [(f"q{i}", f"r{i}", 1.0 - i / 100) for i in range(9)]
    predictions = [*positives, ("qx", "rx", 0.5), ("q9", "r9", 0.4), ("qy", "ry", 0.3)]
    result = score(predictions, [(f"q{i}", f"r{i}") for i in range(10)])
    # rank 11 has 10 TP / 11 = 0.909 >= 0.9 -> recall 1.0 at score 0.4
    assert result.recall_at_p90 == pytest.approx(1.0)
    assert result.threshold_at_p90 == pytest.approx(0.4)
    assert result.uap == pytest.approx((9 + 10 / 11) / 10)


def test_no_predictions_scores_zero_and_duplicates_are_an_error():
    assert score([], [("q1", "r1")]).uap == 0.0
    with pytest.raises(ValueError, match="duplicate"):
        score([("q1", "r1", 0.9), ("q1", "r1", 0.8)], [("q1", "r1")])
    with pytest.raises(ValueError, match="no .* matches"):
        score([("q1", "r1", 0.9)], [("q1", "")])


def test_ids_are_compared_without_image_extensions():
    result = score([("q1.jpg", "dir/r1.JPEG", 0.7)], [("q1", "dir/r1"), ("q2", "")])
    assert result.uap == 1.0
    assert metrics.normalise_id("a.b/c.tar") == "a.b/c.tar"  # not an image extension: kept


# --- naive reference implementations --------------------------------------------------------


def naive_copy_detection(predictions, truth_pairs):
    gt = set(truth_pairs)
    labelled = [(q, r, s, (q, r) in gt) for q, r, s in predictions]

    def rank_and_tp(i):
        # everything ranked at or before item i in the pessimistic order
        _, _, s_i, y_i = labelled[i]
        ahead = [
            j
            for j, (_, _, s_j, y_j) in enumerate(labelled)
            if s_j > s_i or (s_j == s_i and (y_j < y_i or (y_j == y_i and j <= i)))
        ]
        return len(ahead), sum(labelled[j][3] for j in ahead)

    points = []
    for i in range(len(labelled)):
        rank, tp = rank_and_tp(i)
        points.append((rank, tp / rank, tp / len(gt), labelled[i][2], labelled[i][3]))
    uap = sum(p for _, p, _, _, y in points if y) / len(gt)
    eligible = [pt for pt in points if pt[1] >= 0.9]
    if eligible:
        best = max(pt[2] for pt in eligible)
        first = min((pt for pt in eligible if pt[2] == best), key=lambda pt: pt[0])
        recall_p90, threshold = best, first[3]
    else:
        recall_p90, threshold = None, None
    ranks = []
    for q, r in gt:
        mine = [s for qq, _, s in predictions if qq == q]
        hit = [s for qq, rr, s in predictions if (qq, rr) == (q, r)]
        ranks.append(sum(s >= hit[0] for s in mine) - 1 if hit else 2**35)
    acc1 = sum(k == 0 for k in ranks) / len(gt)
    r10 = sum(k < 10 for k in ranks) / len(gt)
    return uap, recall_p90, threshold, acc1, r10


def random_case(rng: random.Random):
    queries = [f"q{i}" for i in range(rng.randint(1, 12))]
    refs = [f"r{i}" for i in range(rng.randint(1, 10))]
    truth = {(q, rng.choice(refs)) for q in queries if rng.random() < 0.6}
    truth |= {(rng.choice(queries), rng.choice(refs))}
    levels = [round(rng.random(), 2) for _ in range(rng.randint(1, 6))]  # few values: ties
    predictions = {}
    for q in queries:
        for r in rng.sample(refs, rng.randint(0, len(refs))):
            predictions[(q, r)] = rng.choice(levels)
    return [(q, r, s) for (q, r), s in predictions.items()], sorted(truth)


def test_copy_detection_agrees_with_naive_version_on_random_inputs():
    rng = random.Random(1234)
    for _ in range(300):
        predictions, truth = random_case(rng)
        result = score(predictions, truth)
        uap, recall_p90, threshold, acc1, r10 = naive_copy_detection(predictions, truth)
        assert result.uap == pytest.approx(uap)
        assert result.recall_at_p90 == (None if recall_p90 is None else pytest.approx(recall_p90))
        assert result.threshold_at_p90 == threshold
        assert result.acc_at_1 == pytest.approx(acc1)
        assert result.recall_at_10 == pytest.approx(r10)


# --- dedup ----------------------------------------------------------------------------------


def test_dedup_pair_and_bcubed_by_hand():
    truth = metrics.true_groups(["a", "b", "c", "d", "e"], ["g1", "g1", "g1", "g2", "g3"])
    # predicted pairs: a-b (right), c-d (wrong); components {a,b}, {c,d}, {e}
    result = metrics.dedup_metrics(["a.jpg", "d"], ["b.jpg", "c"], truth)
    assert result.n_true_pairs == 3
    assert result.pair_precision == pytest.approx(1 / 2)
    assert result.pair_recall == pytest.approx(1 / 3)
    assert result.pair_f1 == pytest.approx(2 * 0.5 * (1 / 3) / (0.5 + 1 / 3))
    # B-cubed precision per image: a 1, b 1, c 1/2, d 1/2, e 1 -> 4/5
    # B-cubed recall per image: a 2/3, b 2/3, c 1/3, d 1, e 1 -> 11/15
    assert result.bcubed_precision == pytest.approx(4 / 5)
    assert result.bcubed_recall == pytest.approx(11 / 15)
    assert result.n_predicted_groups == 3


def test_dedup_uses_given_groups_and_rejects_unknown_ids():
    truth = metrics.true_groups(["a", "b", "c"], ["g", "g", "h"])
    groups = pd.Series(["x", "x", "x"], index=["a", "b", "c"])
    result = metrics.dedup_metrics(["a"], ["b"], truth, predicted_groups=groups)
    assert result.bcubed_precision == pytest.approx((2 / 3 + 2 / 3 + 1 / 3) / 3)
    assert result.bcubed_recall == 1.0
    with pytest.raises(ValueError, match="not in groups.csv"):
        metrics.dedup_metrics(["a"], ["zzz"], truth)
    with pytest.raises(ValueError, match="two groups"):
        metrics.true_groups(["a", "a.jpg"], ["g", "h"])


def naive_dedup(pairs, truth: dict[str, str]):
    images = sorted(truth)
    true_pairs = {(a, b) for a in images for b in images if a < b and truth[a] == truth[b]}
    predicted = {tuple(sorted(p)) for p in pairs if p[0] != p[1]}
    correct = len(true_pairs & predicted)
    precision = correct / len(predicted) if predicted else 1.0
    recall = correct / len(true_pairs) if true_pairs else 1.0
    cluster = {i: {i} for i in images}
    changed = True
    while changed:  # transitive closure, the slow way
        changed = False
        for a, b in predicted:
            merged = cluster[a] | cluster[b]
            for i in merged:
                if cluster[i] != merged:
                    cluster[i] = merged
                    changed = True
    bp = sum(
        len({j for j in cluster[i] if truth[j] == truth[i]}) / len(cluster[i]) for i in images
    ) / len(images)
    br = sum(
        len({j for j in cluster[i] if truth[j] == truth[i]})
        / sum(truth[j] == truth[i] for j in images)
        for i in images
    ) / len(images)
    return precision, recall, bp, br


def test_dedup_agrees_with_naive_version_on_random_inputs():
    rng = random.Random(99)
    for _ in range(200):
        images = [f"i{k}" for k in range(rng.randint(2, 14))]
        truth = {i: f"g{rng.randint(0, len(images) // 2)}" for i in images}
        pairs = [tuple(rng.sample(images, 2)) for _ in range(rng.randint(0, 12))]
        result = metrics.dedup_metrics(
            [a for a, _ in pairs],
            [b for _, b in pairs],
            metrics.true_groups(list(truth), list(truth.values())),
        )
        precision, recall, bp, br = naive_dedup(pairs, truth)
        assert result.pair_precision == pytest.approx(precision)
        assert result.pair_recall == pytest.approx(recall)
        assert result.bcubed_precision == pytest.approx(bp)
        assert result.bcubed_recall == pytest.approx(br)


# --- calibration ----------------------------------------------------------------------------


def test_calibration_by_hand():
    scores = [0.95, 0.9, 0.9, 0.8, 0.7, 0.6]
    labels = [True, True, False, True, True, False]
    # t=0.95: 1/1; t=0.9: 2/3; t=0.8: 3/4; t=0.7: 4/5; t=0.6: 4/6
    strict = metrics.calibrate_threshold(scores, labels, target_precision=0.99)
    assert strict.threshold == 0.95 and strict.recall == pytest.approx(1 / 4)
    loose = metrics.calibrate_threshold(scores, labels, target_precision=0.75)
    assert loose.threshold == 0.7 and loose.precision == pytest.approx(0.8)
    assert loose.accepted == 5
    honest = metrics.calibrate_threshold(scores, labels, 0.75, n_positives=8)
    assert honest.recall == pytest.approx(4 / 8)
    none = metrics.calibrate_threshold([0.5, 0.4], [False, True], target_precision=0.9)
    assert none.threshold is None and none.best_precision == pytest.approx(0.5)


def test_calibration_agrees_with_naive_sweep():
    rng = random.Random(7)
    for _ in range(300):
        n = rng.randint(1, 30)
        scores = [round(rng.random(), 1) for _ in range(n)]
        labels = [rng.random() < 0.6 for _ in range(n)]
        if not any(labels):
            labels[0] = True
        target = rng.choice([0.5, 0.8, 0.9, 0.99])
        best = None
        for t in sorted(set(scores), reverse=True):
            accepted = [y for s, y in zip(scores, labels, strict=True) if s >= t]
            precision = sum(accepted) / len(accepted)
            recall = sum(accepted) / sum(labels)
            if precision >= target and (best is None or recall > best[1]):
                best = (t, recall)
        result = metrics.calibrate_threshold(scores, labels, target)
        assert result.threshold == (None if best is None else best[0])
        if best is not None:
            assert result.recall == pytest.approx(best[1])
            assert result.precision >= target
