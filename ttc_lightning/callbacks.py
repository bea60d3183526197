"""A checkpoint when a run is interrupted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


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
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"ttc: interrupted at step {trainer.global_step}; saved {self.path}")
