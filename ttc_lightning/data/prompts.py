"""`PromptDataModule`: prompts from JSON-lines files, for any reward function."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ttc_lightning.data.base import Record, best_completion, prompt_length_limit, prompt_tokenizer
from ttc_lightning.data.common import collate_rows, data_record, file_digest, filter_by_prompt_length, read_jsonl
from ttc_lightning.data.loader import (
    ResumableLoader,
    draw_train_batch,
    evaluation_loader,
    trained_batches,
)
from ttc_lightning.errors import TTCError, data_error

log = logging.getLogger("ttc")

DEMO_PROMPTS = str(Path(__file__).resolve().parent.parent / "assets" / "demo_prompts.jsonl")


def load_prompt_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a prompts file, checked: a `prompt` (string or chat messages) and the same columns on every line."""
    rows: list[dict[str, Any]] = []
    columns: set[str] | None = None
    for lineno, row in read_jsonl(path):
        _check_prompt(path, lineno, row.get("prompt", _MISSING))
        if columns is None:
            columns = set(row)
        elif set(row) != columns:
            missing, extra = sorted(columns - set(row)), sorted(set(row) - columns)
            detail = f"missing {missing}" if missing else f"unexpected {extra}"
            raise data_error(path, lineno, "columns", f"{detail}; every line needs the columns of the first line")
        rows.append(row)
    if not rows:
        raise TTCError(f"{path}: no prompts (the file is empty)")
    return rows


_MISSING = object()


def _check_prompt(path: str | Path, lineno: int, prompt: Any) -> None:
    if prompt is _MISSING:
        raise data_error(path, lineno, "prompt", "missing")
    if isinstance(prompt, str):
        if not prompt:
            raise data_error(path, lineno, "prompt", "empty string")
        return
    if not isinstance(prompt, list) or not prompt:
        raise data_error(path, lineno, "prompt", f"expected a string or a list of chat messages, got {prompt!r:.60}")
    for i, message in enumerate(prompt):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise data_error(path, lineno, f"prompt[{i}]", 'expected {"role": str, "content": str}')


class PromptDataModule(L.LightningDataModule):
    """Prompts from JSON lines: each line has `prompt` and any other columns, which go to the reward functions."""

    train_path: str
    """Training prompts (JSON lines). Null (the default): the demo prompts shipped with ttc."""
    val_path: str | None
    """Validation prompts (JSON lines), used by `ttc validate` and during fit; null for none."""
    test_path: str | None
    """Test prompts (JSON lines) for `ttc test` and `ttc predict`; null for none."""
    batch_size: int
    """Prompts per training step; each gets `model.num_generations` completions."""
    val_batch_size: int
    """Prompts per evaluation step."""
    max_prompt_tokens: int | None
    """Drop prompts longer than this many tokens (after the chat template). Null: the model's context less
    `model.max_new_tokens` (max_position_embeddings - max_new_tokens), which caps a larger value too."""
    seed: int
    """Seed of the shuffling of the training prompts (reshuffled each epoch, reproducibly)."""

    def __init__(
        self,
        train_path: str | None = None,
        val_path: str | None = None,
        test_path: str | None = None,
        batch_size: int = 4,
        val_batch_size: int = 8,
        max_prompt_tokens: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1 or val_batch_size < 1:
            raise TTCError("data.batch_size and data.val_batch_size must be >= 1")
        self.train_path = DEMO_PROMPTS if train_path is None else train_path
        self.val_path, self.test_path = val_path, test_path
        self.batch_size, self.val_batch_size = batch_size, val_batch_size
        self.max_prompt_tokens, self.seed = max_prompt_tokens, seed
        self.tokenizer: Any = None
        self.splits: dict[str, list[dict[str, Any]]] = {}
        self.train_data: dict[str, Any] | None = None  # `data_identity`, once the training prompts are read

    def setup(self, stage: str) -> None:
        wanted = {"fit": ["train", "val"], "validate": ["val"], "test": ["test"], "predict": ["test"]}[stage]
        paths = {"train": self.train_path, "val": self.val_path, "test": self.test_path}
        tokenizer = prompt_tokenizer(self, self.tokenizer)
        max_tokens, why = prompt_length_limit(self, self.max_prompt_tokens)
        for split in wanted:
            if paths[split] is None:
                if split != "val" or stage == "validate":
                    raise TTCError(f"data.{split}_path is not set: `ttc {stage}` needs {split} prompts")
                continue
            rows = load_prompt_rows(paths[split])
            rows = filter_by_prompt_length(rows, tokenizer, max_tokens, f"{split} ({paths[split]})", why)
            if not rows:
                raise TTCError(
                    f"{paths[split]}: every prompt is longer than {max_tokens} tokens ({why}); raise "
                    "data.max_prompt_tokens or use shorter prompts"
                )
            self.splits[split] = rows
            log.info("%s: %d prompts", split, len(rows))
            if split == "train":
                self.train_data = data_record("data.train_path", str(paths[split]), file_digest(paths[split]))

    def data_identity(self) -> dict[str, Any] | None:
        """What the training prompts were read from (`common.data_record`: the file and a hash of its bytes), which
        a checkpoint records; None until `setup` has read them (evaluation)."""
        return self.train_data

    def train_dataloader(self) -> DataLoader:
        # A seeded generator: the same order for the same seed, a new order each epoch (also under DDP's sampler).
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableLoader(
            self.splits["train"],
            batch_size=self.batch_size,
            shuffle=True,
            generator=generator,
            collate_fn=collate_rows,
            trained=partial(trained_batches, self.trainer),
        )

    def next_train_batch(self) -> dict[str, list] | None:
        return draw_train_batch(self.trainer)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.splits["val"]) if "val" in self.splits else []

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.splits["test"])

    def _loader(self, rows: list[dict[str, Any]]) -> DataLoader:
        return evaluation_loader(rows, self.val_batch_size, collate_rows, self.seed, self.trainer)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    headline_metric = "reward"  # the weighted reward, averaged over every validation sample

    def evaluate(self, records: list[Record]) -> dict[str, Any]:
        """No task metrics beyond the module's reward means: any reward function goes with these prompts."""
        return {}

    def final_prediction(self, record: Record) -> dict[str, Any]:
        return best_completion(record)
