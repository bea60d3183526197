"""Rewards: the reward functions (each a plain callable `fn(completions: list[str], **columns) -> list[float | None]`,
named in configs as `ttc_lightning.rewards.<name>`), the one parser of answers, the patch task's edits, and the
scorer that runs them for a batch (`scoring.py`).

Importing this package loads neither torch nor Lightning: a reward runs in a worker that needs neither.
"""

from ttc_lightning.rewards.classify import char_fraction_reward, format_reward, label_reward
from ttc_lightning.rewards.command import command_reward
from ttc_lightning.rewards.oracle import oracle_reward
from ttc_lightning.rewards.patch import exact_fix_reward, parsed_patch_reward, parses_reward, patch_reward

__all__ = [
    "char_fraction_reward",
    "command_reward",
    "exact_fix_reward",
    "format_reward",
    "label_reward",
    "oracle_reward",
    "parsed_patch_reward",
    "parses_reward",
    "patch_reward",
]
