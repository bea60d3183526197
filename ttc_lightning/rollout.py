"""A rollout: the completions sampled for a batch of prompts, scored by the reward functions, with advantages.
Scoring (`score_completions`), the rollout's step metrics, and its records in `rollouts.jsonl`."""

from __future__ import annotations

import importlib
import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ttc_lightning.errors import TTCError

RewardFn = Callable[..., Sequence[float | None]]


@dataclass
class Rollout:
    """G completions for each of B prompts (N = B*G rows, each prompt's G rows contiguous), scored."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, C] right-padded
    completion_mask: Tensor  # [N, C] 1 up to and including the first EOS
    completions: list[str]  # N decoded completions
    rewards: Tensor  # [N, F] one column per reward function, NaN = no score
    reward: Tensor  # [N] weighted sum over functions
    advantages: Tensor  # [N]
    old_logps: Tensor | None = None  # [N, C] only when num_iterations > 1
    ref_logps: Tensor | None = None  # [N, C] only when beta > 0
    sampler_logps: Tensor | None = None  # [N, C] the sampler's own, when it kept them (ttc's decoding loop)

    def __len__(self) -> int:
        return self.completion_ids.size(0)

    def rows(self, index: Tensor) -> Rollout:
        """The rollout restricted to `index`, trimmed of padding columns no selected row uses."""
        prompt_mask = self.prompt_mask[index]  # [n, P]
        completion_mask = self.completion_mask[index]  # [n, C]
        first = int(prompt_mask.any(0).int().argmax())  # first prompt column any row uses (left padding)
        last = int(completion_mask.sum(1).max().clamp(min=1))  # longest completion in the selection
        return Rollout(
            prompt_ids=self.prompt_ids[index, first:],
            prompt_mask=prompt_mask[:, first:],
            completion_ids=self.completion_ids[index, :last],
            completion_mask=completion_mask[:, :last],
            completions=[self.completions[i] for i in index.tolist()],
            rewards=self.rewards[index],
            reward=self.reward[index],
            advantages=self.advantages[index],
            old_logps=None if self.old_logps is None else self.old_logps[index, :last],
            ref_logps=None if self.ref_logps is None else self.ref_logps[index, :last],
            sampler_logps=None if self.sampler_logps is None else self.sampler_logps[index, :last],
        )


def import_reward(path: str, where: str) -> RewardFn:
    """`package.module.function` -> the function; a clear error when it cannot be imported."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise TTCError(f"{where}: {path!r} is not an import path like 'package.module.function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise TTCError(f"{where}: cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise TTCError(f"{where}: {path!r} is not callable")
    return fn


def load_rewards(paths: Sequence[str]) -> tuple[list[RewardFn], list[str]]:
    """The reward functions of `model.rewards` and their names (as logged: `rewards/<name>/mean`)."""
    fns = [import_reward(path, f"model.rewards[{i}]") for i, path in enumerate(paths)]
    names = [getattr(fn, "__name__", path.rpartition(".")[2]) for fn, path in zip(fns, paths, strict=True)]
    return fns, names


def score_completions(
    fns: Sequence[RewardFn], names: Sequence[str], completions: list[str], columns: dict[str, list], group_size: int
) -> Tensor:
    """Call each reward function on all completions -> `[N, F]` float32, NaN where a function returned None.

    Any failure stops training with the function's name and the prompt (index in the batch) it failed on.
    """
    n = len(completions)
    scores = torch.full((n, len(fns)), float("nan"))
    for j, (fn, name) in enumerate(zip(fns, names, strict=True)):
        try:
            values = fn(completions, **columns)
        except Exception as e:
            prompt = _first_failing_prompt(fn, completions, columns, group_size)
            where = f" on prompt {prompt} of the batch" if prompt is not None else ""
            raise TTCError(f"reward function {name} raised {type(e).__name__}: {e}{where}") from e
        if not isinstance(values, Sequence) or len(values) != n:
            got = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise TTCError(
                f"reward function {name} returned {got} values for {n} completions "
                f"({n // group_size} prompts x {group_size}); it must return one float or None per completion"
            )
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or math.isnan(value):
                raise TTCError(
                    f"reward function {name} returned {value!r} for completion {i % group_size} of prompt "
                    f"{i // group_size} of the batch; expected a float or None"
                )
            scores[i, j] = float(value)
    return scores


def _first_failing_prompt(fn: RewardFn, completions: list[str], columns: dict[str, list], g: int) -> int | None:
    """Re-run `fn` one prompt's group at a time to name the prompt that makes it raise."""
    for p in range(len(completions) // g):
        rows = slice(p * g, (p + 1) * g)
        try:
            fn(completions[rows], **{k: v[rows] for k, v in columns.items()})
        except Exception:
            return p
    return None


def nan_mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std over the non-NaN entries (NaN when there are none, std 0 for a single one)."""
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        return torch.tensor(float("nan")), torch.tensor(float("nan"))
    return kept.mean(), kept.std() if kept.numel() > 1 else torch.tensor(0.0)


def rollout_metrics(
    rollout: Rollout, group_size: int, eos_token_ids: list[int], reward_names: Sequence[str]
) -> dict[str, Tensor]:
    """The rollout's step metrics (TRL's names): rewards per function, group spread, completion lengths."""
    grouped = rollout.reward.view(-1, group_size)  # [B, G]
    group_std = grouped.std(dim=1)  # [B]
    lengths = rollout.completion_mask.sum(1)  # [N]
    last = rollout.completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [N]
    clipped = ~torch.isin(last, torch.tensor(eos_token_ids, device=last.device))  # [N] cut at max_new_tokens
    metrics = {
        "reward": rollout.reward.mean(),
        "reward_std": group_std.mean(),
        "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
        "completions/mean_length": lengths.float().mean(),
        "completions/clipped_ratio": clipped.float().mean(),
    }
    for j, name in enumerate(reward_names):
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = nan_mean_std(rollout.rewards[:, j])
    return metrics


def rollout_records(
    step: int, prompts: list, columns: dict[str, list], rollout: Rollout, reward_names: Sequence[str], group_size: int
) -> list[dict[str, Any]]:
    """One JSON-ready row per completion: step, prompt, completion, per-function rewards, reward, advantage."""
    records = []
    for i, completion in enumerate(rollout.completions):
        record = {
            "step": step,
            "prompt_index": i // group_size,
            "prompt": prompts[i // group_size],
            "completion": completion,
            "rewards": {
                name: None if math.isnan(v) else v
                for name, v in zip(reward_names, rollout.rewards[i].tolist(), strict=True)
            },
            "reward": float(rollout.reward[i]),
            "advantage": float(rollout.advantages[i]),
        }
        if "id" in columns:
            record["id"] = columns["id"][i]
        records.append(record)
    return records


def write_rollouts(log_dir: str | Path, rank: int, records: list[dict[str, Any]]) -> None:
    """Rank 0 appends to rollouts.jsonl in the log directory, rank k to rollouts.rank<k>.jsonl: no interleaving."""
    path = Path(log_dir) / ("rollouts.jsonl" if rank == 0 else f"rollouts.rank{rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(record, default=str) + "\n" for record in records)
