"""`command_reward`: a shell command run on each patched function, its exit status the reward."""

from __future__ import annotations

import errno
import functools
import json
import logging
import math
import numbers
import os
import re
import shlex
import shutil
import signal
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ttc_lightning.errors import TTCError
from ttc_lightning.oracle.sandbox import Limits, run_contained, run_parallel
from ttc_lightning.rewards.patch import Language, apply_completion, file_language, source_language

log = logging.getLogger("ttc")


_SUFFIX: dict[Language, str] = {"c": ".c", "cpp": ".cpp"}
_PLACEHOLDER = re.compile(r"\{(dir|file)\}")
_warned: set[tuple[str, int]] = set()


def command_reward(
    completions: list[str],
    *,
    command: str,
    vulnerable_func: list[str],
    timeout: float = 60.0,
    max_concurrency: int = 4,
    exit_rewards: Mapping[int, float | None] | None = None,
    timeout_reward: float | None = 0.0,
    max_cpu_seconds: float | None = None,
    max_file_size: int = 1 << 30,
    max_memory: int | None = None,
    max_processes: int | None = 256,
    **columns: list[Any],
) -> list[float | None]:
    """Score each patched function by running an external check (a compiler, a test suite, a proof of concept).

    The keyword arguments after `vulnerable_func` configure the check; bind them once with `functools.partial`.
    Per completion:

    1. Its SEARCH/REPLACE edits are applied to `vulnerable_func`; -1.0 when malformed or unappliable, and
       nothing runs.
    2. A fresh temporary directory gets the patched function as `func.c` or `func.cpp` (the `file_name` column's
       language; without one, C unless only C++'s grammar parses the function) and `record.json`, the row's
       columns as one JSON object (`vulnerable_func` and `file_name` included).
    3. `command` runs there: `{dir}` and `{file}` are replaced by the directory's and the file's paths, already
       shell-quoted (do not quote them again), the result split with `shlex.split` and run without a shell
       reading it (a `/bin/sh` sets the limits below, then execs it), in its own session, stdin empty, without
       network where the machine allows it, at most `max_concurrency` commands at once (the runner it shares with
       the oracle: `ttc_lightning.oracle.sandbox`). Other relative paths in the command resolve in that directory: give
       your own scripts by absolute path. The function's text and the row reach the command in these files only,
       never on its command line or in its environment.
    4. The exit status maps to the reward through `exit_rewards` (default `{0: 1.0}`); a status it does not list
       gives 0.0. A command killed by signal N has status -N (-11 for SIGSEGV); a shell that reports a killed
       child exits with 128 + N instead. A value may be None: no score, for "could not judge" statuses.
    5. A command still running after `timeout` seconds is killed and gives `timeout_reward` (default 0.0).

    Every process a check starts is killed when the command exits or times out: its process group, and every
    process whose environment holds the check's `TTC_CHECK_ID` (what it started in a session of its own, or
    through a double fork; a process that drops the variable from its environment escapes this). So are the
    checks running when the call is interrupted (Ctrl-C or SIGTERM in the thread it runs in, where they stop
    it), and those still running when the program exits. The directory is always removed.
    Each process of a check may use `max_cpu_seconds` of CPU time (RLIMIT_CPU; null: `timeout`, rounded up; one
    past it is killed by SIGXCPU, status -24) and write files of at most `max_file_size` bytes (RLIMIT_FSIZE, in
    whole 512-byte blocks; a write past it fails, or kills the writer with SIGXFSZ, status -25), use `max_memory`
    bytes of address space (RLIMIT_AS; null, the default: no limit, as a program built with AddressSanitizer needs)
    and start `max_processes` processes or threads beyond what this user runs when it starts (RLIMIT_NPROC; null: no
    limit). The command's output (stdout and stderr) is discarded, but for its last 4 KB in the debug log when it
    fails; it is never written to a file.

    Completions of one row that patch the function identically run once and share the reward. A command that
    cannot be started (no such program, not executable) is a configuration mistake: TTCError.
    """
    rewards_by_status = _check_command_config(
        command, timeout, max_concurrency, exit_rewards, timeout_reward, max_cpu_seconds, max_file_size
    )
    _check_counts(max_memory, max_processes)
    limits = Limits(max_cpu_seconds or timeout, max_file_size, max_memory, max_processes)
    for name, values in {"vulnerable_func": vulnerable_func, **columns}.items():
        if len(values) != len(completions):
            raise TTCError(
                f"command_reward: got {len(completions)} completions but {len(values)} {name} values; "
                "the columns need one value per completion"
            )
    rewards: list[float | None] = [-1.0] * len(completions)
    jobs: dict[tuple[str, Language, str], list[int]] = {}  # (patched, language, record.json) -> completions
    for i, (completion, vulnerable) in enumerate(zip(completions, vulnerable_func, strict=True)):
        patched, _ = apply_completion(completion, vulnerable)
        if patched is None:
            continue
        row = {name: values[i] for name, values in columns.items()} | {"vulnerable_func": vulnerable}
        language = file_language(row.get("file_name")) or source_language(vulnerable) or "c"
        jobs.setdefault((patched, language, json.dumps(row, default=str)), []).append(i)
    run = functools.partial(_run_check, command, timeout, limits)
    statuses = run_parallel(lambda job, stop: run(stop, *job), list(jobs), max_concurrency)
    for indices, status in zip(jobs.values(), statuses, strict=True):
        for i in indices:
            rewards[i] = timeout_reward if status is None else rewards_by_status.get(status, 0.0)
    return rewards


def _check_command_config(
    command: Any,
    timeout: Any,
    max_concurrency: Any,
    exit_rewards: Any,
    timeout_reward: Any,
    max_cpu_seconds: Any = None,
    max_file_size: Any = 1 << 30,
) -> dict[int, float | None]:
    """`exit_rewards` with int keys; TTCError naming the option for any value the check cannot run with."""

    def real(value: Any) -> bool:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)

    if not isinstance(command, str) or not command.strip():
        raise TTCError(
            f"command_reward: command must be a command line such as 'gcc -fsyntax-only {{file}}', got {command!r}"
        )
    try:
        shlex.split(command)
    except ValueError as e:
        raise TTCError(f"command_reward: command {command!r} cannot be split into words: {e}") from None
    if not real(timeout) or not timeout > 0:
        raise TTCError(f"command_reward: timeout must be a number of seconds above 0, got {timeout!r}")
    if not isinstance(max_concurrency, int) or isinstance(max_concurrency, bool) or max_concurrency < 1:
        raise TTCError(f"command_reward: max_concurrency must be an integer of at least 1, got {max_concurrency!r}")
    if timeout_reward is not None and not real(timeout_reward):
        raise TTCError(f"command_reward: timeout_reward must be a number or null, got {timeout_reward!r}")
    if max_cpu_seconds is not None and (not real(max_cpu_seconds) or not 0 < max_cpu_seconds < math.inf):
        raise TTCError(
            f"command_reward: max_cpu_seconds must be a number of seconds above 0, or null for the timeout, got "
            f"{max_cpu_seconds!r}"
        )
    if not isinstance(max_file_size, int) or isinstance(max_file_size, bool) or max_file_size < 512:
        raise TTCError(
            f"command_reward: max_file_size must be a number of bytes of at least 512, got {max_file_size!r}"
        )
    if exit_rewards is None:
        return {0: 1.0}
    if not isinstance(exit_rewards, Mapping):
        raise TTCError(f"command_reward: exit_rewards must map exit statuses to rewards, got {exit_rewards!r}")
    by_status: dict[int, float | None] = {}
    for status, reward in exit_rewards.items():
        # A JSON config writes keys as strings.
        if isinstance(status, str) and re.fullmatch(r"\s*-?\d+\s*", status):
            code = int(status)
        elif isinstance(status, int) and not isinstance(status, bool):
            code = status
        else:
            raise TTCError(f"command_reward: exit_rewards key {status!r} is not an exit status (an integer)")
        if reward is not None and not real(reward):
            raise TTCError(f"command_reward: exit_rewards[{status!r}] must be a number or null, got {reward!r}")
        by_status[code] = reward
    return by_status


def _check_counts(max_memory: Any, max_processes: Any) -> None:
    for name, value, least in (("max_memory", max_memory, 1 << 20), ("max_processes", max_processes, 1)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < least):
            raise TTCError(f"command_reward: {name} must be an integer of at least {least}, or null, got {value!r}")


def _run_check(
    command: str, timeout: float, limits: Limits, stop: threading.Event, patched: str, language: Language, record: str
) -> int | None:
    """Exit status of `command` on `patched` in a fresh directory; None when it timed out or `stop` was set."""
    directory = Path(tempfile.mkdtemp(prefix="ttc-check-"))
    try:
        file = directory / f"func{_SUFFIX[language]}"
        file.write_text(patched, encoding="utf-8", errors="surrogatepass")
        (directory / "record.json").write_text(record, encoding="utf-8", errors="surrogatepass")
        paths = {"dir": shlex.quote(str(directory)), "file": shlex.quote(str(file))}
        argv = shlex.split(_PLACEHOLDER.sub(lambda m: paths[m.group(1)], command))
        program = _program(argv[0], directory, command)
        try:
            finished = run_contained(
                [program, *argv[1:]], directory, timeout=timeout, limits=limits, stop=stop, remove_at_exit=directory
            )
        except OSError as e:
            raise _cannot_run(command, "/bin/sh", e.strerror or str(e)) from None
        _warn_on_limit(finished.status, command)
        if finished.status != 0 and not finished.stopped:
            what = "timed out" if finished.status is None else f"exit {finished.status}"
            log.debug("command_reward: %s %s:\n%s", argv, what, finished.output)
        return finished.status
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _program(name: str, directory: Path, command: str) -> str:
    """The path `name` is executed from, as `execvp` in `directory` finds it: relative to the directory when it
    holds a slash, else the first executable file of that name on PATH. TTCError when there is none."""
    if "/" in name:
        candidates = [directory / name]
    else:
        candidates = [directory / entry / name for entry in os.environ.get("PATH", os.defpath).split(os.pathsep)]
    denied = False
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        denied = denied or path.exists()
    raise _cannot_run(command, name, os.strerror(errno.EACCES if denied else errno.ENOENT))


def _cannot_run(command: str, program: str, why: str) -> TTCError:
    return TTCError(
        f"command_reward: cannot run command {command!r}: {program}: {why}; give a program on PATH or an executable "
        "file by absolute path (relative ones resolve in the temporary directory)"
    )


def _warn_on_limit(status: int | None, command: str) -> None:
    """Once per command and limit: a check killed by its CPU time or file size limit scores as that status."""
    limits = {-signal.SIGXCPU: "max_cpu_seconds", -signal.SIGXFSZ: "max_file_size"}
    if status in limits and (command, status) not in _warned:
        _warned.add((command, status))
        log.warning(
            "command_reward: command %r was killed by %s (status %d): it went past %s; raise it if the check is "
            "right to need more (shown once)",
            command,
            signal.Signals(-status).name,
            status,
            limits[status],
        )
