"""`ttc oracle check`: harnesses validated on the records they test, a table, and an exit status a script can read."""

import shutil
from pathlib import Path

import pytest

from tests.helpers import REAL_PRIMEVUL
from ttc_lightning.oracle.harness import HARNESSES

SAMPLE_IDXS = ("900097", "900194")  # two of the shipped sample's harnesses
REAL_IDX = "195017"  # a real PrimeVul pair's harness: its records are not in the shipped sample


def harnesses(tmp_path: Path, *idxs: str) -> Path:
    root = tmp_path / "harnesses"
    for idx in idxs:
        shutil.copytree(HARNESSES / idx, root / idx)
    return root


def rows(out: str) -> dict[str, str]:
    """The table's verdict column by idx."""
    found = {}
    for line in out.splitlines()[1:-1]:
        idx, _lang, _cwe, _cases, _seconds, verdict = line.split(maxsplit=5)
        found[idx] = verdict
    return found


def test_good_harnesses_pass_and_the_others_are_not_checked(run_ttc, tmp_path):
    code, out, err = run_ttc("oracle", "check", str(harnesses(tmp_path, *SAMPLE_IDXS, REAL_IDX)))
    assert (code, err) == (0, "")
    assert rows(out) == {
        "900097": "ok",
        "900194": "ok",
        REAL_IDX: f"not checked: no record with idx {REAL_IDX} in --data",
    }
    assert out.splitlines()[-1] == "2 of 2 harnesses checked pass; 1 not checked (their records are not in --data)"


def test_real_pairs_are_checked_with_their_data(run_ttc, tmp_path):
    if not REAL_PRIMEVUL.is_dir():
        pytest.skip(f"the real PrimeVul sample is absent: {REAL_PRIMEVUL}")
    data = [str(p) for p in sorted(REAL_PRIMEVUL.glob("*.jsonl"))]
    code, out, _ = run_ttc("oracle", "check", str(harnesses(tmp_path, REAL_IDX)), "--data", *data)
    assert code == 0
    assert rows(out) == {REAL_IDX: "ok"}


def test_a_harness_that_proves_nothing_fails_with_the_reason(run_ttc, tmp_path):
    root = harnesses(tmp_path, "900097")
    manifest = root / "900097" / "harness.toml"
    # the proof becomes a case the vulnerable function passes (a short value fits the buffer)
    manifest.write_text(
        manifest.read_text()
        .replace('proof = "long_value"', 'proof = "short_value"')
        .replace('"short_value", ', '"long_value", ')
    )
    code, out, _ = run_ttc("oracle", "check", str(root))
    assert code == 1
    assert rows(out) == {"900097": "FAIL: the vulnerable function passes the proof 'short_value': it proves nothing"}
    assert out.splitlines()[-1] == "0 of 1 harnesses checked pass"


def test_a_build_past_compile_timeout_is_named(run_ttc, tmp_path):
    code, out, _ = run_ttc("oracle", "check", str(harnesses(tmp_path, "900097")), "--compile_timeout", "0.001")
    assert code == 1
    assert rows(out) == {"900097": "FAIL: the real fix does not compile: build: timed out after 0.001 s"}


def test_nothing_checked_is_not_a_pass(run_ttc, tmp_path):
    code, out, _ = run_ttc("oracle", "check", str(harnesses(tmp_path, REAL_IDX)))
    assert code == 1
    assert out.splitlines()[-1] == "0 of 0 harnesses checked pass; 1 not checked (their records are not in --data)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "ttc: error: --workers must be at least 1, got 0"),
        (["--compile_timeout", "0"], "ttc: error: --compile_timeout must be seconds above 0, at most 3600, got 0"),
        (["--max_memory_mb", "10"], "ttc: error: --max_memory_mb must be at least 64, got 10"),
    ],
)
def test_bad_options_are_one_line(run_ttc, tmp_path, args, message):
    code, out, err = run_ttc("oracle", "check", str(harnesses(tmp_path, "900097")), *args)
    assert (code, out, err.strip()) == (1, "", message)


def test_a_directory_without_harnesses_is_one_line(run_ttc, tmp_path):
    code, _, err = run_ttc("oracle", "check", str(tmp_path))
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("ttc: error: ") and str(tmp_path) in line
