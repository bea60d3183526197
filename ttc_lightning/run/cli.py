"""`ttc`: the LightningCLI with ttc's defaults (automatic precision, run directory layout, clean user errors, checks
before anything slow starts, a run directory that one run owns, atomic checkpoints, a quiet console).

Exit status (`ending`): 0 done, 1 a user error (one line `ttc: error: ...`), 2 a command line that does not parse, 3 a
`fit` that trained nothing, 130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import sys
from typing import Any, NoReturn

import lightning as L
import torch
from jsonargparse import ActionYesNo, Namespace, set_parsing_settings
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ttc_lightning.data.base import Task
from ttc_lightning.data.tasks import PrimeVulPatchDataModule
from ttc_lightning.errors import TTCError, error_line, in_chain, sharded_strategy_error
from ttc_lightning.model import sharding
from ttc_lightning.module import GRPOModule
from ttc_lightning.run import directory as runs
from ttc_lightning.run import helptext
from ttc_lightning.run.console import library_notices_hidden, ttc_log_lines
from ttc_lightning.run.ending import (
    COMMAND_LINE,
    DONE,
    INTERRUPTED,
    STOPPED,
    USER_ERROR,
    NewLogDirectory,
    NothingTrained,
    TrainingCheck,
    exit_despite_threads,
    exit_status,
    nothing_trained,
    stopped_by_user,
    stray_exit,
)
from ttc_lightning.run.preflight import check_before_start
from ttc_lightning.run.progress import ParameterCount, Progress, SummaryTable, progress_callback
from ttc_lightning.run.saving import AtomicCheckpointIO, BestCheckpoint, CheckpointOnInterrupt, FinalCheckpoint
from ttc_lightning.run.tracking import (
    RunInfo,
    SaveConfigToWandb,
    class_path_of,
    finish_wandb,
    name_metrics_file,
    quiet_wandb_start,
    wandb_defaults,
)
from ttc_lightning.run.usage import (
    OTHER_COMMANDS,
    SUBCOMMANDS,
    check_config_files,
    config_after_subcommand,
    nested_help,
    one_line_error,
    subcommand_parsing,
    text_as_given,
)


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
    `--print_config` prints (jsonargparse prints while parsing, before `before_instantiate_classes`). No option may
    be abbreviated: `--trainer.max_step` is a typo, not `--trainer.max_steps` (jsonargparse builds the parsers of
    subcommands and of nested classes with this class, and copies the setting to subcommands)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("prog", "ttc")  # not `__main__.py` (`python -m ttc_lightning`), also in `--model.help`
        help_for = re.match(r"Help for (--[\w.]+)\.help=", str(kwargs.get("description", "")))
        if help_for:  # `ttc fit --model.help CLASS`: a short usage, not one entry per option of the class
            kwargs.setdefault(
                "usage", f"ttc {subcommand_parsing()} [--config FILE] [{help_for.group(1)}.OPTION VALUE ...]"
            )
        super().__init__(*args, **kwargs)
        self.argv: list[str] = []

    def parse_args(self, args: Any = None, *rest: Any, **kwargs: Any) -> Namespace:
        """Parses `args` (the command line when None), kept for `error`, which names the option given."""
        self.argv = [str(a) for a in (sys.argv[1:] if args is None else args)]
        return super().parse_args(args, *rest, **kwargs)

    def dump(self, namespace: Namespace, *args: Any, **kwargs: Any) -> str:
        if isinstance(namespace, Namespace) and "trainer" in namespace and "checkpoint" in namespace:
            namespace = namespace.clone()
            TTCCLI.resolve_defaults(namespace)
        return super().dump(namespace, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        """A command line that does not parse: one line and status 2, instead of the usage and jsonargparse's nested
        report of every union subtype it tried."""
        if not self.exit_on_error:  # jsonargparse is trying alternatives and catches this
            super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        options = [name for action in parser._actions for name in action.option_strings]
        print(error_line(one_line_error(message, options, self.argv)), file=sys.stderr)
        sys.exit(COMMAND_LINE)


class TTCCLI(LightningCLI):
    """LightningCLI plus `checkpoint` and `progress` sections and run-directory defaults under
    `trainer.default_root_dir`, which one fit run owns (`runs`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("parser_class", TTCArgumentParser)
        self.lock: runs.Claim | None = None
        self.new_logs: NewLogDirectory | None = None
        self.training_check: TrainingCheck | None = None
        try:
            super().__init__(*args, **kwargs)
        finally:
            if self.lock is not None:
                self.lock.close()

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyperparameters of a `--ckpt_path` file back into the config, over the command line
        (`--model.eval_num_samples 8` would be ignored), before the file is checked. ttc builds the model from the
        config alone and checks the checkpoint against it (`checkpoints.complete_state`)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_class_arguments(Progress, "progress")
        parser.add_argument(
            "--overwrite",
            action=ActionYesNo,
            default=False,
            help="fit: start a new run in a run directory that holds an earlier run's checkpoints, deleting them once "
            "the new run has loaded its model and data",
        )
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 50,
                # Besides last.ckpt, the newest periodic checkpoints (step=N.ckpt), to go back past a bad stretch.
                "checkpoint.monitor": "step",
                "checkpoint.mode": "max",
                "checkpoint.save_top_k": 3,
                "checkpoint.filename": "{step}",
                # The run directory belongs to one run (runs.claim), so a resumed run writes last.ckpt again rather
                # than last-v1.ckpt beside it, as Lightning would when the checkpoint interval changed.
                "checkpoint.enable_version_counter": False,
                "trainer.precision": None,
                "trainer.default_root_dir": "runs/ttc",
                # A step is a whole rollout: every one is worth a metrics row (Lightning's default is every 50th).
                "trainer.log_every_n_steps": 1,
                # Validation generates text: too slow to run as a sanity check before every fit.
                "trainer.num_sanity_val_steps": 0,
                # One row for the whole policy and a FLOPs column of 0: `ParameterCount` says what matters.
                "trainer.enable_model_summary": False,
            }
        )

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        """Lightning's parser, with ttc's words for each subcommand and where Lightning's docstrings speak of its own
        API (`helptext`), and a one-line usage (argparse's lists every option of the subcommand)."""
        for name, text in SUBCOMMANDS.items():
            kwargs = subparser_kwargs.setdefault(name, {})
            kwargs.setdefault("description", text)
            kwargs.setdefault("usage", f"ttc {name} [--config FILE] [options]")
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        action = getattr(self.parser, "_subcommands_action", None)
        for choice in getattr(action, "_choices_actions", []):
            choice.help = SUBCOMMANDS.get(choice.dest, choice.help)
        for name, parser in getattr(self, "_subcommand_parsers", {}).items():
            helptext.reword(parser, name)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Lightning's, without its warning about `args` given beside a command line: ttc passes the command line
        itself, its free-text values rewritten (`text_as_given`)."""
        self.config = parser.parse_args(args)

    def _run_subcommand(self, subcommand: str) -> None:
        """The subcommand; when it fails, the log directory it made goes if it logged nothing, and a `sys.exit`
        from code under the run is an error, not the end of a run that did not finish."""
        try:
            super()._run_subcommand(subcommand)
        except BaseException as e:
            if self.new_logs is not None:
                self.new_logs.remove_if_unused()
            if isinstance(e, SystemExit) and not stopped_by_user(e):
                raise stray_exit(e, subcommand) from e
            raise

    def after_fit(self) -> None:
        """A `fit` that trained nothing ends with status 3 and one line saying why, after its summary."""
        reason = None if self.training_check is None else nothing_trained(self.trainer, self.training_check)
        if reason is not None:
            raise NothingTrained(f"nothing trained: {reason}")

    def validate(self, **kwargs: Any) -> Any:
        """`trainer.validate`, its metrics printed by ttc (whole names, 4 decimals) instead of Lightning's table."""
        return self.trainer.validate(**{**kwargs, "verbose": False})

    def test(self, **kwargs: Any) -> Any:
        """`trainer.test`, its metrics printed by ttc instead of Lightning's table."""
        return self.trainer.test(**{**kwargs, "verbose": False})

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        strategy = str(getattr(trainer.strategy, "class_path", trainer.strategy)).rpartition(".")[2]
        if any(name in strategy.lower() for name in ("fsdp", "deepspeed")):
            raise sharded_strategy_error(strategy)
        self.resolve_defaults(config)
        # Before anything is built: the model, data, rewards, settings and W&B, every problem in one line.
        check_before_start(config, self.subcommand)
        if self.subcommand:  # a CLI built with run=False runs nothing: no checkpoint, no run directory to claim
            self._prepare_run(config)

    def _prepare_run(self, config: Any) -> None:
        """`--ckpt_path` resolved and checked, and under `fit` the run directory claimed (rank zero: the others
        start once it has), all before the model loads."""
        run = runs.run_dir(config)
        given = config.ckpt_path
        if self.subcommand == "fit" and config.trainer.enable_checkpointing is not False and rank_zero_only.rank == 0:
            # Claimed first, so that a run refused because another holds the directory says nothing else first.
            resume = given is not None and (given != "last" or run.last() is not None)
            self.lock = runs.claim(run, resume=resume, overwrite=config.overwrite)
        config.ckpt_path = runs.resolve_ckpt_path(given, self.subcommand, run)
        if config.ckpt_path is not None:
            runs.check_checkpoint(config.ckpt_path, given, self.subcommand, config.trainer.max_steps)

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
        csv = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": root, "name": "logs"}}
        if trainer.logger in (None, True):
            trainer.logger = csv
        elif trainer.logger is not False:
            # metrics.csv and logs/version_N/ beside W&B or another tracker: the first logger names the log directory.
            loggers = trainer.logger if isinstance(trainer.logger, list) else [trainer.logger]
            if not any(class_path_of(entry).endswith("CSVLogger") for entry in loggers):
                trainer.logger = [csv, *loggers]
        if _no_validation_split(config.data):
            # An empty validation loader still counts as a loop in Lightning and shifts logged steps on resume.
            trainer.limit_val_batches = 0
        sharding.fill_strategy_sizes(trainer, config.model)
        wandb_defaults(config)

    def best_metric(self) -> str:
        """What picks best.ckpt: the task's headline metric, or with `oracle_reward` on the patch task, the share of
        prompts whose final patch passes the (first) oracle."""
        oracles = self.model.scorer.oracle_names if isinstance(self.model, GRPOModule) else []
        if oracles and isinstance(self.datamodule, PrimeVulPatchDataModule):
            return f"oracle/{oracles[0]}/final_pass"
        return self.datamodule.headline_metric

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """ttc's progress (`progress_callback`) unless the config turns progress bars off or brings its own;
        checkpoints written atomically, and none at all with `trainer.enable_checkpointing: false`."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(progress_callback(self._get(self.config_init, "progress", default=Progress())))
        checkpointing = config.get("enable_checkpointing") is not False
        if self.subcommand == "fit":
            self.training_check = TrainingCheck()
            callbacks.append(self.training_check)
        if self.subcommand == "fit" and checkpointing:
            dirpath = self._get(self.config, "checkpoint").dirpath
            callbacks += [CheckpointOnInterrupt(dirpath), FinalCheckpoint()]
            if self.lock is not None:  # rank zero claimed the run directory: --overwrite deletes when training starts
                callbacks.append(runs.StartOver(self.lock))
            if config.get("limit_val_batches") != 0 and isinstance(self.datamodule, Task):
                callbacks.append(BestCheckpoint(dirpath, f"val/{self.best_metric()}"))
        extra = [self._get(self.config_init, key) for key in self._parser(self.subcommand).callback_keys]
        if not checkpointing:
            # The `checkpoint` section's ModelCheckpoint, which Lightning refuses beside enable_checkpointing false.
            extra = [c for c in extra if not isinstance(c, ModelCheckpoint)]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        trainer = self._instantiate_trainer({**config, **kwargs, "callbacks": callbacks, "plugins": plugins}, extra)
        quiet_wandb_start(trainer.loggers)
        name_metrics_file(trainer.loggers)
        self.new_logs = NewLogDirectory(trainer)
        return trainer


def _no_validation_split(data: Any) -> bool:
    """True when the data module is configured without validation data (`val_split`/`val_path` null)."""
    init_args = getattr(data, "init_args", None)
    if init_args is None:
        return False
    keys = [k for k in ("val_split", "val_path") if k in init_args]
    return bool(keys) and all(init_args[k] is None for k in keys)


def main(args: list[str] | None = None) -> None:
    """`ttc ARGS` in this process (`args`: the command line when None); the `ttc` command itself is `entry_point`."""
    with library_notices_hidden(), ttc_log_lines():
        try:
            run(args)
        finally:
            finish_wandb()


def entry_point() -> None:
    """The `ttc` command and `python -m ttc_lightning`: `main`, then an exit that threads left running cannot hold
    (`exit_despite_threads`)."""
    status = USER_ERROR  # an exception that escapes main: Python prints it and exits 1
    try:
        main()
        status = DONE
    except SystemExit as e:
        status = exit_status(e.code)
        raise
    finally:
        exit_despite_threads(status)


def run(args: list[str] | None) -> None:
    """`ttc ARGS`: export, or a LightningCLI subcommand; a `TTCError` ends it with one line and status 1 (3 for a `fit`
    that trained nothing)."""
    argv = config_after_subcommand(sys.argv[1:] if args is None else args)
    if argv in (["--version"], ["-V"]):
        print(f"ttc {importlib.metadata.version('ttc-lightning')}")
        return
    if argv and argv[0] in OTHER_COMMANDS:
        importlib.import_module(OTHER_COMMANDS[argv[0]]).main(argv[1:])
        return
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    try:
        check_config_files(argv)
        TTCCLI(
            GRPOModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToWandb,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=42,
            # The optimizer and its schedule are model options (learning_rate, lr_scheduler, ...): no --optimizer.
            auto_configure_optimizers=False,
            trainer_defaults={"callbacks": [SummaryTable(), RunInfo(), ParameterCount()]},
            # `export` is dispatched above, outside LightningCLI, whose list of subcommands cannot show it.
            parser_kwargs={
                "prog": "ttc",
                "description": "GRPO for code LLMs on PrimeVul. Subcommands: fit, validate, test, predict (below), "
                "export, generate and oracle (at the end). `ttc SUBCOMMAND --help` lists a subcommand's options.",
                "epilog": "export: `ttc export --ckpt_path CKPT --output_dir DIR [--merge]` writes a checkpoint as a "
                "Hugging Face model directory (LoRA adapter or merged model, with the tokenizer). generate: `ttc "
                "generate --ckpt_path CKPT --file FUNC.c` runs a checkpoint's policy on one function (`ttc generate "
                "--help`). oracle: `ttc oracle check [DIR] [--data FILE ...]` validates the patch oracle's harnesses "
                "on their PrimeVul records.",
            },
            args=text_as_given(nested_help(argv)),
        )
    except SIGTERMException:
        # Lightning turns SIGTERM into a clean exit (status 0); a script or scheduler must see the run was stopped.
        sys.exit(STOPPED)
    except KeyboardInterrupt:
        print("ttc: interrupted", file=sys.stderr)
        sys.exit(INTERRUPTED)
    except SystemExit as e:
        # Lightning answers Ctrl-C during a run with exit(1): the shell's convention is 128 + SIGINT.
        if isinstance(e.__context__, KeyboardInterrupt):
            sys.exit(INTERRUPTED)
        raise
    except Exception as e:
        # jsonargparse wraps errors raised while building the model or data module: find ours in the chain.
        # Lightning's MisconfigurationException is its user-error type (an accelerator this machine lacks, ...); an
        # OSError is the machine's (a read-only or full disk, a file where a directory should be); a config file
        # that is not UTF-8 fails in the YAML reader.
        cause = next(filter(None, (in_chain(e, kind) for kind in USER_ERRORS)), None)
        if cause is None:
            raise
        where = {MisconfigurationException: "trainer: ", UnicodeDecodeError: "a config file is not UTF-8 text: "}
        if isinstance(cause, OSError) and cause.filename is not None and cause.strerror:  # not "[Errno 13] ..."
            cause = f"{cause.filename}: {cause.strerror}"
        elif isinstance(cause, OSError) and cause.strerror and any(a.startswith("--print_config") for a in argv):
            cause = f"cannot write the printed config to the standard output: {cause.strerror}"  # > /dev/full
        print(error_line(f"{where.get(type(cause), '')}{cause}"), file=sys.stderr)
        sys.exit(getattr(cause, "exit_status", USER_ERROR))


USER_ERRORS: tuple[type[BaseException], ...] = (TTCError, MisconfigurationException, OSError, UnicodeDecodeError)


if __name__ == "__main__":
    entry_point()
