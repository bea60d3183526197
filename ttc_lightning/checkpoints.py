"""What a ttc checkpoint holds beyond Lightning's own: only the weights training changed (the LoRA adapters, or the
policy without its frozen reference), the base model it was trained on, and the random states sampling needs."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from ttc_lightning.errors import TTCError

REFERENCE_PREFIX = "ref_model."


def trim_state(state: dict[str, Any], trainable: set[str], lora: bool) -> dict[str, Any]:
    """The state dict to save: the trainable weights under LoRA, the policy otherwise, never the reference."""
    if lora:
        return {k: v for k, v in state.items() if k in trainable}
    return {k: v for k, v in state.items() if not k.startswith(REFERENCE_PREFIX)}


def ttc_section(model_name_or_path: str, lora: bool) -> dict[str, Any]:
    """The checkpoint's "ttc" section."""
    # Lightning does not save RNG states; sampling after a resume must continue the same random stream.
    return {"model_name_or_path": model_name_or_path, "lora": lora, "rng": rng_states()}


def complete_state(checkpoint: dict[str, Any], current: dict[str, Any], trainable: set[str], lora: bool) -> None:
    """Check a checkpoint against this model and fill in what was not saved (frozen weights), in place, so that
    Lightning's loading is complete; restores the random states."""
    if "ttc" not in checkpoint:
        raise TTCError("--ckpt_path: this checkpoint was not written by ttc (it has no 'ttc' section)")
    if checkpoint["ttc"]["lora"] != lora:
        raise TTCError(
            "--ckpt_path: the checkpoint was trained "
            + ("with" if checkpoint["ttc"]["lora"] else "without")
            + " LoRA but model.lora is "
            + ("set" if lora else "null")
            + "; use the same model settings as the run that wrote it"
        )
    if "rng" in checkpoint["ttc"]:
        set_rng_states(checkpoint["ttc"]["rng"])
    if not lora:
        # The frozen reference is never saved: it is the base model, loaded again when the model is configured.
        reference = {k: v for k, v in current.items() if k.startswith(REFERENCE_PREFIX)}
        checkpoint["state_dict"] = {**reference, **checkpoint["state_dict"]}
        return
    unknown = sorted(set(checkpoint["state_dict"]) - trainable)
    if unknown:
        raise TTCError(
            f"--ckpt_path: {len(unknown)} checkpoint weights do not match this model's LoRA layers "
            f"(first: {unknown[0]}); check model.lora and model.model_name_or_path"
        )
    # Frozen base weights are not in the checkpoint: put the current ones back so loading is complete.
    frozen = {k: v for k, v in current.items() if k not in trainable}
    checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}


def rng_states() -> dict[str, Any]:
    """The states of every random generator sampling and shuffling use."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    # Plain lists and tensors only, so the checkpoint also loads with torch.load(weights_only=True).
    numpy_state = [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]
    states = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
