"""From k sampled completions per prompt to the tasks' metrics and final predictions (pure, no model).

An evaluation record is one prompt: its metadata `columns`, its k `completions`, and their `lengths` (tokens).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from statistics import fmean
from typing import Any

from ttc_lightning.evaluation.metrics import (
    binary_metrics,
    majority_vote,
    multiclass_metrics,
    pairwise_metrics,
    pass_at_k,
    vd_score,
)
from ttc_lightning.oracle.check import PASSED, PROOF_FIXED
from ttc_lightning.rewards.answers import normalize_label, parse_answer, split_think_answer
from ttc_lightning.rewards.patch import score_patch

Record = dict[str, Any]
VULNERABLE = "vulnerable"


def classify_prediction(record: Record) -> dict[str, Any]:
    """The k parsed answers, their majority vote (ties: first seen) and the vote share of "vulnerable" as score."""
    answers = [parse_answer(text) for text in record["completions"]]
    final, shares = majority_vote(answers)
    return {"answers": answers, "final": final, "score": shares.get(VULNERABLE, 0.0)}


def classification_metrics(records: Sequence[Record], label_mode: str) -> dict[str, Any]:
    """Voting and single-sample accuracy, format-valid rate, and the mode's metrics.

    binary: accuracy/precision/recall/F1 (vulnerable = positive; no answer counts as "benign"), VD-S on the
    vulnerable vote share when both classes are present, and PrimeVul's pair-wise P-C/P-V/P-B/P-R on the pairs
    whose two halves were both evaluated. cwe: accuracy, macro-F1 and a per-class table.
    """
    predictions = [classify_prediction(r) for r in records]
    gold = [normalize_label(r["columns"]["label"]) for r in records]
    samples = [(answer, g) for p, g in zip(predictions, gold, strict=True) for answer in p["answers"]]
    metrics: dict[str, Any] = {
        "format_valid": fmean(
            split_think_answer(text) is not None and parse_answer(text) is not None
            for r in records
            for text in r["completions"]
        ),
        "mean_length": _mean_length(records),
    }
    if label_mode == "cwe":  # no answer is wrong
        table = multiclass_metrics(gold, [p["final"] for p in predictions])
        single = fmean(answer == g for answer, g in samples)
        metrics.update(accuracy=table["accuracy"], accuracy_single=single)
        metrics.update(macro_f1=table["macro_f1"], per_class=table["per_class"])
        return metrics

    labels = [int(g == VULNERABLE) for g in gold]
    voted = [int(p["final"] == VULNERABLE) for p in predictions]
    binary = binary_metrics(labels, voted)
    # No answer counts as "benign" here, as in precision, recall and the pair-wise metrics.
    single = fmean((answer == VULNERABLE) == (g == VULNERABLE) for answer, g in samples)
    metrics.update(accuracy=binary["accuracy"], accuracy_single=single)
    metrics.update(precision=binary["precision"], recall=binary["recall"], f1=binary["f1"])
    if 0 < sum(labels) < len(labels):
        metrics["vd_score"] = vd_score(labels, [p["score"] for p in predictions])
    pairs: dict[str, dict[int, int]] = {}
    for record, label, pred in zip(records, labels, voted, strict=True):
        if record["columns"].get("pair_id"):
            pairs.setdefault(record["columns"]["pair_id"], {})[label] = pred
    complete = [(halves[1], halves[0]) for halves in pairs.values() if len(halves) == 2]
    if complete:
        metrics.update(pairwise_metrics(complete))
    return metrics


def patch_prediction(record: Record) -> dict[str, Any]:
    """Score the k patches; the final one is the most common patched function among those that apply.

    The choice never looks at the reference fix (ties: the first seen), so it is what a user would deploy.
    """
    columns = record["columns"]
    scores = [score_patch(text, columns["vulnerable_func"], columns["fixed_func"]) for text in record["completions"]]
    applied = [s.patched for s in scores if s.applied]
    votes = Counter("".join(patched.split()) for patched in applied)
    final = next((p for p in applied if votes["".join(p.split())] == max(votes.values())), None)
    index = next((i for i, s in enumerate(scores) if final is not None and s.patched == final), None)
    chosen = scores[index] if index is not None else None
    return {
        "patches": [s.patched for s in scores],
        "errors": [s.error for s in scores],
        "rewards": [s.reward for s in scores],
        "applied": [s.applied for s in scores],
        "exact": [s.exact for s in scores],
        "final": final,
        "chosen": index,
        "score": chosen.reward if chosen is not None else -1.0,
        "final_exact": bool(chosen and chosen.exact),
    }


def patch_metrics(records: Sequence[Record]) -> dict[str, float]:
    """pass@1 and pass@k (unbiased, k = samples per prompt) for "applies" and "exact fix", mean patch reward,
    and the quality of the final (voted) patch."""
    predictions = [patch_prediction(r) for r in records]
    k = min(len(r["completions"]) for r in records)
    metrics: dict[str, float] = {}
    for name in ("applied", "exact"):
        for at in sorted({1, k}):
            metrics[f"{name}_pass@{at}"] = fmean(pass_at_k(len(p[name]), sum(p[name]), at) for p in predictions)
    metrics["patch_reward"] = fmean(r for p in predictions for r in p["rewards"])
    metrics["final_patch_reward"] = fmean(p["score"] for p in predictions)
    metrics["final_exact"] = fmean(p["final_exact"] for p in predictions)
    metrics["format_valid"] = fmean(split_think_answer(text) is not None for r in records for text in r["completions"])
    metrics["mean_length"] = _mean_length(records)
    return metrics


def oracle_metrics(records: Sequence[Record], name: str) -> dict[str, float]:
    """The oracle reward `name`'s verdicts (`ttc_lightning.oracle.check.grade`) on the prompts it scored (those
    with a harness): `oracle/<name>/final_pass` and `final_proof_fixed`, the share whose final (voted) patch passes
    everything and the share whose final patch fixes the proof (a prompt without a patch that applies counts as
    neither), and the unbiased pass@1 / pass@k of passing everything over the k samples."""
    judged = [r for r in records if any(v is not None for v in r["rewards"][name])]
    if not judged:
        return {}
    k = min(len(r["completions"]) for r in judged)
    final, passes = [], []
    for record in judged:
        grades = record["rewards"][name]
        chosen = patch_prediction(record)["chosen"]
        final.append(grades[chosen] if chosen is not None and grades[chosen] is not None else -1.0)
        passes.append(sum(g is not None and g >= PASSED for g in grades))
    metrics = {
        f"oracle/{name}/final_pass": fmean(g >= PASSED for g in final),
        f"oracle/{name}/final_proof_fixed": fmean(g >= PROOF_FIXED for g in final),
    }
    for at in sorted({1, k}):
        metrics[f"oracle/{name}/pass@{at}"] = fmean(
            pass_at_k(len(r["completions"]), c, at) for r, c in zip(judged, passes, strict=True)
        )
    return metrics


def _mean_length(records: Sequence[Record]) -> float:
    return fmean(n for r in records for n in r["lengths"])


def prompt_records(
    prompts: Sequence[Any],
    columns: dict[str, list],
    texts: Sequence[str],
    lengths: Sequence[int],
    scores: Sequence[Sequence[float]],
    reward: Sequence[float],
    reward_names: Sequence[str],
    k: int,
) -> list[Record]:
    """One evaluation record per prompt from its k scored completions (rows grouped by prompt; `scores` `[B*k][F]`
    with NaN for no score, `columns` one value per prompt)."""
    records = []
    for p, prompt in enumerate(prompts):
        rows = slice(p * k, (p + 1) * k)
        records.append(
            {
                "prompt": prompt,
                "columns": {key: values[p] for key, values in columns.items()},
                "completions": list(texts[rows]),
                "lengths": list(lengths[rows]),
                "rewards": {
                    name: [None if math.isnan(row[j]) else row[j] for row in scores[rows]]
                    for j, name in enumerate(reward_names)
                },
                "reward": list(reward[rows]),
            }
        )
    return records


def reward_metrics(records: Sequence[Record], reward_names: Sequence[str]) -> dict[str, float]:
    """Means over every sample: the weighted reward, each function's (its None scores left out), the length."""
    rewards = [r for record in records for r in record["reward"]]
    metrics = {"reward": fmean(rewards)}
    for name in reward_names:
        values = [v for record in records for v in record["rewards"][name] if v is not None]
        if values:
            metrics[f"rewards/{name}/mean"] = fmean(values)
    metrics["mean_length"] = _mean_length(records)
    return metrics
