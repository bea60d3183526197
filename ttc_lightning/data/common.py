"""Pieces shared by the data modules: JSON-lines reading with `file:line` errors, batching, length filtering, a
training loader that resumes in the middle of an epoch and lends the module further batches of it."""

from __future__ import annotations

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


def collate_groups(groups: Sequence[Sequence[dict[str, Any]]]) -> dict[str, list[Any]]:
    """Items that are groups of rows (a pair's two) -> the columns of all their rows, group after group."""
    return collate_rows([row for group in groups for row in group])


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
    """A DataLoader that Lightning resumes in the middle of an epoch instead of starting the epoch over, and from
    which the module can draw further batches of the same epoch (`draw`, for dynamic sampling).

    Lightning saves `state_dict()` in every checkpoint and calls `load_state_dict()` before the first pass after a
    restore. The state is where the epoch's order comes from (the shuffling generator as the epoch began, or the
    epoch number of DDP's sampler), how many of its batches were taken (by Lightning or by `draw`), and which of
    those Lightning had fetched but not trained on: it fetches a batch ahead of the one being trained on, so the
    module's draws come after that one. The restored pass draws the same order, hands Lightning the batches it had
    fetched, then goes on after the last batch taken. `trained` reads from the trainer how many of the epoch's
    batches were trained on.
    """

    def __init__(self, *args: Any, trained: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.trained = trained
        self._epoch_start = self._generator_state()
        self._restored: dict[str, Any] | None = None
        self._restored_epoch: int | None = None
        self._epoch_offset = 0
        self._source: Iterator[Any] | None = None
        self._taken = 0  # batches of the epoch taken, by Lightning or by `draw`
        self._taken_at_fetch = 0  # ... when Lightning last fetched one
        self._fetched: list[int] = []  # positions in the epoch of the batches Lightning fetched in this pass
        self._trained_before = 0  # batches of this epoch trained on before this pass (a restored one)

    def __iter__(self) -> Iterator[Any]:
        self._epoch_start = self._generator_state()
        restored, self._restored = self._restored or {"batches": 0}, None
        # A checkpoint written before `draw` existed has no "taken": then its batches trained on were all taken.
        self._taken = self._taken_at_fetch = restored.get("taken", restored["batches"])
        self._trained_before = restored["batches"]
        self._source, self._fetched = None, []
        return self._batches(self._taken, restored.get("pending", []))

    def _batches(self, skip: int, pending: list[int]) -> Iterator[Any]:
        # Runs at the first batch, after Lightning has numbered the DDP sampler's epoch. A run stopped by max_steps
        # counts its unfinished epoch as done, so after a restore Lightning's number can be one ahead of the epoch
        # the data is in: keep the sampler on the data's epoch from then on.
        if hasattr(self.sampler, "set_epoch"):
            if self._restored_epoch is not None:
                self._epoch_offset = self._restored_epoch - self.sampler.epoch
                self._restored_epoch = None
            self.sampler.set_epoch(self.sampler.epoch + self._epoch_offset)
        source = super().__iter__()
        held = [batch for position, batch in zip(range(skip), source, strict=False) if position in pending]
        self._source = source
        for position, batch in zip(pending, held, strict=True):
            self._fetched.append(position)
            yield batch
        while (batch := self.draw()) is not None:
            self._fetched.append(self._taken - 1)
            self._taken_at_fetch = self._taken
            yield batch

    def draw(self) -> Any | None:
        """The epoch's next batch after all those taken so far, or None when the epoch has none left."""
        batch = None if self._source is None else next(self._source, None)
        if batch is not None:
            self._taken += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        trained = self.trained()
        pending = self._fetched[max(trained - self._trained_before, 0) :]
        epoch = getattr(self.sampler, "epoch", None)
        if not pending and self._taken >= len(self):  # the epoch is over: the next one starts from the generator now
            return {"generator": self._generator_state(), "batches": 0, "epoch": None if epoch is None else epoch + 1}
        # Two pending batches: the step of the first did not finish (an error), so what it drew is drawn again.
        taken = self._taken if len(pending) <= 1 else self._taken_at_fetch
        state = {"generator": self._epoch_start, "batches": trained, "taken": taken, "pending": pending}
        return {**state, "epoch": epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self._restored = state
        self._restored_epoch = state["epoch"]

    def _generator_state(self) -> Any:
        return None if self.generator is None else self.generator.get_state()


def draw_train_batch(trainer: L.Trainer) -> dict[str, list[Any]] | None:
    """The training loader's next batch of the epoch after those taken so far (`ResumableLoader.draw`)."""
    loader = trainer.train_dataloader
    if not isinstance(loader, ResumableLoader):
        raise TTCError(
            f"model.dynamic_sampling draws further prompts from the training loader, but it is a "
            f"{type(loader).__name__}; return a ttc_lightning.data.common.ResumableLoader from train_dataloader()"
        )
    return loader.draw()


def trained_batches(trainer: L.Trainer) -> int:
    """Batches of the current epoch that have been trained on (the one in flight counts once it returned)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
