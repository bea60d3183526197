"""How a `ttc` command ends: its exit status, a `fit` that trained nothing, a `sys.exit` called by code under the run
(which did not finish it), and the log directory of a command that failed before it logged anything.

Exit status: 0 done; 1 a user error (one line `ttc: error: ...`: a config, data, checkpoint or reward error, a file
that cannot be written, a run stopped by a `sys.exit` under it); 2 a command line that does not parse; 3 a `fit` that
ended without training (no optimizer step, or every one skipped); 130 interrupted (Ctrl-C); 143 stopped by SIGTERM
(or SIGHUP during a fit).
"""

from __future__ import annotations

import atexit
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from ttc_lightning.errors import Terminated, TTCError
from ttc_lightning.run.progress import plural

DONE, USER_ERROR, COMMAND_LINE, NOTHING_TRAINED = 0, 1, 2, 3
INTERRUPTED, STOPPED = 128 + signal.SIGINT, 128 + signal.SIGTERM
EXIT_GRACE_S = 5.0  # how long the command waits at its end for threads it did not start as daemons
# What a command writes in its log directory before it has run anything (`SaveConfigToWandb`, the CSV logger's
# hyperparameters, `RunInfo`): a directory that holds nothing else recorded nothing of the run.
STARTUP_FILES = frozenset({"config.yaml", "hparams.yaml", "run_info.json"})


class NothingTrained(TTCError):
    """A `fit` that ended without an error but changed no weight: exit status 3, so a script does not take it for a
    trained run."""

    exit_status = NOTHING_TRAINED


class TrainingCheck(L.Callback):
    """What a `fit` trained, for `nothing_trained`: the optimizer step it started at, the skipped-step count then,
    and the rollouts it made."""

    def __init__(self) -> None:
        self.started_at: int | None = None
        self.skipped_at = 0
        self.rollouts = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started_at, self.skipped_at, self.rollouts = trainer.global_step, _skipped(pl_module), 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.rollouts += 1


def _skipped(module: L.LightningModule) -> int:
    """The optimizer steps `GRPOModule`'s guard skipped so far (non-finite loss or gradient norm)."""
    guard = getattr(module, "guard", None)
    return int(getattr(guard, "skipped", 0))


def nothing_trained(trainer: L.Trainer, check: TrainingCheck) -> str | None:
    """Why a `fit` that ended without an error left the weights as they were, or None when it trained."""
    steps = 0 if check.started_at is None else trainer.global_step - check.started_at
    if steps > 0:
        if _skipped(trainer.lightning_module) - check.skipped_at < steps:
            return None
        return (
            f"every optimizer step of the run ({steps}) had a NaN or infinite loss or gradient norm and was skipped, "
            "so the weights are as they were: check the reward functions' values (rollouts.jsonl) and "
            "model.learning_rate"
        )
    if trainer.max_steps == 0:
        return "trainer.max_steps is 0: set it to the number of optimizer steps to train"
    if trainer.limit_train_batches == 0:
        return "trainer.limit_train_batches is 0: there is no training batch to learn from"
    hparams = getattr(trainer.lightning_module, "hparams", {})
    if check.rollouts and hparams.get("dynamic_sampling"):
        return (
            f"every group's rewards tied (the run's {plural(check.rollouts, 'rollout')}): no advantage to learn from, "
            "so dynamic sampling made no optimizer step. Use rewards that tell a prompt's completions apart "
            "(rewards/<fn>/std in metrics.csv is 0) or prompts the policy neither always solves nor always fails"
        )
    if check.rollouts == 0:
        return "the run ended before its first rollout (trainer.max_epochs, max_time or an empty training split)"
    return f"the run's {plural(check.rollouts, 'rollout')} made no optimizer step"


def stopped_by_user(error: SystemExit) -> bool:
    """The exits Lightning makes of a SIGTERM and of Ctrl-C (`sys.exit(1)` while handling the KeyboardInterrupt), and
    ttc's own of a SIGTERM during checks it waits for (`Terminated`)."""
    return isinstance(error, SIGTERMException | Terminated) or isinstance(error.__context__, KeyboardInterrupt)


def stray_exit(error: SystemExit, subcommand: str) -> TTCError:
    """A `sys.exit` from code the run called (a callback, a data module, a library under them): the run did not
    finish, so its status is neither 0 nor the one that code chose. Names where it was called."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    where = f" at {frame.tb_frame.f_code.co_filename}:{frame.tb_lineno}" if frame is not None else ""
    code = "" if error.code is None else repr(error.code)
    return TTCError(f"`ttc {subcommand}` stopped before it finished: sys.exit({code}) was called{where}")


class NewLogDirectory:
    """The log directory a command is about to write (`logs/version_N`, the first logger's when it is the CSV logger,
    on rank zero) and those of its parents that do not exist yet, so that a command that fails before it logs
    anything leaves no empty version behind (`remove_if_unused`)."""

    def __init__(self, trainer: L.Trainer) -> None:
        self.created: list[Path] = []
        first = trainer.loggers[0] if trainer.loggers else None
        if rank_zero_only.rank != 0 or not isinstance(first, CSVLogger):
            return
        # The next free version: CSVLogger picks it once, on this first look, and writes there later.
        path = Path(first.log_dir)
        self.created = [p for p in (path, *path.parents) if not p.exists()]

    def remove_if_unused(self) -> None:
        """Removes the directory when it holds nothing but `STARTUP_FILES`, and the parents created with it that
        are empty then."""
        if not self.created or not self.created[0].is_dir():
            return
        files = list(self.created[0].iterdir())
        if any(p.name not in STARTUP_FILES or not p.is_file() for p in files):
            return
        for path in files:
            path.unlink()
        for directory in self.created:
            try:
                directory.rmdir()
            except OSError:  # not empty: another command writes there too
                return


def exit_status(code: object) -> int:
    """The status the interpreter makes of `sys.exit(code)`: 0 for None, an int as it is, 1 for anything else (a
    message it prints)."""
    if code is None:
        return DONE
    return code if isinstance(code, int) else USER_ERROR


def exit_despite_threads(status: int, grace: float = EXIT_GRACE_S) -> None:
    """Makes sure the process ends with `status`: Python waits for every thread that is not a daemon before it exits,
    so one that a reward function or a library under it left running would hold the process forever after the run
    finished. Should such threads still run `grace` seconds from now, one line names them, the exit handlers run
    (logs flushed, checks killed, temporary files removed) and the process ends without them. Only for the `ttc`
    command itself: a program that runs `main` keeps its threads."""

    def end() -> None:
        time.sleep(grace)
        main = threading.main_thread()
        left = [t.name for t in threading.enumerate() if t.is_alive() and not t.daemon and t is not main]
        if not left:  # the interpreter is past its threads, in its own exit handlers: let it finish
            return
        print(
            f"ttc: warning: exiting without waiting for {plural(len(left), 'thread')} still running "
            f"({', '.join(left)}): a reward function, or a library it uses, started them and did not end them; end "
            "such threads, or start them as daemons",
            file=sys.stderr,
        )
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # closed, or a broken pipe: nothing more can reach it
                pass
        os._exit(status)

    threading.Thread(target=end, name="ttc-exit", daemon=True).start()
