"""Reading PrimeVul: the release's JSON-lines files (v0.1 and original) or a Hugging Face dataset, into typed records.

Loading goes: rows -> records (one explicit mapping per known schema) -> label fix and sanity check -> for paired
files, pairs of adjacent lines (mispairs reported and dropped) -> deduplication by function hash. No shuffling here:
the data modules shuffle with their seed once pairs are formed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ttc_lightning.data.common import read_jsonl
from ttc_lightning.errors import TTCError, data_error

log = logging.getLogger("ttc")

HF_PREFIX = "hf://"
SPLITS = ("train", "valid", "test")

# Record field -> (column, required), per schema. Columns not listed are ignored (urls, file_hash, size, ...).
SCHEMAS: dict[str, dict[str, tuple[str, bool]]] = {
    # PrimeVul v0.1: idx, project, commit_id, project_url, commit_url, commit_message, target, func, func_hash,
    # file_name, file_hash, cwe, cve, cve_desc, nvd_url.
    "v0.1": {
        "idx": ("idx", True),
        "project": ("project", True),
        "commit_id": ("commit_id", True),
        "target": ("target", True),
        "func": ("func", True),
        "func_hash": ("func_hash", True),
        "cwe": ("cwe", True),
        "cve": ("cve", True),
        "cve_desc": ("cve_desc", True),
        "file_name": ("file_name", True),
        "commit_message": ("commit_message", True),
    },
    # The original release: idx, project, commit_id, target, func, hash; cwe, message, size on some files.
    # Its `hash` is not documented, so the function hash is recomputed from `func`.
    "original": {
        "idx": ("idx", True),
        "project": ("project", True),
        "commit_id": ("commit_id", True),
        "target": ("target", True),
        "func": ("func", True),
        "cwe": ("cwe", False),
        "commit_message": ("message", False),
    },
    # The ASSERT-KTH/PrimeVul Hub mirror: the original release with `is_vulnerable = (target == 0)`, i.e. inverted.
    "is_vulnerable": {
        "idx": ("idx", False),
        "project": ("project", False),
        "commit_id": ("commit_id", False),
        "target": ("is_vulnerable", True),
        "func": ("func", True),
        "cwe": ("cwe", False),
        "cve": ("cve", False),
        "cve_desc": ("cve_desc", False),
        "commit_message": ("message", False),
    },
}


@dataclass(frozen=True)
class PrimeVulRecord:
    """One function. `target` is 1 for vulnerable, 0 for fixed or benign."""

    idx: int
    project: str
    commit_id: str
    target: int
    func: str
    func_hash: int
    cwe: tuple[str, ...] = ()
    cve: str | None = None
    cve_desc: str | None = None
    file_name: str | None = None
    commit_message: str | None = None
    line: int = field(default=0, compare=False, repr=False)
    """Line of the source file (row number for a Hub dataset), for error messages."""

    @property
    def primary_cwe(self) -> str:
        return self.cwe[0] if self.cwe else ""


@dataclass(frozen=True)
class PrimeVulPair:
    """A vulnerable function and its fix, from two adjacent lines of a paired file."""

    vulnerable: PrimeVulRecord
    fixed: PrimeVulRecord

    @property
    def pair_id(self) -> str:
        return f"{self.vulnerable.idx}-{self.fixed.idx}"


@dataclass(frozen=True)
class Mispair:
    """Two adjacent lines of a paired file that do not form a pair, and why."""

    first: PrimeVulRecord
    second: PrimeVulRecord
    reason: str

    def __str__(self) -> str:
        return f"lines {self.first.line}-{self.second.line} (idx {self.first.idx}/{self.second.idx}): {self.reason}"


def func_hash(func: str) -> int:
    """PrimeVul's function hash: MD5 of the function with all whitespace removed, as an integer."""
    return int(hashlib.md5("".join(func.split()).encode()).hexdigest(), 16)


def detect_schema(columns: Iterable[str]) -> str:
    """Name of the schema (a key of `SCHEMAS`) that a file's or dataset's column names belong to."""
    columns = set(columns)
    if "is_vulnerable" in columns:
        return "is_vulnerable"
    if "func_hash" in columns:
        return "v0.1"
    return "original"


def _mistyped(where: tuple[str, int], column: str, expected: str, value: Any) -> TTCError:
    return data_error(*where, column, f"expected {expected}, got {value!r:.60} ({type(value).__name__})")


def _convert(name: str, column: str, value: Any, row: Mapping[str, Any], where: tuple[str, int]) -> Any:
    if name == "target":
        if column == "is_vulnerable":
            if value in (0, 1):  # bools included; the mirror's column is the negation of the release's target
                return 0 if value else 1
            raise _mistyped(where, column, "true or false", value)
        if value in (0, 1) and not isinstance(value, bool):
            return int(value)
        raise _mistyped(where, column, "0 or 1", value)
    if name == "idx":
        if value is None:
            return where[1]
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mistyped(where, column, "an integer", value)
    if name == "func":
        if isinstance(value, str) and value.strip():
            return value
        raise _mistyped(where, column, "a non-empty string", value)
    if name == "func_hash":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
        if value is None or isinstance(value, float):  # Arrow and pandas read 128-bit integers as lossy floats
            return func_hash(row["func"])
        raise _mistyped(where, column, "an integer", value)
    if name == "cwe":
        if value is None:
            return ()
        if isinstance(value, str):
            return (value,)
        if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
            return tuple(value)
        raise _mistyped(where, column, "a list of CWE ids", value)
    if name in ("project", "commit_id"):
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        raise _mistyped(where, column, "a string", value)
    # cve, cve_desc, file_name, commit_message: nullable; the release writes some missing values as "None".
    if value is None or value in ("", "None"):
        return None
    if isinstance(value, str):
        return value
    raise _mistyped(where, column, "a string or null", value)


def record_from_row(row: Mapping[str, Any], schema: str, source: str | Path, line: int) -> PrimeVulRecord:
    """Map one row of the given schema to a record; a missing or mistyped field raises `file:line: field: ...`."""
    where = (str(source), line)
    values: dict[str, Any] = {}
    for name, (column, required) in SCHEMAS[schema].items():
        if column not in row and required:
            raise data_error(*where, column, "required field is missing")
        values[name] = _convert(name, column, row.get(column), row, where)
    if "func_hash" not in values:
        values["func_hash"] = func_hash(values["func"])
    return PrimeVulRecord(**values, line=line)


def records_from_dataset(dataset: Any, source: str) -> list[PrimeVulRecord]:
    """Records from a loaded `datasets.Dataset` (schema from its column names), rows numbered from 1."""
    schema = detect_schema(dataset.column_names)
    records = [record_from_row(row, schema, source, i) for i, row in enumerate(dataset, start=1)]
    _warn_hash_mismatches(records, source)
    return records


def read_records(path: str | Path) -> list[PrimeVulRecord]:
    """Records of a PrimeVul JSON-lines file, in file order. The schema is detected from the first line."""
    records: list[PrimeVulRecord] = []
    schema = None
    for lineno, obj in read_jsonl(path):
        schema = schema or detect_schema(obj)
        records.append(record_from_row(obj, schema, path, lineno))
    _warn_hash_mismatches(records, path)
    return records


def _warn_hash_mismatches(records: Sequence[PrimeVulRecord], source: str | Path) -> None:
    bad = [r for r in records if r.func_hash != func_hash(r.func)]
    if bad:
        log.warning(
            "%s: %d records have a func_hash that does not match their func (edited rows?), e.g. line %d",
            source,
            len(bad),
            bad[0].line,
        )


def split_file(data_path: str | Path, split: str, paired: bool) -> Path:
    """`primevul_{split}[_paired].jsonl` inside a directory, or `data_path` itself when it is a file."""
    path = Path(data_path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise TTCError(f"{path}: no such file or directory (expected a PrimeVul directory or .jsonl file)")
    file = path / f"primevul_{split}{'_paired' if paired else ''}.jsonl"
    if file.exists() and not file.is_file():
        raise TTCError(f"{file}: not a regular file (split {split!r}, paired={paired}): a directory or a pipe")
    if not file.is_file():
        present = sorted(p.name for p in path.glob("*.jsonl"))
        raise TTCError(f"{file}: file not found (split {split!r}, paired={paired}); {path} holds {present}")
    return file


def hub_split_name(available: Sequence[str], split: str, paired: bool, paired_config: bool) -> str:
    """The Hub split holding `split`: `valid_paired` style (ASSERT-KTH) or plain names, `validation` for valid."""
    names = {"valid": ("valid", "validation"), "validation": ("validation", "valid")}.get(split, (split,))
    candidates = [name + ("_paired" if paired else "_unpaired") for name in names]
    if paired_config or not paired:  # plain split names hold paired rows only inside a "paired" config
        candidates += names
    for name in candidates:
        if name in available:
            return name
    kind = "paired" if paired else "unpaired"
    raise TTCError(f"no {kind} split for {split!r} among the dataset's splits {list(available)}")


def _load_hub(repo_id: str, split: str, paired: bool) -> list[PrimeVulRecord]:
    import datasets

    try:
        configs = datasets.get_dataset_config_names(repo_id)
        config = "paired" if paired and "paired" in configs else None
        available = datasets.get_dataset_split_names(repo_id, config)
    except Exception as e:  # missing repo, no network, no access: all end the run the same way
        raise TTCError(f"{HF_PREFIX}{repo_id}: cannot read the dataset ({type(e).__name__}: {e})") from None
    try:
        hf_split = hub_split_name(available, split, paired, paired_config=config == "paired")
    except TTCError as e:
        raise TTCError(f"{HF_PREFIX}{repo_id}: {e}") from None
    dataset = datasets.load_dataset(repo_id, config, split=hf_split)
    return records_from_dataset(dataset, f"{HF_PREFIX}{repo_id}[{hf_split}]")


def _is_pair(first: PrimeVulRecord, second: PrimeVulRecord) -> bool:
    return (first.target, second.target) == (1, 0) and first.commit_id == second.commit_id


def out_of_step(records: Sequence[PrimeVulRecord]) -> int | None:
    """Index of the record from which a paired file's lines are out of step by one (a line missing or added there,
    so that pairs start on the other lines), or None when they are not."""
    for i in range(0, len(records) - 1, 2):
        if _is_pair(records[i], records[i + 1]):
            continue
        shifted = [_is_pair(records[j], records[j + 1]) for j in range(i + 1, len(records) - 1, 2)]
        return i if shifted and 2 * sum(shifted) > len(shifted) else None
    return None


def out_of_step_error(records: Sequence[PrimeVulRecord], source: str | Path, start: int) -> TTCError:
    first, second, third = (r.line for r in records[start : start + 3])
    return TTCError(
        f"{source}: the lines are out of step by one from line {first} on: lines {second}-{third} are a vulnerable "
        f"function and its fix, lines {first}-{second} are not; a line is missing or extra near line {first} "
        "(a paired file holds each pair on two adjacent lines, vulnerable first)"
    )


def sanity_check_labels(records: Sequence[PrimeVulRecord], source: str | Path, paired: bool) -> None:
    """Stop on labels that look inverted: PrimeVul's unpaired splits are ~3% vulnerable; pairs are vulnerable-first.
    Pairs that are out of step by a line (`out_of_step`) are reported as that, not as inverted labels."""
    how = "pass labels_inverted=True to flip them, or check_labels=False to keep them as they are"
    if paired:
        # an odd trailing line is left to pair_records, which reports it
        flipped = sum((a.target, b.target) == (0, 1) for a, b in zip(records[::2], records[1::2], strict=False))
        if 2 * flipped > len(records) // 2:
            start = out_of_step(records)
            if start is not None:
                raise out_of_step_error(records, source, start)
            raise TTCError(
                f"{source}: {flipped} of {len(records) // 2} pairs list the fixed function (target 0) before the "
                f"vulnerable one, but PrimeVul pairs are vulnerable-first, so the labels look inverted: {how}"
            )
        return
    vulnerable = sum(r.target for r in records)
    if records and vulnerable > len(records) / 2:
        raise TTCError(
            f"{source}: {vulnerable} of {len(records)} functions are labelled vulnerable, but PrimeVul's unpaired "
            f"splits are about 3% vulnerable, so the labels look inverted (some mirrors store "
            f"is_vulnerable = (target == 0)): {how}"
        )


def source_name(path_or_hf_id: str | Path, split: str, paired: bool) -> str:
    """How messages name a split: its file, or the Hub id with the split."""
    if str(path_or_hf_id).startswith(HF_PREFIX):
        return f"{path_or_hf_id} ({split}{', paired' if paired else ''})"
    return str(split_file(path_or_hf_id, split, paired))


def load_records(
    path_or_hf_id: str | Path,
    split: str = "train",
    paired: bool = False,
    *,
    labels_inverted: bool = False,
    check_labels: bool = True,
) -> list[PrimeVulRecord]:
    """All records of one split in source order; labels flipped if asked, then sanity-checked unless told not to."""
    source = source_name(path_or_hf_id, split, paired)
    if str(path_or_hf_id).startswith(HF_PREFIX):
        records = _load_hub(str(path_or_hf_id)[len(HF_PREFIX) :], split, paired)
    else:
        records = read_records(source)
    if not records:
        raise TTCError(f"{source}: empty, it holds no records; check the file (or the dataset's split)")
    if labels_inverted:
        records = [replace(r, target=1 - r.target) for r in records]
    if check_labels:
        sanity_check_labels(records, source, paired)
    return records


def pair_records(records: Sequence[PrimeVulRecord], source: str | Path) -> tuple[list[PrimeVulPair], list[Mispair]]:
    """Pair adjacent records (vulnerable first, same commit); those breaking that come back as mispairs."""
    if len(records) % 2:
        start = out_of_step(records)
        if start is not None:
            raise out_of_step_error(records, source, start)
        raise TTCError(f"{source}: {len(records)} records, an odd number; a paired file holds pairs of adjacent lines")
    pairs, mispairs = [], []
    for first, second in zip(records[::2], records[1::2], strict=True):
        if (first.target, second.target) != (1, 0):
            mispairs.append(Mispair(first, second, f"targets {first.target}, {second.target} (expected 1, 0)"))
        elif first.commit_id != second.commit_id:
            mispairs.append(Mispair(first, second, f"commit_id {first.commit_id} != {second.commit_id}"))
        else:
            pairs.append(PrimeVulPair(first, second))
    return pairs, mispairs


def dedup_records(records: Iterable[PrimeVulRecord]) -> list[PrimeVulRecord]:
    """First record of each function hash."""
    seen: set[int] = set()
    kept = []
    for r in records:
        if r.func_hash not in seen:
            seen.add(r.func_hash)
            kept.append(r)
    return kept


def dedup_pairs(pairs: Iterable[PrimeVulPair]) -> list[PrimeVulPair]:
    """First pair of each (vulnerable, fixed) function-hash combination."""
    seen: set[tuple[int, int]] = set()
    kept = []
    for p in pairs:
        key = (p.vulnerable.func_hash, p.fixed.func_hash)
        if key not in seen:
            seen.add(key)
            kept.append(p)
    return kept


def _same_code(pair: PrimeVulPair) -> bool:
    return "".join(pair.vulnerable.func.split()) == "".join(pair.fixed.func.split())


def load_functions(
    path_or_hf_id: str | Path, split: str, *, labels_inverted: bool = False, check_labels: bool = True
) -> list[PrimeVulRecord]:
    """The deduplicated functions of an unpaired split."""
    source = source_name(path_or_hf_id, split, False)
    records = load_records(path_or_hf_id, split, False, labels_inverted=labels_inverted, check_labels=check_labels)
    kept = dedup_records(records)
    if len(kept) < len(records):
        log.info("%s: dropped %d duplicate functions (same func_hash)", source, len(records) - len(kept))
    return kept


def load_pairs(
    path_or_hf_id: str | Path, split: str, *, labels_inverted: bool = False, check_labels: bool = True
) -> list[PrimeVulPair]:
    """The clean pairs of a paired split: mispairs, pairs whose two functions differ only in whitespace and
    duplicates are dropped and counted in the log."""
    source = source_name(path_or_hf_id, split, True)
    records = load_records(path_or_hf_id, split, True, labels_inverted=labels_inverted, check_labels=check_labels)
    pairs, mispairs = pair_records(records, source)
    if mispairs:
        examples = "; ".join(str(m) for m in mispairs[:3])
        if 2 * len(mispairs) > len(records) // 2:  # mostly not pairs: an unpaired file, or lines out of order
            start = out_of_step(records)
            if start is not None:
                raise out_of_step_error(records, source, start)
            raise TTCError(
                f"{source}: {len(mispairs)} of {len(records) // 2} line pairs are not vulnerable/fixed pairs "
                f"(is it an unpaired file?), e.g. {examples}"
            )
        log.warning("%s: dropped %d mispaired line pairs, e.g. %s", source, len(mispairs), examples)
    changed = [p for p in pairs if not _same_code(p)]
    if len(changed) < len(pairs):
        log.info("%s: dropped %d pairs whose functions differ only in whitespace", source, len(pairs) - len(changed))
    kept = dedup_pairs(changed)
    if len(kept) < len(changed):
        log.info("%s: dropped %d duplicate pairs", source, len(changed) - len(kept))
    return kept
