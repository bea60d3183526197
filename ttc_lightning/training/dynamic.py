"""DAPO's dynamic sampling (Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
arXiv 2503.14476, section 3.2): a group whose rewards all tie has zero advantage and teaches nothing, so a step
drops such groups and samples the training stream's next prompts, a batch per round, until it has `target` groups
whose rewards differ or has sampled `max_rounds` batches; it then trains on the first `target` of those, in the
order drawn (as DAPO's reference implementation in verl does). Ties are judged on the reward functions' weighted
sum, before the overlong penalty: DAPO filters on accuracy, not on the length shaping.

Under DDP every rank takes part in each round's decision (one all-reduce), so all leave the loop after the same
round, and every rank draws a batch in every round: the ranks' shares of the epoch stay equally long, and Lightning
ends the epoch on all of them at the same step. A rank that already has `target` groups leaves the batch it drew
unsampled, since none of its groups could be kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ttc_lightning.training.grpo import informative_groups
from ttc_lightning.training.rollout import Batch, Round, concat_rounds

log = logging.getLogger("ttc")


@dataclass(frozen=True)
class DynamicSample:
    """What a step's rounds sampled, and which of those groups it trains on."""

    sampled: Round
    """Every group the step sampled, in the order drawn."""
    kept: Tensor
    """`[K]` long: the groups of `sampled` to train on, the first `target` whose rewards differ (K <= target)."""
    rounds: int
    """Batches drawn in the step, the first included (the same on every rank: their shares are equally long)."""
    kept_everywhere: int
    """Groups kept over all ranks."""

    def training_groups(self) -> tuple[Tensor, float] | None:
        """The groups to train on and their loss weight; None when no rank kept a group (no optimizer step).

        A rank that kept none while others did trains on its first group with weight 0: its gradient is zero, but
        it must run a backward pass to take part in DDP's all-reduce of the gradients.
        """
        if self.kept_everywhere == 0:
            return None
        if len(self.kept) == 0:
            return torch.zeros(1, dtype=torch.long), 0.0
        return self.kept, 1.0

    def metrics(self) -> dict[str, float]:
        return {"sampling_rounds": float(self.rounds), "groups_kept": float(len(self.kept))}


def sample_until_informative(
    first: Round,
    *,
    target: int,
    group_size: int,
    max_rounds: int,
    draw: Callable[[], Batch | None],
    sample: Callable[[Batch], Round],
    sum_over_ranks: Callable[[Tensor], Tensor],
    pad_id: int,
) -> DynamicSample:
    """From the step's first round, further rounds until every rank has `target` informative groups.

    `draw()` is the training stream's next batch of prompts (None when the epoch has none left), `sample(batch)`
    its completions, scored; `sum_over_ranks` sums a tensor over the DDP ranks (the identity on one process).
    A round happens while some rank is short of `target`, no rank has run out of prompts, and fewer than
    `max_rounds` batches were drawn; the loop's bound and decisions are the same on every rank, so each rank joins
    the same number of sums.
    """
    rounds = [first]
    count = int(informative_groups(first.task, group_size).sum())
    drawn, exhausted = 1, False
    for _ in range(max_rounds - 1):
        flags = torch.tensor([float(count < target), float(exhausted)], dtype=torch.float64)  # [2]
        short, out = sum_over_ranks(flags).tolist()
        if short == 0 or out > 0:
            break
        batch = draw()
        if batch is None:
            exhausted = True
            continue
        drawn += 1
        if count < target:
            rounds.append(sample(batch))
            count += int(informative_groups(rounds[-1].task, group_size).sum())
    sampled = concat_rounds(rounds, pad_id)
    kept = informative_groups(sampled.task, group_size).nonzero().squeeze(1)[:target].cpu()  # [K]
    kept_everywhere = int(sum_over_ranks(torch.tensor([float(len(kept))], dtype=torch.float64))[0])
    if kept_everywhere == 0:
        log.warning(
            "dynamic sampling: no group with differing rewards on any rank in a step's rounds; the step makes no "
            "optimizer step (groups_kept is 0 in the metrics)"
        )
    elif len(kept) < target:
        log.warning(
            "dynamic sampling: fewer than data.batch_size groups with differing rewards after "
            f"model.max_sampling_rounds={max_rounds} rounds (or at the end of the epoch); the step trains on those "
            "it has (groups_kept in the metrics)"
        )
    return DynamicSample(sampled, kept, drawn, kept_everywhere)


def nothing_left_to_learn(tied: int, epoch_batches: float) -> bool:
    """True, with a warning, when the last `tied` batches drawn (by steps in a row that found no group to train on)
    make up an epoch's worth: every prompt's completions score alike, and the run would sample on without an
    optimizer step, never reaching `trainer.max_steps`."""
    if tied < epoch_batches:
        return False
    log.warning(
        f"dynamic sampling: no prompt in the last {tied} batches (an epoch's worth) gave completions whose rewards "
        "differ, so the run stops here: the policy scores every prompt's completions alike (it solves them all, "
        "or fails them all, or the rewards cannot tell completions apart; see rewards/<fn>/std in metrics.csv)"
    )
    return True
