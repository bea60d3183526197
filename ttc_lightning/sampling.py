"""Faster sampling from a Hugging Face causal LM, with the same results: each distinct prompt encoded once, a KV
cache that does not copy itself at every token, LoRA adapters merged into the weights while sampling, and on CPU
float32 weights laid out for oneDNN's small-batch matmuls."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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


class SharedPrefixLayer(DynamicLayer):
    """Keys/values of the G rows that continue each of B prompts: the prompt's once per group, then each row's own.

    Copying a prompt's cache to its G rows makes every decoded token read G copies of it. Here a group's G rows
    query the prompt together, in one attention call, and their own tokens each; the two parts are merged by their
    log-sum-exps, which is the attention over both. Only `decode_step` knows how to attend to it (`attend`).
    """

    def __init__(self, prefix: DynamicLayer, mask: Tensor, group: int, capacity: int) -> None:
        super().__init__()
        self.prompt_keys, self.prompt_values = prefix.keys, prefix.values  # [B, Hkv, P, D]
        self.mask = mask  # [B, 1, 1, P]: 0, or -inf on left padding
        self.group = group
        self.own = GrowingLayer(capacity)
        self.is_initialized = True
        self.dtype, self.device = self.prompt_keys.dtype, self.prompt_keys.device

    def get_seq_length(self) -> int:
        return self.prompt_keys.size(-2) + self.own.get_seq_length()

    def update(self, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        raise RuntimeError("a shared-prefix cache is read by ttc_lightning.sampling.decode_step only")

    def attend(self, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Attention of one new token per row, `q` `[N, Hkv, heads, D]` and `k`, `v` `[N, Hkv, 1, D]`."""
        attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # returns the log-sum-exp too
        keys, values = self.own.update(k, v)  # [N, Hkv, t, D]
        b, hkv, _, d = self.prompt_keys.shape
        n, _, heads, _ = q.shape
        g = n // b
        grouped = q.view(b, g, hkv, heads, d).transpose(1, 2).reshape(b, hkv, g * heads, d)  # [B, Hkv, G*heads, D]
        on_prompt, prompt_lse = attention(
            grouped, self.prompt_keys, self.prompt_values, 0.0, False, attn_mask=self.mask, scale=scale
        )  # [B, Hkv, G*heads, D], [B, Hkv, G*heads]
        on_prompt = on_prompt.view(b, hkv, g, heads, d).transpose(1, 2).reshape(n, hkv, heads, d)  # [N, Hkv, h, D]
        prompt_lse = prompt_lse.view(b, hkv, g, heads).transpose(1, 2).reshape(n, hkv, heads, 1)  # [N, Hkv, h, 1]
        on_own, own_lse = attention(q, keys, values, 0.0, False, scale=scale)  # [N, Hkv, h, D], [N, Hkv, h]
        # softmax over both parts = each part's softmax weighted by its share of the total exp-sum
        to_prompt = torch.sigmoid(prompt_lse - own_lse.unsqueeze(-1))  # [N, Hkv, h, 1]
        return torch.lerp(on_own, on_prompt, to_prompt.to(q.dtype))  # [N, Hkv, heads, D]


# Bytes of prompt keys/values per layer that copying to the rows would add, from which sharing them pays: below
# it the extra operations of `SharedPrefixLayer.attend` cost more than reading the copies (benchmark machine,
# sampling alone: the tiny model's 0.8 MB lost 7 %, the medium model's 3.4 MB gained 9 %, 15 MB with 519-token
# prompts gained 13 %).
SHARE_MIN_BYTES = 2 << 20


def expand_cache(cache: DynamicCache, prompt_mask: Tensor, group: int, capacity: int, share: bool) -> None:
    """Give the prefill cache of B prompts `[B, P]` to B*`group` rows: shared (`SharedPrefixLayer`, for
    `decode_step` only, when `share`, on CPU, and it pays) or copied, with room for `capacity` more positions per
    row."""
    layer = cache.layers[0]
    copies = layer.keys.nelement() * layer.keys.element_size() * 2 * (group - 1)
    # `attend` uses CPU attention that returns its log-sum-exp; a prompt that is all padding (one token long) has
    # nothing to share.
    shareable = layer.keys.device.type == "cpu" and bool(prompt_mask.any(1).all())
    if not share or not shareable or copies < SHARE_MIN_BYTES:
        cache.batch_repeat_interleave(group)
        return
    keep = prompt_mask.bool()[:, None, None, :]  # [B, 1, 1, P]
    mask = torch.zeros(keep.shape, dtype=layer.keys.dtype, device=keep.device).masked_fill(~keep, float("-inf"))
    cache.layers = [SharedPrefixLayer(layer, mask, group, capacity) for layer in cache.layers]


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
    backward pass (`index_add`) 7x faster on CPU than advanced indexing's accumulating `index_put`.
    """
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


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


# Weights per layer from which oneDNN's packed matmul beats the default at 16-32 rows (about 256 x 512 on the
# benchmark machine; a 256 x 256 layer breaks even and smaller ones lose to the call's overhead).
PACK_MIN_WEIGHTS = 1 << 17


def can_pack(model: torch.nn.Module) -> bool:
    """Whether `packed_linears` applies: a float32 model on CPU, with this torch build's oneDNN linear ops."""
    ops = torch.ops.mkldnn
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(ops, "_reorder_linear_weight")
        and hasattr(ops, "_linear_pointwise")
        and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in model.parameters())
    )


@contextlib.contextmanager
def packed_linears(model: torch.nn.Module, enabled: bool, rows: int) -> Iterator[None]:
    """Run every `nn.Linear` of a float32 CPU model on a copy of its weight in oneDNN's blocked layout.

    Decoding multiplies each weight by a handful of rows per token; the default float32 path (MKL) is slow at that
    shape, oneDNN on a weight reordered once for `rows` rows ran the medium benchmark model's decode matmuls 2-3x
    faster. Below `PACK_MIN_WEIGHTS` weights the oneDNN call costs more than it saves, and the layer is left as it
    is. Same float32 arithmetic, another summation order. Costs a copy of the weights for the duration, taken
    when entered, so weights changed inside (training) would not be seen: calls with gradients or under autocast
    take the module's own path.
    """
    if not enabled:
        yield
        return
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.numel() >= PACK_MIN_WEIGHTS]
    own = [linear.__dict__.get("forward") for linear in linears]  # a forward set on the instance (hooks) comes back
    for linear in linears:
        linear.forward = _packed_forward(linear, torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows))
    try:
        yield
    finally:
        for linear, forward in zip(linears, own, strict=True):
            if forward is None:
                del linear.forward
            else:
                linear.forward = forward


def _packed_forward(linear: torch.nn.Linear, packed: Tensor) -> Any:
    plain = linear.forward
    bias = None if linear.bias is None else linear.bias.detach()

    def forward(x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32:
            return plain(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


# Decoder-only families whose layers are exactly: RMSNorm, q/k/v projections, rotary embeddings, attention over the
# cache, o projection, residual, RMSNorm, gated MLP, residual (`decode_step` below).
FAST_DECODE_TYPES = ("llama", "qwen2")


def fast_decode_model(model: torch.nn.Module) -> torch.nn.Module | None:
    """The Hugging Face causal LM inside `model` (peft or not) if `decode_step` can stand in for its forward."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(lm, "config", None)
    if getattr(config, "model_type", None) not in FAST_DECODE_TYPES:
        return None
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return None  # sliding-window layers attend to part of the cache
    if getattr(config, "_attn_implementation", "sdpa") not in ("sdpa", "eager"):
        return None
    return lm


@contextlib.contextmanager
def fast_decoding(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Route the one-token steps of `generate()` through `decode_step` instead of the model's own forward.

    A Hugging Face forward spends more time in Python (argument handling, mask building, output recording) than a
    small model spends computing a token; this does the same layers with the fewest calls. Everything else (the
    prompt pass, calls with gradients, models of other families, inputs it does not handle) takes the model's
    own forward.
    """
    lm = fast_decode_model(model) if enabled else None
    if lm is None:
        yield
        return
    own = lm.__dict__.get("forward")
    plain = lm.forward
    keyword = cache_keyword(lm)

    def forward(*args: Any, **kwargs: Any) -> Any:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        ids, mask = kwargs.get("input_ids"), kwargs.get("attention_mask")
        handled = (
            not args
            and not torch.is_grad_enabled()
            and ids is not None
            and ids.size(1) == 1
            and kwargs.get("inputs_embeds") is None
            and isinstance(cache, DynamicCache)  # static and sliding-window caches keep positions of their own
            and all(isinstance(layer, DynamicLayer) for layer in cache.layers)
            and cache.get_seq_length() > 0
            and (mask is None or (isinstance(mask, Tensor) and mask.dim() == 2))
            and (mask is None or mask.size(1) == cache.get_seq_length() + 1)
            and not any(kwargs.get(k) for k in ("output_attentions", "output_hidden_states", "labels"))
        )
        if not handled:
            return plain(*args, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        logits = decode_step(lm, ids, mask, kwargs.get("position_ids"), cache)
        return CausalLMOutputWithPast(logits=logits, **{keyword: cache})

    lm.forward = forward
    try:
        yield
    finally:
        if own is None:
            del lm.forward
        else:
            lm.forward = own


def decode_step(
    lm: torch.nn.Module,
    ids: Tensor,
    mask: Tensor | None,
    positions: Tensor | None,
    cache: Any,
    layers: list[DecodeLayer] | None = None,
) -> Tensor:
    """Logits `[N, 1, V]` for one new token per row of a Llama/Qwen2-family model, keys/values appended to `cache`.

    `mask` `[N, L]` covers the cache and the new token (0 = left padding), as in `generate()`; `layers` is
    `decode_layers(lm)`, which a caller decoding many tokens looks up once.
    """
    if positions is None:
        positions = mask.long().sum(1, keepdim=True) - 1 if mask is not None else cache.get_seq_length() + ids * 0
    # Padding matters only where some row has it; a query of one token needs no causal mask.
    keep = None if mask is None or bool(mask.all()) else mask.bool()[:, None, None, :]  # [N, 1, 1, L]
    n = ids.size(0)
    hidden = lm.model.embed_tokens(ids)  # [N, 1, E]
    cos, sin = lm.model.rotary_emb(hidden, positions)  # [N, 1, D]
    for i, layer in enumerate(layers if layers is not None else decode_layers(lm)):
        d = layer.head_dim
        x = _norm(layer.input_norm, hidden)  # [N, 1, E]
        qk, v = layer.qk_v(x)  # [N, 1, (H+Hkv)*D], [N, 1, Hkv*D]
        qk = qk.reshape(n, -1, d)  # [N, H+Hkv, D]
        qk = qk * cos + _rotate_half(qk) * sin  # [N, H+Hkv, D]: the same rotation for queries and keys
        q, k = qk[:, : layer.heads], qk[:, layer.heads :].unsqueeze(2)  # [N, H, D], [N, Hkv, 1, D]
        v = v.reshape(n, -1, 1, d)  # [N, Hkv, 1, D]
        # Grouped-query attention without repeating the cache: the heads that share a key/value head are that
        # head's queries.
        q = q.view(n, k.size(1), -1, d)  # [N, Hkv, H/Hkv, D]
        if isinstance(cache.layers[i], SharedPrefixLayer):
            out = cache.layers[i].attend(q, k, v, layer.scaling)  # [N, Hkv, H/Hkv, D]
        else:
            keys, values = cache.update(k, v, i)  # [N, Hkv, L, D]
            out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=keep, scale=layer.scaling)
        hidden = hidden + layer.o(out.reshape(n, 1, -1))  # [N, 1, E]
        x = _norm(layer.mlp_norm, hidden)  # [N, 1, E]
        gate, up = layer.gate_up(x)  # [N, 1, I] each
        hidden = hidden + layer.down(layer.act(gate) * up)  # [N, 1, E]
    return lm.lm_head(_norm(lm.model.norm, hidden))  # [N, 1, V]


@dataclass
class DecodeLayer:
    """What one decoder layer calls in `decode_step`, looked up (and fused) once per sampling call."""

    input_norm: torch.nn.Module
    qk_v: Callable[[Tensor], Sequence[Tensor]]  # x -> q and k projections of x side by side, and v
    o: torch.nn.Module
    mlp_norm: torch.nn.Module
    gate_up: Callable[[Tensor], Sequence[Tensor]]  # x -> the gate and up projections of x
    down: torch.nn.Module
    act: Any
    heads: int
    head_dim: int
    scaling: float


def decode_layers(lm: torch.nn.Module, rows: int | None = None) -> list[DecodeLayer]:
    """`decode_step`'s view of `lm`'s layers, valid while their weights and adapters stay as they are.

    With `rows` (the rows decoded together), projections of the same input are fused into one oneDNN matmul each
    (q/k/v, gate/up) where they are plain float32 CPU linear layers: on the medium benchmark model sampling took 8 %
    less time. The fused weights are a copy, made here.
    """
    layers = []
    for layer in lm.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        layers.append(
            DecodeLayer(
                layer.input_layernorm,
                _together([_direct(attn.q_proj), _direct(attn.k_proj), _direct(attn.v_proj)], rows, [2, 1]),
                _direct(attn.o_proj),
                layer.post_attention_layernorm,
                _together([_direct(mlp.gate_proj), _direct(mlp.up_proj)], rows, [1, 1]),
                _direct(mlp.down_proj),
                mlp.act_fn,
                lm.config.num_attention_heads,
                attn.head_dim,
                attn.scaling,
            )
        )
    return layers


def _together(
    projections: list[torch.nn.Module], rows: int | None, counts: list[int]
) -> Callable[[Tensor], list[Tensor]]:
    """Projections of one input, their outputs joined in `counts` consecutive groups (q/k, v: [2, 1]).

    One matmul over the stacked weights where they are plain linear layers, else one call each and a concatenation.
    """
    weights = [getattr(m, "weight", None) for m in projections]
    plain = (
        rows is not None
        and all(type(m) is torch.nn.Linear and not hasattr(m, "_hf_hook") for m in projections)
        and len({(w.dtype, w.device) for w in weights}) == 1
        and weights[0].device.type != "meta"
        and len({m.bias is None for m in projections}) == 1
    )
    starts = [sum(counts[:i]) for i in range(len(counts))]
    # Measured to pay with oneDNN's packed weights only: for the tiny model's small layers it did not.
    if not plain or sum(w.numel() for w in weights) < PACK_MIN_WEIGHTS or not can_pack(projections[0]):

        def each(x: Tensor) -> list[Tensor]:
            outs = [m(x) for m in projections]
            return [outs[i] if c == 1 else torch.cat(outs[i : i + c], -1) for i, c in zip(starts, counts, strict=True)]

        return each
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), rows)  # [outs, in]
    bias = None if projections[0].bias is None else torch.cat([m.bias.detach() for m in projections])
    sizes = [sum(m.out_features for m in projections[i : i + c]) for i, c in zip(starts, counts, strict=True)]
    return lambda x: list(torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "").split(sizes, -1))


def _norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """Llama/Qwen2's RMSNorm (`weight * x / sqrt(mean(x^2) + eps)`, in float32), in one call for float32 inputs."""
    if x.dtype != torch.float32:
        return norm(x)
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _direct(projection: torch.nn.Module) -> torch.nn.Module:
    """The layer to call for `projection`: with its LoRA merged into the weights, peft's wrapper has nothing to add."""
    return projection.base_layer if getattr(projection, "merged", False) else projection


def _rotate_half(x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Fields of a model's generation_config that `decode` honours as generate() would; any other one set there would add
# a logits processor of generate()'s, and sampling then goes through generate() itself.
DECODE_HONOURS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "top_k", "max_length",
    "max_new_tokens", "min_new_tokens", "repetition_penalty", "use_cache", "transformers_version", "_from_model_config",
}  # fmt: skip


def decodes_alone(model: torch.nn.Module) -> bool:
    """Whether `decode` can sample for `model` exactly as its generate() would."""
    lm = fast_decode_model(model)
    if lm is None:
        return False
    extra = {k: v for k, v in lm.generation_config.to_diff_dict().items() if k not in DECODE_HONOURS and v}
    return not extra and lm.generation_config.repetition_penalty in (None, 1.0)


def decode(model: torch.nn.Module, prompt_ids: Tensor, prompt_mask: Tensor, cache: DynamicCache, config: Any) -> Tensor:
    """generate()'s sampling loop for a Llama/Qwen2-family model, one `decode_step` per token -> `[N, P + C]`.

    `cache` holds the prompts `[N, P]` but their last token. The same logits processors as generate() for
    `config` (a GenerationConfig) and the model's `min_new_tokens`, the same padding after EOS, and with
    `torch.multinomial` for `draw` the same tokens for the same seed (tested); without generate()'s per-token
    bookkeeping.
    """
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    lm = fast_decode_model(model)
    layers = decode_layers(lm, rows=prompt_ids.size(0))
    warpers = []
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
    min_new_tokens = lm.generation_config.min_new_tokens or 0
    eos = torch.tensor(config.eos_token_id, device=prompt_ids.device).flatten()  # [E]
    n, p = prompt_ids.shape
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(n, config.max_new_tokens)], dim=1)  # [N, P+T]
    positions = prompt_mask.sum(1, keepdim=True) - 1  # [N, 1]: the last prompt token's
    tokens = prompt_ids[:, -1:]  # [N, 1]
    unfinished = torch.ones(n, dtype=torch.bool, device=prompt_ids.device)  # [N]
    new = []
    for step in range(config.max_new_tokens):
        scores = decode_step(lm, tokens, mask[:, : p + step], positions + step, cache, layers)[:, -1].float()  # [N, V]
        if step < min_new_tokens:
            scores[:, eos] = float("-inf")
        for warp in warpers:
            scores = warp(prompt_ids, scores)  # [N, V]
        chosen = draw(scores.softmax(-1)) if config.do_sample else scores.argmax(-1, keepdim=True)  # [N, 1]
        chosen = torch.where(unfinished[:, None], chosen, config.pad_token_id)  # [N, 1]
        new.append(chosen)
        unfinished &= ~torch.isin(chosen[:, 0], eos)
        if not unfinished.any():
            break
        tokens = chosen
    return torch.cat([prompt_ids, *new], dim=1)  # [N, P+C]


def draw(probs: Tensor) -> Tensor:
    """One token per row of `probs` `[N, V]`, each with its probability -> `[N, 1]`: by inverting the cumulative sum.

    `torch.multinomial` draws an exponential per vocabulary entry, ten times slower on CPU for a small model's step.
    In float64, with a float32 uniform in [0, 1) scaled by the row's total, the draw stays below the total, and the
    first entry whose cumulative sum exceeds it has a probability above zero.
    """
    cdf = probs.double().cumsum(-1)  # [N, V]
    u = torch.rand(probs.size(0), 1, device=probs.device).double() * cdf[:, -1:]  # [N, 1]
    return torch.searchsorted(cdf, u, right=True)  # [N, 1]
