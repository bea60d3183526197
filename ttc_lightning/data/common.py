"""Pieces shared by the data modules: JSON-lines reading with `file:line` errors, batching, length filtering."""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ttc_lightning.errors import TTCError, data_error

log = logging.getLogger("ttc")


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line raises `TTCError` naming `file:line`."""
    path = Path(path)
    if not path.is_file():
        raise TTCError(f"{path}: file not found" + (" (it is a directory)" if path.is_dir() else ""))
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
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
    rows: list[dict[str, Any]], tokenizer: Any, max_prompt_tokens: int | None, name: str
) -> list[dict[str, Any]]:
    """Drop rows whose prompt is longer than `max_prompt_tokens`, and say how many went."""
    if max_prompt_tokens is None or tokenizer is None:
        return rows
    kept = [row for row in rows if prompt_token_count(tokenizer, row["prompt"]) <= max_prompt_tokens]
    if len(kept) < len(rows):
        log.info(
            "%s: dropped %d of %d prompts longer than max_prompt_tokens=%d",
            name,
            len(rows) - len(kept),
            len(rows),
            max_prompt_tokens,
        )
    return kept
