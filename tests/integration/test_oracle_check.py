"""`ttc oracle check`: harnesses validated on the records they test, a table, and an exit status a script can read."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REAL_PRIMEVUL, REPO, finish, gone, process_env, wait_for
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
        REAL_IDX: f"not checked: no record with idx {REAL_IDX} in the data read (--data, or the shipped sample)",
    }
    assert (
        out.splitlines()[-1] == "2 of 2 harnesses checked pass; 1 not checked (their records are not in the data read)"
    )


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
    code, out, err = run_ttc("oracle", "check", str(harnesses(tmp_path, REAL_IDX)))
    assert code == 1
    assert (
        out.splitlines()[-1] == "0 of 0 harnesses checked pass; 1 not checked (their records are not in the data read)"
    )
    assert err.strip() == "ttc: error: no harness was checked: --data holds none of their records"


def test_a_bad_manifest_is_a_row_and_the_others_are_checked(run_ttc, tmp_path):
    root = harnesses(tmp_path, *SAMPLE_IDXS)
    manifest = root / "900097" / "harness.toml"
    manifest.write_text(manifest.read_text().replace("proof =", "prof ="))
    code, out, _ = run_ttc("oracle", "check", str(root))
    assert code == 1
    assert rows(out) == {
        "900097": "FAIL: harness.toml: unknown field 'prof'; did you mean 'proof'?",
        "900194": "ok",
    }


def test_a_case_the_driver_does_not_know_is_named(run_ttc, tmp_path):
    root = harnesses(tmp_path, "900097")
    manifest = root / "900097" / "harness.toml"
    manifest.write_text(manifest.read_text().replace('proof = "long_value"', 'proof = "long_valeu"'))
    code, out, _ = run_ttc("oracle", "check", str(root))
    assert code == 1
    assert rows(out)["900097"].startswith(
        "FAIL: the real fix fails the proof 'long_valeu': long_valeu: exit 2 (a driver's status for a case name it "
        "does not know)"
    )


def test_linked_harnesses_are_followed(run_ttc, tmp_path):
    # a directory of links to harnesses kept elsewhere, and a harness whose source is a link: both checked
    elsewhere = harnesses(tmp_path / "elsewhere", *SAMPLE_IDXS)
    root = tmp_path / "linked"
    root.mkdir()
    (root / "900097").symlink_to(elsewhere / "900097")
    shutil.copytree(elsewhere / "900194", root / "900194")
    (root / "900194" / "harness.c").unlink()
    (root / "900194" / "harness.c").symlink_to(elsewhere / "900194" / "harness.c")
    code, out, _ = run_ttc("oracle", "check", str(root))
    assert (code, rows(out)) == (0, {"900097": "ok", "900194": "ok"})


def test_broken_links_are_rows_that_say_so(run_ttc, tmp_path):
    # a harness directory that links to nowhere is not passed over, and a source that links to nowhere is not called
    # missing
    root = harnesses(tmp_path, *SAMPLE_IDXS)
    shutil.rmtree(root / "900097")
    (root / "900097").symlink_to(tmp_path / "moved" / "900097")
    (root / "900194" / "harness.c").unlink()
    (root / "900194" / "harness.c").symlink_to(tmp_path / "moved" / "harness.c")
    code, out, _ = run_ttc("oracle", "check", str(root))
    assert code == 1
    assert rows(out) == {
        "900097": f"FAIL: {root / '900097'}: a broken link (to {tmp_path / 'moved' / '900097'}, which does not exist)",
        "900194": f"FAIL: harness.c: a broken link (to {tmp_path / 'moved' / 'harness.c'}, which does not exist)",
    }


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


def test_sigterm_while_fit_checks_the_harnesses_is_a_stop(tmp_path):
    """Before the first step `fit` builds each harness with its records; a SIGTERM then ends the run with 143 (a
    stop the user asked for, not an error) and kills the build it waited for."""
    bin_dir, started = tmp_path / "bin", tmp_path / "gcc.pid"
    bin_dir.mkdir()
    gcc = bin_dir / "gcc"
    gcc.write_text(f'#!/bin/sh\necho $$ > "{started}.tmp" && mv "{started}.tmp" "{started}"\nexec sleep 120\n')
    gcc.chmod(0o755)
    env = process_env(PATH=f"{bin_dir}:{os.environ['PATH']}")
    command = [sys.executable, "-m", "ttc_lightning", "fit", "--config", str(REPO / "configs" / "patch_oracle.yaml")]
    with (tmp_path / "ttc.log").open("w") as log:
        proc = subprocess.Popen(
            [*command, "--trainer.default_root_dir", "run"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_for(proc, tmp_path, started.exists, "the first harness build")
        proc.send_signal(signal.SIGTERM)
        code, out = finish(proc, tmp_path, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 143, out[-3000:]
    assert "sys.exit" not in out and "Traceback" not in out
    assert gone(int(started.read_text()))
