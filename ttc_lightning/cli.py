"""`ttc`: the LightningCLI with ttc's defaults (automatic precision, run directory layout, clean user errors)."""

from __future__ import annotations

import signal
import sys
import warnings
from typing import Any

import lightning as L
import torch
from jsonargparse import set_parsing_settings
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ttc_lightning.callbacks import CheckpointOnInterrupt, RunInfo, SaveConfigToWandb, StepProgressBar, SummaryTable
from ttc_lightning.errors import TTCError, sharded_strategy_error
from ttc_lightning.module import GRPOModule
from ttc_lightning.tracking import prepare_wandb


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


class TTCCLI(LightningCLI):
    """LightningCLI plus a `checkpoint` section and run-directory defaults under `trainer.default_root_dir`."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(
            {
                "checkpoint.save_last": True,
                "checkpoint.every_n_train_steps": 50,
                "checkpoint.save_top_k": 0,
                "trainer.precision": None,
                "trainer.default_root_dir": "runs/ttc",
                # Validation generates text: too slow to run as a sanity check before every fit.
                "trainer.num_sanity_val_steps": 0,
            }
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.trainer
        strategy = str(getattr(trainer.strategy, "class_path", trainer.strategy)).rpartition(".")[2]
        if any(name in strategy.lower() for name in ("fsdp", "stage_3", "stage3")):
            raise sharded_strategy_error(strategy)
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
        # Before anything is built: a missing wandb package or login stops here, in one line.
        prepare_wandb(config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        """A rich progress bar unless the config turns progress bars off or brings its own."""
        config = self._get(self.config_init, "trainer", default={})
        callbacks = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(StepProgressBar())
        if self.subcommand == "fit":
            callbacks.append(CheckpointOnInterrupt(self._get(self.config, "checkpoint").dirpath))
        return super().instantiate_trainer(callbacks=callbacks, **kwargs)


def _no_validation_split(data: Any) -> bool:
    """True when the data module is configured without validation data (`val_split`/`val_path` null)."""
    init_args = getattr(data, "init_args", None)
    if init_args is None:
        return False
    keys = [k for k in ("val_split", "val_path") if k in init_args]
    return bool(keys) and all(init_args[k] is None for k in keys)


def main(args: list[str] | None = None) -> None:
    """Entry point of the `ttc` command."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        from ttc_lightning.export import main as export_main

        export_main(argv[1:])
        return
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    # One optimizer step per pass is ttc's design, so "the checkpoint holds the post-step state" is what we want.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    try:
        TTCCLI(
            GRPOModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfigToWandb,
            save_config_kwargs={"overwrite": True},
            seed_everything_default=42,
            trainer_defaults={"callbacks": [SummaryTable(), RunInfo()]},
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
