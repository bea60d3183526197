import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import pytest

from tests.helpers import DOUBLE_FORK, assert_all_gone, gone, pids_in
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.primevul import load_pairs
from ttc_lightning.data.tasks import patch_row
from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.command import command_reward
from ttc_lightning.rewards.patch import make_oracle_edits

V = "int f(int x)\n{\n  return x;\n}"
F = "int f(int x)\n{\n  return x & 1;\n}"


def fix(mask: int = 1) -> str:
    """A completion that turns `return x;` into `return x & mask;`."""
    edit = f"<<<<<<< SEARCH\n  return x;\n=======\n  return x & {mask};\n>>>>>>> REPLACE"
    return f"<think>\nmask it\n</think>\n<answer>\n{edit}\n</answer>"


def columns(n: int, **overrides: object) -> dict[str, list]:
    row = {"id": "7", "cve": "CVE-0000-0001", "vulnerable_func": V, "fixed_func": F, "file_name": "f.c"} | overrides
    return {name: [value] * n for name, value in row.items()}


def sh(tmp_path: Path, body: str, name: str = "check.sh") -> str:
    """The command running `body` as an sh script with the directory and the file as $1 and $2."""
    script = tmp_path / name
    script.write_text(body)
    return f"sh {script} {{dir}} {{file}}"


def test_exit_zero_passes_and_other_statuses_fail(tmp_path):
    # The script exits with the mask the patch wrote: 0 passes (1.0), 1 and 3 are unlisted (0.0).
    command = sh(tmp_path, 'exit "$(sed -n "s/.*x & \\([0-9]*\\);/\\1/p" "$2")"\n')
    texts = [fix(0), fix(1), fix(3)]
    assert command_reward(texts, command=command, **columns(3)) == [1.0, 0.0, 0.0]


def test_exit_rewards_map_statuses_and_may_give_no_score(tmp_path):
    command = sh(tmp_path, 'exit "$(sed -n "s/.*x & \\([0-9]*\\);/\\1/p" "$2")"\n')
    texts = [fix(0), fix(1), fix(77), fix(3)]
    rewards = {0: 1.0, 1: 0.25, "77": None}  # a JSON config writes keys as strings
    assert command_reward(texts, command=command, exit_rewards=rewards, **columns(4)) == [1.0, 0.25, None, 0.0]


def test_malformed_answers_give_minus_one_and_run_nothing(tmp_path):
    runs = tmp_path / "runs"
    command = sh(tmp_path, f"echo run >> {runs}\n")
    no_search = fix().replace("  return x;\n=", "  return y;\n=")  # SEARCH text not in the function
    texts = [fix(), "no answer", no_search]
    assert command_reward(texts, command=command, **columns(3)) == [1.0, -1.0, -1.0]
    assert runs.read_text() == "run\n"


def test_identical_patches_of_a_row_run_once(tmp_path):
    runs = tmp_path / "runs"
    command = sh(tmp_path, f"echo run >> {runs}\n")
    texts = [fix(1), fix(1), fix(2), fix(1)]
    assert command_reward(texts, command=command, **columns(4)) == [1.0] * 4
    assert runs.read_text() == "run\n" * 2


def test_the_command_sees_its_directory_file_and_record(tmp_path):
    seen = tmp_path / "seen.json"
    script = tmp_path / "check.py"
    script.write_text(
        "import json, os, sys\n"
        "directory, file = sys.argv[1:]\n"
        "record = json.load(open(os.path.join(directory, 'record.json')))\n"
        f"json.dump({{'cwd': os.getcwd(), 'argv': sys.argv[1:], 'func': open(file).read(), 'record': record,"
        f" 'listing': sorted(os.listdir(directory))}}, open({str(seen)!r}, 'w'))\n"
    )
    command = f"{sys.executable} {script} {{dir}} {{file}}"
    assert command_reward([fix()], command=command, **columns(1)) == [1.0]
    got = json.loads(seen.read_text())
    directory = Path(got["argv"][0])
    assert os.path.realpath(got["cwd"]) == os.path.realpath(directory) and got["argv"][1] == str(directory / "func.c")
    assert got["listing"] == ["func.c", "record.json"]
    assert got["func"] == F  # the patched function
    assert got["record"] == {
        "id": "7",
        "cve": "CVE-0000-0001",
        "vulnerable_func": V,
        "fixed_func": F,
        "file_name": "f.c",
    }
    assert not directory.exists()


@pytest.mark.parametrize(
    ("file_name", "func", "suffix"),
    [
        ("f.cc", V, ".cpp"),
        ("f.C", V, ".cpp"),
        ("f.c", V, ".c"),
        (None, V, ".c"),
        (None, "int A::f(int x)\n{\n  return x;\n}", ".cpp"),  # no name: only the C++ grammar parses it
    ],
)
def test_the_file_suffix_follows_the_language(tmp_path, file_name, func, suffix):
    seen = tmp_path / "seen"
    command = sh(tmp_path, f'basename "$2" > {seen}\n')
    assert command_reward([fix()], command=command, **columns(1, file_name=file_name, vulnerable_func=func)) == [1.0]
    assert seen.read_text() == f"func{suffix}\n"


def test_placeholders_are_quoted_and_other_braces_kept(tmp_path):
    script = tmp_path / "dir with space" / "check.sh"
    script.parent.mkdir()
    script.write_text('printf "%s|" "$@" > "$0.out"\n')
    command = f"sh '{script}' '{{x}}' {{file}} {{dir}}"
    assert command_reward([fix()], command=command, **columns(1)) == [1.0]
    braces, file, directory = Path(f"{script}.out").read_text().split("|")[:3]
    assert braces == "{x}" and file == f"{directory}/func.c"


def test_a_hanging_command_times_out_and_its_process_group_is_killed(tmp_path):
    pids = tmp_path / "pids"
    command = sh(tmp_path, f'echo "$1" > {tmp_path}/dir\nsleep 60 &\necho $$ $! > {pids}\nwait\n')
    started = time.monotonic()
    rewards = command_reward([fix()], command=command, timeout=1, timeout_reward=-0.5, **columns(1))
    assert rewards == [-0.5]
    assert time.monotonic() - started < 5
    shell, sleeper = map(int, pids.read_text().split())
    assert gone(shell) and gone(sleeper)
    assert not Path((tmp_path / "dir").read_text().strip()).exists()


def test_processes_left_behind_are_killed_when_the_command_exits(tmp_path):
    pids = tmp_path / "pids"
    command = sh(tmp_path, f"sleep 60 &\necho $! > {pids}\nexit 0\n")
    assert command_reward([fix()], command=command, **columns(1)) == [1.0]
    assert gone(int(pids.read_text()))


def test_a_command_killed_by_a_signal(tmp_path):
    command = sh(tmp_path, "kill -SEGV $$\nexit 0\n")
    assert command_reward([fix()], command=command, **columns(1)) == [0.0]  # status -11, not listed
    crashed = {0: 1.0, -11: -0.5}
    assert command_reward([fix()], command=command, exit_rewards=crashed, **columns(1)) == [-0.5]


def test_at_most_max_concurrency_commands_run_at_once(tmp_path):
    # Each run adds a file to `running`, writes how many it sees, holds for 0.3 s, then removes its file.
    running, counts = tmp_path / "running", tmp_path / "counts"
    running.mkdir()
    command = sh(tmp_path, f"touch {running}/$$\nls {running} | wc -l >> {counts}\nsleep 0.3\nrm {running}/$$\n")
    started = time.monotonic()
    assert command_reward([fix(k) for k in range(6)], command=command, max_concurrency=2, **columns(6)) == [1.0] * 6
    seen = [int(line) for line in counts.read_text().split()]
    assert len(seen) == 6 and max(seen) == 2
    assert time.monotonic() - started >= 3 * 0.3  # 6 runs of 0.3 s, 2 at a time


def test_a_missing_program_is_a_configuration_error(tmp_path):
    with pytest.raises(TTCError, match=r"cannot run command 'no-such-checker \{file\}': no-such-checker: No such file"):
        command_reward([fix()], command="no-such-checker {file}", **columns(1))


def test_a_program_that_is_not_executable_is_a_configuration_error(tmp_path):
    script = tmp_path / "check.sh"
    script.write_text("exit 0\n")
    with pytest.raises(TTCError, match="Permission denied"):
        command_reward([fix()], command=f"{script} {{file}}", **columns(1))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"command": ""}, "command must be a command line"),
        ({"command": "sh 'unclosed"}, "cannot be split into words"),
        ({"command": "true", "timeout": 0}, "timeout must be a number of seconds above 0"),
        ({"command": "true", "max_concurrency": 0}, "max_concurrency must be an integer of at least 1"),
        ({"command": "true", "max_concurrency": 2.0}, "max_concurrency must be an integer"),
        ({"command": "true", "exit_rewards": {"ok": 1.0}}, "exit_rewards key 'ok' is not an exit status"),
        ({"command": "true", "exit_rewards": {0: "high"}}, r"exit_rewards\[0\] must be a number or null"),
        ({"command": "true", "exit_rewards": [0, 1]}, "exit_rewards must map exit statuses to rewards"),
        ({"command": "true", "timeout_reward": "zero"}, "timeout_reward must be a number or null"),
        ({"command": "true", "max_cpu_seconds": 0}, "max_cpu_seconds must be a number of seconds above 0, or null"),
        ({"command": "true", "max_file_size": 100}, "max_file_size must be a number of bytes of at least 512"),
        ({"command": "true", "max_file_size": 1e9}, "max_file_size must be a number of bytes"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(TTCError, match=message):
        command_reward([fix()], **options, **columns(1))


def test_columns_need_one_value_per_completion():
    with pytest.raises(TTCError, match="got 2 completions but 1 vulnerable_func values"):
        command_reward([fix(), fix()], command="true", vulnerable_func=[V], file_name=["f.c", "f.c"])


def test_bound_once_with_partial(tmp_path):
    check = partial(command_reward, command=sh(tmp_path, "exit 1\n"), timeout=5, exit_rewards={1: 0.5})
    assert check([fix(), "no answer"], **columns(2)) == [0.5, -1.0]


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_gcc_checks_the_syntax_of_a_sample_function():
    # read_ident is the one function of the sample's pairs that compiles alone, given libc's headers.
    row = next(patch_row(p) for p in load_pairs(SAMPLE_DIR, "test") if "read_ident" in p.vulnerable.func)
    oracle = f"<think>...</think><answer>\n{make_oracle_edits(row['vulnerable_func'], row['fixed_func'])}\n</answer>"
    broken = oracle.replace("size - len - 1);", "size - len - 1;")
    assert broken != oracle
    compiles = partial(
        command_reward,
        command="gcc -fsyntax-only -x c -include errno.h -include string.h -include unistd.h {file}",
        timeout=30,
    )
    columns = {k: [v] * 3 for k, v in row.items() if k != "prompt"}
    assert compiles([oracle, broken, "<think>...</think><answer>add a check</answer>"], **columns) == [1.0, 0.0, -1.0]


# ---------------------------------------------------------------- containment: processes, output, resources


def escaping(tmp_path: Path, then: str) -> tuple[str, Path]:
    """A check that starts a `sleep 300` in a session of its own and a double-forked daemon, writes their ids to
    `pids`, then runs `then`."""
    pids = tmp_path / "pids"
    daemon = tmp_path / "daemon.py"
    daemon.write_text(DOUBLE_FORK)
    body = f"setsid sleep 300 &\necho $! >> {pids}\n{sys.executable} {daemon} {pids}\n{then}\n"
    return sh(tmp_path, body), pids


def test_processes_a_check_starts_in_new_sessions_are_killed_when_it_exits(tmp_path):
    command, pids = escaping(tmp_path, "exit 0")
    assert command_reward([fix()], command=command, **columns(1)) == [1.0]
    assert_all_gone(pids_in(pids, 2))


def test_processes_a_check_starts_in_new_sessions_are_killed_when_it_times_out(tmp_path):
    command, pids = escaping(tmp_path, "sleep 60")
    started = time.monotonic()
    assert command_reward([fix()], command=command, timeout=1, **columns(1)) == [0.0]
    assert time.monotonic() - started < 4
    assert_all_gone(pids_in(pids, 2))


def test_interrupting_the_call_kills_its_checks(tmp_path):
    # Ctrl-C (or SIGTERM, whose handler raises in this thread) while the calling thread waits for two checks.
    command, pids = escaping(tmp_path, "sleep 60")
    interrupted = []

    def interrupt() -> None:
        pids_in(pids, 4, within=30)  # both checks started what they start
        interrupted.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        command_reward([fix(1), fix(2), fix(3)], command=command, max_concurrency=2, **columns(3))
    assert time.monotonic() - interrupted[0] < 3
    assert_all_gone(pids_in(pids, 4))
    assert len(pids.read_text().split()) == 4  # the third check never started


EXIT_DURING_A_CHECK = """
import sys, threading, time
from pathlib import Path
from ttc_lightning.rewards.command import command_reward

command, pids, vulnerable, completion = sys.argv[1:]
check = threading.Thread(
    target=command_reward, args=([completion],), kwargs={"command": command, "vulnerable_func": [vulnerable]},
    daemon=True,  # as a reward call past its time limit, or one the main thread stopped waiting for
)
check.start()
while not Path(pids).exists() or len(Path(pids).read_text().split()) < 2:
    time.sleep(0.02)
sys.exit(143)
"""


def test_checks_still_running_when_the_program_exits_are_killed(tmp_path):
    command, pids = escaping(tmp_path, "sleep 60")
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", EXIT_DURING_A_CHECK, command, str(pids), V, fix()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 143, done.stderr
    assert time.monotonic() - started < 10  # not held by the check's 60 s
    assert_all_gone(pids_in(pids, 2))


def test_the_checks_output_is_never_written_to_a_file(tmp_path, caplog):
    # stdout is /dev/null (a pipe read by a thread when the debug log is on), never a temporary file.
    command = sh(tmp_path, "if [ -f /proc/$$/fd/1 ] || [ -f /proc/$$/fd/2 ]; then exit 3; fi\n")
    assert command_reward([fix()], command=command, **columns(1)) == [1.0]
    caplog.set_level(logging.DEBUG, logger="ttc")
    assert command_reward([fix()], command=command, **columns(1)) == [1.0]


def test_a_flood_of_output_keeps_only_its_tail(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="ttc")
    command = sh(tmp_path, "echo first\nyes\n")
    started = time.monotonic()
    assert command_reward([fix()], command=command, timeout=0.5, **columns(1)) == [0.0]
    assert time.monotonic() - started < 3
    [record] = [r for r in caplog.records if "timed out" in r.getMessage()]
    output = record.getMessage().split("timed out:\n", 1)[1]
    assert 0 < len(output) <= 4096 and set(output.split()) == {"y"}


def test_files_a_check_writes_are_limited_in_size(tmp_path):
    # head is stopped at 2048 bytes; the script exits with the size in KB that got written
    command = sh(tmp_path, 'head -c 5000 /dev/zero > big\nexit "$(( $(wc -c < big) / 1024 ))"\n')
    assert command_reward([fix()], command=command, max_file_size=2048, exit_rewards={2: 1.0}, **columns(1)) == [1.0]
    assert command_reward([fix()], command=command, exit_rewards={4: 1.0}, **columns(1)) == [1.0]  # 1 GiB default


def test_cpu_time_is_limited_per_process(tmp_path, caplog):
    command = sh(tmp_path, "while :; do :; done\n")
    started = time.monotonic()
    rewards = {-signal.SIGXCPU: 0.5}
    assert command_reward([fix()], command=command, timeout=20, max_cpu_seconds=0.5, exit_rewards=rewards,
                          **columns(1)) == [0.5]  # fmt: skip
    assert time.monotonic() - started < 10  # 1 s of CPU (rounded up), not the 20 s timeout
    assert "was killed by SIGXCPU (status -24): it went past max_cpu_seconds" in caplog.text


def test_the_function_and_the_row_reach_the_check_in_files_only(tmp_path):
    seen = tmp_path / "seen"
    command = sh(tmp_path, f"cat /proc/$$/cmdline /proc/$$/environ > {seen}\n")
    assert command_reward([fix(424242)], command=command, **columns(1, cve="CVE-4242-4242")) == [1.0]
    process = seen.read_bytes()
    assert b"424242" not in process and b"CVE-4242-4242" not in process and b"return x" not in process
    assert b"\0TTC_CHECK_ID=" in process
