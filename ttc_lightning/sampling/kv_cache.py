"""KV caches for sampling and for the training pass that shares a prompt: one pass per distinct prompt
(`prefill`), its keys/values given to the rows that continue it (copied, `select_rows`, or shared by the group,
`SharedPrefixLayer`), a cache layer that grows without copying itself (`GrowingLayer`), and one of a fixed shape
for a decoding step replayed as a CUDA graph (`StaticCache`)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

Attention = Callable[[Tensor, Tensor, Tensor, Tensor | None, float], tuple[Tensor, Tensor]]


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


class RecordingLayer(DynamicLayer):
    """The training pass over a group's prompt: keeps the keys/values it is given, without concatenating, so that
    recomputing the layer under gradient checkpointing records the same tensors and attends to the same ones."""

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class PrefixLayer(DynamicLayer):
    """Read-only prompt keys/values for the training pass over completions: attention sees the prompt and the new
    tokens, and the cache is never written, so recomputing the layer under gradient checkpointing is exact."""

    def __init__(self, keys: Tensor, values: Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # [n, Hkv, P, D]
        self.is_initialized = True
        self.dtype, self.device = keys.dtype, keys.device

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def recording_cache(config: Any) -> DynamicCache | None:
    """A cache of `RecordingLayer`s for a model with `config`, or None when its cache is not all full-attention layers
    (sliding windows keep positions of their own)."""
    cache = DynamicCache(config=config)
    if any(type(layer) is not DynamicLayer for layer in cache.layers):
        return None
    cache.layers = [RecordingLayer() for _ in cache.layers]
    return cache


def prefix_cache(recorded: DynamicCache, index: Tensor) -> DynamicCache:
    """Row i gets the recorded prompt `index[i]`'s keys/values, read-only (`PrefixLayer`).

    `index_select` rather than advanced indexing: the same values, and a backward pass (`index_add`) far faster on
    CPU than advanced indexing's accumulating `index_put`.
    """
    cache = DynamicCache()
    cache.layers = [
        PrefixLayer(layer.keys.index_select(0, index), layer.values.index_select(0, index)) for layer in recorded.layers
    ]
    return cache


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """`softmax(q k^T * scale + mask) v` and each query's log-sum-exp of its scores: q `[B, H, L, D]`, k and v
    `[B, H, S, D]`, mask broadcastable to `[B, H, L, S]` (0 or -inf) -> `[B, H, L, D]`, `[B, H, L]` (float32)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale  # [B, H, L, S]
    if mask is not None:
        scores = scores + mask
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, L]
    weights = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)  # [B, H, L, S]
    return torch.matmul(weights, v), lse  # [B, H, L, D], [B, H, L]


class SharedPrefixLayer(DynamicLayer):
    """Keys/values of the G rows that continue each of B prompts: the prompt's once per group, then each row's own.

    Copying a prompt's cache to its G rows makes every decoded token read G copies of it. Here a group's G rows
    query the prompt together, in one attention call, and their own tokens each; the two parts are merged by their
    log-sum-exps, which is the attention over both. Only `decoding.decode_step` knows how to attend to it
    (`attend`), so the sampler shares prompts only when ttc's own decoding loop drives every step.
    """

    def __init__(self, prefix: DynamicLayer, mask: Tensor, group: int, capacity: int, attention: Attention) -> None:
        super().__init__()
        # Under autocast the rotary embedding leaves keys in float32 and values in bf16: one dtype for attention.
        self.prompt_keys, self.prompt_values = prefix.keys, prefix.values.to(prefix.keys.dtype)  # [B, Hkv, P, D]
        self.mask = mask  # [B, 1, 1, P]: 0, or -inf on left padding
        self.group = group
        self.own = GrowingLayer(capacity)
        self.attention = attention
        self.is_initialized = True
        self.dtype, self.device = self.prompt_keys.dtype, self.prompt_keys.device

    def get_seq_length(self) -> int:
        return self.prompt_keys.size(-2) + self.own.get_seq_length()

    def update(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise RuntimeError("a shared-prefix cache is read by ttc_lightning.sampling.decoding.decode_step only")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Attention of one new token per row, `q` `[N, Hkv, heads, D]` and `k`, `v` `[N, Hkv, 1, D]`."""
        # Under autocast q, k and v can come in other dtypes than the prompt's cache: attend in its, answer in q's.
        out_dtype = q.dtype
        q, k, v = q.to(self.dtype), k.to(self.dtype), v.to(self.dtype)
        keys, values = self.own.update(k, v)  # [N, Hkv, t, D]
        b, hkv, _, d = self.prompt_keys.shape
        n, _, heads, _ = q.shape
        g = n // b
        grouped = q.view(b, g, hkv, heads, d).transpose(1, 2).reshape(b, hkv, g * heads, d)  # [B, Hkv, G*heads, D]
        on_prompt, prompt_lse = self.attention(grouped, self.prompt_keys, self.prompt_values, self.mask, scale)
        on_prompt = on_prompt.view(b, hkv, g, heads, d).transpose(1, 2).reshape(n, hkv, heads, d)  # [N, Hkv, h, D]
        prompt_lse = prompt_lse.view(b, hkv, g, heads).transpose(1, 2).reshape(n, hkv, heads, 1)  # [N, Hkv, h, 1]
        on_own, own_lse = self.attention(q, keys, values, None, scale)  # [N, Hkv, h, D], [N, Hkv, h]
        # softmax over both parts = each part's softmax weighted by its share of the total exp-sum
        to_prompt = torch.sigmoid(prompt_lse - own_lse.unsqueeze(-1))  # [N, Hkv, h, 1]
        return torch.lerp(on_own, on_prompt, to_prompt.to(on_own.dtype)).to(out_dtype)  # [N, Hkv, heads, D]


class StaticCache:
    """Keys/values of N rows in buffers of a fixed length, each new token's written at the position held in `index`
    (a one-element device tensor): every decoding step then has the same shapes and addresses, which is what a
    captured CUDA graph replays. Positions not yet written hold zeros, which the step's attention mask leaves out.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], index: Tensor) -> None:
        self.keys, self.values = keys, values  # per layer [N, Hkv, L, D]
        self.index = index  # [1] the position the next token's keys/values go to
        self.layers = [None] * len(keys)  # no layer is a SharedPrefixLayer

    @classmethod
    def from_prefill(cls, cache: DynamicCache, group: int, length: int) -> StaticCache:
        """The prefill cache of B prompts `[B, P]` copied to B*`group` rows, in buffers of `length` positions."""
        keys, values = [], []
        for layer in cache.layers:
            # Under autocast the rotary embedding leaves keys in float32 and values in bf16: one dtype for both.
            dtype = layer.values.dtype
            b, h, p, d = layer.keys.shape
            for source, buffers in ((layer.keys, keys), (layer.values, values)):
                buffer = source.new_zeros(b * group, h, length, d, dtype=dtype)  # [N, Hkv, L, D]
                buffer[:, :, :p] = source.repeat_interleave(group, 0)
                buffers.append(buffer)
        index = torch.tensor([cache.get_seq_length()], device=keys[0].device)  # [1]
        return cls(keys, values, index)

    def update(self, k: Tensor, v: Tensor, i: int) -> tuple[Tensor, Tensor]:
        """Write one token's keys/values `[N, Hkv, 1, D]` of layer `i` at `index`; return its whole buffers
        `[N, Hkv, L, D]`."""
        keys, values = self.keys[i], self.values[i]
        keys.index_copy_(2, self.index, k.to(keys.dtype))
        values.index_copy_(2, self.index, v.to(values.dtype))
        return keys, values


def cache_bytes(cache: DynamicCache) -> int:
    """Bytes of keys and values in one layer of `cache`."""
    layer = cache.layers[0]
    return layer.keys.nelement() * layer.keys.element_size() * 2


def expand_cache(
    cache: DynamicCache,
    prompt_mask: Tensor,
    group: int,
    capacity: int,
    share: bool,
    attention: Attention = attention_with_lse,
) -> None:
    """Give the prefill cache of B prompts `[B, P]` to B*`group` rows: shared by each group (`SharedPrefixLayer`,
    read by `decode_step` only) when `share`, else copied, with room for `capacity` more positions per row.

    A prompt that is all padding (one token long: the cache covers all but its last token) has nothing to share.
    """
    if not share or not bool(prompt_mask.any(1).all()):
        cache.batch_repeat_interleave(group)
        return
    keys = cache.layers[0].keys
    keep = prompt_mask.bool()[:, None, None, :]  # [B, 1, 1, P]
    mask = torch.zeros(keep.shape, dtype=keys.dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    cache.layers = [SharedPrefixLayer(layer, mask, group, capacity, attention) for layer in cache.layers]


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


def select_rows(cache: DynamicCache, index: Tensor) -> None:
    """Row i of every layer's keys/values becomes row `index[i]`: each completion gets its prompt's cache.

    `index_select` rather than the cache's `batch_select_indices` (advanced indexing): the same values, and a
    backward pass (`index_add`) far faster on CPU than advanced indexing's accumulating `index_put`.
    """
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def cache_keyword(model: torch.nn.Module) -> str:
    """The forward/generate argument that takes a KV cache: transformers renamed `past_key_values` to `cache`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
