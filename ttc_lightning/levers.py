"""The speed levers' switches, one config section (`model.levers`), each documented once."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Levers:
    """Speed levers. Each computes what the plain path computes (tested against it) and is on by default; turn one
    off to measure what it gives or to rule it out. Which ones apply to a run is logged when fit starts."""

    prompt_once: bool = True
    """One pass per distinct prompt, not one per completion: before sampling (its KV cache goes to the group's G
    rows) and in the training log-probs (the group's completions attend to its keys/values)."""
    share_cache: bool = True
    """While decoding, a group's rows read one copy of their prompt's keys/values instead of G copies (ttc's decoding
    loop only; on CPU from 2 MB of keys/values per layer, below which copying is faster). Not on a GPU, where the
    decoding step runs as a CUDA graph (`cuda_graph`) over copied keys/values instead."""
    merge_lora: bool = True
    """Sample with the LoRA update merged into the weights (one matmul per layer, not three): in place for float32
    weights, into a temporary copy for bfloat16/float16 (so the trained weights never drift); not with 4-bit."""
    decode_loop: bool = True
    """ttc's own decoding loop for Llama/Qwen2-family models instead of `generate()`: the same tokens for the same
    random draws, with far less per-token Python."""
    cuda_graph: bool = True
    """On a GPU: ttc's decoding loop over a fixed-shape KV cache, each token's step (every layer and the output head)
    replayed as one captured CUDA graph rather than thousands of kernel launches. Not with 4-bit weights."""
    fuse_lora: bool = True
    """In training, LoRA's update inside the base layer's matmul (one `addmm`) instead of peft's three tensors."""
    cpu: bool = True
    """On CPU only: oneDNN's packed float32 matmuls and CPU flash attention for sampling, and glibc keeping freed
    memory for the next step (all in ttc_lightning/cpu.py). No effect on other devices."""
