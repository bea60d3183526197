"""The policy model: loading (Hub, local or tiny; LoRA, 4-bit), the fused LoRA layer for training, the tiny model."""
