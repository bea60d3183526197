"""The one parser of completions: `<think>...</think>` then `<answer>...</answer>`, and the labels answers hold.

Pure and dependency-free, so that reward functions import it without loading torch.
"""

from __future__ import annotations

import re

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_WORD_LABELS = frozenset({"vulnerable", "benign", "other"})
# "CWE-787", "cwe 787", "CWE_787", "CWE787", "CWE-0787" all mean the same weakness.
_CWE = re.compile(r"cwe[\s_:-]*(\d+)")


def split_think_answer(text: str) -> tuple[str, str] | None:
    """`(think, answer)`, both stripped, when `text` has exactly one `<think>...</think>` followed by exactly
    one `<answer>...</answer>`; None when a tag is missing, repeated or out of order.

    Text around the tags is allowed and an empty think is accepted (a model in non-thinking mode emits
    `<think>\\n\\n</think>`). A chat template that pre-fills `<think>` in the prompt leaves it out of the
    completion: the caller must put it back before calling this.
    """
    if any(text.count(tag) != 1 for tag in TAGS):
        return None
    think_open, think_close, answer_open, answer_close = (text.index(tag) for tag in TAGS)
    if not think_open < think_close < answer_open < answer_close:
        return None
    think = text[think_open + len(THINK_OPEN) : think_close]
    answer = text[answer_open + len(ANSWER_OPEN) : answer_close]
    return think.strip(), answer.strip()


def normalize_label(label: str) -> str | None:
    """Canonical form of a classification label: `vulnerable` / `benign` / `other` in lower case, or `CWE-<n>`.

    Case, surrounding whitespace and surrounding `. " ' ` *` are ignored (models write "**Vulnerable.**").
    Anything else is None, including a bare number: the prompt asks for `CWE-<n>` and "787" could as well be
    a line number, so guessing would reward answers that did not follow the instructions.
    """
    text = " ".join(label.split()).strip(" .\"'`*").lower()
    if text in _WORD_LABELS:
        return text
    match = _CWE.fullmatch(text)
    return f"CWE-{int(match.group(1))}" if match else None


def parse_answer(text: str) -> str | None:
    """The normalised label inside the single `<answer>...</answer>`; None when the block is missing, repeated,
    unclosed, or holds no valid label (see `normalize_label`). The think block is `format_reward`'s business."""
    if text.count(ANSWER_OPEN) != 1 or text.count(ANSWER_CLOSE) != 1:
        return None
    start = text.index(ANSWER_OPEN) + len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    return normalize_label(text[start:end]) if end != -1 else None
