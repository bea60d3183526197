"""What a patch may change: the function, and nothing around it.

The patched function is `#include`d into its harness, so text that is not part of the function changes the harness
itself: a second definition after the function (`int main() { return 0; }`), a `#define` that rewrites the driver
below it (`#define main unused`, `#define assert(x)`), a constructor or an `.init_array` entry that runs before the
driver does; and a function that turns the sanitizers off, or survives their report, hides the failure that the proof
looks for as surely. `outside_the_function` finds such additions by comparing the patched function with the one it
patches, so that what the original already holds (a local `#define`/`#undef` pair, K&R parameter declarations)
stays allowed. It reads C and C++ as far as this needs: comments, string and character literals, braces, lines.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# Directives that change the code after them, or what it links to; `#if`/`#ifdef`/`#endif` and `#error` stay allowed.
_DIRECTIVES = frozenset({"define", "undef", "include", "include_next", "import", "pragma", "line"})
# Words that emit code or data outside the function's body, or run it before `main`.
_WORDS = frozenset({"_Pragma", "asm"})
# Attributes (compared without their optional `__` on either side) that place code or data where the harness runs it,
# or that take the sanitizers out of the function, so that its overflow is no longer reported.
_ATTRIBUTES = frozenset(
    {
        "constructor", "destructor", "init_priority", "section", "alias", "weakref", "ifunc", "symver", "weak",
        "no_sanitize", "no_sanitize_address", "no_address_safety_analysis", "no_sanitize_undefined",
        "no_sanitize_thread", "no_sanitize_memory", "disable_sanitizer_instrumentation",
    }
)  # fmt: skip
# Calls that a fix has no need of and that hide a failing case from its driver: jumping out of a sanitizer's report
# or a signal handler, running the function in a child process, loading other code, or reaching into the caller.
_CALLS = frozenset(
    {
        "setjmp", "_setjmp", "sigsetjmp", "longjmp", "_longjmp", "siglongjmp", "__builtin_setjmp",
        "__builtin_longjmp", "signal", "sigaction", "sigset", "bsd_signal", "sysv_signal", "fork", "vfork", "clone",
        "clone3", "posix_spawn", "posix_spawnp", "system", "popen", "execl", "execle", "execlp", "execv", "execve",
        "execvp", "execvpe", "fexecve", "dlopen", "dlmopen", "dlsym", "dlvsym", "syscall", "ptrace", "prctl",
        "mprotect", "__builtin_frame_address", "__builtin_return_address", "__builtin_eh_return",
    }
)  # fmt: skip
# The sanitizers' own interfaces: with them a function unpoisons memory or survives a report.
_SANITIZER = re.compile(r"__(?:asan|hwasan|lsan|msan|tsan|ubsan|sanitizer)_\w*")
_DIRECTIVE = re.compile(r"^[ \t\f\v]*(?:#|%:)[ \t\f\v]*([A-Za-z_]\w*)", re.MULTILINE)
_WORD = re.compile(r"[A-Za-z_]\w*")
_ATTRIBUTE = re.compile(r"__attribute(?:__)?\s*\(\s*\(|\[\s*\[")
# How the compiler joins and ends lines before it reads anything: a trigraph `??/` is a backslash and `??=` a `#`
# (in the strict `-std=` modes), a backslash with blanks before the newline still joins lines (gcc warns), and a lone
# carriage return ends a line.
_LINE_ENDS = re.compile(r"\r\n?")
_SPLICE = re.compile(r"\\[ \t\f\v]*\n")


@dataclass(frozen=True)
class Outline:
    """What of a function's text can reach beyond the function."""

    blocks: int
    """Top-level `{...}` blocks: the body, and any other definition."""
    semicolons: int
    """`;` outside every block: declarations beside the function (a K&R definition's parameters among them)."""
    tail: str
    """The code after the last top-level block, without comments and spaces."""
    directives: Counter[str]
    words: Counter[str]
    """`_Pragma`, `asm`, the attributes that place code, run it before `main` or turn the sanitizers off, the calls
    that hide a failing case (`_CALLS`) and the sanitizers' interfaces, by name."""


def outline(function: str) -> Outline:
    """`function` read as the module docstring says."""
    text = _LINE_ENDS.sub("\n", function).replace("??/", "\\").replace("??=", "#")
    code = _code(_SPLICE.sub("", text))
    blocks, semicolons, depth, last_close = 0, 0, 0, -1
    for i, char in enumerate(code):
        if char == "{":
            depth += 1
        elif char == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                blocks += 1
                last_close = i
        elif char == ";" and depth == 0:
            semicolons += 1
    directives = Counter(m.group(1) for m in _DIRECTIVE.finditer(code) if m.group(1) in _DIRECTIVES)
    words = Counter(w for w in _WORD.findall(code) if _bare(w) in _WORDS or w in _CALLS or _SANITIZER.fullmatch(w))
    for start in _ATTRIBUTE.finditer(code):
        words.update(_bare(w) for w in _WORD.findall(_balanced(code, start.end())) if _bare(w) in _ATTRIBUTES)
    tail = "".join(code[last_close + 1 :].split()) if blocks else ""
    return Outline(blocks, semicolons, tail, directives, words)


def outside_the_function(patched: str, original: str) -> str | None:
    """What `patched` adds outside the function `original` defines, in a few words, or None when it changes only
    the function."""
    new, old = outline(patched), outline(original)
    if new.blocks > old.blocks:
        return "it adds a definition beside the function"
    if new.tail != old.tail:
        return "it adds code after the function's closing brace"
    if new.semicolons > old.semicolons:
        return "it adds a declaration outside the function's body"
    added = (new.directives - old.directives) + (new.words - old.words)
    if added:
        name = sorted(added)[0]
        shown = f"#{name}" if name in new.directives else name
        return f"it adds {shown}, which changes code beyond the function"
    return None


def _bare(word: str) -> str:
    """`word` without the `__` that GNU spellings may put on either side (`__asm__`, `__constructor__`)."""
    return word.removeprefix("__").removesuffix("__")


def _code(text: str) -> str:
    """`text` with comments, string literals and character literals blanked to spaces (newlines kept, so that
    directives still start their lines)."""
    out = list(text)
    i, n = 0, len(text)
    while i < n:
        if text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
        elif text[i] in "\"'":
            end = i + 1
            while end < n and text[end] not in (text[i], "\n"):
                end += 2 if text[end] == "\\" else 1
            end = min(end + 1, n)
        else:
            i += 1
            continue
        for k in range(i, end):
            if out[k] != "\n":
                out[k] = " "
        i = end
    return "".join(out)


def _balanced(code: str, start: int) -> str:
    """The text from `start` to where the brackets opened just before it close."""
    depth = 1
    for end in range(start, len(code)):
        depth += {"(": 1, "[": 1, ")": -1, "]": -1}.get(code[end], 0)
        if depth <= 0:
            return code[start:end]
    return code[start:]
