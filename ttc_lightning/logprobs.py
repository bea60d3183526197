"""Per-token log-probs of sampled completions under a model: the training forward, the reference's and the old
policy's. Logits only where completion tokens are predicted, and each group's prompt run once."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from ttc_lightning.grpo import selective_log_softmax, token_entropy
from ttc_lightning.kv_cache import cache_keyword, prefill, select_rows
from ttc_lightning.rollout import Rollout


def completion_logps(
    model: torch.nn.Module,
    rollout: Rollout,
    *,
    temperature: float,
    prompt_once: bool = True,
    checkpointed: bool = False,
    with_entropy: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Per-token log-probs `[n, C]` of the completion tokens (and their entropies), logits at temperature
    `temperature` (as sampled, and as TRL does).

    With `prompt_once`, rows with the same prompt (a group's completions) share one pass over it: the prompt's keys
    and values are computed once, with gradients, and each row's completion attends to them. Exact, and it skips
    (G-1)/G of the prompt positions; not with gradients when the model is `checkpointed` (HF models keep no KV
    cache while checkpointing).
    """
    input_ids = torch.cat([rollout.prompt_ids, rollout.completion_ids], dim=1)  # [n, P+C]
    attention_mask = torch.cat([rollout.prompt_mask, rollout.completion_mask], dim=1)  # [n, P+C]
    # Positions as in generate(): left padding must not shift them (matters for absolute position embeddings).
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # [n, P+C]
    p, c = rollout.prompt_ids.size(1), rollout.completion_ids.size(1)
    keys = torch.cat([rollout.prompt_ids, rollout.prompt_mask], dim=1)  # [n, 2P]
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)  # [u, 2P], [n]
    cache = None
    shareable = prompt_once and not (checkpointed and torch.is_grad_enabled())
    if shareable and p > 1 and unique.size(0) < len(rollout):
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
    logits = logits[:, :-1] / temperature  # [n, C, V]: position t predicts completion token t
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
