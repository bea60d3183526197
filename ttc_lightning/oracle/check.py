"""One function against its harness: build it under the sanitizers, run the proof and the tests, grade the outcome;
verdicts cached by (harness, function) for the whole run."""

from __future__ import annotations

import hashlib
import shutil
import signal
import tempfile
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from ttc_lightning.errors import TTCError
from ttc_lightning.oracle.harness import Harness, Language
from ttc_lightning.oracle.sandbox import Finished, Limits, run_contained
from ttc_lightning.oracle.scope import outside_the_function

COMPILERS: dict[Language, tuple[str, ...]] = {"c": ("gcc", "-std=gnu11"), "cpp": ("g++", "-std=gnu++17")}
SANITIZE = ("-g", "-O1", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all")
PROGRAM = "check"
PASSED_FILE = ".ttc-passed"
TOKEN_FILE = ".ttc-token"
# The program's real entry, built beside every harness and linked with `--wrap=main`: the C runtime starts
# `__wrap_main`, which runs the harness's own `main` (`__real_main`); a case passes only when that returns 0 here, and
# this entry then writes the case's token to PASSED_FILE. The token is fresh for each run and reaches the program in
# a file that the entry reads and deletes in a constructor that runs before any other (priority 101), so neither the
# environment (`/proc/self/environ` keeps what a process started with) nor the file system holds it while the harness
# and the function run. A patched function that ends the process early with a status of 0 (`exit(0)`, `_exit(0)`)
# never reaches the write, and one that writes the file does not know the token: only code that searches the
# process's own memory for it could forge a pass (the sandbox, not the score, is what holds against such code).
ENTRY = """#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#ifdef __cplusplus
extern "C" {
#endif
static char ttc_token[64], ttc_passed[4096];
__attribute__((constructor(101))) static void ttc_take_token(void) {
    const char *file = getenv("TTC_CASE_TOKEN_FILE"), *passed = getenv("TTC_CASE_PASSED");
    if (passed != NULL) strncpy(ttc_passed, passed, sizeof ttc_passed - 1);  /* absolute: the harness may cd */
    if (file != NULL) {
        FILE *f = fopen(file, "r");
        if (f != NULL) {
            if (fgets(ttc_token, sizeof ttc_token, f) == NULL) ttc_token[0] = 0;
            fclose(f);
        }
        unlink(file);
    }
    unsetenv("TTC_CASE_TOKEN_FILE");
    unsetenv("TTC_CASE_PASSED");
}
int __real_main(int argc, char **argv);
int __wrap_main(int argc, char **argv) {
    int status = __real_main(argc, argv);
    if (status == 0 && ttc_token[0] != 0 && ttc_passed[0] != 0) {
        FILE *f = fopen(ttc_passed, "w");
        if (f != NULL) { fputs(ttc_token, f); fclose(f); }
    }
    return status;
}
#ifdef __cplusplus
}
#endif
"""
ENTRY_FILES: dict[Language, str] = {"c": "ttc_entry.c", "cpp": "ttc_entry.cpp"}

UNKNOWN_CASE = 2  # the status a harness's driver returns for a case name it does not know (the format's README)
# The grades of the scale (`grade`).
NO_BUILD, STILL_VULNERABLE, PROOF_FIXED, PASSED = 0.0, 0.25, 0.5, 1.0
_TEST_SHARE = 0.4  # what the tests a proof-fixing patch passes add to PROOF_FIXED, all but one of them at most


@dataclass(frozen=True)
class Budget:
    """The limits of one check's stages."""

    compile_seconds: float = 60.0
    """Wall-clock (and CPU) seconds the compiler may take."""
    memory_mb: int = 2048
    """Memory of the compiler (address space) and of each case (resident, through the sanitizer's own limit)."""


@dataclass(frozen=True)
class Verdict:
    """What one function did with its harness."""

    compiled: bool
    proof_fixed: bool
    """The proof case passed: the vulnerability no longer shows."""
    passed_tests: tuple[str, ...]
    failed_tests: tuple[str, ...]
    """Failed, or never run: tests run only when the proof passes, unless every case was asked for."""
    output: str
    """The tail of the compiler's output when it failed, else of the first failing case's."""
    compile_seconds: float
    run_seconds: float

    @property
    def passed(self) -> bool:
        return self.compiled and self.proof_fixed and not self.failed_tests


def grade(verdict: Verdict) -> float:
    """The oracle's reward for one patched function, highest for what the task wants most:

    - 0.0: it does not compile with the harness (or the compiler ran out of time);
    - 0.25: it compiles, and the proof of vulnerability still fails;
    - 0.5 + 0.4 * (tests passed / tests): the proof passes but a test fails: the patch stops the exploit by
      breaking behaviour the fix keeps (returning early, deleting the body), worth less than any real fix;
    - 1.0: the proof and every test pass.

    Compiling is the first thing a patch must do, and a vulnerable function that compiles is closer to a fix than
    one that does not; the proof is the point of the task; the tests tell a fix from a function that no longer does
    its job, and their share orders such patches among themselves without ever reaching a real fix's 1.0.
    """
    if not verdict.compiled:
        return NO_BUILD
    if not verdict.proof_fixed:
        return STILL_VULNERABLE
    if not verdict.failed_tests:
        return PASSED
    total = len(verdict.passed_tests) + len(verdict.failed_tests)
    return PROOF_FIXED + _TEST_SHARE * len(verdict.passed_tests) / total


def check_function(
    harness: Harness,
    function: str,
    budget: Budget,
    stop: threading.Event | None = None,
    every_case: bool = False,
    original: str | None = None,
) -> Verdict:
    """Build `function` with `harness` in a fresh directory and run its cases: the proof, then (when it passed, or
    with `every_case`) the tests, each alone. With `original`, the function it patches, a `function` that adds code
    outside the function (`ttc_lightning.oracle.scope`) is not built: its verdict is a failed build that says why.
    TTCError when the compiler is missing."""
    compiler, *std = COMPILERS[harness.language]
    if shutil.which(compiler) is None:
        raise TTCError(f"{harness.directory}: the oracle needs {compiler} on PATH to build this harness")
    outside = None if original is None else outside_the_function(function, original)
    if outside is not None:
        return Verdict(False, False, (), harness.tests, f"refused: {outside}", 0.0, 0.0)
    directory = Path(tempfile.mkdtemp(prefix="ttc-oracle-"))
    try:
        try:
            shutil.copytree(harness.directory, directory, dirs_exist_ok=True)
        except (OSError, shutil.Error) as e:
            raise TTCError(f"{harness.directory}: cannot copy the harness ({e})") from None
        (directory / harness.function_file).write_text(function, encoding="utf-8", errors="surrogatepass")
        entry = ENTRY_FILES[harness.language]
        (directory / entry).write_text(ENTRY, encoding="utf-8")
        argv = [compiler, *std, *SANITIZE, *harness.flags, harness.source, entry, "-Wl,--wrap=main", "-o", PROGRAM]
        limits = Limits(budget.compile_seconds, memory=budget.memory_mb << 20)
        # TMPDIR in the check's directory: the assembler files of a compiler killed at its limit go with it.
        built = run_contained(
            argv,
            directory,
            timeout=budget.compile_seconds,
            limits=limits,
            stop=stop,
            env={"TMPDIR": str(directory.resolve())},
            remove_at_exit=directory,
        )
        if built.status != 0:
            output = f"build: {ending(built, budget.compile_seconds)}\n{built.output}"
            return Verdict(False, False, (), harness.tests, output, built.seconds, 0.0)
        results: dict[str, bool] = {}
        output, seconds = "", 0.0
        for case in harness.cases:
            if case != harness.proof and not results[harness.proof] and not every_case:
                break
            ran, passed = _run_case(harness, directory, case, budget, stop)
            results[case] = passed
            seconds += ran.seconds
            if not results[case] and not output:
                unknown = " (a driver's status for a case name it does not know)" if ran.status == UNKNOWN_CASE else ""
                output = f"{case}: {ending(ran, harness.timeout)}{unknown}\n{ran.output}"
        passed = tuple(t for t in harness.tests if results.get(t))
        failed = tuple(t for t in harness.tests if not results.get(t))
        return Verdict(True, results[harness.proof], passed, failed, output, built.seconds, seconds)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_SIGNALS = {
    signal.SIGXFSZ: "wrote past the file size limit",
    signal.SIGXCPU: "ran past its CPU time limit",
    signal.SIGKILL: "its CPU time or memory limit, or stopped",
}


def ending(finished: Finished, timeout: float) -> str:
    """How a build or case ended, in words: `timed out after 5 s`, `killed by SIGXFSZ (wrote past the file size
    limit)`, `exit 1`."""
    if finished.status is None:
        return f"timed out after {timeout:g} s"
    if finished.status < 0:
        number = -finished.status
        name = signal.Signals(number).name if number in signal.Signals._value2member_map_ else f"signal {number}"
        why = _SIGNALS.get(number)  # type: ignore[call-overload]
        return f"killed by {name}" + (f" ({why})" if why else "")
    return f"exit {finished.status}"


def _run_case(
    harness: Harness, directory: Path, case: str, budget: Budget, stop: threading.Event | None
) -> tuple[Finished, bool]:
    """One case, and whether it passed: exit status 0 and the case's token written by the entry (`ENTRY`)."""
    token = uuid.uuid4().hex
    (directory / PASSED_FILE).unlink(missing_ok=True)
    (directory / TOKEN_FILE).write_text(token, encoding="utf-8")
    # AddressSanitizer reserves terabytes of address space for its shadow memory, so RLIMIT_AS would stop every
    # sanitized program: its own allocator limits bound the memory instead.
    sanitizer = f"detect_leaks=1:hard_rss_limit_mb={budget.memory_mb}:malloc_limit_mb={budget.memory_mb}"
    env = {
        "ASAN_OPTIONS": sanitizer,
        "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1",
        "TTC_CASE_TOKEN_FILE": str(directory.resolve() / TOKEN_FILE),
        "TTC_CASE_PASSED": str(directory.resolve() / PASSED_FILE),
    }
    limits = Limits(harness.timeout, file_size=64 << 20, memory=None, processes=64)
    ran = run_contained(
        [f"./{PROGRAM}", case],
        directory,
        timeout=harness.timeout,
        limits=limits,
        stop=stop,
        env=env,
        remove_at_exit=directory,
    )
    (directory / TOKEN_FILE).unlink(missing_ok=True)  # a program that never started leaves it
    try:
        written = (directory / PASSED_FILE).read_text(encoding="utf-8", errors="replace")
    except OSError:
        written = ""
    return ran, ran.status == 0 and written == token


def harness_problem(
    harness: Harness, fixed: Verdict, vulnerable: Verdict, do_nothing: Verdict | None = None
) -> str | None:
    """What makes `harness` no oracle, in one line, or None: the real fix must compile and pass the proof and every
    test, the vulnerable function must compile and fail the proof, and a do-nothing patch (`constant_body`; when
    its verdict is given, with every case run) must fail a test."""
    if not fixed.compiled:
        return f"the real fix does not compile: {_first_line(fixed.output)}"
    if not fixed.proof_fixed:
        return f"the real fix fails the proof {harness.proof!r}: {_first_line(fixed.output)}"
    if fixed.failed_tests:
        return f"the real fix fails test {fixed.failed_tests[0]!r}: {_first_line(fixed.output)}"
    if not vulnerable.compiled:
        return f"the vulnerable function does not compile: {_first_line(vulnerable.output)}"
    if vulnerable.proof_fixed:
        return f"the vulnerable function passes the proof {harness.proof!r}: it proves nothing"
    if do_nothing is not None and do_nothing.compiled and not do_nothing.failed_tests:
        return "a do-nothing patch (the body replaced by a constant return) passes every test: add a test it fails"
    return None


def _first_line(output: str) -> str:
    """The line of a build's or case's output that says most: a sanitizer's or compiler's error, else the first."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for marker in ("refused:", "ERROR:", "runtime error:", "error:", "Assertion", "timed out", "killed by"):
        hit = next((line for line in lines if marker in line), None)
        if hit is not None:
            return hit[:200]
    return lines[0][:200] if lines else "(no output)"


class VerdictCache:
    """Verdicts by (harness digest, function), the `size` most recently used kept; safe across threads."""

    def __init__(self, size: int = 100_000) -> None:
        self.size = size
        self._verdicts: OrderedDict[tuple[str, str], Verdict] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(harness: Harness, function: str) -> tuple[str, str]:
        return harness.digest, hashlib.sha256(function.encode("utf-8", "surrogatepass")).hexdigest()

    def get(self, key: tuple[str, str]) -> Verdict | None:
        with self._lock:
            verdict = self._verdicts.get(key)
            if verdict is not None:
                self._verdicts.move_to_end(key)
            return verdict

    def put(self, key: tuple[str, str], verdict: Verdict) -> None:
        with self._lock:
            self._verdicts[key] = verdict
            self._verdicts.move_to_end(key)
            while len(self._verdicts) > self.size:
                self._verdicts.popitem(last=False)


def constant_body(function: str, language: Language) -> str:
    """`function` with its body replaced by a constant return (`return 0;`, `return {};` in C++, nothing for a
    `void` function): the do-nothing patch that a harness's tests must catch."""
    open_paren = function.index("(")
    depth, end = 0, open_paren
    for end in range(open_paren, len(function)):
        depth += {"(": 1, ")": -1}.get(function[end], 0)
        if depth == 0:
            break
    body = function.index("{", end)
    head = function[:body]
    words = function[:open_paren].replace("*", " * ").split()
    void = len(words) >= 2 and words[-2] == "void"
    statement = "" if void else ("return {};" if language == "cpp" else "return 0;")
    return f"{head}{{ {statement} }}\n"
