"""The one exception type for user mistakes: `ttc` prints it on one line and exits non-zero, without a traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class TTCError(Exception):
    """A mistake the user can fix (bad config value, bad data file, bad reward function)."""


class Terminated(SystemExit):
    """SIGTERM, where ttc answers it by raising (exit status 143): a stop the user asked for, not a failure."""

    def __init__(self) -> None:
        super().__init__(143)


def data_error(path: str | Path, line: int | None, field: str | None, message: str) -> TTCError:
    """`file:line: field: message`, the form every data error takes so users can jump to the spot."""
    where = f"{path}:{line}" if line is not None else str(path)
    return TTCError(f"{where}: {field}: {message}" if field else f"{where}: {message}")


def sharded_strategy_error(strategy: str) -> TTCError:
    """Why ttc refuses FSDP (the first version) and DeepSpeed, and what to use instead."""
    return TTCError(
        f"trainer.strategy: ttc does not run under {strategy}; to shard the model use FSDP2 through "
        "lightning.pytorch.strategies.ModelParallelStrategy (configs/fsdp.yaml), or keep a whole model on each GPU "
        "with ddp"
    )


@contextmanager
def naming_file(path: str | Path) -> Iterator[None]:
    """An OSError while writing `path` becomes a `TTCError` that names it: a full disk's `[Errno 28] No space left
    on device` (raised by a write or a flush) names no file, and a directory that turned read-only names the staging
    file being written (`.last.ckpt.<pid>.partial`), not the one the user knows."""
    try:
        yield
    except Exception as e:
        # torch.save meets a full disk inside its zip writer, whose clean-up then raises a RuntimeError of its own
        # ("unexpected pos"): the OSError is in that one's context.
        cause = in_chain(e, OSError)
        if cause is None:
            raise
        raise TTCError(f"cannot write {path}: {cause.strerror or cause}") from e


def in_chain(error: BaseException, kind: type[BaseException]) -> BaseException | None:
    """The first exception of type `kind` in `error`'s chain of causes and contexts (`error` itself first)."""
    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, kind):
        cause = cause.__cause__ or cause.__context__
    return cause


def error_line(message: object) -> str:
    """`ttc: error: MESSAGE` on one line, whatever the message holds: a report of several lines (a library's, an
    exception a reward function raised) has its lines joined with " | ", blank lines and indentation dropped, so a
    log reader or a script that takes the line gets all of it."""
    lines = [line.strip() for line in str(message).splitlines()]
    return "ttc: error: " + " | ".join(line for line in lines if line)
