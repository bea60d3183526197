"""Callbacks: the end-of-run summary line, and a checkpoint when a run is interrupted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from rich.console import Console


class RunSummary(L.Callback):
    """Prints the mean reward of the first and last few steps when `fit` ends, so progress is visible at a glance."""

    def __init__(self, window: int = 3) -> None:
        self.window = window
        self.rewards: list[float] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        reward = trainer.callback_metrics.get("reward")
        if reward is not None:
            self.rewards.append(float(reward))

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.rewards:
            return
        n = min(self.window, len(self.rewards))
        start, end = sum(self.rewards[:n]) / n, sum(self.rewards[-n:]) / n
        ckpt = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none"
        Console(stderr=True).print(
            f"[bold]ttc[/bold]: {len(self.rewards)} steps, reward {start:.3f} -> {end:.3f} "
            f"(mean of the first and last {n}), last checkpoint: {ckpt}"
        )


class CheckpointOnInterrupt(L.Callback):
    """Saves `last-interrupted.ckpt` when fit stops on an exception (Ctrl-C, SIGTERM, a crash).

    The name starts with "last", so `--ckpt_path last` considers it alongside `last.ckpt` and takes the newer.
    Unlike Lightning's OnExceptionCheckpoint it does not make a plain `ttc fit` resume by itself.
    """

    def __init__(self, dirpath: str | Path) -> None:
        self.path = Path(dirpath) / "last-interrupted.ckpt"

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == "fit" and trainer.global_step > 0:
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"ttc: interrupted at step {trainer.global_step}; saved {self.path}")
