"""`GRPOModule`: the Lightning hooks of GRPO training and evaluation. `training_step` reads top to bottom; the
pieces it calls live in their own files (policy, sampler, logprobs, rollout, grpo, checkpoints, evaluation)."""

from __future__ import annotations

import dataclasses
import logging
import numbers
import time
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ttc_lightning import cpu
from ttc_lightning.data.base import Task
from ttc_lightning.errors import TTCError, sharded_strategy_error
from ttc_lightning.evaluation.evaluator import Evaluator, print_metrics, write_predictions
from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import (
    LoRA,
    Prompt,
    load_policy,
    load_tokenizer,
    materialise,
    prompt_limit,
    reference_model,
)
from ttc_lightning.model.tiny import TINY
from ttc_lightning.rewards.scoring import RewardErrors, RewardScorer, RewardSpec, load_rewards
from ttc_lightning.run.checkpoints import (
    base_fingerprint,
    complete_state,
    rng_states,
    run_identity,
    trim_state,
    ttc_section,
)
from ttc_lightning.sampling.fast import transformers_refusal
from ttc_lightning.sampling.sampler import Sampler, Samples
from ttc_lightning.settings import MODULE_DOC, check_settings
from ttc_lightning.training.dynamic import nothing_left_to_learn, sample_until_informative
from ttc_lightning.training.grpo import (
    ImportanceSamplingLevel,
    LossType,
    ScaleRewards,
    accumulation_weight,
    grpo_loss,
    logprob_mismatch,
    masked_mean,
)
from ttc_lightning.training.logprobs import completion_logps, frozen_logps
from ttc_lightning.training.optimizer import (
    LRSchedule,
    StepGuard,
    adamw_with_schedule,
    gradients_synced,
    mean_over_ranks,
    rollout_totals,
    total_optimizer_steps,
)
from ttc_lightning.training.rollout import (
    OVERLONG,
    OverlongBuffer,
    Rollout,
    Round,
    as_overlong_buffer,
    repeat_columns,
    rollout_metrics,
    scored_round,
    step_records,
    training_rollout,
    write_rollouts,
)

DEFAULT_LEVERS = Levers()


class GRPOModule(L.LightningModule):
    __doc__ = MODULE_DOC  # with every option documented (`--model.help`), beside their checks

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
        # The training pass that shares a prompt reaches into transformers' cache layers: tested releases only.
        self.prompt_once = self.levers.prompt_once and transformers_refusal() is None
        self.lora = lora if isinstance(lora, LoRA) or lora is None else LoRA(**lora)
        self.scorer = RewardScorer(load_rewards(rewards), reward_workers, reward_timeout, reward_errors)
        self.reward_names = self.scorer.names
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(rewards), dtype=torch.float32)
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
        self.last_rollout: list[dict[str, Any]] = []
        self.evaluator = Evaluator(
            self.generate, self.scorer, self.reward_weights, eval_num_samples, eval_temperature, max_new_tokens
        )
        self._log_path: Path | None = None
        # The random states as the step in flight began: an interrupt checkpoint keeps these, to sample it again.
        self._rng_at_step: dict[str, Any] | None = None

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
            cuda=self._on_gpu(),
            autocast=self._trainer is not None and "mixed" in str(self.trainer.precision),
        )
        self.policy, self.ref_model = policy.model, policy.reference
        self.fingerprint = base_fingerprint(self.policy)  # of the base as loaded, before training changes it
        lora, quantized = self.lora is not None, hp.load_in_4bit
        self.sampler = Sampler(policy, self.levers, lora=lora, quantized=quantized, top_p=hp.top_p, top_k=hp.top_k)

    def _on_gpu(self) -> bool:
        """Whether the policy will run on a GPU: the trainer's accelerator, or without a trainer (export, scripts)
        whether this machine has one."""
        if self._trainer is None:
            return torch.cuda.is_available()
        return isinstance(self.trainer.accelerator, CUDAAccelerator)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision) if stage == "fit" else ""
        if precision == "16-true":
            raise TTCError(
                "trainer.precision 16-true stores the trained weights in float16, where AdamW's epsilon (1e-8) and "
                "small updates underflow and the weights turn NaN: use 16-mixed (float32 weights, float16 compute)"
            )
        if precision == "bf16-true" and self.lora is None:
            raise TTCError(
                "trainer.precision bf16-true with full fine-tuning (no model.lora) trains bfloat16 weights, in which "
                "most of AdamW's small updates round away: use bf16-mixed, or train a LoRA adapter (model.lora)"
            )
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
        rank_zero_info(f"ttc: {self.sampler.describe()}; {self._training_passes()}")
        if self.hparams.tis_cap is not None and not self.sampler.backend.keeps_logps:
            logging.getLogger("ttc").warning(
                "model.tis_cap has no effect: generate() keeps no log-probs of its own (see the sampling line)"
            )

    def _training_passes(self) -> str:
        if self.prompt_once:
            return "training log-probs with one pass per prompt"
        why = "the lever is off" if not self.levers.prompt_once else transformers_refusal()
        return f"training log-probs with one pass per completion ({why})"

    # --- rollout -------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[Prompt], num_samples: int, temperature: float, max_new_tokens: int) -> Samples:
        """`num_samples` completions per prompt, rows grouped by prompt; temperature 0 is greedy."""
        return self.sampler.sample(prompts, num_samples, temperature, max_new_tokens)

    def completion_logps(
        self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs `[n, C]` of the rollout's completions under `model` (and their entropies)."""
        hp = self.hparams
        options = {"prompt_once": self.prompt_once, "checkpointed": hp.gradient_checkpointing}
        return completion_logps(model, rollout, temperature=hp.temperature, with_entropy=with_entropy, **options)

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
        started = time.perf_counter()
        self._rng_at_step = rng_states()

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
            return self._finish_step(sampled, None, sampling, (generated - started, 0.0))
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
        self._finish_step(sampled, kept, stats | sampling, (generated - started, trained - generated))

    def _sample_round(self, batch: dict[str, list]) -> Round:
        """Steps 1-3 of `training_step` on one batch: G completions per prompt, scored."""
        hp, g = self.hparams, self.hparams.num_generations
        samples = self.generate(batch["prompt"], g, hp.temperature, hp.max_new_tokens)
        scores, errors = self.scorer.score(samples.texts, repeat_columns(batch, g), g)  # [N, F], [F] or None
        return scored_round(batch, samples, scores, errors, self.reward_weights, hp.max_new_tokens, self.overlong)

    def _optimise(self, rollout: Rollout, weight: float = 1.0) -> dict[str, Tensor]:
        """Steps 6 and 7 of `training_step`; returns token-weighted means of the loss stats over all passes, and of
        the sampler/trainer log-prob mismatch over the first. `weight` 0: a pass that only joins DDP's all-reduce."""
        hp = self.hparams
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        total_rows, total_tokens = mean_over_ranks(self, rollout_totals(rollout.completion_mask, weight))
        sums: dict[str, Tensor] = {}
        weights: dict[str, float] = {}
        for iteration in range(hp.num_iterations):
            micro_batches = self._micro_batches(len(rollout))
            step_loss = torch.zeros((), device=self.device)  # non-finite when any micro-batch's loss is
            for k, index in enumerate(micro_batches):
                part = rollout.rows(index)
                with gradients_synced(self.trainer.model, last=k == len(micro_batches) - 1):
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
            # 7. One optimizer step per pass, with clipping and the non-finite guard.
            grad_norm = self._step_optimizer(optimizer, step_loss)
            scheduler.step()
            if 0 < self.trainer.max_steps <= self.trainer.global_step:
                break
        return {key: value / max(weights[key], 1.0) for key, value in sums.items()} | {"grad_norm": grad_norm}

    def _step_optimizer(self, optimizer: Any, loss: Tensor) -> Tensor:
        """Step 7's end: clip the accumulated gradients, take the optimizer step unless the loss or the gradient norm
        is not finite on some rank (`StepGuard`: then no weight or optimizer state changes); the gradient norm."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        # Under 16-mixed the gradients are still multiplied by the loss scale, which the optimizer step divides out.
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        scale = float(scaler.get_scale()) if scaler is not None else 1.0
        max_norm = (self.hparams.max_grad_norm or float("inf")) * scale
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach() / scale
        # Under DDP the gradients (and so their norm) are all-reduced already; the loss is per rank: all must agree.
        finite = bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm))
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if self.guard.skip(finite, self.trainer.global_step, float(loss), float(grad_norm)):
            if scaler is None:  # AdamW leaves a weight without a gradient, and its state, as they are
                optimizer.zero_grad(set_to_none=True)
            else:  # the scaler skips a step whose gradients overflow, as it does for any overflow
                for p in params:
                    p.grad.fill_(float("nan"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def _finish_step(
        self, sampled: Round, kept: tuple[Tensor, Rollout] | None, stats: dict, seconds: tuple[float, float]
    ) -> None:
        """Step 8: the metrics of every completion sampled, and their records (`kept`: the groups trained on), both
        labelled with the optimizer steps taken so far (a step that took none repeats the last one)."""
        hp, rollout, step = self.hparams, sampled.rollout, self.trainer.global_step
        metrics = rollout_metrics(
            rollout, hp.num_generations, self.sampler.eos_token_ids, self.score_names, sampled.reward_errors
        )
        metrics.update(
            {
                "step": float(step),  # metrics.csv's step column, as in rollouts.jsonl (Lightning's counts batches)
                "grad_norm": float("nan"),  # without an optimizer step, no gradient
                "skipped_steps": float(self.guard.skipped),
                "lr": self.lr_schedulers().get_last_lr()[0],
                "tokens_per_second": rollout.completion_mask.sum() / sum(seconds),
                "time/generate": seconds[0],
                "time/train": seconds[1],
                **stats,
            }
        )
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        # Lightning all-reduces each value when it is logged (sync_dist), and NCCL reduces tensors on the GPU only.
        metrics = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in metrics.items()}
        batch_size, shown = len(rollout) // hp.num_generations, ("reward", "kl")
        self.log_dict({k: v for k, v in metrics.items() if k not in shown}, batch_size=batch_size, sync_dist=True)
        for name in shown:
            if name in metrics:
                self.log(name, metrics[name], prog_bar=True, batch_size=batch_size, sync_dist=True)
        self.last_rollout = step_records(step, sampled, kept, self.score_names, hp.num_generations, hp.dynamic_sampling)
        if hp.log_rollouts:
            write_rollouts(self._log_dir(), self.global_rank, self.last_rollout)
        self._rng_at_step = None  # the step is done: a checkpoint from here on takes the current states

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        total = total_optimizer_steps(
            self.trainer.max_steps, self.trainer.estimated_stepping_batches, hp.num_iterations
        )
        return adamw_with_schedule(params, hp.learning_rate, hp.weight_decay, hp.lr_scheduler, hp.warmup_steps, total)

    # --- evaluation ----------------------------------------------------------------------------------------------

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluator.add(batch)

    test_step = predict_step = validation_step

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start()

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def _finish_evaluation(self, stage: str) -> None:
        records = self.evaluator.gathered(self.trainer.world_size)
        if self.trainer.sanity_checking or not records:
            return
        metrics = self.evaluator.metrics(records, self.trainer.datamodule)
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self.log_dict(scalars, batch_size=len(records))
        if self.trainer.state.fn != "fit" and self.global_rank == 0:
            path = self.evaluator.write_metrics(self._log_dir(), stage, self.trainer.ckpt_path, records, metrics)
            print_metrics(self.trainer.state.fn, scalars)
            rank_zero_info(f"ttc: wrote {path}")

    def on_predict_epoch_end(self) -> None:
        """predictions.jsonl: one line per input with its k completions, what was parsed, the final answer/patch."""
        records = self.evaluator.gathered(self.trainer.world_size)
        if self.global_rank == 0:
            path = write_predictions(self._log_dir(), records, self.trainer.datamodule.final_prediction)
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
        checkpoint["ttc"] = ttc_section(self._identity(), self.guard.skipped, self._rng_at_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        identity, allow = self._identity(), self.hparams.allow_checkpoint_mismatch
        complete_state(checkpoint, self.state_dict(), trainable, identity, allow)
        self.guard.skipped = checkpoint["ttc"].get("skipped_steps", 0)

    def _identity(self) -> dict[str, Any]:
        # No task outside a Trainer (`ttc export`).
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return run_identity(self.hparams.model_name_or_path, self.fingerprint, self.lora, datamodule)
