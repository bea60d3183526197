"""The PrimeVul tasks as data modules: vulnerability classification and patch generation, their prompts and rows."""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any, Literal

from ttc_lightning.data.base import Record, Row, TaskDataModule
from ttc_lightning.data.common import seeded_shuffle
from ttc_lightning.data.cwe import describe_cwe, is_cwe_id
from ttc_lightning.data.primevul import PrimeVulPair, PrimeVulRecord, load_functions, load_pairs
from ttc_lightning.errors import TTCError
from ttc_lightning.evaluation.records import (
    classification_metrics,
    classify_prediction,
    patch_metrics,
    patch_prediction,
)

log = logging.getLogger("ttc")

BINARY_LABELS = ("vulnerable", "benign")
OTHER = "other"

Messages = list[dict[str, str]]

_CLASSIFY_BINARY = "Decide whether the function you are given contains a security vulnerability."
_CLASSIFY_CWE = (
    "The function you are given contains a security vulnerability. Identify its weakness type (CWE); "
    "answer other when none of the listed ones fits."
)
_CLASSIFY_FORMAT = """You are a security expert auditing C/C++ code. {task}

Think it through step by step inside <think>...</think>, then answer with exactly one of these labels:
{labels}

Use exactly this format, with the label written alone in place of LABEL:
<think>
...
</think>
<answer>LABEL</answer>"""

PATCH_SYSTEM = """You are a security engineer fixing vulnerabilities in C/C++ code. You are given a vulnerable \
function, its weakness type and, when known, a description of the vulnerability.

Think it through step by step inside <think>...</think>, then give the fix inside <answer>...</answer> as one or more \
edits in exactly this format:

<<<<<<< SEARCH
lines copied exactly from the function
=======
replacement lines
>>>>>>> REPLACE

Copy the SEARCH lines from the function character for character, indentation included, so that they match exactly \
one place in it. Change only what the fix needs."""


def classification_prompt(
    func: str, labels: Sequence[str], system: str | None = None, template: str | None = None
) -> Messages:
    """System message with the task, answer format and allowed labels; user message with the function. `system`
    and `template` replace them (`data.system_prompt`, `data.user_template`): `{labels}` in `system` becomes the
    list of allowed labels, `{func}` in `template` the function."""
    if tuple(labels) == BINARY_LABELS:
        task = _CLASSIFY_BINARY
        listed = "- vulnerable: the function contains a security vulnerability\n- benign: it does not"
    else:
        task = _CLASSIFY_CWE
        listed = "\n".join(f"- {describe_cwe(label)}" if label != OTHER else f"- {OTHER}" for label in labels)
    system = _CLASSIFY_FORMAT.format(task=task, labels=listed) if system is None else system.replace("{labels}", listed)
    user = f"```c\n{func}\n```" if template is None else template.format(func=func)
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def patch_prompt(
    func: str, cwe: str, cve_desc: str | None, system: str | None = None, template: str | None = None
) -> Messages:
    """The weakness and the CVE description (the "issue"), then the vulnerable function. `system` and `template`
    replace the system message and the user message (`data.system_prompt`, `data.user_template`)."""
    if template is not None:
        user = template.format(func=func, cwe=describe_cwe(cwe) if cwe else "", cve_desc=cve_desc or "")
    else:
        parts = [f"Weakness: {describe_cwe(cwe)}"] if cwe else []
        if cve_desc:
            parts.append(f"Vulnerability description:\n{cve_desc}")
        parts.append(f"Vulnerable function:\n```c\n{func}\n```")
        user = "\n\n".join(parts)
    return [
        {"role": "system", "content": PATCH_SYSTEM if system is None else system},
        {"role": "user", "content": user},
    ]


def patch_row(pair: PrimeVulPair, system: str | None = None, template: str | None = None) -> Row:
    v = pair.vulnerable
    return {
        "prompt": patch_prompt(v.func, v.primary_cwe, v.cve_desc, system, template),
        "id": str(v.idx),
        "cve": v.cve or "",
        "cwe": v.primary_cwe,
        "vulnerable_func": v.func,
        "fixed_func": pair.fixed.func,
        "file_name": v.file_name,
    }


def top_cwes(records: Sequence[PrimeVulRecord], k: int) -> list[str]:
    """The `k` most frequent CWE ids among vulnerable records (first CWE of each), ties by id number."""
    counts = Counter(r.primary_cwe for r in records if r.target == 1 and is_cwe_id(r.primary_cwe))
    return sorted(counts, key=lambda c: (-counts[c], int(c[4:])))[:k]


def gold_label(record: PrimeVulRecord, labels: Sequence[str]) -> str:
    if tuple(labels) == BINARY_LABELS:
        return "vulnerable" if record.target == 1 else "benign"
    return record.primary_cwe if record.primary_cwe in labels else OTHER


def balance_rows(rows: list[Row], seed: int) -> list[Row]:
    """Downsample every label to the count of the rarest one (seeded)."""
    by_label: dict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_label[row["label"]].append(row)
    n = min(len(group) for group in by_label.values())
    return [row for label in sorted(by_label) for row in seeded_shuffle(by_label[label], seed)[:n]]


def _check_pair_batches(paired: bool, label_mode: str, batch_size: int) -> None:
    if not paired:
        raise TTCError("data.pair_batches needs paired: true (the pairs come from the primevul_*_paired.jsonl files)")
    if label_mode != "binary":
        raise TTCError(
            "data.pair_batches needs label_mode: binary (cwe mode keeps only the vulnerable function of a pair)"
        )
    if batch_size % 2:
        raise TTCError(
            f"data.pair_batches needs an even data.batch_size (whole pairs in every batch), got {batch_size}"
        )


class PrimeVulClassificationDataModule(TaskDataModule):
    """PrimeVul functions to classify: vulnerable or benign, or which CWE.

    Pair with `format_reward` and `label_reward` from `ttc_lightning.rewards`.

    Row columns: `prompt`, `id` (record idx), `label` (gold label), `target` (1 vulnerable, 0 not), `cwe` (first CWE
    id or ""), `pair_id` ("" unless read from a paired file).
    """

    pairs_in_evaluation = True
    template_fields = ("func",)
    system_fields = ("labels",)
    label_mode: Literal["binary", "cwe"]
    """binary: vulnerable / benign. cwe: the CWE of vulnerable functions, among the top_k of the train split + other."""
    paired: bool
    """Read the paired files (vulnerable function and its fix, rows share a pair_id) instead of the unpaired ones."""
    top_k: int
    """label_mode cwe: number of CWE classes, the most frequent in the train split; the rest become `other`."""
    cwe_labels: list[str] | None
    """label_mode cwe: fixed CWE classes (e.g. [CWE-787, CWE-125]) instead of the train split's top_k."""
    balance: bool
    """Downsample the train split so every label has as many rows as the rarest (PrimeVul is ~3% vulnerable). With
    paired: true it changes nothing: each pair is one vulnerable and one fixed function."""
    pair_batches: bool
    """Train on whole pairs: both functions of a pair (vulnerable and fixed) in the same batch, so the same
    optimizer step, the contrast that the pair-wise metrics (P-C, P-V, P-B, P-R) measure. Pairs move as units in
    the seeded order. Needs paired: true, label_mode: binary and an even batch_size."""

    def __init__(
        self,
        label_mode: Literal["binary", "cwe"] = "binary",
        paired: bool = False,
        top_k: int = 10,
        cwe_labels: list[str] | None = None,
        balance: bool = False,
        pair_batches: bool = False,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        if label_mode not in ("binary", "cwe"):
            raise TTCError(f"data.label_mode must be binary or cwe, got {label_mode!r}")
        if top_k < 1:
            raise TTCError(f"data.top_k must be >= 1, got {top_k}")
        if cwe_labels is not None:
            if label_mode != "cwe":
                raise TTCError("data.cwe_labels needs data.label_mode: cwe")
            bad = [c for c in cwe_labels if not is_cwe_id(c)]
            if bad or not cwe_labels or len(set(cwe_labels)) < len(cwe_labels):
                raise TTCError(f"data.cwe_labels must be distinct CWE ids like CWE-787, got {cwe_labels}")
        if pair_batches:
            _check_pair_batches(paired, label_mode, self.batch_size)
        self.label_mode = label_mode
        self.paired = paired
        self.top_k = top_k
        self.cwe_labels = cwe_labels
        self.balance = balance
        self.pair_batches = self.pairs_in_training = pair_batches
        self.labels: list[str] | None = list(BINARY_LABELS) if label_mode == "binary" else None
        if cwe_labels is not None:
            self.labels = [*cwe_labels, OTHER]

    def paired_files(self) -> bool:
        return self.paired

    def _items(self, split: str) -> list[tuple[PrimeVulRecord, str]]:
        """(record, pair_id) of a split; only vulnerable functions in cwe mode."""
        options = {"labels_inverted": self.labels_inverted, "check_labels": self.check_labels}
        if self.paired:
            items = [
                (r, p.pair_id) for p in load_pairs(self.data_path, split, **options) for r in (p.vulnerable, p.fixed)
            ]
        else:
            items = [(r, "") for r in load_functions(self.data_path, split, **options)]
        return [(r, pair_id) for r, pair_id in items if self.label_mode == "binary" or r.target == 1]

    def read(self, split: str, training: bool) -> list[Row]:
        items = self._items(split)
        if self.labels is None:  # cwe mode: the classes come from the train split, whichever split this is
            self._set_cwe_labels(items if training else self._items(self.train_split))
        labels = self.labels or []
        rows = [
            {
                "prompt": classification_prompt(r.func, labels, self.system_text, self.user_text),
                "id": str(r.idx),
                "label": gold_label(r, labels),
                "target": r.target,
                "cwe": r.primary_cwe,
                "pair_id": pair_id,
            }
            for r, pair_id in items
        ]
        return balance_rows(rows, self.seed) if training and self.balance else rows

    def _set_cwe_labels(self, train_items: list[tuple[PrimeVulRecord, str]]) -> None:
        top = top_cwes([r for r, _ in train_items], self.top_k)
        if not top:
            raise TTCError(f"{self.data_path} [{self.train_split}]: no vulnerable function has a CWE id")
        self.labels = [*top, OTHER]
        log.info("CWE labels (the train split's most frequent): %s", ", ".join(self.labels))

    @property
    def headline_metric(self) -> str:
        """PrimeVul's pair-wise P-C on paired files (both halves of a pair right), else F1, or macro-F1 over CWEs."""
        if self.label_mode == "cwe":
            return "macro_f1"
        return "P-C" if self.paired else "f1"

    def describe(self, rows: Sequence[Row]) -> str:
        counts = Counter(row["label"] for row in rows)
        return f"{len(rows)} prompts ({', '.join(f'{k} {v}' for k, v in counts.most_common())})"

    def evaluate(self, records: list[Record]) -> dict[str, Any]:
        """Metrics of evaluated prompts (k completions each): see `ttc_lightning.evaluation.records`."""
        return classification_metrics(records, self.label_mode)

    def final_prediction(self, record: Record) -> dict[str, Any]:
        """The answer written to predictions.jsonl: the k parsed answers, their vote, the "vulnerable" share."""
        return classify_prediction(record)


class PrimeVulPatchDataModule(TaskDataModule):
    """Vulnerable functions from PrimeVul's paired files, to fix with SEARCH/REPLACE edits.

    The patch rewards in `ttc_lightning.rewards.patch` compare the edits with the real fix.

    Row columns: `prompt`, `id` (idx of the vulnerable record), `cve` (or ""), `cwe` (first CWE id or ""),
    `vulnerable_func`, `fixed_func`, `file_name` (None when the release has none).
    """

    template_fields = ("func", "cwe", "cve_desc")

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)

    def paired_files(self) -> bool:
        return True

    def read(self, split: str, training: bool) -> list[Row]:
        pairs = load_pairs(self.data_path, split, labels_inverted=self.labels_inverted, check_labels=self.check_labels)
        return [patch_row(p, self.system_text, self.user_text) for p in pairs]

    headline_metric = "final_patch_reward"  # the reward of the patch a user would deploy (chosen without the fix)

    def evaluate(self, records: list[Record]) -> dict[str, Any]:
        """Metrics of evaluated prompts (k completions each): see `ttc_lightning.evaluation.records`."""
        return patch_metrics(records)

    def final_prediction(self, record: Record) -> dict[str, Any]:
        """The patch written to predictions.jsonl: the k patched functions and the most common one that applies."""
        return patch_prediction(record)
