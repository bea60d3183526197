"""Pieces shared by the data modules: JSON-lines reading with `file:line` errors, batching, length filtering, a
training loader that resumes in the middle of an epoch and lends the module further batches of it."""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import unicodedata
import weakref
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from ttc_lightning.errors import TTCError, data_error

log = logging.getLogger("ttc")

OWN_LIMIT = "data.max_prompt_tokens"
MODEL_LIMIT = "the model's context minus model.max_new_tokens"


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield `(line_number, object)` for each non-blank line; a bad line raises `TTCError` naming `file:line`.

    A line is held once as bytes, then as text while it is parsed, never beside a third copy: a long line takes
    memory in proportion to its length, not more."""
    path = Path(path)
    if not path.is_file():
        raise TTCError(f"{path}: " + ("not a regular file" if path.exists() else "file not found"))
    with path.open("rb") as f:
        lineno = 0
        for raw in f:  # not enumerate(): it would hold on to the previous line's bytes
            lineno += 1
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                message = (
                    f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); re-encode the file as UTF-8"
                )
                raise data_error(path, lineno, None, message) from None
            del raw
            if line.isspace() or not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise data_error(path, lineno, None, f"malformed JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise data_error(path, lineno, None, f"expected a JSON object, got {type(obj).__name__}")
            if SURROGATE_ESCAPE.search(line):
                check_text(obj, path, lineno)
            del line
            yield lineno, obj


# A \ud800-\udfff escape: JSON allows one alone, but it is no character (it cannot be tokenized or written as UTF-8).
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(obj: dict[str, Any], path: str | Path, lineno: int) -> None:
    """Every string of a parsed line (keys too) is text: a lone surrogate left by an unpaired `\\udXXX` escape is a
    `TTCError` naming the file, line and field."""
    stack: list[tuple[str | None, Any]] = [(None, obj)]
    while stack:
        field, value = stack.pop()
        if isinstance(value, str):
            found = SURROGATE.search(value)
            if found:
                raise lone_surrogate(path, lineno, field, f"at character {found.start() + 1}", found.group())
        elif isinstance(value, dict):
            for i, key in enumerate(value):
                found = SURROGATE.search(key)
                if found:  # the key is not shown: printing it would fail as well
                    where = "in the name of " + (f"{field}'s key {i + 1}" if field else f"key {i + 1}")
                    raise lone_surrogate(path, lineno, None, where, found.group())
            stack.extend((key if field is None else f"{field}.{key}", item) for key, item in value.items())
        elif isinstance(value, list):
            stack.extend((f"{field}[{i}]", item) for i, item in enumerate(value))


def lone_surrogate(path: str | Path, lineno: int, field: str | None, where: str, char: str) -> TTCError:
    return data_error(
        path,
        lineno,
        field,
        f"a lone surrogate (\\u{ord(char):04x} {where}) is not text: a \\ud800-\\udfff escape must be one half of "
        "a pair, like \\ud83d\\ude00; fix or remove it",
    )


_digests: dict[tuple[str, int, int], str] = {}


def file_digest(path: str | Path) -> str:
    """A short sha256 of a file's bytes (worked out once per file, size and modification time): what a checkpoint
    records of the data it was trained on, the same wherever the file is copied to."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        _digests[key] = digest.hexdigest()[:16]
    return _digests[key]


def data_record(options: str, source: str, digest: str | None) -> dict[str, Any]:
    """A data module's `data_identity`: the `options` that name the training data, the file (or Hub split) it was
    read from, and the file's `file_digest` (None for a Hub dataset: then the name alone is compared)."""
    return {"options": options, "source": source, "digest": digest}


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


# Pre-tokenizers that keep every character of the text (ByteLevel turns each byte into one symbol); whitespace
# splitting, for one, drops the spaces, and a prompt of spaces would come to no tokens at all.
KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation", "Metaspace", "UnicodeScripts", "Sequence"}
UNICODE_FORMS = ("NFC", "NFD", "NFKC", "NFKD")


class TokenFloor:
    """The fewest tokens a text can come to, found without tokenizing it.

    Every token of a byte-level BPE tokenizer (GPT-2, Qwen, Llama 3) is a string of byte symbols, one per byte of
    text, and a BPE tokenizer with byte fallback has a token for whatever text its pieces do not cover; either way a
    token stands for at most `longest` characters of the normalized text (the longest token of the vocabulary, added
    tokens included, in characters, each of which is at least a byte), so a text of n characters once normalized is at
    least ceil(n / longest) tokens. `steps` normalize as the tokenizer does, or give text no longer than it would.
    """

    def __init__(self, longest: int, steps: Sequence[Callable[[str], str]] = ()) -> None:
        self.longest, self.steps = longest, list(steps)

    def __call__(self, text: str) -> int:
        for step in self.steps:
            text = step(text)
        return -(-len(text) // self.longest)


_floors: weakref.WeakKeyDictionary[Any, TokenFloor | None] = weakref.WeakKeyDictionary()


def token_floor(tokenizer: Any) -> TokenFloor | None:
    """`TokenFloor` of a Hugging Face fast tokenizer (worked out once per tokenizer), or None when its token count has
    no such floor: not BPE (WordPiece and Unigram fold unknown text into one token), neither byte-level nor with byte
    fallback (unknown text merges into one token), a pre-tokenizer that drops text, or a normalizer not followed
    here. Then prompts are tokenized to be measured."""
    try:
        return _floors[tokenizer]
    except (KeyError, TypeError):
        pass
    floor = _token_floor(tokenizer)
    try:
        _floors[tokenizer] = floor
    except TypeError:  # not weakly referenceable: worked out again next time
        pass
    return floor


def _token_floor(tokenizer: Any) -> TokenFloor | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "to_str"):
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # whatever a foreign tokenizer does: then prompts are tokenized
        return None
    model = spec.get("model") or {}
    vocab = model.get("vocab")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or not vocab:
        return None
    pre_tokenizers = list(_nodes(spec.get("pre_tokenizer"), "pretokenizers"))
    for node in pre_tokenizers:
        if node.get("type") not in KEEPING_PRE_TOKENIZERS or node.get("behavior") == "Removed":
            return None
    if any(node.get("type") == "ByteLevel" for node in pre_tokenizers):
        from tokenizers import pre_tokenizers as byte_level

        covered = set(byte_level.ByteLevel.alphabet()) <= set(vocab)
    else:
        covered = bool(model.get("byte_fallback")) and all(f"<0x{b:02X}>" in vocab for b in range(256))
    steps = _normalizer_steps(spec.get("normalizer"))
    if not covered or steps is None:
        return None
    added = [len(token.get("content", "")) for token in spec.get("added_tokens") or []]
    return TokenFloor(max(max(map(len, vocab)), *added, 1), steps)


def _nodes(node: dict[str, Any] | None, children: str) -> Iterator[dict[str, Any]]:
    """A normalizer's or pre-tokenizer's parts, a Sequence's included."""
    if node is None:
        return
    yield node
    for child in node.get(children) or []:
        yield from _nodes(child, children)


def _normalizer_steps(node: dict[str, Any] | None) -> list[Callable[[str], str]] | None:
    """Python steps that normalize text as the tokenizer's normalizer does, or into text no longer than it would
    (Prepend is left out); None for a normalizer not followed here."""
    steps: list[Callable[[str], str]] = []
    for part in _nodes(node, "normalizers"):
        kind = part.get("type")
        if kind in UNICODE_FORMS:
            steps.append(partial(unicodedata.normalize, kind))
        elif kind == "Lowercase":
            steps.append(str.lower)
        elif kind == "Replace" and isinstance((part.get("pattern") or {}).get("String"), str):
            steps.append(partial(_replace, part["pattern"]["String"], part.get("content", "")))
        elif kind not in ("Sequence", "Prepend"):
            return None
    return steps


def _replace(old: str, new: str, text: str) -> str:
    return text.replace(old, new)


def prompt_fits(tokenizer: Any, prompt: str | list[dict[str, str]], limit: int, floor: TokenFloor | None) -> bool:
    """Whether `prompt` is at most `limit` tokens. With a `floor`, a prompt whose floor is already over the limit is
    not tokenized (a prompt of 100 MB would take minutes and many GB); the others are, chat template and all."""
    if floor is None:
        return prompt_token_count(tokenizer, prompt) <= limit
    if isinstance(prompt, str):
        text = prompt
    else:  # the text apply_chat_template(tokenize=True) tokenizes, without special tokens of its own
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    if floor(text) > limit:
        return False
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit


def filter_by_prompt_length(
    rows: list[dict[str, Any]], tokenizer: Any, max_prompt_tokens: int | None, name: str, why: str = OWN_LIMIT
) -> list[dict[str, Any]]:
    """Drop rows whose prompt is longer than `max_prompt_tokens`, and say how many went (and `why` that limit).
    Prompts that cannot fit whatever their tokens (`token_floor`) go without being tokenized."""
    if max_prompt_tokens is None or tokenizer is None:
        return rows
    floor = token_floor(tokenizer)
    kept = [row for row in rows if prompt_fits(tokenizer, row["prompt"], max_prompt_tokens, floor)]
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
