"""`command_reward`: a shell command run on each patched function, its exit status the reward."""

from __future__ import annotations

import atexit
import errno
import json
import logging
import math
import numbers
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.patch import Language, apply_completion, file_language, source_language

log = logging.getLogger("ttc")


_SUFFIX: dict[Language, str] = {"c": ".c", "cpp": ".cpp"}
_PLACEHOLDER = re.compile(r"\{(dir|file)\}")
_OUTPUT_TAIL = 4096  # bytes of a failing command's output kept for the debug log (its last ones)
_MARKER = "TTC_CHECK_ID"  # set to a fresh id in each check's environment, which every process it starts inherits
# The check runs under /bin/sh, which sets its limits and then execs it: the same process, and the fast way to start
# one (a `preexec_fn` would make Python fork the whole training process, page tables and all, for each check).
# POSIX counts `ulimit -f` in blocks of 512 bytes.
_LIMITS = 'ulimit -S -t {cpu} && ulimit -H -t {cpu_hard} && ulimit -f {blocks} && exec "$@"'
_SHELL = "/bin/sh"

# Checks running now, by id: their process, the stop flag of the `command_reward` call they belong to, and their
# directory.
_live: dict[str, tuple[subprocess.Popen, threading.Event, Path]] = {}
_live_lock = threading.Lock()
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
       reading it (a `/bin/sh` sets the limits below, then execs it), in its own session, stdin empty, at most
       `max_concurrency` commands at once. Other relative paths in the command resolve in that directory: give
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
    whole 512-byte blocks; a write past it fails, or kills the writer with SIGXFSZ, status -25). The command's
    output (stdout and stderr) is discarded, but for its last 4 KB in the debug log when it fails; it is never
    written to a file.

    Completions of one row that patch the function identically run once and share the reward. A command that
    cannot be started (no such program, not executable) is a configuration mistake: TTCError.
    """
    rewards_by_status = _check_command_config(
        command, timeout, max_concurrency, exit_rewards, timeout_reward, max_cpu_seconds, max_file_size
    )
    limits = _limits(max_cpu_seconds or timeout, max_file_size)
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
    statuses = _run_checks(command, timeout, limits, list(jobs), max_concurrency)
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


def _limits(cpu_seconds: float, file_size: int) -> str:
    """The shell line that sets a check's resource limits, within the hard limits this process has, and execs it."""

    def within(wanted: int, kind: int) -> int:
        hard = resource.getrlimit(kind)[1]
        return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)

    cpu = within(math.ceil(cpu_seconds), resource.RLIMIT_CPU)
    cpu_hard = within(cpu + 1, resource.RLIMIT_CPU)  # SIGXCPU at the soft limit, SIGKILL a second later
    blocks = within(file_size // 512 * 512, resource.RLIMIT_FSIZE) // 512
    return _LIMITS.format(cpu=cpu, cpu_hard=cpu_hard, blocks=blocks)


def _run_checks(
    command: str, timeout: float, limits: str, jobs: list[tuple[str, Language, str]], concurrency: int
) -> list[int | None]:
    """`_run_check` on each job, `concurrency` at once on daemon threads (which never hold the program's exit);
    their statuses in order. An exception in the calling thread (Ctrl-C, SIGTERM) or in a check (TTCError) kills
    the checks of this call still running and starts no more."""
    statuses: list[int | None] = [None] * len(jobs)
    failures: list[BaseException] = []
    stop = threading.Event()
    queue = iter(range(len(jobs)))
    queue_lock = threading.Lock()

    def work() -> None:
        while not stop.is_set():
            with queue_lock:
                k = next(queue, None)
            if k is None:
                return
            try:
                statuses[k] = _run_check(command, timeout, limits, stop, *jobs[k])
            except BaseException as e:
                failures.append(e)
                _stop_checks(stop)
                return

    threads = [threading.Thread(target=work, name="ttc-check", daemon=True) for _ in range(min(concurrency, len(jobs)))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        _stop_checks(stop)
        deadline = time.monotonic() + 5.0  # the killed checks end at once; their threads remove the directories
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise
    if failures:
        raise failures[0]
    return statuses


def _run_check(
    command: str, timeout: float, limits: str, stop: threading.Event, patched: str, language: Language, record: str
) -> int | None:
    """Exit status of `command` on `patched` in a fresh directory; None when it timed out or `stop` was set."""
    check_id = uuid.uuid4().hex
    directory = Path(tempfile.mkdtemp(prefix="ttc-check-"))
    try:
        file = directory / f"func{_SUFFIX[language]}"
        file.write_text(patched, encoding="utf-8", errors="surrogatepass")
        (directory / "record.json").write_text(record, encoding="utf-8", errors="surrogatepass")
        paths = {"dir": shlex.quote(str(directory)), "file": shlex.quote(str(file))}
        argv = shlex.split(_PLACEHOLDER.sub(lambda m: paths[m.group(1)], command))
        program = _program(argv[0], directory, command)
        debug = log.isEnabledFor(logging.DEBUG)
        if stop.is_set():
            return None
        try:
            process = subprocess.Popen(
                [_SHELL, "-c", limits, "ttc-check", program, *argv[1:]],
                cwd=directory,
                env={**os.environ, _MARKER: check_id},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if debug else subprocess.DEVNULL,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except OSError as e:
            raise _cannot_run(command, _SHELL, e.strerror or str(e)) from None
        with _live_lock:
            _live[check_id] = (process, stop, directory)
            stopped = stop.is_set()  # set before this check was listed: `_stop_checks` did not see it
        tail = _Tail(process.stdout) if process.stdout is not None else None
        try:
            status: int | None = None if stopped else process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            with _live_lock:
                _live.pop(check_id, None)
            # The group id outlives the command while any process in it lives, and is not handed out again
            # while in use: this reaches the command and what it left behind in its group, nothing else.
            _kill_group(process.pid)
            _kill_marked([check_id])
            process.wait()
        output = tail.text() if tail is not None else ""
        _warn_on_limit(status, command)
        if status != 0 and debug:
            what = "timed out" if status is None else f"exit {status}"
            log.debug("command_reward: %s %s:\n%s", argv, what, output)
        return None if stopped else status
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


class _Tail:
    """The last `_OUTPUT_TAIL` bytes of a pipe, read to its end by a daemon thread: memory stays bounded however
    much a check writes, and the check never blocks on a full pipe."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._data = bytearray()
        self._thread = threading.Thread(target=self._read, name="ttc-check-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self._pipe.fileno()
        while chunk := os.read(fd, 1 << 16):
            self._data += chunk
            if len(self._data) > 4 * _OUTPUT_TAIL:
                del self._data[:-_OUTPUT_TAIL]

    def text(self) -> str:
        """What was read, once every process holding the pipe ended (or after a second)."""
        self._thread.join(1.0)
        if not self._thread.is_alive():  # closing a pipe another thread still reads would hand its number on
            self._pipe.close()
        return bytes(self._data[-_OUTPUT_TAIL:]).decode(errors="replace")


def _stop_checks(stop: threading.Event) -> None:
    """Sets `stop` and kills the checks of its call that are running now."""
    with _live_lock:
        stop.set()
        ids = [check_id for check_id, (_, flag, _) in _live.items() if flag is stop]
        for check_id in ids:
            _kill_group(_live[check_id][0].pid)
    _kill_marked(ids)


@atexit.register
def _stop_all_checks() -> None:
    """At exit, the checks of calls left running on daemon threads (a reward call past its time limit, or one the
    main thread stopped waiting for on Ctrl-C or SIGTERM), and their directories, which those threads may not get
    to remove."""
    with _live_lock:
        flags = {id(flag): flag for _, flag, _ in _live.values()}
        directories = [directory for _, _, directory in _live.values()]
    for flag in flags.values():
        _stop_checks(flag)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_marked(check_ids: Collection[str]) -> None:
    """SIGKILL every process whose environment holds `TTC_CHECK_ID` set to one of `check_ids`, again until none is
    left (one may fork while it is being found)."""
    if not check_ids:
        return
    markers = [f"\0{_MARKER}={check_id}\0".encode() for check_id in check_ids]
    for _ in range(50):
        found = False
        for pid in _processes():
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    environment = b"\0" + f.read()
            except OSError:  # gone, or not ours to read
                continue
            if any(marker in environment for marker in markers):
                found = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if not found:
            return
        time.sleep(0.005)  # a killed process keeps its environment until it has died
    log.debug("command_reward: processes of check %s outlived 50 rounds of SIGKILL", ", ".join(check_ids))


def _processes() -> list[int]:
    """Ids of the processes of this user (all, for root), but this one."""
    me, uid = os.getpid(), os.getuid()
    pids = []
    try:
        entries = list(os.scandir("/proc"))
    except OSError:  # no /proc: only the process group is reached
        return []
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            if uid == 0 or entry.stat(follow_symlinks=False).st_uid == uid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids
