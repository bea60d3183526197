"""`ttc oracle check`: validates harnesses on PrimeVul records, as a researcher writing one runs it, and as `ttc fit`
does before training with `oracle_reward`.

    ttc oracle check                                     # the shipped harnesses on the shipped sample
    ttc oracle check my_harnesses --data primevul_train_paired.jsonl primevul_valid_paired.jsonl

A harness passes when (1) the real fix (its `fixed_idx` record) compiles with it and passes the proof and every test,
(2) the vulnerable function (its `idx` record) compiles and fails the proof, and (3) the function with its body
replaced by a constant return fails at least one test (a do-nothing patch must not pass). A harness whose records
are not in the data is listed as not checked. Exit status 0 when every harness checked passes, 1 when one fails or
none could be checked.
"""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.primevul import PrimeVulRecord, read_records
from ttc_lightning.errors import TTCError, error_line
from ttc_lightning.oracle.check import Budget, check_function, constant_body, harness_problem
from ttc_lightning.oracle.harness import HARNESSES, Harness, harness_directories, load_harness
from ttc_lightning.oracle.sandbox import run_parallel
from ttc_lightning.run.export import CommandParser

SAMPLE_FILES = tuple(sorted(Path(SAMPLE_DIR).glob("*_paired.jsonl")))


@dataclass(frozen=True)
class HarnessReport:
    """What `check_harness` found: `problem` is None when the harness passes; `skipped` when the data lacks its
    records. `harness` is None when its manifest could not be read (`problem` says why)."""

    directory: Path
    harness: Harness | None
    problem: str | None
    seconds: float = 0.0
    skipped: bool = False


def check_harness(harness: Harness, records: dict[str, PrimeVulRecord], budget: Budget) -> HarnessReport:
    """The three builds of one harness, judged (`harness_problem`); a problem too when its records are missing."""
    vulnerable, fixed = records.get(harness.idx), records.get(harness.fixed_idx)
    if vulnerable is None or fixed is None:
        missing = harness.idx if vulnerable is None else harness.fixed_idx
        return HarnessReport(
            harness.directory,
            harness,
            f"not checked: no record with idx {missing} in the data read (--data, or the shipped sample)",
            skipped=True,
        )
    if vulnerable.target != 1 or fixed.target != 0:
        why = "idx must name the vulnerable record (target 1) and fixed_idx its fix (target 0)"
        return HarnessReport(harness.directory, harness, why)
    fix = check_function(harness, fixed.func, budget, every_case=True, original=vulnerable.func)
    if not fix.compiled or not fix.proof_fixed or fix.failed_tests:  # no oracle whatever the other builds do
        seconds = fix.compile_seconds + fix.run_seconds
        return HarnessReport(harness.directory, harness, harness_problem(harness, fix, fix), seconds)
    verdicts = [
        fix,
        check_function(harness, vulnerable.func, budget),
        check_function(harness, constant_body(vulnerable.func, harness.language), budget, every_case=True),
    ]
    seconds = sum(v.compile_seconds + v.run_seconds for v in verdicts)
    return HarnessReport(harness.directory, harness, harness_problem(harness, *verdicts), seconds)


def check_harnesses(root: Path, data: list[Path], workers: int, budget: Budget) -> list[HarnessReport]:
    """Every harness under `root` checked against the records of `data`, `workers` harnesses at once; one whose
    manifest is not as the format says is reported, not checked."""
    records: dict[str, PrimeVulRecord] = {}
    for path in data:
        records |= {str(r.idx): r for r in read_records(path)}

    def check(directory: Path, stop: threading.Event) -> HarnessReport:
        try:
            harness = load_harness(directory)
        except TTCError as e:
            return HarnessReport(directory, None, str(e).removeprefix(f"{directory}/"))
        return check_harness(harness, records, budget)

    return run_parallel(check, harness_directories(root), workers)


def table(reports: list[HarnessReport]) -> str:
    """One line per harness: idx, language, CWE, cases, seconds, and `ok` or its problem."""
    lines = [f"{'idx':>8}  {'lang':4}  {'cwe':9}  {'cases':>5}  {'seconds':>7}  verdict"]
    for r in reports:
        h = r.harness
        verdict = "ok" if r.problem is None else r.problem if r.skipped else f"FAIL: {r.problem}"
        language, cwe, cases = ("-", "-", "-") if h is None else (h.language, ",".join(h.cwe) or "-", len(h.cases))
        lines.append(f"{r.directory.name:>8}  {language:4}  {cwe:9}  {cases:>5}  {r.seconds:>7.1f}  {verdict}")
    checked = [r for r in reports if not r.skipped]
    failed = sum(r.problem is not None for r in checked)
    summary = f"{len(checked) - failed} of {len(checked)} harnesses checked pass"
    if len(checked) < len(reports):
        summary += f"; {len(reports) - len(checked)} not checked (their records are not in the data read)"
    lines.append(summary)
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="ttc oracle", description=__doc__.split("\n\n")[0])
    actions = parser.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="validate harnesses on the records they test")
    check.add_argument("directory", nargs="?", default=str(HARNESSES), help="harnesses (default: ttc's own)")
    check.add_argument(
        "--data", nargs="+", default=[str(p) for p in SAMPLE_FILES], help="PrimeVul JSONL files holding the records"
    )
    check.add_argument("--workers", type=int, default=2, help="harnesses checked at once (default 2)")
    check.add_argument(
        "--compile_timeout", type=float, default=60.0, help="seconds each build may take (default 60, at most 3600)"
    )
    check.add_argument(
        "--max_memory_mb", type=int, default=2048, help="memory of each build and case, MiB (default 2048)"
    )
    args = parser.parse_args(argv)
    try:
        if args.workers < 1:
            raise TTCError(f"--workers must be at least 1, got {args.workers}")
        if not 0 < args.compile_timeout <= 3600:
            raise TTCError(f"--compile_timeout must be seconds above 0, at most 3600, got {args.compile_timeout:g}")
        if args.max_memory_mb < 64:
            raise TTCError(f"--max_memory_mb must be at least 64, got {args.max_memory_mb}")
        budget = Budget(args.compile_timeout, args.max_memory_mb)
        reports = check_harnesses(Path(args.directory), [Path(p) for p in args.data], args.workers, budget)
    except TTCError as e:
        print(error_line(e), file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # the checks are killed and their directories removed on the way out
        print("ttc: interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    print(table(reports))
    checked = [r for r in reports if not r.skipped]
    if not checked:
        print(error_line("no harness was checked: --data holds none of their records"), file=sys.stderr)
    sys.exit(0 if checked and all(r.problem is None for r in checked) else 1)
