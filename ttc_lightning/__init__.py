"""ttc: GRPO reinforcement learning for code LLMs that reason about software vulnerabilities."""

from typing import Any

__all__ = ["GRPOModule", "LoRA", "Rollout"]


def __getattr__(name: str) -> Any:
    # Lazy: `ttc_lightning.patch` and `ttc_lightning.rewards` stay importable without loading torch and Lightning.
    if name in __all__:
        from ttc_lightning import module

        return getattr(module, name)
    raise AttributeError(f"module 'ttc_lightning' has no attribute {name!r}")
