"""A rollout: the completions sampled for a batch of prompts, scored by the reward functions, with advantages.
The rollout's step metrics, and its records in `rollouts.jsonl` (scoring itself is in `scoring.py`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


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
    reward_errors: Tensor | None = None  # [F] failed reward calls, under model.reward_errors: skip

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
            reward_errors=self.reward_errors,
        )


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
        if rollout.reward_errors is not None:
            metrics[f"rewards/{name}/errors"] = rollout.reward_errors[j]
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
