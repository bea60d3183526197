"""`GRPOModule`: the Lightning hooks of GRPO training and evaluation. `training_step` reads top to bottom; the
pieces it calls live in the rooms beside it (model/, sampling/, training/, rewards/, evaluation/, run/)."""

from __future__ import annotations

import dataclasses
import logging
import time
from functools import cached_property, partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from ttc_lightning import cpu
from ttc_lightning.evaluation.evaluator import Evaluator
from ttc_lightning.levers import Levers
from ttc_lightning.model import loading, sharding
from ttc_lightning.model.loading import LoRA, Prompt
from ttc_lightning.model.tiny import TINY
from ttc_lightning.rewards.entries import RewardSpec, load_rewards
from ttc_lightning.rewards.scoring import RewardErrors, RewardScorer
from ttc_lightning.run import checkpoints, saving
from ttc_lightning.sampling.fast import transformers_refusal
from ttc_lightning.sampling.sampler import Sampler, Samples
from ttc_lightning.settings import MODULE_DOC, check_settings, check_trainer
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
from ttc_lightning.training.logprobs import completion_logps, frozen_logps, training_passes
from ttc_lightning.training.optimizer import (
    LRSchedule,
    StepGuard,
    TokenWeightedMeans,
    adamw_with_schedule,
    clip_and_step,
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
    scored_round,
    step_metrics,
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
        names = ("beta", "epsilon", "epsilon_high", "loss_type", "importance_sampling_level")
        self.loss_options = {name: self.hparams[name] for name in names} | {"max_completion_length": max_new_tokens}
        # The training pass that shares a prompt reaches into transformers' cache layers: tested releases only.
        self.prompt_once = self.levers.prompt_once and transformers_refusal() is None
        self.lora = lora if isinstance(lora, LoRA) or lora is None else LoRA(**lora)
        self.scorer = RewardScorer(load_rewards(rewards), reward_workers, reward_timeout, reward_errors)
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(rewards), dtype=torch.float32)
        self.overlong = as_overlong_buffer(overlong_buffer)
        self.score_names = [*self.scorer.names, *([OVERLONG] if self.overlong else [])]  # rollout's reward columns
        self._tied = 0  # batches drawn in a row by steps that found no group to train on (dynamic sampling)
        self.model_path = loading.materialise(model_name_or_path)
        self.tokenizer = loading.load_tokenizer(self.model_path, model_name_or_path)
        # The longest prompt the model's context leaves room for: data modules drop longer ones (`HasTokenizer`).
        self.prompt_limit = loading.prompt_limit(self.model_path, model_name_or_path, max_new_tokens)
        self.fingerprint: dict[str, Any] | None = None
        self.guard = StepGuard(max_skipped_steps)
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.sampler: Sampler | None = None
        self.automatic_optimization = False
        # Under LoRA the checkpoint holds only the adapters; the frozen base comes from `model_name_or_path`.
        self.strict_loading = lora is None
        self.evaluator = Evaluator(
            self.generate, self.scorer, self.reward_weights, eval_num_samples, eval_temperature, max_new_tokens
        )
        # The random states as the step in flight began: an interrupt checkpoint keeps these, to sample it again.
        self._rng_at_step: dict[str, Any] | None = None
        # Whether a checkpoint gave this rank its own random states (Lightning's hooks leave no other way to say it).
        self._own_rng = False

    def configure_model(self) -> None:
        """Load the policy (and, for full fine-tuning with beta > 0, a frozen reference copy) once; under
        `ModelParallelStrategy` shard both with FSDP2 on its data-parallel mesh (`ttc_lightning.model.sharding`)."""
        if self.policy is not None:
            return
        mesh = self.device_mesh  # ModelParallelStrategy's, None under any other strategy
        hp = self.hparams
        # A GPU run: the trainer's accelerator, or without a trainer (scripts) whether this machine has one.
        cuda = isinstance(self.trainer.accelerator, CUDAAccelerator) if self._trainer else torch.cuda.is_available()
        policy = loading.load_policy(
            self.model_path,
            hp.model_name_or_path,
            self.tokenizer,
            dtype=hp.dtype,
            lora=self.lora,
            load_in_4bit=hp.load_in_4bit,
            gradient_checkpointing=hp.gradient_checkpointing,
            reference=hp.beta > 0,
            fuse=self.levers.fuse_lora,
            cuda=cuda,
            autocast=self._trainer is not None and "mixed" in str(self.trainer.precision),
        )
        self.policy, self.ref_model = policy.model, policy.reference
        # Of the base as loaded, before training changes it (and before sharding leaves each rank a part of it).
        self.fingerprint = checkpoints.base_fingerprint(self.policy)
        if mesh is not None:
            compute = sharding.compute_dtype(str(self.trainer.precision), cuda)
            for model in (self.policy, self.ref_model):
                if model is not None:
                    sharding.shard(model, mesh["data_parallel"], compute)
            # The strategy loads a checkpoint's weights itself, each by name: the frozen ones ttc does not save are
            # left as loaded (complete: `check_before_loading` below).
            self.strict_loading = False
            if self.trainer.ckpt_path:  # before Lightning loads it into the shards: ttc's checks, one line each
                checkpoints.check_before_loading(self.trainer.ckpt_path, self._checked_state())
        lora, quantized = self.lora is not None, hp.load_in_4bit
        self.sampler = Sampler(policy, self.levers, lora=lora, quantized=quantized, top_p=hp.top_p, top_k=hp.top_k)

    def setup(self, stage: str) -> None:
        hp = self.hparams
        check_trainer(self.trainer, stage, self.lora is not None, hp.load_in_4bit, hp.dynamic_sampling)
        # The data module has read its rows (Lightning sets it up first); the model is not loaded yet.
        data = self.trainer.datamodule
        rows = [row for split in ("train_rows", "val_rows", "test_rows") for row in getattr(data, split, None) or []]
        if rows:
            self.scorer.check_rows(rows)

    def on_fit_start(self) -> None:
        # Every rank starts from the same random state (Lightning's seed, for the same initial weights, or the
        # states of rank 0 in a checkpoint of another world size); sampling from it on every rank would tie the
        # completions of different ranks' prompts to each other. Each rank goes on from its own seed, drawn from that
        # state. A checkpoint with each rank's own states continues them instead (exact resume). Under FSDP2 the
        # checkpoint is restored after this hook, and its states replace the seeds drawn here.
        if self.trainer.world_size > 1 and not self._own_rng:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
        if cpu.enabled(self.levers.cpu, self.device):
            cpu.keep_freed_memory()
        passes = training_passes(self.policy, self.levers.prompt_once, self.hparams.gradient_checkpointing)
        rank_zero_info(f"ttc: {passes}")
        if self.hparams.tis_cap is not None and not self.sampler.backend.keeps_logps:
            logging.getLogger("ttc").warning(
                "model.tis_cap has no effect: sampling through generate(), which keeps no log-probs of its own"
            )

    def on_train_start(self) -> None:
        saving.sigterm_between_steps(self.trainer)  # Lightning has set its signal handlers by now
        saving.hangup_as_sigterm()

    def generate(self, prompts: list[Prompt], num_samples: int, temperature: float, max_new_tokens: int) -> Samples:
        """`num_samples` completions per prompt, rows grouped by prompt; temperature 0 is greedy."""
        return self.sampler.sample(prompts, num_samples, temperature, max_new_tokens)

    def rollout_logps(
        self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs `[n, C]` of the rollout's completions under `model` (and their entropies)."""
        hp = self.hparams
        options = dict(prompt_once=self.prompt_once, checkpointed=hp.gradient_checkpointing, with_entropy=with_entropy)
        return sharding.as_forward(model, completion_logps, model, rollout, temperature=hp.temperature, **options)

    def old_and_reference_logps(self, rollout: Rollout) -> tuple[Tensor | None, Tensor | None]:
        """Old-policy log-probs (num_iterations > 1) and reference log-probs (beta > 0), micro-batched, no grad."""
        old = self.policy if self.hparams.num_iterations > 1 else None
        reference = partial(loading.reference_model, self.policy, self.ref_model) if self.hparams.beta > 0 else None
        return frozen_logps(self.rollout_logps, rollout, self._micro_batches(len(rollout)), old, reference)

    def _micro_batches(self, n: int) -> list[Tensor]:
        # In order, so a group's rows share a micro-batch and its prompt pass; the step sums all their gradients.
        return list(torch.arange(n, device=self.device).split(self.hparams.micro_batch_size))

    def training_step(self, batch: dict[str, list], batch_idx: int) -> dict[str, list[dict[str, Any]]]:
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
        8. Log the step's metrics (of every completion sampled) and the rollout's records, which the step returns
           for callbacks (`on_train_batch_end`'s outputs: {"rollout": this rank's records}).
        """
        hp, g, started = self.hparams, self.hparams.num_generations, time.perf_counter()
        self._rng_at_step = checkpoints.rng_states()

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
        old_logps, ref_logps = self.old_and_reference_logps(rollout)
        rollout = dataclasses.replace(rollout, old_logps=old_logps, ref_logps=ref_logps)

        # 6-7. Optimisation passes.
        stats = self._optimise(rollout, weight)
        trained = time.perf_counter()

        # 8. Metrics, and the records for rollouts.jsonl and callbacks (e.g. a W&B completions table).
        kept = (groups, rollout) if weight else None
        return self._finish_step(sampled, kept, stats | sampling, (generated - started, trained - generated))

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
        means = TokenWeightedMeans()
        for iteration in range(hp.num_iterations):
            micro_batches = self._micro_batches(len(rollout))
            step_loss = torch.zeros((), device=self.device)  # non-finite when any micro-batch's loss is
            for k, index in enumerate(micro_batches):
                part = rollout.rows(index)
                with gradients_synced(self.trainer.model, last=k == len(micro_batches) - 1):
                    # 6. The loss.
                    logps, entropy = self.rollout_logps(self.policy, part, with_entropy=True)  # [n, C]
                    loss, stats = grpo_loss(
                        logps,
                        part.old_logps,
                        part.ref_logps,
                        part.advantages,
                        part.completion_mask,
                        sampler_logps=part.sampler_logps,
                        tis_cap=hp.tis_cap if part.sampler_logps is not None else None,
                        **self.loss_options,
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
                means.add(stats, tokens)
            # 7. One optimizer step per pass, with clipping and the non-finite guard.
            grad_norm = clip_and_step(optimizer, step_loss, hp.max_grad_norm, self.trainer, self.guard)
            scheduler.step()
            if 0 < self.trainer.max_steps <= self.trainer.global_step:
                break
        return means.result() | {"grad_norm": grad_norm}

    def _finish_step(
        self, sampled: Round, kept: tuple[Tensor, Rollout] | None, stats: dict, seconds: tuple[float, float]
    ) -> dict[str, list[dict[str, Any]]]:
        """Step 8: the metrics of every completion sampled, and their records (`kept`: the groups trained on), both
        labelled with the optimizer steps taken so far (a step that took none repeats the last one)."""
        hp, rollout, step = self.hparams, sampled.rollout, self.trainer.global_step
        metrics = step_metrics(sampled, hp.num_generations, self.sampler.eos_token_ids, self.score_names, step, seconds)
        lr = self.lr_schedulers().get_last_lr()[0]
        metrics |= {"skipped_steps": float(self.guard.skipped), "lr": lr, **stats, **self.scorer.take_stats()}
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        # Lightning all-reduces each value when it is logged (sync_dist), and NCCL reduces tensors on the GPU only.
        metrics = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in metrics.items()}
        batch_size = len(rollout) // hp.num_generations
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("reward", "kl"), batch_size=batch_size, sync_dist=True)
        records = step_records(step, sampled, kept, self.score_names, hp.num_generations, hp.dynamic_sampling)
        if hp.log_rollouts:
            write_rollouts(self._log_dir, self.global_rank, records)
        self._rng_at_step = None  # the step is done: a checkpoint from here on takes the current states
        return {"rollout": records}

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        total = total_optimizer_steps(
            self.trainer.max_steps, self.trainer.estimated_stepping_batches, hp.num_iterations
        )
        return adamw_with_schedule(params, hp.learning_rate, hp.weight_decay, hp.lr_scheduler, hp.warmup_steps, total)

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self.evaluator.add(batch)

    test_step = predict_step = validation_step

    def on_validation_epoch_start(self) -> None:
        self.evaluator.start()

    on_test_epoch_start = on_predict_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        scalars = self.evaluator.finish("test" if self.trainer.testing else "val", self.trainer, self._log_dir)
        if scalars and self.trainer.state.fn == "fit":  # at the optimizer step, as the training rows of metrics.csv
            scalars["step"] = float(self.trainer.global_step)
        # Every rank computed the same values from every rank's records: their mean over ranks is each one's own.
        self.log_dict(scalars, sync_dist=True)

    on_test_epoch_end = on_validation_epoch_end

    def on_predict_epoch_end(self) -> None:
        """predictions.jsonl: one line per input with its k completions, what was parsed, the final answer/patch."""
        self.evaluator.finish_predictions(self.trainer, self._log_dir)

    @cached_property
    def _log_dir(self) -> Path:
        # trainer.log_dir is a collective call under DDP: looked up once, by every rank.
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what training changed: the LoRA weights under LoRA, the policy otherwise, never the reference."""
        trainable, step = (
            {name for name, p in self.named_parameters() if p.requires_grad},
            checkpoint.get("global_step", 0),
        )
        precision = str(self.trainer.precision) if self._trainer is not None else None
        checkpoint["state_dict"] = checkpoints.trim_state(
            checkpoint["state_dict"], trainable, self.lora is not None, step, precision
        )
        checkpoint["ttc"] = checkpoints.ttc_section(self._identity(), self.guard.skipped, self._rng_at_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "state_dict" in checkpoint:
            self._own_rng = checkpoints.complete_state(checkpoint, *self._checked_state())
        else:  # under FSDP2 the strategy has loaded the weights already, checked in `configure_model`
            self._own_rng = checkpoints.restore_states(checkpoint)
        self.guard.skipped = checkpoint["ttc"].get("skipped_steps", 0)

    def _checked_state(self) -> tuple[dict[str, Any], set[str], dict[str, Any], bool]:
        """What a checkpoint is checked against: this model's weights, its trainable names, the run's identity."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        return self.state_dict(), trainable, self._identity(), self.hparams.allow_checkpoint_mismatch

    def _identity(self) -> dict[str, Any]:
        # No task outside a Trainer (a module built in a script).
        datamodule = self._trainer.datamodule if self._trainer is not None else None
        return checkpoints.run_identity(self.hparams.model_name_or_path, self.fingerprint, self.lora, datamodule)
