"""CPU-only tricks, all of them: glibc's allocator settings, oneDNN's packed float32 matmuls, PyTorch's CPU
flash-attention kernel (which returns the log-sum-exp), and the thresholds measured on the benchmark machine.

Nothing here runs on a GPU. The rest of ttc calls these only when `Levers.cpu` is on and the tensors are on the
CPU (`enabled`); with the switch off, or on any other device, the plain PyTorch path computes the same values.
"""

from __future__ import annotations

import contextlib
import ctypes
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

# Weights per layer from which oneDNN's packed matmul beats the default at 16-32 rows (measured: benchmarks/README.md;
# smaller layers lose to the call's overhead).
PACK_MIN_WEIGHTS = 1 << 17

# Bytes of prompt keys/values per layer that copying to a group's rows would add, from which sharing them pays on
# CPU: below it the extra operations of the shared attention cost more than reading the copies (measured:
# benchmarks/README.md).
SHARE_MIN_BYTES = 2 << 20


def enabled(switch: bool, device: torch.device) -> bool:
    """Whether the CPU tricks apply: the user's switch (`Levers.cpu`) and a CPU device."""
    return switch and device.type == "cpu"


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed memory for the next allocation instead of handing it back to the OS.

    A training step on CPU frees and reallocates activations of many megabytes; by default glibc unmaps or trims
    them, and every reuse then faults its pages in again, zeroed by the kernel (measured in benchmarks/README.md;
    peak memory unchanged). Process-wide. Returns whether glibc took it (False on other C libraries and other
    systems, where nothing changes).
    """
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit; bigger blocks are still mapped on their own.
    return bool(mallopt(M_TRIM_THRESHOLD, 1 << 30)) and bool(mallopt(M_MMAP_THRESHOLD, 32 << 20))


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
def packed_linears(model: torch.nn.Module, rows: int) -> Iterator[None]:
    """Run every large `nn.Linear` of a float32 CPU model on a copy of its weight in oneDNN's blocked layout.

    Decoding multiplies each weight by a handful of rows per token; the default float32 path (MKL) is slow at that
    shape, oneDNN on a weight reordered once for `rows` rows is not (benchmarks/README.md). Below
    `PACK_MIN_WEIGHTS` weights the oneDNN call costs more than it saves, and the layer is left as it is. Same
    float32 arithmetic, another summation order. Costs a copy of the weights for the duration, taken when entered,
    so weights changed inside (training) would not be seen: calls with gradients or under autocast take the
    module's own path.
    """
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


def _packed_forward(linear: torch.nn.Linear, packed: Tensor) -> Callable[[Tensor], Tensor]:
    plain = linear.forward
    bias = None if linear.bias is None else linear.bias.detach()

    def forward(x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or torch.is_autocast_enabled("cpu") or x.dtype != torch.float32:
            return plain(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    return forward


def packed_projection(projections: list[torch.nn.Linear], rows: int) -> Callable[[Tensor], Tensor] | None:
    """One oneDNN matmul over the stacked weights of plain float32 CPU linear layers that read the same input
    (q/k/v, gate/up). None where it does not pay (below `PACK_MIN_WEIGHTS`) or apply. The stacked weight is a copy.
    """
    weights = [m.weight for m in projections]
    plain = (
        all(type(m) is torch.nn.Linear and not hasattr(m, "_hf_hook") for m in projections)
        and len({(w.dtype, w.device) for w in weights}) == 1
        and len({m.bias is None for m in projections}) == 1
    )
    if not plain or sum(w.numel() for w in weights) < PACK_MIN_WEIGHTS or not can_pack(projections[0]):
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(torch.cat([w.detach() for w in weights]), rows)  # [outs, in]
    bias = None if projections[0].bias is None else torch.cat([m.bias.detach() for m in projections])
    return lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def share_pays(copy_bytes: int) -> bool:
    """On CPU, whether sharing a prompt's keys/values beats copying them (`SHARE_MIN_BYTES`)."""
    return copy_bytes >= SHARE_MIN_BYTES


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float) -> tuple[Tensor, Tensor]:
    """PyTorch's CPU flash-attention kernel, which also returns each query's log-sum-exp -> `[B, H, L, D]`,
    `[B, H, L]`; the same values as `kv_cache.attention_with_lse` without its `[B, H, L, S]` score tensor."""
    attention: Any = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    return attention(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
