"""`GRPOModule`: the policy, its reference, rollout generation and the GRPO update, in one LightningModule."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import importlib
import json
import math
import numbers
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.lr_scheduler import LambdaLR

from ttc_lightning.errors import TTCError
from ttc_lightning.grpo import (
    LossType,
    ScaleRewards,
    accumulation_weight,
    group_advantages,
    grpo_loss,
    masked_mean,
    selective_log_softmax,
    token_entropy,
    warmup_cosine_lr,
)
from ttc_lightning.lora import fuse_lora
from ttc_lightning.sampling import (
    cache_keyword,
    can_pack,
    decode,
    decodes_alone,
    expand_cache,
    fast_decode_model,
    fast_decoding,
    merged_lora,
    packed_linears,
    prefill,
    select_rows,
)
from ttc_lightning.tiny import TINY, save_tiny

RewardFn = Callable[..., Sequence[float | None]]


@dataclass
class LoRA:
    """peft LoRA settings."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps the trained policy the one that sampled, and peft's dropout copies every
    adapted layer's input (a third slower forward on CPU in benchmarks/)."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear" for every linear layer but the output head."""


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
        )


def import_reward(path: str, where: str) -> RewardFn:
    """`package.module.function` -> the function; a clear error when it cannot be imported."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise TTCError(f"{where}: {path!r} is not an import path like 'package.module.function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise TTCError(f"{where}: cannot import {path!r} ({type(e).__name__}: {e})") from None
    if not callable(fn):
        raise TTCError(f"{where}: {path!r} is not callable")
    return fn


def score_completions(
    fns: Sequence[RewardFn], names: Sequence[str], completions: list[str], columns: dict[str, list], group_size: int
) -> Tensor:
    """Call each reward function on all completions -> `[N, F]` float32, NaN where a function returned None.

    Any failure stops training with the function's name and the prompt (index in the batch) it failed on.
    """
    n = len(completions)
    scores = torch.full((n, len(fns)), float("nan"))
    for j, (fn, name) in enumerate(zip(fns, names, strict=True)):
        try:
            values = fn(completions, **columns)
        except Exception as e:
            prompt = _first_failing_prompt(fn, completions, columns, group_size)
            where = f" on prompt {prompt} of the batch" if prompt is not None else ""
            raise TTCError(f"reward function {name} raised {type(e).__name__}: {e}{where}") from e
        if not isinstance(values, Sequence) or len(values) != n:
            got = len(values) if isinstance(values, Sequence) else type(values).__name__
            raise TTCError(
                f"reward function {name} returned {got} values for {n} completions "
                f"({n // group_size} prompts x {group_size}); it must return one float or None per completion"
            )
        for i, value in enumerate(values):
            if value is None:
                continue
            if not isinstance(value, numbers.Real) or math.isnan(value):
                raise TTCError(
                    f"reward function {name} returned {value!r} for completion {i % group_size} of prompt "
                    f"{i // group_size} of the batch; expected a float or None"
                )
            scores[i, j] = float(value)
    return scores


def _first_failing_prompt(fn: RewardFn, completions: list[str], columns: dict[str, list], g: int) -> int | None:
    """Re-run `fn` one prompt's group at a time to name the prompt that makes it raise."""
    for p in range(len(completions) // g):
        rows = slice(p * g, (p + 1) * g)
        try:
            fn(completions[rows], **{k: v[rows] for k, v in columns.items()})
        except Exception:
            return p
    return None


def nan_mean_std(values: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std over the non-NaN entries (NaN when there are none, std 0 for a single one)."""
    kept = values[~torch.isnan(values)]
    if kept.numel() == 0:
        return torch.tensor(float("nan")), torch.tensor(float("nan"))
    return kept.mean(), kept.std() if kept.numel() > 1 else torch.tensor(0.0)


# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of handing it back to the OS.

    A training step on CPU frees and reallocates activations of many megabytes; by default glibc unmaps or trims
    them, and every reuse then faults its pages in again, zeroed by the kernel (on the 25M-parameter benchmark:
    ~25K page faults and 7% of each forward/backward; peak memory unchanged). Returns whether glibc took it
    (False on other C libraries and other systems, where nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; bigger blocks are still mapped on their own.
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


class GRPOModule(L.LightningModule):
    """GRPO on a causal LM: sample G completions per prompt, score them, push the policy towards the better ones.

    One `training_step` is one rollout followed by `num_iterations` optimizer steps on it, so `trainer.max_steps`
    counts optimizer steps.
    """

    model_name_or_path: str
    """A Hugging Face Hub id, a local model directory, or "tiny" (a small random model built locally, no network)."""
    lora: LoRA | None
    """LoRA settings (peft), or null for full fine-tuning."""
    load_in_4bit: bool
    """Quantise the base model to 4-bit NF4 with bitsandbytes (QLoRA); needs `lora`."""
    gradient_checkpointing: bool
    """Recompute activations in the backward pass: less memory, about a third more compute, and each completion
    runs its whole prompt in the training forward (HF models keep no KV cache while checkpointing, so a group
    cannot share one prompt pass there)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"]
    """Weights' dtype. "auto": float32 on CPU; bfloat16 on GPUs that support it; else float16 under LoRA."""
    num_generations: int
    """G: completions sampled per prompt; advantages are relative within these groups."""
    max_new_tokens: int
    """Longest completion; longer ones are cut and count in `completions/clipped_ratio`."""
    temperature: float
    """Sampling temperature, also applied to the logits when computing log-probs (as TRL does)."""
    top_p: float
    """Nucleus sampling: keep the smallest token set with this much probability (1.0 = off)."""
    top_k: int
    """Sample among the k most likely tokens only (0 = off)."""
    beta: float
    """Weight of the KL penalty to the reference policy; 0 loads and runs no reference model."""
    epsilon: float
    """Clip range below 1 for the probability ratio (and above 1 unless `epsilon_high` is set)."""
    epsilon_high: float | None
    """Clip range above 1 (DAPO's clip-higher, e.g. 0.28); null means `epsilon`."""
    loss_type: LossType
    """Aggregation: "grpo" per-sequence mean, "bnpo" per-micro-batch token mean, "dapo" token mean over the
    whole rollout, "dr_grpo" token sum / (N * max_new_tokens)."""
    scale_rewards: ScaleRewards
    """Divide advantages by the group's std ("group"), the batch's std ("batch") or not at all ("none", Dr. GRPO)."""
    num_iterations: int
    """mu: optimizer steps on each rollout; above 1 the old policy's log-probs are computed once per rollout."""
    micro_batch_size: int
    """Completions per forward/backward pass; gradients are accumulated over a rollout's micro-batches."""
    learning_rate: float
    """Peak AdamW learning rate."""
    weight_decay: float
    """AdamW weight decay."""
    warmup_steps: int
    """Linear warmup (optimizer steps), then cosine decay to 0 at `trainer.max_steps`."""
    max_grad_norm: float | None
    """Clip the gradient's global norm to this (null = no clipping; the norm is logged either way)."""
    rewards: list[str]
    """Reward functions by import path, each `fn(completions, **columns) -> list[float | None]`."""
    reward_weights: list[float] | None
    """One weight per reward function (null = all 1.0); the reward is the weighted sum, None scores skipped."""
    eval_num_samples: int
    """k: completions per prompt at validation/test/predict time."""
    eval_temperature: float
    """Sampling temperature for evaluation; 0 means greedy (then k must be 1)."""
    log_rollouts: bool
    """Append every completion with its rewards to rollouts.jsonl in the run's log directory."""

    def __init__(
        self,
        rewards: list[str],
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
        num_iterations: int = 1,
        micro_batch_size: int = 8,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        max_grad_norm: float | None = 1.0,
        reward_weights: list[float] | None = None,
        eval_num_samples: int = 1,
        eval_temperature: float = 0.0,
        log_rollouts: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_settings(self.hparams)
        self.reward_fns = [import_reward(path, f"model.rewards[{i}]") for i, path in enumerate(rewards)]
        self.reward_names = [
            getattr(fn, "__name__", path.rpartition(".")[2]) for fn, path in zip(self.reward_fns, rewards, strict=True)
        ]
        self.reward_weights = torch.tensor(reward_weights or [1.0] * len(rewards))
        self.model_path = _materialise(model_name_or_path)
        self.tokenizer = _load_tokenizer(self.model_path, model_name_or_path)
        self.policy: torch.nn.Module | None = None
        self.ref_model: torch.nn.Module | None = None
        self.automatic_optimization = False
        # Under LoRA the checkpoint holds only the adapters; the frozen base comes from `model_name_or_path`.
        self.strict_loading = lora is None
        self._grad_norm = torch.tensor(float("nan"))
        self._rollout_file: Path | None = None
        self.last_rollout: list[dict] = []
        self._eval_records: list[dict[str, Any]] = []

    # --- model -------------------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        """Load the policy (and, for full fine-tuning with beta > 0, a frozen reference copy) once."""
        if self.policy is not None:
            return
        hp = self.hparams
        self.policy = self._load_causal_lm(quantize=hp.load_in_4bit)
        if hp.load_in_4bit:
            from peft import prepare_model_for_kbit_training

            self.policy = prepare_model_for_kbit_training(
                self.policy, use_gradient_checkpointing=hp.gradient_checkpointing
            )
        if hp.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hp.lora is not None:
            from peft import LoraConfig, get_peft_model

            lora = hp.lora if isinstance(hp.lora, LoRA) else LoRA(**hp.lora)
            config = LoraConfig(
                r=lora.r,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora.target_modules,
                task_type="CAUSAL_LM",
            )
            self.policy = get_peft_model(self.policy, config)
            fuse_lora(self.policy)
        elif hp.beta > 0:
            self.ref_model = self._load_causal_lm(quantize=False).eval().requires_grad_(False)
        self.policy.train()

    def setup(self, stage: str) -> None:
        strategy = self.trainer.strategy
        sharded = "FSDP" in type(strategy).__name__ or getattr(strategy, "zero_stage_3", False)
        if sharded:
            raise TTCError(
                f"trainer.strategy: {type(strategy).__name__} shards the weights, and generate() would gather them for "
                "every new token (very slow, or a hang). Use `ddp` (a LoRA policy fits on each GPU) or "
                "`deepspeed_stage_2`."
            )

    def on_fit_start(self) -> None:
        # Every rank starts from the same random state (Lightning's seed, for the same initial weights, or the
        # checkpoint's, which rank 0 wrote); sampling from it on every rank would tie the completions of different
        # ranks' prompts to each other. Each rank goes on from its own seed, drawn from that state.
        if self.trainer.world_size > 1:
            torch.manual_seed(int(torch.randint(2**62, ())) + self.global_rank)
        if self.device.type == "cpu":
            keep_freed_memory()

    def _load_causal_lm(self, quantize: bool) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        dtype = self._weights_dtype()
        kwargs: dict[str, Any] = {"dtype": dtype}
        if quantize:
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=dtype,
            )
        try:
            with _quiet_transformers():
                model = AutoModelForCausalLM.from_pretrained(self.model_path, **kwargs)
        except (OSError, ValueError) as e:
            raise TTCError(f"model.model_name_or_path: cannot load {self.hparams.model_name_or_path!r}: {e}") from None
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        if quantize:
            # bitsandbytes repacks 4-bit weights for CPU inference the first time a layer runs in eval mode
            # (generation), and that layout then fails in the training backward pass: keep the trainable layout.
            for layer in model.modules():
                if hasattr(layer, "support_avx512bf16_for_cpu"):
                    layer.support_avx512bf16_for_cpu = False
        return model

    def _weights_dtype(self) -> torch.dtype:
        name = self.hparams.dtype
        if name != "auto":
            return getattr(torch, name)
        if not torch.cuda.is_available():
            return torch.float32
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        # fp16 master weights cannot be trained stably: only a frozen LoRA base may be stored in half precision.
        return torch.float16 if self.hparams.lora is not None else torch.float32

    @property
    def eos_token_ids(self) -> list[int]:
        """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS (e.g. Qwen's two)."""
        ids = {self.tokenizer.eos_token_id}
        config_eos = self.policy.generation_config.eos_token_id if self.policy is not None else None
        ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
        return sorted(i for i in ids if i is not None)

    # --- rollout -----------------------------------------------------------------------------------------------

    def tokenize_prompts(self, prompts: Sequence[str | list[dict[str, str]]]) -> tuple[Tensor, Tensor]:
        """Chat messages go through the chat template with the generation prompt; strings are used as they are."""
        texts = [
            p
            if isinstance(p, str)
            else self.tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    def generate(
        self, prompts: Sequence[str | list[dict[str, str]]], num_samples: int, temperature: float, max_new_tokens: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, list[str]]:
        """`num_samples` completions per prompt, rows grouped by prompt -> ids, masks and decoded texts.

        temperature 0 means greedy decoding. Generation stops when every row has produced an EOS token.
        """
        from transformers import GenerationConfig

        prompt_ids, prompt_mask = self.tokenize_prompts(prompts)  # [B, P]
        hp = self.hparams
        sampling = dict(temperature=temperature, top_p=hp.top_p, top_k=hp.top_k) if temperature > 0 else {}
        config = GenerationConfig(
            do_sample=temperature > 0,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            use_cache=True,
            # Left unset, generate() would take it from the model's generation_config (Qwen2.5-Instruct ships 1.05),
            # and the samples would come from another distribution than the one whose log-probs are trained.
            repetition_penalty=1.0,
            **sampling,
        )
        # Merging is exact enough only in float32 (see `merged_lora`); a 4-bit base cannot take the adapters.
        merge = hp.lora is not None and not hp.load_in_4bit and self.policy.dtype == torch.float32
        # Eval mode: no dropout while sampling, and HF keeps the KV cache on even with gradient checkpointing.
        was_training = self.policy.training
        self.policy.eval()
        fast = fast_decode_model(self.policy) is not None
        try:
            with (
                merged_lora(self.policy, merge),
                packed_linears(self.policy, can_pack(self.policy), len(prompts) * num_samples),
                fast_decoding(self.policy, fast),
            ):
                # Each prompt is encoded once, not once per sample: its keys/values go to its rows (shared by them
                # under fast decoding, else copied), and generate() starts from the last prompt token.
                cache = None
                # generate() refuses a cache of ours when the model's generation config asks for its own kind.
                own_cache = self.policy.generation_config.cache_implementation not in (None, "dynamic")
                if prompt_ids.size(1) > 1 and not own_cache:
                    capacity = prompt_ids.size(1) + max_new_tokens
                    cache = prefill(self.policy, prompt_ids[:, :-1], prompt_mask[:, :-1], capacity)
                    if cache is not None and num_samples > 1:
                        expand_cache(cache, prompt_mask[:, :-1], num_samples, max_new_tokens + 1, share=fast)
                prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
                prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
                if cache is not None and decodes_alone(self.policy):
                    sequences = decode(self.policy, prompt_ids, prompt_mask, cache, config)
                else:
                    cached = {} if cache is None else {cache_keyword(self.policy): cache}
                    sequences = self.policy.generate(
                        input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=config, **cached
                    )
        finally:
            self.policy.train(was_training)
        completion_ids = sequences[:, prompt_ids.size(1) :]  # [N, C]
        is_eos = torch.isin(completion_ids, torch.tensor(self.eos_token_ids, device=completion_ids.device))  # [N, C]
        has_eos = is_eos.any(1)  # [N]
        first_eos = torch.where(has_eos, is_eos.int().argmax(1), completion_ids.size(1))  # [N]
        positions = torch.arange(completion_ids.size(1), device=completion_ids.device)  # [C]
        completion_mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()  # [N, C]
        lengths = completion_mask.sum(1).tolist()
        rows = completion_ids.tolist()
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(rows, lengths, strict=True)]
        return prompt_ids, prompt_mask, completion_ids, completion_mask, texts

    def completion_logps(
        self, model: torch.nn.Module, rollout: Rollout, with_entropy: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """Per-token log-probs `[n, C]` of the completion tokens (and their entropies), logits only where needed.

        Rows with the same prompt (a group's completions) share one pass over it: the prompt's keys and values are
        computed once, with gradients, and each row's completion attends to them. Exact, and it skips (G-1)/G of
        the prompt positions; not with gradients under gradient checkpointing, where HF models keep no KV cache.
        """
        input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [n, P+C]
        attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [n, P+C]
        # Positions as in generate(): left padding must not shift them (matters for absolute position embeddings).
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [n, P+C]
        p, c = rollout.prompt_ids.size(1), rollout.completion_ids.size(1)
        keys = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # [n, 2P]
        unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # [u, 2P], [n]
        cache = None
        checkpointed = self.hparams.gradient_checkpointing and torch.is_grad_enabled()
        if p > 1 and unique.size(0) < len(rollout) and not checkpointed:
            cache = prefill(model, unique[:, : p - 1], unique[:, p : 2 * p - 1])
        if cache is None:
            start, cached = 0, {}
        else:
            select_rows(cache, inverse)
            start, cached = p - 1, {cache_keyword(model): cache}
        logits = model(
            input_ids=input_ids[:, start:],
            attention_mask=attention_mask,
            position_ids=position_ids[:, start:],
            logits_to_keep=c + 1,
            use_cache=cache is not None,
            **cached,
        ).logits  # [n, C+1, V]
        logits = logits[:, :-1] / self.hparams.temperature  # [n, C, V]: position t predicts completion token t
        logps = selective_log_softmax(logits, rollout.completion_ids)  # [n, C]
        return logps, token_entropy(logits) if with_entropy else None

    @torch.no_grad()
    def frozen_logps(self, rollout: Rollout) -> tuple[Tensor | None, Tensor | None]:
        """Old-policy log-probs (num_iterations > 1) and reference log-probs (beta > 0), micro-batched, no grad."""
        hp = self.hparams
        old, ref = [], []
        for index in self._micro_batches(len(rollout)):
            part = rollout.rows(index)
            pad = rollout.completion_ids.size(1) - part.completion_ids.size(1)
            if hp.num_iterations > 1:
                old.append(torch.nn.functional.pad(self.completion_logps(self.policy, part)[0], (0, pad)))
            if hp.beta > 0:
                if self.ref_model is not None:
                    logps = self.completion_logps(self.ref_model, part)[0]
                else:
                    with self.policy.disable_adapter():
                        logps = self.completion_logps(self.policy, part)[0]
                ref.append(torch.nn.functional.pad(logps, (0, pad)))
        return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)

    def _micro_batches(self, n: int) -> list[Tensor]:
        # In order, so a group's rows share micro-batches and their prompt pass (`completion_logps`); the order
        # does not change the step, which sums the gradients of all micro-batches.
        return list(torch.arange(n, device=self.device).split(self.hparams.micro_batch_size))

    # --- training ----------------------------------------------------------------------------------------------

    def training_step(self, batch: dict[str, list], batch_idx: int) -> None:
        """One rollout and `num_iterations` optimizer steps on it.

        1. Take the batch: B prompts and their metadata columns.
        2. Generate G completions per prompt (no grad, sampling, KV cache, stop at EOS).
        3. Score each completion with every reward function; combine them with `reward_weights`.
        4. Group-relative advantages.
        5. Per-token log-probs of the old policy (num_iterations > 1) and the reference (beta > 0), no grad.
        6. The loss of each micro-batch: policy log-probs, clipped surrogate + KL, scaled for accumulation.
        7. num_iterations passes over the rollout: accumulate the micro-batches' gradients, clip, step the
           optimizer and the LR schedule.
        """
        hp = self.hparams
        g = hp.num_generations
        step = self.trainer.global_step
        started = time.perf_counter()

        # 1. Prompts and metadata; each metadata value repeated for its prompt's G completions.
        prompts = batch["prompt"]
        columns = {k: [v for v in values for _ in range(g)] for k, values in batch.items() if k != "prompt"}

        # 2. Generate.
        prompt_ids, prompt_mask, completion_ids, completion_mask, texts = self.generate(
            prompts, g, hp.temperature, hp.max_new_tokens
        )
        generated = time.perf_counter()

        # 3. Score.
        scores = score_completions(self.reward_fns, self.reward_names, texts, columns, g)  # [N, F]
        reward = torch.nansum(scores * self.reward_weights, dim=1)  # [N]

        # 4. Advantages.
        advantages = group_advantages(reward, g, hp.scale_rewards)  # [N]
        rollout = Rollout(
            prompt_ids,
            prompt_mask,
            completion_ids,
            completion_mask,
            texts,
            scores.to(self.device),
            reward.to(self.device),
            advantages.to(self.device),
        )

        # 5. Frozen log-probs.
        old_logps, ref_logps = self.frozen_logps(rollout)
        rollout = dataclasses.replace(rollout, old_logps=old_logps, ref_logps=ref_logps)

        # 6-7. Optimisation passes.
        stats = self._optimise(rollout)
        trained = time.perf_counter()

        self._log_step(rollout, stats, generate_s=generated - started, train_s=trained - generated)
        # Kept for callbacks (e.g. a W&B completions table) as well as the rollout log.
        self.last_rollout = self.rollout_records(step, prompts, columns, rollout)
        if hp.log_rollouts:
            self._write_rollouts(self.last_rollout)

    def _optimise(self, rollout: Rollout) -> dict[str, Tensor]:
        """Steps 6 and 7 of `training_step`; returns token-weighted means of the loss stats over all passes."""
        hp = self.hparams
        optimizer = self.optimizers()
        scheduler = self.lr_schedulers()
        total_rows = len(rollout)
        total_tokens = self._global_mean_tokens(rollout.completion_mask)
        sums: dict[str, Tensor] = {}
        weights = 0.0
        for _ in range(hp.num_iterations):
            micro_batches = self._micro_batches(total_rows)
            for k, index in enumerate(micro_batches):
                part = rollout.rows(index)
                # Under DDP, all-reduce the gradients once per optimizer step, not after every micro-batch.
                last = k == len(micro_batches) - 1
                no_sync = self.trainer.model.no_sync if isinstance(self.trainer.model, DDP) and not last else None
                with no_sync() if no_sync is not None else contextlib.nullcontext():
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
                    )
                    tokens = int(part.completion_mask.sum())
                    scale = accumulation_weight(
                        hp.loss_type, len(part), total_rows, tokens, total_tokens, len(micro_batches)
                    )
                    self.manual_backward(loss * scale)
                stats = {**stats, "loss": loss.detach(), "entropy": masked_mean(entropy, part.completion_mask)}
                for key, value in stats.items():
                    sums[key] = sums.get(key, 0.0) + value.detach() * tokens
                weights += tokens
            # 7. One optimizer step per pass; clipping happens in `on_before_optimizer_step`.
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if 0 < self.trainer.max_steps <= self.trainer.global_step:
                break
        return {key: value / max(weights, 1.0) for key, value in sums.items()}

    def _global_mean_tokens(self, mask: Tensor) -> float:
        """Completion tokens per rank, averaged over ranks: DDP averages gradients, so dapo divides by this."""
        tokens = mask.sum().float()
        if self.trainer.world_size > 1:
            tokens = self.all_gather(tokens).float().mean()
        return float(tokens)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs after the precision plugin has unscaled fp16 gradients, so the norm is the true one.
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        max_norm = self.hparams.max_grad_norm or float("inf")
        self._grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm).detach()

    def _log_step(self, rollout: Rollout, stats: dict[str, Tensor], generate_s: float, train_s: float) -> None:
        g = self.hparams.num_generations
        grouped = rollout.reward.view(-1, g)  # [B, G]
        group_std = grouped.std(dim=1)  # [B]
        lengths = rollout.completion_mask.sum(1).float()  # [N]
        clipped = ~torch.isin(
            rollout.completion_ids.gather(1, (lengths.long() - 1).clamp(min=0).unsqueeze(1)).squeeze(1),
            torch.tensor(self.eos_token_ids, device=self.device),
        )
        metrics: dict[str, Tensor | float] = {
            "reward": rollout.reward.mean(),
            "reward_std": group_std.mean(),
            "frac_reward_zero_std": torch.isclose(group_std, torch.zeros_like(group_std)).float().mean(),
            "completions/mean_length": lengths.mean(),
            "completions/clipped_ratio": clipped.float().mean(),
            "grad_norm": self._grad_norm,
            "lr": self.lr_schedulers().get_last_lr()[0],
            "tokens_per_second": lengths.sum() / (generate_s + train_s),
            "time/generate": generate_s,
            "time/train": train_s,
            **stats,
        }
        for j, name in enumerate(self.reward_names):
            mean, std = nan_mean_std(rollout.rewards[:, j])
            metrics[f"rewards/{name}/mean"] = mean
            metrics[f"rewards/{name}/std"] = std
        batch_size = len(rollout) // g
        self.log_dict(
            {k: v for k, v in metrics.items() if k not in ("reward", "kl")}, batch_size=batch_size, sync_dist=True
        )
        self.log("reward", metrics["reward"], prog_bar=True, batch_size=batch_size, sync_dist=True)
        if "kl" in metrics:
            self.log("kl", metrics["kl"], prog_bar=True, batch_size=batch_size, sync_dist=True)

    def rollout_records(self, step: int, prompts: list, columns: dict[str, list], rollout: Rollout) -> list[dict]:
        """One JSON-ready row per completion: step, prompt, completion, per-function rewards, reward, advantage."""
        g = self.hparams.num_generations
        records = []
        for i, completion in enumerate(rollout.completions):
            record = {
                "step": step,
                "prompt_index": i // g,
                "prompt": prompts[i // g],
                "completion": completion,
                "rewards": {
                    name: None if math.isnan(v) else v
                    for name, v in zip(self.reward_names, rollout.rewards[i].tolist(), strict=True)
                },
                "reward": float(rollout.reward[i]),
                "advantage": float(rollout.advantages[i]),
            }
            if "id" in columns:
                record["id"] = columns["id"][i]
            records.append(record)
        return records

    def _write_rollouts(self, records: list[dict]) -> None:
        """Rank 0 appends to rollouts.jsonl in the log directory, rank k to rollouts.rank<k>.jsonl: no interleaving."""
        if self._rollout_file is None:
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            rank = self.global_rank
            self._rollout_file = log_dir / ("rollouts.jsonl" if rank == 0 else f"rollouts.rank{rank}.jsonl")
            self._rollout_file.parent.mkdir(parents=True, exist_ok=True)
        with self._rollout_file.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(record, default=str) + "\n" for record in records)

    # --- evaluation ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate_batch(self, batch: dict[str, list]) -> list[dict[str, Any]]:
        """`eval_num_samples` completions per prompt at `eval_temperature`, scored: one record per prompt."""
        hp = self.hparams
        k = hp.eval_num_samples
        prompts = batch["prompt"]
        columns = {key: values for key, values in batch.items() if key != "prompt"}
        repeated = {key: [v for v in values for _ in range(k)] for key, values in columns.items()}
        _, _, _, completion_mask, texts = self.generate(prompts, k, hp.eval_temperature, hp.max_new_tokens)
        scores = score_completions(self.reward_fns, self.reward_names, texts, repeated, k)  # [B*k, F]
        reward = torch.nansum(scores * self.reward_weights, dim=1)  # [B*k]
        lengths = completion_mask.sum(1).tolist()
        records = []
        for p, prompt in enumerate(prompts):
            rows = slice(p * k, (p + 1) * k)
            records.append(
                {
                    "prompt": prompt,
                    "columns": {key: values[p] for key, values in columns.items()},
                    "completions": texts[rows],
                    "lengths": lengths[rows],
                    "rewards": {
                        name: [None if math.isnan(v) else v for v in scores[rows, j].tolist()]
                        for j, name in enumerate(self.reward_names)
                    },
                    "reward": reward[rows].tolist(),
                }
            )
        return records

    def validation_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._eval_records.extend(self.evaluate_batch(batch))

    def test_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._eval_records.extend(self.evaluate_batch(batch))

    def predict_step(self, batch: dict[str, list], batch_idx: int) -> None:
        self._eval_records.extend(self.evaluate_batch(batch))

    def on_validation_epoch_start(self) -> None:
        self._eval_records = []

    on_test_epoch_start = on_validation_epoch_start
    on_predict_epoch_start = on_validation_epoch_start

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation("test")

    def evaluation_metrics(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        """Reward means over all samples, plus the data module's task metrics (its `evaluate(records)`)."""
        rewards = [r for record in records for r in record["reward"]]
        metrics: dict[str, Any] = {"reward": sum(rewards) / len(rewards)}
        for name in self.reward_names:
            values = [v for record in records for v in record["rewards"][name] if v is not None]
            if values:
                metrics[f"rewards/{name}/mean"] = sum(values) / len(values)
        lengths = [n for record in records for n in record["lengths"]]
        metrics["mean_length"] = sum(lengths) / len(lengths)
        evaluate = getattr(self.trainer.datamodule, "evaluate", None)
        if evaluate is not None:
            metrics.update(evaluate(records))
        return metrics

    def _gather_records(self) -> list[dict[str, Any]]:
        """Every rank's evaluation records (the metrics are not averages, so they need all the predictions)."""
        if self.trainer.world_size == 1:
            return self._eval_records
        gathered: list[list[dict[str, Any]]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(gathered, self._eval_records)
        return [record for part in gathered for record in part]

    def _finish_evaluation(self, stage: str) -> None:
        records = self._gather_records()
        if self.trainer.sanity_checking or not records:
            return
        metrics = self.evaluation_metrics(records)
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, numbers.Real)}
        self.log_dict(scalars, batch_size=len(records))
        if self.trainer.state.fn != "fit" and self.global_rank == 0:
            log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
            log_dir.mkdir(parents=True, exist_ok=True)
            summary = {
                "stage": stage,
                "ckpt_path": self.trainer.ckpt_path,
                "num_prompts": len(records),
                "eval_num_samples": self.hparams.eval_num_samples,
                "eval_temperature": self.hparams.eval_temperature,
                "metrics": metrics,
            }
            (log_dir / "metrics.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
            if "per_class" in metrics:
                _print_per_class(metrics["per_class"])
            rank_zero_info(f"ttc: wrote {log_dir / 'metrics.json'}")

    def on_predict_epoch_end(self) -> None:
        """predictions.jsonl: one line per input with its k completions, what was parsed, the final answer/patch."""
        records = self._gather_records()
        if self.global_rank != 0:
            return
        final_prediction = getattr(self.trainer.datamodule, "final_prediction", None) or _best_completion
        log_dir = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        path = log_dir / "predictions.jsonl"
        with path.open("w", encoding="utf-8") as f:
            for i, record in enumerate(records):
                line = {
                    "id": record["columns"].get("id", i),
                    "completions": record["completions"],
                    "rewards": record["rewards"],
                    **final_prediction(record),
                }
                f.write(json.dumps(line, default=str) + "\n")
        rank_zero_info(f"ttc: wrote {len(records)} predictions to {path}")

    # --- optimizer ---------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.learning_rate, weight_decay=hp.weight_decay)
        schedule = partial(warmup_cosine_lr, warmup_steps=hp.warmup_steps, total_steps=self._total_optimizer_steps())
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

    # --- checkpoints -------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep what training changed: the LoRA weights under LoRA, the policy otherwise, never the reference."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        state = checkpoint["state_dict"]
        if self.hparams.lora is not None:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if k in trainable}
        else:
            checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("ref_model.")}
        checkpoint["ttc"] = {
            "model_name_or_path": self.hparams.model_name_or_path,
            "lora": self.hparams.lora is not None,
            # Lightning does not save RNG states; sampling after a resume must continue the same random stream.
            "rng": rng_states(),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "ttc" not in checkpoint:
            raise TTCError("--ckpt_path: this checkpoint was not written by ttc (it has no 'ttc' section)")
        if checkpoint["ttc"]["lora"] != (self.hparams.lora is not None):
            raise TTCError(
                "--ckpt_path: the checkpoint was trained "
                + ("with" if checkpoint["ttc"]["lora"] else "without")
                + " LoRA but model.lora is "
                + ("set" if self.hparams.lora is not None else "null")
                + "; use the same model settings as the run that wrote it"
            )
        if "rng" in checkpoint["ttc"]:
            set_rng_states(checkpoint["ttc"]["rng"])
        if self.hparams.lora is None:
            # The frozen reference is never saved: it is the base model, loaded again in configure_model.
            reference = {k: v for k, v in self.state_dict().items() if k.startswith("ref_model.")}
            checkpoint["state_dict"] = {**reference, **checkpoint["state_dict"]}
        else:
            expected = {name for name, p in self.named_parameters() if p.requires_grad}
            unknown = sorted(set(checkpoint["state_dict"]) - expected)
            if unknown:
                raise TTCError(
                    f"--ckpt_path: {len(unknown)} checkpoint weights do not match this model's LoRA layers "
                    f"(first: {unknown[0]}); check model.lora and model.model_name_or_path"
                )
            # Frozen base weights are not in the checkpoint: put the current ones back so loading is complete.
            state = self.state_dict()
            checkpoint["state_dict"] = {
                **{k: v for k, v in state.items() if k not in expected},
                **checkpoint["state_dict"],
            }


def rng_states() -> dict[str, Any]:
    """The states of every random generator sampling and shuffling use."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain lists and tensors only, so the checkpoint also loads with torch.load(weights_only=True).
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def _best_completion(record: dict[str, Any]) -> dict[str, Any]:
    """Final answer for a task without its own rule: the completion the reward functions scored highest."""
    best = max(range(len(record["completions"])), key=lambda i: record["reward"][i])
    return {"final": record["completions"][best], "score": record["reward"][best]}


def _print_per_class(per_class: dict[str, dict[str, float]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="per class")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in per_class.items():
        table.add_row(name, *(f"{row[c]:.3f}" for c in ("precision", "recall", "f1")), str(int(row["support"])))
    Console(stderr=True).print(table)


def _check_settings(hp: Any) -> None:
    """Invariants the config must satisfy, each with how to fix it."""
    problems = []
    if not hp.rewards:
        problems.append("model.rewards is empty: name at least one reward function by import path")
    if hp.reward_weights is not None and len(hp.reward_weights) != len(hp.rewards):
        problems.append(
            f"model.reward_weights has {len(hp.reward_weights)} entries for {len(hp.rewards)} reward functions: "
            "give one weight per function or null"
        )
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
    for name in ("num_iterations", "micro_batch_size", "max_new_tokens", "eval_num_samples"):
        if getattr(hp, name) < 1:
            problems.append(f"model.{name} must be >= 1")
    if hp.eval_temperature < 0:
        problems.append("model.eval_temperature must be >= 0 (0 = greedy)")
    if hp.eval_temperature == 0 and hp.eval_num_samples > 1:
        problems.append("model.eval_num_samples > 1 needs model.eval_temperature > 0: greedy samples are identical")
    if hp.learning_rate <= 0:
        problems.append("model.learning_rate must be > 0")
    if problems:
        raise TTCError("; ".join(problems))


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars: they would interleave with the training progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _materialise(model_name_or_path: str) -> str:
    """ "tiny" -> a temporary directory holding it, so it loads through the same path as any local model."""
    if model_name_or_path != TINY:
        return model_name_or_path
    directory = tempfile.mkdtemp(prefix="ttc-tiny-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    with _quiet_transformers():
        return str(save_tiny(directory))


def _load_tokenizer(path: str, name: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TTCError(f"model.model_name_or_path: cannot load the tokenizer of {name!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
