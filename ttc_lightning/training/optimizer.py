"""Optimizer steps: AdamW and its LR schedule, and the guard that skips a step whose loss or gradient norm is NaN or
infinite, so one bad rollout cannot turn the weights (and then every checkpoint) into NaN; too many skips in a row
stop the run."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR

from ttc_lightning.errors import TTCError
from ttc_lightning.model.sharding import full_norm

log = logging.getLogger("ttc")

LRSchedule = Literal["constant", "linear", "cosine"]


def total_optimizer_steps(max_steps: int, stepping_batches: float, num_iterations: int) -> int | None:
    """Where the LR schedule ends: `trainer.max_steps`, else the training batches Lightning expects times the
    optimizer steps per batch; None when the run has no end (the schedule then stays flat after warmup)."""
    if max_steps > 0:
        return max_steps
    return None if math.isinf(stepping_batches) else int(stepping_batches) * num_iterations


def adamw_with_schedule(
    params: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float,
    schedule: LRSchedule,
    warmup_steps: int,
    total_steps: int | None,
) -> dict[str, Any]:
    """Lightning's `configure_optimizers` answer: AdamW on `params` and the schedule (`lr_multiplier`), stepped
    once per optimizer step."""
    optimizer = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    multiplier = partial(lr_multiplier, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": LambdaLR(optimizer, multiplier), "interval": "step"}}


@dataclass
class StepGuard:
    """Counts skipped optimizer steps: `skipped` in the whole run (logged as `skipped_steps`), `in_a_row` since the
    last step taken. `limit` skips in a row stop training (`model.max_skipped_steps`)."""

    limit: int
    skipped: int = 0
    in_a_row: int = 0

    def skip(self, finite: bool, step: int, loss: float, grad_norm: float) -> bool:
        """Whether optimizer step `step` must be skipped. `finite` must be the same on every rank (under DDP, the
        all-reduced decision): ranks that disagreed would step different weights."""
        if finite:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if self.in_a_row >= self.limit:
            raise TTCError(
                f"training stopped at step {step}: {self.in_a_row} optimizer steps in a row had a NaN or infinite "
                f"loss or gradient norm ({what}), so the weights were left as they were. Check the reward functions' "
                "values (rollouts.jsonl) and model.learning_rate; raise model.max_skipped_steps to tolerate more"
            )
        log.warning(
            "step %d: %s; optimizer step skipped, weights unchanged (%d in a row, the run stops at %d)",
            step,
            what,
            self.in_a_row,
            self.limit,
        )
        return True


class TokenWeightedMeans:
    """Means of a step's loss stats over its micro-batches, each weighted by its completion tokens."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, float] = {}

    def add(self, stats: dict[str, torch.Tensor], tokens: int) -> None:
        for key, value in stats.items():
            self.sums[key] = self.sums.get(key, 0.0) + value.detach() * tokens
            self.tokens[key] = self.tokens.get(key, 0.0) + tokens

    def result(self) -> dict[str, torch.Tensor]:
        return {key: value / max(self.tokens[key], 1.0) for key, value in self.sums.items()}


def clip_and_step(
    optimizer: Any, loss: torch.Tensor, max_grad_norm: float | None, trainer: L.Trainer, guard: StepGuard
) -> torch.Tensor:
    """Clip the accumulated gradients and take the optimizer step, unless the loss or the gradient norm is not finite
    on some rank (`guard`: then no weight and no optimizer state changes). Returns the gradient norm."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    # Under 16-mixed the gradients are still multiplied by the loss scale, which the optimizer step divides out.
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    scale = float(scaler.get_scale()) if scaler is not None else 1.0
    max_norm = (max_grad_norm or float("inf")) * scale
    # Over sharded gradients (FSDP2) the norm is computed across ranks and returned as a DTensor.
    grad_norm = full_norm(torch.nn.utils.clip_grad_norm_(params, max_norm)).detach() / scale
    # Under DDP the gradients (and so their norm) are all-reduced already; the loss is per rank: all must agree.
    finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
    finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
    if guard.skip(finite, trainer.global_step, float(loss), float(grad_norm)):
        if scaler is None:  # AdamW leaves a weight without a gradient, and its state, as they are
            optimizer.zero_grad(set_to_none=True)
        else:  # the scaler skips a step whose gradients overflow, as it does for any overflow
            for p in params:
                p.grad.fill_(float("nan"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def gradients_synced(model: Any, last: bool) -> contextlib.AbstractContextManager[Any]:
    """Under DDP (`model` is the trainer's wrapped model), all-reduce the gradients once per optimizer step, at the
    last micro-batch's backward, not after each."""
    if isinstance(model, DDP) and not last:
        return model.no_sync()
    return contextlib.nullcontext()


def rollout_totals(completion_mask: torch.Tensor, weight: float) -> torch.Tensor:
    """`[2]` the rollout's rows and completion tokens (times `weight`), in float64: under `bf16-true` the default
    dtype inside a step is bfloat16, in which 3,000 tokens would count as 3,008."""
    return torch.tensor([completion_mask.size(0), float(completion_mask.sum())], dtype=torch.float64) * weight


def mean_over_ranks(module: L.LightningModule, values: torch.Tensor) -> list[float]:
    """Per-rank totals (rows, tokens) averaged over ranks: DDP averages gradients, so the losses divide by these."""
    values = values.double().to(module.device)
    if module.trainer.world_size > 1:
        values = module.all_gather(values).double().mean(0)
    return values.tolist()


def lr_multiplier(step: int, schedule: LRSchedule, warmup_steps: int, total_steps: int | None) -> float:
    """LR multiplier: linear warmup from 0 over `warmup_steps`, then `schedule` until `total_steps`.

    `"constant"`: 1 (transformers' `get_constant_schedule_with_warmup`); `"linear"`: down to 0 at `total_steps`
    (`get_linear_schedule_with_warmup`); `"cosine"`: half a cosine down to 0 at `total_steps`
    (`get_cosine_schedule_with_warmup`, except that it stays at 0 afterwards instead of rising again). With
    `total_steps=None` (unknown) every schedule is 1 after the warmup.
    """
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"schedule must be 'constant', 'linear' or 'cosine', got {schedule!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if total_steps is None or schedule == "constant":
        return 1.0
    progress = min((step - warmup_steps) / max(1, total_steps - warmup_steps), 1.0)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
