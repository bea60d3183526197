"""The classification task's rewards and the demo's toy reward: plain callables
`fn(completions: list[str], **columns) -> list[float | None]`.

`columns` are the batch's metadata columns, one value per completion (a prompt's values repeated G times).
`None` means "no score for this completion" and is left out of means.
"""

from __future__ import annotations

from typing import Any

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.answers import TAGS, normalize_label, parse_answer


def char_fraction_reward(completions: list[str], target_char: list[str] | None = None, **_: Any) -> list[float | None]:
    """Fraction of each completion's characters equal to its row's `target_char` column ("a" without one).

    A toy reward for the demo and the learning test: easy to move, and visibly moved by training.
    """
    chars = target_char or ["a"] * len(completions)
    return [text.count(char) / len(text) if text else 0.0 for text, char in zip(completions, chars, strict=True)]


def format_reward(completions: list[str], **_: Any) -> list[float | None]:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that appears exactly once (1.0 at best).

    The open-r1 "count tags" reward without its newline requirements: partial credit gives a shaped signal
    while a model is still learning the layout. Tag order is not checked: `</answer>x<answer>` earns 0.5 here
    but nothing from `label_reward`, whose `parse_answer` needs the answer block in order.
    """
    return [0.25 * sum(text.count(tag) == 1 for tag in TAGS) for text in completions]


def label_reward(completions: list[str], label: list[str], **_: Any) -> list[float | None]:
    """1.0 when the parsed answer equals the gold `label` column (both normalised), else 0.0 (malformed too)."""
    if len(label) != len(completions):
        raise ValueError(f"label_reward: {len(completions)} completions but {len(label)} labels")
    rewards: list[float | None] = []
    for text, gold in zip(completions, label, strict=True):
        want = normalize_label(gold)
        if want is None:
            raise TTCError(f"label: {gold!r} is not a classification label (vulnerable, benign, other or CWE-<n>)")
        rewards.append(1.0 if parse_answer(text) == want else 0.0)
    return rewards
