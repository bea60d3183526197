"""`GRPOModule`: the Lightning hooks of GRPO training and evaluation. `training_step` reads top to bottom; the
pieces it calls live in their own files (policy, sampler, logprobs, rollout, grpo, checkpoints, evaluation)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR

from ttc_lightning import cpu
from ttc_lightning.checkpoints import base_fingerprint, complete_state, run_identity, trim_state, ttc_section
from ttc_lightning.data.base import Task
from ttc_lightning.dynamic import nothing_left_to_learn, sample_until_informative
from ttc_lightning.errors import TTCError, sharded_strategy_error
from ttc_lightning.evaluation import prompt_records, reward_metrics
from ttc_lightning.grpo import (
    ImportanceSamplingLevel,
    LossType,
    LRSchedule,
    ScaleRewards,
    accumulation_weight,
    grpo_loss,
    logprob_mismatch,
    lr_multiplier,
    masked_mean,
)
from ttc_lightning.guard import StepGuard
from ttc_lightning.levers import Levers
from ttc_lightning.logprobs import completion_logps, frozen_logps
from ttc_lightning.policy import LoRA, Prompt, load_policy, load_tokenizer, materialise, prompt_limit, reference_model
from ttc_lightning.reports import gather_records, print_per_class, write_metrics, write_predictions
from ttc_lightning.rollout import (
    OVERLONG,
    OverlongBuffer,
    Rollout,
    Round,
    add_overlong_penalty,
    as_overlong_buffer,
    repeat_columns,
    rollout_metrics,
    step_records,
    training_rollout,
    write_rollouts,
)
from ttc_lightning.sampler import Sampler, Samples
from ttc_lightning.scoring import RewardErrors, RewardScorer, RewardSpec, load_rewards
from ttc_lightning.settings import check_settings
from ttc_lightning.tiny import TINY

DEFAULT_LEVERS = Levers()


class GRPOModule(L.LightningModule):
    """GRPO on a causal LM: sample G completions per prompt, score them, push the policy towards the better ones.

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
        dtype: Weights' dtype. "auto": float32 on CPU; bfloat16 on GPUs that support it; else float16 under LoRA.
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
        levers: Speed levers, each exact and on by default.
    """

    def __init__(
        self,
        rewards: list[str | RewardSpec | dict[str, Any]],
        model_name_or_path: str = TINY,
        lora: LoRA | None = None,
        load_in_4bit: bool = False,
        gradient_checkpointing: bool = False,
        dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto",
        num_generations: int = 4,
        max_new_tokens: int = 128,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: LossType = "dapo",
        scale_rewards: ScaleRewards = "group",
        importance_sampling_level: ImportanceSamplingLevel = "token",
        dynamic_sampling: bool = False,
        max_sampling_rounds: int = 4,
        mask_truncated_completions: bool = False,
        overlong_buffer: OverlongBuffer | None = None,
        tis_cap: float | None = None,
        reward_workers: int = 1,
        reward_timeout: float | None = None,
        reward_errors: RewardErrors = "raise",
        num_iterations: int = 1,
        micro_batch_size: int = 8,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        lr_scheduler: LRSchedule = "linear",
        warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        max_skipped_steps: int = 10,
        allow_checkpoint_mismatch: bool = False,
        reward_weights: list[float] | None = None,
        eval_num_samples: int = 1,
        eval_temperature: float = 0.0,
        log_rollouts: bool = True,
        levers: Levers = DEFAULT_LEVERS,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        check_settings(self.hparams)
        self.levers = levers if isinstance(levers, Levers) else Levers(**levers)
        self.lora = lora if isinstance(lora, LoRA) or lora is None else LoRA(**lora)
        self.scorer = RewardScorer(load_rewards(rewards), reward_workers, reward_timeout, reward_errors)
        self.reward_names = self.scorer.names
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(rewards))
        self.overlong = as_overlong_buffer(overlong_buffer)
        self.score_names = [*self.reward_names, *([OVERLONG] if self.overlong else [])]  # rollout's reward columns
        self._tied = 0  # batches drawn in a row by steps that found no group to train on (dynamic sampling)
        self.model_path = materialise(model_name_or_path)
        self.tokenizer = load_tokenizer(self.model_path, model_name_or_path)
        # The longest prompt the model's context leaves room for: data modules drop longer ones (`HasTokenizer`).
        self.prompt_limit = prompt_limit(self.model_path, model_name_or_path, max_new_tokens)
        self.fingerprint: dict[str, Any] | None = None
        self.guard = StepGuard(max_skipped_steps)
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.sampler: Sampler | None = None
        self.automatic_optimization = False
        # Under LoRA the checkpoint holds only the adapters; the frozen base comes from `model_name_or_path`.
        self.strict_loading = lora is None
        self._grad_norm = torch.tensor(float("nan"))
        self._step_loss = torch.tensor(0.0)
        self.last_rollout: list[dict[str, Any]] = []
        self._eval_records: list[dict[str, Any]] = []
        self._log_path: Path | None = None

    # --- set-up --------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the policy (and, for full fine-tuning with beta > 0, a frozen reference copy) once."""
        if self.policy is not None:
            return
        hp = self.hparams
        policy = load_policy(
            self.model_path,
            hp.model_name_or_path,
            self.tokenizer,
            dtype=hp.dtype,
            lora=self.lora,
            load_in_4bit=hp.load_in_4bit,
            gradient_checkpointing=hp.gradient_checkpointing,
            reference=hp.beta > 0,
            fuse=self.levers.fuse_lora,
        )
        self.policy, self.ref_model = policy.model, policy.reference
        self.fingerprint = base_fingerprint(self.policy)  # of the base as loaded, before training changes it
        self.sampler = Sampler(
            self.policy,
            self.tokenizer,
            policy.eos_token_ids,
            self.levers,
            lora=self.lora is not None,
            quantized=hp.load_in_4bit,
            top_p=hp.top_p,
            top_k=hp.top_k,
        )

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        if "FSDP" in type(strategy).__name__ or getattr(strategy, "zero_stage_3", False):
            raise sharded_strategy_error(type(strategy).__name__)
        datamodule = self.trainer.datamodule
        if datamodule is not None and not isinstance(datamodule, Task):
            raise TTCError(
                f"data: {type(datamodule).__name__} lacks evaluate(records), final_prediction(record) or "
                "next_train_batch(); subclass ttc_lightning.data.TaskDataModule or add the three methods"
            )

    def on_fit_start(self) -> None:
        # Every rank starts from the same random state (Lightning's seed, for the same initial weights, or the
        # checkpoint's, which rank 0 wrote); sampling from it on every rank would tie the completions of different
        # ranks' prompts to each other. Each rank goes on from its own seed, drawn from that state.
        if self.trainer.world_size > 1:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
        if cpu.enabled(self.levers.cpu, self.device):
            cpu.keep_freed_memory()
        plan = self.sampler.plan(self.sampler.generation_config(self.hparams.temperature, self.hparams.max_new_tokens))
        rank_zero_info(f"ttc: {plan.describe()}")
        if self.hparams.tis_cap is not None and plan.decoder != "loop":
            rank_zero_warn("model.tis_cap has no effect: generate() keeps no log-probs of its own (see the plan)")

    # --- rollout -------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], num_samples: int, temperature: float, max_new_tokens: int) -> Samples:
        """`num_samples` completions per prompt, rows grouped by prompt; temperature 0 is greedy."""
        return self.sampler.sample(prompts, num_samples, temperature, max_new_tokens)

    def completion_logps(
        self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs `[n, C]` of the rollout's completions under `model` (and their entropies)."""
        return completion_logps(
            model,
            rollout,
            temperature=self.hparams.temperature,
            prompt_once=self.levers.prompt_once,
            checkpointed=self.hparams.gradient_checkpointing,
            with_entropy=with_entropy,
        )

    def frozen_logps(self, rollout: Rollout) -> tuple[Tensor | None, Tensor | None]:
        """Old-policy log-probs (num_iterations > 1) and reference log-probs (beta > 0), micro-batched, no grad."""
        old = self.policy if self.hparams.num_iterations > 1 else None
        reference = partial(reference_model, self.policy, self.ref_model) if self.hparams.beta > 0 else None
        return frozen_logps(self.completion_logps, rollout, self._micro_batches(len(rollout)), old, reference)

    def _micro_batches(self, n: int) -> list[Tensor]:
        # In order, so a group's rows share micro-batches and their prompt pass (`completion_logps`); the order
        # does not change the step, which sums the gradients of all micro-batches.
        return list(torch.arange(n, device=self.device).split(self.hparams.micro_batch_size))

    # --- training ------------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        """One rollout and `num_iterations` optimizer steps on it.

        1. Take the batch: B prompts and their metadata columns.
        2. Generate G completions per prompt (no grad, sampling, KV cache, stop at EOS).
        3. Score each completion with every reward function; combine them with `reward_weights`, add the overlong
           penalty. With `dynamic_sampling`, 1-3 again on the training stream's next prompts until B groups have
           rewards that differ; only those are trained on (with none on any rank, no optimizer step).
        4. Group-relative advantages; with `mask_truncated_completions`, cut completions get no loss.
        5. Per-token log-probs of the old policy (num_iterations > 1) and the reference (beta > 0), no grad.
        6. The loss of each micro-batch: policy log-probs, clipped surrogate + KL, scaled for accumulation.
        7. num_iterations passes over the rollout: accumulate the micro-batches' gradients, clip, step the
           optimizer and the LR schedule.
        8. Log the step's metrics (of every completion sampled) and the rollout's records.
        """
        hp = self.hparams
        g = hp.num_generations
        step = self.trainer.global_step
        started = time.perf_counter()

        # 1-3. Prompts and metadata, completions, rewards: one round, or rounds until enough groups differ.
        sampled, training, sampling = self._sample_round(batch), (torch.arange(len(batch["prompt"])), 1.0), {}
        if hp.dynamic_sampling:
            drawn = sample_until_informative(
                sampled,
                target=len(batch["prompt"]),
                group_size=g,
                max_rounds=hp.max_sampling_rounds,
                draw=self.trainer.datamodule.next_train_batch,
                sample=self._sample_round,
                sum_over_ranks=lambda t: self.trainer.strategy.reduce(t.to(self.device), reduce_op="sum").cpu(),
                pad_id=self.tokenizer.pad_token_id,
            )
            sampled, training, sampling = drawn.sampled, drawn.training_groups(), drawn.metrics()
            self._tied = 0 if training else self._tied + drawn.rounds
            self.trainer.should_stop |= nothing_left_to_learn(self._tied, self.trainer.num_training_batches)
        generated = time.perf_counter()
        if training is None:  # no rank has a group whose rewards differ: nothing to learn, no optimizer step
            return self._finish_step(step, sampled, None, sampling, (generated - started, 0.0))
        groups, weight = training

        # 4. Advantages of the groups trained on; with mask_truncated_completions, their loss mask.
        eos = self.sampler.eos_token_ids if hp.mask_truncated_completions else None
        rollout = training_rollout(sampled, groups, g, hp.scale_rewards, truncated_by=eos)

        # 5. Frozen log-probs.
        old_logps, ref_logps = self.frozen_logps(rollout)
        rollout = dataclasses.replace(rollout, old_logps=old_logps, ref_logps=ref_logps)

        # 6-7. Optimisation passes.
        stats = self._optimise(rollout, weight)
        trained = time.perf_counter()

        # 8. Metrics, and the records kept for callbacks (e.g. a W&B completions table) and rollouts.jsonl.
        kept = (groups, rollout) if weight else None
        self._finish_step(step, sampled, kept, stats | sampling, (generated - started, trained - generated))

    def _sample_round(self, batch: dict[str, list]) -> Round:
        """Steps 1-3 of `training_step` on one batch: G completions per prompt, scored."""
        hp, g = self.hparams, self.hparams.num_generations
        samples = self.generate(batch["prompt"], g, hp.temperature, hp.max_new_tokens)
        columns = repeat_columns(batch, g)
        scores, errors = self.scorer.score(samples.texts, columns, g)  # [N, F], [F] or None
        reward = torch.nansum(scores * self.reward_weights, dim=1)  # [N]
        scores, shaped = add_overlong_penalty(scores, reward, samples.completion_mask, hp.max_new_tokens, self.overlong)
        scores, reward, shaped = scores.to(self.device), reward.to(self.device), shaped.to(self.device)
        # Advantages come in step 4, from the groups trained on.
        zeros = torch.zeros_like(reward)
        rollout = Rollout(*samples[:5], scores, shaped, zeros, sampler_logps=samples.logps, reward_errors=errors)
        return Round(batch, rollout, task_reward=reward)

    def _optimise(self, rollout: Rollout, weight: float = 1.0) -> dict[str, Tensor]:
        """Steps 6 and 7 of `training_step`; returns token-weighted means of the loss stats over all passes, and of
        the sampler/trainer log-prob mismatch over the first. `weight` 0: a pass that only joins DDP's all-reduce."""
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        totals = torch.tensor([len(rollout), float(rollout.completion_mask.sum())]) * weight  # [2] rows, tokens
        total_rows, total_tokens = self._global_mean(totals)
        sums: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        for iteration in range(hp.num_iterations):
            micro_batches = self._micro_batches(len(rollout))
            step_loss = torch.zeros((), device=self.device)  # non-finite when any micro-batch's loss is
            for k, index in enumerate(micro_batches):
                part = rollout.rows(index)
                with self._sync_gradients(last=k == len(micro_batches) - 1):
                    # 6. The loss.
                    logps, entropy = self.completion_logps(self.policy, part, with_entropy=True)  # [n, C]
                    loss, stats = grpo_loss(
                        logps,
                        part.old_logps,
                        part.ref_logps,
                        part.advantages,
                        part.completion_mask,
                        beta=hp.beta,
                        epsilon=hp.epsilon,
                        epsilon_high=hp.epsilon_high,
                        loss_type=hp.loss_type,
                        max_completion_length=hp.max_new_tokens,
                        importance_sampling_level=hp.importance_sampling_level,
                        sampler_logps=part.sampler_logps,
                        tis_cap=hp.tis_cap if part.sampler_logps is not None else None,
                    )
                    tokens = int(part.completion_mask.sum())
                    scale = accumulation_weight(
                        hp.loss_type, len(part), total_rows, tokens, total_tokens, len(micro_batches)
                    )
                    self.manual_backward(loss * scale * weight)
                step_loss = step_loss + loss.detach()
                stats = {**stats, "loss": loss.detach(), "entropy": masked_mean(entropy, part.completion_mask)}
                if iteration == 0 and part.sampler_logps is not None:  # before any update: old policy = trainer
                    stats |= logprob_mismatch(logps.detach(), part.sampler_logps, part.completion_mask)
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value.detach() * tokens
                    weights[key] = weights.get(key, 0.0) + tokens
            # 7. One optimizer step per pass; clipping and the non-finite guard are in `on_before_optimizer_step`.
            self._step_loss = step_loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if 0 < self.trainer.max_steps <= self.trainer.global_step:
                break
        return {key: value / max(weights[key], 1.0) for key, value in sums.items()}

    def _sync_gradients(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Under DDP, all-reduce the gradients once per optimizer step (the last micro-batch), not after each."""
        if isinstance(self.trainer.model, DDP) and not last:
            return self.trainer.model.no_sync()
        return contextlib.nullcontext()

    def _global_mean(self, values: Tensor) -> list[float]:
        """Per-rank totals (rows, tokens) averaged over ranks: DDP averages gradients, so the losses divide by these."""
        values = values.float().to(self.device)
        if self.trainer.world_size > 1:
            values = self.all_gather(values).float().mean(0)
        return values.tolist()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the precision plugin has unscaled fp16 gradients, so the norm is the true one.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.hparams.max_grad_norm or float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()
        # Under DDP the gradients (and so their norm) are all-reduced already; the loss is per rank: all must agree.
        finite = bool(torch.isfinite(self._step_loss)) and bool(torch.isfinite(self._grad_norm))
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if self.guard.skip(finite, self.trainer.global_step, float(self._step_loss), float(self._grad_norm)):
            # No gradient, no update: the optimizer leaves every weight and its state as they are.
            optimizer.zero_grad(set_to_none=True)

    def _finish_step(
        self, step: int, sampled: Round, kept: tuple[Tensor, Rollout] | None, stats: dict, seconds: tuple[float, float]
    ) -> None:
        """Step 8: the metrics of every completion sampled, and their records (`kept`: the groups trained on)."""
        hp, rollout = self.hparams, sampled.rollout
        metrics = rollout_metrics(rollout, hp.num_generations, self.sampler.eos_token_ids, self.score_names)
        metrics.update(
            {
                "grad_norm": self._grad_norm,
                "skipped_steps": float(self.guard.skipped),
                "lr": self.lr_schedulers().get_last_lr()[0],
                "tokens_per_second": rollout.completion_mask.sum() / sum(seconds),
                "time/generate": seconds[0],
                "time/train": seconds[1],
                **stats,
            }
        )
        batch_size, shown = len(rollout) // hp.num_generations, ("reward", "kl")
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, batch_size=batch_size, sync_dist=True)
        for name in shown:
            if name in metrics:
                self.log(name, metrics[name], prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.last_rollout = step_records(step, sampled, kept, self.score_names, hp.num_generations, hp.dynamic_sampling)
        if hp.log_rollouts:
            write_rollouts(self._log_dir(), self.global_rank, self.last_rollout)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        schedule = partial(
            lr_multiplier,
            schedule=hp.lr_scheduler,
            warmup_steps=hp.warmup_steps,
            total_steps=self._total_optimizer_steps(),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": LambdaLR(optimizer, schedule), "interval": "step"},
        }

    def _total_optimizer_steps(self) -> int | None:
        trainer = self.trainer
        if trainer.max_steps > 0:
            return trainer.max_steps
        batches = trainer.estimated_stepping_batches
        return None if math.isinf(batches) else int(batches) * self.hparams.num_iterations

    # --- evaluation ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, list]) -> list[dict[str, Any]]:
        """`eval_num_samples` completions per prompt at `eval_temperature`, scored: one record per prompt."""
        hp = self.hparams
        k = hp.eval_num_samples
        columns = {key: values for key, values in batch.items() if key != "prompt"}
        repeated = {key: [v for v in values for _ in range(k)] for key, values in columns.items()}
        samples = self.generate(batch["prompt"], k, hp.eval_temperature, hp.max_new_tokens)
        scores, _ = self.scorer.score(samples.texts, repeated, k)  # [B*k, F]
        reward = torch.nansum(scores * self.reward_weights, dim=1)  # [B*k]
        lengths = samples.completion_mask.sum(1).tolist()
        return prompt_records(
            batch["prompt"], columns, samples.texts, lengths, scores.tolist(), reward.tolist(), self.reward_names, k
        )

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._eval_records.extend(self.evaluate_batch(batch))

    test_step = predict_step = validation_step

    def on_validation_epoch_start(self) -> None:
        self._eval_records = []

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, stage: str) -> None:
        records = gather_records(self._eval_records, self.trainer.world_size)
        if self.trainer.sanity_checking or not records:
            return
        task: Task = self.trainer.datamodule
        metrics: dict[str, Any] = {**reward_metrics(records, self.reward_names), **task.evaluate(records)}
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self.log_dict(scalars, batch_size=len(records))
        if self.trainer.state.fn == "fit" or self.global_rank != 0:
            return
        sampling = {
            "eval_num_samples": self.hparams.eval_num_samples,
            "eval_temperature": self.hparams.eval_temperature,
        }
        path = write_metrics(self._log_dir(), stage, self.trainer.ckpt_path, len(records), sampling, metrics)
        if "per_class" in metrics:
            print_per_class(metrics["per_class"])
        rank_zero_info(f"ttc: wrote {path}")

    def on_predict_epoch_end(self) -> None:
        """predictions.jsonl: one line per input with its k completions, what was parsed, the final answer/patch."""
        records = gather_records(self._eval_records, self.trainer.world_size)
        if self.global_rank != 0:
            return
        task: Task = self.trainer.datamodule
        path = write_predictions(self._log_dir(), records, task.final_prediction)
        rank_zero_info(f"ttc: wrote {len(records)} predictions to {path}")

    def _log_dir(self) -> Path:
        # trainer.log_dir is a collective call under DDP: looked up once, by every rank.
        if self._log_path is None:
            self._log_path = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        return self._log_path

    # --- checkpoints ---------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what training changed: the LoRA weights under LoRA, the policy otherwise, never the reference."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        state = trim_state(checkpoint["state_dict"], trainable, self.lora is not None, checkpoint.get("global_step", 0))
        checkpoint["state_dict"] = state
        checkpoint["ttc"] = ttc_section(self._identity(), self.guard.skipped)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        identity, allow = self._identity(), self.hparams.allow_checkpoint_mismatch
        complete_state(checkpoint, self.state_dict(), trainable, identity, allow)
        self.guard.skipped = checkpoint["ttc"].get("skipped_steps", 0)

    def _identity(self) -> dict[str, Any]:
        # No task outside a Trainer (`ttc export`).
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return run_identity(self.hparams.model_name_or_path, self.fingerprint, self.lora, datamodule)
