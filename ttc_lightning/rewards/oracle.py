"""`oracle_reward`: software tests as the patch task's reward. Each patched function is built with its record's
harness and run against the proof of vulnerability and the functional tests (`ttc_lightning.oracle`)."""

from __future__ import annotations

import functools
import logging
import numbers
import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ttc_lightning.errors import TTCError
from ttc_lightning.oracle.check import Budget, Verdict, VerdictCache, check_function, grade, harness_problem
from ttc_lightning.oracle.harness import HARNESSES, Harness, find_harnesses
from ttc_lightning.oracle.sandbox import run_parallel
from ttc_lightning.rewards.patch import apply_completion

log = logging.getLogger("ttc")
_verdicts = VerdictCache()
_stats_lock = threading.Lock()
_stats: dict[str, dict[str, float]] = {}  # by harness directory: two oracle entries report their own numbers


def oracle_reward(
    completions: list[str],
    *,
    id: list[str],  # noqa: A002 - the patch task's column of record ids
    vulnerable_func: list[str],
    harnesses: str | None = None,
    workers: int | None = None,
    compile_timeout: float = 60.0,
    max_memory_mb: int = 2048,
    **columns: list[Any],
) -> list[float | None]:
    """Score each patched function by building it with its record's harness and running the harness's cases.

    The keyword arguments after `vulnerable_func` configure it; bind them once with `functools.partial` (a config's
    `args`). Per completion:

    1. Its SEARCH/REPLACE edits are applied to `vulnerable_func`; -1.0 when malformed or unappliable.
    2. The record's harness is `<harnesses>/<id>` (`harnesses`: a directory of harnesses, default the ones shipped
       with ttc, `ttc_lightning/assets/harnesses`); a record without one gets no score (None).
    3. The patched function is compiled with the harness under AddressSanitizer and UndefinedBehaviorSanitizer
       (`compile_timeout` seconds at most), then the proof of vulnerability runs, then, when it passes, each test,
       every process contained by `ttc_lightning.oracle.sandbox` (its own directory, CPU, memory, file size and
       process limits, no network where the machine allows it, killed with all it started) and each case limited
       to the harness's `timeout`; `max_memory_mb` bounds the compiler's and each case's memory.
    4. The reward (`ttc_lightning.oracle.check.grade`): 0.0 does not compile, or changes code outside the function
       (a definition beside it, a `#define`, `asm` or a constructor: `ttc_lightning.oracle.scope`; never built);
       0.25 compiles, the proof still fails; 0.5 + 0.4 x the share of tests passed when the proof passes but a test
       fails; 1.0 when everything passes.

    Each distinct patched function is checked once per harness for the whole run (verdicts are cached by the
    harness's files and the function's text), `workers` at once (default: the machine's cores). The reward's
    stage times and cache hits are logged per step as `rewards/<name>/<stat>`. A missing compiler or a harness
    directory that cannot be read is a configuration mistake: TTCError.
    """
    budget = _budget(workers, compile_timeout, max_memory_mb)
    by_idx = _harnesses(harnesses)
    if len(id) != len(completions) or len(vulnerable_func) != len(completions):
        raise TTCError(
            f"oracle_reward: got {len(completions)} completions but {len(id)} id and {len(vulnerable_func)} "
            "vulnerable_func values; the columns need one value per completion"
        )
    rewards: list[float | None] = [None] * len(completions)
    jobs: dict[tuple[str, str], tuple[Harness, str, str, list[int]]] = {}
    hits = 0
    for i, (completion, idx, vulnerable) in enumerate(zip(completions, id, vulnerable_func, strict=True)):
        harness = by_idx.get(str(idx))
        if harness is None:
            continue
        patched, _ = apply_completion(completion, vulnerable)
        if patched is None:
            rewards[i] = -1.0
            continue
        key = VerdictCache.key(harness, patched)
        cached = _verdicts.get(key)
        if cached is not None:
            rewards[i] = grade(cached)
            hits += 1
            continue
        jobs.setdefault(key, (harness, patched, vulnerable, []))[3].append(i)
    started = time.monotonic()
    verdicts = run_parallel(
        lambda job, stop: check_function(job[0], job[1], budget, stop, original=job[2]),
        list(jobs.values()),
        workers or _cores(),
    )
    for (key, (_, _, _, indices)), verdict in zip(jobs.items(), verdicts, strict=True):
        _verdicts.put(key, verdict)
        for i in indices:
            rewards[i] = grade(verdict)
    _count(_root(harnesses), verdicts, hits, len(jobs), time.monotonic() - started if jobs else 0.0)
    return rewards


def check_rows(
    rows: Sequence[Mapping[str, Any]],
    *,
    harnesses: str | None = None,
    workers: int | None = None,
    compile_timeout: float = 60.0,
    max_memory_mb: int = 2048,
    **_: Any,
) -> None:
    """Before a run: every harness of the rows' records holds for them (the real fix passes the proof and every
    test, the vulnerable function fails the proof; `ttc oracle check` also tries a do-nothing patch), and at least
    one record has a harness. TTCError naming the harness otherwise. The verdicts seed the cache."""
    budget = _budget(workers, compile_timeout, max_memory_mb)
    by_idx = _harnesses(harnesses)
    found: dict[str, tuple[Harness, str, str]] = {}
    for row in rows:
        if not {"id", "vulnerable_func", "fixed_func"} <= set(row):
            raise TTCError(
                "oracle_reward scores the patch task's rows (columns id, vulnerable_func, fixed_func): use it with "
                "ttc_lightning.data.PrimeVulPatchDataModule"
            )
        harness = by_idx.get(str(row["id"]))
        if harness is not None:
            found[harness.idx] = (harness, row["vulnerable_func"], row["fixed_func"])
    if not found:
        root = HARNESSES if harnesses is None else harnesses
        raise TTCError(
            f"oracle_reward: none of the data's {len(rows)} records has a harness in {root}: it would score nothing; "
            "give `harnesses` a directory holding harnesses for them (`ttc oracle check DIR --data FILE` checks one)"
        )
    started = time.monotonic()

    def judge(job: tuple[Harness, str, str], stop: threading.Event) -> str | None:
        harness, vulnerable, fixed = job
        verdicts = [check_function(harness, f, budget, stop, original=vulnerable) for f in (fixed, vulnerable)]
        for function, verdict in zip((fixed, vulnerable), verdicts, strict=True):
            _verdicts.put(VerdictCache.key(harness, function), verdict)
        problem = harness_problem(harness, *verdicts)
        return None if problem is None else f"{harness.directory}: {problem}"

    problems = run_parallel(judge, list(found.values()), workers or _cores())
    problem = next((p for p in problems if p is not None), None)
    if problem is not None:
        raise TTCError(f"oracle_reward: harness {problem} (`ttc oracle check` shows every harness)")
    log.info("oracle: %d harnesses hold for their records (%.1f s)", len(found), time.monotonic() - started)


def take_stats(harnesses: str | None = None, **_: Any) -> dict[str, float]:
    """The numbers of the oracle's calls with `harnesses` since the last call, summed: `checks` (functions built),
    `cache_hits` (completions scored from an earlier verdict), `compile_s` and `run_s` (seconds spent in the
    compiler and in the cases, summed over workers), `wall_s` (seconds the checks took)."""
    with _stats_lock:
        return _stats.pop(_root(harnesses), {})


# Read by the scorer (`ttc_lightning.rewards.scoring`): the rows checked before a run, the numbers logged per step.
oracle_reward.check_rows = check_rows  # type: ignore[attr-defined]
oracle_reward.take_stats = take_stats  # type: ignore[attr-defined]


def _count(root: str, verdicts: list[Verdict], hits: int, checks: int, wall: float) -> None:
    with _stats_lock:
        stats = _stats.setdefault(root, {})
        for name, value in (
            ("checks", checks),
            ("cache_hits", hits),
            ("compile_s", sum(v.compile_seconds for v in verdicts)),
            ("run_s", sum(v.run_seconds for v in verdicts)),
            ("wall_s", wall),
        ):
            stats[name] = stats.get(name, 0.0) + value


def _budget(workers: Any, compile_timeout: Any, max_memory_mb: Any) -> Budget:
    if workers is not None and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 1):
        raise TTCError(
            f"oracle_reward: workers must be an integer of at least 1, or null (every core), got {workers!r}"
        )
    if (
        not isinstance(compile_timeout, numbers.Real)
        or isinstance(compile_timeout, bool)
        or not 0 < compile_timeout <= 3600
    ):
        raise TTCError(f"oracle_reward: compile_timeout must be seconds above 0, at most 3600, got {compile_timeout!r}")
    if not isinstance(max_memory_mb, int) or isinstance(max_memory_mb, bool) or max_memory_mb < 64:
        raise TTCError(f"oracle_reward: max_memory_mb must be an integer of at least 64, got {max_memory_mb!r}")
    return Budget(float(compile_timeout), max_memory_mb)


def _root(directory: str | None) -> str:
    return str((HARNESSES if directory is None else Path(directory).expanduser()).resolve())


def _harnesses(directory: str | None) -> dict[str, Harness]:
    return _load(_root(directory))


@functools.cache
def _load(root: str) -> dict[str, Harness]:
    """The harnesses under `root`, read once per run."""
    return find_harnesses(Path(root))


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
