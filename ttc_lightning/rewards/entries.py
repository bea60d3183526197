"""`model.rewards` entries: an import path, or a function with options bound to it once (`functools.partial`) and
the name it is logged under; imported and checked before a run."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ttc_lightning.errors import TTCError

RewardFn = Callable[..., Sequence[float | None]]

_SPEC_KEYS = ("function", "args", "name")


_ENTRY = "an entry is an import path, or a mapping with `function` (an import path), `args` and `name`"


@dataclass(frozen=True)
class RewardSpec:
    """A reward function with options bound to it once (`functools.partial`), e.g. `command_reward`'s command."""

    function: str
    """Import path of the function, e.g. ttc_lightning.rewards.command_reward."""
    args: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments bound to the function; each must be a parameter it names."""
    name: str | None = None
    """Name in the logs (rewards/<name>/mean); null for the function's own name."""


@dataclass(frozen=True)
class Reward:
    """A loaded reward function and the name its scores are logged under."""

    name: str
    fn: RewardFn


def import_reward(path: str, where: str) -> Any:
    """`package.module.function` -> the function; a clear error when it cannot be imported."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise TTCError(f"{where}: {path!r} is not an import path like 'package.module.function'; {_ENTRY}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise TTCError(f"{where}: cannot import {path!r} ({type(e).__name__}: {e})") from None
    except SyntaxError as e:
        raise TTCError(f"{where}: cannot import {path!r}: {e.filename}:{e.lineno}: {e.msg}") from None
    except Exception as e:  # the module's own code failed as it was imported
        frames = traceback.extract_tb(e.__traceback__)
        at = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
        raise TTCError(f"{where}: importing {module_name!r} raised {type(e).__name__}: {e}{at}") from None
    except SystemExit as e:  # a module that ends the program as it is imported has not finished the run
        # The module's own line, not that of a library that wraps sys.exit (wandb does, once imported).
        frames = traceback.extract_tb(e.__traceback__)
        own = [f for f in frames if f.filename == _origin(module_name)] or frames
        at = f" at {own[-1].filename}:{own[-1].lineno}" if own else ""
        code = "" if e.code is None else repr(e.code)
        raise TTCError(f"{where}: importing {module_name!r} called sys.exit({code}){at}") from None
    if not callable(fn):
        raise TTCError(f"{where}: {path!r} is not callable")
    return fn


def _origin(module_name: str) -> str | None:
    try:
        spec = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    return None if spec is None else spec.origin


def load_rewards(entries: Sequence[str | RewardSpec | Mapping[str, Any]]) -> list[Reward]:
    """The reward functions of `model.rewards`, named as logged (`rewards/<name>/mean`): an entry's `name`, else the
    imported function's `__name__` (for an object without one, such as a `functools.partial`, the import path's
    last part)."""
    rewards = [load_reward(entry, f"model.rewards[{i}]") for i, entry in enumerate(entries)]
    first: dict[str, int] = {}
    for i, reward in enumerate(rewards):
        if reward.name in first:
            raise TTCError(
                f"model.rewards[{first[reward.name]}] and model.rewards[{i}] are both logged as {reward.name!r}: "
                "give one of them another `name`"
            )
        first[reward.name] = i
    return rewards


def load_reward(entry: str | RewardSpec | Mapping[str, Any], where: str) -> Reward:
    """One `model.rewards` entry (an import path or `{function, args, name}`), imported and its options bound."""
    if isinstance(entry, str):
        fn = import_reward(entry, where)
        return Reward(getattr(fn, "__name__", entry.rpartition(".")[2]), fn)
    spec = _spec(entry, where)
    fn = import_reward(spec.function, f"{where}.function")
    _check_args(fn, spec.args, spec.function, where)
    name = spec.name or getattr(fn, "__name__", spec.function.rpartition(".")[2])
    return Reward(name, functools.partial(fn, **spec.args) if spec.args else fn)


def _spec(entry: RewardSpec | Mapping[str, Any], where: str) -> RewardSpec:
    """`entry` as a `RewardSpec`; TTCError naming `where` for anything that is not one."""
    if isinstance(entry, Mapping):
        unknown = [key for key in entry if key not in _SPEC_KEYS]
        if unknown:
            raise TTCError(f"{where}: unknown key {unknown[0]!r}; {_ENTRY}")
        if "function" not in entry:
            raise TTCError(f"{where}: no `function`; {_ENTRY}")
        entry = RewardSpec(entry["function"], entry.get("args") or {}, entry.get("name"))
    elif not isinstance(entry, RewardSpec):
        raise TTCError(f"{where}: got {type(entry).__name__} {entry!r}; {_ENTRY}")
    if not isinstance(entry.function, str):
        raise TTCError(f"{where}.function: expected an import path, got {entry.function!r}")
    if not isinstance(entry.args, Mapping) or not all(isinstance(key, str) for key in entry.args):
        raise TTCError(f"{where}.args: expected a mapping of argument names to values, got {entry.args!r}")
    if entry.name is not None and (not isinstance(entry.name, str) or not entry.name.strip()):
        raise TTCError(f"{where}.name: expected a non-empty name or null, got {entry.name!r}")
    return entry


def _check_args(fn: Any, args: Mapping[str, Any], path: str, where: str) -> None:
    """Each bound argument must be a parameter `fn` names, other than its first (the completions): a name that only
    `**kwargs` would take is a typo, since `**kwargs` receives the batch's columns."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # no signature to read (some builtins): the first call will say what is wrong
        return
    by_keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    named = [p.name for i, p in enumerate(parameters) if p.kind in by_keyword and (i or p.kind != by_keyword[0])]
    for arg in args:
        if arg not in named:
            accepted = ", ".join(named) or "none"
            raise TTCError(
                f"{where}.args: {path} has no parameter {arg!r} (it names: {accepted}); the completions and the "
                "batch's columns are passed at each call"
            )


def unwrapped(fn: Any) -> tuple[Any, dict[str, Any]]:
    """The function under `functools.partial` layers, and the keyword arguments they bind."""
    args: dict[str, Any] = {}
    while isinstance(fn, functools.partial):
        args = {**fn.keywords, **args}
        fn = fn.func
    return fn, args
