"""A checkpoint when a run is interrupted."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info


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
