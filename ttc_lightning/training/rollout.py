"""A rollout: the completions sampled for a batch of prompts, scored by the reward functions, with advantages.
DAPO's overlong penalty, joining rollouts and rounds of prompts, the rollout's step metrics, and its records in
`rollouts.jsonl` (calling the reward functions is `scoring.py`'s job)."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ttc_lightning.errors import naming_file
from ttc_lightning.training.grpo import ScaleRewards, group_advantages, overlong_penalty

if TYPE_CHECKING:
    from ttc_lightning.sampling.sampler import Samples

OVERLONG = "overlong_penalty"  # its column among the reward functions': rewards/overlong_penalty/mean


@dataclass(frozen=True)
class OverlongBuffer:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13).

    Completions longer than `max_new_tokens - length` tokens lose up to `penalty` reward, linearly over the last
    `length` tokens."""

    length: int
    """Tokens before `max_new_tokens` where the penalty starts (DAPO: 4,096 of 20,480, a fifth)."""
    penalty: float = 1.0
    """Penalty at `max_new_tokens` (and for a cut completion), subtracted from the weighted reward."""


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
    sampler_logps: Tensor | None = None  # [N, C] the sampler's own, when it kept them (ttc's sampling backend)

    @classmethod
    def from_samples(cls, samples: Samples, rewards: Tensor, reward: Tensor) -> Rollout:
        """Sampled completions with their scores `[N, F]` and reward `[N]`; advantages (zero) come later, from the
        groups a step trains on."""
        return cls(
            prompt_ids=samples.prompt_ids,
            prompt_mask=samples.prompt_mask,
            completion_ids=samples.completion_ids,
            completion_mask=samples.completion_mask,
            completions=samples.texts,
            rewards=rewards,
            reward=reward,
            advantages=torch.zeros_like(reward),
            sampler_logps=samples.logps,
        )

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


def _pad_cat(tensors: list[Tensor], value: float = 0, left: bool = False) -> Tensor:
    """`[n_i, W_i]` tensors -> `[sum n_i, max W_i]`, padded with `value` on the right (or the left)."""
    width = max(t.size(1) for t in tensors)
    pads = [(width - t.size(1), 0) if left else (0, width - t.size(1)) for t in tensors]
    return torch.cat([torch.nn.functional.pad(t, pad, value=value) for t, pad in zip(tensors, pads, strict=True)])


def concat_rollouts(parts: Sequence[Rollout], pad_id: int) -> Rollout:
    """One rollout of `parts`' rows in order: prompts left-padded, completions right-padded to the widest part."""

    def optional(name: str) -> Tensor | None:
        tensors = [getattr(part, name) for part in parts]
        return None if any(t is None for t in tensors) else _pad_cat(tensors)  # [N, C]

    return Rollout(
        prompt_ids=_pad_cat([p.prompt_ids for p in parts], pad_id, left=True),  # [N, P]
        prompt_mask=_pad_cat([p.prompt_mask for p in parts], left=True),  # [N, P]
        completion_ids=_pad_cat([p.completion_ids for p in parts], pad_id),  # [N, C]
        completion_mask=_pad_cat([p.completion_mask for p in parts]),  # [N, C]
        completions=[text for p in parts for text in p.completions],
        rewards=torch.cat([p.rewards for p in parts]),  # [N, F]
        reward=torch.cat([p.reward for p in parts]),  # [N]
        advantages=torch.cat([p.advantages for p in parts]),  # [N]
        old_logps=optional("old_logps"),
        ref_logps=optional("ref_logps"),
        sampler_logps=optional("sampler_logps"),
    )


def _total(counts: list[Tensor | None]) -> Tensor | None:
    """Error counts `[F]` of several rounds added up; None when no round counted any."""
    present = [c for c in counts if c is not None]
    return torch.stack(present).sum(0) if present else None


Batch = dict[str, list]


@dataclass(frozen=True)
class Round:
    """Prompts and their completions: `batch` holds one value per prompt in each column (`prompt` included),
    `rollout` each prompt's G completions, scored, in contiguous rows."""

    batch: Batch
    rollout: Rollout
    task: Tensor
    """`[N]` what dynamic sampling compares: the reward functions' weighted sum before the overlong penalty, the
    task's reward, not the length shaping (DAPO filters on accuracy, verl's `filter_groups.metric: acc`)."""
    reward_errors: Tensor | None = None
    """`[F]` the reward calls that failed, per function, under model.reward_errors: skip (None: none counted)."""


def group_rows(groups: Tensor, group_size: int) -> Tensor:
    """The rows `[K*G]` of groups `[K]`."""
    offsets = torch.arange(group_size, device=groups.device)  # [G]
    return (groups.unsqueeze(1) * group_size + offsets).reshape(-1)  # [K*G]


def select_groups(round_: Round, groups: Tensor, group_size: int) -> Round:
    """The round restricted to `groups` `[K]` (K >= 1), in that order."""
    batch = {key: [values[i] for i in groups.tolist()] for key, values in round_.batch.items()}
    rows = group_rows(groups.to(round_.rollout.reward.device), group_size)  # [K*G]
    return Round(batch, round_.rollout.rows(rows), round_.task[rows], round_.reward_errors)


def concat_rounds(rounds: Sequence[Round], pad_id: int) -> Round:
    """One round of all `rounds`' prompts and completions, in order."""
    batch = {key: [value for r in rounds for value in r.batch[key]] for key in rounds[0].batch}
    task = torch.cat([r.task for r in rounds])  # [N]
    errors = _total([r.reward_errors for r in rounds])  # [F] or None
    return Round(batch, concat_rollouts([r.rollout for r in rounds], pad_id), task, errors)


def training_rollout(
    sampled: Round, groups: Tensor, group_size: int, scale: ScaleRewards, truncated_by: list[int] | None
) -> Rollout:
    """The groups `[K]` of `sampled` a step trains on, with their group-relative advantages; with `truncated_by`
    (the EOS token ids) the completions cut at `max_new_tokens` are masked out of the loss."""
    rollout = select_groups(sampled, groups, group_size).rollout
    mask = rollout.completion_mask  # [n, C]
    if truncated_by is not None:
        mask = mask * ~truncated(rollout.completion_ids, mask, truncated_by).unsqueeze(1)  # [n, C]
    advantages = group_advantages(rollout.reward, group_size, scale)  # [n]
    return dataclasses.replace(rollout, advantages=advantages, completion_mask=mask)


def as_overlong_buffer(value: OverlongBuffer | dict[str, Any] | None) -> OverlongBuffer | None:
    """`model.overlong_buffer` as given in a config (a mapping) or in code."""
    return OverlongBuffer(**value) if isinstance(value, dict) else value


def repeat_columns(batch: Batch, group_size: int) -> dict[str, list]:
    """A batch's metadata columns (one value per prompt) with each value repeated for its prompt's completions."""
    return {k: [v for v in values for _ in range(group_size)] for k, values in batch.items() if k != "prompt"}


def add_overlong_penalty(
    scores: Tensor, reward: Tensor, completion_mask: Tensor, max_new_tokens: int, buffer: OverlongBuffer | None
) -> tuple[Tensor, Tensor]:
    """With a buffer: DAPO's length penalty added to the weighted `reward` `[N]`, and kept as the last column of
    `scores` `[N, F]` (`[N, F+1]`: it is logged as one more reward). Without one: both unchanged."""
    if buffer is None:
        return scores, reward
    lengths = completion_mask.sum(1).to(scores.device)  # [N], EOS included
    penalty = overlong_penalty(lengths, max_new_tokens, buffer.length, buffer.penalty)  # [N]
    return torch.cat([scores, penalty.unsqueeze(1)], dim=1), reward + penalty  # [N, F+1], [N]


def scored_round(
    batch: Batch,
    samples: Samples,
    scores: Tensor,
    errors: Tensor | None,
    weights: Tensor,
    max_new_tokens: int,
    overlong: OverlongBuffer | None,
) -> Round:
    """A batch's completions and their scores `[N, F]` (`errors` `[F]`: failed calls) as a round: the reward is the
    weighted sum over functions (None scores skipped), plus the overlong penalty; advantages come later, from the
    groups a step trains on."""
    reward = torch.nansum(scores * weights, dim=1)  # [N]
    scores, shaped = add_overlong_penalty(scores, reward, samples.completion_mask, max_new_tokens, overlong)
    device = samples.completion_ids.device
    scores, reward, shaped = scores.to(device), reward.to(device), shaped.to(device)
    return Round(batch, Rollout.from_samples(samples, scores, shaped), task=reward, reward_errors=errors)


def truncated(completion_ids: Tensor, completion_mask: Tensor, eos_token_ids: list[int]) -> Tensor:
    """`[N]` bool: the completions cut at `max_new_tokens`, whose last token is not an EOS."""
    lengths = completion_mask.sum(1)  # [N]
    last = completion_ids.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)  # [N]
    return ~torch.isin(last, torch.tensor(eos_token_ids, device=last.device))  # [N]


def nan_mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std over the non-NaN entries (NaN when there are none, std 0 for a single one)."""
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        return values.new_full((), float("nan")), values.new_full((), float("nan"))
    return kept.mean(), kept.std() if kept.numel() > 1 else values.new_zeros(())


def rollout_metrics(
    rollout: Rollout,
    group_size: int,
    eos_token_ids: list[int],
    reward_names: Sequence[str],
    reward_errors: Tensor | None = None,
) -> dict[str, Tensor]:
    """The rollout's step metrics (TRL's names): rewards per function, their failed calls `reward_errors` `[F]`,
    group spread, completion lengths."""
    grouped = rollout.reward.view(-1, group_size)  # [B, G]
    group_std = grouped.std(dim=1)  # [B]
    lengths = rollout.completion_mask.sum(1)  # [N]
    clipped = truncated(rollout.completion_ids, rollout.completion_mask, eos_token_ids)  # [N]
    metrics = {
        "reward": rollout.reward.mean(),
        "reward_std": group_std.mean(),
        "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
        "completions/mean_length": lengths.float().mean(),
        "completions/clipped_ratio": clipped.float().mean(),
    }
    for j, name in enumerate(reward_names):
        metrics[f"rewards/{name}/mean"], metrics[f"rewards/{name}/std"] = nan_mean_std(rollout.rewards[:, j])
        if reward_errors is not None and j < len(reward_errors):  # the overlong column has none
            metrics[f"rewards/{name}/errors"] = reward_errors[j]
    return metrics


def step_metrics(
    sampled: Round,
    group_size: int,
    eos_token_ids: list[int],
    reward_names: Sequence[str],
    step: int,
    seconds: tuple[float, float],
) -> dict[str, Tensor | float]:
    """A training step's metrics of every completion it sampled, labelled `step` (metrics.csv's step column, as in
    rollouts.jsonl); `grad_norm` NaN until an optimizer step's stats replace it; `seconds` sampling and training."""
    rollout = sampled.rollout
    metrics: dict[str, Tensor | float] = {
        **rollout_metrics(rollout, group_size, eos_token_ids, reward_names, sampled.reward_errors),
        "step": float(step),
        "grad_norm": float("nan"),
        "tokens_per_second": rollout.completion_mask.sum() / sum(seconds),
        "time/generate": seconds[0],
        "time/train": seconds[1],
    }
    return metrics


def rollout_records(
    step: int,
    prompts: list,
    columns: dict[str, list],
    rollout: Rollout,
    reward_names: Sequence[str],
    group_size: int,
    trained: Sequence[bool] | None = None,
) -> list[dict[str, Any]]:
    """One JSON-ready row per completion: step, prompt, completion, per-function rewards, reward, advantage, and
    with `trained` (dynamic sampling) whether the step trained on it."""
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
        if trained is not None:
            record["trained"] = trained[i]
        records.append(record)
    return records


def step_records(
    step: int,
    sampled: Round,
    trained: tuple[Tensor, Rollout] | None,
    reward_names: Sequence[str],
    group_size: int,
    flag: bool,
) -> list[dict[str, Any]]:
    """The records of every completion a step sampled; `trained` is the groups `[K]` it trained on and their
    rollout, whose advantages the records show (0 for the others). `flag` adds whether each was trained on."""
    reward = sampled.rollout.reward  # [N]
    advantages, kept = torch.zeros_like(reward), torch.zeros_like(reward, dtype=torch.bool)  # [N], [N]
    if trained is not None:
        rows = group_rows(trained[0].to(reward.device), group_size)  # [K*G]
        advantages[rows], kept[rows] = trained[1].advantages, True
    rollout = dataclasses.replace(sampled.rollout, advantages=advantages)
    columns = repeat_columns(sampled.batch, group_size)
    flags = kept.tolist() if flag else None
    return rollout_records(step, sampled.batch["prompt"], columns, rollout, reward_names, group_size, flags)


def write_rollouts(log_dir: str | Path, rank: int, records: list[dict[str, Any]]) -> None:
    """Rank 0 appends to rollouts.jsonl in the log directory, rank k to rollouts.rank<k>.jsonl: no interleaving."""
    path = Path(log_dir) / ("rollouts.jsonl" if rank == 0 else f"rollouts.rank{rank}.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with naming_file(path), path.open("a", encoding="utf-8") as f:
        f.writelines(json.dumps(record, default=str) + "\n" for record in records)
