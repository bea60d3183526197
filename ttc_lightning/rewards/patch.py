"""The patch task: SEARCH/REPLACE edits on one function, oracle edits from a fix, SWE-RL's and syntax rewards.

An answer holds one or more blocks:

    <<<<<<< SEARCH
    lines copied exactly from the function
    =======
    replacement lines
    >>>>>>> REPLACE

Edits are line-based. A text is a list of lines split on `\\n` only (C sources may hold form feeds, which
`str.splitlines` would split on); `\\r\\n` is read as `\\n` and results use `\\n`. Whether a text ends with a
newline is not part of any line: `apply_edits` keeps the source's final-newline state, whatever the edits do.
SEARCH lines must equal the function's lines exactly, indentation and trailing whitespace included (as in SWE-RL).

Completions are split into reasoning and answer by `ttc_lightning.rewards.answers.split_think_answer`.

The syntax check parses functions with tree-sitter's C and C++ grammars (https://tree-sitter.github.io), whose
error recovery marks what it cannot parse with ERROR nodes and what it had to assume with MISSING nodes.
"""

from __future__ import annotations

import difflib
import functools
import threading
from dataclasses import dataclass
from typing import Any, Literal

import tree_sitter
import tree_sitter_c
import tree_sitter_cpp

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.answers import split_think_answer

SEARCH_MARKER = "<<<<<<< SEARCH"
DIVIDER = "======="
REPLACE_MARKER = ">>>>>>> REPLACE"
_MARKERS = (SEARCH_MARKER, DIVIDER, REPLACE_MARKER)

Language = Literal["c", "cpp"]
# `.C` (capital) is C++ by the GCC convention; `.c` is C.
_CPP_SUFFIXES = (".cc", ".cpp", ".cxx", ".hpp", ".hh", ".C")


@dataclass(frozen=True)
class Edit:
    """Replace the lines `search` (which must occur exactly once) by the lines `replace`.

    Both hold whole lines, each ending in `\\n`: `""` is zero lines (a deletion), `"\\n"` one blank line.
    """

    search: str
    replace: str


class PatchError(ValueError):
    """An answer that cannot be parsed or applied; the message says why."""


@dataclass(frozen=True)
class PatchScore:
    """Everything known about one completion: the rewards and evaluation read this, so parsing happens once."""

    applied: bool
    patched: str | None
    reward: float
    exact: bool
    error: str | None


def _lines(text: str) -> list[str]:
    """Lines of `text` without terminators; a final `\\n` ends the last line rather than starting a new one."""
    if not text:
        return []
    lines = text.replace("\r\n", "\n").split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def _text(lines: list[str]) -> str:
    """The `Edit` form of `lines`: each line ends in `\\n`."""
    return "".join(line + "\n" for line in lines)


def parse_edits(text: str) -> list[Edit]:
    """The SEARCH/REPLACE blocks in `text`, in order. Text outside blocks (prose, code fences) is ignored.

    Marker lines may carry surrounding whitespace. Raises `PatchError` when there is no block, a block is
    not terminated, or its markers are out of order.
    """
    edits: list[Edit] = []
    search: list[str] = []
    replace: list[str] = []
    state = "outside"  # then "search" after SEARCH_MARKER, "replace" after DIVIDER
    for lineno, line in enumerate(_lines(text), start=1):
        marker = line.strip()
        if state == "outside":
            if marker == SEARCH_MARKER:
                state, search, replace = "search", [], []
            elif marker == REPLACE_MARKER:
                raise PatchError(f"line {lineno}: {REPLACE_MARKER!r} without a {SEARCH_MARKER!r} block")
        elif marker == SEARCH_MARKER:
            raise PatchError(f"line {lineno}: {SEARCH_MARKER!r} inside an unterminated block")
        elif state == "search":
            if marker == REPLACE_MARKER:
                raise PatchError(f"line {lineno}: {REPLACE_MARKER!r} before {DIVIDER!r}")
            if marker == DIVIDER:
                state = "replace"
            else:
                search.append(line)
        elif marker == DIVIDER:
            raise PatchError(f"line {lineno}: a second {DIVIDER!r} in one block")
        elif marker == REPLACE_MARKER:
            edits.append(Edit(_text(search), _text(replace)))
            state = "outside"
        else:
            replace.append(line)
    if state != "outside":
        raise PatchError(f"unterminated block: missing {REPLACE_MARKER!r}")
    if not edits:
        raise PatchError("no SEARCH/REPLACE block")
    return edits


def format_edits(edits: list[Edit]) -> str:
    """The answer text of `edits`, one block each, blocks separated by a blank line; `parse_edits` inverts it."""
    blocks = []
    for edit in edits:
        search, replace = _lines(edit.search), _lines(edit.replace)
        if any(line.strip() in _MARKERS for line in search + replace):
            raise PatchError("an edit line reads as a SEARCH/REPLACE marker")
        blocks.append("\n".join([SEARCH_MARKER, *search, DIVIDER, *replace, REPLACE_MARKER]))
    return "\n\n".join(blocks)


def _find(lines: list[str], window: list[str], limit: int = 2) -> list[int]:
    """Start indices of `window` in `lines` (overlapping matches count), at most `limit` of them."""
    found: list[int] = []
    first, size = window[0], len(window)
    for i in range(len(lines) - size + 1):
        if lines[i] == first and lines[i : i + size] == window:
            found.append(i)
            if len(found) == limit:
                break
    return found


def apply_edits(source: str, edits: list[Edit]) -> str:
    """Apply `edits` in order; each SEARCH must match whole lines exactly once in the text as edited so far.

    The result uses `\\n` line endings and keeps `source`'s final-newline state. Raises `PatchError` for an
    empty SEARCH, a SEARCH equal to its REPLACE, a SEARCH not found, or one found more than once.
    """
    source = source.replace("\r\n", "\n")
    lines = _lines(source)
    for n, edit in enumerate(edits, start=1):
        search, replace = _lines(edit.search), _lines(edit.replace)
        if not search:
            raise PatchError(f"edit {n}: empty SEARCH")
        if search == replace:
            raise PatchError(f"edit {n}: SEARCH equals REPLACE")
        found = _find(lines, search, limit=len(lines))
        if not found:
            raise PatchError(f"edit {n}: SEARCH text not found")
        if len(found) > 1:
            raise PatchError(f"edit {n}: SEARCH text is ambiguous (found {len(found)} times)")
        lines[found[0] : found[0] + len(search)] = replace
    return "\n".join(lines) + ("\n" if lines and source.endswith("\n") else "")


def _context(old: list[str], current: list[str], shift: int, i1: int, i2: int, floor: int) -> tuple[int, int] | None:
    """Context lines `(above, below)` that make `old[i1 - above:i2 + below]` occur once both in `old` and in
    `current` (at index + `shift` there), so the blocks also apply one by one to the original function.

    Grows one line at a time, taking a side that makes the window unique when there is one, else alternating;
    None when no window starting at or after `floor` is unique.
    """

    def unique(above: int, below: int) -> bool:
        a, b = i1 - above, i2 + below
        return b > a and _find(old, old[a:b]) == [a] and _find(current, old[a:b]) == [a + shift]

    above = below = 0
    if unique(above, below):
        return above, below
    while True:
        grow = [(above + 1, below)] if i1 - above > floor else []
        grow += [(above, below + 1)] if i2 + below < len(old) else []
        if not grow:
            return None
        for context in grow:
            if unique(*context):
                return context
        above, below = grow[0] if len(grow) == 1 or above <= below else grow[1]


def _oracle_edits(old: list[str], new: list[str]) -> list[Edit]:
    """Minimal edits turning `old` into `new` that `apply_edits` applies unambiguously, in order.

    Lines between two edit windows are unchanged, so before edit k the text is
    `new[:end of REPLACE k-1] + old[end of SEARCH k-1:]`: each window is checked for uniqueness there.
    A window reaching into the next hunk takes that hunk in; a hunk with no unique window below the previous
    one is merged into it.
    """
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    hunks = [(i1, i2, j1, j2) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal"]
    if not hunks:
        raise PatchError("the functions have the same lines: there is nothing to edit")
    contexts: list[tuple[int, int]] = []  # (above, below) of hunks[m] for each placed hunk m
    while len(contexts) < len(hunks):
        k = len(contexts)
        i1, i2, j1, j2 = hunks[k]
        floor, new_end = (hunks[k - 1][1] + contexts[-1][1], hunks[k - 1][3] + contexts[-1][1]) if k else (0, 0)
        context = _context(old, new[:new_end] + old[floor:], new_end - floor, i1, i2, floor)
        if context is None:
            if not k:
                raise PatchError("an insertion into an empty function has no line to anchor it")
            contexts.pop()
            hunks[k - 1 : k + 1] = [(hunks[k - 1][0], i2, hunks[k - 1][2], j2)]
        elif k + 1 < len(hunks) and i2 + context[1] > hunks[k + 1][0]:
            hunks[k : k + 2] = [(i1, hunks[k + 1][1], j1, hunks[k + 1][3])]
        else:
            contexts.append(context)
    return [
        Edit(_text(old[i1 - above : i2 + below]), _text(new[j1 - above : j2 + below]))
        for (i1, i2, j1, j2), (above, below) in zip(hunks, contexts, strict=True)
    ]


def make_oracle_edits(vulnerable: str, fixed: str) -> str:
    """The answer text (SEARCH/REPLACE blocks) of the minimal line edits turning `vulnerable` into `fixed`.

    `apply_edits(vulnerable, parse_edits(result)) == fixed` whenever `fixed` uses `\\n` line endings and
    agrees with `vulnerable` on ending with a newline (edits cannot express either difference). Raises
    `PatchError` when the two have the same lines (nothing to edit) or `vulnerable` is empty.
    """
    return format_edits(_oracle_edits(_lines(vulnerable), _lines(fixed)))


def _unified_diff(old: str, new: str) -> str:
    """SWE-RL's normalised patch: a unified diff with 3 context lines, no file header, lines joined by `\\n`."""
    diff = difflib.unified_diff(_lines(old), _lines(new), lineterm="", n=3)
    return "\n".join(list(diff)[2:])


@functools.lru_cache(maxsize=1024)
def _oracle_diff(vulnerable: str, fixed: str) -> str:
    # The G completions of one prompt share this diff.
    return _unified_diff(vulnerable, fixed)


@functools.lru_cache(maxsize=512)
def apply_completion(completion: str, vulnerable: str) -> tuple[str | None, str | None]:
    """`(patched function, None)`, or `(None, why)` when the completion is malformed or an edit does not apply.

    Every patch reward starts here, so a completion is parsed and applied once per batch however many rewards
    read it (cached: a group often repeats a completion too).
    """
    parts = split_think_answer(completion)
    if parts is None:
        return None, "malformed completion: expected one <think>...</think> then one <answer>...</answer>"
    try:
        return apply_edits(vulnerable, parse_edits(parts[1])), None
    except PatchError as e:
        return None, str(e)


@functools.lru_cache(maxsize=512)
def score_patch(completion: str, vulnerable: str, fixed: str) -> PatchScore:
    """Parse, apply and score one completion against the fix (SWE-RL: -1 when malformed, else diff similarity).

    Cached: both rewards score the same batch, and a group often repeats a completion.

    The similarity is `SequenceMatcher(None, predicted_diff, oracle_diff, autojunk=False).ratio()`, 0.0 when
    either diff is empty (edits that cancel out must not look like a fix). `exact` compares the patched
    function with the fix after removing all whitespace.
    """
    patched, error = apply_completion(completion, vulnerable)
    if patched is None:
        return PatchScore(applied=False, patched=None, reward=-1.0, exact=False, error=error)
    vulnerable, fixed = vulnerable.replace("\r\n", "\n"), fixed.replace("\r\n", "\n")
    predicted_diff, oracle_diff = _unified_diff(vulnerable, patched), _oracle_diff(vulnerable, fixed)
    if not predicted_diff or not oracle_diff:
        reward = 0.0
    elif predicted_diff == oracle_diff:
        reward = 1.0  # what ratio() returns here, without its quadratic cost
    else:
        reward = difflib.SequenceMatcher(None, predicted_diff, oracle_diff, autojunk=False).ratio()
    exact = "".join(patched.split()) == "".join(fixed.split())
    return PatchScore(applied=True, patched=patched, reward=reward, exact=exact, error=None)


def file_language(file_name: str | None) -> Language | None:
    """The language a file name says: "c" for `.c`, "cpp" for `.cc .cpp .cxx .hpp .hh .C`, else None."""
    if not file_name:
        return None
    if file_name.endswith(".c"):
        return "c"
    return "cpp" if file_name.endswith(_CPP_SUFFIXES) else None


@functools.cache
def _grammar(language: Language) -> tree_sitter.Language:
    return tree_sitter.Language(tree_sitter_c.language() if language == "c" else tree_sitter_cpp.language())


_parsers = threading.local()


def _parser(language: Language) -> tree_sitter.Parser:
    # One parser per thread and language, reused for every parse: a tree-sitter parser must not be used by two
    # threads at once, and reward functions may run in parallel threads (model.reward_workers).
    parsers: dict[Language, tree_sitter.Parser] = _parsers.__dict__.setdefault("by_language", {})
    if language not in parsers:
        parsers[language] = tree_sitter.Parser(_grammar(language))
    return parsers[language]


@functools.lru_cache(maxsize=1024)
def parses(func: str, language: Language) -> bool:
    """Whether `language`'s tree-sitter grammar parses `func` with no ERROR or MISSING node."""
    # surrogatepass: a dataset's lone surrogates must not stop training; tree-sitter reads them as bad bytes.
    return not _parser(language).parse(func.encode("utf-8", "surrogatepass")).root_node.has_error


def source_language(func: str, file_name: str | None = None) -> Language | None:
    """The grammar that judges `func`: its file's language (C when the name says none), or C++ when that is C and
    C fails where C++ parses; None when the function does not parse.

    The C++ fallback is for PrimeVul: it holds both languages, some of its file names are missing, and many of its
    C functions begin at their name, the return type left on the line above, which C++'s grammar reads as a
    constructor and C's cannot read at all.
    """
    language = file_language(file_name) or "c"
    if parses(func, language):
        return language
    return "cpp" if language == "c" and parses(func, "cpp") else None


def _parse_verdict(patched: str, vulnerable: str, file_name: str | None) -> float | None:
    """1.0 when the patched function parses, 0.0 when the patch broke the original's parse, None when the
    original does not parse (nothing to compare with). The patched function is read in the original's grammar."""
    language = source_language(vulnerable, file_name)
    if language is None:
        return None
    return 1.0 if parses(patched, language) else 0.0


def _check_columns(name: str, completions: list[str], **columns: list[Any] | None) -> None:
    for column, values in columns.items():
        if values is not None and len(values) != len(completions):
            raise TTCError(
                f"{name}: got {len(completions)} completions but {len(values)} {column} values; "
                "the columns need one value per completion"
            )


def _scores(name: str, completions: list[str], vulnerable_func: list[str], fixed_func: list[str]) -> list[PatchScore]:
    _check_columns(name, completions, vulnerable_func=vulnerable_func, fixed_func=fixed_func)
    return [score_patch(c, v, f) for c, v, f in zip(completions, vulnerable_func, fixed_func, strict=True)]


def patch_reward(
    completions: list[str], vulnerable_func: list[str], fixed_func: list[str], **_: Any
) -> list[float | None]:
    """SWE-RL reward per completion: -1.0 when malformed or unappliable, else diff similarity in [0, 1]."""
    return [s.reward for s in _scores("patch_reward", completions, vulnerable_func, fixed_func)]


def exact_fix_reward(
    completions: list[str], vulnerable_func: list[str], fixed_func: list[str], **_: Any
) -> list[float | None]:
    """1.0 when the patched function equals the fix up to whitespace, else 0.0 (malformed answers included)."""
    return [float(s.exact) for s in _scores("exact_fix_reward", completions, vulnerable_func, fixed_func)]


def parses_reward(
    completions: list[str],
    vulnerable_func: list[str],
    fixed_func: list[str] | None = None,
    file_name: list[str | None] | None = None,
    **_: Any,
) -> list[float | None]:
    """Syntax check per completion: -1.0 when malformed or unappliable; 1.0 when the patched function parses
    (no ERROR or MISSING node) in the grammar that parses the original; 0.0 when the patch breaks that parse;
    None when the original does not parse in C or C++, since the check cannot judge it.

    The grammar comes from the `file_name` column (see `source_language`). `fixed_func` is not read: the check
    compares the patch with the original, so it also serves tasks that have no fix.

    It catches broken structure (braces, parentheses, a stray `else` before a statement), not every error a
    compiler would: where a keyword cannot stand, tree-sitter reads an identifier, so `else x = 0;` passes as a
    declaration of `x` with type `else`. Undeclared names and types are not checked at all.
    """
    _check_columns("parses_reward", completions, vulnerable_func=vulnerable_func, file_name=file_name)
    names = file_name or [None] * len(completions)
    rewards: list[float | None] = []
    for completion, vulnerable, name in zip(completions, vulnerable_func, names, strict=True):
        patched, _ = apply_completion(completion, vulnerable)
        rewards.append(-1.0 if patched is None else _parse_verdict(patched, vulnerable, name))
    return rewards


def parsed_patch_reward(
    completions: list[str],
    vulnerable_func: list[str],
    fixed_func: list[str],
    file_name: list[str | None] | None = None,
    **_: Any,
) -> list[float | None]:
    """`patch_reward` gated on the syntax check: -1.0 when malformed or unappliable, 0.0 when the patch breaks
    the original's parse, else SWE-RL's similarity (also when the original does not parse, so that no row goes
    unscored)."""
    scores = _scores("parsed_patch_reward", completions, vulnerable_func, fixed_func)
    _check_columns("parsed_patch_reward", completions, file_name=file_name)
    names = file_name or [None] * len(completions)
    rewards: list[float | None] = []
    for score, vulnerable, name in zip(scores, vulnerable_func, names, strict=True):
        broken = score.patched is not None and _parse_verdict(score.patched, vulnerable, name) == 0.0
        rewards.append(0.0 if broken else score.reward)
    return rewards
