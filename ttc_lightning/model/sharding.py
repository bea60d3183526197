"""FSDP2: the policy's weights, gradients and optimizer state sharded across the data-parallel ranks, through
Lightning's `ModelParallelStrategy` (its device mesh reaches `GRPOModule.configure_model`).

Each decoder layer is one unit (its weights gathered just before it runs, freed after), the rest of the model (the
embedding, final norm and output head) the root unit. ttc reaches past a model's `forward` in two places, sampling
(`generate()`) and the training log-probs (the decoder and the output head in chunks); both run as FSDP forward
methods of the root (`register_fsdp_forward_method`), so that the root's weights are gathered for them and its
gradients reduced after them like a `forward`'s.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.utils._pytree import tree_map

from ttc_lightning.errors import TTCError

T = TypeVar("T")
RUN_METHOD = "ttc_run"  # the root's method that runs a function as one FSDP forward


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (or `model` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(lm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers causal LM (`model.layers` in Llama, Qwen2, Mistral and most others)."""
    layers = getattr(getattr(lm, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise TTCError(
            f"FSDP: {type(lm).__name__} keeps no decoder layers in `model.layers`, which ttc shards one by one; "
            "train it with strategy ddp"
        )
    return list(layers)


def shard(model: torch.nn.Module, mesh: DeviceMesh, compute_dtype: torch.dtype | None) -> None:
    """Shard `model` (a policy or a frozen reference) in place over `mesh`: each decoder layer, then the rest.
    `compute_dtype` (bfloat16 under bf16-mixed on a GPU): the gathered weights' dtype, gradients reduced in float32;
    None computes in the weights' own dtype."""
    lm = base_model(model)
    precision = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None)
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, mp_policy=precision)
    # The root keeps its gathered weights from one forward to the next (FSDP2's default for a root) so that sampling
    # gathers them once, not at every new token; `release` frees them after a pass that has no backward.
    fully_shard(lm, mesh=mesh, mp_policy=precision)
    setattr(lm, RUN_METHOD, types.MethodType(_run, lm))
    register_fsdp_forward_method(lm, RUN_METHOD)
    register_fsdp_forward_method(lm, "generate")


def _run(self: torch.nn.Module, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    # FSDP2 hooks the backward pass onto the outputs; an output that is a view could lose that hook to an in-place op.
    return tree_map(
        lambda x: x.clone() if isinstance(x, torch.Tensor) and x._is_view() else x, function(*args, **kwargs)
    )


def fill_strategy_sizes(trainer: Any, model: Any) -> None:
    """ModelParallelStrategy's sizes left at "auto" mean tensor parallelism over a node's devices and data
    parallelism over nodes; ttc shards with FSDP2 over every device (data_parallel_size = devices x nodes,
    tensor_parallel_size 1), so a job script that sets devices and nodes needs no other change. Sizes given that do
    not cover the devices, and what FSDP2 cannot run (`sharding.check_strategy`), are refused here, before Lightning
    starts the processes (which would each say it)."""
    strategy = trainer.strategy  # a Namespace with class_path and init_args, or a name ("ddp")
    class_path = str(strategy.get("class_path") or "") if hasattr(strategy, "get") else ""
    if not class_path.endswith("ModelParallelStrategy") or not hasattr(strategy, "init_args"):
        return
    sizes = strategy.init_args
    if sizes.get("tensor_parallel_size", "auto") == "auto":
        sizes.tensor_parallel_size = 1
    devices = trainer.devices  # "2" from a command line, 2 from a YAML file
    devices = int(devices) if isinstance(devices, str) and devices.isdigit() else devices
    nodes = int(trainer.num_nodes or 1)
    known = isinstance(devices, int) and devices >= 1
    if sizes.get("data_parallel_size", "auto") == "auto":
        if not known:
            raise TTCError(
                f"trainer.devices: {devices!r} with ModelParallelStrategy: give the number of devices of each node "
                "(ttc shards over all of them), or the strategy's data_parallel_size"
            )
        sizes.data_parallel_size = devices * nodes
    elif known and sizes.data_parallel_size * sizes.tensor_parallel_size != devices * nodes:
        raise TTCError(
            f"trainer.strategy: data_parallel_size {sizes.data_parallel_size} x tensor_parallel_size "
            f"{sizes.tensor_parallel_size} must equal the {devices * nodes} devices ({devices} x {nodes} nodes); "
            "leave both out and ttc sets them"
        )
    options = getattr(model, "init_args", model)
    check_strategy(
        sizes.tensor_parallel_size,
        sizes.data_parallel_size * sizes.tensor_parallel_size,
        sizes.get("save_distributed_checkpoint", True) is not False,
        bool(options.get("load_in_4bit")),
        bool(options.get("dynamic_sampling")),
    )


def check_strategy(
    tensor_parallel_size: int, devices: int, distributed_checkpoint: bool, load_in_4bit: bool, dynamic_sampling: bool
) -> None:
    """What ttc needs of a `ModelParallelStrategy` run over `devices` devices, each refusal with what to set
    instead. The CLI checks a config before Lightning starts the processes, so that each refusal is said once."""
    if tensor_parallel_size != 1:
        raise TTCError(
            f"trainer.strategy: ModelParallelStrategy with tensor_parallel_size {tensor_parallel_size}: "
            f"ttc shards with FSDP2 only; set tensor_parallel_size: 1 and data_parallel_size: {devices} "
            "(every device; configs/fsdp.yaml)"
        )
    if distributed_checkpoint:
        raise TTCError(
            "trainer.strategy: ModelParallelStrategy writes a directory of shards as its checkpoint unless "
            "save_distributed_checkpoint: false; set it (ttc's checkpoints are single files, gathered on rank 0)"
        )
    if load_in_4bit:
        raise TTCError(
            "model.load_in_4bit: 4-bit weights cannot be sharded with FSDP2; train QLoRA with strategy ddp (a 4-bit "
            "model fits each GPU), or shard bfloat16 weights (load_in_4bit: false)"
        )
    if dynamic_sampling:
        raise TTCError(
            "model.dynamic_sampling: under FSDP2 every rank must run the same training passes (each gathers the "
            "weights with the others), and dynamic sampling trains a different number of groups on each; turn it off"
        )


def compute_dtype(precision: str, cuda: bool) -> torch.dtype | None:
    """The dtype FSDP2 gathers weights in: bfloat16 on a GPU under a bf16 precision, else the weights' own."""
    return torch.bfloat16 if cuda and precision.startswith("bf16") else None


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(base_model(model), FSDPModule)


def as_forward(model: torch.nn.Module, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`function(*args, **kwargs)`, as a forward of `model`'s root when it is sharded (its weights gathered, its
    gradients reduced in the backward pass); a plain call otherwise."""
    lm = base_model(model)
    if not isinstance(lm, FSDPModule):
        return function(*args, **kwargs)
    result = getattr(lm, RUN_METHOD)(function, *args, **kwargs)
    if not torch.is_grad_enabled():
        release(model)
    return result


def release(model: torch.nn.Module) -> None:
    """Free the sharded `model`'s gathered weights after a pass without a backward (sampling, a reference or
    old-policy pass): FSDP2 frees a root's only after its backward, and the embedding and output head would stay whole
    on every rank until then. A backward frees them itself."""
    lm = base_model(model)
    if isinstance(lm, FSDPModule):
        lm.reshard()


def full_norm(norm: torch.Tensor) -> torch.Tensor:
    """A gradient norm as a plain tensor: `clip_grad_norm_` over sharded gradients returns it as a DTensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
