"""Reward functions: plain callables `fn(completions: list[str], **columns) -> list[float | None]`.

`columns` are the batch's metadata columns, one value per completion (a prompt's values repeated G times).
`None` means "no score for this completion" and is left out of means.
"""

from __future__ import annotations

from typing import Any


def char_fraction_reward(completions: list[str], target_char: str = "a", **_: Any) -> list[float | None]:
    """Fraction of the completion's characters equal to `target_char` (0 for an empty completion).

    A toy reward for the demo and the learning test: easy to move, hard to hack by accident.
    """
    return [text.count(target_char) / len(text) if text else 0.0 for text in completions]
