"""Every callback ttc adds to a run: the interrupt checkpoint, the progress bar, the end-of-run summary, the run
metadata, and the W&B config and completions table (which do nothing without a `WandbLogger`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol, cast

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from rich.console import Console
from rich.table import Table

from ttc_lightning.errors import TTCError
from ttc_lightning.tracking import completion_table, first_last, format_duration, run_info


class HasRollout(Protocol):
    """What the callbacks read of the module: the last rollout's records (this rank's completions)."""

    last_rollout: list[dict[str, Any]]


class CheckpointOnInterrupt(L.Callback):
    """Saves `last-interrupted.ckpt` when fit stops on an exception (Ctrl-C, SIGTERM, a crash).

    The name starts with "last", so `--ckpt_path last` considers it alongside `last.ckpt` and takes the newer.
    Unlike Lightning's OnExceptionCheckpoint it does not make a plain `ttc fit` resume by itself. Under DDP it
    saves on SIGTERM only (see `on_exception`).
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last-interrupted.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Saving ends in a barrier: under DDP only SIGTERM reaches every rank together; an error raised on one
        # rank would leave the others waiting in a collective and the run would hang instead of exiting.
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            try:
                trainer.save_checkpoint(self.path)
            except TTCError as e:  # non-finite weights: the run's earlier checkpoints stay the ones to resume from
                rank_zero_warn(f"ttc: interrupted at step {trainer.global_step}; {e}")
                return
            rank_zero_info(f"ttc: interrupted at step {trainer.global_step}; saved {self.path}")


class SaveConfigToWandb(SaveConfigCallback):
    """Saves config.yaml as Lightning does, and also puts the resolved config in the W&B run's config."""

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in loggers:
            logger.experiment.config.update({"config": config}, allow_val_change=True)


class RunInfo(L.Callback):
    """Writes `run_info.json` to the run directory and adds it to every logger's hyperparameters (rank zero)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir or trainer.default_root_dir  # every rank: log_dir is a collective call
        if not trainer.is_global_zero:
            return
        info = run_info(trainer)
        path = Path(log_dir) / "run_info.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        for logger in trainer.loggers:
            logger.log_hyperparams({"run_info": info})


class CompletionsTable(L.Callback):
    """Every `every_n_steps` rollouts, logs its prompts, completions, rewards and advantages as a W&B table.

    Reads `pl_module.last_rollout` (this rank's completions); does nothing unless a logger is a `WandbLogger`.
    The same rows are in `rollouts.jsonl` whatever the logger.
    """

    def __init__(self, every_n_steps: int = 10, key: str = "completions") -> None:
        if every_n_steps < 1:
            raise TTCError(f"CompletionsTable.every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.key = key

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        records = cast(HasRollout, pl_module).last_rollout
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not records or not loggers or records[0]["step"] % self.every_n_steps:
            return
        columns, rows = completion_table(records)
        for logger in loggers:
            logger.log_table(key=self.key, columns=columns, data=rows, step=trainer.global_step)


class StepProgressBar(RichProgressBar):
    """The rich progress bar, with the optimizer step (the unit of `max_steps`) shown next to reward and KL."""

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # A string: the bar formats numbers as floats ("3.000").
        return {"step": str(trainer.global_step), **super().get_metrics(trainer, pl_module)}


class SummaryTable(L.Callback):
    """At the end of `fit`, prints (stderr, rank zero) the first vs last reward per function, completion tokens,
    wall time and the checkpoint, then the one-line `reward A -> B` summary.

    First and last are means over `window` rollouts, so one noisy step does not decide the verdict.
    """

    def __init__(self, window: int = 3) -> None:
        self.window = window
        self.history: list[dict[str, float]] = []
        self.tokens = 0.0
        self.started = time.perf_counter()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # before the model loads, so the wall time includes it
            self.history, self.tokens, self.started = [], 0.0, time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        metrics = trainer.callback_metrics
        if "reward" not in metrics:
            return
        self.history.append(
            {
                key: float(value)
                for key, value in metrics.items()
                if key == "reward" or (key.startswith("rewards/") and key.endswith("/mean"))
            }
        )
        mean_length = metrics.get("completions/mean_length")
        if mean_length is not None:
            # The logged length is the mean over all ranks; each rank generated as many completions as this one.
            rows = len(cast(HasRollout, pl_module).last_rollout)
            self.tokens += float(mean_length) * rows * trainer.world_size

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        n = min(self.window, len(self.history))
        means = first_last(self.history, n)
        table = Table(title="ttc run summary", title_justify="left")
        table.add_column("reward")
        table.add_column(f"first {n}", justify="right")
        table.add_column(f"last {n}", justify="right")
        for key in sorted(means, key=lambda k: k != "reward"):  # the total first, then each function
            first, last = means[key]
            label = "total (weighted)" if key == "reward" else key.removeprefix("rewards/").removesuffix("/mean")
            table.add_row(label, f"{first:.3f}", f"{last:.3f}")
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none"
        facts = Table.grid(padding=(0, 2))
        facts.add_row("optimizer steps", str(trainer.global_step))
        facts.add_row("rollouts", str(len(self.history)))
        facts.add_row("completion tokens", f"{round(self.tokens):,}")
        facts.add_row("wall time", format_duration(time.perf_counter() - self.started))
        facts.add_row("last checkpoint", ckpt)
        console = Console(stderr=True)
        console.print(table, facts)
        start, end = means["reward"]
        console.print(
            f"[bold]ttc[/bold]: {len(self.history)} steps, reward {start:.3f} -> {end:.3f} "
            f"(mean of the first and last {n}), last checkpoint: {ckpt}",
            soft_wrap=True,
        )
