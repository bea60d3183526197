"""How checkpoints are written: atomically (a temporary file renamed into place, the directory synced), never
half; `last.ckpt` at the end of fit whatever the interval, `last-interrupted.ckpt` when fit stops on an exception,
`best.ckpt` at the best validation."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ttc_lightning.errors import TTCError, naming_file
from ttc_lightning.run.checkpoints import unreadable

log = logging.getLogger("ttc")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file beside its target and renames it into place, so a run killed while
    saving leaves the previous file whole; reading a damaged file is a one-line error.

    Lightning's own save stages the file in the system's temporary directory, and moving it from there to another
    file system is a plain copy into the target: a kill during that copy truncates `last.ckpt`.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if "://" in str(path):  # remote storage: Lightning's own transaction
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with naming_file(path), partial.open("wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        _fsync_dir(path.parent)

    def load_checkpoint(
        self, path: Any, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if not Path(path).is_file() and "://" not in str(path):
            raise TTCError(f"--ckpt_path: {path} does not exist")
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except Exception as e:
            raise unreadable(path, e) from None


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (a crash of the machine right after it keeps the new file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_partial_files(directory: str | Path) -> None:
    """Temporary files left by a save that was killed (`AtomicCheckpointIO`); only while no run writes there."""
    for path in Path(directory).glob(".*.partial"):
        path.unlink(missing_ok=True)


def sigterm_between_steps(trainer: L.Trainer) -> None:
    """Under several processes, make SIGTERM stop every rank together at the next step's start.

    Lightning's SIGTERM handler broadcasts the signal from rank 0 from inside the handler, wherever the process is:
    in the middle of another collective (FSDP2 gathers weights on every pass; DDP all-reduces gradients) the ranks'
    collectives no longer pair up and the run hangs. Its training loop also broadcasts the flag at each step's start,
    where every rank is at the same point; ttc's handler only records the signal (and passes it on to the processes
    the launcher started, as Lightning's does), and that broadcast stops the run.
    """
    handler, connector = signal.getsignal(signal.SIGTERM), trainer._signal_connector
    handlers = getattr(handler, "signal_handlers", None)
    if trainer.world_size < 2 or handlers is None:
        return

    def record(signum: int, frame: Any) -> None:
        launcher = trainer.strategy.launcher
        if not connector.received_sigterm and launcher is not None:
            launcher.kill(signum)
        connector.received_sigterm = True

    handler.signal_handlers = [record if h == connector._sigterm_notifier_fn else h for h in handlers]


def hangup_as_sigterm() -> None:
    """SIGHUP (the terminal of a run started without `nohup` closed, an ssh session dropped) stops the run as SIGTERM
    does, with its interrupt checkpoint and exit status 143, instead of killing it at once. A SIGHUP that the user
    chose to ignore (`nohup`) stays ignored."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_DFL:
        signal.signal(signal.SIGHUP, lambda signum, frame: os.kill(os.getpid(), signal.SIGTERM))


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
        scorer = getattr(pl_module, "scorer", None)
        if scorer is not None and trainer.world_size == 1:  # ranks stop together, at a step's start (scoring.py)
            scorer.when_stuck = functools.partial(self.save_held, trainer, pl_module)

    def save_held(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The save of a SIGTERM, from another thread, while a reward function holds the training thread (the
        process then exits without unwinding it): the step's state is as the exception would have found it."""
        self.on_exception(trainer, pl_module, SIGTERMException(128 + signal.SIGTERM))
        for logger in trainer.loggers:
            logger.save()

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


class FinalCheckpoint(L.Callback):
    """Writes `last.ckpt` at the end of `fit` when the newest save was at an earlier step. Lightning's ModelCheckpoint
    saves `last` at the end only when it has never saved one: a run of 36 steps that saves every 20 would end with
    `last.ckpt` at step 20, and resuming it would train steps 21 to 36 again."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.save_last:
            return
        if not checkpoint._should_skip_saving_checkpoint(trainer):  # trained since its last save, and fitting
            # Runs on every rank (saving ends in a barrier); Lightning's own end-of-fit save then finds it done.
            checkpoint._save_last_checkpoint(trainer, checkpoint._monitor_candidates(trainer))


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
