import math
import random
from fractions import Fraction

import pytest

from ttc_lightning.evaluation.metrics import (
    binary_metrics,
    majority_vote,
    multiclass_metrics,
    pairwise_metrics,
    pass_at_k,
    vd_score,
)

# ---------------------------------------------------------------- binary_metrics


def test_binary_metrics_hand_worked():
    # pairs (label, pred): (1,1) TP, (1,0) FN, (0,0) TN, (0,1) FP, (1,1) TP -> TP=2 FP=1 FN=1 TN=1
    # accuracy = 3/5; precision = 2/(2+1); recall = 2/(2+1); f1 = 2*(2/3)*(2/3)/(4/3) = 2/3
    m = binary_metrics([1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert m == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})


def test_binary_metrics_precision_and_recall_differ():
    # labels 1,1,1,0 / preds 1,0,0,0 -> TP=1 FP=0 FN=2 TN=1
    # precision = 1/1; recall = 1/3; f1 = 2*1*(1/3)/(4/3) = 1/2; accuracy = 2/4
    m = binary_metrics([1, 1, 1, 0], [1, 0, 0, 0])
    assert m == pytest.approx({"accuracy": 0.5, "precision": 1.0, "recall": 1 / 3, "f1": 0.5})


def test_binary_metrics_no_predicted_positives():
    # always "benign": TP=0, no predicted positives -> precision 0.0 (not NaN); recall 0/1; accuracy 2/3
    m = binary_metrics([1, 0, 0], [0, 0, 0])
    assert m == pytest.approx({"accuracy": 2 / 3, "precision": 0.0, "recall": 0.0, "f1": 0.0})


def test_binary_metrics_no_positives():
    # no gold positives: recall has no denominator -> 0.0; one FP -> precision 0/1; accuracy 1/2
    m = binary_metrics([0, 0], [1, 0])
    assert m == pytest.approx({"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0})
    # all correct yet no positives at all: still 0.0 for the positive-class scores
    assert binary_metrics([0, 0], [0, 0]) == {"accuracy": 1.0, "precision": 0.0, "recall": 0.0, "f1": 0.0}


@pytest.mark.parametrize(
    ("labels", "preds", "message"),
    [([1, 0], [1], "length"), ([], [], "at least one"), ([1, 2], [1, 0], "0 and 1"), ([1, 0], [1, -1], "0 and 1")],
)
def test_binary_metrics_rejects_bad_input(labels, preds, message):
    with pytest.raises(ValueError, match=message):
        binary_metrics(labels, preds)


# ---------------------------------------------------------------- multiclass_metrics


def test_multiclass_metrics_hand_worked():
    labels = ["CWE-787", "CWE-787", "CWE-125", "other"]
    preds = ["CWE-787", None, "CWE-787", "CWE-416"]
    m = multiclass_metrics(labels, preds)
    # only the first prediction is right -> accuracy 1/4; one None of 4 -> invalid 1/4
    assert m["accuracy"] == 0.25
    assert m["invalid"] == 0.25
    # classes = labels ∪ preds without None, sorted; "None" is not a class
    assert list(m["per_class"]) == ["CWE-125", "CWE-416", "CWE-787", "other"]
    # CWE-787: predicted twice, right once -> P 1/2; gold twice (the None one is a miss) -> R 1/2; F1 1/2
    assert m["per_class"]["CWE-787"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    # CWE-125: never predicted -> P 0.0; gold once, missed -> R 0; F1 0
    assert m["per_class"]["CWE-125"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # CWE-416: predicted once, wrong -> P 0/1; never gold -> support 0, R 0.0
    assert m["per_class"]["CWE-416"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["other"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    # macro over the 4 classes: (0 + 0 + 0.5 + 0) / 4
    assert m["macro_f1"] == pytest.approx(0.125)


def test_multiclass_metrics_perfect_and_all_invalid():
    perfect = multiclass_metrics(["benign", "vulnerable", "benign"], ["benign", "vulnerable", "benign"])
    assert (perfect["accuracy"], perfect["macro_f1"], perfect["invalid"]) == (1.0, 1.0, 0.0)
    # every answer unparsable: classes come from labels only, each with recall 0 -> macro F1 0
    invalid = multiclass_metrics(["benign", "vulnerable"], [None, None])
    assert (invalid["accuracy"], invalid["macro_f1"], invalid["invalid"]) == (0.0, 0.0, 1.0)
    assert list(invalid["per_class"]) == ["benign", "vulnerable"]


def test_multiclass_metrics_matches_sklearn_macro_f1():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(7)
    classes = ["CWE-787", "CWE-125", "CWE-416", "CWE-20", "other"]
    labels = [rng.choice(classes[:4]) for _ in range(200)]
    preds = [rng.choice([*classes, None]) for _ in range(200)]
    m = multiclass_metrics(labels, preds)
    # None stands for a sentinel that sklearn sees but is kept out of `labels=`, so it only costs recall
    sentinel = [p if p is not None else "<invalid>" for p in preds]
    expected = sklearn_metrics.f1_score(
        labels, sentinel, labels=sorted(m["per_class"]), average="macro", zero_division=0
    )
    assert m["macro_f1"] == pytest.approx(expected)
    assert m["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, sentinel))


def test_multiclass_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="length"):
        multiclass_metrics(["benign"], [])
    with pytest.raises(ValueError, match="at least one"):
        multiclass_metrics([], [])


# ---------------------------------------------------------------- pairwise_metrics


def test_pairwise_metrics_hand_worked():
    # 8 pairs: 4 correct (1,0), 2 both-vulnerable, 1 both-benign, 1 reversed
    # -> 4/8 = 0.5, 2/8 = 0.25, 1/8 = 0.125, 1/8 = 0.125: fractions, like every other metric
    pairs = [(1, 0), (1, 1), (1, 0), (0, 0), (1, 0), (0, 1), (1, 1), (1, 0)]
    m = pairwise_metrics(pairs)
    assert m == {"P-C": 0.5, "P-V": 0.25, "P-B": 0.125, "P-R": 0.125}
    assert sum(m.values()) == 1.0


def test_pairwise_metrics_all_pairs_correct():
    assert pairwise_metrics([(1, 0)] * 3) == {"P-C": 1.0, "P-V": 0.0, "P-B": 0.0, "P-R": 0.0}


def test_pairwise_metrics_rejects_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        pairwise_metrics([])
    with pytest.raises(ValueError, match="two predictions"):
        pairwise_metrics([(1, 0), (1, 2)])


# ---------------------------------------------------------------- vd_score


def release_vd_score(labels, scores, max_fpr):
    """PrimeVul's calc_vd_score.py logic on top of sklearn's roc_curve, as the reference."""
    roc_curve = pytest.importorskip("sklearn.metrics").roc_curve
    fpr, _, thresholds = roc_curve(labels, scores)
    threshold = thresholds[[i for i, f in enumerate(fpr) if f <= max_fpr][-1]]
    fn = sum(1 for y, s in zip(labels, scores, strict=True) if y == 1 and s < threshold)
    tp = sum(1 for y, s in zip(labels, scores, strict=True) if y == 1 and s >= threshold)
    return fn / (fn + tp)


def test_vd_score_hand_worked():
    # descending: .9 P, .8 P, .7 N, .4 P, .3 N, .2 N, .1 N   (3 positives, 4 negatives)
    # points (FP, TP): .9 (0,1)  .8 (0,2)  .7 (1,2)  .4 (1,3)  .3 (2,3)  .2 (3,3)  .1 (4,3); plus inf (0,0)
    labels = [1, 1, 0, 1, 0, 0, 0]
    scores = [0.9, 0.8, 0.7, 0.4, 0.3, 0.2, 0.1]
    # FPR <= 0.5% allows FP = 0: last such point is .8 with TP 2 -> FNR = 1/3
    assert vd_score(labels, scores) == pytest.approx(1 / 3)
    # FPR <= 0.25 allows FP = 1: last such point is .4 with TP 3 -> FNR 0
    assert vd_score(labels, scores, max_fpr=0.25) == 0.0
    assert vd_score(labels, scores) == pytest.approx(release_vd_score(labels, scores, 0.005))


def test_vd_score_follows_drop_intermediate():
    # .9 P; .8 P and N tied; .7 P and N tied; .1 N    (3 positives, 3 negatives)
    # points (FP, TP): .9 (0,1)  .8 (1,2)  .7 (2,3)  .1 (3,3)
    # steps into and out of .8 are both (+1, +1): collinear, so roc_curve drops .8.
    # max_fpr 0.4 allows FP = 1, but with .8 gone the last point with FPR <= 0.4 is .9 (TP 1) -> FNR 2/3
    # (keeping .8 would have given TP 2 -> 1/3; the release's number is 2/3).
    labels = [1, 1, 0, 1, 0, 0]
    scores = [0.9, 0.8, 0.8, 0.7, 0.7, 0.1]
    assert vd_score(labels, scores, max_fpr=0.4) == pytest.approx(2 / 3)
    assert vd_score(labels, scores, max_fpr=0.4) == pytest.approx(release_vd_score(labels, scores, 0.4))


def test_vd_score_extremes():
    # perfect ranking: every positive above every negative -> FP 0 reached with TP = 2 -> FNR 0
    assert vd_score([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8]) == 0.0
    # top score is a negative: only the inf point has FP 0 and it flags nothing -> FNR 1
    assert vd_score([0, 1, 0], [0.9, 0.5, 0.1]) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_vd_score_matches_release_script(seed):
    rng = random.Random(seed)
    labels = [1 if rng.random() < 0.2 else 0 for _ in range(600)]
    # coarse scores give many ties, fine ones almost none; positives score higher on average
    coarse = [round(rng.betavariate(2 + 2 * y, 2) * 10) / 10 for y in labels]
    fine = [rng.gauss(y, 1.0) for y in labels]
    for scores in (coarse, fine):
        for max_fpr in (0.005, 0.05, 0.2, 0.5, 1.0):
            assert vd_score(labels, scores, max_fpr) == pytest.approx(release_vd_score(labels, scores, max_fpr))
    # small sets on 3 score levels: runs of equal ROC steps, which roc_curve drops, are common here
    for _ in range(50):
        labels = [0, 1] + [rng.randint(0, 1) for _ in range(8)]
        scores = [rng.randint(0, 2) / 2 for _ in labels]
        for max_fpr in (0.005, 0.2, 0.4, 0.6):
            assert vd_score(labels, scores, max_fpr) == pytest.approx(release_vd_score(labels, scores, max_fpr))


@pytest.mark.parametrize(
    ("labels", "scores", "max_fpr", "message"),
    [
        ([1, 1], [0.2, 0.3], 0.005, "at least one"),
        ([0, 0], [0.2, 0.3], 0.005, "at least one"),
        ([1, 0], [0.2], 0.005, "length"),
        ([1, 0], [0.2, math.nan], 0.005, "NaN"),
        ([1, 0], [0.2, 0.3], 1.5, "max_fpr"),
        ([1, 3], [0.2, 0.3], 0.005, "0 and 1"),
    ],
)
def test_vd_score_rejects_bad_input(labels, scores, max_fpr, message):
    with pytest.raises(ValueError, match=message):
        vd_score(labels, scores, max_fpr)


# ---------------------------------------------------------------- majority_vote


def test_majority_vote_counts_none_in_the_shares():
    # 4 samples: CWE-787 twice (2/4), CWE-125 once (1/4), one unparsable (in k, not in the dict)
    winner, shares = majority_vote(["CWE-787", "CWE-125", None, "CWE-787"])
    assert winner == "CWE-787"
    assert shares == {"CWE-787": 0.5, "CWE-125": 0.25}


def test_majority_vote_tie_goes_to_first_seen():
    # 2 vs 2 over 5 samples (shares 2/5 each): the answer seen first wins, not the alphabetically first one
    assert majority_vote(["vulnerable", "benign", "benign", "vulnerable", None]) == (
        "vulnerable",
        {"vulnerable": 0.4, "benign": 0.4},
    )
    assert majority_vote(["benign", "vulnerable", "vulnerable", "benign", None])[0] == "benign"


def test_majority_vote_all_none_or_empty():
    assert majority_vote([None, None, None]) == (None, {})
    assert majority_vote([]) == (None, {})


# ---------------------------------------------------------------- pass_at_k


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (5, 2, 1, 0.4),  # 1 - C(3,1)/C(5,1) = 1 - 3/5; pass@1 is just c/n
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (10, 3, 5, 11 / 12),  # 1 - C(7,5)/C(10,5) = 1 - 21/252 = 1 - 1/12
        (5, 0, 3, 0.0),  # c = 0: no correct sample, no pass
        (5, 5, 3, 1.0),  # c = n: every draw passes
        (4, 1, 4, 1.0),  # k = n: all samples drawn, the one correct is among them
        (4, 0, 4, 0.0),  # k = n, c = 0
        (4, 3, 2, 1.0),  # n - c = 1 < k = 2: any 2 draws include a correct one
    ],
)
def test_pass_at_k_hand_worked(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_large_n_is_stable():
    # C(1000, 100) has ~140 digits; the product form must agree with exact rational arithmetic
    exact = 1 - Fraction(math.comb(990, 100), math.comb(1000, 100))
    assert pass_at_k(1000, 10, 100) == pytest.approx(float(exact), rel=1e-12)


@pytest.mark.parametrize(("n", "c", "k"), [(3, 1, 4), (3, 1, 0), (3, 4, 1), (3, -1, 1)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)
