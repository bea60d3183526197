"""Every harness shipped in ttc_lightning/assets/harnesses shows what the format promises (its README): the fix
passes every case, the vulnerable function fails the proof, and a do-nothing body fails a test.

The functions are read at run time from the records: the sample pairs' from ttc_lightning/assets/primevul_sample, the
real PrimeVul pairs' from REAL_PRIMEVUL beside the repository (those cases skip where it is absent)."""

import functools
import json
import re
from pathlib import Path

import pytest

from tests.helpers import REAL_PRIMEVUL
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.oracle.check import Budget, check_function, constant_body
from ttc_lightning.oracle.harness import HARNESSES, MANIFEST, Harness, load_harness
from ttc_lightning.oracle.sandbox import run_parallel

IDXS = sorted(d.name for d in HARNESSES.iterdir() if (d / MANIFEST).is_file())
SAMPLE_FILES = sorted(Path(SAMPLE_DIR).glob("*_paired.jsonl"))
BUDGET = Budget()


@functools.cache
def records() -> dict[str, tuple[Path, int, dict]]:
    """Every record of the sample's paired files and of the real pairs' files (where present), by idx: its file,
    its line number and the record."""
    files = SAMPLE_FILES + (sorted(REAL_PRIMEVUL.glob("*.jsonl")) if REAL_PRIMEVUL.is_dir() else [])
    found = {}
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            record = json.loads(line)
            found[str(record["idx"])] = (path, number, record)
    return found


def harness_and_functions(idx: str) -> tuple[Harness, str, str]:
    """The harness `idx`, its vulnerable function and its fix."""
    harness = load_harness(HARNESSES / idx)
    found = records()
    if idx not in found or harness.fixed_idx not in found:
        if not REAL_PRIMEVUL.is_dir():
            pytest.skip(f"harness {idx} is of a real PrimeVul pair, read from {REAL_PRIMEVUL}, which is absent")
        pytest.fail(
            f"harness {idx}: record {idx} or {harness.fixed_idx} is in no file of the sample or {REAL_PRIMEVUL}"
        )
    return harness, found[idx][2]["func"], found[harness.fixed_idx][2]["func"]


def test_the_harnesses_are_found():
    assert len(IDXS) >= 37 and "900097" in IDXS  # 18 pairs of the sample, 19 real pairs


@pytest.mark.parametrize("idx", IDXS)
def test_the_harness_is_an_oracle(idx):
    """The fix passes the proof and every test; the vulnerable function compiles and fails the proof; a constant
    body fails a test (or does not compile). The three builds run at once."""
    harness, vulnerable, fixed = harness_and_functions(idx)
    functions = [(fixed, False), (vulnerable, False), (constant_body(vulnerable, harness.language), True)]
    fix, vulnerable_verdict, do_nothing = run_parallel(
        lambda job, stop: check_function(harness, job[0], BUDGET, stop, every_case=job[1]), functions, 3
    )
    assert fix.passed, f"the fix: {fix.output}"
    assert fix.passed_tests == harness.tests
    assert vulnerable_verdict.compiled, f"the vulnerable function: {vulnerable_verdict.output}"
    assert not vulnerable_verdict.proof_fixed, "the vulnerable function passes the proof"
    assert not do_nothing.compiled or do_nothing.failed_tests, "every test passes with a body that does nothing"


def test_every_harness_is_of_a_pair_in_the_data():
    found = records()
    wrong = []
    for idx in IDXS:
        harness = load_harness(HARNESSES / idx)
        if idx not in found:
            continue
        path, number, record = found[idx]
        lines = path.read_text().splitlines()
        fixed = json.loads(lines[number]) if number < len(lines) else {}  # the line after: the fix
        if record["target"] != 1 or str(fixed.get("idx")) != harness.fixed_idx or fixed.get("target") != 0:
            wrong.append(f"{idx}: {path}:{number} is not vulnerable record {idx} followed by fix {harness.fixed_idx}")
    assert wrong == []
    missing = [idx for idx in IDXS if idx not in found]
    if missing and not REAL_PRIMEVUL.is_dir():
        pytest.skip(f"harnesses {', '.join(missing)} are of no sample pair; {REAL_PRIMEVUL} is absent")
    assert missing == [], f"harnesses of records in no file of the sample or {REAL_PRIMEVUL}"


def test_the_readme_names_every_harness():
    readme = (HARNESSES / "README.md").read_text()
    assert [idx for idx in IDXS if not re.search(rf"\b{idx}\b", readme)] == []
