"""GRPO maths as pure functions: group-relative advantages, the clipped surrogate loss with its KL penalty, and the
DAPO, GSPO and truncated-importance-sampling refinements of it.

Shapes: N completions (B prompts x G generations, each prompt's G completions contiguous), T completion tokens,
V vocabulary entries.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
ImportanceSamplingLevel = Literal["token", "sequence"]

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


def informative_groups(rewards: Tensor, group_size: int) -> Tensor:
    """`[B]` bool: the groups whose rewards do not all tie, DAPO's dynamic-sampling filter.

    DAPO (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale", arXiv 2503.14476,
    section 3.2) keeps a prompt only when `0 < #correct < G`: a group that is all right or all wrong has zero advantage
    everywhere and teaches nothing. For real-valued rewards the same test is `max(group) != min(group)`, exact
    comparison: a group that differs anywhere, however little, is kept. `rewards` is `[N]` in contiguous groups of
    `group_size`; `keep.repeat_interleave(group_size)` gives the `[N]` mask of the completions to keep.
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}"
        )
    grouped = rewards.view(-1, group_size)  # [B, G]
    return grouped.amax(dim=1) != grouped.amin(dim=1)  # [B]


def overlong_penalty(lengths: Tensor, max_new_tokens: int, buffer_length: int, penalty_factor: float) -> Tensor:
    """DAPO's soft overlong punishment (arXiv 2503.14476, eq. 13), scaled by `penalty_factor`, added to the reward.

    With `L_max = max_new_tokens` and `L_cache = buffer_length`, a completion of `L` tokens gets 0 for
    `L <= L_max - L_cache`, `((L_max - L_cache) - L) / L_cache * penalty_factor` inside the buffer (linear from 0 down
    to `-penalty_factor`) and `-penalty_factor` beyond `L_max`. Generation stops at `max_new_tokens`, so `L > L_max`
    never happens here: the cut completions have `L = L_max` and get `-penalty_factor` from the buffer's formula, as
    does one whose EOS (counted in its length) falls on the very last slot; the two cannot be told apart by length.
    TRL ships the same curve as the reward function `trl.rewards.get_soft_overlong_punishment` (factor 1, scaled by
    its reward weight). `lengths` is `[N]` (completion tokens, EOS included); returns float `[N]`, all <= 0.
    """
    if not 1 <= buffer_length <= max_new_tokens:
        raise ValueError(f"buffer_length must be in [1, max_new_tokens={max_new_tokens}], got {buffer_length}")
    if penalty_factor < 0:
        raise ValueError(f"penalty_factor must be >= 0, got {penalty_factor}")
    excess = (lengths.float() - (max_new_tokens - buffer_length)).clamp(min=0, max=buffer_length)  # [N]
    return -excess / buffer_length * penalty_factor  # [N]


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
    importance_sampling_level: ImportanceSamplingLevel = "token",
    sampler_logps: Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped GRPO surrogate with a k3 KL penalty, aggregated as TRL, DAPO and Dr. GRPO define it.

    `logps`, `old_logps`, `ref_logps`, `mask` are `[N, T]`; `advantages` is `[N]`. `old_logps=None` means the
    rollout came from this very policy (`logps.detach()`, ratio 1); `ref_logps` may be None only when `beta == 0`.
    Returns the scalar loss and detached stats: `kl`, `clip_ratio/low_mean`, `clip_ratio/high_mean`,
    `clip_ratio/region_mean` (masked token means).

    `importance_sampling_level="sequence"` is GSPO (Zheng et al. 2025, "Group Sequence Policy Optimization",
    arXiv 2507.18071, eq. 5): one ratio per completion, `s_i = exp(mean_t(logps - old_logps))` over its own tokens
    (the length-normalised sequence likelihood ratio), clipped to `[1 - epsilon, 1 + epsilon_high]` and broadcast
    over the completion's tokens, as TRL's `importance_sampling_level="sequence"` does (log weights `[N, 1]`). With
    `loss_type="grpo"` the loss is exactly GSPO's `-1/N sum_i min(s_i A_i, clip(s_i) A_i)`, whose gradient is
    `s_i A_i * mean_t grad log pi(y_i,t)` for unclipped terms; the other aggregations weight each completion's term
    by its length. On-policy (`s_i = 1`) GSPO and the token level give the same gradient; they differ only once the
    policy has moved. The paper clips at `epsilon=3e-4`, `epsilon_high=4e-4`: sequence ratios stay much closer to 1
    than token ratios, so token-level epsilons (0.2) would hardly ever clip. The clip stats then count the tokens of
    clipped completions, the measure the paper's clipping-fraction comparison uses (TRL counts completions).

    Truncated importance sampling (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL
    Training"): when the sampler's own log-probs of the tokens it drew (`sampler_logps`, `[N, T]`) differ from the
    trainer's (`old_logps`: other kernels, other precision), each token's clipped surrogate is multiplied by the
    constant `min(exp(old_logps - sampler_logps), tis_cap)`; the KL penalty is not. This is TRL's
    `vllm_importance_sampling_correction` (token truncation, cap `vllm_importance_sampling_cap`) and verl's token-level
    TIS. `sampler_logps` without `tis_cap` is ignored; `tis_cap` without `sampler_logps` is an error.
    """
    if beta != 0 and ref_logps is None:
        raise ValueError("ref_logps is required when beta != 0")
    if tis_cap is not None and (sampler_logps is None or tis_cap <= 0):
        raise ValueError(f"tis_cap needs sampler_logps and a value > 0, got tis_cap={tis_cap}")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    old_logps = logps.detach() if old_logps is None else old_logps
    mask = mask.to(logps.dtype)  # [N, T]
    adv = advantages.unsqueeze(1)  # [N, 1]

    log_ratio = logps - old_logps  # [N, T]
    if importance_sampling_level == "sequence":
        # Padding is left out of the mean: only the completion's own tokens make up its likelihood.
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(1)  # [N, 1]
    elif importance_sampling_level != "token":
        raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
    ratio = torch.exp(log_ratio)  # [N, T], or [N, 1] broadcast over the row's tokens
    clipped_ratio = torch.clamp(ratio, 1 - epsilon, 1 + eps_high)  # [N, T] or [N, 1]
    per_token = -torch.min(ratio * adv, clipped_ratio * adv)  # [N, T] or [N, 1]
    if tis_cap is not None:
        tis_weight = torch.exp(old_logps - sampler_logps).clamp(max=tis_cap).detach()  # [N, T]
        per_token = per_token * tis_weight  # [N, T]
    if beta != 0:
        delta = ref_logps - logps  # [N, T]
        kl = torch.exp(delta) - delta - 1  # [N, T], k3: unbiased, always >= 0
        per_token = per_token + beta * kl  # [N, T]
    loss = aggregate(per_token.expand_as(mask), mask, loss_type, max_completion_length)
    stats = clip_stats(ratio, adv, mask, epsilon, eps_high)
    if beta != 0:
        stats["kl"] = masked_mean(kl.detach(), mask)
    return loss, stats


def aggregate(per_token: Tensor, mask: Tensor, loss_type: LossType, max_completion_length: int | None) -> Tensor:
    """The per-token losses `[N, T]` of a batch as one number: "grpo" the mean of per-sequence means, "bnpo" and
    "dapo" the token mean, "dr_grpo" the token sum over N * `max_completion_length` (Dr. GRPO's constant)."""
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()  # mean over [N]
    if loss_type in ("bnpo", "dapo"):
        return (per_token * mask).sum() / mask.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        length = mask.size(1) if max_completion_length is None else max_completion_length
        return (per_token * mask).sum() / (mask.size(0) * length)
    raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dapo' or 'dr_grpo', got {loss_type!r}")


@torch.no_grad()
def clip_stats(ratio: Tensor, adv: Tensor, mask: Tensor, epsilon: float, eps_high: float) -> dict[str, Tensor]:
    """Masked token means of where the clip bit: below 1 - epsilon with a negative advantage, above 1 + eps_high with
    a positive one, either. `ratio` `[N, T]` or `[N, 1]`, `adv` `[N, 1]`, `mask` `[N, T]`."""
    low = ((ratio < 1 - epsilon) & (adv < 0)).to(mask.dtype)  # [N, T] or [N, 1]
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)  # [N, T] or [N, 1]
    return {
        "clip_ratio/low_mean": masked_mean(low, mask),
        "clip_ratio/high_mean": masked_mean(high, mask),
        "clip_ratio/region_mean": masked_mean(torch.clamp(low + high, max=1), mask),
    }


@torch.no_grad()
def logprob_mismatch(train_logps: Tensor, sampler_logps: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the sampler's: both 0 when they agree.

    `mismatch/abs_logp_diff` is the masked token mean of `|train_logps - sampler_logps|`; `mismatch/kl` is the
    masked token mean of the k3 estimator (the KL penalty's) of `KL(pi_sampler || pi_train)`, the direction in which
    it is unbiased, since the sampler drew the tokens: with `d = train_logps - sampler_logps`, `exp(d) - d - 1 >= 0`.
    verl logs the same k3 as its rollout/training mismatch KL. All inputs are `[N, T]`.
    """
    mask = mask.to(train_logps.dtype)  # [N, T]
    diff = train_logps - sampler_logps  # [N, T]
    k3 = torch.exp(diff) - diff - 1  # [N, T]
    return {"mismatch/abs_logp_diff": masked_mean(diff.abs(), mask), "mismatch/kl": masked_mean(k3, mask)}


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
