"""Per-token log-probs of sampled completions under a model: the training forward, the reference's and the old
policy's. Each group's prompt runs once, also under gradient checkpointing, and the output head runs in chunks of
tokens, so no `[rows, tokens, vocabulary]` logits tensor exists, forward or backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from transformers.modeling_layers import GradientCheckpointingLayer

from ttc_lightning.model.sharding import is_sharded
from ttc_lightning.sampling.decoding import fast_decode_model
from ttc_lightning.sampling.fast import transformers_refusal
from ttc_lightning.sampling.kv_cache import cache_keyword, prefill, prefix_cache, recording_cache, select_rows
from ttc_lightning.training.rollout import Rollout

# Float32 logits per chunk of the output head: bounds the log-prob step's memory whatever the vocabulary (220 tokens
# of Qwen2.5's 151,936 entries at a time; 4,096 of an 8,192-entry vocabulary). Smaller chunks make slower matmuls.
LOGITS_CHUNK_BYTES = 128 << 20
# transformers' decoder layers keep a cache under gradient checkpointing when they only read it (newer versions).
CHECKPOINTS_WITH_CACHE = hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache")


def training_passes(model: torch.nn.Module, lever: bool, checkpointed: bool) -> str:
    """The run's line on the training passes of `model`: one per distinct prompt, or one per completion and why (the
    lever `model.levers.prompt_once` off, a transformers release ttc's cache layers were not tested with, a model
    whose cache is not all full-attention layers, another family under gradient checkpointing)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    known = fast_decode_model(lm) is not None
    why = None
    if not lever:
        why = "the lever is off"
    elif transformers_refusal():
        why = transformers_refusal()
    elif not known and checkpointed:
        why = f"{lm.config.model_type} under gradient checkpointing"
    elif not known and is_sharded(lm):
        why = f"{lm.config.model_type} sharded by FSDP2"
    elif known and recording_cache(lm.config) is None:
        why = "the model's cache has layers other than full attention"
    elif known and checkpointed and not CHECKPOINTS_WITH_CACHE:
        why = "this transformers release drops a cache under gradient checkpointing"
    if why is None:
        return "training log-probs with one pass per prompt"
    return f"training log-probs with one pass per completion ({why})"


def completion_logps(
    model: torch.nn.Module,
    rollout: Rollout,
    *,
    temperature: float,
    prompt_once: bool = True,
    checkpointed: bool = False,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs `[n, C]` of the completion tokens (and their entropies, no gradient), from logits at
    temperature `temperature` (as sampled, and as TRL does).

    With `prompt_once`, rows with the same prompt (a group's completions) share one pass over it: the prompt's keys
    and values are computed once, with gradients, and each row's completion attends to them. The values and gradients
    of each row alone up to summation order (tested), and it skips (G-1)/G of the prompt positions. Under gradient
    checkpointing (`checkpointed`) the caches are written so that recomputing a layer gives the same result.
    """
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if fast_decode_model(lm) is None:  # another family: its head may do more than a matmul (soft-capping, scaling)
        # HF drops a written cache under checkpointing; under FSDP2 its prompt pass could not be linked to the loss
        shared = prompt_once and not ((checkpointed or is_sharded(lm)) and torch.is_grad_enabled())
        return _logps_from_logits(model, rollout, temperature, shared, with_entropy)
    hidden = _completion_hidden(lm, rollout, prompt_once, checkpointed)  # [n, C, E]
    return token_logps(hidden, lm.lm_head, rollout.completion_ids, temperature, with_entropy)


def _completion_hidden(lm: torch.nn.Module, rollout: Rollout, prompt_once: bool, checkpointed: bool) -> Tensor:
    """The decoder's last hidden state at the positions that predict the completion tokens `[n, C, E]`."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [n, P+C]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [n, P+C]
    # Positions as in generate(): left padding must not shift them.
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [n, P+C]
    p, c = rollout.prompt_ids.size(1), rollout.completion_ids.size(1)
    keys = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # [n, 2P]
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # [u, 2P], [n]
    cache = recording_cache(lm.config)
    grad = torch.is_grad_enabled()
    shared = prompt_once and p > 1 and unique.size(0) < len(rollout) and cache is not None
    if not shared or (checkpointed and grad and not CHECKPOINTS_WITH_CACHE):
        hidden = lm.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
        return hidden.last_hidden_state[:, -(c + 1) : -1]  # [n, C, E]
    keyword = cache_keyword(lm)
    with _cache_kept(lm, checkpointed and grad):
        prompt_mask = unique[:, p : 2 * p - 1]  # [u, P-1]: all but the last prompt token, which starts the rest
        prompt = lm.model(
            input_ids=unique[:, : p - 1],
            attention_mask=prompt_mask,
            position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
            use_cache=False,  # the model builds no cache of its own: it writes ours
            **{keyword: cache},
        )
        hidden = lm.model(
            input_ids=input_ids[:, p - 1 :],
            attention_mask=attention_mask,
            position_ids=position_ids[:, p - 1 :],
            use_cache=False,
            **{keyword: prefix_cache(cache, inverse)},
        ).last_hidden_state  # [n, C+1, E]
        if is_sharded(lm) and grad:  # `_ZeroGradientTo` says why
            hidden = _ZeroGradientTo.apply(hidden, prompt.last_hidden_state)  # [n, C+1, E]
    return hidden[:, :-1]  # [n, C, E]: position t predicts completion token t


class _ZeroGradientTo(torch.autograd.Function):
    """`hidden` unchanged, and a zero gradient for `other` in the backward pass. FSDP2 gathers a layer's weights for
    its backward when a gradient reaches the layer's outputs; the prompt pass's last layer hands its keys and values
    to the completions through the cache, and its outputs reach nothing, so without this its weights would stay
    freed while the gradients of its key and value projections are computed."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: Tensor, other: Tensor) -> Tensor:
        ctx.other_shape, ctx.other_dtype = other.shape, other.dtype
        return hidden.view_as(hidden)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, Tensor]:
        return grad, grad.new_zeros(ctx.other_shape, dtype=ctx.other_dtype)


@contextlib.contextmanager
def _cache_kept(lm: torch.nn.Module, checkpointed: bool) -> Iterator[None]:
    """Under gradient checkpointing transformers drops the cache of layers that could write it twice; ours write it
    so that a recomputation is exact (`RecordingLayer`, `PrefixLayer`), so the layers may keep it."""
    layers = [m for m in lm.modules() if isinstance(m, GradientCheckpointingLayer)] if checkpointed else []
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def token_logps(
    hidden: Tensor, head: torch.nn.Module, ids: Tensor, temperature: float, with_entropy: bool = False
) -> tuple[Tensor, Tensor | None]:
    """`log_softmax(head(hidden) / temperature)` at `ids` `[n, C]`, and the entropies, chunk by chunk of tokens.

    A frozen plain linear head (LoRA's case) keeps nothing of a chunk's logits for the backward pass: each token's
    log-prob depends on its own hidden state only, so its gradient there, `((onehot - p) / T) W`, is computed with
    the chunk and the backward pass multiplies it by the incoming gradient (the same product as autograd's, without
    the logits). A trainable head recomputes each chunk's logits in the backward pass instead.
    """
    n, c, e = hidden.shape
    flat, flat_ids = hidden.reshape(n * c, e), ids.reshape(n * c)  # [M, E], [M]
    vocab = head.out_features if isinstance(head, torch.nn.Linear) else head.weight.size(0)
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
    frozen = (
        type(head) is torch.nn.Linear
        and not head.weight.requires_grad
        and (head.bias is None or not head.bias.requires_grad)
    )
    if frozen or not torch.is_grad_enabled():
        logps, entropy = _FrozenHeadLogps.apply(flat, head.weight, head.bias, flat_ids, temperature, chunk)
    else:
        parts = [
            torch.utils.checkpoint.checkpoint(
                _chunk_logps, flat[s : s + chunk], head, flat_ids[s : s + chunk], temperature, use_reentrant=False
            )
            for s in range(0, n * c, chunk)
        ]
        logps, entropy = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logps.view(n, c), entropy.view(n, c) if with_entropy else None


def _chunk_logps(hidden: Tensor, head: torch.nn.Module, ids: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    logits = head(hidden).float() / temperature  # [K, V]
    lse = torch.logsumexp(logits, dim=-1)  # [K]
    with torch.no_grad():
        probs = torch.softmax(logits, dim=-1)  # [K, V]
        entropy = lse - _expected(probs, logits)  # [K]: H = lse - E[z]
    return logits.gather(1, ids.unsqueeze(1)).squeeze(1) - lse, entropy  # [K], [K]


def _expected(probs: Tensor, logits: Tensor) -> Tensor:
    """`E_p[z]` of each row of `probs` and `logits` `[K, V]` -> `[K]`, in float32 without a `[K, V]` product: `bmm`
    is one of autocast's bfloat16 ops, which would round the sum to 8 bits of mantissa."""
    with torch.autocast(probs.device.type, enabled=False):
        return torch.bmm(probs.unsqueeze(1), logits.unsqueeze(2)).view(-1)  # [K]


class _FrozenHeadLogps(torch.autograd.Function):
    """Log-probs and entropies through a frozen linear head, chunked; the backward pass needs only `d logp / d h`."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        ids: Tensor,
        temperature: float,
        chunk: int,
    ) -> tuple[Tensor, Tensor]:
        m = hidden.size(0)
        logps = hidden.new_empty(m, dtype=torch.float32)  # [M]
        entropy = hidden.new_empty(m, dtype=torch.float32)  # [M]
        grad = hidden.new_empty(hidden.shape) if ctx.needs_input_grad[0] else None  # [M, E]
        for s in range(0, m, chunk):
            rows = slice(s, s + chunk)
            logits = torch.nn.functional.linear(hidden[rows], weight, bias).float().div_(temperature)  # [K, V]
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # [K, 1]
            logps[rows] = logits.gather(1, ids[rows].unsqueeze(1)).squeeze(1) - lse.squeeze(1)
            probs = torch.sub(logits, lse).exp_()  # [K, V]
            # H = lse - E_p[z], without a [K, V] product
            entropy[rows] = lse.squeeze(1) - _expected(probs, logits)
            del logits
            if grad is not None:
                # d log p_y / d logits = onehot(y) - p, and logits = h W^T / T
                probs.scatter_add_(1, ids[rows].unsqueeze(1), probs.new_full((probs.size(0), 1), -1.0))  # p - onehot
                grad[rows] = (probs.to(weight.dtype) @ weight).neg_().div_(temperature).to(grad.dtype)  # [K, E]
            del probs  # before the next chunk's logits exist
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_logps: Tensor, _: Tensor) -> tuple:
        (grad,) = ctx.saved_tensors
        return grad_logps.unsqueeze(1).to(grad.dtype) * grad, None, None, None, None, None  # [M, E]


def _logps_from_logits(
    model: torch.nn.Module, rollout: Rollout, temperature: float, prompt_once: bool, with_entropy: bool
) -> tuple[Tensor, Tensor | None]:
    """Models outside the Llama/Qwen2 family: the model's own logits for the completion positions `[n, C+1, V]`."""
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [n, P+C]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [n, P+C]
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [n, P+C]
    p, c = rollout.prompt_ids.size(1), rollout.completion_ids.size(1)
    keys = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # [n, 2P]
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # [u, 2P], [n]
    cache = None
    if prompt_once and p > 1 and unique.size(0) < len(rollout):
        cache = prefill(model, unique[:, : p - 1], unique[:, p : 2 * p - 1])
    start, cached = (0, {}) if cache is None else (p - 1, {cache_keyword(model): cache})
    if cache is not None:
        select_rows(cache, inverse)
    logits = model(
        input_ids=input_ids[:, start:],
        attention_mask=attention_mask,
        position_ids=position_ids[:, start:],
        logits_to_keep=c + 1,
        use_cache=cache is not None,
        **cached,
    ).logits  # [n, C+1, V]
    logits = logits[:, :-1] / temperature  # [n, C, V]
    logps = selective_log_softmax(logits, rollout.completion_ids)  # [n, C]
    return logps, token_entropy(logits) if with_entropy else None


@torch.no_grad()
def frozen_logps(
    logps_of: Callable[[torch.nn.Module, Rollout], tuple[Tensor, Tensor | None]],
    rollout: Rollout,
    micro_batches: Sequence[Tensor],
    old_policy: torch.nn.Module | None,
    reference: Callable[[], contextlib.AbstractContextManager[torch.nn.Module]] | None,
) -> tuple[Tensor | None, Tensor | None]:
    """The old policy's log-probs and the reference's (the model `reference()` lends), `[N, C]` each, computed
    micro-batch by micro-batch without gradients; None for a model not given."""
    old, ref = [], []
    for index in micro_batches:
        part = rollout.rows(index)
        pad = rollout.completion_ids.size(1) - part.completion_ids.size(1)
        if old_policy is not None:
            old.append(torch.nn.functional.pad(logps_of(old_policy, part)[0], (0, pad)))  # [n, C]
        if reference is not None:
            with reference() as model:
                ref.append(torch.nn.functional.pad(logps_of(model, part)[0], (0, pad)))  # [n, C]
    return (torch.cat(old) if old else None), (torch.cat(ref) if ref else None)


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """`log_softmax(logits).gather(index)` without a full `[N, T, V]` float32 log-softmax.

    One row at a time in float32: the chosen token's logit minus the row's logsumexp.
    """
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):  # [T, V], [T]
        row_logits = row_logits.float()  # [T, V]
        chosen = row_logits.gather(-1, row_index.unsqueeze(-1)).squeeze(-1)  # [T]
        rows.append(chosen - torch.logsumexp(row_logits, dim=-1))  # [T]
    return torch.stack(rows)  # [N, T]


@torch.no_grad()
def token_entropy(logits: Tensor) -> Tensor:
    """Entropy of each position's next-token distribution, one row at a time in float32."""
    rows = []
    for row_logits in logits:  # [T, V]
        logp = torch.log_softmax(row_logits.float(), dim=-1)  # [T, V]
        rows.append(-(logp.exp() * logp).sum(-1))  # [T]
    return torch.stack(rows)  # [N, T]
