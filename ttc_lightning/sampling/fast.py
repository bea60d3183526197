"""ttc's sampling backend for the Llama/Qwen2-family models it knows: each prompt's keys/values computed once for
its group (`kv_cache.prefill`), its own decoding loop (`decoding.decode`), the prompt's cache shared by the group's
rows (`kv_cache.SharedPrefixLayer`), on a GPU each decoding step replayed as a CUDA graph over a fixed-shape cache
(`kv_cache.StaticCache`), LoRA merged into the weights while sampling (`merged_lora`) and, on CPU, oneDNN's packed
weights and flash attention (`cpu`).

It computes the distribution `generate()` samples from: the same logits (up to the kernels' rounding), the same
greedy tokens, the same log-probs for the same tokens (tested against `generate()`). It draws its tokens with its
own inverse-CDF sampler (`decoding.draw`), not `torch.multinomial`, so one seed gives other samples than
`generate()` gives. It calls the model's layers directly and subclasses transformers' cache layers, so it runs only
where it was tested (`refusal`): any other model, or transformers version, samples through `generate()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import transformers
from packaging.version import Version
from torch import Tensor
from transformers import GenerationConfig

from ttc_lightning import cpu
from ttc_lightning.errors import TTCError
from ttc_lightning.levers import Levers
from ttc_lightning.sampling.decoding import Decoded, decode, decodes_alone, fast_decode_model
from ttc_lightning.sampling.kv_cache import StaticCache, attention_with_lse, cache_bytes, expand_cache, prefill

# The transformers releases ttc's backend was tested with (CI runs the lowest and the newest): its cache layers and
# the layers' attributes it reads are internals, which a later release may change.
TESTED_TRANSFORMERS = (Version("5.17"), Version("5.26"))  # from, and below


def transformers_refusal(version: str | None = None) -> str | None:
    """Why ttc's fast paths (this backend, the training pass that shares a prompt) do not run with the installed
    transformers release (or `version`), or None when they do."""
    version = version or transformers.__version__
    low, high = TESTED_TRANSFORMERS
    if low <= Version(Version(version).base_version) < high:
        return None
    return f"transformers {version} is outside the releases it was tested with ({low} to below {high})"


def refusal(model: torch.nn.Module, levers: Levers, config: GenerationConfig) -> str | None:
    """Why this backend cannot sample for `model` with `config` (then `generate()` does), or None when it can."""
    if not levers.fast_sampler:
        return "model.levers.fast_sampler is off"
    own_cache = model.generation_config.cache_implementation
    if fast_decode_model(model) is None:
        return f"{model.config.model_type} is not a Llama/Qwen2-family model with full attention"
    if own_cache not in (None, "dynamic"):
        return f"the model's generation config asks for a {own_cache} cache"
    if not decodes_alone(model, config):
        return "the model's generation config adds logits processors that only generate() applies"
    return transformers_refusal()


@dataclass(frozen=True)
class FastPlan:
    """The levers ttc's backend uses for a model where it is now (its device decides some); `off` says why each lever
    that is switched on does not apply."""

    share_cache: bool
    cuda_graph: bool
    merge_lora: str  # "in place", "copy" or "off"
    cpu_kernels: bool
    share_by_size: bool  # on CPU: each call shares the prompt cache or copies it, by its size (`cpu.share_pays`)
    off: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        shared = f"shared prompt cache (from {cpu.SHARE_MIN_BYTES / 2**20:.0f} MB per layer; copied below)"
        on = [
            "ttc's decoding loop",
            (shared if self.share_by_size else "shared prompt cache") if self.share_cache else None,
            "CUDA graphs" if self.cuda_graph else None,
            f"LoRA merged ({self.merge_lora})" if self.merge_lora != "off" else None,
            "CPU kernels" if self.cpu_kernels else None,
        ]
        off = "; ".join(f"{name} off: {why}" for name, why in self.off.items())
        return ", ".join(x for x in on if x) + (f" ({off})" if off else "")


def plan_for(model: torch.nn.Module, levers: Levers, *, lora: bool, quantized: bool) -> FastPlan:
    """The levers that apply to `model` on the device it is on."""
    off: dict[str, str] = {}
    device = next(model.parameters()).device
    graph = levers.cuda_graph and device.type == "cuda" and not quantized
    if levers.cuda_graph and device.type == "cuda" and quantized:
        off["cuda_graph"] = "not with 4-bit weights"
    share = levers.share_cache and not graph
    if levers.share_cache and graph:
        off["share_cache"] = "the CUDA graph's fixed-shape cache holds each row's copy of its prompt"
    merge = "off"
    if levers.merge_lora and lora and quantized:
        off["merge_lora"] = "4-bit weights cannot take the adapters"
    elif levers.merge_lora and lora:
        merge = "in place" if next(model.parameters()).dtype == torch.float32 else "copy"
    use_cpu = cpu.enabled(levers.cpu, device)
    # Only where some layer is large enough to pack (`cpu.PACK_MIN_WEIGHTS`); the tiny model's are not.
    large = any(m.weight.numel() >= cpu.PACK_MIN_WEIGHTS for m in model.modules() if isinstance(m, torch.nn.Linear))
    return FastPlan(share, graph, merge, use_cpu and large and cpu.can_pack(model), share and use_cpu, off)


class FastBackend:
    """ttc's backend for one run's model. Its levers follow the model's device (`plan`): the module builds the sampler
    before Lightning moves the model to the run's device."""

    name = "ttc"
    keeps_logps = True

    def __init__(self, model: torch.nn.Module, levers: Levers, *, lora: bool, quantized: bool) -> None:
        self.model, self.levers, self.lora, self.quantized = model, levers, lora, quantized

    def plan(self) -> FastPlan:
        return plan_for(self.model, self.levers, lora=self.lora, quantized=self.quantized)

    def describe(self) -> str:
        return self.plan().describe()

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, config: GenerationConfig) -> Decoded:
        """Completions of B prompts `[B, P]`, `num_samples` rows each -> `[N, C]` ids and their log-probs."""
        plan = self.plan()
        if prompt_ids.size(1) == 1:  # the prompt pass covers all but the last token: give it a padded position
            prompt_ids = torch.nn.functional.pad(prompt_ids, (1, 0), value=config.pad_token_id)  # [B, 2]
            prompt_mask = torch.nn.functional.pad(prompt_mask, (1, 0), value=0)  # [B, 2]
        b, p = prompt_ids.shape
        steps = config.max_new_tokens
        rows = b * num_samples
        packed = cpu.packed_linears(self.model, rows) if plan.cpu_kernels else contextlib.nullcontext()
        with merged_lora(self.model, plan.merge_lora), packed:
            cache = prefill(self.model, prompt_ids[:, :-1], prompt_mask[:, :-1], p + steps)
            if cache is None:
                raise TTCError(
                    f"sampling: {self.model.config.model_type} kept no KV cache over the prompts; "
                    "set model.levers.fast_sampler false"
                )
            if plan.cuda_graph:
                cache = StaticCache.from_prefill(cache, num_samples, p - 1 + steps)
            else:
                copies = cache_bytes(cache) * (num_samples - 1)  # what copying would add, per layer
                share = plan.share_cache and (not plan.share_by_size or cpu.share_pays(copies))
                attention = cpu.attention_with_lse if plan.cpu_kernels else attention_with_lse
                expand_cache(cache, prompt_mask[:, :-1], num_samples, steps + 1, share, attention)
            ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
            mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
            return decode(self.model, ids, mask, cache, config, rows=rows if plan.cpu_kernels else None)


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module, how: str) -> Iterator[None]:
    """Fold peft's LoRA adapters into the weights for the duration, so each layer is one matmul, not three.

    "in place": peft's merge, then unmerge, which subtracts the same product: a float32 weight comes back within
    about one unit in the last place per merge (tested), not bit for bit, so over a run the frozen base drifts by
    such roundings (turn `merge_lora` off to keep it exact). "copy": for bfloat16/float16 weights, where that
    rounding would be far larger, each adapted layer computes with a merged copy of its weight and the adapters
    disabled; the weights are never written. "off": nothing.
    """
    if how == "off":
        yield
        return
    if how == "in place":
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
