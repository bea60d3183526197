"""Faster sampling from a Hugging Face causal LM, with the same results: each distinct prompt encoded once, a KV
cache that does not copy itself at every token, and LoRA adapters merged into the weights while sampling."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` that writes new keys/values into spare room instead of concatenating at every token.

    HF's layer copies the whole cache for each new token (quadratic in the completion's length); this one allocates
    `capacity` positions once and hands attention a view of the filled part. Without gradients only: the buffer is
    written in place.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.buffers: tuple[Tensor, Tensor] | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        old = self.get_seq_length()
        new = old + key_states.size(-2)
        # A cache reshaped from outside (batch_repeat_interleave, batch_select_indices) replaces `keys`: re-home it.
        if self.buffers is None or self.buffers[0].data_ptr() != self.keys.data_ptr() or new > self.buffers[0].size(-2):
            size = max(new, self.capacity)
            keys = key_states.new_empty(*key_states.shape[:-2], size, key_states.size(-1))  # [B, H, L, D]
            values = value_states.new_empty(*value_states.shape[:-2], size, value_states.size(-1))  # [B, H, L, D]
            if old:
                keys[..., :old, :] = self.keys
                values[..., :old, :] = self.values
            self.buffers = (keys, values)
        keys, values = self.buffers
        keys[..., old:new, :] = key_states
        values[..., old:new, :] = value_states
        self.keys, self.values = keys[..., :new, :], values[..., :new, :]
        return self.keys, self.values


def prefill(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, capacity: int | None = None
) -> DynamicCache | None:
    """The KV cache of `model` over left-padded `input_ids` `[B, P]`, or None for a model that keeps none.

    With `capacity` (no gradients) the cache has room for that many positions without copying itself.
    """
    cache = DynamicCache(config=model.config)
    if capacity is not None:
        cache.layers = [GrowingLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [B, P]
    model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=1,
        use_cache=True,
        **{cache_keyword(model): cache},
    )
    return cache if cache.get_seq_length() == input_ids.size(1) else None


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward/generate argument that takes a KV cache: transformers renamed `past_key_values` to `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@contextlib.contextmanager
def merged_lora(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Fold peft's LoRA adapters into the base weights for the duration, so each layer is one matmul, not three.

    Unmerging subtracts the same product, which restores a float32 weight to within about one unit in the last
    place per merge (tested); in bfloat16/float16 that rounding would pile up over a run, so callers merge only
    float32 weights.
    """
    if not enabled:
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
