"""Evaluation metrics for vulnerability detection: pure functions over plain Python sequences.

Labels are 1 = vulnerable (the positive class) and 0 = benign unless a function says otherwise.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any


def _check_binary(name: str, values: Sequence[int]) -> None:
    if any(v not in (0, 1) for v in values):
        raise ValueError(f"{name} must hold only 0 and 1")


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def binary_metrics(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """Accuracy, precision, recall and F1 with vulnerable (1) as the positive class.

    A ratio whose denominator is zero is 0.0: precision with no predicted positives, recall with no positives,
    F1 when precision and recall are both 0. On PrimeVul's ~3% positive rate a model that always answers
    "benign" thus scores accuracy ~0.97 and F1 0.0, which is the point of reporting F1.
    """
    if len(labels) != len(preds):
        raise ValueError(f"labels and preds differ in length ({len(labels)} vs {len(preds)})")
    if not labels:
        raise ValueError("binary_metrics needs at least one example")
    _check_binary("labels", labels)
    _check_binary("preds", preds)
    tp = sum(1 for y, p in zip(labels, preds, strict=True) if y == 1 and p == 1)
    predicted_pos = sum(preds)
    actual_pos = sum(labels)
    correct = sum(1 for y, p in zip(labels, preds, strict=True) if y == p)
    precision = tp / predicted_pos if predicted_pos else 0.0
    recall = tp / actual_pos if actual_pos else 0.0
    return {
        "accuracy": correct / len(labels),
        "precision": precision,
        "recall": recall,
        "f1": _f1(precision, recall),
    }


def multiclass_metrics(labels: Sequence[str], preds: Sequence[str | None]) -> dict[str, Any]:
    """Accuracy, macro F1 and a per-class table for CWE classification.

    A `None` prediction (no parsable answer) is always wrong: it is a false negative for the gold class and a
    false positive for no class, so it lowers recall without inventing an "invalid" class that would enter the
    macro average. Its share is reported as `invalid`. Classes are those in `labels` and the non-None `preds`;
    a class that is predicted but never gold has recall 0.0 and support 0, and counts in the macro average,
    so spraying wrong labels is penalised. Zero denominators give 0.0, as in `binary_metrics`.

    Returns `{"accuracy", "macro_f1", "invalid", "per_class": {class: {"precision", "recall", "f1", "support"}}}`
    with the classes sorted by name.
    """
    if len(labels) != len(preds):
        raise ValueError(f"labels and preds differ in length ({len(labels)} vs {len(preds)})")
    if not labels:
        raise ValueError("multiclass_metrics needs at least one example")
    support = Counter(labels)
    predicted = Counter(p for p in preds if p is not None)
    hits = Counter(y for y, p in zip(labels, preds, strict=True) if y == p)
    per_class: dict[str, dict[str, float | int]] = {}
    for cls in sorted(support.keys() | predicted.keys()):
        precision = hits[cls] / predicted[cls] if predicted[cls] else 0.0
        recall = hits[cls] / support[cls] if support[cls] else 0.0
        per_class[cls] = {
            "precision": precision,
            "recall": recall,
            "f1": _f1(precision, recall),
            "support": support[cls],
        }
    return {
        "accuracy": sum(hits.values()) / len(labels),
        "macro_f1": sum(row["f1"] for row in per_class.values()) / len(per_class),
        "invalid": sum(1 for p in preds if p is None) / len(preds),
        "per_class": per_class,
    }


def pairwise_metrics(predictions: Sequence[tuple[int, int]]) -> dict[str, float]:
    """PrimeVul's pair-wise metrics as fractions of the pairs (they sum to 1; the paper gives them in percent).

    Each item is `(prediction for the vulnerable function, prediction for its fix)`, 1 = vulnerable.
    P-C: correct (1, 0); P-V: both called vulnerable (1, 1); P-B: both called benign (0, 0); P-R: reversed (0, 1).
    """
    if not predictions:
        raise ValueError("pairwise_metrics needs at least one pair")
    for pair in predictions:
        if len(pair) != 2 or any(v not in (0, 1) for v in pair):
            raise ValueError(f"each pair must be two predictions in {{0, 1}}, got {pair!r}")
    counts = Counter((vul, fix) for vul, fix in predictions)
    n = len(predictions)
    outcomes = {"P-C": (1, 0), "P-V": (1, 1), "P-B": (0, 0), "P-R": (0, 1)}
    return {name: counts[key] / n for name, key in outcomes.items()}


def _roc_points(labels: Sequence[int], scores: Sequence[float]) -> list[tuple[int, int, float]]:
    """`(false positives, true positives, threshold)` along the ROC curve, as `sklearn.metrics.roc_curve`
    builds it with `drop_intermediate=True`: one point per distinct score (descending), then the middle of any
    three consecutive points with equal steps dropped, then `(0, 0, inf)` prepended.
    """
    order = sorted(range(len(scores)), key=lambda i: scores[i], reverse=True)
    points: list[tuple[int, int, float]] = []
    fp = tp = 0
    for rank, i in enumerate(order):
        tp += labels[i]
        fp += 1 - labels[i]
        # A point per distinct score: tied scores get one threshold, taken after the last of them.
        if rank + 1 == len(order) or scores[order[rank + 1]] != scores[i]:
            points.append((fp, tp, float(scores[i])))
    if len(points) > 2:
        kept = [points[0]]
        for prev, cur, nxt in zip(points, points[1:], points[2:], strict=False):
            if nxt[0] - 2 * cur[0] + prev[0] or nxt[1] - 2 * cur[1] + prev[1]:
                kept.append(cur)
        points = kept + [points[-1]]
    return [(0, 0, math.inf), *points]


def vd_score(labels: Sequence[int], scores: Sequence[float], max_fpr: float = 0.005) -> float:
    """PrimeVul's VD-S: the false-negative rate at the ROC point with the largest FPR that is <= `max_fpr`.

    Follows the release's `calc_vd_score.py` exactly: the ROC curve is sklearn's `roc_curve` with
    `drop_intermediate=True` (reproduced here, so dropped collinear points can make the chosen threshold higher
    than the lowest one meeting the FPR budget), the last point with FPR <= `max_fpr` gives the threshold,
    `score >= threshold` is called vulnerable, and FN / (FN + TP) is returned. Lower is better; 1.0 when even the
    curve's first point with a finite threshold exceeds the budget (the `inf` threshold flags nothing).
    """
    if len(labels) != len(scores):
        raise ValueError(f"labels and scores differ in length ({len(labels)} vs {len(scores)})")
    _check_binary("labels", labels)
    if not 0.0 <= max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in [0, 1], got {max_fpr}")
    if any(math.isnan(s) for s in scores):
        raise ValueError("scores must not contain NaN")
    positives = sum(labels)
    negatives = len(labels) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("vd_score needs at least one vulnerable and one benign example")
    chosen_tp = 0
    for fp, tp, _ in _roc_points(labels, scores):
        # fp / negatives is the same float division sklearn does, so the `<=` test agrees at the boundary.
        if fp / negatives <= max_fpr:
            chosen_tp = tp
    # Every score >= the chosen threshold lies at or before its point, so TP there is the curve's tp.
    return (positives - chosen_tp) / positives


def majority_vote(answers: Sequence[str | None]) -> tuple[str | None, dict[str, float]]:
    """The most common non-None answer and each answer's share of all k samples (None samples count in k).

    Ties go to the tied answer that appears first in `answers`, so the result does not depend on hashing or on
    sorting label strings. All None (or empty) -> `(None, {})`.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, {}
    # Counter keeps first-insertion order and max() returns the first maximum: the earliest tied answer wins.
    winner = max(counts, key=counts.__getitem__)
    return winner, {answer: count / len(answers) for answer, count in counts.items()}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), which never forms the huge binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
