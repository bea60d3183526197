"""The policy: a causal LM from the Hugging Face Hub, a local directory or `tiny`, in its dtype, with LoRA (peft)
or 4-bit weights (bitsandbytes), its tokenizer and EOS tokens, and the reference the KL penalty compares with."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from ttc_lightning.errors import TTCError
from ttc_lightning.model.lora import fuse_lora
from ttc_lightning.model.tiny import TINY, save_tiny

Prompt = str | list[dict[str, str]]
DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class LoRA:
    """peft LoRA settings."""

    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the LoRA input. 0 keeps the trained policy the one that sampled, and peft's dropout copies every
    adapted layer's input (a slower forward: benchmarks/README.md)."""
    target_modules: str | list[str] = "all-linear"
    """Module names to adapt, or "all-linear" for every linear layer but the output head."""


@dataclass
class Policy:
    """A loaded policy: the model to train, the frozen reference (None when the reference is the policy with its
    adapters disabled, or when there is no KL term), and the tokenizer with every token that ends a completion."""

    model: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: Any
    eos_token_ids: list[int]


def load_tokenizer(path: str, name: str) -> Any:
    """The tokenizer of a model directory or Hub id, with a pad token (its EOS when it has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise TTCError(f"model.model_name_or_path: cannot load the tokenizer of {name!r}: {e}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prompt_limit(path: str, name: str, max_new_tokens: int) -> int | None:
    """The longest prompt the model's context leaves room for: `max_position_embeddings` minus `max_new_tokens`
    (None when the config gives no length). A longer prompt would not fit its positions, and asks for memory in
    proportion to its length."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
    context = getattr(config, "max_position_embeddings", None)
    if not isinstance(context, int):
        return None
    if context <= max_new_tokens:
        raise TTCError(
            f"model.max_new_tokens={max_new_tokens} leaves no room for a prompt: the context of {name!r} is {context} "
            "tokens (max_position_embeddings)"
        )
    return context - max_new_tokens


def materialise(model_name_or_path: str) -> str:
    """ "tiny" -> a temporary directory holding it, so it loads through the same path as any local model."""
    if model_name_or_path != TINY:
        return model_name_or_path
    directory = tempfile.mkdtemp(prefix="ttc-tiny-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    with quiet_transformers():
        return str(save_tiny(directory))


def weights_dtype(name: DType, lora: bool, cuda: bool) -> torch.dtype:
    """ "auto": float32 on CPU (`cuda` False: the run's accelerator, not whether the machine has a GPU) and for full
    fine-tuning, whose AdamW updates round away in half-precision weights; a frozen LoRA base in bfloat16 on GPUs of
    compute capability 8.0 and up (where the precision chosen is bf16-mixed: `cli.auto_precision`; the bf16 that
    `torch.cuda.is_bf16_supported()` also reports on older GPUs is emulated), else in float16."""
    if name != "auto":
        return getattr(torch, name)
    if not cuda or not lora:
        return torch.float32
    return torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16


def load_policy(
    path: str,
    name: str,
    tokenizer: Any,
    *,
    dtype: DType,
    lora: LoRA | None,
    load_in_4bit: bool,
    gradient_checkpointing: bool,
    reference: bool,
    fuse: bool,
    cuda: bool,
    autocast: bool = False,
) -> Policy:
    """Load the policy (and, for full fine-tuning with a KL term, a frozen reference copy) from `path`, for a run on
    a GPU (`cuda`) or the CPU, under a mixed precision's autocast or not."""
    torch_dtype = weights_dtype(dtype, lora is not None, cuda)
    model = load_causal_lm(path, name, tokenizer, torch_dtype, quantize=load_in_4bit)
    if load_in_4bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        # peft makes every parameter left unquantised float32, the frozen embedding and output head too (Qwen2.5's
        # tied 151,936 x 1,536: 933 MB, and autocast casts it back at every decoding step and log-prob chunk). Under
        # autocast they may stay in the compute dtype; without it the float32 hidden states need a float32 head.
        if autocast:
            for embedding in {model.get_input_embeddings(), model.get_output_embeddings()} - {None}:
                embedding.to(torch_dtype)
    if gradient_checkpointing:
        enable_checkpointing(model)
    frozen = None
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as e:  # peft's NoMatchingPeftModuleError among them
            raise TTCError(f"model.lora.target_modules: {e}") from None
        if fuse:
            fuse_lora(model)
    elif reference:
        frozen = load_causal_lm(path, name, tokenizer, torch_dtype, quantize=False).eval().requires_grad_(False)
    model.train()
    return Policy(model, frozen, tokenizer, eos_token_ids(tokenizer, model))


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant autograd checkpointing)."""
    options = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers' newer name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def load_causal_lm(path: str, name: str, tokenizer: Any, dtype: torch.dtype, quantize: bool) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {"dtype": dtype}
    if quantize:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        with quiet_transformers():
            model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise TTCError(f"model.model_name_or_path: cannot load {name!r}: {e}") from None
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if quantize:
        keep_4bit_layout_trainable(model)
    return model


def eos_token_ids(tokenizer: Any, model: torch.nn.Module) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS and the model's generation EOS (e.g. Qwen's two)."""
    ids = {tokenizer.eos_token_id}
    config_eos = model.generation_config.eos_token_id
    ids.update(config_eos if isinstance(config_eos, list) else [config_eos])
    return sorted(i for i in ids if i is not None)


@contextlib.contextmanager
def reference_model(model: torch.nn.Module, reference: torch.nn.Module | None) -> Iterator[torch.nn.Module]:
    """The model whose log-probs the KL penalty compares with: the frozen copy `reference`, or else the policy
    `model` without its adapters (under LoRA the reference is the base model, with no second copy)."""
    if reference is not None:
        yield reference
        return
    with model.disable_adapter():
        yield model


def encode_prompts(tokenizer: Any, prompts: Sequence[Prompt], device: torch.device) -> tuple[Tensor, Tensor]:
    """Left-padded ids and mask `[B, P]`: chat messages through the chat template with the generation prompt,
    strings as they are."""
    texts = [
        p if isinstance(p, str) else tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    return enc["input_ids"].to(device), enc["attention_mask"].to(device)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars: they would interleave with the training progress bar."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def keep_4bit_layout_trainable(model: torch.nn.Module) -> None:
    """bitsandbytes repacks 4-bit weights for CPU inference the first time a layer runs in eval mode (sampling),
    and that layout then fails in the training backward pass: keep the trainable layout."""
    for layer in model.modules():
        if hasattr(layer, "support_avx512bf16_for_cpu"):
            layer.support_avx512bf16_for_cpu = False
