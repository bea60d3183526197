"""GRPO maths as pure functions: group-relative advantages, per-token log-probs, the clipped surrogate loss.

Shapes: N completions (B prompts x G generations, each prompt's G completions contiguous), T completion tokens,
V vocabulary entries.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]

STD_EPS = 1e-4  # TRL's constant: keeps a near-constant group from blowing advantages up


def group_advantages(rewards: Tensor, group_size: int, scale: ScaleRewards = "group") -> Tensor:
    """`r - mean(group)`, divided by the group's std (`"group"`), the batch's std (`"batch"`) or nothing (`"none"`).

    Stds are unbiased (`torch.std`), plus 1e-4. `rewards` is `[N]` in contiguous groups of `group_size`.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # [B, G]
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # [B, G]
    if scale == "group":
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + STD_EPS)  # [B, G]
    elif scale == "batch":
        advantages = advantages / (rewards.std() + STD_EPS)  # [B, G]
    elif scale != "none":
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return advantages.reshape(-1)  # [N]


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """`log_softmax(logits).gather(index)` without a full `[N, T, V]` float32 log-softmax.

    One row at a time in float32: the chosen token's logit minus the row's logsumexp.
    """
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):  # [T, V], [T]
        row_logits = row_logits.float()  # [T, V]
        chosen = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # [T]
        rows.append(chosen - torch.logsumexp(row_logits, dim=-1))  # [T]
    return torch.stack(rows)  # [N, T]


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of each position's next-token distribution, one row at a time in float32."""
    rows = []
    for row_logits in logits:  # [T, V]
        logp = torch.log_softmax(row_logits.float(), dim=-1)  # [T, V]
        rows.append(-(logp.exp() * logp).sum(-1))  # [T]
    return torch.stack(rows)  # [N, T]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is 1; 0 when the mask is empty."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    ref_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    beta: float,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: LossType = "dapo",
    max_completion_length: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO surrogate with a k3 KL penalty, aggregated as TRL, DAPO and Dr. GRPO define it.

    `logps`, `old_logps`, `ref_logps`, `mask` are `[N, T]`; `advantages` is `[N]`. `old_logps=None` means the
    rollout came from this very policy (`logps.detach()`, ratio 1); `ref_logps` may be None only when `beta == 0`.
    Returns the scalar loss and detached stats: `kl`, `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    `clip_ratio/region_mean` (masked token means).
    """
    if beta != 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    old_logps = logps.detach() if old_logps is None else old_logps
    mask = mask.to(logps.dtype)  # [N, T]
    adv = advantages.unsqueeze(1)  # [N, 1]

    ratio = torch.exp(logps - old_logps)  # [N, T]
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)  # [N, T]
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, T]
    if beta != 0:
        delta = ref_logps - logps  # [N, T]
        kl = torch.exp(delta) - delta - 1  # [N, T], k3: unbiased, always >= 0
        per_token = per_token + beta * kl  # [N, T]

    if loss_type == "grpo":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)  # [N]
        loss = per_sequence.mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    elif loss_type == "dr_grpo":
        length = mask.size(1) if max_completion_length is None else max_completion_length
        loss = (per_token * mask).sum() / (mask.size(0) * length)
    else:
        raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dapo' or 'dr_grpo', got {loss_type!r}")

    with torch.no_grad():
        low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)  # [N, T]
        high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)  # [N, T]
        stats = {
            "clip_ratio/low_mean": masked_mean(low, mask),
            "clip_ratio/high_mean": masked_mean(high, mask),
            "clip_ratio/region_mean": masked_mean(torch.clamp(low + high, max=1), mask),
        }
        if beta != 0:
            stats["kl"] = masked_mean(kl, mask)
    return loss, stats


def accumulation_weight(
    loss_type: LossType, rows: int, total_rows: int, tokens: int, total_tokens: float, num_micro_batches: int
) -> float:
    """Scale for one micro-batch's loss so that the accumulated gradient equals the full batch's.

    `grpo` and `dr_grpo` average over sequences (weight rows/N); `dapo` normalises by all the batch's tokens
    (tokens/total); `bnpo` is TRL's per-micro-batch token mean, so the micro-batch losses are averaged.
    """
    if loss_type in ("grpo", "dr_grpo"):
        return rows / total_rows
    if loss_type == "dapo":
        return tokens / max(total_tokens, 1.0)
    return 1.0 / num_micro_batches


def warmup_cosine_lr(step: int, warmup_steps: int, total_steps: int | None) -> float:
    """LR multiplier: linear warmup from 0, then cosine to 0 at `total_steps` (constant when it is unknown).

    The same curve as transformers' `get_cosine_schedule_with_warmup`.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if total_steps is None:
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))
