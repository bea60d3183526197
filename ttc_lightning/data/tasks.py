"""The PrimeVul tasks as LightningDataModules: vulnerability classification and patch generation.

A row is a dict: `prompt` (chat messages) plus metadata columns that reward functions and evaluation read. Batches are
those columns (`collate_rows`). Rows are built, capped, length-filtered and put in a seeded order in `setup`, so the
dataloaders never shuffle and a seed always gives the same rows in the same order.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
from torch.utils.data import DataLoader

from ttc_lightning.cwe import describe_cwe, is_cwe_id
from ttc_lightning.data.common import (
    ResumableLoader,
    collate_rows,
    filter_by_prompt_length,
    seeded_shuffle,
    trained_batches,
)
from ttc_lightning.data.primevul import HF_PREFIX, PrimeVulPair, PrimeVulRecord, load_functions, load_pairs
from ttc_lightning.errors import TTCError
from ttc_lightning.evaluation import classification_metrics, classify_prediction, patch_metrics, patch_prediction

log = logging.getLogger("ttc")

SAMPLE_DIR = str(Path(__file__).resolve().parents[1] / "assets" / "primevul_sample")
BINARY_LABELS = ("vulnerable", "benign")
OTHER = "other"

Row = dict[str, Any]
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


def classification_prompt(func: str, labels: Sequence[str]) -> Messages:
    """System message with the task, answer format and allowed labels; user message with the function."""
    if tuple(labels) == BINARY_LABELS:
        task = _CLASSIFY_BINARY
        listed = "- vulnerable: the function contains a security vulnerability\n- benign: it does not"
    else:
        task = _CLASSIFY_CWE
        listed = "\n".join(f"- {describe_cwe(label)}" if label != OTHER else f"- {OTHER}" for label in labels)
    system = _CLASSIFY_FORMAT.format(task=task, labels=listed)
    return [{"role": "system", "content": system}, {"role": "user", "content": f"```c\n{func}\n```"}]


def patch_prompt(func: str, cwe: str, cve_desc: str | None) -> Messages:
    """The weakness and the CVE description (the "issue"), then the vulnerable function."""
    parts = [f"Weakness: {describe_cwe(cwe)}"] if cwe else []
    if cve_desc:
        parts.append(f"Vulnerability description:\n{cve_desc}")
    parts.append(f"Vulnerable function:\n```c\n{func}\n```")
    return [{"role": "system", "content": PATCH_SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def patch_row(pair: PrimeVulPair) -> Row:
    v = pair.vulnerable
    return {
        "prompt": patch_prompt(v.func, v.primary_cwe, v.cve_desc),
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


def arrange_rows(rows: list[Row], seed: int, keep_pairs: bool, limit: int | None = None) -> list[Row]:
    """Seeded order, at most `limit` rows; with `keep_pairs` the rows of a pair stay adjacent and go together."""
    units: dict[Any, list[Row]] = {}
    for i, row in enumerate(rows):
        key = row.get("pair_id") if keep_pairs and row.get("pair_id") else i
        units.setdefault(key, []).append(row)
    out: list[Row] = []
    for unit in seeded_shuffle(list(units.values()), seed):
        if limit is None or len(out) + len(unit) <= limit:
            out.extend(unit)
    return out


def drop_long_prompts(rows: list[Row], tokenizer: Any, max_prompt_tokens: int | None, name: str) -> list[Row]:
    """Length filter; a pair losing one row loses both, since pair-wise metrics need the two."""
    kept = filter_by_prompt_length(rows, tokenizer, max_prompt_tokens, name)
    before = Counter(row.get("pair_id") for row in rows)
    after = Counter(row.get("pair_id") for row in kept)
    return [row for row in kept if not row.get("pair_id") or after[row["pair_id"]] == before[row["pair_id"]]]


def _tokenizer(dm: L.LightningDataModule) -> Any:
    """The tokenizer set on the data module, else the attached LightningModule's, else None (no length filter)."""
    if getattr(dm, "tokenizer", None) is not None:
        return dm.tokenizer
    return getattr(getattr(getattr(dm, "trainer", None), "lightning_module", None), "tokenizer", None)


def _check_common(
    data_path: str,
    splits: dict[str, str | None],
    batch_size: int,
    val_batch_size: int,
    max_prompt_tokens: int | None,
    max_val_prompts: int | None,
    num_workers: int,
) -> None:
    if not data_path.startswith(HF_PREFIX) and not Path(data_path).exists():
        raise TTCError(
            f"data_path: {data_path} does not exist; give a directory with primevul_*.jsonl files, "
            f"a .jsonl file, or {HF_PREFIX}<repo_id>"
        )
    for name, split in splits.items():
        if split is not None and not split.strip():
            raise TTCError(f"{name}: empty split name")
    for name, value, least in (
        ("batch_size", batch_size, 1),
        ("val_batch_size", val_batch_size, 1),
        ("max_prompt_tokens", max_prompt_tokens, 1),
        ("max_val_prompts", max_val_prompts, 1),
        ("num_workers", num_workers, 0),
    ):
        if value is not None and value < least:
            hint = "; use val_split: null to skip validation" if name == "max_val_prompts" else ""
            raise TTCError(f"{name} must be >= {least}, got {value}{hint}")


def _finish(
    rows: list[Row],
    dm: Any,
    split: str,
    *,
    keep_pairs: bool,
    limit: int | None,
) -> list[Row]:
    """Order and cap, then length-filter; an empty result is an error that says where it came from."""
    name = f"{dm.data_path} [{split}]"
    rows = arrange_rows(rows, dm.seed, keep_pairs, limit)
    rows = drop_long_prompts(rows, _tokenizer(dm), dm.max_prompt_tokens, name)
    if not rows:
        cap = f", at most {limit} prompts" if limit is not None else ""
        raise TTCError(
            f"{name}: no prompts left after filtering (max_prompt_tokens={dm.max_prompt_tokens}{cap}); "
            "raise the limits or check the split"
        )
    return rows


def _train_loader(dm: Any) -> ResumableLoader:
    # The rows were shuffled once with the seed, so every epoch has the same order and a resumed one skips ahead.
    return ResumableLoader(
        dm.train_rows,
        batch_size=dm.batch_size,
        collate_fn=collate_rows,
        num_workers=dm.num_workers,
        trained=partial(trained_batches, dm.trainer),
    )


def _loader(rows: list[Row], batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(rows, batch_size=batch_size, shuffle=False, collate_fn=collate_rows, num_workers=num_workers)


class PrimeVulClassificationDataModule(L.LightningDataModule):
    """PrimeVul functions to classify: vulnerable or benign, or which CWE. Pair with `format_reward` and
    `label_reward` from `ttc_lightning.rewards`.

    Row columns: `prompt`, `id` (record idx), `label` (gold label), `target` (1 vulnerable, 0 not), `cwe` (first CWE
    id or ""), `pair_id` ("" unless read from a paired file).
    """

    data_path: str
    """Directory with primevul_{train,valid,test}[_paired].jsonl, a single .jsonl file (used for every split), or
    hf://<repo_id> (a Hugging Face dataset). Defaults to the small fictional sample shipped with ttc."""
    label_mode: Literal["binary", "cwe"]
    """binary: vulnerable / benign. cwe: the CWE of vulnerable functions, among the top_k of the train split + other."""
    paired: bool
    """Read the paired files (vulnerable function and its fix, rows share a pair_id) instead of the unpaired ones."""
    top_k: int
    """label_mode cwe: number of CWE classes, the most frequent in the train split; the rest become `other`."""
    cwe_labels: list[str] | None
    """label_mode cwe: fixed CWE classes (e.g. [CWE-787, CWE-125]) instead of the train split's top_k."""
    balance: bool
    """Downsample the train split so every label has as many rows as the rarest (PrimeVul is ~3% vulnerable)."""
    train_split: str
    """Split trained on."""
    val_split: str | None
    """Split validated on during fit; null for no validation."""
    test_split: str
    """Split for test and predict."""
    batch_size: int
    """Prompts per training step (each gets G completions)."""
    val_batch_size: int
    """Prompts per validation, test and predict batch."""
    max_prompt_tokens: int | None
    """Drop prompts longer than this many tokens (chat template included); null keeps all."""
    max_val_prompts: int | None
    """Validate on at most this many prompts during fit (a seeded subset, pairs kept whole); null for all."""
    seed: int
    """Seed of the row order, the validation subset and class balancing."""
    num_workers: int
    """DataLoader worker processes."""
    labels_inverted: bool
    """Flip the 0/1 labels as read (for a copy of PrimeVul that stores them inverted)."""
    check_labels: bool
    """Stop when labels look inverted (a mostly-vulnerable unpaired split, pairs listing the fix first)."""

    def __init__(
        self,
        data_path: str = SAMPLE_DIR,
        label_mode: Literal["binary", "cwe"] = "binary",
        paired: bool = False,
        top_k: int = 10,
        cwe_labels: list[str] | None = None,
        balance: bool = False,
        train_split: str = "train",
        val_split: str | None = "valid",
        test_split: str = "test",
        batch_size: int = 2,
        val_batch_size: int = 8,
        max_prompt_tokens: int | None = None,
        max_val_prompts: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        labels_inverted: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        splits = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        _check_common(data_path, splits, batch_size, val_batch_size, max_prompt_tokens, max_val_prompts, num_workers)
        if label_mode not in ("binary", "cwe"):
            raise TTCError(f"label_mode must be binary or cwe, got {label_mode!r}")
        if top_k < 1:
            raise TTCError(f"top_k must be >= 1, got {top_k}")
        if cwe_labels is not None:
            if label_mode != "cwe":
                raise TTCError("cwe_labels needs label_mode: cwe")
            bad = [c for c in cwe_labels if not is_cwe_id(c)]
            if bad or not cwe_labels or len(set(cwe_labels)) < len(cwe_labels):
                raise TTCError(f"cwe_labels must be distinct CWE ids like CWE-787, got {cwe_labels}")
        self.data_path = data_path
        self.label_mode = label_mode
        self.paired = paired
        self.top_k = top_k
        self.cwe_labels = cwe_labels
        self.balance = balance
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_val_prompts = max_val_prompts
        self.seed = seed
        self.num_workers = num_workers
        self.labels_inverted = labels_inverted
        self.check_labels = check_labels
        self.tokenizer: Any = None
        self.labels: list[str] | None = list(BINARY_LABELS) if label_mode == "binary" else None
        if cwe_labels is not None:
            self.labels = [*cwe_labels, OTHER]
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []
        self.test_rows: list[Row] = []

    def _read(self, split: str) -> list[tuple[PrimeVulRecord, str]]:
        """(record, pair_id) of a split; only vulnerable functions in cwe mode."""
        options = {"labels_inverted": self.labels_inverted, "check_labels": self.check_labels}
        if self.paired:
            items = [
                (r, p.pair_id) for p in load_pairs(self.data_path, split, **options) for r in (p.vulnerable, p.fixed)
            ]
        else:
            items = [(r, "") for r in load_functions(self.data_path, split, **options)]
        return [(r, pair_id) for r, pair_id in items if self.label_mode == "binary" or r.target == 1]

    def _rows(self, items: list[tuple[PrimeVulRecord, str]]) -> list[Row]:
        labels = self.labels or []
        return [
            {
                "prompt": classification_prompt(r.func, labels),
                "id": str(r.idx),
                "label": gold_label(r, labels),
                "target": r.target,
                "cwe": r.primary_cwe,
                "pair_id": pair_id,
            }
            for r, pair_id in items
        ]

    def _set_cwe_labels(self, train_items: list[tuple[PrimeVulRecord, str]]) -> None:
        top = top_cwes([r for r, _ in train_items], self.top_k)
        if not top:
            raise TTCError(f"{self.data_path} [{self.train_split}]: no vulnerable function has a CWE id")
        self.labels = [*top, OTHER]
        log.info("CWE labels (the train split's most frequent): %s", ", ".join(self.labels))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            train_items = self._read(self.train_split)
            if self.labels is None:
                self._set_cwe_labels(train_items)
            rows = self._rows(train_items)
            if self.balance:
                rows = balance_rows(rows, self.seed)
            self.train_rows = _finish(rows, self, self.train_split, keep_pairs=False, limit=None)
            self._log(self.train_split, self.train_rows)
        if self.labels is None:  # validate or test in cwe mode: the classes still come from the train split
            self._set_cwe_labels(self._read(self.train_split))
        if stage in (None, "fit", "validate"):
            if self.val_split is None:
                if stage == "validate":
                    raise TTCError("val_split is null: there is nothing to validate on")
            else:
                limit = self.max_val_prompts if stage != "validate" else None
                rows = self._rows(self._read(self.val_split))
                self.val_rows = _finish(rows, self, self.val_split, keep_pairs=True, limit=limit)
                self._log(self.val_split, self.val_rows)
        if stage in ("test", "predict"):
            rows = self._rows(self._read(self.test_split))
            self.test_rows = _finish(rows, self, self.test_split, keep_pairs=True, limit=None)
            self._log(self.test_split, self.test_rows)

    def _log(self, split: str, rows: list[Row]) -> None:
        counts = Counter(row["label"] for row in rows)
        log.info("%s: %d prompts (%s)", split, len(rows), ", ".join(f"{k} {v}" for k, v in counts.most_common()))

    def train_dataloader(self) -> DataLoader:
        return _train_loader(self)

    def val_dataloader(self) -> DataLoader | list:
        return _loader(self.val_rows, self.val_batch_size, self.num_workers) if self.val_rows else []

    def test_dataloader(self) -> DataLoader:
        return _loader(self.test_rows, self.val_batch_size, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return _loader(self.test_rows, self.val_batch_size, self.num_workers)

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics of evaluated prompts (k completions each): see `ttc_lightning.evaluation`."""
        return classification_metrics(records, self.label_mode)

    def final_prediction(self, record: dict[str, Any]) -> dict[str, Any]:
        """The answer written to predictions.jsonl: the k parsed answers, their vote, the "vulnerable" share."""
        return classify_prediction(record)


class PrimeVulPatchDataModule(L.LightningDataModule):
    """Vulnerable functions from PrimeVul's paired files, to fix with SEARCH/REPLACE edits; the patch rewards in
    `ttc_lightning.patch` compare them with the real fix.

    Row columns: `prompt`, `id` (idx of the vulnerable record), `cve` (or ""), `cwe` (first CWE id or ""),
    `vulnerable_func`, `fixed_func`, `file_name` (None when the release has none).
    """

    data_path: str
    """Directory with primevul_{train,valid,test}_paired.jsonl, a single paired .jsonl file (used for every split),
    or hf://<repo_id> (a Hugging Face dataset). Defaults to the small fictional sample shipped with ttc."""
    train_split: str
    """Split trained on."""
    val_split: str | None
    """Split validated on during fit; null for no validation."""
    test_split: str
    """Split for test and predict."""
    batch_size: int
    """Prompts per training step (each gets G completions)."""
    val_batch_size: int
    """Prompts per validation, test and predict batch."""
    max_prompt_tokens: int | None
    """Drop prompts longer than this many tokens (chat template included); null keeps all."""
    max_val_prompts: int | None
    """Validate on at most this many prompts during fit (a seeded subset); null for all."""
    seed: int
    """Seed of the row order and the validation subset."""
    num_workers: int
    """DataLoader worker processes."""
    labels_inverted: bool
    """Flip the 0/1 labels as read (for a copy of PrimeVul that stores them inverted)."""
    check_labels: bool
    """Stop when labels look inverted (pairs listing the fix first)."""

    def __init__(
        self,
        data_path: str = SAMPLE_DIR,
        train_split: str = "train",
        val_split: str | None = "valid",
        test_split: str = "test",
        batch_size: int = 2,
        val_batch_size: int = 8,
        max_prompt_tokens: int | None = None,
        max_val_prompts: int | None = None,
        seed: int = 0,
        num_workers: int = 0,
        labels_inverted: bool = False,
        check_labels: bool = True,
    ) -> None:
        super().__init__()
        splits = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        _check_common(data_path, splits, batch_size, val_batch_size, max_prompt_tokens, max_val_prompts, num_workers)
        self.data_path = data_path
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.max_prompt_tokens = max_prompt_tokens
        self.max_val_prompts = max_val_prompts
        self.seed = seed
        self.num_workers = num_workers
        self.labels_inverted = labels_inverted
        self.check_labels = check_labels
        self.tokenizer: Any = None
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []
        self.test_rows: list[Row] = []

    def _rows(self, split: str) -> list[Row]:
        pairs = load_pairs(self.data_path, split, labels_inverted=self.labels_inverted, check_labels=self.check_labels)
        return [patch_row(p) for p in pairs]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.train_rows = _finish(
                self._rows(self.train_split), self, self.train_split, keep_pairs=False, limit=None
            )
            log.info("%s: %d prompts", self.train_split, len(self.train_rows))
        if stage in (None, "fit", "validate"):
            if self.val_split is None:
                if stage == "validate":
                    raise TTCError("val_split is null: there is nothing to validate on")
            else:
                limit = self.max_val_prompts if stage != "validate" else None
                self.val_rows = _finish(self._rows(self.val_split), self, self.val_split, keep_pairs=False, limit=limit)
                log.info("%s: %d prompts", self.val_split, len(self.val_rows))
        if stage in ("test", "predict"):
            self.test_rows = _finish(self._rows(self.test_split), self, self.test_split, keep_pairs=False, limit=None)
            log.info("%s: %d prompts", self.test_split, len(self.test_rows))

    def train_dataloader(self) -> DataLoader:
        return _train_loader(self)

    def val_dataloader(self) -> DataLoader | list:
        return _loader(self.val_rows, self.val_batch_size, self.num_workers) if self.val_rows else []

    def test_dataloader(self) -> DataLoader:
        return _loader(self.test_rows, self.val_batch_size, self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return _loader(self.test_rows, self.val_batch_size, self.num_workers)

    def evaluate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Metrics of evaluated prompts (k completions each): see `ttc_lightning.evaluation`."""
        return patch_metrics(records)

    def final_prediction(self, record: dict[str, Any]) -> dict[str, Any]:
        """The patch written to predictions.jsonl: the k patched functions and the most common one that applies."""
        return patch_prediction(record)
