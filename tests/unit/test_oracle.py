"""The oracle's grade and `oracle_reward` (ttc_lightning.rewards.oracle) on the sample's first pair, tlv_read_string
(idx 900097, fixed in 910089: `if (len >= out_size) return TLV_ERR_TOO_LONG;` before the copy). Its harness runs
the proof `long_value` and the tests short_value, exact_fit, two_records, truncated and wrong_type."""

import os
import shutil

import pytest

from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.primevul import load_pairs
from ttc_lightning.data.tasks import patch_row
from ttc_lightning.errors import TTCError
from ttc_lightning.oracle import check
from ttc_lightning.oracle.check import Budget, Verdict, VerdictCache, check_function, ending, grade
from ttc_lightning.oracle.harness import HARNESSES, load_harness
from ttc_lightning.oracle.sandbox import Finished
from ttc_lightning.rewards import oracle
from ttc_lightning.rewards.oracle import oracle_reward, take_stats
from ttc_lightning.rewards.patch import make_oracle_edits

IDX = "900097"
ROW = next(patch_row(p) for p in load_pairs(SAMPLE_DIR, "train") if str(p.vulnerable.idx) == IDX)
V, F = ROW["vulnerable_func"], ROW["fixed_func"]
SHORT_CHECK = "    if (buf_len - pos < len)\n        return TLV_ERR_SHORT;\n"  # the bounds check on the record
COPY = "    memcpy(out, buf + pos, len);\n"


def edited(function: str, old: str, new: str) -> str:
    assert old in function, old
    return function.replace(old, new)


def answer(patched: str) -> str:
    """The completion whose edits turn V into `patched`."""
    return f"<think>x</think><answer>{make_oracle_edits(V, patched)}</answer>"


FIX = answer(F)
NO_OP = answer(edited(V, COPY, COPY.replace(";", "; ")))  # an added space: still vulnerable
NO_BUILD = answer(edited(V, COPY, COPY.replace(";", "")))
EARLY_RETURN = answer(
    edited(V, "    size_t pos = *offset;\n", "    size_t pos = *offset;\n    return TLV_ERR_TOO_LONG;\n")
)
NO_BOUNDS_CHECK = answer(edited(F, SHORT_CHECK, ""))  # the fix, with the record's bounds check deleted


@pytest.fixture(autouse=True)
def fresh_oracle(monkeypatch):
    """No verdict from another test, and the stats counted from this test's start."""
    monkeypatch.setattr(oracle, "_verdicts", VerdictCache())
    monkeypatch.setattr(oracle, "_stats", {})


def rewards(completions: list[str], ids: list[str] | None = None, **options) -> list[float | None]:
    n = len(completions)
    ids = ids or [IDX] * n
    return oracle_reward(completions, id=ids, vulnerable_func=[V] * n, cve=[ROW["cve"]] * n, workers=2, **options)


# ---------------------------------------------------------------- grade


def verdict(compiled: bool, proof_fixed: bool, passed: int, failed: int) -> Verdict:
    passing, failing = tuple(f"p{k}" for k in range(passed)), tuple(f"f{k}" for k in range(failed))
    return Verdict(compiled, proof_fixed, passing, failing, "", 0.1, 0.2)


@pytest.mark.parametrize(
    ("compiled", "proof_fixed", "passed", "failed", "expected"),
    [
        (False, False, 0, 5, 0.0),  # no build
        (True, False, 0, 5, 0.25),  # builds, the proof still fails (the tests never ran)
        (True, False, 5, 0, 0.25),  # every test but not the proof: still vulnerable
        (True, True, 0, 5, 0.5),  # 0.5 + 0.4 * 0/5
        (True, True, 1, 4, 0.58),  # 0.5 + 0.4 * 1/5 = 0.5 + 0.08
        (True, True, 3, 1, 0.8),  # 0.5 + 0.4 * 3/4 = 0.5 + 0.3
        (True, True, 99, 1, 0.896),  # 0.5 + 0.4 * 99/100 = 0.5 + 0.396: below 1.0 however many pass
        (True, True, 5, 0, 1.0),  # everything passes
    ],
)
def test_grade(compiled, proof_fixed, passed, failed, expected):
    v = verdict(compiled, proof_fixed, passed, failed)
    assert grade(v) == pytest.approx(expected)
    assert v.passed == (expected == 1.0)


# ---------------------------------------------------------------- oracle_reward on the sample's pair


def test_the_scale_on_the_sample_pair():
    completions = [FIX, NO_OP, "no answer", FIX, NO_BUILD, EARLY_RETURN, NO_BOUNDS_CHECK]
    expected = [
        1.0,  # the real fix
        0.25,  # builds, long_value still overflows
        -1.0,  # malformed
        None,  # record 12345 has no harness
        0.0,  # does not compile
        0.5,  # stops the overflow by returning TLV_ERR_TOO_LONG always: 0.5 + 0.4 * 0/5
        0.82,  # all but truncated, whose 10-byte claim on 4 bytes is read past the buffer: 0.5 + 0.4 * 4/5
    ]
    got = rewards(completions, ids=[IDX, IDX, IDX, "12345", IDX, IDX, IDX])
    assert got == pytest.approx(expected)
    stats = take_stats()
    assert (stats["checks"], stats["cache_hits"]) == (5, 0)  # FIX, NO_OP, NO_BUILD, EARLY_RETURN, NO_BOUNDS_CHECK
    assert stats["compile_s"] > 0 and stats["run_s"] > 0 and stats["wall_s"] > 0


FIRST = "    size_t pos = *offset;\n"


@pytest.mark.parametrize(
    "ending",
    [
        "extern void _exit(int); _exit(0);",  # ends the process with status 0 before any check can fail
        "extern void exit(int); exit(0);",
    ],
)
def test_a_patch_that_ends_the_process_early_passes_nothing(ending):
    # the case's status is 0, but the entry that writes the case's token never ran: the proof fails, as for the
    # vulnerable function it still is: 0.25
    assert rewards([answer(edited(V, FIRST, FIRST + "    " + ending + "\n"))]) == [0.25]


LAST = "    return TLV_OK;\n}"  # the function's last lines


@pytest.mark.parametrize(
    "after",
    [
        # a second main, and the harness's own renamed out of the way: the harness's checks never run
        "int main(int argc, char **argv) { return 0; }\n#define main unused_main",
        # a constructor that would write the pass file before the harness's main runs, and end the process
        "__attribute__((constructor)) static void early(void) { _exit(0); }",
    ],
)
def test_a_patch_that_adds_code_around_the_function_is_not_built(after):
    # refused before the compiler runs (ttc_lightning.oracle.scope): 0.0, as for a patch that does not build
    assert rewards([answer(edited(V, LAST, LAST + "\n" + after))]) == [0.0]


SIGNATURE = "int tlv_read_string("
# Each keeps the overflowing write and returns the status the proof expects, so that only the sanitizer's report
# tells it from the fix.
TOO_LONG = "    if (len >= out_size) {\n"
OVERFLOW = "        for (uint16_t i = 0; i < len; i++)\n            out[i] = buf[pos + i];\n        out[len] = 0;\n"


@pytest.mark.parametrize(
    "patched",
    [
        edited(
            V,
            COPY,
            TOO_LONG
            + "        __asan_unpoison_memory_region(out, 64);\n"
            + OVERFLOW
            + "        return TLV_ERR_TOO_LONG;\n    }\n"
            + COPY,
        ),
        edited(
            edited(V, SIGNATURE, "__attribute__((no_sanitize_address)) " + SIGNATURE),
            COPY,
            TOO_LONG + OVERFLOW + "        return TLV_ERR_TOO_LONG;\n    }\n" + COPY,
        ),
        edited(
            V,
            COPY,
            "    static void *away[5];\n    void back(void) { __builtin_longjmp(away, 1); }\n"
            + "    extern void __asan_set_death_callback(void (*)(void));\n"
            + TOO_LONG
            + "        __asan_set_death_callback(back);\n"
            + "        if (__builtin_setjmp(away)) return TLV_ERR_TOO_LONG;\n    }\n"
            + COPY,
        ),
    ],
)
def test_a_patch_that_hides_the_overflow_from_the_sanitizer_is_not_built(patched, monkeypatch):
    # refused before the compiler runs: 0.0
    assert rewards([answer(patched)]) == [0.0]
    # what it would have scored without the rule: every case passes, the overflow unreported
    monkeypatch.setattr(oracle, "_verdicts", VerdictCache())
    monkeypatch.setattr(check, "outside_the_function", lambda patched, original: None)
    assert rewards([answer(patched)]) == [1.0]


# Read the token the way a process could before the entry kept it out of the environment: TTC_CASE_TOKEN there, or
# the file TTC_CASE_TOKEN_FILE names, written to the file TTC_CASE_PASSED names; then end the process with status 0.
FORGE = r"""    {
        static char env[65536], token[64];
        FILE *e = fopen("/proc/self/environ", "r");
        size_t n = e ? fread(env, 1, sizeof env - 1, e) : 0;
        const char *file = 0, *passed = 0;
        for (char *p = env; p < env + n; p += strlen(p) + 1) {
            if (!strncmp(p, "TTC_CASE_TOKEN=", 15)) strncpy(token, p + 15, sizeof token - 1);
            if (!strncmp(p, "TTC_CASE_TOKEN_FILE=", 20)) file = p + 20;
            if (!strncmp(p, "TTC_CASE_PASSED=", 16)) passed = p + 16;
        }
        FILE *t = file ? fopen(file, "r") : 0;
        if (t && !fgets(token, sizeof token, t)) token[0] = 0;
        FILE *o = passed ? fopen(passed, "w") : 0;
        if (o) { fputs(token, o); fclose(o); }
        extern void _exit(int); _exit(0);
    }
"""


def test_a_patch_cannot_read_the_case_token():
    # the token file is deleted before the harness's main runs, and the environment never held the token: the
    # forged file holds nothing, the proof fails as for the vulnerable function: 0.25
    assert rewards([answer(edited(V, FIRST, FIRST + FORGE))]) == [0.25]


def test_identical_patches_are_checked_once():
    assert rewards([FIX, FIX, NO_OP, FIX]) == [1.0, 1.0, 0.25, 1.0]
    assert (take_stats()["checks"], take_stats()) == (2, {})  # FIX and NO_OP; taking the stats clears them
    assert rewards([NO_OP, FIX, "no answer"]) == [0.25, 1.0, -1.0]
    stats = take_stats()
    assert (stats["checks"], stats["cache_hits"], stats["wall_s"]) == (0, 2, 0.0)


def test_a_harness_directory_of_ones_own(tmp_path):
    # The shipped harness, its tests cut to two; the fix without its bounds check fails truncated, passes short_value.
    shutil.copytree(HARNESSES / IDX, tmp_path / IDX)
    manifest = tmp_path / IDX / "harness.toml"
    manifest.write_text(
        edited(
            manifest.read_text(),
            'tests = ["short_value", "exact_fit", "two_records", "truncated", "wrong_type"]',
            'tests = ["short_value", "truncated"]',
        )
    )
    got = rewards([NO_BOUNDS_CHECK, FIX, FIX], ids=[IDX, IDX, "900194"], harnesses=str(tmp_path))
    assert got == pytest.approx([0.7, 1.0, None])  # 0.5 + 0.4 * 1/2; 900194's harness is not in tmp_path
    # the numbers are the directory's: an entry with the shipped harnesses beside it reports its own
    assert take_stats() == {}
    assert take_stats(harnesses=str(tmp_path))["checks"] == 2


def test_a_missing_harness_directory_is_a_configuration_error(tmp_path):
    with pytest.raises(TTCError, match="not a directory of harnesses") as e:
        rewards([FIX], harnesses=str(tmp_path / "absent"))
    assert str(tmp_path / "absent") in str(e.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "workers must be an integer of at least 1, or null"),
        ({"workers": 2.0}, "workers must be an integer"),
        ({"compile_timeout": -1}, "compile_timeout must be seconds above 0, at most 3600"),
        ({"compile_timeout": "60"}, "compile_timeout must be seconds above 0, at most 3600"),
        ({"compile_timeout": float("inf")}, "compile_timeout must be seconds above 0, at most 3600"),
        ({"max_memory_mb": 1}, "max_memory_mb must be an integer of at least 64"),
        ({"max_memory_mb": 2048.0}, "max_memory_mb must be an integer"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(TTCError, match=message):
        oracle_reward([FIX], id=[IDX], vulnerable_func=[V], **{"workers": 1, **options})


def test_columns_need_one_value_per_completion():
    with pytest.raises(TTCError, match="got 2 completions but 1 id and 2 vulnerable_func values"):
        oracle_reward([FIX, FIX], id=[IDX], vulnerable_func=[V, V])


def test_a_missing_compiler_is_a_configuration_error_naming_the_harness(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no gcc there
    with pytest.raises(TTCError, match="the oracle needs gcc on PATH to build this harness") as e:
        rewards([FIX])
    assert str(e.value).startswith(f"{HARNESSES / IDX}: ")


# ---------------------------------------------------------------- how a build or case ended, in words


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (None, "timed out after 2.5 s"),
        (1, "exit 1"),
        (-25, "killed by SIGXFSZ (wrote past the file size limit)"),  # 25: SIGXFSZ on Linux
        (-9, "killed by SIGKILL (its CPU time or memory limit, or stopped)"),
        (-11, "killed by SIGSEGV"),
    ],
)
def test_endings_are_words(status, expected):
    assert ending(Finished(status, "", 0.1), 2.5) == expected


def test_a_compiler_past_its_time_says_so_and_leaves_no_temporary_files(tmp_path, monkeypatch):
    """A compiler killed at `compile_timeout` leaves its assembler files in the check's directory, which is removed,
    not in the user's TMPDIR."""
    bin_dir, user_tmp = tmp_path / "bin", tmp_path / "tmp"
    bin_dir.mkdir()
    user_tmp.mkdir()
    gcc = bin_dir / "gcc"
    gcc.write_text('#!/bin/sh\necho partial > "${TMPDIR:-/tmp}/ccTTC.s"\nexec sleep 30\n')
    gcc.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("TMPDIR", str(user_tmp))
    verdict = check_function(load_harness(HARNESSES / IDX), V, Budget(compile_seconds=1.0))
    assert not verdict.compiled
    assert verdict.output.startswith("build: timed out after 1 s")
    assert list(user_tmp.iterdir()) == []
