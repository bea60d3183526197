"""The one runner of untrusted checks (`command_reward`'s commands, the oracle's compiler and test cases): each
process contained, limited, its output capped, and killed with everything it started when it ends.

What it guarantees, per `run_contained` call:
- the process starts in a new session (its own process group) with an environment holding a fresh `TTC_CHECK_ID`
  that everything it starts inherits; when it exits, times out or is stopped, its process group is killed and so is
  every process of this user whose environment holds that id (what it started in a session of its own, or through
  a double fork; a process that drops the variable from its environment escapes this);
- resource limits, set by a `/bin/sh` that then execs the program (the same process; a `preexec_fn` would make
  Python fork the whole training process, page tables and all, for each check): CPU seconds (RLIMIT_CPU, SIGXCPU then
  SIGKILL a second later), file size (RLIMIT_FSIZE), address space (RLIMIT_AS; None for sanitized programs, whose
  shadow memory reserves terabytes of it: bound those through the sanitizer's own options), and processes
  (RLIMIT_NPROC counts all of the user's processes and threads: the limit is their count when the check starts plus
  `processes`; where the user namespace of a check without network counts its own processes only, as Linux 5.14 and
  later do, the limit is `processes`; set through util-linux's `prlimit`, not set where it is missing; root is never
  bound by it);
- no network where the machine lets an unprivileged user make a network namespace (`unshare -rn`: only a loopback
  interface, down); elsewhere the check has the machine's network;
- stdin empty; stdout and stderr read through a pipe of which only the last `OUTPUT_TAIL` bytes are kept in memory:
  however much it writes, nothing reaches a file;
- the wall-clock `timeout` and the caller's `stop` flag end it early.
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import resource
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ttc_lightning.errors import Terminated

log = logging.getLogger("ttc")
Job = TypeVar("Job")
Result = TypeVar("Result")

OUTPUT_TAIL = 4096  # bytes of a check's output kept (its last ones)
MARKER = "TTC_CHECK_ID"  # set to a fresh id in each check's environment, which every process it starts inherits
_SHELL = "/bin/sh"
# POSIX counts `ulimit -f` in blocks of 512 bytes and `ulimit -v` in KiB.
_LIMITS = 'ulimit -S -t {cpu} && ulimit -H -t {cpu_hard} && ulimit -f {blocks}{more} && exec "$@"'

# Checks running now, by id: their process, the stop flag of the call they belong to, and the directory to remove
# at exit.
_live: dict[str, tuple[subprocess.Popen, threading.Event, Path | None]] = {}
_live_lock = threading.Lock()


@dataclass(frozen=True)
class Limits:
    """What one process of a check may use."""

    cpu_seconds: float
    """CPU time of each process (RLIMIT_CPU, rounded up to whole seconds)."""
    file_size: int = 1 << 30
    """Bytes of any one file it writes (RLIMIT_FSIZE, whole 512-byte blocks)."""
    memory: int | None = 4 << 30
    """Bytes of address space (RLIMIT_AS); None: no limit (for sanitized programs)."""
    processes: int | None = 256
    """Processes it may add to the user's count at its start (RLIMIT_NPROC); None: no limit."""

    def shell(self) -> str:
        """The shell line that sets these limits, within this process's hard limits, and execs the check."""

        def within(wanted: int, kind: int) -> int:
            hard = resource.getrlimit(kind)[1]
            return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)

        cpu = within(math.ceil(self.cpu_seconds), resource.RLIMIT_CPU)
        cpu_hard = within(cpu + 1, resource.RLIMIT_CPU)
        blocks = within(self.file_size // 512 * 512, resource.RLIMIT_FSIZE) // 512
        more = ""
        if self.memory is not None:
            more += f" && ulimit -v {within(self.memory // 1024 * 1024, resource.RLIMIT_AS) // 1024}"
        return _LIMITS.format(cpu=cpu, cpu_hard=cpu_hard, blocks=blocks, more=more)

    def nproc(self) -> tuple[str, ...]:
        """The prefix that sets RLIMIT_NPROC (`/bin/sh` has no portable option for it: dash's `ulimit -p` is
        bash's pipe size), or nothing without a limit or without util-linux's `prlimit`."""
        prlimit = _program("prlimit")
        if self.processes is None or prlimit is None:
            return ()
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        count = self.processes if _counts_own_processes() else _user_tasks() + self.processes
        return (prlimit, f"--nproc={count if hard == resource.RLIM_INFINITY else min(count, hard)}", "--")


@dataclass(frozen=True)
class Finished:
    """How a contained process ended."""

    status: int | None
    """Exit status; -N when killed by signal N; None when it timed out or was stopped."""
    output: str
    """The last `OUTPUT_TAIL` bytes of its stdout and stderr, decoded with replacement."""
    seconds: float
    """Wall-clock seconds from its start to its end."""
    stopped: bool = False
    """The caller's `stop` flag ended it (or kept it from starting)."""


def run_contained(
    argv: list[str],
    cwd: Path,
    *,
    timeout: float,
    limits: Limits,
    stop: threading.Event | None = None,
    env: Mapping[str, str] | None = None,
    remove_at_exit: Path | None = None,
) -> Finished:
    """Run `argv` (its program a path, or a name on PATH) in `cwd`, contained as the module docstring says.

    `env` adds to this process's environment. `remove_at_exit`: a directory to remove if the program exits while
    the check still runs (on a daemon thread whose caller gave up on it). OSError when the shell cannot start.
    """
    stop = stop or threading.Event()
    check_id = uuid.uuid4().hex
    if stop.is_set():
        return Finished(None, "", 0.0, stopped=True)
    started = time.monotonic()
    process = subprocess.Popen(
        [*_no_network(), _SHELL, "-c", limits.shell(), "ttc-check", *limits.nproc(), *argv],
        cwd=cwd,
        env={**os.environ, **(env or {}), MARKER: check_id},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    with _live_lock:
        _live[check_id] = (process, stop, remove_at_exit)
        stopped = stop.is_set()  # set before this check was listed: `stop_checks` did not see it
    tail = _Tail(process.stdout)
    try:
        status: int | None = None if stopped else process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        status = None
    finally:
        with _live_lock:
            _live.pop(check_id, None)
        # The group id outlives the command while any process in it lives, and is not handed out again while in
        # use: this reaches the command and what it left behind in its group, nothing else.
        _kill_group(process.pid)
        kill_marked([check_id])
        process.wait()
    seconds = time.monotonic() - started
    stopped = stopped or (stop.is_set() and status in (None, -signal.SIGKILL))  # `stop_checks` kills it
    return Finished(None if stopped else status, tail.text(), seconds, stopped)


def run_parallel(work: Callable[[Job, threading.Event], Result], jobs: Sequence[Job], workers: int) -> list[Result]:
    """`work(job, stop)` for each job, `workers` at once on daemon threads (which never hold the program's exit);
    the results in order. An exception in the calling thread (Ctrl-C, SIGTERM) or in a job sets `stop`, kills the
    checks running under it (those `work` started with `run_contained(..., stop=stop)`) and starts no more jobs;
    the job's exception is raised."""
    results: list[Any] = [None] * len(jobs)
    failures: list[BaseException] = []
    stop = threading.Event()
    queue = iter(range(len(jobs)))
    queue_lock = threading.Lock()

    def worker() -> None:
        while not stop.is_set():
            with queue_lock:
                k = next(queue, None)
            if k is None:
                return
            try:
                results[k] = work(jobs[k], stop)
            except BaseException as e:
                failures.append(e)
                stop_checks(stop)
                return

    threads = [threading.Thread(target=worker, name="ttc-check", daemon=True) for _ in range(min(workers, len(jobs)))]
    with _sigterm_raises():
        _join(threads, stop)
    if failures:
        raise failures[0]
    return results


def _join(threads: list[threading.Thread], stop: threading.Event) -> None:
    """Start and join `threads`; on an exception in this thread, kill the checks under `stop` first."""
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    except BaseException:
        stop_checks(stop)
        deadline = time.monotonic() + 5.0  # the killed checks end at once; their threads remove the directories
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        raise


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """On the main thread of a program that leaves SIGTERM to its default (ending at once, no clean-up: `ttc oracle
    check`, the checks before a run starts), SIGTERM raises `Terminated` (exit status 143) instead for the time of
    the block, so that the checks it waits for are killed and their directories removed. Elsewhere (a reward's
    worker thread, a run that handles SIGTERM itself) nothing changes."""
    main = threading.current_thread() is threading.main_thread()
    if not main or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise Terminated()

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


@functools.cache
def _program(name: str) -> str | None:
    return shutil.which(name)


@functools.cache
def _no_network() -> tuple[str, ...]:
    """The prefix that runs a check in a network namespace of its own, or nothing where this user cannot make one
    (checked once per process)."""
    unshare = _program("unshare")
    ok = False
    if unshare is not None:
        try:
            ok = subprocess.run([unshare, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            ok = False
    if not ok:  # said once: a user running model-written code should know what it can reach
        why = "no unshare on PATH" if unshare is None else "`unshare -rn` is not allowed to this user here"
        log.warning("checks run with the machine's network (%s); every other limit holds", why)
    return (unshare, "-rn", "--") if ok else ()


@functools.cache
def _counts_own_processes() -> bool:
    """Whether RLIMIT_NPROC counts only the processes of a check's own user namespace (`_no_network`; Linux 5.14
    and later), not all of the user's: then adding the user's count to the limit would let a check start that many
    more. Checked once per process: a check limited to 2 processes can start one while this user has at least 3
    (this one, the check, its child) only if its namespace counts its own."""
    prlimit = _program("prlimit")
    if not _no_network() or prlimit is None:
        return False
    try:
        probe = [*_no_network(), prlimit, "--nproc=2", "--", _SHELL, "-c", "true & wait"]
        return subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class _Tail:
    """The last `OUTPUT_TAIL` bytes of a pipe, read to its end by a daemon thread: memory stays bounded however much
    a check writes, and the check never blocks on a full pipe."""

    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe
        self._data = bytearray()
        self._thread = threading.Thread(target=self._read, name="ttc-check-output", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        fd = self._pipe.fileno()
        while chunk := os.read(fd, 1 << 16):
            self._data += chunk
            if len(self._data) > 4 * OUTPUT_TAIL:
                del self._data[:-OUTPUT_TAIL]

    def text(self) -> str:
        """What was read, once every process holding the pipe ended (or after a second)."""
        self._thread.join(1.0)
        if not self._thread.is_alive():  # closing a pipe another thread still reads would hand its number on
            self._pipe.close()
        return bytes(self._data[-OUTPUT_TAIL:]).decode(errors="replace")


def stop_checks(stop: threading.Event) -> None:
    """Sets `stop` and kills the checks running now under that flag."""
    with _live_lock:
        stop.set()
        ids = [check_id for check_id, (_, flag, _) in _live.items() if flag is stop]
        for check_id in ids:
            _kill_group(_live[check_id][0].pid)
    kill_marked(ids)


@atexit.register
def _stop_all_checks() -> None:
    """At exit, the checks of calls left running on daemon threads (a reward call past its time limit, or one the
    main thread stopped waiting for on Ctrl-C or SIGTERM), and their directories, which those threads may not get to
    remove."""
    with _live_lock:
        flags = {id(flag): flag for _, flag, _ in _live.values()}
        directories = [directory for _, _, directory in _live.values() if directory is not None]
    for flag in flags.values():
        stop_checks(flag)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def kill_marked(check_ids: Collection[str]) -> None:
    """SIGKILL every process whose environment holds `TTC_CHECK_ID` set to one of `check_ids`, again until none is
    left (one may fork while it is being found)."""
    if not check_ids:
        return
    markers = [f"\0{MARKER}={check_id}\0".encode() for check_id in check_ids]
    for _ in range(50):
        found = False
        for pid in user_processes():
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
    log.debug("processes of check %s outlived 50 rounds of SIGKILL", ", ".join(check_ids))


def _user_tasks() -> int:
    """This user's processes and threads, this one's included: what RLIMIT_NPROC counts."""
    tasks = 0
    for pid in [os.getpid(), *user_processes()]:
        try:
            tasks += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue
    return tasks


def user_processes() -> list[int]:
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
