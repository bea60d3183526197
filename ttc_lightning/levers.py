"""The speed levers' switches, one config section (`model.levers`), each documented once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Levers:
    """Speed levers, each on by default; turn one off to measure what it gives or to rule it out. Each samples from and
    trains the same distribution as the plain path up to float rounding (tested: the same log-probs for the same
    tokens, the same greedy tokens, the same gradients up to rounding; `merge_lora` says what its rounding leaves).
    Which ones apply to a run is logged when it starts."""

    fast_sampler: bool = True
    """Sample with ttc's backend (its own decoding loop; each prompt's keys/values computed once for its group) for
    Llama/Qwen2-family models with transformers releases it was tested with; off, or for any other model:
    `generate()`. The same distribution, not the same tokens for one seed (another way of drawing them)."""
    prompt_once: bool = True
    """In the training log-probs, one pass per distinct prompt, not one per completion: the group's completions
    attend to its keys/values (Llama/Qwen2-family models, tested transformers releases)."""
    share_cache: bool = True
    """While decoding (fast_sampler), a group's rows read one copy of their prompt's keys/values instead of G copies
    (on CPU from 2 MB of keys/values per layer, below which copying is faster). Not on a GPU, where the decoding step
    runs as a CUDA graph (`cuda_graph`) over copied keys/values instead."""
    merge_lora: bool = True
    """Sample (fast_sampler) with the LoRA update merged into the weights (one matmul per layer, not three): in place
    for float32 weights (restored within about one unit in the last place per merge, not bit for bit), into a
    temporary copy for bfloat16/float16 (the weights never change); not with 4-bit."""
    cuda_graph: bool = True
    """On a GPU (fast_sampler): a fixed-shape KV cache, each token's step (every layer and the output head) replayed as
    one captured CUDA graph rather than thousands of kernel launches. Not with 4-bit weights."""
    fuse_lora: bool = True
    """In training, LoRA's update inside the base layer's matmul (one `addmm`) instead of peft's three tensors."""
    cpu: bool = True
    """On CPU only: oneDNN's packed float32 matmuls and CPU flash attention for sampling (fast_sampler), and glibc
    keeping freed memory for the next step (all in ttc_lightning/cpu.py). No effect on other devices."""
