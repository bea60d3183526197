"""ttc's error lines: one line each, whatever the message holds, naming the file that could not be written."""

import os
import re
import sys
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from ttc_lightning.errors import TTCError, error_line, naming_file
from ttc_lightning.run.saving import AtomicCheckpointIO
from ttc_lightning.run.tracking import name_metrics_file
from ttc_lightning.training.rollout import write_rollouts


@pytest.mark.parametrize(
    ("message", "line"),
    [
        ("one line", "ttc: error: one line"),
        ("first\nsecond", "ttc: error: first | second"),
        ("report:\n\n  - indented\r\n  - more\n", "ttc: error: report: | - indented | - more"),
        (ValueError("a\u2028b"), "ttc: error: a | b"),
    ],
)
def test_an_error_is_one_line(message, line):
    assert error_line(message) == line
    assert len(error_line(message).splitlines()) == 1


# --- a full disk names the file being written --------------------------------------------------------------------

full_disk = pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full, whose writes fail with ENOSPC")


@full_disk
def test_a_full_disk_names_the_checkpoint_being_saved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    target = tmp_path / "checkpoints" / "last.ckpt"
    target.parent.mkdir()
    (target.parent / f".last.ckpt.{os.getpid()}.partial").symlink_to("/dev/full")  # the file the save writes first
    with pytest.raises(TTCError, match=f"^cannot write {re.escape(str(target))}: No space left on device$"):
        AtomicCheckpointIO().save_checkpoint({"w": torch.zeros(1_000_000)}, target)
    assert list(target.parent.iterdir()) == []


@full_disk
def test_a_full_disk_names_the_rollouts_file(tmp_path):
    (tmp_path / "rollouts.jsonl").symlink_to("/dev/full")
    with pytest.raises(TTCError, match=f"^cannot write {re.escape(str(tmp_path))}/rollouts.jsonl: No space left"):
        write_rollouts(tmp_path, 0, [{"step": 1, "completion": "x" * 10_000}])


@full_disk
@pytest.mark.filterwarnings("ignore:Experiment logs directory")  # the directory holds the /dev/full link
def test_a_full_disk_names_the_metrics_file(tmp_path):
    logger = CSVLogger(save_dir=tmp_path, name="logs")
    name_metrics_file([logger])
    Path(logger.log_dir).mkdir(parents=True)
    (Path(logger.log_dir) / "metrics.csv").symlink_to("/dev/full")
    logger.log_metrics({"reward": 0.5}, step=0)
    with pytest.raises(TTCError, match=f"^cannot write {re.escape(logger.log_dir)}/metrics.csv: No space left"):
        logger.save()


def test_an_os_error_names_the_file_written_not_the_one_staged_for_it(tmp_path):
    # the atomic save writes `.a.partial` first: the error names `a`, which the user knows
    with pytest.raises(TTCError, match=f"^cannot write {re.escape(str(tmp_path / 'a'))}: No such file or directory$"):
        with naming_file(tmp_path / "a"):
            (tmp_path / "missing" / ".a.partial").write_text("x")


def test_a_full_disk_under_torch_save_names_the_checkpoint(tmp_path):
    # torch.save's zip writer meets the full disk, then its clean-up raises a RuntimeError with the OSError as context
    target = tmp_path / "last.ckpt"
    with pytest.raises(TTCError, match=f"^cannot write {re.escape(str(target))}: No space left on device$"):
        with naming_file(target), open("/dev/full", "wb") as f:
            torch.save({"w": torch.zeros(100_000)}, f)
    # on a nearly full file system the zip writer's clean-up fails after the OSError, and its RuntimeError is the one
    # raised (as torch 2.13 does on a small tmpfs); the OSError is its context
    with pytest.raises(TTCError, match=f"^cannot write {re.escape(str(target))}: No space left on device$"):
        with naming_file(target):
            try:
                raise OSError(28, "No space left on device")
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 172160 vs 172112")  # noqa: B904
    with pytest.raises(RuntimeError, match="not a write"):  # other errors pass as they are
        with naming_file(target):
            raise RuntimeError("not a write")


def test_ctrl_c_while_the_cli_loads_is_one_line(monkeypatch, capsys):
    # Ctrl-C lands in whatever import is running: stand in for the CLI's module with one whose import raises it
    import ttc_lightning.__main__ as launcher

    class Interrupted(types.ModuleType):
        def __getattr__(self, name):
            raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "ttc_lightning.run.cli", Interrupted("ttc_lightning.run.cli"))
    with pytest.raises(SystemExit) as stopped:
        launcher.main()
    assert stopped.value.code == 130
    assert capsys.readouterr().err == "ttc: interrupted while starting; nothing was run\n"
