"""Reward functions at work: scoring a batch with the loaded `model.rewards` (`entries.py`), in parallel, each call
under a time limit, every value checked.

A reward function is `fn(completions: list[str], **columns) -> list[float | None]`. A value may be any real number
(Python, numpy or a 0-d torch tensor) or None (no score); the list may be a tuple or a 1-d numpy array or tensor.
A bool, NaN or an infinity is refused: a bool is most likely a check's result returned by mistake, and a non-finite
reward would turn the loss into NaN.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from contextlib import contextmanager
from typing import Any, Literal

import torch
from torch import Tensor

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.entries import Reward, unwrapped
from ttc_lightning.rewards.oracle import oracle_reward

log = logging.getLogger("ttc")

RewardErrors = Literal["raise", "skip"]
_ONE_EACH = "it must return one float or None per completion"
_FLOAT32_MAX = torch.finfo(torch.float32).max  # rewards are kept in float32
_SLICE = 0.2  # seconds the runner waits at a time for calls on worker threads, so that it notices a SIGTERM
# Seconds a call running in the training thread may hold a SIGTERM (a bare `except:` that swallows the exception
# which stops it) before the run saves without it and exits: under SLURM's default KillWait of 30 s, with time to save.
STOP_GRACE = 15.0


class RewardScorer:
    """Scores a batch's completions with every reward function.

    The functions run in parallel, at most `workers` at once, each call given `timeout` seconds (None: no limit).
    With one worker and no limit they run one after the other in the calling thread. A call that raises (sys.exit
    included) or runs out of time stops training (`errors="raise"`) or leaves its completions unscored
    (`errors="skip"`), counted in the step's `rewards/<name>/errors`. A `TTCError` (a configuration mistake) and a
    malformed value always stop it.

    A call past its limit cannot be stopped (Python cannot kill a thread): it runs on in a daemon thread, which
    does not hold the step or the exit of the program, and what it returns is dropped.

    Each call gets its own shallow copies of the completions and of every column (lists): a function that appends
    to, sorts or clears them changes neither what the next function scores nor what the step records.
    """

    def __init__(
        self, rewards: Sequence[Reward], workers: int = 1, timeout: float | None = None, errors: RewardErrors = "raise"
    ) -> None:
        self.rewards = list(rewards)
        self.names = [reward.name for reward in self.rewards]
        self.workers, self.timeout, self.errors = workers, timeout, errors
        self.when_stuck: Callable[[], None] | None = None
        """What saves the run when a call holds a SIGTERM past `STOP_GRACE` seconds (`run_calls`); set by the run."""
        self._warned: set[str] = set()

    def score(self, completions: list[str], columns: dict[str, list], group_size: int) -> tuple[Tensor, Tensor | None]:
        """`[N, F]` float32 scores, NaN for no score, and under `errors="skip"` the `[F]` count of failed calls
        (None otherwise)."""
        for reward in self.rewards:
            _check_bound_columns(reward, columns)
        calls = []
        for reward in self.rewards:
            own_completions, own_columns = _copies(completions, columns)
            calls.append(functools.partial(reward.fn, own_completions, **own_columns))
        outcomes = run_calls(calls, self.workers, self.timeout, self.when_stuck)
        n = len(completions)
        # Explicit dtypes: under `bf16-true` the default dtype inside a step is bfloat16 (8 bits of mantissa).
        scores = torch.full((n, len(self.rewards)), float("nan"), dtype=torch.float32)
        failed = torch.zeros(len(self.rewards), dtype=torch.float32)
        for j, (reward, outcome) in enumerate(zip(self.rewards, outcomes, strict=True)):
            problem = self._problem(reward, outcome, completions, columns, group_size)
            if problem is None:
                values = checked_values(reward.name, outcome.result(), n, columns, group_size)
                scores[:, j] = torch.tensor(values, dtype=torch.float64)
            else:
                log.warning("%s; its %d completions go unscored (model.reward_errors: skip)", problem, n)
                failed[j] = 1
        self._warn_unscored(scores, failed, n)
        return scores, failed if self.errors == "skip" else None

    @property
    def oracle_names(self) -> list[str]:
        """The names of the entries that are `oracle_reward` (whose scores evaluation reads as verdicts)."""
        return [reward.name for reward in self.rewards if unwrapped(reward.fn)[0] is oracle_reward]

    def check_rows(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Before a run: each reward function's own check of the rows it will score (its `check_rows` attribute,
        called with the rows and the entry's `args`, as `oracle_reward` checks its harnesses)."""
        for reward in self.rewards:
            fn, args = unwrapped(reward.fn)
            check = getattr(fn, "check_rows", None)
            if callable(check):
                check(rows, **args)

    def take_stats(self) -> dict[str, float]:
        """`rewards/<name>/<stat>`: the numbers a reward function keeps about its own work (its `take_stats`
        attribute, called with the entry's `args` and returning them since its last call, as `oracle_reward` does
        for each harness directory), for the step's metrics."""
        stats: dict[str, float] = {}
        for reward in self.rewards:
            fn, args = unwrapped(reward.fn)
            take = getattr(fn, "take_stats", None)
            if callable(take):
                stats |= {f"rewards/{reward.name}/{k}": float(v) for k, v in take(**args).items()}
        return stats

    def _problem(
        self, reward: Reward, outcome: Future | None, completions: list[str], columns: dict[str, list], g: int
    ) -> str | None:
        """What went wrong with a call that raised or ran out of time, under `errors="skip"`; raises otherwise."""
        if outcome is None:
            problem = (
                f"reward function {reward.name} did not return within model.reward_timeout={self.timeout:g} s "
                f"on the batch's {len(completions)} completions{_ids(columns, g)}"
            )
            if self.errors == "raise":
                raise TTCError(f"{problem}; raise the limit, or set model.reward_errors: skip to go on without it")
            return problem
        error = outcome.exception()
        if error is None:
            return None
        if isinstance(error, TTCError):
            raise error
        problem = f"reward function {reward.name} {_failure(error)}"
        if self.errors == "raise":
            raise TTCError(f"{problem}{self._where_it_fails(reward, completions, columns, g)}") from error
        return f"{problem}{_ids(columns, g)}"

    def _where_it_fails(self, reward: Reward, completions: list[str], columns: dict[str, list], g: int) -> str:
        """` on prompt P of the batch (id ...)` for a call that raised: the one prompt of a batch of one, else the
        first whose group alone makes `reward` raise again. The search calls the function again on one group at a
        time (its side effects repeat), through the same runner, within one more `timeout` in all; when it finds no
        such prompt in that time, ` on the batch's N completions (prompt ids ...)`."""
        prompts = len(completions) // g
        if prompts == 1:
            return f" on {_prompt(0, columns, g)}"
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        for p in range(prompts):
            limit = None if deadline is None else deadline - time.monotonic()
            if limit is not None and limit <= 0:
                break
            rows = slice(p * g, (p + 1) * g)
            [outcome] = run_calls(
                [functools.partial(reward.fn, completions[rows], **{k: v[rows] for k, v in columns.items()})], 1, limit
            )
            if outcome is None:  # out of time
                break
            if outcome.exception() is not None:
                return f" on {_prompt(p, columns, g)}"
        return f" on the batch's {len(completions)} completions{_ids(columns, g)}"

    def _warn_unscored(self, scores: Tensor, failed: Tensor, n: int) -> None:
        """Once per function that scores none of a batch, and at every batch that no function scored at all."""
        for j, name in enumerate(self.names):
            if not failed[j] and torch.isnan(scores[:, j]).all() and name not in self._warned:
                self._warned.add(name)
                log.warning(
                    "reward function %s gave no score (None) to any of a batch's %d completions; it adds nothing "
                    "to their rewards (shown once per run)",
                    name,
                    n,
                )
        if torch.isnan(scores).all():
            log.warning(
                "no reward function scored any of this batch's %d completions: every reward is 0 and the batch "
                "teaches nothing",
                n,
            )


def run_calls(
    calls: Sequence[Callable[[], Any]],
    workers: int,
    timeout: float | None,
    when_stuck: Callable[[], None] | None = None,
) -> list[Future | None]:
    """Run `calls`, at most `workers` at once, each given `timeout` seconds; their futures in order, None for a call
    still running at its deadline (its thread is left behind, and what it returns later is dropped).

    With one worker and no limit the calls run one after the other in the calling thread, else each in a thread of
    its own while the calling thread waits, `_SLICE` seconds at a time. A SIGTERM that arrives meanwhile in the main
    thread, where a Python handler is in place (Lightning's, during a run), runs that handler and then stops the
    wait with `SIGTERMException`, as Lightning stops a run at the end of a step: calls still running are left
    behind as late ones are. In the calling thread the exception is raised from the handler, inside the call; a
    call blocked in C code that does not return to Python when interrupted holds it until it does. Not in a
    process that is one of several ranks (torch.distributed): a rank that left in the middle of a step would leave
    the others waiting in its collectives, so the ranks stop together where Lightning stops them.
    A call that holds the stop longer than `STOP_GRACE` seconds (it swallows the exception, or does not
    return from C code) is not waited for: `when_stuck` (saving the run) is called from another thread, and the
    process exits with status 143.
    """
    with _stopped_by_sigterm(inside_calls=workers == 1 and timeout is None, when_stuck=when_stuck) as sigterm:
        if workers == 1 and timeout is None:
            with _ctrl_c_seen() as ctrl_c:
                futures = [_call_here(call, sigterm, ctrl_c) for call in calls]
            if sigterm.is_set():  # a call that caught the exception and returned
                raise _sigterm_exception()
            return futures
        futures = [Future() for _ in calls]
        waiting = deque(range(len(calls)))
        running: dict[int, float] = {}  # call -> deadline
        late: set[int] = set()
        while waiting or running:
            while waiting and len(running) < workers:
                i = waiting.popleft()
                _start(calls[i], futures[i])
                running[i] = math.inf if timeout is None else time.monotonic() + timeout
            limit = min(_SLICE, max(0.0, min(running.values()) - time.monotonic()))
            wait([futures[i] for i in running], limit, return_when=FIRST_COMPLETED)
            if sigterm.is_set():
                raise _sigterm_exception()
            now = time.monotonic()
            for i, deadline in list(running.items()):
                if futures[i].done() or now >= deadline:
                    del running[i]
                    if not futures[i].done():
                        late.add(i)
        return [None if i in late else future for i, future in enumerate(futures)]


@contextmanager
def _stopped_by_sigterm(inside_calls: bool, when_stuck: Callable[[], None] | None) -> Iterator[threading.Event]:
    """While the block runs in the main thread and SIGTERM has a Python handler: the handler in its place runs it,
    then sets the event yielded, and with `inside_calls` raises `SIGTERMException` where the main thread is and
    starts `_exit_if_held`."""
    received, left = threading.Event(), threading.Event()
    previous = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
    # Not in another thread (signals reach the main thread only), under SIG_DFL / SIG_IGN, or in one of several ranks.
    if not callable(previous) or _one_of_several_ranks():
        yield received
        return

    def handler(signum: int, frame: Any) -> None:
        try:
            previous(signum, frame)
        finally:
            received.set()
        if inside_calls:
            if not watching:
                watching.append(threading.Thread(target=_exit_if_held, args=(left, when_stuck), daemon=True))
                watching[0].start()
            raise _sigterm_exception()

    watching: list[threading.Thread] = []
    signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        left.set()
        signal.signal(signal.SIGTERM, previous)  # also where a reward function set one of its own (SIG_IGN)


def _exit_if_held(left: threading.Event, when_stuck: Callable[[], None] | None) -> None:
    """Unless the calls are left within `STOP_GRACE` seconds of the SIGTERM: `when_stuck`, then exit 143 at once."""
    if left.wait(STOP_GRACE):
        return
    print(
        f"ttc: a reward function held the stop for {STOP_GRACE:g} s after SIGTERM (it caught the exception that ends "
        "it, or is blocked in C code); stopping without it",
        file=sys.stderr,
        flush=True,
    )
    try:
        if when_stuck is not None:
            when_stuck()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(128 + signal.SIGTERM)


@contextmanager
def _ctrl_c_seen() -> Iterator[threading.Event]:
    """An event set when SIGINT arrives while the block runs (its handler is then run as before); set from the start
    where this thread cannot see it (not the main thread, or no Python handler), so that every KeyboardInterrupt
    counts as Ctrl-C there."""
    seen = threading.Event()
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        seen.set()
        yield seen
        return

    def handler(signum: int, frame: Any) -> None:
        seen.set()
        previous(signum, frame)

    signal.signal(signal.SIGINT, handler)
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, previous)


def _one_of_several_ranks() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _sigterm_exception() -> BaseException:
    """Lightning's SIGTERMException, which ttc answers with exit status 143 after saving last-interrupted.ckpt."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # loaded by then: a run is under way

    return SIGTERMException(128 + signal.SIGTERM)


def _failure(error: BaseException) -> str:
    """What a call that failed did: `raised ValueError: ...`, or `called sys.exit(3)`."""
    if isinstance(error, SystemExit):
        return f"called sys.exit({'' if error.code is None else repr(error.code)})"
    return f"raised {type(error).__name__}" + (f": {error}" if str(error) else "")


def _call_here(call: Callable[[], Any], stopped: threading.Event, ctrl_c: threading.Event) -> Future:
    """`call` in this thread. Whatever it raises is its failure, `sys.exit` and other `BaseException`s included (a
    reward that exits has not finished the run), except Ctrl-C (a `KeyboardInterrupt` with a SIGINT behind it, which
    `ctrl_c` says) and the SIGTERM exception that `stopped` says the handler raised inside it: those stop the run."""
    future: Future = Future()
    try:
        future.set_result(call())
    except KeyboardInterrupt as e:
        if ctrl_c.is_set():
            raise
        future.set_exception(e)  # raised by the function itself
    except BaseException as e:
        if stopped.is_set():
            raise
        future.set_exception(e)
    return future


def _start(call: Callable[[], Any], future: Future) -> None:
    def run() -> None:
        try:
            result = call()
        except BaseException as e:
            future.set_exception(e)
        else:
            future.set_result(result)

    # A daemon: a call past its limit must not keep the program from exiting.
    threading.Thread(target=run, name="ttc-reward", daemon=True).start()


def _copies(completions: list[str], columns: Mapping[str, list]) -> tuple[list[str], dict[str, list]]:
    """A call's own shallow copies of the completions and the columns: a function that mutates them changes
    neither the next function's arguments nor the step's records."""
    return list(completions), {name: list(values) for name, values in columns.items()}


def _check_bound_columns(reward: Reward, columns: Mapping[str, list]) -> None:
    """A column named like a bound argument would silently replace it in the call."""
    bound = reward.fn.keywords if isinstance(reward.fn, functools.partial) else {}
    clash = sorted(set(bound) & set(columns))
    if clash:
        raise TTCError(
            f"reward function {reward.name}: the batch has a column {clash[0]!r}, which would replace the argument "
            "of that name bound in model.rewards; rename the argument or the column"
        )


def checked_values(name: str, values: Any, n: int, columns: Mapping[str, list], g: int) -> list[float]:
    """A reward function's values for `n` completions as floats (NaN for None); TTCError naming the function and
    the prompt for a wrong count or a value that is not a finite real number."""
    if getattr(values, "ndim", None) is not None and hasattr(values, "tolist"):  # a numpy array or a tensor
        if values.ndim != 1:
            raise TTCError(f"reward function {name} returned an array of shape {tuple(values.shape)}; {_ONE_EACH}")
        values = values.tolist()
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TTCError(f"reward function {name} returned {type(values).__name__}; {_ONE_EACH}")
    if len(values) != n:
        raise TTCError(
            f"reward function {name} returned {len(values)} values for {n} completions ({n // g} prompts x {g}); "
            f"{_ONE_EACH}"
        )
    return [_checked_value(name, value, i, columns, g) for i, value in enumerate(values)]


def _checked_value(name: str, value: Any, i: int, columns: Mapping[str, list], g: int) -> float:
    if value is None:
        return math.nan
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # a numpy scalar, 0-d array or 0-d tensor
        value = value.item()
    where = f"completion {i % g} of {_prompt(i // g, columns, g)}"
    if isinstance(value, bool):
        raise TTCError(
            f"reward function {name} returned {value!r} for {where}; a bool is not taken as a reward (it is most "
            "often a check's result returned by mistake): return float(...) to score it 0.0 or 1.0"
        )
    if not isinstance(value, numbers.Real):
        raise TTCError(f"reward function {name} returned {value!r} for {where}; expected a float or None")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf if value > 0 else -math.inf
    if not abs(number) <= _FLOAT32_MAX:
        raise TTCError(
            f"reward function {name} returned {number} for {where}; rewards must be finite, within float32's range "
            "(None means no score)"
        )
    return number


def _prompt(p: int, columns: Mapping[str, list], g: int) -> str:
    """`prompt P of the batch`, with the row's id when the batch has one."""
    ids = columns.get("id")
    return f"prompt {p} of the batch" + (f" (id {ids[p * g]})" if ids else "")


def _ids(columns: Mapping[str, list], g: int) -> str:
    ids = columns.get("id")
    return f" (prompt ids {', '.join(str(i) for i in ids[::g])})" if ids else ""
