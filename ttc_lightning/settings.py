"""`GRPOModule`'s options: each documented once (`MODULE_DOC`, the class's docstring, which `--model.help` shows) and
the invariants they must satisfy, checked when the module is built, each with how to fix it."""

from __future__ import annotations

import logging
import math
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy

from ttc_lightning.data.base import Task
from ttc_lightning.errors import TTCError, sharded_strategy_error
from ttc_lightning.model import sharding
from ttc_lightning.training.rollout import as_overlong_buffer

log = logging.getLogger("ttc")

MODULE_DOC = """GRPO on a causal LM: sample G completions per prompt, score them, favour the better ones.

    One `training_step` is one rollout followed by `num_iterations` optimizer steps on it, so `trainer.max_steps`
    counts optimizer steps.

    Args:
        rewards: Reward functions by import path, each `fn(completions, **columns) -> list[float | None]`.
        model_name_or_path: A Hugging Face Hub id, a local model directory, or "tiny" (a small random model
            built locally, no network).
        lora: LoRA settings (peft), or null for full fine-tuning.
        load_in_4bit: Quantise the base model to 4-bit NF4 with bitsandbytes (QLoRA); needs `lora`.
        gradient_checkpointing: Recompute activations in the backward pass: less memory, about a third more
            compute.
        dtype: Weights' dtype. "auto": float32 on CPU and for full fine-tuning (AdamW needs float32 master weights;
            bf16-mixed computes in bf16 all the same); a frozen LoRA base in bfloat16 on GPUs of compute capability
            8.0 and up, else float16. bfloat16/float16 need `lora`.
        num_generations: G: completions sampled per prompt; advantages are relative within these groups.
        max_new_tokens: Longest completion; longer ones are cut and count in `completions/clipped_ratio`.
        temperature: Sampling temperature, also applied to the logits when computing log-probs (as TRL does).
        top_p: Nucleus sampling: keep the smallest token set with this much probability (1.0 = off).
        top_k: Sample among the k most likely tokens only (0 = off).
        beta: Weight of the KL penalty to the reference policy; 0 loads and runs no reference model.
        epsilon: Clip range below 1 for the probability ratio (and above 1 unless `epsilon_high` is set).
        epsilon_high: Clip range above 1 (DAPO's clip-higher, e.g. 0.28); null means `epsilon`.
        loss_type: Aggregation: "grpo" per-sequence mean, "bnpo" per-micro-batch token mean, "dapo" token mean
            over the whole rollout, "dr_grpo" token sum / (N * max_new_tokens).
        scale_rewards: Divide advantages by the group's std ("group"), the batch's std ("batch") or not at all
            ("none", Dr. GRPO).
        importance_sampling_level: "token": a probability ratio per token; "sequence": GSPO's length-normalised
            ratio per completion, clipped whole. GSPO clips at epsilon 3e-4, epsilon_high 4e-4 (0.2 hardly clips).
        dynamic_sampling: DAPO's: drop the groups whose rewards all tie and sample the training stream's next
            prompts until the step has `data.batch_size` groups whose rewards differ, or `max_sampling_rounds`
            batches; train on those (none on any rank: no optimizer step). Logs sampling_rounds, groups_kept.
        max_sampling_rounds: With dynamic_sampling, the most batches one step samples, the first included.
        mask_truncated_completions: No loss on completions cut at `max_new_tokens` (DAPO's overlong filtering).
        overlong_buffer: DAPO's soft overlong punishment `{length, penalty}`: the reward loses up to `penalty`,
            linearly over the last `length` tokens before `max_new_tokens` (`rewards/overlong_penalty/mean`).
        tis_cap: Truncated importance sampling: token losses weighted by min(pi_train / pi_sampler, tis_cap), for
            when the sampler's log-probs differ from the trainer's (bf16, merged LoRA). Needs the sampler's own
            log-probs: ttc's decoding loop keeps them, generate() does not. null = off.
        reward_workers: Reward functions running at once, in threads (1: one after the other).
        reward_timeout: Seconds each reward call may take (null = no limit). A late call cannot be stopped: its
            thread runs on and its result is dropped.
        reward_errors: A reward call that raises or runs out of time stops training ("raise") or leaves its
            completions unscored, counted in `rewards/<fn>/errors` ("skip").
        num_iterations: mu: optimizer steps on each rollout; above 1 the old policy's log-probs are computed.
        micro_batch_size: Completions per forward/backward pass; gradients accumulate over the rollout.
        learning_rate: Peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        lr_scheduler: After warmup: "constant", "linear" decay to 0 at `trainer.max_steps` (TRL's default) or
            "cosine" decay to 0 there.
        warmup_steps: Linear warmup from 0 over this many optimizer steps.
        max_grad_norm: Clip the gradient's global norm to this (null = no clipping; the norm is logged).
        max_skipped_steps: An optimizer step whose loss or gradient norm is NaN or infinite is skipped (weights
            unchanged, counted in `skipped_steps`); this many in a row stop training.
        allow_checkpoint_mismatch: Load a checkpoint trained on another base model, with another LoRA alpha or
            dropout, or for another task, with a warning instead of refusing it (weight shapes must still match).
        reward_weights: One weight per reward function (null = all 1.0); the reward is their weighted sum.
        eval_num_samples: k: completions per prompt at validation/test/predict time.
        eval_temperature: Sampling temperature for evaluation; 0 means greedy (then k must be 1).
        log_rollouts: Append every completion with its rewards to rollouts.jsonl in the run's log directory.
        levers: Speed levers, each on by default; none changes what is sampled from or trained (`model.levers`).
    """


def check_settings(hp: Any) -> None:
    """Every broken invariant of the module's hyperparameters `hp`, reported together as one `TTCError`."""
    problems = []
    if not hp.rewards:
        problems.append("model.rewards is empty: name at least one reward function by import path")
    if hp.reward_weights is not None and len(hp.reward_weights) != len(hp.rewards):
        problems.append(
            f"model.reward_weights has {len(hp.reward_weights)} entries for {len(hp.rewards)} reward "
            f"function{'' if len(hp.rewards) == 1 else 's'}: give one weight per function or null"
        )
    if hp.reward_weights is not None and not all(math.isfinite(w) for w in hp.reward_weights):
        problems.append(f"model.reward_weights must be finite numbers, got {list(hp.reward_weights)}")
    if hp.reward_workers < 1:
        problems.append(f"model.reward_workers must be >= 1, got {hp.reward_workers}")
    if hp.reward_timeout is not None and not hp.reward_timeout > 0:
        problems.append("model.reward_timeout must be > 0 seconds, or null for no limit")
    if hp.reward_errors not in ("raise", "skip"):
        problems.append(f"model.reward_errors must be raise or skip, got {hp.reward_errors!r}")
    if hp.num_generations < 2:
        problems.append(
            f"model.num_generations must be >= 2, got {hp.num_generations}: advantages compare completions of the "
            "same prompt"
        )
    if hp.dtype not in ("auto", "float32", "bfloat16", "float16"):
        problems.append(f"model.dtype must be auto, float32, bfloat16 or float16, got {hp.dtype!r}")
    elif hp.dtype in ("bfloat16", "float16") and hp.lora is None:
        problems.append(
            f"model.dtype={hp.dtype} with full fine-tuning (no model.lora) trains {hp.dtype} weights, in which most of "
            "AdamW's small updates round away: set model.dtype: auto (float32 weights; bf16-mixed still computes in "
            "bf16) or train a LoRA adapter (model.lora)"
        )
    if hp.load_in_4bit and hp.lora is None:
        problems.append("model.load_in_4bit needs model.lora: 4-bit weights cannot be trained directly (QLoRA)")
    if hp.temperature <= 0:
        problems.append(f"model.temperature must be > 0 for training (sampling), got {hp.temperature}")
    if not 0 < hp.top_p <= 1:
        problems.append(f"model.top_p must be in (0, 1], got {hp.top_p}")
    if hp.top_k < 0:
        problems.append(f"model.top_k must be >= 0 (0 = off), got {hp.top_k}")
    if hp.beta < 0:
        problems.append(f"model.beta must be >= 0, got {hp.beta}")
    if hp.epsilon <= 0 or (hp.epsilon_high is not None and hp.epsilon_high <= 0):
        problems.append("model.epsilon and model.epsilon_high must be > 0")
    for name in ("num_iterations", "micro_batch_size", "max_new_tokens", "eval_num_samples", "max_skipped_steps"):
        if getattr(hp, name) < 1:
            problems.append(f"model.{name} must be >= 1, got {getattr(hp, name)}")
    if hp.eval_temperature < 0:
        problems.append(f"model.eval_temperature must be >= 0 (0 = greedy), got {hp.eval_temperature}")
    if hp.eval_temperature == 0 and hp.eval_num_samples > 1:
        problems.append("model.eval_num_samples > 1 needs model.eval_temperature > 0: greedy samples are identical")
    if not 0 < hp.learning_rate < 1:
        problems.append(f"model.learning_rate must be in (0, 1), got {hp.learning_rate} (LoRA: ~1e-5 to 1e-4)")
    if hp.warmup_steps < 0:
        problems.append(f"model.warmup_steps must be >= 0, got {hp.warmup_steps}")
    problems += lora_problems(hp.lora)
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


def lora_problems(lora: Any) -> list[str]:
    """What peft would reject (or train wrongly) in `model.lora`, a `LoRA` or its dict."""
    if lora is None:
        return []
    get = lora.get if isinstance(lora, dict) else lambda name, default=None: getattr(lora, name, default)
    problems = []
    if not isinstance(get("r", 16), int) or get("r", 16) < 1:
        problems.append(f"model.lora.r must be >= 1, got {get('r')}")
    if not get("alpha", 32) > 0:
        problems.append(f"model.lora.alpha must be > 0, got {get('alpha')}")
    if not 0 <= get("dropout", 0.0) < 1:
        problems.append(f"model.lora.dropout must be in [0, 1), got {get('dropout')}")
    return problems


def check_trainer(
    trainer: Any, stage: str, lora: bool, load_in_4bit: bool = False, dynamic_sampling: bool = False
) -> None:
    """What the module refuses of the trainer it runs under, each with what to use instead."""
    precision = str(trainer.precision) if stage == "fit" else ""
    if precision == "16-true":
        raise TTCError(
            "trainer.precision 16-true stores the trained weights in float16, where AdamW's epsilon (1e-8) and "
            "small updates underflow and the weights turn NaN: use 16-mixed (float32 weights, float16 compute)"
        )
    if precision == "bf16-true" and not lora:
        raise TTCError(
            "trainer.precision bf16-true with full fine-tuning (no model.lora) trains bfloat16 weights, in which "
            "most of AdamW's small updates round away: use bf16-mixed, or train a LoRA adapter (model.lora)"
        )
    if stage == "fit" and trainer.max_steps == -1 and trainer.max_epochs == 1000:  # Lightning's default length
        log.warning(
            "trainer.max_steps is not set: the run goes on for 1000 epochs (Lightning's default), and the LR schedule "
            "decays over all of them; set trainer.max_steps (optimizer steps) to say how long it trains"
        )
    strategy = trainer.strategy
    if isinstance(strategy, ModelParallelStrategy):
        mesh = strategy.device_mesh
        tp, distributed = mesh["tensor_parallel"].size(), strategy._save_distributed_checkpoint
        sharding.check_strategy(tp, mesh.size(), distributed, load_in_4bit, dynamic_sampling)
    elif any(name in type(strategy).__name__ for name in ("FSDP", "DeepSpeed")):
        raise sharded_strategy_error(type(strategy).__name__)
    datamodule = trainer.datamodule
    if datamodule is not None and not isinstance(datamodule, Task):
        raise TTCError(
            f"data: {type(datamodule).__name__} lacks evaluate(records), final_prediction(record) or "
            "next_train_batch(); subclass ttc_lightning.data.TaskDataModule or add the three methods"
        )
