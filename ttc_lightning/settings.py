"""The invariants `GRPOModule`'s settings must satisfy, checked when it is built, each with how to fix it."""

from __future__ import annotations

import math
from typing import Any

from ttc_lightning.errors import TTCError
from ttc_lightning.rollout import as_overlong_buffer


def check_settings(hp: Any) -> None:
    """Every broken invariant of the module's hyperparameters `hp`, reported together as one `TTCError`."""
    problems = []
    if not hp.rewards:
        problems.append("model.rewards is empty: name at least one reward function by import path")
    if hp.reward_weights is not None and len(hp.reward_weights) != len(hp.rewards):
        problems.append(
            f"model.reward_weights has {len(hp.reward_weights)} entries for {len(hp.rewards)} reward functions: "
            "give one weight per function or null"
        )
    if hp.reward_weights is not None and not all(math.isfinite(w) for w in hp.reward_weights):
        problems.append(f"model.reward_weights must be finite numbers, got {list(hp.reward_weights)}")
    if hp.reward_workers < 1:
        problems.append("model.reward_workers must be >= 1")
    if hp.reward_timeout is not None and not hp.reward_timeout > 0:
        problems.append("model.reward_timeout must be > 0 seconds, or null for no limit")
    if hp.reward_errors not in ("raise", "skip"):
        problems.append(f"model.reward_errors must be raise or skip, got {hp.reward_errors!r}")
    if hp.num_generations < 2:
        problems.append("model.num_generations must be >= 2: advantages compare completions of the same prompt")
    if hp.load_in_4bit and hp.lora is None:
        problems.append("model.load_in_4bit needs model.lora: 4-bit weights cannot be trained directly (QLoRA)")
    if hp.temperature <= 0:
        problems.append("model.temperature must be > 0 for training (sampling)")
    if not 0 < hp.top_p <= 1:
        problems.append("model.top_p must be in (0, 1]")
    if hp.top_k < 0:
        problems.append("model.top_k must be >= 0 (0 = off)")
    if hp.beta < 0:
        problems.append("model.beta must be >= 0")
    if hp.epsilon <= 0 or (hp.epsilon_high is not None and hp.epsilon_high <= 0):
        problems.append("model.epsilon and model.epsilon_high must be > 0")
    for name in ("num_iterations", "micro_batch_size", "max_new_tokens", "eval_num_samples", "max_skipped_steps"):
        if getattr(hp, name) < 1:
            problems.append(f"model.{name} must be >= 1")
    if hp.eval_temperature < 0:
        problems.append("model.eval_temperature must be >= 0 (0 = greedy)")
    if hp.eval_temperature == 0 and hp.eval_num_samples > 1:
        problems.append("model.eval_num_samples > 1 needs model.eval_temperature > 0: greedy samples are identical")
    if hp.learning_rate <= 0:
        problems.append("model.learning_rate must be > 0")
    if hp.max_sampling_rounds < 1:
        problems.append("model.max_sampling_rounds must be >= 1 (1: dynamic sampling only filters the step's batch)")
    if hp.tis_cap is not None and hp.tis_cap <= 0:
        problems.append("model.tis_cap must be > 0 (e.g. 2.0), or null to train without the correction")
    buffer = as_overlong_buffer(hp.overlong_buffer)
    if buffer is not None and not 1 <= buffer.length <= hp.max_new_tokens:
        problems.append(
            f"model.overlong_buffer.length must be in [1, model.max_new_tokens={hp.max_new_tokens}], got "
            f"{buffer.length}: it is the stretch before max_new_tokens where the penalty grows (DAPO: a fifth)"
        )
    if buffer is not None and buffer.penalty < 0:
        problems.append("model.overlong_buffer.penalty must be >= 0: it is subtracted from the reward")
    if problems:
        raise TTCError("; ".join(problems))
