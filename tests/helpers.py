"""What more than one test file uses: paths and options, readers of a run's files, the PrimeVul lines tests write,
reward functions that runs name by their dotted path (`tests.helpers.<name>`), and `ttc fit` as a subprocess.

Test files import from here and from no other test file. Fixtures are in tests/conftest.py; a helper that one test
file uses stays in that file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

# --- paths and options ----------------------------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
DEMO = str(REPO / "configs" / "demo.yaml")
TINY = str(REPO / "tests" / "integration" / "tiny.yaml")  # the tiny model on the demo prompts, 4 prompts a step
DEMO_PROMPTS = REPO / "ttc_lightning" / "assets" / "demo_prompts.jsonl"
REAL_PRIMEVUL = REPO.parent / "shared" / "data" / "primevul-real"  # a real PrimeVul sample, where one is beside
# Checkpoints written by ttc 0.1's first layout (one `module.py`), 2 steps of TINY with beta 0.04, 8 new tokens,
# G = 2: with LoRA r 4, alpha 8 (adapters only), and full fine-tuning.
OLD_LORA = str(REPO / "tests" / "fixtures" / "layout-0.1-lora.ckpt")
OLD_FULL = str(REPO / "tests" / "fixtures" / "layout-0.1-full.ckpt")
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused at once
HELPERS = "tests.helpers"  # this module, as `--model.rewards` names the reward functions below

B, G = 4, 2  # prompts per step per rank (TINY's data.batch_size), completions per prompt (FAST)
FAST = ["--trainer.enable_progress_bar", "false", "--model.max_new_tokens", "8", "--model.num_generations", str(G)]


# --- a run's files --------------------------------------------------------------------------------------------------


def read_metrics(run_dir: Path, version: int = 0) -> list[dict[str, str]]:
    """The rows of a run's metrics.csv, each a dict of column -> text."""
    lines = (run_dir / "logs" / f"version_{version}" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]


def read_rollouts(path: Path) -> list[dict]:
    """The records of a rollouts.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def rollout_steps(path: Path) -> int:
    """Completed steps in a rollouts file of a run on TINY with FAST (B*G rows each; a partly written last line is
    ignored)."""
    return len(path.read_text().splitlines()) // (B * G) if path.exists() else 0


# --- prompts that tie, and the groups a step trained on -------------------------------------------------------------


def tied_prompts(directory: Path) -> Path:
    """The 16 demo prompts twice: as they are (`tie: false`) and as a second prompt (`tie: true`) whose completions
    a reward that reads the `tie` column (as `tie_or_first_char`) always scores the same, so its groups teach nothing.
    32 prompts, tie and not alternating."""
    rows = []
    for line in DEMO_PROMPTS.read_text().splitlines():
        row = json.loads(line)
        tied = {**row, "prompt": [{"role": "user", "content": "Say nothing. " + row["prompt"][0]["content"]}]}
        rows += [{**row, "tie": False}, {**tied, "tie": True}]
    path = directory / "tied_prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def tie_or_first_char(completions: list[str], tie: list[bool], **_) -> list[float]:
    """0.5 for a `tie` prompt's completions; else the first character's code, which almost any two differ in."""
    return [0.5 if t else (float(ord(text[0])) if text else 0.0) for text, t in zip(completions, tie, strict=True)]


def groups_by_step(records: list[dict]) -> dict[int, dict[int, list[dict]]]:
    """step -> prompt_index -> that group's records."""
    steps: dict[int, dict[int, list[dict]]] = {}
    for r in records:
        steps.setdefault(r["step"], {}).setdefault(r["prompt_index"], []).append(r)
    return steps


def assert_trained_groups_differ(records: list[dict], g: int, ties_marked: bool = True) -> int:
    """Every group a step trained on has task rewards (before the overlong penalty) that differ and, with
    `ties_marked` (a reward that reads the `tie` column of `tied_prompts`), is no tie prompt's; returns how many
    groups were dropped."""
    dropped = 0
    for step, groups in groups_by_step(records).items():
        for group in groups.values():
            assert len(group) == g and len({r["trained"] for r in group}) == 1, (step, group)
            rewards = [r["reward"] - r["rewards"].get("overlong_penalty", 0.0) for r in group]  # before the penalty
            if group[0]["trained"]:
                assert max(rewards) != min(rewards), (step, rewards)
                assert not ties_marked or "Say nothing." not in json.dumps(group[0]["prompt"]), step
            else:
                dropped += 1
    return dropped


def distinct_chars_reward(completions: list[str], **_) -> list[float]:
    """Differs between completions of a prompt, so advantages, gradients and the ranks' mean rewards differ, and
    every step moves the policy.

    Distinct characters, not length: at 8 new tokens the tiny model's completions often all have the same length.
    """
    return [float(len(set(c))) for c in completions]


# --- `ttc fit` as a subprocess --------------------------------------------------------------------------------------


def process_env(**extra: str) -> dict[str, str]:
    """This environment without a surrounding SLURM job's variables (they would make Lightning skip its launcher).

    One thread per process: the tiny model gains nothing from more, and on a busy machine two threads per process
    make each step many times slower.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def start_ttc(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`ttc fit` on TINY with FAST in tmp_path (run directory `run`), output to tmp_path/ttc.log."""
    command = [sys.executable, "-m", "ttc_lightning", "fit", "--config", TINY, "--trainer.default_root_dir", "run"]
    with (tmp_path / "ttc.log").open("w") as log:
        # A session of its own, so that cleanup can stop DDP's second process with the first.
        return subprocess.Popen(
            [*command, *FAST, *args],
            cwd=tmp_path,
            env=env or process_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(proc: subprocess.Popen, tmp_path: Path, timeout: float = 300) -> tuple[int, str]:
    """Wait for `proc` (killing its session if it hangs) -> (exit code, output)."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"ttc did not finish in {timeout} s:\n{(tmp_path / 'ttc.log').read_text()[-3000:]}")
    return proc.returncode, (tmp_path / "ttc.log").read_text()


def wait_for(
    proc: subprocess.Popen, tmp_path: Path, ready: Callable[[], bool], what: str, timeout: float = 300
) -> None:
    """Poll until `ready()`; fail with the output if ttc exits or the wait exceeds `timeout` (a hang guard)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            output = (tmp_path / "ttc.log").read_text()[-3000:]
            pytest.fail(f"ttc stopped (exit {proc.poll()}) before {what}:\n{output}")
        time.sleep(0.1)


def gone(pid: int, within: float = 5.0) -> bool:
    """Whether process `pid` has ended within `within` seconds (a zombie waiting for its reaper counts as ended)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        stat = Path(f"/proc/{pid}/stat")
        if stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return True
        time.sleep(0.05)
    return False


# --- processes a check leaves behind ----------------------------------------------------------------------------------


def pids_in(path: Path, count: int = 1, within: float = 5.0) -> list[int]:
    """The `count` process ids a check wrote to `path`, one a line, once it has written them all."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if path.exists() and len(lines := path.read_text().split()) >= count:
            return [int(pid) for pid in lines[:count]]
        time.sleep(0.02)
    raise AssertionError(f"the check wrote no {count} pids to {path}")


def assert_all_gone(pids: list[int]) -> None:
    """Every one of `pids` has ended; those that have not are killed (a failing test leaves nothing running)."""
    alive = [pid for pid in pids if not gone(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    assert alive == []


# A daemon started by a double fork, in a session of its own: it appends its pid to the file argv[1] and sleeps.
DOUBLE_FORK = """\
import os, sys, time
if os.fork():
    os._exit(0)
os.setsid()
if os.fork():
    os._exit(0)
with open(sys.argv[1], "a") as f:
    f.write(f"{os.getpid()}\\n")
time.sleep(300)
"""


# --- PrimeVul lines and patch answers -------------------------------------------------------------------------------


def v01(idx: int, target: int, func: str, commit: str = "c0ffee", **changes) -> dict:
    """A PrimeVul v0.1 line with the release's 15 fields."""
    from ttc_lightning.data.primevul import func_hash

    row = {
        "idx": idx,
        "project": "proj",
        "commit_id": commit,
        "project_url": "https://git.example.org/proj",
        "commit_url": f"https://git.example.org/proj/commit/{commit}",
        "commit_message": "fix it",
        "target": target,
        "func": func,
        "func_hash": func_hash(func),
        "file_name": "a.c",
        "file_hash": 7,
        "cwe": ["CWE-787"],
        "cve": "CVE-0000-0001",
        "cve_desc": "a bug",
        "nvd_url": "https://nvd.nist.gov/vuln/detail/CVE-0000-0001",
    }
    row.update(changes)
    return row


def pair(n: int, commit: str | None = None) -> list[dict]:
    """Vulnerable then fixed line of pair `n` (idx 10n+1, 10n+2)."""
    commit = commit or f"commit{n}"
    return [
        v01(10 * n + 1, 1, f"int f{n}(char *p) {{ p[9] = 0; }}", commit),
        v01(10 * n + 2, 0, f"int f{n}(char *p) {{ if (p) p[9] = 0; }}", commit),
    ]


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` as a .jsonl file at `path`."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def block(search: str, replace: str) -> str:
    """One search/replace block of a patch answer."""
    return f"<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE"


def fix_answer(vulnerable: str, fixed: str) -> str:
    """A well-formed patch answer whose edits turn `vulnerable` into `fixed`."""
    from ttc_lightning.rewards.patch import make_oracle_edits

    return f"<think>x</think><answer>\n{make_oracle_edits(vulnerable, fixed)}\n</answer>"


def oracle_on_scripted_patches(
    completions: list[str], *, vulnerable_func: list[str], fixed_func: list[str], **columns
) -> list[float | None]:
    """`oracle_reward` on patches written for the tiny model, which writes none: the real fix for the first
    completion of each group of 2 (G), the function with one space added (still vulnerable) for the second."""
    from ttc_lightning.rewards.oracle import oracle_reward

    answers = [
        fix_answer(v, f if i % G == 0 else v.replace("{", "{ ", 1))
        for i, (v, f) in enumerate(zip(vulnerable_func, fixed_func, strict=True))
    ]
    return oracle_reward(answers, vulnerable_func=vulnerable_func, **columns)


def _take_oracle_stats(**args) -> dict[str, float]:
    from ttc_lightning.rewards.oracle import take_stats

    return take_stats(**args)


oracle_on_scripted_patches.take_stats = _take_oracle_stats  # type: ignore[attr-defined]
