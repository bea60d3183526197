"""Run directories: what `--ckpt_path last`/`best` resolve to, and a fit claiming its directory (one run, one lock)."""

import fcntl
import logging
import os
from pathlib import Path

import pytest
import torch

from ttc_lightning.errors import TTCError
from ttc_lightning.run.directory import LOCK_FILE, RunDir, check_checkpoint, claim, resolve_ckpt_path


def write(path: Path, age: int = 0, step: int = 1) -> Path:
    """A minimal ttc checkpoint at `path`, modified `age` seconds before the others."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"global_step": step, "state_dict": {"w": torch.zeros(1)}, "ttc": {"lora": False}}, path)
    stamp = 1_000_000 - age
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def run(tmp_path) -> RunDir:
    return RunDir(tmp_path / "run", tmp_path / "run" / "checkpoints")


def test_last_is_the_newest_of_last_interrupted_and_hpc(run):
    write(run.checkpoints / "last.ckpt", age=30)
    write(run.checkpoints / "step=50.ckpt", age=0)  # periodic checkpoints are not "last"
    write(run.root / "hpc_ckpt_1.ckpt", age=20)
    newest = write(run.checkpoints / "last-interrupted.ckpt", age=10)
    assert resolve_ckpt_path("last", "fit", run) == str(newest)
    write(run.root / "hpc_ckpt_2.ckpt", age=5)
    assert resolve_ckpt_path("last", "validate", run) == str(run.root / "hpc_ckpt_2.ckpt")


def test_last_ignores_other_directories(run, tmp_path):
    write(tmp_path / "other" / "checkpoints" / "last.ckpt")
    write(run.root / "logs" / "last.ckpt")
    assert resolve_ckpt_path("last", "fit", run) is None


def test_last_without_checkpoint_starts_a_new_fit(run, caplog):
    with caplog.at_level(logging.INFO, logger="ttc"):
        assert resolve_ckpt_path("last", "fit", run) is None
    assert "no checkpoint in" in caplog.text and "starting a new run" in caplog.text


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
@pytest.mark.parametrize("value", ["last", "best"])
def test_evaluating_without_the_checkpoint_asked_for_is_an_error(run, subcommand, value):
    with pytest.raises(TTCError, match=f"--ckpt_path {value}: .* holds no .*leave --ckpt_path out to {subcommand} the"):
        resolve_ckpt_path(value, subcommand, run)


def test_best_is_the_runs_best_ckpt(run):
    write(run.checkpoints / "last.ckpt", age=0)
    with pytest.raises(TTCError, match="holds no best.ckpt"):
        resolve_ckpt_path("best", "fit", run)
    best = write(run.checkpoints / "best.ckpt", age=10)
    assert resolve_ckpt_path("best", "test", run) == str(best)


@pytest.mark.parametrize(("value", "meant"), [("lastt", "last"), ("Last", "last"), ("bset", "best")])
def test_a_typo_of_last_or_best_is_named(run, value, meant):
    with pytest.raises(TTCError, match=f"--ckpt_path {value}: no such file; did you mean {meant}\\?"):
        resolve_ckpt_path(value, "fit", run)


def test_a_file_named_like_a_keyword_is_a_file(run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write(tmp_path / "lastt")
    assert resolve_ckpt_path("lastt", "validate", run) == "lastt"


def test_paths_and_none_pass_through(run):
    assert resolve_ckpt_path(None, "fit", run) is None
    assert resolve_ckpt_path("some/file.ckpt", "validate", run) == "some/file.ckpt"
    assert resolve_ckpt_path("hpc", "fit", run) == "hpc"


@pytest.mark.parametrize("subcommand", ["validate", "test", "predict"])
def test_evaluating_without_a_checkpoint_says_it_runs_the_base_model(run, caplog, subcommand):
    with caplog.at_level(logging.INFO, logger="ttc"):
        assert resolve_ckpt_path(None, subcommand, run) is None
    assert caplog.messages == [f"no --ckpt_path: {subcommand} runs the base model, not a trained policy"]
    caplog.clear()
    last = write(run.checkpoints / "last.ckpt")
    with caplog.at_level(logging.INFO, logger="ttc"):
        assert resolve_ckpt_path(None, subcommand, run) is None
    assert caplog.messages[0].endswith(f"not a trained policy; --ckpt_path last takes {last}")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ttc"):
        assert resolve_ckpt_path(None, "fit", run) is None  # a new run: nothing to say
    assert caplog.messages == []


def test_fit_from_a_finished_checkpoint_says_how_to_continue(tmp_path):
    path = str(write(tmp_path / "last.ckpt", step=40))
    with pytest.raises(TTCError, match=r"already at max_steps 40 \(step 40\); raise --trainer.max_steps to continue"):
        check_checkpoint(path, "last", "fit", max_steps=40)
    check_checkpoint(path, "last", "fit", max_steps=41)
    check_checkpoint(path, "last", "fit", max_steps=-1)  # no step limit
    check_checkpoint(path, "last", "validate", max_steps=40)  # evaluation has no steps to run


def test_a_new_run_refuses_a_directory_with_checkpoints(run):
    last = write(run.checkpoints / "last.ckpt")
    with pytest.raises(TTCError, match=r"already holds a run \(1 checkpoint, the newest .*last.ckpt\): resume it"):
        claim(run, resume=False, overwrite=False)
    assert last.is_file()
    lock = claim(run, resume=True, overwrite=False)  # resuming it is what the directory is for
    lock.close()


def test_overwrite_deletes_the_earlier_runs_checkpoints_only_once_the_run_starts(run, caplog):
    earlier = [write(run.checkpoints / "last.ckpt"), write(run.root / "hpc_ckpt_3.ckpt")]
    log = run.root / "logs" / "version_0" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("step\n")
    with claim(run, resume=False, overwrite=True) as claimed:
        assert run.checkpoint_files() == sorted(earlier)  # a run refused while it sets up deletes nothing
        with caplog.at_level(logging.WARNING, logger="ttc"):
            claimed.start_over()
    assert run.checkpoint_files() == [] and log.is_file()
    assert "--overwrite: deleted 2 checkpoints of the earlier run" in caplog.text
    claimed.start_over()  # once only: nothing more to delete, nothing said
    assert caplog.text.count("deleted") == 1


def test_overwrite_and_resume_together_are_an_error(run):
    with pytest.raises(TTCError, match="--overwrite starts the run over and --ckpt_path resumes it"):
        claim(run, resume=True, overwrite=True)


def test_a_running_fit_keeps_others_out(run):
    run.root.mkdir(parents=True)
    with (run.root / LOCK_FILE).open("a+") as held:
        held.truncate(0)
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process's fit
        for resume in (False, True):
            with pytest.raises(TTCError, match=r"is in use by another `ttc fit` \(process 4242\)"):
                claim(run, resume=resume, overwrite=False)
    claim(run, resume=False, overwrite=False).close()  # the lock went with its holder


def test_claim_clears_partial_files_of_a_killed_save(run):
    run.checkpoints.mkdir(parents=True)
    (run.checkpoints / ".last.ckpt.99.partial").write_bytes(b"x")
    claim(run, resume=False, overwrite=False).close()
    assert list(run.checkpoints.iterdir()) == []


def test_runs_sharing_a_checkpoint_directory_keep_each_other_out(tmp_path):
    shared = tmp_path / "shared-checkpoints"
    first = claim(RunDir(tmp_path / "a", shared), resume=False, overwrite=False)
    # another run directory, the same checkpoints: it would overwrite (or, with --overwrite, delete) the first's
    for overwrite in (False, True):
        with pytest.raises(TTCError, match=r"shared-checkpoints is in use by .* choose another --checkpoint.dirpath"):
            claim(RunDir(tmp_path / "b", shared), resume=False, overwrite=overwrite)
    assert not (tmp_path / "b").exists()  # b's own lock was let go with the refusal, and the directory it made
    first.close()
    claim(RunDir(tmp_path / "b", shared), resume=False, overwrite=False).close()


@pytest.mark.parametrize(
    "content",
    [
        {"global_step": 3, "ttc": {}},
        {"global_step": 3, "state_dict": {}, "ttc": {}},  # emptied: not "use the model of the run that wrote it"
        {"global_step": "3", "state_dict": {"w": torch.zeros(1)}, "ttc": {}},
    ],
    ids=["no-weights", "empty-weights", "step-not-a-number"],
)
def test_a_checkpoint_missing_its_weights_or_step_is_damaged(tmp_path, content):
    torch.save(content, tmp_path / "x.ckpt")
    with pytest.raises(TTCError, match="is damaged: it has no weights"):
        check_checkpoint(str(tmp_path / "x.ckpt"), "x.ckpt", "fit", max_steps=10)


def test_a_run_that_wrote_nothing_leaves_no_directory_it_made(tmp_path):
    # A fit refused after its claim (a bad option value found while the data module is built) wrote only locks.
    made = RunDir(tmp_path / "runs" / "new", tmp_path / "runs" / "new" / "checkpoints")
    claimed = claim(made, resume=False, overwrite=False)
    assert (made.root / LOCK_FILE).is_file()
    claimed.close()
    assert list(tmp_path.iterdir()) == []  # runs/ too: this fit made it

    existing = RunDir(tmp_path / "mine", tmp_path / "mine" / "checkpoints")
    existing.root.mkdir()
    claim(existing, resume=False, overwrite=False).close()
    assert existing.root.is_dir()  # the user's directory stays, with only the lock file in it
    assert [p.name for p in existing.root.iterdir()] == [LOCK_FILE]


def test_a_run_that_wrote_something_keeps_its_directory(tmp_path):
    run = RunDir(tmp_path / "run", tmp_path / "run" / "checkpoints")
    claimed = claim(run, resume=False, overwrite=False)
    (run.root / "logs" / "version_0").mkdir(parents=True)
    write(run.checkpoints / "last.ckpt")
    claimed.close()
    assert sorted(p.name for p in run.root.iterdir()) == [LOCK_FILE, "checkpoints", "logs"]  # all of it, even empty


def test_a_refused_claim_removes_the_directory_it_made(tmp_path):
    run = RunDir(tmp_path / "run", tmp_path / "elsewhere" / "checkpoints")
    with pytest.raises(TTCError, match="--overwrite starts the run over"):
        claim(run, resume=True, overwrite=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "checkpoints").symlink_to(tmp_path / "gone")  # a broken link: not a directory to lock
    with pytest.raises(OSError):
        claim(run, resume=False, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == ["elsewhere"]  # run/ was made, then removed; elsewhere/ was not
