"""Every callback ttc adds to a run: the interrupt checkpoint, the progress bar or progress lines, the parameter
count, the end-of-run summary, the run metadata, and the W&B config and completions table (which do nothing without
a `WandbLogger`)."""

from __future__ import annotations

import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, cast

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.table import Table

from ttc_lightning.errors import TTCError
from ttc_lightning.run.tracking import completion_table, first_last, format_duration, plural, progress_line, run_info

log = logging.getLogger("ttc")


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
        self.started_at: int | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started_at = trainer.global_step

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Saving ends in a barrier: under DDP only SIGTERM reaches every rank together; an error raised on one
        # rank would leave the others waiting in a collective and the run would hang instead of exiting.
        if trainer.world_size > 1 and not isinstance(exception, SIGTERMException):
            return
        # Only a run that trained since it started has something to keep: one that failed while restoring, or in
        # its first step, would write a checkpoint no better than the one it resumed from (or a half-restored one).
        if trainer.state.fn == "fit" and self.started_at is not None and trainer.global_step > self.started_at:
            try:
                trainer.save_checkpoint(self.path, weights_only=False)
            except TTCError as e:  # non-finite weights: the run's earlier checkpoints stay the ones to resume from
                log.warning("interrupted at step %d; %s", trainer.global_step, e)
                return
            rank_zero_info(f"ttc: interrupted at step {trainer.global_step}; saved {self.path}")


class BestCheckpoint(L.Callback):
    """Saves `best.ckpt` beside `last.ckpt` whenever a validation during fit beats the best value so far of `metric`
    (the task's headline, higher is better: `val/P-C`, `val/final_patch_reward`). The best value travels in the
    checkpoints, so a resumed run only replaces `best.ckpt` with a better one. `ttc test --ckpt_path best` takes it.
    """

    def __init__(self, dirpath: str | Path, metric: str) -> None:
        self.path = Path(dirpath) / "best.ckpt"
        self.metric = metric
        self.best = -math.inf
        self.best_step: int | None = None
        self._warned = False

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            if not self._warned:  # e.g. no whole pair in the validation subset: nothing to compare
                log.warning("no finite %s after validation: best.ckpt is not updated", self.metric)
                self._warned = True
            return
        step, previous = trainer.global_step, self.best
        if float(value) > self.best:
            self.best, self.best_step = float(value), step
            trainer.save_checkpoint(self.path, weights_only=False)  # every rank: saving ends in a barrier
        # Every validation gets its line, on the console and in piped logs alike.
        if self.best_step == step and float(value) == self.best:
            before = f", up from {previous:.4f}" if math.isfinite(previous) else ""
            said = f"the best so far{before}: saved {self.path}"
        else:
            said = f"best {self.best:.4f}" + (f" at step {self.best_step}" if self.best_step is not None else "")
        rank_zero_info(f"ttc: validation at step {step}: {self.metric} {float(value):.4f}, {said}")

    def state_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("metric") == self.metric:
            self.best, self.best_step = state["best"], state.get("best_step")


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


@dataclass
class Progress:
    """How `ttc` shows progress: the `progress` section of the config."""

    mode: Literal["auto", "bar", "lines"] = "auto"
    """"bar": the rich progress bar (stdout); "lines": plain progress lines on stderr, for logs (SLURM, CI, nohup);
    "auto": the bar when stdout and stderr are both terminals, else lines."""
    every_n_steps: int = 10
    """Lines: one every this many optimizer steps, or after `every_n_seconds`, whichever comes first."""
    every_n_seconds: float = 30.0
    """Lines: the longest silence, in seconds; when loading the model, a step or a validation takes longer than
    that, a line says what the run is working on."""


def rollout_tokens(trainer: L.Trainer, pl_module: L.LightningModule) -> float:
    """Completion tokens the last rollout generated on all ranks (0 before the first)."""
    mean_length = trainer.callback_metrics.get("completions/mean_length")
    if mean_length is None:
        return 0.0
    # The logged length is the mean over all ranks; each rank generated as many completions as this one.
    return float(mean_length) * len(cast(HasRollout, pl_module).last_rollout) * trainer.world_size


def optional_metric(trainer: L.Trainer, name: str) -> float | None:
    """The metric's latest value, None when it was not logged (e.g. `kl` with beta 0)."""
    value = trainer.callback_metrics.get(name)
    return None if value is None else float(value)


class StepProgressBar(RichProgressBar):
    """The rich progress bar over the whole run: optimizer steps out of `trainer.max_steps` (the unit of
    `max_steps`, not the batches of an epoch), with reward and KL."""

    def __init__(self) -> None:
        # ".3g": a KL of 3e-05 would read 0.000 with three decimals.
        super().__init__(theme=RichProgressBarTheme(metrics_format=".3g"))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        # Only what the module shows (reward, KL): not Lightning's logger version ("v_num").
        return dict(trainer.progress_bar_metrics)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # One task for the whole run, created once: Lightning's resets it every epoch ("Epoch 6/-2").
        if self.is_enabled and self.progress is not None and self.train_progress_bar_id is None:
            self._add_train_task(trainer)
            self.refresh()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.is_enabled and self.train_progress_bar_id is None:  # resumed in the middle of an epoch
            self._add_train_task(trainer)
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
        if 0 < trainer.max_steps <= trainer.global_step:
            # Finished: the bar ends its line before Lightning's "`Trainer.fit` stopped" and the run summary print.
            self._stop_progress()

    def _add_train_task(self, trainer: L.Trainer) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else float("inf")
        self.train_progress_bar_id = self._add_task(total, "step")
        self._update(self.train_progress_bar_id, trainer.global_step)


class ProgressLines(ProgressBar):
    """Progress as plain lines on stderr (rank zero), for output that is not a terminal.

    After every `every_n_steps` optimizer steps, or at the first step that ends `every_n_seconds` after the last
    line, one line: the step out of `max_steps`, reward, KL (when beta > 0), seconds per step and completion tokens
    per second since the last line, and the ETA at that pace (`tracking.progress_line`). When nothing has been
    printed for `every_n_seconds` while the run is busy (loading the model, a long step, validation, test or predict
    batches), a watcher thread says what it is working on and for how long.
    """

    def __init__(
        self, every_n_steps: int = 10, every_n_seconds: float = 30.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__()
        if every_n_steps < 1 or every_n_seconds <= 0:
            raise TTCError(
                f"progress.every_n_steps must be >= 1 and progress.every_n_seconds > 0, got {every_n_steps} and "
                f"{every_n_seconds}"
            )
        self.every_n_steps = every_n_steps
        self.every_n_seconds = every_n_seconds
        self.clock = clock
        self._enabled = True
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._last_line = 0.0
        self._busy, self._busy_since = "set-up (loading the model)", 0.0
        # The rates of a line are measured from the previous line (or the start of training).
        self._mark_time, self._mark_step, self._tokens = 0.0, 0, 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # disables the callback on ranks other than zero
        if not self.is_enabled:
            return
        now = self.clock()
        self._last_line = now
        self._set_busy("set-up (loading the model)", now)
        if self._watcher is None or not self._watcher.is_alive():
            self._stop.clear()
            self._watcher = threading.Thread(target=self._watch, name="ttc-progress", daemon=True)
            self._watcher.start()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_watcher()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_watcher()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._mark_time, self._mark_step, self._tokens = self.clock(), trainer.global_step, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step + 1
        self._set_busy(f"step {step}/{trainer.max_steps}" if trainer.max_steps > 0 else f"step {step}")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if not self.is_enabled:
            return
        self._tokens += rollout_tokens(trainer, pl_module)
        now = self.clock()
        # Timed from the last step line: a "working on" line in between says less than the step line it would hold back.
        if trainer.global_step - self._mark_step >= self.every_n_steps or now - self._mark_time >= self.every_n_seconds:
            self._print_step(trainer, now)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled and trainer.global_step > self._mark_step:
            self._print_step(trainer, self.clock())

    def on_validation_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._set_busy(f"validation batch {batch_idx + 1}/{self.total_val_batches_current_dataloader}")

    def on_test_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._set_busy(f"test batch {batch_idx + 1}/{self.total_test_batches_current_dataloader}")

    def on_predict_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.has_dataloader_changed(dataloader_idx)
        self._set_busy(f"predict batch {batch_idx + 1}/{self.total_predict_batches_current_dataloader}")

    def _print_step(self, trainer: L.Trainer, now: float) -> None:
        steps = trainer.global_step - self._mark_step
        seconds = max(now - self._mark_time, 1e-9)
        line = progress_line(
            trainer.global_step,
            trainer.max_steps,
            seconds_per_step=seconds / max(steps, 1),
            tokens_per_second=self._tokens / seconds,
            reward=optional_metric(trainer, "reward"),
            kl=optional_metric(trainer, "kl"),
        )
        self._mark_time, self._mark_step, self._tokens = now, trainer.global_step, 0.0
        self._emit(f"ttc: {line}", now)

    def _set_busy(self, what: str, now: float | None = None) -> None:
        with self._lock:
            self._busy, self._busy_since = what, self.clock() if now is None else now

    def _emit(self, line: str, now: float) -> None:
        with self._lock:
            self._last_line = now
            # Looked up at each line, so that a redirected or captured stderr receives it.
            print(line, file=sys.stderr, flush=True)

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.every_n_seconds)):
            self.check_busy()

    def check_busy(self) -> None:
        """Print what the run is working on if it has been at it, with nothing printed, for `every_n_seconds` (the
        watcher's tick). Short steps never are: the step line at the end of one says more."""
        now = self.clock()
        with self._lock:
            busy, since = self._busy, self._busy_since
            quiet = min(now - self._last_line, now - since) >= self.every_n_seconds
        if quiet:
            self._emit(f"ttc: working on {busy} for {format_duration(now - since)}", now)

    def _stop_watcher(self) -> None:
        self._stop.set()
        if self._watcher is not None and self._watcher is not threading.current_thread():
            self._watcher.join(timeout=5)
        self._watcher = None


def readable_count(n: int) -> str:
    """1543714304 -> "1.5 B", 8 -> "8"."""
    return get_human_readable_count(n).strip()  # Lightning pads small counts for its table's alignment


class ParameterCount(L.Callback):
    """At the start of `fit`, one line (rank zero): the policy's parameters and how many of them train. It stands in
    for Lightning's model summary, which ttc turns off: one row for the whole policy, and no FLOPs without an
    example input."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        policy = getattr(pl_module, "policy", None) or pl_module
        if hasattr(policy, "get_nb_trainable_parameters"):  # peft: counts 4-bit weights unpacked
            trained, total = policy.get_nb_trainable_parameters()
        else:
            total = sum(p.numel() for p in policy.parameters())
            trained = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        share = 100 * trained / max(total, 1)
        rank_zero_info(
            f"ttc: policy: {readable_count(total)} parameters, {readable_count(trained)} trained ({share:.3g}%)"
        )


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
        self.tokens += rollout_tokens(trainer, pl_module)

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
            f"[bold]ttc[/bold]: {plural(len(self.history), 'rollout')} in this run (to step {trainer.global_step}), "
            f"reward {start:.3f} -> {end:.3f} (mean of the first and last {n}), last checkpoint: {ckpt}",
            soft_wrap=True,
        )
