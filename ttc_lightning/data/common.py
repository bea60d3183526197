"""Pieces shared by the data modules: JSON-lines reading with `file:line` errors, batching, length filtering, a
training loader that resumes in the middle of an epoch."""

from __future__ import annotations

import itertools
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader

from ttc_lightning.errors import TTCError, data_error

log = logging.getLogger("ttc")

OWN_LIMIT = "data.max_prompt_tokens"
MODEL_LIMIT = "the model's context minus model.max_new_tokens"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line raises `TTCError` naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise TTCError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                message = (
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
                )
                raise data_error(path, lineno, None, message) from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise data_error(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise data_error(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def collate_rows(rows: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows -> columns. Values stay Python objects: prompts are tokenized by the module, metadata goes to rewards."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def seeded_shuffle(rows: list[Any], seed: int) -> list[Any]:
    """A copy of `rows` in an order that depends on `seed` alone (not on global RNG state)."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def prompt_token_count(tokenizer: Any, prompt: str | list[dict[str, str]]) -> int:
    """Tokens the model will see for `prompt`: chat template with the generation prompt for messages, raw otherwise."""
    if isinstance(prompt, str):
        return len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return len(ids)


def filter_by_prompt_length(
    rows: list[dict[str, Any]], tokenizer: Any, max_prompt_tokens: int | None, name: str, why: str = OWN_LIMIT
) -> list[dict[str, Any]]:
    """Drop rows whose prompt is longer than `max_prompt_tokens`, and say how many went (and `why` that limit)."""
    if max_prompt_tokens is None or tokenizer is None:
        return rows
    kept = [row for row in rows if prompt_token_count(tokenizer, row["prompt"]) <= max_prompt_tokens]
    if len(kept) < len(rows):
        log.info(
            "%s: dropped %d of %d prompts longer than %d tokens (%s)",
            name,
            len(rows) - len(kept),
            len(rows),
            max_prompt_tokens,
            why,
        )
    return kept


def capped_prompt_limit(own: int | None, model_limit: int | None) -> tuple[int | None, str]:
    """The prompt length limit to apply and where it comes from: the data module's `max_prompt_tokens`, capped by
    what the model's context leaves for a prompt (`model_limit`; the limit when the data module sets none)."""
    if model_limit is None or (own is not None and own <= model_limit):
        return own, OWN_LIMIT
    if own is not None:
        log.warning(
            "data.max_prompt_tokens=%d is more than the model can take: %d (%s) applies", own, model_limit, MODEL_LIMIT
        )
    return model_limit, MODEL_LIMIT


def seeded_generator(seed: int) -> torch.Generator:
    """A loader's own generator: without one, every new iterator of a DataLoader draws its base seed from the global
    random state, which sampling uses, so a resumed run would sample other completions than an unbroken one."""
    return torch.Generator().manual_seed(seed)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes in the middle of an epoch instead of starting the epoch over.

    Lightning saves `state_dict()` in every checkpoint and calls `load_state_dict()` before the first pass after a
    restore. The state is where the epoch's order comes from (the shuffling generator as the epoch began, or the
    epoch number of DDP's sampler) and how many of its batches were trained on; the restored pass draws the same
    order and skips those batches. `trained` reads that count from the trainer, because Lightning fetches a batch
    ahead of the one being trained on.
    """

    def __init__(self, *args: Any, trained: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained = trained
        self._epoch_start = self._generator_state()
        self._skip = 0
        self._restored_epoch: int | None = None
        self._epoch_offset = 0

    def __iter__(self) -> Iterator[Any]:
        self._epoch_start = self._generator_state()
        skip, self._skip = self._skip, 0
        return self._batches(skip)

    def _batches(self, skip: int) -> Iterator[Any]:
        # Runs at the first batch, after Lightning has numbered the DDP sampler's epoch. A run stopped by max_steps
        # counts its unfinished epoch as done, so after a restore Lightning's number can be one ahead of the epoch
        # the data is in: keep the sampler on the data's epoch from then on.
        if hasattr(self.sampler, "set_epoch"):
            if self._restored_epoch is not None:
                self._epoch_offset = self._restored_epoch - self.sampler.epoch
                self._restored_epoch = None
            self.sampler.set_epoch(self.sampler.epoch + self._epoch_offset)
        yield from itertools.islice(super().__iter__(), skip, None)

    def state_dict(self) -> dict[str, Any]:
        trained = self.trained()
        epoch = getattr(self.sampler, "epoch", None)
        if trained >= len(self):  # the epoch is over: the next one starts from the generator as it is now
            return {"generator": self._generator_state(), "batches": 0, "epoch": None if epoch is None else epoch + 1}
        return {"generator": self._epoch_start, "batches": trained, "epoch": epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self._skip = state["batches"]
        self._restored_epoch = state["epoch"]

    def _generator_state(self) -> Any:
        return None if self.generator is None else self.generator.get_state()


def trained_batches(trainer: L.Trainer) -> int:
    """Batches of the current epoch that have been trained on (the one in flight counts once it returned)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
