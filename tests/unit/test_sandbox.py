"""`run_contained` and `run_parallel` (ttc_lightning.oracle.sandbox): each guarantee shown by a check that tries to
break it."""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import DOUBLE_FORK, REPO, assert_all_gone, gone, pids_in
from ttc_lightning.oracle import sandbox
from ttc_lightning.oracle.sandbox import MARKER, OUTPUT_TAIL, Finished, Limits, run_contained, run_parallel, stop_checks

ROOMY = Limits(cpu_seconds=30)  # limits no test below reaches but the one it is about


def sh(script: str) -> list[str]:
    return ["/bin/sh", "-c", script]


def run(argv: list[str], cwd: Path, timeout: float = 30.0, limits: Limits = ROOMY, **options) -> Finished:
    return run_contained(argv, cwd, timeout=timeout, limits=limits, **options)


def escaping(tmp_path: Path, then: str) -> tuple[list[str], Path]:
    """A check that starts a `sleep 300` in a session of its own (`setsid`) and a double-forked daemon, waits until
    both wrote their ids to `pids`, then runs `then`."""
    pids = tmp_path / "pids"
    daemon = tmp_path / "daemon.py"
    daemon.write_text(DOUBLE_FORK)
    p = shlex.quote(str(pids))
    script = (
        f"setsid sleep 300 &\necho $! >> {p}\n{shlex.quote(sys.executable)} {shlex.quote(str(daemon))} {p}\n"
        f'while [ "$(wc -l < {p})" -lt 2 ]; do sleep 0.01; done\n{then}\n'
    )
    return sh(script), pids


# ---------------------------------------------------------------- what a check starts dies with it


def test_processes_started_in_new_sessions_die_when_the_check_exits(tmp_path):
    argv, pids = escaping(tmp_path, "exit 0")
    finished = run(argv, tmp_path)
    assert finished.status == 0 and not finished.stopped
    assert_all_gone(pids_in(pids, 2))


def test_processes_started_in_new_sessions_die_when_the_check_times_out(tmp_path):
    argv, pids = escaping(tmp_path, "sleep 60")
    finished = run(argv, tmp_path, timeout=1.0)
    assert finished.status is None and not finished.stopped
    assert 1.0 <= finished.seconds < 5.0
    assert_all_gone(pids_in(pids, 2))


def test_without_the_marker_those_processes_outlive_the_check(tmp_path, monkeypatch):
    # What the two tests above rely on: killing the check's process group does not reach them.
    monkeypatch.setattr(sandbox, "kill_marked", lambda check_ids: None)
    argv, pids = escaping(tmp_path, "exit 0")
    assert run(argv, tmp_path).status == 0
    left = pids_in(pids, 2)
    try:
        assert [pid for pid in left if not gone(pid, within=0.5)] == left
    finally:
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    assert_all_gone(left)


def test_a_timeout_gives_no_status(tmp_path):
    started = time.monotonic()
    finished = run(["sleep", "60"], tmp_path, timeout=0.5)
    assert (finished.status, finished.stopped) == (None, False)
    assert 0.5 <= finished.seconds < 3.0 and time.monotonic() - started < 4.0


def test_stop_checks_kills_a_running_check(tmp_path):
    pids = tmp_path / "pids"
    stop = threading.Event()

    def stop_once_started() -> None:
        pids_in(pids, 2)
        stop_checks(stop)

    threading.Thread(target=stop_once_started, daemon=True).start()
    finished = run(sh(f"echo $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n"), tmp_path, stop=stop)
    assert (finished.status, finished.stopped) == (None, True)  # not -SIGKILL: the caller stopped it
    assert finished.seconds < 5.0
    assert_all_gone(pids_in(pids, 2))


def test_a_stop_set_before_the_start_runs_nothing(tmp_path):
    stop = threading.Event()
    stop.set()
    assert run(sh(f"touch {tmp_path}/ran"), tmp_path, stop=stop) == Finished(None, "", 0.0, stopped=True)
    assert not (tmp_path / "ran").exists()


# ---------------------------------------------------------------- resource limits


def test_cpu_time_is_limited(tmp_path):
    finished = run(sh("while :; do :; done"), tmp_path, timeout=30.0, limits=Limits(cpu_seconds=1))
    # SIGXCPU at 1 s of CPU, SIGKILL at 2 s; wall time is longer only as long as the machine is busy.
    assert finished.status in (-signal.SIGXCPU, -signal.SIGKILL)
    assert finished.seconds < 15.0


def test_file_size_is_limited(tmp_path):
    limits = Limits(cpu_seconds=30, file_size=1 << 20)
    finished = run(["dd", "if=/dev/zero", "of=big", "bs=1M", "count=10"], tmp_path, limits=limits)
    assert finished.status == -signal.SIGXFSZ  # dd's write past 1 MiB
    assert (tmp_path / "big").stat().st_size == 1 << 20  # 2048 blocks of 512 bytes, not 10 MiB
    assert max(path.stat().st_size for path in tmp_path.iterdir()) <= 1 << 20


def test_memory_is_limited(tmp_path):
    # 2 GiB of address space, mapped but never touched: the limit, not the machine, refuses it.
    program = [sys.executable, "-c", "import mmap; m = mmap.mmap(-1, 2 << 30); print('mapped', len(m))"]
    finished = run(program, tmp_path, limits=Limits(cpu_seconds=30, memory=256 << 20))
    assert finished.status == 1 and "Cannot allocate memory" in finished.output
    finished = run(program, tmp_path, limits=Limits(cpu_seconds=30, memory=4 << 30))
    assert finished.status == 0 and finished.output == f"mapped {2 << 30}\n"


FORK_BOMB = "for i in $(seq 500); do sleep 300 & echo $! >> pids; done"

# Runs the fork bomb as a check limited to 20 processes while this user has 100 more (the limit must not grow with
# them), then prints the check's status and output and the ids of the sleeps it started.
PROCESS_LIMIT = """
import json, shutil, subprocess, sys, tempfile
from pathlib import Path
from ttc_lightning.oracle.sandbox import Limits, run_contained

others = [subprocess.Popen(["sleep", "300"]) for _ in range(100)]
cwd = Path(tempfile.mkdtemp())
try:
    finished = run_contained(["/bin/sh", "-c", sys.argv[1]], cwd, timeout=60, limits=Limits(30, processes=20))
    pids = (cwd / "pids").read_text().split()
    print(json.dumps({"status": finished.status, "output": finished.output, "pids": pids}))
finally:
    for other in others:
        other.kill()
        other.wait()
    shutil.rmtree(cwd)
"""


def test_processes_are_limited():
    if shutil.which("prlimit") is None:
        pytest.skip("util-linux's prlimit is missing: checks run without a process limit")
    # RLIMIT_NPROC never binds root: as root, the check runs as nobody.
    user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.getuid() == 0 else []
    if user and shutil.which("setpriv") is None:
        pytest.skip("runs as root, whom RLIMIT_NPROC does not bind, and setpriv is missing to run it as nobody")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if user and subprocess.run([*user, sys.executable, "-c", "import ttc_lightning"], cwd="/", env=env).returncode:
        pytest.skip(f"runs as root, whom RLIMIT_NPROC does not bind, and nobody cannot import ttc from {REPO}")
    done = subprocess.run(
        [*user, sys.executable, "-c", PROCESS_LIMIT, FORK_BOMB],
        cwd="/",
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    pids = [int(pid) for pid in result["pids"]]
    assert_all_gone(pids)
    # 20 processes: the check's shell and at most 19 sleeps; the shell cannot fork the next one and gives up.
    assert 0 < len(pids) < 20, result
    assert result["status"] != 0 and "fork" in result["output"], result


# ---------------------------------------------------------------- output, network, environment


def test_a_flood_of_output_keeps_only_its_tail_in_memory(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    finished = run(sh("echo first; timeout 2 yes; echo last"), work)
    assert finished.status == 0 and 2.0 <= finished.seconds < 10.0
    assert len(finished.output) == OUTPUT_TAIL and finished.output.endswith("\nlast\n")
    assert set(finished.output[: -len("last\n")].split()) == {"y"}  # "first" is long gone
    assert list(work.iterdir()) == []


def test_checks_have_no_network(tmp_path):
    if subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode != 0:
        pytest.skip("`unshare -rn` is not allowed here: checks have the machine's network")
    connect = "import socket, sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5); print('ok')"
    with socket.create_server(("127.0.0.1", 0)) as server:
        program = [sys.executable, "-c", connect, str(server.getsockname()[1])]
        outside = subprocess.run(program, capture_output=True, text=True, timeout=30)
        assert (outside.returncode, outside.stdout) == (0, "ok\n")  # the server answers this machine's programs
        finished = run(program, tmp_path)
    assert finished.status == 1 and "ok" not in finished.output
    assert re.search(r"Network is unreachable|Connection refused", finished.output), finished.output


def test_checks_with_the_network_say_so_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_program", lambda name: None if name == "unshare" else shutil.which(name))
    sandbox._no_network.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="ttc"):
            for _ in range(2):
                assert run(sh("true"), tmp_path).status == 0
    finally:
        sandbox._no_network.cache_clear()
        sandbox._counts_own_processes.cache_clear()
    assert [r.getMessage() for r in caplog.records] == [
        "checks run with the machine's network (no unshare on PATH); every other limit holds"
    ]


def test_each_check_and_all_it_starts_carry_a_fresh_check_id(tmp_path):
    argv = sh(f'echo "${MARKER}"; sh -c \'echo "${MARKER}"\'')
    first, second = run(argv, tmp_path), run(argv, tmp_path)
    ids = first.output.split()
    assert len(ids) == 2 and ids[0] == ids[1] and re.fullmatch(r"[0-9a-f]{32}", ids[0])
    assert second.output.split()[0] != ids[0]
    assert MARKER not in os.environ


# ---------------------------------------------------------------- run_parallel


def test_run_parallel_runs_at_most_workers_at_once(tmp_path):
    lock = threading.Lock()
    running: list[int] = []
    peaks: list[int] = []

    def work(job: int, stop: threading.Event) -> tuple[int, int | None]:
        with lock:
            running.append(job)
            peaks.append(len(running))
        try:
            return job, run(["sleep", "0.3"], tmp_path, stop=stop).status
        finally:
            with lock:
                running.remove(job)

    started = time.monotonic()
    assert run_parallel(work, list(range(6)), workers=2) == [(k, 0) for k in range(6)]  # in order
    assert max(peaks) == 2
    assert time.monotonic() - started >= 3 * 0.3  # 6 jobs of 0.3 s, 2 at a time


def test_an_exception_in_one_job_stops_the_others(tmp_path):
    # Jobs 1 and 2 each start a check that writes its id and its child's, then waits; job 0 fails once both have.
    pids = tmp_path / "pids"

    def work(job: str, stop: threading.Event) -> Finished:
        if job == "fail":
            pids_in(pids, 4)
            raise ValueError("job 0 failed")
        return run(sh(f"echo $$ >> {pids}\nsleep 300 &\necho $! >> {pids}\nwait\n"), tmp_path, stop=stop)

    started = time.monotonic()
    with pytest.raises(ValueError, match="job 0 failed"):
        run_parallel(work, ["fail", "hold", "hold", "hold", "hold"], workers=3)
    assert time.monotonic() - started < 10.0
    assert_all_gone(pids_in(pids, 4))
    assert len(pids.read_text().split()) == 4  # jobs 3 and 4 never started
