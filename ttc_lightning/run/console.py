"""What the `ttc` command shows on the console: progress that suits a terminal or a log file, ttc's own lines, and
none of the notices libraries print on every run although the user did nothing to cause them."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import warnings
from collections.abc import Iterator
from typing import TextIO

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.utilities.rank_zero import rank_zero_only


def is_terminal(stream: TextIO | None) -> bool:
    """`stream.isatty()`, False for a stream that cannot tell."""
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


# Warnings that libraries raise on every ttc run although the user did nothing to cause them: (message regex,
# category). Each is matched exactly, so a warning about something the user set still shows.
LIBRARY_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # One optimizer step per pass is ttc's design, so "the checkpoint holds the post-step state" is what we want.
    ("Using ModelCheckpoint with manual optimization", UserWarning),
    # The loaders hold rows in memory and collate lists: worker processes would not make anything faster.
    (r"The '\w+' does not have many workers which may be a bottleneck", PossibleUserWarning),
    # ttc's loader when the data module has no validation split: an empty list, on purpose.
    (r"Total length of `list` across ranks is zero", UserWarning),
    # The frozen reference model (full fine-tuning with beta > 0) is in eval mode on purpose.
    (r"Found \d+ module\(s\) in eval mode at the start of training", PossibleUserWarning),
    # An RL step is a whole rollout: ttc logs every step (trainer.log_every_n_steps 1) whatever the epoch's length.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning),
    # predict_step writes predictions.jsonl itself and returns nothing.
    (r"predict returned None if it was on purpose", UserWarning),
    # A resumed run's checkpoint directory holds its earlier checkpoints: ttc's run directory belongs to one run.
    (r"Checkpoint directory .* exists and is not empty", UserWarning),
    # Validating, or resuming with another checkpoint interval: the checkpoint callbacks' state is their list of
    # periodic checkpoints, nothing the run needs back.
    (r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint", UserWarning),
    # Evaluating a checkpoint of another run directory: its periodic-checkpoint list is not reloaded, as intended.
    (r"The dirpath has changed from .* won't be reloaded", UserWarning),
    # `ttc export` of an adapter on `tiny`: the base it names is written beside it, in a directory that takes its final
    # name once the export is complete; ttc never trains the embeddings, so the vocabulary is unchanged indeed.
    (r"Could not find a config file in .* - will assume that the vocabulary was not modified", UserWarning),
    # A fit without trainer.max_steps: ttc says so itself, in its own words and without a source path (`check_trainer`).
    (r"`max_epochs` was not set\. Setting it to 1000 epochs", PossibleUserWarning),
    # Deprecations inside the libraries (peft reading transformers' old name, Lightning's own pytree code, Lightning's
    # all_gather on torch's old collective under DDP).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    (r"torch\.distributed\.nn\.functional\.all_gather is deprecated", FutureWarning),
)
# Log records of the same kind: (logger, message prefix).
LIBRARY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # advertises litlogger on every run
    ("lightning.fabric.utilities.rank_zero", "💡 Tip:"),
    # What ttc says itself (run_info.json records the seed and the hardware; ttc names the checkpoint it resumes
    # from and why the run stopped) or what does not concern its users (TPUs, HPUs, float32 matmuls it never runs).
    ("lightning.fabric.utilities.seed", "Seed set to"),
    ("lightning.pytorch.utilities.rank_zero", "GPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "TPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "HPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "Restoring states from the checkpoint path"),
    ("lightning.pytorch.utilities.rank_zero", "Restored all states from the checkpoint"),
    ("lightning.pytorch.utilities.rank_zero", "Loaded model weights from the checkpoint"),
    ("lightning.pytorch.utilities.rank_zero", "`Trainer.fit` stopped:"),
    ("lightning.pytorch.utilities.rank_zero", "Time limit reached."),  # the summary's "ended by" says it
    ("lightning.pytorch.utilities.rank_zero", "You are using a CUDA device"),
    ("lightning.pytorch.accelerators.cuda", "LOCAL_RANK:"),
    # A line per rank, then a banner in dashes, as the processes of a multi-device run connect (run_info records them).
    ("lightning.fabric.utilities.distributed", "Initializing distributed:"),
    ("lightning.fabric.utilities.rank_zero", "-" * 100 + "\ndistributed_backend="),
    ("lightning.pytorch.utilities.rank_zero", "-" * 100 + "\ndistributed_backend="),
    ("lightning.pytorch.trainer.connectors.signal_connector", "Received SIGTERM"),
    # ttc's LR schedule asks for the run's length; ttc prints what the interrupt saved (`CheckpointOnInterrupt`).
    ("lightning.pytorch.utilities.rank_zero", "Loading `train_dataloader` to estimate number of stepping batches"),
    ("lightning.pytorch.utilities.rank_zero", "\nDetected KeyboardInterrupt"),
    # bitsandbytes on CPUs with AVX512-BF16, at import: an optional kernel package (fetched from the Hub) is missing.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class DropPrefix(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not re.sub(r"^\[rank: \d+\] ", "", str(record.msg)).startswith(self.prefix)


@contextlib.contextmanager
def library_notices_hidden() -> Iterator[None]:
    """While the `ttc` command runs, hide `LIBRARY_WARNINGS` and `LIBRARY_LOG_RECORDS`; a program that imports
    ttc_lightning keeps every warning."""
    filters = [(logging.getLogger(name), DropPrefix(prefix)) for name, prefix in LIBRARY_LOG_RECORDS]
    for logger, log_filter in filters:
        logger.addFilter(log_filter)
    try:
        with warnings.catch_warnings():
            for message, category in LIBRARY_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger, log_filter in filters:
            logger.removeFilter(log_filter)


class _LogLines(logging.Formatter):
    """`ttc: message`, `ttc: warning: message`: the form of every line ttc prints."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"ttc: {level}{record.getMessage()}"


@contextlib.contextmanager
def ttc_log_lines() -> Iterator[None]:
    """The `ttc` logger's lines (records dropped, the checkpoint resumed from, skipped steps) on stderr at INFO, one
    line each and on rank zero only; its own handler, so Lightning's and any root handler see nothing twice."""
    logger = logging.getLogger("ttc")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogLines())
    handler.addFilter(lambda record: rank_zero_only.rank == 0)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.level, logger.propagate = saved
