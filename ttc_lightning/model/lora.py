"""peft LoRA layers that add their update inside one matmul: `base(x) + scaling * B(A(x))` as one `addmm`.

peft computes `B(A(x))`, scales it and adds it to the base output as three tensors the size of the layer's output,
each read and written again in the backward pass. `torch.addmm(base, A(x), B^T, alpha=scaling)` does the same sum
in the matmul's epilogue: the same results and gradients up to float rounding (tested; bit for bit at scaling 2,
the default alpha / r, on the machines measured). Measured in benchmarks/README.md.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import Tensor


def fuse_lora(model: torch.nn.Module) -> int:
    """Give every plain peft `lora.Linear` of `model` the fused forward; returns how many layers took it.

    Per call, anything but one plain LoRA adapter without dropout over an `nn.Linear` (merged, adapters disabled,
    DoRA and other variants, dropout while training, mixed adapter batches, quantized bases) takes peft's forward.
    """
    from peft.tuners.lora import Linear

    fused = 0
    for layer in model.modules():
        if type(layer) is Linear and type(layer.base_layer) is torch.nn.Linear and not layer.fan_in_fan_out:
            layer.forward = types.MethodType(_fused_forward, layer)  # bound, so a deep copy binds to the copy
            fused += 1
    return fused


def _fused_forward(self: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    adapters = self.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    plain = (
        not args
        and not kwargs
        and not self.merged
        and not self.disable_adapters
        and name in self.lora_A
        and name not in self.lora_variant
        and self.lora_B[name].bias is None
        and x.dtype == self.base_layer.weight.dtype
        # peft keeps adapters in float32 over a bf16 base: one matmul needs autocast to bring them to x's dtype
        and (x.dtype == self.lora_A[name].weight.dtype or torch.is_autocast_enabled(x.device.type))
        and (isinstance(self.lora_dropout[name], torch.nn.Identity) or not self.lora_dropout[name].training)
    )
    if not plain:
        return type(self).forward(self, x, *args, **kwargs)
    base = self.base_layer(x)  # [..., out]
    down = torch.nn.functional.linear(x, self.lora_A[name].weight)  # [..., r]
    up = self.lora_B[name].weight  # [out, r]
    flat = base.reshape(-1, base.size(-1)), down.reshape(-1, down.size(-1))  # [M, out], [M, r]
    out = torch.addmm(*flat, up.t(), alpha=self.scaling[name])  # [M, out]
    return out.view(base.shape)  # [..., out]
