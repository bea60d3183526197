"""Sampling completions from the policy through one backend, chosen whole for the run: ttc's own (`fast.py`) for the
models and transformers releases it knows, else `generate()` (`hf.py`). Which one runs, with which levers, is
logged when it first samples (`Sampler.describe`); nothing inside a call switches to the other."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from transformers import GenerationConfig

from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import Policy, Prompt, encode_prompts
from ttc_lightning.model.sharding import is_sharded
from ttc_lightning.sampling.decoding import Decoded
from ttc_lightning.sampling.fast import FastBackend, refusal
from ttc_lightning.sampling.hf import GenerateBackend

# Why a sharded policy samples through generate(): correct first. Each rank samples its own prompts, each layer's
# weights gathered from the other ranks as it runs, once per new token; a rank whose rows are done keeps running
# forward passes until every rank's are (the gathers are collective). The levers of ttc's backend are off with it;
# the training levers (one prompt pass per group, fused LoRA) stay on.
SHARDED = "the policy is sharded (FSDP2): each layer's weights are gathered as it runs, every rank in step"


class Backend(Protocol):
    name: str
    keeps_logps: bool  # whether `sample` returns the sampler's log-probs

    def describe(self) -> str: ...

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, config: GenerationConfig) -> Decoded:
        """Completions `[N, C]` (right-padded after EOS) of B left-padded prompts `[B, P]`, `num_samples` rows each,
        rows grouped by prompt; and each token's log-prob `[N, C]` at the sampling temperature, or None."""
        ...


@dataclass(frozen=True)
class Samples:
    """`num_samples` completions for each of B prompts: N = B * num_samples rows, each prompt's rows contiguous."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, C] right-padded
    completion_mask: Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]  # N decoded completions
    logps: Tensor | None  # [N, C] the sampler's log-prob of each token at the sampling temperature (ttc's backend)


class Sampler:
    """Completions from a policy model: tokenisation, the backend, the EOS masks."""

    def __init__(
        self, policy: Policy, levers: Levers, *, lora: bool, quantized: bool, top_p: float, top_k: int
    ) -> None:
        self.model, self.tokenizer, self.eos_token_ids = policy.model, policy.tokenizer, policy.eos_token_ids
        self.top_p, self.top_k = top_p, top_k
        # The sampling settings but the temperature and length are the run's: one config decides for every call.
        sharded = is_sharded(self.model)
        self.refusal = SHARDED if sharded else refusal(self.model, levers, self.generation_config(1.0, 1))
        self.backend: Backend = (
            GenerateBackend(self.model, synced=sharded)
            if self.refusal
            else FastBackend(self.model, levers, lora=lora, quantized=quantized)
        )
        self.announced = False  # the run's first call logs the backend that samples (on the run's device by then)

    def describe(self) -> str:
        """The line a run logs: the backend that samples, its levers, and why ttc's backend does not run if not."""
        why = f" (ttc's backend off: {self.refusal})" if self.refusal else ""
        return f"sampling with {self.backend.describe()}{why}"

    def generation_config(self, temperature: float, max_new_tokens: int) -> GenerationConfig:
        """ttc's sampling settings; temperature 0 is greedy."""
        sampling = dict(temperature=temperature, top_p=self.top_p, top_k=self.top_k) if temperature > 0 else {}
        return GenerationConfig(
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

    @torch.no_grad()
    def sample(self, prompts: Sequence[Prompt], num_samples: int, temperature: float, max_new_tokens: int) -> Samples:
        """`num_samples` completions per prompt, rows grouped by prompt. Stops when every row has an EOS token."""
        if not self.announced:
            rank_zero_info(f"ttc: {self.describe()}")
            self.announced = True
        config = self.generation_config(temperature, max_new_tokens)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, next(self.model.parameters()).device)
        # Eval mode: no dropout while sampling, and HF keeps the KV cache on even with gradient checkpointing.
        was_training = self.model.training
        self.model.eval()
        try:
            decoded = self.backend.sample(prompt_ids, prompt_mask, num_samples, config)  # [N, C], [N, C] | None
        finally:
            self.model.train(was_training)
        prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
        prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
        return self._completions(prompt_ids, prompt_mask, decoded.completion_ids, decoded.logps)

    def _completions(
        self, prompt_ids: Tensor, prompt_mask: Tensor, completion_ids: Tensor, logps: Tensor | None
    ) -> Samples:
        eos = torch.tensor(self.eos_token_ids, device=completion_ids.device)  # [E]
        is_eos = torch.isin(completion_ids, eos)  # [N, C]
        first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.size(1))  # [N]
        positions = torch.arange(completion_ids.size(1), device=completion_ids.device)  # [C]
        completion_mask = (positions.unsqueeze(0) <= first_eos.unsqueeze(1)).long()  # [N, C]
        lengths = completion_mask.sum(1).tolist()
        rows = completion_ids.tolist()
        texts = [self.tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(rows, lengths, strict=True)]
        return Samples(prompt_ids, prompt_mask, completion_ids, completion_mask, texts, logps)
