"""Progress on the console: a bar on a terminal, one line per interval in a log file (`progress_callback` picks), the
parameter count when fit starts and the end-of-run summary table."""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar, Timer
from lightning.pytorch.callbacks.progress.rich_progress import RichProgressBarTheme
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ttc_lightning.errors import TTCError
from ttc_lightning.run.console import is_terminal
from ttc_lightning.training.rollout import nan_mean_std


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


def rollout_tokens(trainer: L.Trainer, outputs: Any) -> float:
    """Completion tokens the step's rollout generated on all ranks, from its metrics and `outputs` (what
    `training_step` returned: its rollout's records on this rank)."""
    mean_length = trainer.callback_metrics.get("completions/mean_length")
    if mean_length is None:
        return 0.0
    # The logged length is the mean over all ranks; each rank generated as many completions as this one.
    records = outputs.get("rollout", []) if isinstance(outputs, Mapping) else []
    return float(mean_length) * len(records) * trainer.world_size


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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
        if not self.is_enabled:
            return
        self._tokens += rollout_tokens(trainer, outputs)
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

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any) -> None:
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
        self.tokens += rollout_tokens(trainer, outputs)

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.history:
            return
        n = min(self.window, len(self.history))
        means = first_last(self.history, n)
        table = Table()  # its title printed on its own line, which rich would pad with blanks to the table's width
        table.add_column("reward")
        table.add_column(f"first {n}", justify="right")
        table.add_column(f"last {n}", justify="right")
        for key in sorted(means, key=lambda k: k != "reward"):  # the total first, then each function
            first, last = means[key]
            label = "total (weighted)" if key == "reward" else key.removeprefix("rewards/").removesuffix("/mean")
            table.add_row(escape(label), f"{first:.3f}", f"{last:.3f}")
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none"
        facts = {
            "optimizer steps": str(trainer.global_step),
            "rollouts": str(len(self.history)),
            "completion tokens": f"{round(self.tokens):,}",
            "wall time": format_duration(time.perf_counter() - self.started),
            "last checkpoint": ckpt,
            "ended by": ended_by(trainer),
        }
        width = max(map(len, facts))
        console = Console(stderr=True)
        console.print("ttc run summary", table, sep="\n")
        lines = "\n".join(f"{name:<{width}}  {value}" for name, value in facts.items())
        console.print(lines, soft_wrap=True, markup=False, highlight=False)  # a path may hold [brackets]
        start, end = means["reward"]
        console.print(
            f"[bold]ttc[/bold]: {plural(len(self.history), 'rollout')} in this run (to step {trainer.global_step}), "
            f"reward {start:.3f} -> {end:.3f} (mean of the first and last {n}), last checkpoint: {escape(ckpt)}",
            soft_wrap=True,
        )


def ended_by(trainer: L.Trainer) -> str:
    """What ended a fit that stopped without an error: the limit it reached."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is not None and remaining <= 0:
        return f"trainer.max_time ({format_duration(timer._duration)})"  # type: ignore[union-attr]
    if trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
        return f"trainer.max_steps ({trainer.max_steps})"
    if trainer.max_epochs is not None and trainer.max_epochs != -1 and trainer.current_epoch >= trainer.max_epochs:
        return f"trainer.max_epochs ({trainer.max_epochs})"
    return "a callback that stopped the run (its own line says why)"


def first_last(history: Sequence[Mapping[str, float]], window: int) -> dict[str, tuple[float, float]]:
    """Mean of each metric over the first and over the last `window` entries of `history` (NaNs skipped)."""
    keys = list(dict.fromkeys(key for entry in history for key in entry))
    head, tail = history[:window], history[-window:]
    return {
        key: (
            float(nan_mean_std(torch.tensor([e.get(key, math.nan) for e in head], dtype=torch.float64))[0]),
            float(nan_mean_std(torch.tensor([e.get(key, math.nan) for e in tail], dtype=torch.float64))[0]),
        )
        for key in keys
    }


def plural(n: int, noun: str) -> str:
    """1, "rollout" -> "1 rollout"; 3 -> "3 rollouts"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def format_duration(seconds: float) -> str:
    """3725.2 -> "1:02:05"."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def eta_seconds(step: int, max_steps: int | None, seconds_per_step: float) -> float | None:
    """Seconds left at `seconds_per_step` for the steps from `step` to `max_steps` (None without a step limit)."""
    if not max_steps or max_steps <= 0:
        return None
    return max(max_steps - step, 0) * seconds_per_step


def progress_line(
    step: int,
    max_steps: int | None,
    seconds_per_step: float,
    tokens_per_second: float,
    reward: float | None = None,
    kl: float | None = None,
) -> str:
    """`step 12/40 | reward 0.412 | kl 0.0031 | 2.41 s/step | 312 tok/s | ETA 0:01:07`, the parts that are known.

    `tokens_per_second`: completion tokens generated (all ranks) per wall-clock second.
    """
    parts = [f"step {step}/{max_steps}" if max_steps and max_steps > 0 else f"step {step}"]
    if reward is not None:
        parts.append(f"reward {reward:.3f}")
    if kl is not None:
        parts.append(f"kl {kl:.3g}")
    parts += [f"{seconds_per_step:.2f} s/step", f"{tokens_per_second:.0f} tok/s"]
    eta = eta_seconds(step, max_steps, seconds_per_step)
    if eta is not None:
        parts.append(f"ETA {format_duration(eta)}")
    return " | ".join(parts)


def progress_callback(progress: Progress) -> ProgressBar:
    """The rich bar when stdout (where it draws) and stderr are terminals; else plain lines on stderr, which a log
    file (SLURM, CI, nohup) shows as they come instead of one bar at the end. `progress.mode` overrides the choice."""
    terminal = is_terminal(sys.stdout) and is_terminal(sys.stderr)
    if progress.mode == "bar" or (progress.mode == "auto" and terminal):
        return StepProgressBar()
    return ProgressLines(progress.every_n_steps, progress.every_n_seconds)
