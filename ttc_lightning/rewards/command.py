"""`command_reward`: a shell command run on each patched function, its exit status the reward."""

from __future__ import annotations

import json
import logging
import numbers
import os
import re
import shlex
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.patch import Language, apply_completion, file_language, source_language

log = logging.getLogger("ttc")


_SUFFIX: dict[Language, str] = {"c": ".c", "cpp": ".cpp"}
_PLACEHOLDER = re.compile(r"\{(dir|file)\}")
_OUTPUT_TAIL = 2000  # bytes of a failing command's output for the debug log


def command_reward(
    completions: list[str],
    *,
    command: str,
    vulnerable_func: list[str],
    timeout: float = 60.0,
    max_concurrency: int = 4,
    exit_rewards: Mapping[int, float | None] | None = None,
    timeout_reward: float | None = 0.0,
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
       shell-quoted (do not quote them again), the result split with `shlex.split` and run without a shell, in
       its own process group, stdin empty, at most `max_concurrency` commands at once. Other relative paths in
       the command resolve in that directory: give your own scripts by absolute path.
    4. The exit status maps to the reward through `exit_rewards` (default `{0: 1.0}`); a status it does not list
       gives 0.0. A command killed by signal N has status -N (-11 for SIGSEGV); a shell that reports a killed
       child exits with 128 + N instead. A value may be None: no score, for "could not judge" statuses.
    5. A command still running after `timeout` seconds is killed with its whole process group and gives
       `timeout_reward` (default 0.0). Processes the command left behind are killed when it exits, and the
       directory is always removed.

    Completions of one row that patch the function identically run once and share the reward. A command that
    cannot be started (no such program, not executable) is a configuration mistake: TTCError.
    """
    rewards_by_status = _check_command_config(command, timeout, max_concurrency, exit_rewards, timeout_reward)
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
    with ThreadPoolExecutor(max_workers=max_concurrency) as pool:
        statuses = list(pool.map(lambda job: _run_check(command, timeout, *job), jobs))
    for indices, status in zip(jobs.values(), statuses, strict=True):
        for i in indices:
            rewards[i] = timeout_reward if status is None else rewards_by_status.get(status, 0.0)
    return rewards


def _check_command_config(
    command: Any, timeout: Any, max_concurrency: Any, exit_rewards: Any, timeout_reward: Any
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


def _run_check(command: str, timeout: float, patched: str, language: Language, record: str) -> int | None:
    """Exit status of `command` on `patched` in a fresh directory; None when it timed out."""
    with tempfile.TemporaryDirectory(prefix="ttc-check-") as tmp, tempfile.TemporaryFile() as output:
        directory = Path(tmp)
        file = directory / f"func{_SUFFIX[language]}"
        file.write_text(patched, encoding="utf-8", errors="surrogatepass")
        (directory / "record.json").write_text(record, encoding="utf-8", errors="surrogatepass")
        paths = {"dir": shlex.quote(str(directory)), "file": shlex.quote(str(file))}
        argv = shlex.split(_PLACEHOLDER.sub(lambda m: paths[m.group(1)], command))
        try:
            process = subprocess.Popen(
                argv,
                cwd=directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise TTCError(
                f"command_reward: cannot run command {command!r}: {argv[0]}: {e.strerror or e}; give a program on "
                "PATH or an executable file by absolute path (relative ones resolve in the temporary directory)"
            ) from None
        try:
            status: int | None = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            # The group id outlives the command while any process in it lives, and is not handed out again
            # while in use: this reaches the command and what it left behind, nothing else.
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        if status != 0:
            output.seek(max(0, os.fstat(output.fileno()).st_size - _OUTPUT_TAIL))
            tail = output.read().decode(errors="replace")
            log.debug("command_reward: %s %s:\n%s", argv, "timed out" if status is None else f"exit {status}", tail)
        return status
