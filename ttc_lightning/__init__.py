"""ttc: GRPO reinforcement learning for code LLMs that reason about software vulnerabilities."""

import importlib
from typing import Any

# Loaded on first use, so that `ttc_lightning.rewards` imports without torch and Lightning.
_HOMES = {
    "GRPOModule": "module",
    "Levers": "levers",
    "LoRA": "model.loading",
    "OverlongBuffer": "training.rollout",
    "Rollout": "training.rollout",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(f"ttc_lightning.{_HOMES[name]}"), name)
    raise AttributeError(f"module 'ttc_lightning' has no attribute {name!r}")
