"""The plain sampling backend: Hugging Face `generate()`, for any causal LM transformers supports, with nothing of
transformers or peft replaced or reached into."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import GenerationConfig

from ttc_lightning.model.sharding import release
from ttc_lightning.sampling.decoding import Decoded


class GenerateBackend:
    """`generate()` over each prompt repeated for its group's rows. Keeps no log-probs of its own (that would take
    every step's logits), so no sampler/trainer mismatch is measured and `tis_cap` has nothing to correct."""

    name = "generate()"
    keeps_logps = False

    def __init__(self, model: torch.nn.Module, synced: bool = False) -> None:
        self.model = model
        # A sharded model (FSDP2): every rank runs as many forward passes as the one with the longest completions,
        # since each pass gathers weights from all of them.
        self.synced = synced

    def describe(self) -> str:
        return "generate()"

    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, num_samples: int, config: GenerationConfig) -> Decoded:
        """Completions of B prompts `[B, P]`, `num_samples` rows each -> `[N, C]` ids, no log-probs."""
        ids = prompt_ids.repeat_interleave(num_samples, dim=0)  # [N, P]
        mask = prompt_mask.repeat_interleave(num_samples, dim=0)  # [N, P]
        sequences = self.model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, synced_gpus=self.synced
        )  # [N, P+C]
        release(self.model)
        return Decoded(sequences[:, ids.size(1) :], None)  # [N, C]
