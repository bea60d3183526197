"""The harness format (`ttc_lightning/assets/harnesses/README.md`): what one function needs to compile and run on its
own, read from `<idx>/harness.toml` and checked field by field."""

from __future__ import annotations

import difflib
import hashlib
import numbers
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ttc_lightning.errors import TTCError

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

HARNESSES = Path(__file__).resolve().parent.parent / "assets" / "harnesses"
"""The harnesses shipped with ttc: one per pair of the PrimeVul-format sample, and some real PrimeVul pairs."""

Language = Literal["c", "cpp"]
MANIFEST = "harness.toml"
_SOURCE: dict[str, str] = {"c": "harness.c", "cpp": "harness.cpp"}
_CASE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_REQUIRED = ("idx", "fixed_idx", "language", "proof", "tests", "triggers", "simplifies")
_OPTIONAL = ("project", "cve", "cwe", "flags", "timeout")


@dataclass(frozen=True)
class Harness:
    """One record's harness, as read from its directory."""

    directory: Path
    idx: str
    """The vulnerable record's idx, as a string (the data's `id` column)."""
    fixed_idx: str
    language: Language
    proof: str
    """The case the vulnerable function fails."""
    tests: tuple[str, ...]
    """The cases the fixed function passes."""
    flags: tuple[str, ...]
    timeout: float
    """Seconds per case."""
    cve: str
    cwe: tuple[str, ...]
    triggers: str
    simplifies: str
    digest: str
    """SHA-256 of every file of the harness: a changed harness never reuses a cached verdict."""

    @property
    def source(self) -> str:
        """The one translation unit compiled: `harness.c` or `harness.cpp`."""
        return _SOURCE[self.language]

    @property
    def function_file(self) -> str:
        """The file the patched function is written to, which the source includes."""
        return "function.c" if self.language == "c" else "function.cpp"

    @property
    def cases(self) -> tuple[str, ...]:
        return (self.proof, *self.tests)


def load_harness(directory: Path) -> Harness:
    """The harness in `directory`; TTCError naming the file (and line or field) for anything that is not as the
    format says."""
    manifest = directory / MANIFEST
    where = str(manifest)
    _not_a_broken_link(directory)
    _not_a_broken_link(manifest)
    try:
        text = manifest.read_text(encoding="utf-8")
    except OSError as e:
        raise TTCError(f"{where}: cannot read the harness manifest ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise TTCError(f"{where}: not UTF-8 text (byte {e.start})") from None
    try:
        fields = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TTCError(f"{where}: not valid TOML: {e}") from None
    unknown = sorted(set(fields) - set(_REQUIRED) - set(_OPTIONAL))
    if unknown:  # before the missing ones: a misspelt field is both
        close = difflib.get_close_matches(unknown[0], _REQUIRED + _OPTIONAL, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"the fields are {', '.join(_REQUIRED + _OPTIONAL)}"
        raise TTCError(f"{where}: unknown field {unknown[0]!r}; {hint}")
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise TTCError(f"{where}: missing field {missing[0]!r} (a harness gives {', '.join(_REQUIRED)})")
    idx, fixed_idx = _idx(fields, "idx", where), _idx(fields, "fixed_idx", where)
    if directory.name != idx:
        raise TTCError(f"{where}: idx = {idx} but the directory is named {directory.name!r}: name it by the idx")
    language = fields["language"]
    if language not in _SOURCE:
        raise TTCError(f'{where}: field \'language\' must be "c" or "cpp", got {language!r}')
    source = directory / _SOURCE[language]
    _not_a_broken_link(source)
    if not source.is_file():
        raise TTCError(f"{source}: missing; a {language} harness is compiled from {_SOURCE[language]}")
    include = f'#include "{"function.c" if language == "c" else "function.cpp"}"'
    if not any(line.strip() == include for line in source.read_text(encoding="utf-8", errors="replace").splitlines()):
        raise TTCError(f"{source}: has no line {include}, where the patched function goes")
    proof = _case(fields["proof"], "proof", where)
    tests = fields["tests"]
    if not isinstance(tests, list) or not tests:
        raise TTCError(f"{where}: field 'tests' must be a non-empty list of case names, got {tests!r}")
    tests = tuple(_case(t, "tests", where) for t in tests)
    if proof in tests or len(set(tests)) < len(tests):
        raise TTCError(f"{where}: field 'tests' repeats a case (or the proof's): each case is named once")
    timeout = fields.get("timeout", 5.0)
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool) or not 0 < timeout <= 3600:
        raise TTCError(f"{where}: field 'timeout' must be seconds above 0, at most 3600, got {timeout!r}")
    return Harness(
        directory=directory,
        idx=idx,
        fixed_idx=fixed_idx,
        language=language,
        proof=proof,
        tests=tests,
        flags=_strings(fields, "flags", where),
        timeout=float(timeout),
        cve=_text(fields, "cve", where, required=False),
        cwe=_strings(fields, "cwe", where),
        triggers=_text(fields, "triggers", where),
        simplifies=_text(fields, "simplifies", where),
        digest=_digest(directory),
    )


def harness_directories(root: Path) -> list[Path]:
    """The subdirectories of `root` that hold a manifest, by name; TTCError for a root that is not a directory, or
    one without any harness."""
    if not root.is_dir():
        raise TTCError(f"{root}: not a directory of harnesses (one directory per record idx, each with {MANIFEST})")
    # A link to nowhere is kept, so that checking it says so rather than passing over a harness the user added.
    found = [
        directory
        for directory in sorted(root.iterdir())
        if (directory / MANIFEST).is_file() or (directory.is_symlink() and not directory.exists())
    ]
    if not found:
        raise TTCError(f"{root}: holds no harness (a directory per record idx, each with {MANIFEST})")
    return found


def find_harnesses(root: Path) -> dict[str, Harness]:
    """Every harness under `root` (`harness_directories`), by idx; TTCError at the first that is not as the format
    says."""
    harnesses = {}
    for directory in harness_directories(root):
        harness = load_harness(directory)
        harnesses[harness.idx] = harness
    return harnesses


def _not_a_broken_link(path: Path) -> None:
    if path.is_symlink() and not path.exists():
        raise TTCError(f"{path}: a broken link (to {os.readlink(path)}, which does not exist)")


def _idx(fields: dict[str, Any], name: str, where: str) -> str:
    value = fields[name]
    if isinstance(value, bool) or not isinstance(value, int | str) or not re.fullmatch(r"\d+", str(value)):
        raise TTCError(f"{where}: field {name!r} must be a record idx (an integer), got {value!r}")
    return str(value)


def _case(value: Any, name: str, where: str) -> str:
    if not isinstance(value, str) or not _CASE.fullmatch(value):
        raise TTCError(f"{where}: field {name!r}: {value!r} is not a case name (letters, digits, _ . -)")
    return value


def _text(fields: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise TTCError(f"{where}: field {name!r} must be a non-empty string, got {value!r}")
    return value


def _strings(fields: dict[str, Any], name: str, where: str) -> tuple[str, ...]:
    value = fields.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TTCError(f"{where}: field {name!r} must be a list of strings, got {value!r}")
    return tuple(value)


def _digest(directory: Path) -> str:
    """SHA-256 of every file under `directory`, links followed (to files and directories alike: what is copied
    for a check is what they point to)."""
    sha = hashlib.sha256()
    seen: set[str] = set()
    for root, directories, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            raise TTCError(f"{root}: a link that leads back into the harness; a harness holds files and directories")
        seen.add(real)
        directories.sort()
        for name in sorted(files):
            path = Path(root, name)
            if not path.is_file():
                raise TTCError(f"{path}: not a file (a special file or a broken link); a harness holds files only")
            sha.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes() + b"\0")
    return sha.hexdigest()
