"""The limits a GRPO step cannot beat on a machine: its arithmetic at the measured matmul peak, and for decoding the
bytes it must read at the measured memory bandwidth. Benchmarks report each time as a multiple of these.

The counts are of the ideal computation (each prompt once per group, logits only where completion tokens are
predicted, LoRA's few extra products included): a trainer that repeats work, or stores and re-reads more, is
slower than the floor by that much.

    python benchmarks/floor.py          # measure this machine's float32 matmul peak and memory bandwidth
    python benchmarks/floor.py --cuda   # the first GPU's bfloat16 matmul peak and memory bandwidth
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """A decoder-only transformer, as its config.json gives it."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int
    lora_r: int = 0  # LoRA rank on every linear layer of the decoder (0: none)

    @classmethod
    def from_config(cls, config: dict, lora_r: int = 0) -> Shape:
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        return cls(
            config["hidden_size"],
            config["intermediate_size"],
            config["num_hidden_layers"],
            config["num_attention_heads"],
            config["num_key_value_heads"],
            config["vocab_size"],
            head_dim,
            lora_r,
        )

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of one layer's linear layers: q, k, v, o, gate, up, down."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    def layer_flops(self) -> float:
        """Multiply-adds x 2 of one token through every layer's linear layers, LoRA's A and B included."""
        per_layer = sum(2 * a * b + (2 * self.lora_r * (a + b) if self.lora_r else 0) for a, b in self.linears())
        return per_layer * self.layers

    def attention_flops(self, context: float) -> float:
        """One query token attending to `context` positions in every layer: q k^T and the weighted sum of v."""
        return 4 * self.heads * self.head_dim * context * self.layers

    def head_flops(self) -> float:
        """One token's logits."""
        return 2 * self.hidden * self.vocab

    def weight_bytes(self, bytes_per_weight: int) -> float:
        """Every weight a decode step reads: the layers' linear weights and the output head."""
        return (sum(a * b for a, b in self.linears()) * self.layers + self.hidden * self.vocab) * bytes_per_weight

    def kv_bytes(self, positions: float, bytes_per_value: int) -> float:
        return 2 * self.kv_heads * self.head_dim * positions * self.layers * bytes_per_value


@dataclass(frozen=True)
class Machine:
    flops: float  # measured matmul FLOP/s
    bandwidth: float  # measured bytes/s read


def sampling_floor(
    shape: Shape, prompts: list[int], group: int, new_tokens: int, machine: Machine, dtype_bytes: int = 4
) -> float:
    """Seconds: each prompt's pass once, then `new_tokens` decode steps of `len(prompts) * group` rows, each the
    larger of its arithmetic and its reads (the weights once, each prompt's keys/values once, each row's own)."""
    prefill = sum((p - 1) * shape.layer_flops() + shape.attention_flops(p / 2) * (p - 1) for p in prompts)
    seconds = prefill / machine.flops
    rows = len(prompts) * group
    for t in range(new_tokens):
        flops = sum(group * (shape.layer_flops() + shape.head_flops() + shape.attention_flops(p + t)) for p in prompts)
        reads = shape.weight_bytes(dtype_bytes) + shape.kv_bytes(sum(prompts) + rows * t, dtype_bytes)
        seconds += max(flops / machine.flops, reads / machine.bandwidth)
    return seconds


def training_flops(
    shape: Shape,
    prompts: list[int],
    group: int,
    new_tokens: int,
    reference: bool,
    checkpointed: bool,
    weight_gradients: bool = False,
) -> float:
    """FLOPs of one optimizer step's log-prob passes and backward over a rollout (LoRA: no weight gradients of the
    frozen base, whose backward costs one more product; the gradient of the adapters is in `layer_flops`; with
    `weight_gradients`, a full fine-tune's, that product too)."""
    prompt_pass = sum((p - 1) * (shape.layer_flops() + shape.attention_flops(p / 2)) for p in prompts)
    completions = sum(
        group * (new_tokens + 1) * (shape.layer_flops() + shape.attention_flops(p + new_tokens / 2)) for p in prompts
    )
    head = len(prompts) * group * new_tokens * shape.head_flops()
    forward = prompt_pass + completions
    passes = 2 + checkpointed + weight_gradients  # forward, input gradients, recomputed forward, weight gradients
    return (forward * passes + (2 + weight_gradients) * head) + (forward + head if reference else 0.0)


def measure(seconds: float = 1.0, device: str = "cpu") -> Machine:
    """This machine's matmul peak and read bandwidth: on CPU float32 (best of 2048-cube products, a sum over 1 GiB),
    on a GPU bfloat16, the dtype trained in there (best of 8192-cube products, a sum over 4 GiB), timed between
    synchronisations."""
    import torch

    cuda = device == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (2048, torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3 if cuda else 0):  # clocks up, cuBLAS's heuristics chosen
        torch.mm(a, b)
    times = []
    started = time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 3:
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        times.append(time.perf_counter() - t)
    flops = 2 * n**3 / min(times)
    x = torch.ones(1 << (30 if cuda else 28), device=device)  # 4 GiB or 1 GiB of float32
    reads = []
    for _ in range(5):
        sync()
        t = time.perf_counter()
        x.sum()
        sync()
        reads.append(time.perf_counter() - t)
    return Machine(flops, x.nbytes / statistics.median(reads))


if __name__ == "__main__":
    import dataclasses
    import json
    import sys

    m = measure(device="cuda" if "--cuda" in sys.argv else "cpu")
    if "--json" in sys.argv:
        print(json.dumps(dataclasses.asdict(m)))
    else:
        kind = "bfloat16" if "--cuda" in sys.argv else "float32"
        print(f"{kind} matmul peak {m.flops / 1e12:.2f} TFLOP/s, read bandwidth {m.bandwidth / 1e9:.1f} GB/s")
