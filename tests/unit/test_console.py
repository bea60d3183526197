"""What the `ttc` command prints besides its own lines: which library notices it hides, and which progress it picks."""

import io
import logging
import warnings

import pytest
from lightning.fabric.utilities.warnings import PossibleUserWarning

from ttc_lightning.run.console import library_notices_hidden
from ttc_lightning.run.progress import Progress, ProgressLines, StepProgressBar, progress_callback

EVAL_MODE = (
    "Found 33 module(s) in eval mode at the start of training. This may lead to unexpected behavior during training. "
    "If this is intentional, you can ignore this warning."
)


def emitted(*notices: tuple[str, type[Warning]]) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_notices_hidden():
            for message, category in notices:
                warnings.warn(message, category, stacklevel=1)
    return [str(w.message) for w in caught]


def test_library_notices_are_hidden_and_others_kept():
    assert (
        emitted(
            (EVAL_MODE, PossibleUserWarning),
            ("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning),
            ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)`", FutureWarning),
            ("predict returned None if it was on purpose, ignore this warning...", UserWarning),
            ("Total length of `list` across ranks is zero. Please make sure this was your intention.", UserWarning),
            ("The 'train_dataloader' does not have many workers which may be a bottleneck.", PossibleUserWarning),
            ("Checkpoint directory /r/checkpoints exists and is not empty.", UserWarning),
            ("The dirpath has changed from 'a' to 'b', therefore ... won't be reloaded.", UserWarning),
            ("torch.distributed.nn.functional.all_gather is deprecated, use ... instead.", FutureWarning),
            ("Could not find a config file in /b - will assume that the vocabulary was not modified.", UserWarning),
            ("Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need", UserWarning),
        )
        == []
    )
    # Same words, another category or another subject: the user may have caused it, so it shows.
    kept = [
        (EVAL_MODE, DeprecationWarning),
        ("Total length of `DataLoader` across ranks is zero.", UserWarning),
        ("`trainer.precision` is deprecated", FutureWarning),
    ]
    assert emitted(*kept) == [message for message, _ in kept]


def test_lightnings_unset_length_warning_gives_way_to_ttcs_line():
    message = (
        "`max_epochs` was not set. Setting it to 1000 epochs. To train without an epoch limit, set `max_epochs=-1`."
    )
    assert emitted((message, PossibleUserWarning)) == []  # `check_trainer` says it as a ttc line


def test_notices_are_hidden_only_while_the_command_runs():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with library_notices_hidden():
            pass
        warnings.warn(EVAL_MODE, PossibleUserWarning, stacklevel=1)
    assert len(caught) == 1  # a program importing ttc_lightning sees it


def test_library_log_records_are_dropped_while_the_command_runs():
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")

    def record(message: str) -> logging.LogRecord:
        return logging.LogRecord(logger.name, logging.INFO, __file__, 1, message, None, None)

    tip = record("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
    with library_notices_hidden():
        assert not logger.filter(tip)
        assert not logger.filter(record("GPU available: False, used: False"))
        assert not logging.getLogger("lightning.fabric.utilities.seed").filter(record("[rank: 1] Seed set to 7"))
        assert not logger.filter(record("Loading `train_dataloader` to estimate number of stepping batches."))
        assert not logger.filter(record("\nDetected KeyboardInterrupt, attempting graceful shutdown ..."))
        assert logger.filter(record("Another notice"))
    assert logger.filter(tip)


class Stream(io.StringIO):
    def __init__(self, terminal: bool) -> None:
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize(
    ("mode", "stdout", "stderr", "expected"),
    [
        ("auto", True, True, StepProgressBar),
        ("auto", False, True, ProgressLines),  # `ttc fit > log`: the bar would reach the file only at the end
        ("auto", True, False, ProgressLines),  # `ttc fit 2> log`
        ("auto", False, False, ProgressLines),  # SLURM, CI, nohup
        ("bar", False, False, StepProgressBar),
        ("lines", True, True, ProgressLines),
    ],
)
def test_progress_is_the_bar_on_a_terminal_else_lines(monkeypatch, mode, stdout, stderr, expected):
    monkeypatch.setattr("sys.stdout", Stream(stdout))
    monkeypatch.setattr("sys.stderr", Stream(stderr))
    callback = progress_callback(Progress(mode=mode, every_n_steps=5, every_n_seconds=10.0))
    assert type(callback) is expected
    if expected is ProgressLines:
        assert (callback.every_n_steps, callback.every_n_seconds) == (5, 10.0)
