"""ttc's own decoding loop for Llama/Qwen2-family models: the model's layers with the fewest calls per token and
the same logits processors as `generate()` (the sampling backend in `fast.py` drives it).

A Hugging Face forward spends more time in Python (argument handling, mask building, output recording) than a
small model spends computing a token; `decode_step` does the same layers directly. `decode` is the sampling loop
around it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache

from ttc_lightning import cpu
from ttc_lightning.errors import TTCError
from ttc_lightning.sampling.kv_cache import SharedPrefixLayer, StaticCache

# Decoder-only families whose layers are exactly: RMSNorm, q/k/v projections, rotary embeddings, attention over the
# cache, o projection, residual, RMSNorm, gated MLP, residual (`decode_step` below).
FAST_DECODE_TYPES = ("llama", "qwen2")

# Fields of the generation config `generate()` would use that `decode` honours as generate() would; any other one
# set there would add a logits processor of generate()'s, and sampling then goes through generate() itself.
DECODE_HONOURS = {
    "bos_token_id", "eos_token_id", "pad_token_id", "do_sample", "temperature", "top_p", "top_k", "max_length",
    "max_new_tokens", "min_new_tokens", "repetition_penalty", "use_cache", "transformers_version", "_from_model_config",
}  # fmt: skip


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


def effective_config(model: torch.nn.Module, config: GenerationConfig | None) -> GenerationConfig:
    """The generation config `generate()` would sample with: `config`'s values, the model's own where `config`
    leaves a field unset (as transformers merges them)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if config is None:
        return lm.generation_config
    merged = copy.deepcopy(config)
    merged.update(**lm.generation_config.to_dict(), defaults_only=True)
    return merged


def decodes_alone(model: torch.nn.Module, config: GenerationConfig | None = None) -> bool:
    """Whether `decode` samples for `model` with `config` from the distribution its generate() would (the same
    logits processors; its own draws).

    Fields of the model's own generation config that `config` sets anyway (Qwen2.5-Instruct ships temperature,
    top-k/p and a repetition penalty) do not count: generate() would not use them either.
    """
    lm = fast_decode_model(model)
    if lm is None:
        return False
    merged = effective_config(model, config)
    extra = {k: v for k, v in merged.to_diff_dict().items() if k not in DECODE_HONOURS and v}
    return not extra and merged.repetition_penalty in (None, 1.0)


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
    return _step(lm, ids, keep, positions, cache, layers if layers is not None else decode_layers(lm))


def _step(lm: torch.nn.Module, ids: Tensor, keep: Tensor | None, positions: Tensor, cache: Any, layers: list) -> Tensor:
    """`decode_step` with its attention mask `keep` `[N, 1, 1, L]` (True = attend; None = every position) given: no
    host-device synchronisation, so that it can be captured as a CUDA graph over a `StaticCache`."""
    n = ids.size(0)
    hidden = lm.model.embed_tokens(ids)  # [N, 1, E]
    cos, sin = lm.model.rotary_emb(hidden, positions)  # [N, 1, D]
    for i, layer in enumerate(layers):
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


class StaticStep:
    """`decode_step` over a `StaticCache`: the same shapes and addresses at every token, replayed as one captured CUDA
    graph on a GPU (a few launches per token instead of thousands); on CPU the same computation runs uncaptured.

    `keep` `[N, 1, 1, L]` says which of the cache's positions each row attends to: its prompt's (not its left
    padding); each step adds the position it writes. Calling it with the step's tokens `[N, 1]` gives their logits
    `[N, V]` and moves the cache, the positions and the mask on by one token.
    """

    def __init__(
        self, lm: torch.nn.Module, layers: list[DecodeLayer], cache: StaticCache, keep: Tensor, positions: Tensor
    ) -> None:
        self.lm, self.layers, self.cache, self.keep = lm, layers, cache, keep
        self.positions = positions.clone()  # [N, 1]
        self.tokens = torch.zeros_like(self.positions)  # [N, 1]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: Tensor | None = None
        if cache.index.device.type == "cuda":
            self.graph = self._capture()

    def _advance(self) -> Tensor:
        self.keep.index_fill_(-1, self.cache.index, True)  # [N, 1, 1, L]: the position written now
        logits = _step(self.lm, self.tokens, self.keep, self.positions, self.cache, self.layers)[:, -1]  # [N, V]
        self.cache.index.add_(1)
        self.positions.add_(1)
        return logits

    def _capture(self) -> torch.cuda.CUDAGraph:
        # Autocast's cache of cast weights would be freed when its context exits, under the graph's feet.
        autocast = torch.autocast(
            "cuda", torch.get_autocast_dtype("cuda"), enabled=torch.is_autocast_enabled("cuda"), cache_enabled=False
        )
        saved = self.cache.index.clone(), self.positions.clone(), self.keep.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), autocast:  # warm-up: cuBLAS handles and workspaces before the capture
            self._advance()
        torch.cuda.current_stream().wait_stream(stream)
        # The warm-up wrote at the first position, which the first real step writes again before reading it.
        for tensor, value in zip((self.cache.index, self.positions, self.keep), saved, strict=True):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), autocast:
            self.logits = self._advance()
        return graph

    def __call__(self, tokens: Tensor) -> Tensor:
        self.tokens.copy_(tokens)
        if self.graph is None:
            return self._advance()
        self.graph.replay()
        return self.logits


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

    With `rows` (the rows decoded together, given when the CPU tricks are on), projections of the same input are
    fused into one oneDNN matmul each (q/k/v, gate/up) where that pays (`cpu.packed_projection`).
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
    """Projections of one input, their outputs joined in `counts` consecutive groups (q/k, v: [2, 1])."""
    starts = [sum(counts[:i]) for i in range(len(counts))]
    sizes = [sum(m.out_features for m in projections[i : i + c]) for i, c in zip(starts, counts, strict=True)]
    fused = None if rows is None else cpu.packed_projection(projections, rows)
    if fused is not None:
        return lambda x: list(fused(x).split(sizes, -1))

    def each(x: Tensor) -> list[Tensor]:
        outs = [m(x) for m in projections]
        return [outs[i] if c == 1 else torch.cat(outs[i : i + c], -1) for i, c in zip(starts, counts, strict=True)]

    return each


def _norm(norm: torch.nn.Module, x: Tensor) -> Tensor:
    """Llama/Qwen2's RMSNorm (`weight * x / sqrt(mean(x^2) + eps)`, in float32), in one call for float32 inputs."""
    if x.dtype != torch.float32:
        return norm(x)
    return torch.nn.functional.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _direct(projection: torch.nn.Module) -> torch.nn.Module:
    """The layer to call for `projection`: with its LoRA merged into the weights or its adapters disabled, peft's
    wrapper has nothing to add."""
    plain = getattr(projection, "merged", False) or getattr(projection, "disable_adapters", False)
    return projection.base_layer if plain else projection


def _rotate_half(x: Tensor) -> Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Decoded(NamedTuple):
    completion_ids: Tensor  # [N, C] the completions, padded after EOS
    logps: Tensor | None  # [N, C] each chosen token's log-prob at the sampling temperature, over the whole vocabulary


# The loop asks the device whether every row has ended (and whether the logits stayed finite) every this many tokens,
# not at every token: each question waits for the GPU to finish all the work queued before it.
CHECK_EVERY = 16


def decode(
    model: torch.nn.Module,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    cache: DynamicCache | StaticCache,
    config: GenerationConfig,
    rows: int | None = None,
) -> Decoded:
    """generate()'s sampling loop for a Llama/Qwen2-family model, one `decode_step` per token.

    `cache` holds the prompts `[N, P]` but their last token: a `DynamicCache`, or a `StaticCache` of room for
    `P - 1 + max_new_tokens` positions, whose steps run as one CUDA graph each on a GPU (`StaticStep`). The same
    logits processors as generate() for `config` (a GenerationConfig) and the model's `min_new_tokens`, the same
    padding after EOS; tokens drawn by `draw` (the distribution `torch.multinomial` samples, other tokens for the
    same seed); without generate()'s per-token bookkeeping. `rows` fuses projections for oneDNN (`decode_layers`).

    Also returns each chosen token's log-prob as the trainer computes it: `log_softmax(logits / temperature)`
    before top-k/top-p and `min_new_tokens` (0 after EOS), to measure how far sampling and training disagree.
    """
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    lm = fast_decode_model(model)
    layers = decode_layers(lm, rows=rows)
    temperature = config.temperature if config.do_sample and config.temperature else 1.0
    warpers = []
    if config.do_sample:
        if config.top_k:
            warpers.append(TopKLogitsWarper(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            warpers.append(TopPLogitsWarper(config.top_p))
    min_new_tokens = effective_config(model, config).min_new_tokens or 0
    device = prompt_ids.device
    eos = torch.tensor(config.eos_token_id, device=device).flatten()  # [E]
    n, p = prompt_ids.shape
    steps = config.max_new_tokens
    step_logits = _step_function(lm, layers, prompt_mask, cache, steps)
    tokens = prompt_ids[:, -1:]  # [N, 1]
    unfinished = torch.ones(n, dtype=torch.bool, device=device)  # [N]
    finite = torch.ones((), dtype=torch.bool, device=device)
    new, logps, alive = [], [], []
    for step in range(steps):
        logits = step_logits(tokens, step).float()  # [N, V]
        finite &= torch.isfinite(logits).all()
        scaled = logits / temperature if temperature != 1.0 else logits  # [N, V]: generate()'s temperature warper
        probs = scaled.softmax(-1)  # [N, V] the trained distribution
        scores = scaled  # [N, V]: what is sampled from, after generate()'s other processors
        if step < min_new_tokens:
            scores = scores.index_fill(1, eos, float("-inf"))
        for warp in warpers:
            scores = warp(prompt_ids, scores)  # [N, V]
        if config.do_sample:
            chosen = draw(probs if scores is scaled else scores.softmax(-1))  # [N, 1]
        else:
            chosen = scores.argmax(-1, keepdim=True)  # [N, 1]
        logps.append(torch.where(unfinished[:, None], probs.gather(1, chosen).log(), 0.0))  # [N, 1]
        chosen = torch.where(unfinished[:, None], chosen, config.pad_token_id)  # [N, 1]
        new.append(chosen)
        unfinished &= ~torch.isin(chosen[:, 0], eos)
        alive.append(unfinished.any())
        if (step + 1) % CHECK_EVERY == 0 or step == steps - 1:
            if not bool(finite):
                raise TTCError(NOT_FINITE)
            if not bool(alive[-1]):
                break
        tokens = chosen
    # generate() stops at the token that ended the last row; the loop may have gone on up to CHECK_EVERY - 1 more.
    length = int(torch.stack(alive).int().argmin()) + 1 if not bool(alive[-1]) else len(new)
    completion = torch.cat(new[:length], dim=1)  # [N, C]
    return Decoded(completion, torch.cat(logps[:length], dim=1))  # [N, C], [N, C]


def _step_function(
    lm: torch.nn.Module, layers: list[DecodeLayer], prompt_mask: Tensor, cache: DynamicCache | StaticCache, steps: int
) -> Callable[[Tensor, int], Tensor]:
    """`(tokens [N, 1], step) -> logits [N, V]` for `decode`: over a `StaticCache` a `StaticStep` (a CUDA graph on a
    GPU), else `_step` over the growing cache with the step's slice of the padding mask."""
    n, p = prompt_mask.shape
    positions = prompt_mask.sum(1, keepdim=True) - 1  # [N, 1]: the last prompt token's
    if isinstance(cache, StaticCache):
        keep = prompt_mask.new_zeros(n, 1, 1, cache.keys[0].size(2), dtype=torch.bool)  # [N, 1, 1, L]
        keep[:, 0, 0, : p - 1] = prompt_mask[:, :-1].bool()
        static = StaticStep(lm, layers, cache, keep, positions)
        return lambda tokens, step: static(tokens)
    padded = not bool(prompt_mask.all())  # with no padding, a query of one token needs no mask
    full = torch.cat([prompt_mask, prompt_mask.new_ones(n, steps)], dim=1).bool()[:, None, None, :]  # [N, 1, 1, P+T]

    def step_logits(tokens: Tensor, step: int) -> Tensor:
        keep = full[..., : p + step] if padded else None  # [N, 1, 1, P+step]
        return _step(lm, tokens, keep, positions + step, cache, layers)[:, -1]

    return step_logits


NOT_FINITE = (
    "sampling: the model's next-token probabilities are not finite (NaN or inf logits): its weights have "
    "diverged (a learning rate too high?) or model.temperature is too small for the logits' range"
)


def draw(probs: Tensor) -> Tensor:
    """One token per row of `probs` `[N, V]`, each with its probability -> `[N, 1]`: by inverting the cumulative sum.

    `torch.multinomial` draws an exponential per vocabulary entry, ten times slower on CPU for a small model's step.
    In float64, with a float64 uniform in [0, 1) scaled by the row's total, the draw stays below the total, and the
    first entry whose cumulative sum exceeds it has a probability above zero. The uniform's dtype is explicit: under
    `bf16-true` the default dtype is bfloat16, whose 8 bits of mantissa would reach only a few hundred tokens. Rows of
    NaN probabilities (which `decode` reports) get the last token rather than an index past the vocabulary.
    """
    cdf = probs.double().cumsum(-1)  # [N, V]
    total = cdf[:, -1:]  # [N, 1]
    u = torch.rand(probs.size(0), 1, device=probs.device, dtype=torch.float64) * total  # [N, 1]
    return torch.searchsorted(cdf, u, right=True).clamp_(max=probs.size(-1) - 1)  # [N, 1]
