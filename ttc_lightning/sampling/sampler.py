"""Sampling completions from the policy. Every speed choice of sampling is made here, once per call, in one
`SamplingPlan` (which levers are on, and why the others are off); the plan for the run is logged when fit starts.

The levers (`Levers`): one prompt pass per group (`kv_cache.prefill`), ttc's decoding loop (`decoding.decode`),
the prompt's keys/values shared by its group while decoding (`kv_cache.SharedPrefixLayer`), on a GPU each decoding
step replayed as a CUDA graph over a fixed-shape cache (`kv_cache.StaticCache`, `decoding.StaticStep`), LoRA merged
while sampling (`merged_lora`) and, on CPU, oneDNN's packed weights and flash attention (`cpu`). Each computes what
the plain `generate()` computes: the same tokens for the same random draws, or (merged LoRA in bf16, the CUDA graph's
kernels) the same up to rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig

from ttc_lightning import cpu
from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import Policy, Prompt, encode_prompts
from ttc_lightning.sampling.decoding import decode, decodes_alone, fast_decode_model, fast_decoding
from ttc_lightning.sampling.kv_cache import (
    StaticCache,
    attention_with_lse,
    cache_bytes,
    cache_keyword,
    expand_cache,
    prefill,
)

Decoder = Literal["loop", "generate+steps", "generate"]
Merge = Literal["in place", "copy", "off"]


class Samples(NamedTuple):
    """`num_samples` completions for each of B prompts: N = B * num_samples rows, each prompt's rows contiguous."""

    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    completion_ids: Tensor  # [N, C] right-padded
    completion_mask: Tensor  # [N, C] 1 up to and including the first EOS
    texts: list[str]  # N decoded completions
    logps: Tensor | None  # [N, C] the sampler's log-prob of each token at the sampling temperature (decoding loop)


@dataclass(frozen=True)
class SamplingPlan:
    """Which sampling levers a call uses. `off` says why each lever that is switched on does not apply."""

    prompt_once: bool
    decoder: Decoder
    share_cache: bool
    cuda_graph: bool
    merge_lora: Merge
    cpu_kernels: bool
    off: dict[str, str] = field(default_factory=dict)
    share_per_call: bool = False  # on CPU with the cache's size unknown yet: each call shares or copies by its size

    def describe(self) -> str:
        decoders = {"loop": "ttc's decoding loop", "generate+steps": "generate() with ttc's decode steps"}
        shared = f"shared prompt cache (from {cpu.SHARE_MIN_BYTES / 2**20:.0f} MB per layer; copied below)"
        on = [
            "prompt once" if self.prompt_once else None,
            decoders.get(self.decoder, "generate()"),
            (shared if self.share_per_call else "shared prompt cache") if self.share_cache else None,
            "CUDA graphs" if self.cuda_graph else None,
            f"LoRA merged ({self.merge_lora})" if self.merge_lora != "off" else None,
            "CPU kernels" if self.cpu_kernels else None,
        ]
        off = "; ".join(f"{name} off: {why}" for name, why in self.off.items())
        return "sampling with " + ", ".join(x for x in on if x) + (f" ({off})" if off else "")


def plan_sampling(
    model: torch.nn.Module,
    levers: Levers,
    config: GenerationConfig,
    *,
    lora: bool,
    quantized: bool,
    copy_bytes: int | None = None,
) -> SamplingPlan:
    """The plan for sampling from `model` with `config`. `copy_bytes` (per layer, what copying the prompts' cache to
    every row would add) decides sharing on CPU; None when unknown (as when the run's plan is logged)."""
    off: dict[str, str] = {}
    device = next(model.parameters()).device
    use_cpu = cpu.enabled(levers.cpu, device)
    # generate() refuses a cache of ours when the model's generation config asks for its own kind.
    own_cache = model.generation_config.cache_implementation not in (None, "dynamic")
    prompt_once = levers.prompt_once and not own_cache
    if levers.prompt_once and own_cache:
        off["prompt_once"] = (
            f"the model's generation config asks for a {model.generation_config.cache_implementation} cache"
        )

    decoder: Decoder = "generate"
    if fast_decode_model(model) is None:
        if levers.decode_loop:
            off["decode_loop"] = f"{model.config.model_type} is not a Llama/Qwen2-family model"
    elif not levers.decode_loop:
        decoder = "generate"
    elif not prompt_once:
        decoder = "generate+steps"
        off["decode_loop"] = "it starts from the prompt pass (prompt_once)"
    elif decodes_alone(model, config):
        decoder = "loop"
    else:
        decoder = "generate+steps"
        off["decode_loop"] = "the generation config adds logits processors that only generate() applies"

    graph = levers.cuda_graph and decoder == "loop" and device.type == "cuda" and not quantized
    if levers.cuda_graph and device.type == "cuda" and not graph:
        off["cuda_graph"] = "not with 4-bit weights" if quantized else "needs ttc's decoding loop"
    share = levers.share_cache and decoder == "loop" and not graph
    if levers.share_cache and decoder != "loop":
        off.setdefault("share_cache", "needs ttc's decoding loop")
    elif levers.share_cache and graph:
        off["share_cache"] = "the CUDA graph's fixed-shape cache holds each row's copy of its prompt"
    elif share and use_cpu and copy_bytes is not None and not cpu.share_pays(copy_bytes):
        share = False
        off["share_cache"] = f"on CPU copying {copy_bytes / 2**20:.1f} MB per layer is faster than sharing"

    merge: Merge = "off"
    if levers.merge_lora and lora:
        if quantized:
            off["merge_lora"] = "4-bit weights cannot take the adapters"
        else:
            merge = "in place" if next(model.parameters()).dtype == torch.float32 else "copy"
    per_call = share and use_cpu and copy_bytes is None
    return SamplingPlan(prompt_once, decoder, share, graph, merge, use_cpu and cpu.can_pack(model), off, per_call)


class Sampler:
    """Completions from a policy model: tokenisation, the sampling plan, the KV cache, the loop, the EOS masks."""

    def __init__(
        self, policy: Policy, levers: Levers, *, lora: bool, quantized: bool, top_p: float, top_k: int
    ) -> None:
        self.model, self.tokenizer, self.eos_token_ids = policy.model, policy.tokenizer, policy.eos_token_ids
        self.levers = levers
        self.lora, self.quantized, self.top_p, self.top_k = lora, quantized, top_p, top_k
        self.last_plan: SamplingPlan | None = None

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

    def plan(self, config: GenerationConfig, copy_bytes: int | None = None) -> SamplingPlan:
        return plan_sampling(
            self.model, self.levers, config, lora=self.lora, quantized=self.quantized, copy_bytes=copy_bytes
        )

    @torch.no_grad()
    def sample(self, prompts: Sequence[Prompt], num_samples: int, temperature: float, max_new_tokens: int) -> Samples:
        """`num_samples` completions per prompt, rows grouped by prompt. Stops when every row has an EOS token."""
        model = self.model
        config = self.generation_config(temperature, max_new_tokens)
        prompt_ids, prompt_mask = encode_prompts(self.tokenizer, prompts, next(model.parameters()).device)  # [B, P]
        plan = self.plan(config)
        # Eval mode: no dropout while sampling, and HF keeps the KV cache on even with gradient checkpointing.
        was_training = model.training
        model.eval()
        try:
            with merged_lora(model, plan.merge_lora), self._packed(plan, len(prompts) * num_samples):
                cache = None
                if plan.prompt_once and prompt_ids.size(1) > 1:
                    # Each prompt once, not once per sample; generation starts from its last token.
                    cache = prefill(model, prompt_ids[:, :-1], prompt_mask[:, :-1], prompt_ids.size(1) + max_new_tokens)
                if cache is not None and plan.cuda_graph and plan.decoder == "loop":
                    cache = StaticCache.from_prefill(cache, num_samples, prompt_ids.size(1) - 1 + max_new_tokens)
                elif cache is not None:
                    plan = self.plan(config, cache_bytes(cache) * (num_samples - 1))
                    attention = cpu.attention_with_lse if plan.cpu_kernels else attention_with_lse
                    expand_cache(
                        cache, prompt_mask[:, :-1], num_samples, max_new_tokens + 1, plan.share_cache, attention
                    )
                self.last_plan = plan
                prompt_ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
                prompt_mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
                sequences, logps = self._decode(plan, prompt_ids, prompt_mask, cache, config)  # [N, P+C], [N, C]
        finally:
            model.train(was_training)
        return self._completions(prompt_ids, prompt_mask, sequences[:, prompt_ids.size(1) :], logps)

    def _packed(self, plan: SamplingPlan, rows: int) -> contextlib.AbstractContextManager[None]:
        return cpu.packed_linears(self.model, rows) if plan.cpu_kernels else contextlib.nullcontext()

    def _decode(
        self, plan: SamplingPlan, ids: Tensor, mask: Tensor, cache: object | None, config: GenerationConfig
    ) -> tuple[Tensor, Tensor | None]:
        """The prompts and their completions `[N, P+C]`, and the sampler's log-probs `[N, C]` (decoding loop only:
        generate() would have to keep every step's logits to give them)."""
        if plan.decoder == "loop" and cache is not None:
            return decode(self.model, ids, mask, cache, config, rows=ids.size(0) if plan.cpu_kernels else None)
        cached = {} if cache is None else {cache_keyword(self.model): cache}
        with fast_decoding(self.model, plan.decoder == "generate+steps"):
            return self.model.generate(input_ids=ids, attention_mask=mask, generation_config=config, **cached), None

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


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module, how: Merge | bool) -> Iterator[None]:
    """Fold peft's LoRA adapters into the weights for the duration, so each layer is one matmul, not three.

    "in place" (or True): peft's merge, then unmerge, which subtracts the same product and restores a float32 weight
    to within about one unit in the last place per merge (tested). "copy": for bfloat16/float16 weights, where that
    rounding would pile up over a run, each adapted layer computes with a merged copy of its weight and the adapters
    disabled; the trained weights are never written.
    """
    if how in ("off", False):
        yield
        return
    if how in ("in place", True):
        model.merge_adapter()
        try:
            yield
        finally:
            model.unmerge_adapter()
        return
    from peft.tuners.lora import LoraLayer

    swapped = []
    for layer in model.modules():
        names = [name for name in layer.active_adapters if name in layer.lora_A] if isinstance(layer, LoraLayer) else []
        if names and not layer.merged:
            weight = layer.get_base_layer().weight
            merged = weight.data + sum(layer.get_delta_weight(name) for name in names)
            swapped.append((weight, weight.data))
            weight.data = merged.to(weight.dtype)
    try:
        with model.disable_adapter():
            yield
    finally:
        for weight, original in swapped:
            weight.data = original
