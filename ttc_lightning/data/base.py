"""What the GRPO module and a data module may ask of each other (`Task`, `HasTokenizer`), and `TaskDataModule`, the
base of the PrimeVul tasks: their shared options, the `setup` that builds each split's rows, and the loaders.

A row is a dict: `prompt` (a string or chat messages) plus metadata columns that reward functions and evaluation
read. Rows are built, capped, length-filtered and put in a seeded order in `setup`, so the loaders never shuffle and
a seed always gives the same rows in the same order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from collections import Counter
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning as L
from torch.utils.data import DataLoader

from ttc_lightning.data.common import (
    OWN_LIMIT,
    capped_prompt_limit,
    collate_groups,
    collate_rows,
    data_record,
    file_digest,
    filter_by_prompt_length,
    seeded_shuffle,
)
from ttc_lightning.data.loader import (
    ResumableLoader,
    draw_train_batch,
    evaluation_loader,
    seeded_generator,
    trained_batches,
)
from ttc_lightning.data.primevul import HF_PREFIX, source_name
from ttc_lightning.errors import TTCError

log = logging.getLogger("ttc")

Row = dict[str, Any]
Record = dict[str, Any]
SAMPLE_DIR = str(Path(__file__).resolve().parents[1] / "assets" / "primevul_sample")


@runtime_checkable
class Task(Protocol):
    """What the GRPO module asks of its data module: further training prompts (dynamic sampling) and, when it
    evaluates, the task's metrics and final answers."""

    def next_train_batch(self) -> dict[str, list] | None:
        """The training stream's next batch after those taken so far (the resumable loader counts it, so a
        resumed run goes on after it), or None when the epoch has none left."""
        ...

    def evaluate(self, records: list[Record]) -> dict[str, Any]:
        """The task's metrics of evaluated prompts (each record: a prompt's `columns`, k `completions`, their
        `lengths`, `rewards` per function and weighted `reward`)."""
        ...

    def final_prediction(self, record: Record) -> dict[str, Any]:
        """The answer written to predictions.jsonl for one record: at least `final` and `score`."""
        ...

    @property
    def headline_metric(self) -> str:
        """The metric of `evaluate` (higher is better) that picks the best checkpoint of a run (`best.ckpt`)."""
        ...


class HasTokenizer(Protocol):
    """What a data module asks of the module it trains: the tokenizer that counts prompt tokens, and the longest
    prompt the model takes (None: no limit)."""

    tokenizer: Any
    prompt_limit: int | None


def best_completion(record: Record) -> dict[str, Any]:
    """Final answer for a task without its own rule: the completion the reward functions scored highest."""
    best = max(range(len(record["completions"])), key=lambda i: record["reward"][i])
    return {"final": record["completions"][best], "score": record["reward"][best]}


def prompt_tokenizer(dm: L.LightningDataModule, own: Any) -> Any:
    """The tokenizer that counts prompt tokens: `own` (set on the data module), else the attached module's, else
    None (no length filter)."""
    if own is not None:
        return own
    module: HasTokenizer | None = dm.trainer.lightning_module if dm.trainer is not None else None
    return None if module is None else module.tokenizer


def prompt_length_limit(dm: L.LightningDataModule, own: int | None) -> tuple[int | None, str]:
    """The prompt length limit for `dm` and why: its own `max_prompt_tokens`, capped by what the attached module's
    context leaves for a prompt (`prompt_limit`)."""
    module: HasTokenizer | None = dm.trainer.lightning_module if dm.trainer is not None else None
    return capped_prompt_limit(own, getattr(module, "prompt_limit", None))


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


def pair_groups(rows: list[Row]) -> list[list[Row]]:
    """Adjacent rows with the same `pair_id` as one group each (as `arrange_rows` leaves the rows of a pair)."""
    groups: list[list[Row]] = []
    for row in rows:
        if groups and row.get("pair_id") and groups[-1][0].get("pair_id") == row["pair_id"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def drop_long_prompts(
    rows: list[Row], tokenizer: Any, max_prompt_tokens: int | None, name: str, why: str = OWN_LIMIT
) -> list[Row]:
    """Length filter; a pair losing one row loses both, since pair-wise metrics need the two."""
    kept = filter_by_prompt_length(rows, tokenizer, max_prompt_tokens, name, why)
    before = Counter(row.get("pair_id") for row in rows)
    after = Counter(row.get("pair_id") for row in kept)
    return [row for row in kept if not row.get("pair_id") or after[row["pair_id"]] == before[row["pair_id"]]]


NO_VALIDATION_SPLIT = (
    "data.val_split is null (this config trains without validation): there is nothing to validate on; name a split, "
    "e.g. --data.val_split valid"
)
# A prompt option without spaces that has one of these endings (or a "/") names a file, which must exist.
PROMPT_SUFFIXES = (".txt", ".md", ".prompt", ".j2", ".jinja", ".tmpl")


def prompt_text(option: str, value: str | None) -> str | None:
    """A prompt option's text: `value` itself, or the contents of the file it names."""
    if value is None:
        return None
    if not value.strip():
        raise TTCError(f"data.{option}: empty; null keeps the task's own")
    path = Path(value).expanduser()
    looks_like_a_path = not any(c.isspace() for c in value) and ("/" in value or path.suffix in PROMPT_SUFFIXES)
    if looks_like_a_path and not path.is_file():
        why = "is a directory" if path.is_dir() else "does not exist"
        raise TTCError(f"data.{option}: {value} {why}; give a file that holds the text, or the text itself")
    if "\n" not in value and len(value) < 4096 and path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise TTCError(f"data.{option}: cannot read {path}: {e}") from None
        if not text.strip():
            raise TTCError(f"data.{option}: {path} is empty")
        return text
    return value


def prompt_hash(system_text: str | None, user_text: str | None) -> str | None:
    """A short hash of the prompt options' texts when either is set, else None."""
    if system_text is None and user_text is None:
        return None
    return hashlib.sha256(json.dumps([system_text, user_text]).encode()).hexdigest()[:12]


def check_template(template: str, fields: Sequence[str]) -> None:
    """`template` formats with `fields` alone: a brace that is not a field of the task is an error naming it."""
    try:
        named = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise TTCError(f"data.user_template: {e} (double a brace to write one: {{{{ or }}}})") from None
    allowed = ", ".join("{" + f + "}" for f in fields)
    for name in named:
        if name not in fields:
            shown = "{" + name + "}" if name else "{}"
            raise TTCError(f"data.user_template: {shown} is not a field of this task; it has {allowed}")


def check_system_prompt(text: str, fields: Sequence[str]) -> None:
    """The system prompt is used as written but for the task's `fields` (classification: {labels}); a placeholder
    that names anything else, or one of them left unclosed, is a mistake the model would read verbatim."""
    filled = ", ".join("{" + f + "}" for f in fields) or "nothing"
    for match in re.finditer(r"\{([A-Za-z_]\w*)(\}?)", text):
        name, closed = match.groups()
        if not closed and name in fields:
            raise TTCError(f"data.system_prompt: {{{name} is not closed; write {{{name}}}")
        if closed and name not in fields:
            raise TTCError(
                f"data.system_prompt: {{{name}}} is not a field of this task, whose system prompt fills in {filled}; "
                "the rest of it is used as written"
            )


class TaskDataModule(L.LightningDataModule):
    """The options, `setup` and loaders the PrimeVul tasks share. A task says how to read a split (`read`), whether
    evaluation keeps pairs together (`pairs_in_evaluation`), how to summarise rows in the log (`describe`), and how
    to score evaluated prompts (`evaluate`, `final_prediction`: with `next_train_batch`, the `Task` protocol). With
    `pairs_in_training` the training batches hold whole pairs."""

    pairs_in_evaluation = False
    pairs_in_training = False
    data_path: str
    """Directory with primevul_{train,valid,test}[_paired].jsonl, a single .jsonl file (used for every split), or
    hf://<repo_id> (a Hugging Face dataset). Null (the default): the small fictional sample shipped with ttc."""
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
    """Drop prompts longer than this many tokens (chat template included). Null: the model's context less
    `model.max_new_tokens` (max_position_embeddings - max_new_tokens), which caps a larger value too."""
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
    system_prompt: str | None
    """The system message instead of the task's own: the text, or the path of a file that holds it (a value without
    spaces that contains "/" or ends in .txt, .md, .prompt, .j2, .jinja or .tmpl must be one), used as written but
    for {labels}, which classification fills in with the allowed labels (any other {name} is refused). Null: the task's
    (`ttc fit --print_config` shows the option, the first rollout's prompt in rollouts.jsonl the message). A
    checkpoint records a hash of both prompt options, and resuming with others is refused as another task."""
    user_template: str | None
    """The user message instead of the task's own: a Python format string (the text, or a file's path) with the
    task's fields in braces (the patch task: {func}, {cwe}, {cve_desc}; classification: {func}; double a brace to
    write one). Null: the task's."""

    # The fields a user_template may name, and those the task fills in a system_prompt; each task's own.
    template_fields: tuple[str, ...] = ()
    system_fields: tuple[str, ...] = ()

    def __init__(
        self,
        data_path: str | None = None,
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
        system_prompt: str | None = None,
        user_template: str | None = None,
    ) -> None:
        super().__init__()
        data_path = SAMPLE_DIR if data_path is None else data_path
        if not data_path.startswith(HF_PREFIX) and not Path(data_path).exists():
            raise TTCError(
                f"data.data_path: {data_path} does not exist; give a directory with primevul_*.jsonl files, "
                f"a .jsonl file, or {HF_PREFIX}<repo_id>"
            )
        splits = {"train_split": train_split, "val_split": val_split, "test_split": test_split}
        for name, split in splits.items():
            if split is not None and not split.strip():
                raise TTCError(f"data.{name}: empty split name")
        for name, value, least in (
            ("batch_size", batch_size, 1),
            ("val_batch_size", val_batch_size, 1),
            ("max_prompt_tokens", max_prompt_tokens, 1),
            ("max_val_prompts", max_val_prompts, 1),
            ("num_workers", num_workers, 0),
        ):
            if value is not None and value < least:
                hint = "; use val_split: null to skip validation" if name == "max_val_prompts" else ""
                raise TTCError(f"data.{name} must be >= {least}, got {value}{hint}")
        self.data_path = data_path
        self.train_split, self.val_split, self.test_split = train_split, val_split, test_split
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.max_prompt_tokens, self.max_val_prompts = max_prompt_tokens, max_val_prompts
        self.seed, self.num_workers = seed, num_workers
        self.labels_inverted, self.check_labels = labels_inverted, check_labels
        self.system_prompt, self.user_template = system_prompt, user_template
        self.system_text, self.user_text = self.prompt_texts(system_prompt, user_template)
        self.tokenizer: Any = None
        self.train_rows: list[Row] = []
        self.val_rows: list[Row] = []
        self.test_rows: list[Row] = []
        self.train_data: dict[str, Any] | None = None  # `data_identity`, once the train split is read

    @classmethod
    def prompt_texts(cls, system_prompt: str | None, user_template: str | None) -> tuple[str | None, str | None]:
        """The texts of `system_prompt` and `user_template` (each given, or read from the file it names), checked
        against this task's fields; also read by the checks before a run starts, to report a problem beside others."""
        system_text = prompt_text("system_prompt", system_prompt)
        user_text = prompt_text("user_template", user_template)
        if user_text is not None:
            check_template(user_text, cls.template_fields)
        if system_text is not None:
            check_system_prompt(system_text, cls.system_fields)
        return system_text, user_text

    def prompt_identity(self) -> str | None:
        """A short hash of the prompt options when either is set (what a checkpoint's task records), else None."""
        return prompt_hash(self.system_text, self.user_text)

    def data_identity(self) -> dict[str, Any] | None:
        """What the training rows were read from (`common.data_record`: the train split's file and a hash of its
        bytes), which a checkpoint records; None until `setup` has read the train split (evaluation)."""
        return self.train_data

    def paired_files(self) -> bool:
        """Whether the task reads the paired files (primevul_<split>_paired.jsonl)."""
        return False

    def read(self, split: str, training: bool) -> list[Row]:
        """The rows of `split` (`training`: it is the split trained on)."""
        raise NotImplementedError(f"{type(self).__name__} must say how to read a split")

    def describe(self, rows: Sequence[Row]) -> str:
        """How the log summarises a split's rows."""
        return f"{len(rows)} prompts"

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            rows = self.read(self.train_split, training=True)
            self.train_rows = self._finish(rows, self.train_split, keep_pairs=self.pairs_in_training, limit=None)
            source = source_name(self.data_path, self.train_split, self.paired_files())
            digest = None if self.data_path.startswith(HF_PREFIX) else file_digest(source)
            self.train_data = data_record("data.data_path / data.train_split", source, digest)
        if stage in (None, "fit", "validate"):
            if self.val_split is None:
                if stage == "validate":
                    raise TTCError(NO_VALIDATION_SPLIT)
            else:
                limit = self.max_val_prompts if stage != "validate" else None
                rows = self.read(self.val_split, training=False)
                self.val_rows = self._finish(rows, self.val_split, keep_pairs=self.pairs_in_evaluation, limit=limit)
        if stage in ("test", "predict"):
            rows = self.read(self.test_split, training=False)
            self.test_rows = self._finish(rows, self.test_split, keep_pairs=self.pairs_in_evaluation, limit=None)

    def _finish(self, rows: list[Row], split: str, *, keep_pairs: bool, limit: int | None) -> list[Row]:
        """Order and cap, then length-filter; an empty result is an error that says where it came from."""
        name = f"{self.data_path} [{split}]"
        if not rows:
            raise TTCError(f"{name}: the split has no usable records (see the lines above for what was dropped)")
        rows = arrange_rows(rows, self.seed, keep_pairs, limit)
        max_tokens, why = prompt_length_limit(self, self.max_prompt_tokens)
        kept = drop_long_prompts(rows, prompt_tokenizer(self, self.tokenizer), max_tokens, name, why)
        if not kept:
            cap = f", at most {limit} prompts" if limit is not None else ""
            raise TTCError(
                f"{name}: no prompts left after filtering (max_prompt_tokens={max_tokens}{cap}): all {len(rows)} "
                f"prompts are longer ({why}); raise data.max_prompt_tokens or check the split"
            )
        log.info("%s: %s", split, self.describe(kept))
        return kept

    def train_dataloader(self) -> DataLoader:
        # The rows were shuffled once with the seed, so every epoch has the same order and a resumed one skips ahead.
        # With pairs in training the loader's items are whole pairs: no batch, on any rank, can split one.
        if self.pairs_in_training:
            items, batch_size, collate = pair_groups(self.train_rows), self.batch_size // 2, collate_groups
        else:
            items, batch_size, collate = self.train_rows, self.batch_size, collate_rows
        return ResumableLoader(
            items,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            generator=seeded_generator(self.seed),
            trained=partial(trained_batches, self.trainer),
        )

    def next_train_batch(self) -> dict[str, list] | None:
        return draw_train_batch(self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_rows) if self.val_rows else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_rows)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_rows)

    def _loader(self, rows: list[Row]) -> DataLoader:
        return evaluation_loader(rows, self.val_batch_size, collate_rows, self.seed, self.trainer, self.num_workers)

    def final_prediction(self, record: Record) -> dict[str, Any]:
        return best_completion(record)
