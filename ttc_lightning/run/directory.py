"""Run directories: a `trainer.default_root_dir` belongs to one training run, and `--ckpt_path last`/`best` name that
run's checkpoints.

`ttc fit` without `--ckpt_path` refuses a run directory that already holds checkpoints (resume it with
`--ckpt_path last`, start over with `--overwrite`, or choose another directory), and a lock keeps a second `ttc fit`
out of a directory while one runs. `--overwrite` deletes the earlier checkpoints only once the new run has loaded
its model and data, so a run refused before it starts leaves them as they were. `last` is the newest (by
modification time) of the run's `last.ckpt`, `last-interrupted.ckpt` and `hpc_ckpt_N.ckpt`; `best` is its
`checkpoints/best.ckpt`.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

from ttc_lightning.errors import TTCError
from ttc_lightning.run.checkpoints import read_checkpoint
from ttc_lightning.run.progress import plural
from ttc_lightning.run.saving import remove_partial_files

log = logging.getLogger("ttc")

LOCK_FILE = ".ttc-fit.lock"
# ModelCheckpoint's `last.ckpt` (with the version Lightning adds when the name is taken) and the interrupt checkpoint.
LAST = re.compile(r"^last(-v\d+)?(-interrupted)?\.ckpt$")
HPC = "hpc_ckpt_*.ckpt"  # Lightning's SLURM checkpoints, in the run directory itself


@dataclass(frozen=True)
class RunDir:
    """A run directory (`trainer.default_root_dir`) and the directory its checkpoints go to."""

    root: Path
    checkpoints: Path

    def checkpoint_files(self) -> list[Path]:
        """Every checkpoint the run wrote."""
        found = sorted(self.checkpoints.glob("*.ckpt")) if self.checkpoints.is_dir() else []
        return found + sorted(self.root.glob(HPC))

    def last(self) -> Path | None:
        """What `--ckpt_path last` means: the newest of last*.ckpt and hpc_ckpt_N.ckpt."""
        candidates = [p for p in self.checkpoint_files() if LAST.match(p.name) or p.match(HPC)]
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)


def resolve_ckpt_path(value: str | None, subcommand: str, run: RunDir) -> str | None:
    """`--ckpt_path` as a file: `last` and `best` within `run`, said in the log. `last` with no checkpoint starts a
    new run under `fit` (so a job can always pass it) and is an error for evaluation, which would otherwise score
    the untrained base model; leave `--ckpt_path` out for that."""
    if value is None and subcommand != "fit":
        # A run's directory in the config does not mean its checkpoint: say which model this is, and how to pick one.
        last = run.last()
        hint = f"; --ckpt_path last takes {last}" if last is not None else ""
        log.info("no --ckpt_path: %s runs the base model, not a trained policy%s", subcommand, hint)
        return None
    if value not in ("last", "best"):
        close = difflib.get_close_matches(str(value).lower(), ("last", "best"), n=1, cutoff=0.6) if value else []
        if close and not Path(value).exists():  # `lastt`: a typo of a keyword, not a missing file
            raise TTCError(
                f"--ckpt_path {value}: no such file; did you mean {close[0]}? (a checkpoint file, last or best)"
            )
        return value
    path = run.last() if value == "last" else run.checkpoints / "best.ckpt"
    if path is None or not path.is_file():
        if value == "last" and subcommand == "fit":
            log.info("--ckpt_path last: no checkpoint in %s yet, starting a new run", run.checkpoints)
            return None
        what = "last.ckpt or last-interrupted.ckpt" if value == "last" else "best.ckpt"
        how = "train first" if value == "last" else "train with a validation split (data.val_split) first"
        raise TTCError(
            f"--ckpt_path {value}: {run.checkpoints} holds no {what}; give a checkpoint file, {how}, or leave "
            f"--ckpt_path out to {subcommand} the base model"
        )
    return str(path)


def check_checkpoint(path: str, given: str, subcommand: str, max_steps: int) -> None:
    """The checkpoint at `path` (`--ckpt_path given`) must be readable, so that a damaged file is an error now,
    before the model is built, and under `fit` have steps left to train; says which file and step it is."""
    if path == "hpc" or "://" in path:
        return
    step = read_checkpoint(path).get("global_step", 0)
    if subcommand == "fit" and 0 < max_steps <= step:
        raise TTCError(
            f"--ckpt_path: {path} is already at max_steps {max_steps} (step {step}); raise --trainer.max_steps to "
            "continue"
        )
    log.info("checkpoint %s (step %d)%s", path, step, f", from --ckpt_path {given}" if given != path else "")


class Claim(contextlib.ExitStack):
    """A run directory claimed by a fit (`claim`): its locks, held until closed, and, with `--overwrite`, the earlier
    run's checkpoints, deleted by `start_over` once the new run has started (`StartOver`)."""

    def __init__(self, run: RunDir) -> None:
        super().__init__()
        self.run = run
        self.earlier: list[Path] = []

    def start_over(self) -> None:
        """Delete the earlier run's checkpoints (`--overwrite`): the new run loaded its model and data, so nothing
        that can refuse it is left, and a run refused before this point keeps them."""
        earlier, self.earlier = self.earlier, []
        for path in earlier:
            path.unlink(missing_ok=True)
        if earlier:
            log.warning(
                "--overwrite: deleted %s of the earlier run in %s", plural(len(earlier), "checkpoint"), self.run.root
            )


class StartOver(L.Callback):
    """Calls `Claim.start_over` when training starts: after the data and the model are set up and the optimizers
    built, before the first step."""

    def __init__(self, claimed: Claim) -> None:
        self.claimed = claimed

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.claimed.start_over()


def claim(run: RunDir, resume: bool, overwrite: bool) -> Claim:
    """Make `run` this fit's: lock it against a second `ttc fit` (its checkpoint directory too, when that is
    elsewhere) and, for a new run (`resume` false), require it to hold no checkpoints, or with `overwrite` mark them
    for deletion when the run starts (`Claim.start_over`). Returns the claim, its locks held until closed (none
    where the file system has no locks)."""
    if resume and overwrite:
        raise TTCError("--overwrite starts the run over and --ckpt_path resumes it: give one of them")
    claimed = Claim(run)
    try:
        for directory, option in _lock_targets(run):
            made = _first_missing(directory)
            held_lock = _lock(directory, option)
            if held_lock is not None:
                claimed.enter_context(held_lock)
            if made is not None:
                # Runs while the lock is still held (last in, first out), so no other fit is using the directory.
                claimed.callback(_remove_if_unused, made)
        held = run.checkpoint_files()
        slurm_resume = SLURMEnvironment.detect() and any(p.match(HPC) for p in held)
        if held and not resume and not slurm_resume:  # under SLURM, Lightning resumes hpc_ckpt files by itself
            if not overwrite:
                newest = max(held, key=lambda p: p.stat().st_mtime)
                raise TTCError(
                    f"{run.root} already holds a run ({plural(len(held), 'checkpoint')}, the newest {newest}): resume "
                    "it with --ckpt_path last, start it over with --overwrite (deletes its checkpoints), or choose "
                    "another --trainer.default_root_dir"
                )
            claimed.earlier = held
        remove_partial_files(run.checkpoints)
    except BaseException:
        claimed.close()
        raise
    return claimed


def _lock_targets(run: RunDir) -> list[tuple[Path, str]]:
    """The directories a fit must hold alone, with the option that names each."""
    targets = [(run.root, "--trainer.default_root_dir")]
    if run.checkpoints.resolve() != (run.root / "checkpoints").resolve():
        targets.append((run.checkpoints, "--checkpoint.dirpath"))
    return targets


def _first_missing(directory: Path) -> Path | None:
    """The outermost directory on the way to `directory` that does not exist yet (None when it exists)."""
    missing = None
    path = directory.absolute()
    while not path.exists():
        missing, path = path, path.parent
    return missing


def _remove_if_unused(made: Path) -> None:
    """Remove `made`, a directory this fit created, when it holds nothing but lock files and empty directories: a
    run refused before it wrote anything (a bad option value, a missing file) leaves no directory behind."""
    if not made.is_dir():
        return
    tree = list(os.walk(made, topdown=False))
    if any(name != LOCK_FILE for _, _, files in tree for name in files):
        return
    for parent, directories, files in tree:
        for name in files:
            Path(parent, name).unlink(missing_ok=True)
        for name in directories:
            with contextlib.suppress(OSError):  # a link to a directory stays, and so then does `made`
                Path(parent, name).rmdir()
    with contextlib.suppress(OSError):
        made.rmdir()


def _lock(root: Path, option: str = "--trainer.default_root_dir") -> IO[str] | None:
    root.mkdir(parents=True, exist_ok=True)
    lock = (root / LOCK_FILE).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise TTCError(
            f"{root} is in use by another `ttc fit` (process {holder}); wait for it to end, or choose another {option}"
        ) from None
    except OSError:  # a file system without locks: go on unlocked
        lock.close()
        return None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def run_dir(config: Any) -> RunDir:
    """The run directory of a parsed subcommand config (after `checkpoint.dirpath` got its default)."""
    root = Path(config.trainer.default_root_dir)
    return RunDir(root, Path(config.checkpoint.dirpath or root / "checkpoints"))
