"""`ttc`: the LightningCLI with ttc's defaults (automatic precision, run directory layout, clean user errors, checks
before anything slow starts, a quiet console and progress that suits the terminal or the log it goes to)."""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import lightning as L
import torch
from jsonargparse import Namespace, set_parsing_settings
from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ttc_lightning.callbacks import (
    CheckpointOnInterrupt,
    ParameterCount,
    Progress,
    ProgressLines,
    RunInfo,
    SaveConfigToWandb,
    StepProgressBar,
    SummaryTable,
)
from ttc_lightning.errors import TTCError, sharded_strategy_error
from ttc_lightning.module import GRPOModule
from ttc_lightning.preflight import check_before_start
from ttc_lightning.tracking import quiet_wandb_start, wandb_defaults


def auto_precision(accelerator: Any) -> str:
    """bf16 on Ampere and newer (compute capability >= 8.0), fp16 on Pascal to Turing (6.0-7.5), else fp32."""
    if str(accelerator) in ("cpu", "mps") or not torch.cuda.is_available():
        return "32-true"
    major, minor = torch.cuda.get_device_capability()
    if major >= 8:
        return "bf16-mixed"
    if major >= 6:
        return "16-mixed"
    return "32-true"


class TTCArgumentParser(LightningArgumentParser):
    """Dumps a subcommand's config as it will be used, ttc's defaults filled in (`TTCCLI.resolve_defaults`): what
    `--print_config` prints (jsonargparse prints while parsing, before `before_instantiate_classes`)."""

    def dump(self, namespace: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(namespace, Namespace) and "trainer" in namespace and "checkpoint" in namespace:
            namespace = namespace.clone()
            TTCCLI.resolve_defaults(namespace)
        return super().dump(namespace, *args, **kwargs)


class TTCCLI(LightningCLI):
    """LightningCLI plus `checkpoint` and `progress` sections and run-directory defaults under
    `trainer.default_root_dir`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", TTCArgumentParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_class_arguments(Progress, "progress")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_top_k": 0,
                "trainer.precision": None,
                "trainer.default_root_dir": "runs/ttc",
                # Validation generates text: too slow to run as a sanity check before every fit.
                "trainer.num_sanity_val_steps": 0,
                # One row for the whole policy and a FLOPs column of 0: `ParameterCount` says what matters.
                "trainer.enable_model_summary": False,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        strategy = str(getattr(trainer.strategy, "class_path", trainer.strategy)).rpartition(".")[2]
        if any(name in strategy.lower() for name in ("fsdp", "stage_3", "stage3")):
            raise sharded_strategy_error(strategy)
        self.resolve_defaults(config)
        # Before anything is built: the model, data, rewards, settings and W&B, every problem in one line.
        check_before_start(config, self.subcommand)

    @staticmethod
    def resolve_defaults(config: Namespace) -> None:
        """Fill in what the config leaves to ttc: precision, checkpoint directory, logger (and W&B's run name and
        directory), validation batches."""
        trainer = config.trainer
        if trainer.precision is None:
            trainer.precision = auto_precision(trainer.accelerator)
        root = trainer.default_root_dir
        if config.checkpoint.dirpath is None:
            # A fixed directory (not per logger version) so that `--ckpt_path last` finds the previous run's file.
            config.checkpoint.dirpath = f"{root}/checkpoints"
        if trainer.logger in (None, True):
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": root, "name": "logs"},
            }
        if _no_validation_split(config.data):
            # An empty validation loader still counts as a loop in Lightning and shifts logged steps on resume.
            trainer.limit_val_batches = 0
        wandb_defaults(config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """ttc's progress (`progress_callback`) unless the config turns progress bars off or brings its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(progress_callback(self._get(self.config_init, "progress", default=Progress())))
        if self.subcommand == "fit":
            callbacks.append(CheckpointOnInterrupt(self._get(self.config, "checkpoint").dirpath))
        trainer = super().instantiate_trainer(callbacks=callbacks, **kwargs)
        quiet_wandb_start(trainer.loggers)
        return trainer


def is_terminal(stream: TextIO | None) -> bool:
    """`stream.isatty()`, False for a stream that cannot tell."""
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # replaced by an object without isatty, or closed
        return False


def progress_callback(progress: Progress) -> ProgressBar:
    """The rich bar when stdout (where it draws) and stderr are terminals; else plain lines on stderr, which a log
    file (SLURM, CI, nohup) shows as they come instead of one bar at the end. `progress.mode` overrides the choice."""
    terminal = is_terminal(sys.stdout) and is_terminal(sys.stderr)
    if progress.mode == "bar" or (progress.mode == "auto" and terminal):
        return StepProgressBar()
    return ProgressLines(progress.every_n_steps, progress.every_n_seconds)


# --- a quiet console -------------------------------------------------------------------------------------------

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
    # predict_step writes predictions.jsonl itself and returns nothing.
    (r"predict returned None if it was on purpose", UserWarning),
    # Deprecations inside the libraries (peft reading transformers' old name, Lightning's own pytree code).
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# Log records of the same kind: (logger, message prefix).
LIBRARY_LOG_RECORDS: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip:"),  # advertises litlogger on every run
    ("lightning.fabric.utilities.rank_zero", "💡 Tip:"),
    # bitsandbytes on CPUs with AVX512-BF16, at import: an optional kernel package (fetched from the Hub) is missing.
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community"),
)


class DropPrefix(logging.Filter):
    """Drops the log records whose message starts with `prefix`."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


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


@contextlib.contextmanager
def ttc_log_shown() -> Iterator[None]:
    """While the `ttc` command runs, the `ttc` logger's INFO lines (rows read, rows dropped) go to stderr as
    `ttc: ...`, unless the logger already has a handler."""
    logger = logging.getLogger("ttc")
    if logger.handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("ttc: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _no_validation_split(data: Any) -> bool:
    """True when the data module is configured without validation data (`val_split`/`val_path` null)."""
    init_args = getattr(data, "init_args", None)
    if init_args is None:
        return False
    keys = [k for k in ("val_split", "val_path") if k in init_args]
    return bool(keys) and all(init_args[k] is None for k in keys)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `ttc` command."""
    with library_notices_hidden(), ttc_log_shown():
        run(args)


def run(args: list[str] | None) -> None:
    """`ttc ARGS`: export, or a LightningCLI subcommand; a `TTCError` ends it with one line and status 1."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from ttc_lightning.export import main as export_main

        export_main(argv[1:])
        return
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        TTCCLI(
            GRPOModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToWandb,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=42,
            trainer_defaults={"callbacks": [SummaryTable(), RunInfo(), ParameterCount()]},
            # `export` is dispatched above, outside LightningCLI, whose list of subcommands cannot show it.
            parser_kwargs={
                "description": "GRPO for code LLMs on PrimeVul. Subcommands: fit, validate, test, predict (below) and "
                "export (at the end). `ttc SUBCOMMAND --help` lists a subcommand's options.",
                "epilog": "export: `ttc export --ckpt_path CKPT --output_dir DIR [--merge]` writes a checkpoint as a "
                "Hugging Face model directory (LoRA adapter or merged model, with the tokenizer).",
            },
            args=args,
        )
    except SIGTERMException:
        # Lightning turns SIGTERM into a clean exit (status 0); a script or scheduler must see the run was stopped.
        sys.exit(128 + signal.SIGTERM)
    except Exception as e:
        # jsonargparse wraps errors raised while building the model or data module: find ours in the chain.
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, TTCError):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        print(f"ttc: error: {cause}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
