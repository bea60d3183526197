"""Fault injection, end to end: bad data files, bad configs, rewards that make the loss non-finite, damaged and
mismatched checkpoints, two runs in one directory, signals and kill -9.

Every failing case asserts the exit status, the one-line `ttc: error:` message (no traceback), and that no file an
earlier run left (checkpoints, logs) changed. Runs happen in this process on the tiny model (`run_ttc`); only
signals and kill -9 start `ttc` as a subprocess.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.helpers import (
    DEMO,
    DEMO_PROMPTS,
    FAST,
    OLD_FULL,
    OLD_LORA,
    TINY,
    finish,
    gone,
    pair,
    process_env,
    read_metrics,
    read_rollouts,
    rollout_steps,
    start_ttc,
    v01,
    wait_for,
    write,
)
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.model.tiny import save_tiny
from ttc_lightning.rewards import command_reward
from ttc_lightning.run.cli import main
from ttc_lightning.run.directory import LOCK_FILE

# Each case runs the tiny model end to end (about a second each): the fast subset leaves the suite out.
pytestmark = pytest.mark.slow

HERE = "tests.integration.test_faults"
LORA = ["--model.lora", "{r: 4, alpha: 8}"]
KINDS = {"lora": LORA, "full": []}


# --- rewards and callbacks that inject faults ----------------------------------------------------------------------

_calls = {"n": 0}


def huge_reward(completions: list[str], **_) -> list[float]:
    """A finite reward whose group mean overflows float32 (3e38 + 3e38 = inf): the advantages and the loss are NaN."""
    return [3e38 for _ in completions]


def huge_once_reward(completions: list[str], **_) -> list[float]:
    """`huge_reward` on the first call (step 0) only; distinct characters otherwise."""
    _calls["n"] += 1
    return [3e38 if _calls["n"] == 1 else float(len(set(c))) for c in completions]


def failing_a_reward(completions: list[str], **_) -> list[float]:
    """The share of "a"; raises on its third call (step 2's rewards, after step 2 sampled) when TTC_TEST_FAIL is set."""
    _calls["n"] += 1
    if os.environ.get("TTC_TEST_FAIL") and _calls["n"] == 3:
        raise RuntimeError("the reward service went away")
    return [c.count("a") / max(len(c), 1) for c in completions]


def exiting_reward(completions: list[str], **_) -> list[float]:
    """Distinct characters; its third call (step 2's rewards) calls sys.exit(TTC_TEST_EXIT), as a library under a
    reward may."""
    _calls["n"] += 1
    if _calls["n"] == 3:
        sys.exit(int(os.environ["TTC_TEST_EXIT"]))
    return [float(len(set(c))) for c in completions]


class RewardsOwnStop(BaseException):
    """A BaseException of a reward's own: neither an Exception nor one of Python's ways to stop."""


def base_exception_reward(completions: list[str], **_) -> list[float]:
    raise RewardsOwnStop("the reward's own stop\nover two lines")


def tied_reward(completions: list[str], **_) -> list[float]:
    """The same score for every completion: no group has an advantage to learn from."""
    return [0.5 for _ in completions]


def thread_leaving_reward(completions: list[str], **_) -> list[float]:
    """Distinct characters; its first call starts a thread that is no daemon and never ends, as a reward's own pool
    of workers (or a library's) may."""
    _calls["n"] += 1
    if _calls["n"] == 1:
        threading.Thread(target=threading.Event().wait, name="reward-worker").start()
    return [float(len(set(c))) for c in completions]


def sleeping_reward(completions: list[str], **_) -> list[float]:
    """Distinct characters at steps 0 and 1; at step 2 it creates the file TTC_TEST_SLEEPING names and sleeps 300 s."""
    _calls["n"] += 1
    if _calls["n"] == 3:
        Path(os.environ["TTC_TEST_SLEEPING"]).touch()
        time.sleep(300)
    return [float(len(set(c))) for c in completions]


def swallowing_reward(completions: list[str], **_) -> list[float]:
    """As `sleeping_reward`, but its sleep at step 2 swallows every exception, the one that stops the run included
    (a retry loop with a bare `except:`)."""
    _calls["n"] += 1
    if _calls["n"] == 3:
        Path(os.environ["TTC_TEST_SLEEPING"]).touch()
        while True:
            try:
                time.sleep(300)
            except BaseException:  # noqa: BLE001, S110
                pass
    return [float(len(set(c))) for c in completions]


def checking_reward(completions: list[str], **_) -> list[float | None]:
    """As `sleeping_reward`, but at step 2 a `command_reward` check sleeps 300 s, after it started another `sleep`
    in a session of its own; it writes both ids to the file TTC_TEST_SLEEPING names."""
    _calls["n"] += 1
    if _calls["n"] != 3:
        return [float(len(set(c))) for c in completions]
    sleeping = os.environ["TTC_TEST_SLEEPING"]
    script = f"setsid sleep 300 & echo $$ $! > {sleeping}.part && mv {sleeping}.part {sleeping} && exec sleep 300"
    edit = "<<<<<<< SEARCH\n  return x;\n=======\n  return x & 1;\n>>>>>>> REPLACE"
    patch = f"<think>\nmask\n</think>\n<answer>\n{edit}\n</answer>"
    vulnerable = "int f(int x)\n{\n  return x;\n}"
    return command_reward(
        [patch] * len(completions),
        command=f"sh -c {shlex.quote(script)}",
        vulnerable_func=[vulnerable] * len(completions),
        timeout=300,
    )


class PoisonWeights(L.Callback):
    """Writes NaN (or inf) into a trainable weight once training reaches step `at`, as a diverging step would."""

    def __init__(self, at: int = 3, value: str = "nan") -> None:
        self.at, self.value = at, float(value)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = self.value


class ExitAt(L.Callback):
    """Calls sys.exit(0) once training reaches step `at`, as a library under a callback or a data module may."""

    def __init__(self, at: int = 2) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.global_step == self.at:
            sys.exit(0)


# --- helpers ------------------------------------------------------------------------------------------------------


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the fit lock (it holds the pid of the last fit)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != LOCK_FILE
    }


def assert_kept(before: dict[str, str], root: Path) -> None:
    """Every file that existed before is still there, byte for byte."""
    after = hashes(root)
    assert [name for name, digest in before.items() if after.get(name) != digest] == []


def assert_one_line_error(code: int, err: str, *fragments: str, status: int = 1) -> str:
    assert code == status, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("ttc: error: ")]
    assert len(lines) == 1, err[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def checkpoint_names(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _ttc(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None), f"ttc {' '.join(args)} exited {e.code}"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Once per module: a LoRA (r 4, alpha 8) and a full fine-tuning run of 2 steps with a checkpoint every step, and
    two other base models (other weights; other shapes)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["ttc"])
        for kind, extra in KINDS.items():
            run = ["--trainer.default_root_dir", str(root / kind), "--checkpoint.every_n_train_steps", "1"]
            _ttc("fit", "--config", TINY, *FAST, "--trainer.max_steps", "2", *run, *extra)
    save_tiny(root / "other-weights", seed=1)
    save_tiny(root / "other-shape", hidden_size=96)
    return root


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    """A copy of the trained LoRA run as tmp_path/run."""
    return Path(shutil.copytree(trained / "lora", tmp_path / "run"))


def run_args(run: Path, *extra: str) -> list[str]:
    return ["--config", TINY, *FAST, "--trainer.default_root_dir", str(run), *extra]


@pytest.fixture
def val(tmp_path: Path) -> list[str]:
    path = tmp_path / "val.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    return ["--data.val_path", str(path)]


# --- damaged checkpoints ----------------------------------------------------------------------------------------

DAMAGE = {
    "empty": lambda data: b"",
    "header-only": lambda data: data[:100],
    "half": lambda data: data[: len(data) // 2],
    "tail-cut": lambda data: data[:-100],
    "zeros": lambda data: bytes(len(data)),
    "text": lambda data: b"this is not a checkpoint\n",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_damaged_checkpoint_is_a_one_line_error(run_ttc, run, tmp_path, val, damage, subcommand):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(DAMAGE[damage]((run / "checkpoints" / "last.ckpt").read_bytes()))
    before = hashes(run)
    code, _, err = run_ttc(subcommand, *run_args(run, *LORA, *val, "--trainer.max_steps", "5"), "--ckpt_path", str(bad))
    message = {"empty": "is empty", "zeros": "is not a PyTorch checkpoint", "text": "is not a PyTorch checkpoint"}.get(
        damage, "cannot be read, it is truncated or corrupt"
    )
    assert_one_line_error(code, err, f"--ckpt_path: {bad} {message}")
    assert_kept(before, run)


def test_damaged_last_checkpoint_names_it_and_keeps_the_others(run_ttc, run):
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:5000])
    before = hashes(run)
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "5"), "--ckpt_path", "last")
    assert_one_line_error(code, err, f"{last} cannot be read", "use another checkpoint of the run")
    assert_kept(before, run)


@pytest.mark.parametrize("what", ["missing", "directory", "foreign"])
def test_checkpoint_path_that_is_no_ttc_checkpoint(run_ttc, run, tmp_path, val, what):
    path = {"missing": tmp_path / "nope.ckpt", "directory": tmp_path, "foreign": tmp_path / "other.ckpt"}[what]
    if what == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    message = {
        "missing": "does not exist",
        "directory": "is a directory; give a checkpoint file",
        "foreign": "is not a ttc checkpoint",
    }
    code, _, err = run_ttc("validate", *run_args(run, *LORA, *val), "--ckpt_path", str(path))
    assert_one_line_error(code, err, f"--ckpt_path: {path}", message[what])


@pytest.mark.parametrize("value", ["last", "best"])
@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluation_without_a_checkpoint_is_refused(run_ttc, tmp_path, val, subcommand, value):
    test = ["--data.test_path", val[1]]
    code, _, err = run_ttc(subcommand, *run_args(tmp_path / "empty", *val, *test), "--ckpt_path", value)
    assert_one_line_error(code, err, f"--ckpt_path {value}:", f"leave --ckpt_path out to {subcommand} the base model")
    assert not (tmp_path / "empty" / "logs").exists()  # nothing was scored


def test_best_resolves_to_the_runs_best_ckpt(run_ttc, run, val):
    best = run / "checkpoints" / "best.ckpt"
    shutil.copy(run / "checkpoints" / "step=1.ckpt", best)
    code, _, err = run_ttc("validate", *run_args(run, *LORA, *val), "--ckpt_path", "best")
    assert code == 0, err
    assert f"ttc: checkpoint {best} (step 1), from --ckpt_path best" in err
    assert json.loads((run / "logs" / "version_1" / "metrics.json").read_text())["ckpt_path"] == str(best)


def test_last_takes_the_newest_and_says_which(run_ttc, run, val):
    interrupted = run / "checkpoints" / "last-interrupted.ckpt"
    shutil.copy(run / "checkpoints" / "step=1.ckpt", interrupted)
    os.utime(run / "checkpoints" / "last.ckpt", (1_000_000, 1_000_000))
    code, _, err = run_ttc("validate", *run_args(run, *LORA, *val), "--ckpt_path", "last")
    assert code == 0, err
    assert f"ttc: checkpoint {interrupted} (step 1), from --ckpt_path last" in err


def test_the_command_line_is_not_overridden_by_the_checkpoints_settings(run_ttc, run, val):
    # the checkpoint was trained with eval_num_samples 1; its hyperparameters must not replace the command line's
    sampling = ["--model.eval_num_samples", "2", "--model.eval_temperature", "0.7"]
    ckpt = str(run / "checkpoints" / "last.ckpt")
    code, _, err = run_ttc("validate", *run_args(run, *LORA, *val, *sampling), "--ckpt_path", ckpt)
    assert code == 0, err
    assert json.loads((run / "logs" / "version_1" / "metrics.json").read_text())["eval_num_samples"] == 2


# --- checkpoints of another model, LoRA or task -------------------------------------------------------------------

MISMATCH = {
    "lora-rank": ("lora", ["--model.lora", "{r: 8, alpha: 8}"], "model.lora.r: the checkpoint's adapters were trained"),
    "lora-targets": (
        "lora",
        ["--model.lora", "{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}"],
        "model.lora.target_modules:",
    ),
    "lora-alpha": ("lora", ["--model.lora", "{r: 4, alpha: 16}"], "was trained with model.lora alpha=8 (now 16)"),
    "lora-into-full": ("lora", [], "the checkpoint was trained with LoRA but model.lora is null"),
    "full-into-lora": ("full", LORA, "the checkpoint was trained without LoRA but model.lora is set"),
    "other-weights": ("lora", [*LORA, "--model.model_name_or_path", "other-weights"], "its weights differ"),
    "other-shape": ("full", ["--model.model_name_or_path", "other-shape"], "its architecture differs"),
    "other-task": ("lora", [*LORA, "--data.class_path", "ttc_lightning.data.PrimeVulPatchDataModule"], "on task"),
}


# Every case on resuming; evaluation goes through the same check, so three of them are enough there.
MISMATCH_CASES = [(case, "fit") for case in MISMATCH] + [
    (case, "validate") for case in ("lora-rank", "other-weights", "other-task")
]


@pytest.mark.parametrize(("case", "subcommand"), MISMATCH_CASES)
def test_checkpoint_of_another_setup_is_refused(run_ttc, trained, tmp_path, val, case, subcommand):
    kind, settings, message = MISMATCH[case]
    run = Path(shutil.copytree(trained / kind, tmp_path / "run"))
    settings = [str(trained / s) if s.startswith("other-") else s for s in settings]
    if subcommand == "validate" and case == "other-task":
        settings += ["--data.val_split", "valid"]
    before = hashes(run)
    evaluate = val if subcommand == "validate" and case != "other-task" else []
    args = run_args(run, *settings, *evaluate, "--trainer.max_steps", "5", "--ckpt_path", "last")
    code, _, err = run_ttc(subcommand, *args)
    assert_one_line_error(code, err, message)
    assert_kept(before, run)
    assert checkpoint_names(run) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]


def test_mismatch_can_be_allowed_explicitly(run_ttc, run):
    allow = ["--model.lora", "{r: 4, alpha: 16}", "--model.allow_checkpoint_mismatch", "true"]
    code, _, err = run_ttc("fit", *run_args(run, *allow, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    assert code == 0, err
    assert "ttc: warning: --ckpt_path: the checkpoint was trained with model.lora alpha=8 (now 16)" in err


def test_resuming_on_other_training_data_is_refused_unless_allowed(run_ttc, run, tmp_path, val):
    # The run trained on the demo prompts: the same prompts in another file are the same data, an edited copy is not.
    same, other = tmp_path / "same.jsonl", tmp_path / "other.jsonl"
    shutil.copy(DEMO_PROMPTS, same)
    other.write_text(DEMO_PROMPTS.read_text().replace("buffer", "string"))
    before = hashes(run)
    resume = ["--trainer.max_steps", "3", "--ckpt_path", "last"]
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--data.train_path", str(other), *resume))
    assert_one_line_error(
        code,
        err,
        f"the checkpoint was trained on other data: {DEMO_PROMPTS} (sha256 ",
        f"and this run's data.train_path read {other} (sha256 ",
        "--model.allow_checkpoint_mismatch true",
    )
    assert_kept(before, run)
    code, _, err = run_ttc(
        "validate", *run_args(run, *LORA, "--data.train_path", str(other), *val, "--ckpt_path", "last")
    )
    assert code == 0, err  # an evaluation reads no training data: nothing to compare
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--data.train_path", str(same), *resume))
    assert code == 0, err
    allow = ["--model.allow_checkpoint_mismatch", "true", "--trainer.max_steps", "4", "--ckpt_path", "last"]
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--data.train_path", str(other), *allow))
    assert code == 0, err
    assert f"ttc: warning: --ckpt_path: the checkpoint was trained on other data: {same} (sha256" in err


def test_resuming_on_a_changed_primevul_split_names_the_data_options(run_ttc, tmp_path):
    data = Path(shutil.copytree(SAMPLE_DIR, tmp_path / "data"))
    args = ["--config", DEMO, *FAST, "--trainer.default_root_dir", str(tmp_path / "run"), "--data.data_path", str(data)]
    assert run_ttc("fit", *args, "--trainer.max_steps", "1")[0] == 0
    train = data / "primevul_train_paired.jsonl"
    lines = train.read_text().splitlines(keepends=True)
    train.write_text("".join(lines[2:] + lines[:2]))  # the same pairs in another order: other rows at each position
    code, _, err = run_ttc("fit", *args, "--trainer.max_steps", "2", "--ckpt_path", "last")
    assert_one_line_error(
        code,
        err,
        f"the checkpoint was trained on {train} (sha256 ",
        "which has changed since (data.data_path / data.train_split: sha256 ",
        "--model.allow_checkpoint_mismatch true",
    )


@pytest.mark.parametrize(("ckpt", "lora"), [(OLD_LORA, LORA), (OLD_FULL, [])], ids=["lora", "full"])
def test_checkpoint_without_fingerprint_loads_with_a_warning(run_ttc, tmp_path, val, ckpt, lora):
    args = run_args(tmp_path / "run", "--model.beta", "0.04", *lora, *val)
    code, _, err = run_ttc("validate", *args, "--ckpt_path", ckpt)
    assert code == 0, err
    assert "ttc: warning: the checkpoint records no fingerprint of its base model (tiny; written by an earlier" in err


# --- two runs, one directory --------------------------------------------------------------------------------------


def test_second_new_run_in_a_run_directory_is_refused(run_ttc, run):
    before = hashes(run)
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "2"))
    assert_one_line_error(code, err, f"{run} already holds a run (3 checkpoints", "--ckpt_path last", "--overwrite")
    assert_kept(before, run)
    assert not (run / "logs" / "version_1").exists()


def test_overwrite_starts_over_and_keeps_the_earlier_logs(run_ttc, run):
    logs = hashes(run / "logs")
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "1", "--overwrite"))
    assert code == 0, err
    assert "ttc: warning: --overwrite: deleted 3 checkpoints of the earlier run" in err
    assert checkpoint_names(run) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 1
    assert_kept(logs, run / "logs")


@pytest.mark.parametrize("data", ["missing", "bad-file"])
def test_overwrite_refused_before_it_starts_keeps_the_earlier_run(run_ttc, run, tmp_path, data):
    """A run that --overwrite would start but that fails before training (a data path that does not exist, found by
    the checks before the model loads; a data file that is read when the run sets up) deletes nothing."""
    before = hashes(run)
    if data == "missing":
        bad, message = ["--data.train_path", str(tmp_path / "nonexistent.jsonl")], "nonexistent.jsonl is not a file"
    else:
        (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prom')
        bad, message = ["--data.train_path", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: malformed JSON"
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "1", "--overwrite", *bad))
    assert_one_line_error(code, err, message)
    assert "deleted" not in err
    assert_kept(before, run)


def test_a_new_run_refused_while_it_is_built_leaves_no_directory(run_ttc, tmp_path):
    """A value only the data module checks (found after the run directory was claimed) leaves no run directory with
    nothing in it but a lock file."""
    new = tmp_path / "runs" / "new"
    code, _, err = run_ttc("fit", *run_args(new, "--data.batch_size", "0"))
    assert_one_line_error(code, err, "data.batch_size and data.val_batch_size must be >= 1")
    assert not (tmp_path / "runs").exists()


def test_overwrite_with_resume_is_refused(run_ttc, run):
    before = hashes(run)
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--overwrite", "--ckpt_path", "last"))
    assert_one_line_error(code, err, "--overwrite starts the run over and --ckpt_path resumes it")
    assert_kept(before, run)


@pytest.mark.parametrize("resume", [False, True], ids=["new", "resume"])
def test_a_run_directory_in_use_is_refused(run_ttc, run, resume):
    before = hashes(run)
    with (run / LOCK_FILE).open("a+") as held:
        held.truncate(0)
        held.write("31337\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a `ttc fit` running there
        extra = ["--ckpt_path", "last"] if resume else []
        code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "4", *extra))
    assert_one_line_error(code, err, f"{run} is in use by another `ttc fit` (process 31337)")
    assert_kept(before, run)


def test_a_directory_in_use_before_its_first_checkpoint_is_refused_in_one_line(run_ttc, tmp_path):
    run = tmp_path / "new"
    run.mkdir()
    with (run / LOCK_FILE).open("a+") as held:
        held.write("31337\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fit that has not saved yet
        code, _, err = run_ttc("fit", *run_args(run, "--ckpt_path", "last"))
    assert_one_line_error(code, err, f"{run} is in use by another `ttc fit` (process 31337)")
    assert "starting a new run" not in err  # nothing started


def test_resuming_a_finished_run_says_how_to_continue(run_ttc, run):
    before = hashes(run)
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "2", "--ckpt_path", "last"))
    assert_one_line_error(code, err, "is already at max_steps 2 (step 2); raise --trainer.max_steps to continue")
    assert_kept(before, run)
    assert not (run / "logs" / "version_1").exists()  # no empty log version


def test_last_in_a_new_directory_starts_a_new_run(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", *run_args(tmp_path / "new", "--trainer.max_steps", "1", "--ckpt_path", "last"))
    assert code == 0, err
    assert "ttc: --ckpt_path last: no checkpoint in" in err and "starting a new run" in err
    assert checkpoint_names(tmp_path / "new") == ["last.ckpt"]


def test_checkpointing_off_is_honoured_and_touches_no_checkpoint(run_ttc, run):
    before = hashes(run)
    code, _, err = run_ttc(
        "fit", *run_args(run, *LORA, "--trainer.max_steps", "1", "--trainer.enable_checkpointing", "false")
    )
    assert code == 0, err
    assert_kept(before, run)
    assert checkpoint_names(run) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]
    assert "last checkpoint: none" in err


def test_a_killed_saves_leftover_is_cleared_and_never_resumed(run_ttc, run):
    partial = run / "checkpoints" / ".last.ckpt.4242.partial"
    partial.write_bytes(b"half a checkpoint")
    code, _, err = run_ttc("fit", *run_args(run, *LORA, "--trainer.max_steps", "3", "--ckpt_path", "last"))
    assert code == 0, err
    assert "ttc: checkpoint" in err and "last.ckpt (step 2), from --ckpt_path last" in err
    assert not partial.exists()


@pytest.mark.slow
def test_checkpoints_directory_holds_what_the_readme_says(run_ttc, tmp_path):
    # last.ckpt plus the newest checkpoint.save_top_k (3) periodic ones
    args = run_args(tmp_path / "run", "--trainer.max_steps", "4", "--checkpoint.every_n_train_steps", "1")
    code, _, err = run_ttc("fit", *args)
    assert code == 0, err
    assert checkpoint_names(tmp_path / "run") == ["last.ckpt", "step=2.ckpt", "step=3.ckpt", "step=4.ckpt"]


def test_a_full_disk_is_one_line_naming_the_file(run_ttc, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full_disk)
    args = run_args(tmp_path / "run", "--trainer.max_steps", "2", "--checkpoint.every_n_train_steps", "1")
    code, _, err = run_ttc("fit", *args)
    checkpoints = tmp_path / "run" / "checkpoints"
    assert_one_line_error(code, err, f"cannot write {checkpoints / 'step=1.ckpt'}: No space left on device")


# --- non-finite loss, gradients and weights -----------------------------------------------------------------------


def test_one_non_finite_step_is_skipped_and_training_goes_on(run_ttc, tmp_path):
    _calls["n"] = 0
    args = run_args(tmp_path / "run", "--trainer.max_steps", "2", "--model.rewards", f"[{HERE}.huge_once_reward]")
    code, _, err = run_ttc("fit", *args)
    assert code == 0, err
    assert "ttc: warning: step 0: loss " in err and "optimizer step skipped, weights unchanged" in err
    rows = read_metrics(tmp_path / "run")
    assert [float(r["skipped_steps"]) for r in rows] == [1.0, 1.0]
    assert [r["grad_norm"] != "nan" for r in rows] == [False, True]  # step 1 had a gradient and took it
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 2 and state["ttc"]["skipped_steps"] == 1
    assert all(bool(v.isfinite().all()) for v in state["state_dict"].values() if v.is_floating_point())


def test_non_finite_steps_in_a_row_stop_and_keep_the_last_good_weights(run_ttc, run):
    before = hashes(run)
    settings = [*LORA, "--model.rewards", f"[{HERE}.huge_reward]", "--model.max_skipped_steps", "2"]
    code, _, err = run_ttc("fit", *run_args(run, *settings, "--trainer.max_steps", "9", "--ckpt_path", "last"))
    assert_one_line_error(code, err, "training stopped at step 3: 2 optimizer steps in a row had a NaN or infinite")
    assert_kept(before, run)
    good = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    saved = torch.load(run / "checkpoints" / "last-interrupted.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(good[k], saved[k]) for k in good)  # the skipped steps changed nothing


@pytest.mark.parametrize(("kind", "value"), [("lora", "nan"), ("full", "inf")])
def test_non_finite_weights_are_never_saved(run_ttc, trained, tmp_path, kind, value):
    run = Path(shutil.copytree(trained / kind, tmp_path / "run"))
    before = hashes(run)
    poison = f"--trainer.callbacks+={{class_path: {HERE}.PoisonWeights, init_args: {{at: 3, value: {value}}}}}"
    args = run_args(run, *KINDS[kind], "--trainer.max_steps", "5", "--checkpoint.every_n_train_steps", "1", poison)
    code, _, err = run_ttc("fit", *args, "--ckpt_path", "last")
    assert_one_line_error(
        code, err, "not saving a checkpoint at step 3", "NaN or infinite", "previous checkpoint is kept"
    )
    assert_kept(before, run)
    assert checkpoint_names(run) == ["last.ckpt", "step=1.ckpt", "step=2.ckpt"]  # no step=3, no last-interrupted


def test_non_finite_half_precision_weights_blame_the_precision(run_ttc, tmp_path):
    # bf16-true keeps LoRA's adapters in bfloat16 (16-true is refused for training before it starts)
    poison = f"--trainer.callbacks+={{class_path: {HERE}.PoisonWeights, init_args: {{at: 2}}}}"
    half = ["--trainer.precision", "bf16-true", "--checkpoint.every_n_train_steps", "1", "--trainer.max_steps", "3"]
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", *LORA, *half, poison))
    assert_one_line_error(
        code,
        err,
        "not saving a checkpoint at step 2",
        "trainer.precision bf16-true keeps the trained weights in bfloat16: use bf16-mixed or 32-true",
    )


def test_max_skipped_steps_below_one_is_refused(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", "--model.max_skipped_steps", "0"))
    assert_one_line_error(code, err, "model.max_skipped_steps must be >= 1")


# --- bad data -------------------------------------------------------------------------------------------------------


def bad_data(tmp_path: Path, case: str) -> tuple[list[str], str]:
    """Data options pointing at a broken file, and the message that must name the fault."""
    prompts = tmp_path / "prompts.jsonl"
    primevul = tmp_path / "primevul"
    primevul.mkdir()
    patch = ["--data.class_path", "ttc_lightning.data.PrimeVulPatchDataModule", "--data.data_path", str(primevul)]
    patch += ["--data.val_split", "null"]  # a directory with the train split only
    paired = primevul / "primevul_train_paired.jsonl"
    if case == "prompts-not-utf8":
        prompts.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
        return ["--data.train_path", str(prompts)], f"{prompts}:2: not UTF-8 text (byte 0xe9"
    if case == "prompts-empty":
        prompts.write_text("")
        return ["--data.train_path", str(prompts)], f"{prompts}: no prompts (the file is empty)"
    if case == "prompts-cut-mid-line":
        prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n{"prom')
        return ["--data.train_path", str(prompts)], f"{prompts}:3: malformed JSON"
    if case == "prompts-lone-surrogate":
        prompts.write_text('{"prompt": "ok"}\n{"prompt": "x \\ud800 y"}\n')  # valid JSON, but no text
        return ["--data.train_path", str(prompts)], f"{prompts}:2: prompt: a lone surrogate (\\ud800 at character 3)"
    if case == "prompts-all-too-long":
        prompts.write_text(json.dumps({"prompt": "a" * 9000}) + "\n")
        return ["--data.train_path", str(prompts)], "every prompt is longer than 8184 tokens (the model's context"
    rows = [line for n in range(4) for line in pair(n)]
    if case == "primevul-not-utf8":
        write(paired, rows)
        paired.write_bytes(paired.read_bytes() + b'{"idx": 1, "func": "\xff"}\n')
        return patch, f"{paired}:9: not UTF-8 text"
    if case == "primevul-empty":
        paired.write_text("\n")
        return patch, f"{paired}: empty, it holds no records"
    if case == "primevul-shifted":
        write(paired, [v01(99, 0, "int x;", "elsewhere"), *rows])
        return patch, "the lines are out of step by one from line 1 on: lines 2-3 are a vulnerable function"
    raise AssertionError(case)


DATA_FAULTS = [
    "prompts-not-utf8",
    "prompts-empty",
    "prompts-cut-mid-line",
    "prompts-lone-surrogate",
    "prompts-all-too-long",
    "primevul-not-utf8",
    "primevul-empty",
    "primevul-shifted",
]


@pytest.mark.parametrize("case", DATA_FAULTS)
def test_bad_data_file_is_a_one_line_error(run_ttc, tmp_path, case):
    data, message = bad_data(tmp_path, case)
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", *data, "--trainer.max_steps", "1"))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_long_prompts_are_dropped_by_the_models_context_with_a_count(run_ttc, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "a" * 9000}] + [{"prompt": f"p{i}"} for i in range(4)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = run_ttc(
        "fit", *run_args(tmp_path / "run", "--data.train_path", str(prompts), "--trainer.max_steps", "1")
    )
    assert code == 0, err
    # tiny's context is 8192 positions; 8 of them are for the completion
    line = "dropped 1 of 5 prompts longer than 8184 tokens (the model's context minus model.max_new_tokens)"
    assert err.count(line) == 1


def test_max_prompt_tokens_beyond_the_context_is_capped_with_a_warning(run_ttc, tmp_path):
    args = run_args(tmp_path / "run", "--data.max_prompt_tokens", "100000", "--trainer.max_steps", "1")
    code, _, err = run_ttc("fit", *args)
    assert code == 0, err
    assert "ttc: warning: data.max_prompt_tokens=100000 is more than the model can take: 8184" in err


def test_info_lines_show_once_each(run_ttc, tmp_path):
    # a duplicated pair: PrimeVul loading drops it and says so, on stderr, once
    data = tmp_path / "primevul"
    data.mkdir()
    write(data / "primevul_train_paired.jsonl", [line for n in (0, 1, 2, 1) for line in pair(n)])
    patch = ["--data.class_path", "ttc_lightning.data.PrimeVulPatchDataModule", "--data.data_path", str(data)]
    args = run_args(tmp_path / "run", *patch, "--data.val_split", "null", "--data.batch_size", "1")
    code, _, err = run_ttc("fit", *args, "--trainer.max_steps", "1")
    assert code == 0, err
    assert err.count("dropped 1 duplicate pairs") == 1
    assert err.count("ttc: train: 3 prompts") == 1


@pytest.mark.parametrize("config", [DEMO, TINY], ids=["data_path", "train_path"])
def test_null_data_path_means_the_shipped_sample(run_ttc, tmp_path, config):
    option = "--data.data_path" if config == DEMO else "--data.train_path"
    args = ["--config", config, *FAST, "--trainer.default_root_dir", str(tmp_path / "run"), option, "null"]
    code, _, err = run_ttc("fit", *args, "--data.batch_size", "1", "--trainer.max_steps", "1")
    assert code == 0, err


# --- bad configs ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_on_cpu_trains_and_evaluates(run_ttc, tmp_path, val, precision):
    args = run_args(tmp_path / "run", *val, "--trainer.precision", precision)
    code, _, err = run_ttc("fit", *args, "--trainer.max_steps", "2")
    assert code == 0, err
    code, _, err = run_ttc("validate", *args, "--ckpt_path", "last")
    assert code == 0, err


@pytest.mark.slow
@pytest.mark.parametrize("cpu", ["true", "false"], ids=["cpu-kernels", "plain"])
def test_mixed_precision_samples_with_a_shared_prompt_cache(run_ttc, tmp_path, cpu):
    # The demo's 1,300-1,600-token prompts and G = 8 share each prompt's keys/values while decoding (the tiny config's
    # short prompts copy them): under autocast its keys come out float32 and its values bf16.
    args = ["--config", DEMO, "--trainer.default_root_dir", str(tmp_path / "run"), "--trainer.max_steps", "1"]
    args += ["--model.max_new_tokens", "4", "--trainer.precision", "bf16-mixed", "--model.levers.cpu", cpu]
    code, _, err = run_ttc("fit", *args)
    assert code == 0, err
    assert "shared prompt cache" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the GPU asked for")
@pytest.mark.parametrize("accelerator", ["gpu", "cuda"])
def test_an_accelerator_the_machine_lacks_is_one_line(run_ttc, tmp_path, accelerator):
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", "--trainer.accelerator", accelerator))
    assert_one_line_error(code, err, "trainer: ")


def test_a_precision_whose_package_is_missing_is_one_line(run_ttc, tmp_path):
    from lightning.fabric.plugins.precision.transformer_engine import _TRANSFORMER_ENGINE_AVAILABLE

    if _TRANSFORMER_ENGINE_AVAILABLE:
        pytest.skip("transformer_engine is installed")
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", "--trainer.precision", "transformer-engine"))
    assert_one_line_error(code, err, "trainer.precision transformer-engine needs NVIDIA's transformer_engine package")


@pytest.mark.parametrize("where", ["checkpoints", "parent"])
def test_an_unwritable_checkpoint_directory_is_refused_before_training(run_ttc, tmp_path, monkeypatch, where):
    # Read-only: the mode bits, and for root (whom they do not stop) the answer the kernel gives on a read-only mount.
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    dirpath = locked if where == "checkpoints" else locked / "checkpoints"
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and real_access(path, mode, **kw))
    args = run_args(tmp_path / "run", "--checkpoint.dirpath", str(dirpath), "--trainer.max_steps", "1")
    code, _, err = run_ttc("fit", *args)
    message = "is not writable" if where == "checkpoints" else f"cannot be created: {locked} is not writable"
    assert_one_line_error(code, err, f"checkpoint.dirpath: {dirpath} {message}")
    assert "ttc: policy:" not in err  # refused before the model loaded


def test_a_config_file_that_is_not_utf8_is_one_line(run_ttc, tmp_path):
    config = tmp_path / "binary.yaml"
    config.write_bytes(b"\xff\xfe\x00")
    code, _, err = run_ttc("fit", "--config", str(config))
    assert_one_line_error(code, err, f"--config {config}: not UTF-8 text (byte 0: invalid start byte)", status=2)


def test_a_run_directory_that_is_a_file_is_one_line(run_ttc, tmp_path):
    (tmp_path / "afile").write_text("")
    code, _, err = run_ttc("fit", *run_args(tmp_path / "afile"))
    assert_one_line_error(code, err, f"{tmp_path / 'afile'}/checkpoints cannot be created: ", "afile is a file")


def test_lora_on_modules_the_model_lacks_is_one_line(run_ttc, tmp_path):
    lora = ["--model.lora", "{r: 4, target_modules: [nonexistent_proj]}"]
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", *lora))
    assert_one_line_error(code, err, "model.lora.target_modules: Target modules {'nonexistent_proj'} not found")


def test_the_optimizer_is_set_by_model_options_only(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", "--optimizer", "torch.optim.SGD"))
    assert code == 2 and "ttc: error: unknown option --optimizer" in err and "Traceback" not in err


def test_completion_longer_than_the_context_is_refused(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", "--model.max_new_tokens", "8192"))
    assert_one_line_error(code, err, "model.max_new_tokens=8192 leaves no room for a prompt: the context of 'tiny'")


# --- rewards that exit or raise what is not an Exception ------------------------------------------------------


@pytest.mark.parametrize("status", ["0", "3"])
def test_a_reward_that_calls_sys_exit_is_a_reward_error(run_ttc, tmp_path, monkeypatch, status):
    # A run that did not finish must not exit 0 (nor with the status a library under a reward chose), and it keeps
    # its last completed step as any reward error does.
    _calls["n"] = 0
    monkeypatch.setenv("TTC_TEST_EXIT", status)
    args = run_args(tmp_path / "run", "--trainer.max_steps", "4", "--model.rewards", f"[{HERE}.exiting_reward]")
    code, _, err = run_ttc("fit", *args)
    assert_one_line_error(code, err, f"reward function exiting_reward called sys.exit({status}) on ")
    assert "interrupted at step 2; saved" in err
    checkpoint = tmp_path / "run" / "checkpoints" / "last-interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2


def test_a_reward_that_raises_a_base_exception_is_one_line(run_ttc, tmp_path):
    args = run_args(tmp_path / "run", "--trainer.max_steps", "2", "--model.rewards", f"[{HERE}.base_exception_reward]")
    code, _, err = run_ttc("fit", *args)
    assert_one_line_error(
        code, err, "reward function base_exception_reward raised RewardsOwnStop: the reward's own stop | over two"
    )


def test_a_sys_exit_under_the_run_is_an_error_not_a_finished_run(run_ttc, tmp_path):
    exiting = f"--trainer.callbacks+={{class_path: {HERE}.ExitAt, init_args: {{at: 2}}}}"
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", "--trainer.max_steps", "4", exiting))
    assert_one_line_error(code, err, "`ttc fit` stopped before it finished: sys.exit(0) was called at ", __file__)
    checkpoint = tmp_path / "run" / "checkpoints" / "last-interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2


# --- a run that trains nothing, threads left running ----------------------------------------------------------------

NOTHING_TRAINED = {
    "tied": (
        ["--model.rewards", f"[{HERE}.tied_reward]", "--model.dynamic_sampling", "true", "--trainer.max_steps", "4"],
        "nothing trained: every group's rewards tied (the run's 1 rollout): no advantage to learn from",
    ),
    "max-steps-0": (["--trainer.max_steps", "0"], "nothing trained: trainer.max_steps is 0"),
    "all-skipped": (
        ["--model.rewards", f"[{HERE}.huge_reward]", "--trainer.max_steps", "2"],
        "nothing trained: every optimizer step of the run (2) had a NaN or infinite loss or gradient norm",
    ),
}


@pytest.mark.parametrize("case", list(NOTHING_TRAINED))
def test_a_run_that_trains_nothing_exits_3(run_ttc, tmp_path, case):
    settings, message = NOTHING_TRAINED[case]
    code, _, err = run_ttc("fit", *run_args(tmp_path / "run", *settings))
    assert_one_line_error(code, err, message, status=3)
    assert ("ttc run summary" in err) == (case != "max-steps-0")  # the summary, when there was a rollout


@pytest.mark.slow
def test_threads_a_reward_leaves_running_do_not_hold_the_exit(tmp_path, kill_on_exit):
    proc = start_ttc(tmp_path, "--trainer.max_steps", "2", "--model.rewards", f"[{HERE}.thread_leaving_reward]")
    kill_on_exit(proc)
    code, out = finish(proc, tmp_path, timeout=150)
    assert code == 0, out[-3000:]
    assert "ttc: 2 rollouts in this run (to step 2)" in out
    assert "ttc: warning: exiting without waiting for 1 thread still running (reward-worker)" in out


# --- a command that fails before it logs anything -------------------------------------------------------------------


def test_a_failed_evaluation_leaves_no_log_directory(run_ttc, run, tmp_path, val):
    # A checkpoint that does not fit (found once the run has set up and written its config), and bad data.
    args = run_args(run, "--model.lora", "{r: 8, alpha: 8}", *val, "--ckpt_path", "last")
    code, _, err = run_ttc("validate", *args)
    assert_one_line_error(code, err, "model.lora.r: the checkpoint's adapters were trained")
    assert sorted(p.name for p in (run / "logs").iterdir()) == ["version_0"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"pro')
    code, _, err = run_ttc("validate", *run_args(tmp_path / "fresh", "--data.val_path", str(bad)))
    assert_one_line_error(code, err, f"{bad}:2: malformed JSON")
    assert not (tmp_path / "fresh").exists()
    code, _, err = run_ttc("validate", *run_args(run, *LORA, *val, "--ckpt_path", "last"))
    assert code == 0, err
    assert (run / "logs" / "version_1" / "metrics.json").exists()  # a run that logs keeps its directory


# --- signals and kill -9 ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "status"),
    [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 143)],
    ids=["ctrl-c", "sigterm", "hangup"],
)
def test_signal_saves_an_interrupt_checkpoint_and_keeps_the_others(run, tmp_path, kill_on_exit, sig, status):
    before = hashes(run)
    rollouts = run / "logs" / "version_1" / "rollouts.jsonl"
    proc = start_ttc(tmp_path, *LORA, "--trainer.max_steps", "1000", "--ckpt_path", "last")
    kill_on_exit(proc)
    wait_for(proc, tmp_path, lambda: rollout_steps(rollouts) >= 1, "step 3")
    proc.send_signal(sig)
    code, out = finish(proc, tmp_path)
    assert code == status, out[-3000:]
    assert "Traceback" not in out
    assert_kept(before, run)
    assert torch.load(run / "checkpoints" / "last-interrupted.ckpt", weights_only=False)["global_step"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["2", "1"], ids=["worker-threads", "training-thread"])
@pytest.mark.parametrize(
    "reward", ["sleeping_reward", "checking_reward", "swallowing_reward"], ids=["python", "command", "swallowing"]
)
def test_sigterm_while_a_reward_hangs_stops_the_run_at_once(tmp_path, kill_on_exit, reward, workers):
    # reward_workers 2: the step waits for the reward on a worker thread; 1 (no reward_timeout): it runs in the
    # training thread itself. Either way the signal must not wait for the reward's 300 s, and no process a
    # command_reward check started may outlive the run. A reward that swallows the exception in the training thread
    # is left after STOP_GRACE (15 s): the run saves from another thread and exits.
    sleeping = tmp_path / "sleeping"
    rewards = ["--model.rewards", f"[{HERE}.{reward}]", "--model.reward_workers", workers]
    proc = start_ttc(tmp_path, *rewards, "--trainer.max_steps", "10", env=process_env(TTC_TEST_SLEEPING=str(sleeping)))
    kill_on_exit(proc)
    wait_for(proc, tmp_path, sleeping.exists, "the reward of step 2")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, tmp_path, timeout=60)
    assert code == 143, out[-3000:]
    assert time.monotonic() - started < 30
    assert "Traceback" not in out
    checkpoint = tmp_path / "run" / "checkpoints" / "last-interrupted.ckpt"
    assert torch.load(checkpoint, weights_only=False)["global_step"] == 2
    if reward == "checking_reward":
        check, escaped = map(int, sleeping.read_text().split())
        alive = [pid for pid in (check, escaped) if not gone(pid)]
        for pid in alive:
            os.kill(pid, signal.SIGKILL)
        assert alive == []


@pytest.mark.slow
def test_kill_9_leaves_only_whole_checkpoints_and_the_run_resumes(run_ttc, tmp_path, kill_on_exit):
    # a checkpoint every step, so the kill is likely to land during a save
    rollouts = tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl"
    proc = start_ttc(tmp_path, "--trainer.max_steps", "1000", "--checkpoint.every_n_train_steps", "1")
    kill_on_exit(proc)
    wait_for(proc, tmp_path, lambda: rollout_steps(rollouts) >= 3, "step 3")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    run = tmp_path / "run"
    for path in (run / "checkpoints").glob("*.ckpt"):
        torch.load(path, weights_only=False)  # each one whole
    step = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"]
    code, _, err = run_ttc("fit", *run_args(run, "--trainer.max_steps", str(step + 1), "--ckpt_path", "last"))
    assert code == 0, err
    assert not list((run / "checkpoints").glob(".*.partial"))


# --- resuming is exact ----------------------------------------------------------------------------------------------


def test_a_run_failing_in_a_step_resumes_to_what_an_unbroken_run_samples(run_ttc, tmp_path, monkeypatch):
    # The error comes after step 2 sampled: its checkpoint must hold the random states as step 2 began.
    args = ["--config", DEMO, *FAST, "--model.rewards", f"[{HERE}.failing_a_reward]", "--model.reward_weights", "[1]"]
    _calls["n"] = 0
    assert run_ttc("fit", *args, "--trainer.default_root_dir", "whole", "--trainer.max_steps", "4")[0] == 0
    _calls["n"] = 0
    monkeypatch.setenv("TTC_TEST_FAIL", "1")
    code, _, err = run_ttc("fit", *args, "--trainer.default_root_dir", "part", "--trainer.max_steps", "4")
    assert code == 1 and "the reward service went away" in err and "interrupted at step 2; saved" in err
    monkeypatch.delenv("TTC_TEST_FAIL")
    code, _, err = run_ttc(
        "fit", *args, "--trainer.default_root_dir", "part", "--trainer.max_steps", "4", "--ckpt_path=last"
    )
    assert code == 0, err
    assert "last-interrupted.ckpt (step 2)" in err

    def completions(*paths: Path) -> list[str]:
        return [json.loads(line)["completion"] for path in paths for line in path.read_text().splitlines()]

    part = tmp_path / "part" / "logs"
    resumed = completions(part / "version_0" / "rollouts.jsonl", part / "version_1" / "rollouts.jsonl")
    assert resumed == completions(tmp_path / "whole" / "logs" / "version_0" / "rollouts.jsonl")


@pytest.mark.slow
def test_primevul_run_resumed_samples_what_an_unbroken_run_samples(run_ttc, tmp_path):
    # 12 training prompts, one a step: stopped and resumed in the middle of the epoch
    args = ["--config", DEMO, *FAST, "--data.batch_size", "1"]
    assert run_ttc("fit", *args, "--trainer.default_root_dir", "whole", "--trainer.max_steps", "4")[0] == 0
    assert run_ttc("fit", *args, "--trainer.default_root_dir", "part", "--trainer.max_steps", "2")[0] == 0
    code, _, err = run_ttc(
        "fit", *args, "--trainer.default_root_dir", "part", "--trainer.max_steps", "4", "--ckpt_path=last"
    )
    assert code == 0, err

    def completions(*paths: Path) -> list[str]:
        return [json.loads(line)["completion"] for path in paths for line in path.read_text().splitlines()]

    part = tmp_path / "part" / "logs"
    resumed = completions(part / "version_0" / "rollouts.jsonl", part / "version_1" / "rollouts.jsonl")
    assert resumed == completions(tmp_path / "whole" / "logs" / "version_0" / "rollouts.jsonl")


def step_prompts(*paths: Path) -> list[list[str]]:
    """The prompts each step trained on, in order, once each (a rollouts file has a line per completion)."""
    steps: dict[int, list[str]] = {}
    for path in paths:
        for record in read_rollouts(path):
            prompts, prompt = steps.setdefault(record["step"], []), json.dumps(record["prompt"])
            if prompt not in prompts:
                prompts.append(prompt)
    return [steps[step] for step in sorted(steps)]


@pytest.mark.slow
def test_a_resume_with_another_batch_size_trains_the_rest_of_the_epoch_once(run_ttc, tmp_path):
    # The 16 demo prompts, 4 a step: stopped after 2 steps (the third batch already fetched), resumed with 3 a step,
    # the epoch's 8 prompts left are trained in 3 steps (3, 3, 2), in the order an unbroken run trains them.
    args = ["fit", "--config", TINY, *FAST]
    assert run_ttc(*args, "--trainer.default_root_dir", "whole", "--trainer.max_steps", "4")[0] == 0
    assert run_ttc(*args, "--trainer.default_root_dir", "run", "--trainer.max_steps", "2")[0] == 0
    code, _, err = run_ttc(
        *args,
        "--trainer.default_root_dir",
        "run",
        "--trainer.max_steps",
        "6",
        "--ckpt_path=last",
        "--data.batch_size",
        "3",
    )
    assert code == 0, err
    logs = tmp_path / "run" / "logs"
    resumed = step_prompts(logs / "version_0" / "rollouts.jsonl", logs / "version_1" / "rollouts.jsonl")
    whole = step_prompts(tmp_path / "whole" / "logs" / "version_0" / "rollouts.jsonl")
    assert [len(step) for step in resumed] == [4, 4, 3, 3, 2, 3]  # step 6 starts the next epoch
    epoch = [prompt for step in resumed[:5] for prompt in step]
    assert epoch == [prompt for step in whole for prompt in step] and len(set(epoch)) == 16
