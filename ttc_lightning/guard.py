"""The optimizer-step guard: a step whose loss or gradient norm is NaN or infinite is skipped, so one bad rollout
cannot turn the weights (and then every checkpoint) into NaN; too many skips in a row stop the run."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from ttc_lightning.errors import TTCError

log = logging.getLogger("ttc")


@dataclass
class StepGuard:
    """Counts skipped optimizer steps: `skipped` in the whole run (logged as `skipped_steps`), `in_a_row` since the
    last step taken. `limit` skips in a row stop training (`model.max_skipped_steps`)."""

    limit: int
    skipped: int = 0
    in_a_row: int = 0

    def skip(self, finite: bool, step: int, loss: float, grad_norm: float) -> bool:
        """Whether optimizer step `step` must be skipped. `finite` must be the same on every rank (under DDP, the
        all-reduced decision): ranks that disagreed would step different weights."""
        if finite:
            self.in_a_row = 0
            return False
        self.skipped += 1
        self.in_a_row += 1
        what = f"loss {loss:.4g}, gradient norm {grad_norm:.4g}"
        if self.in_a_row >= self.limit:
            raise TTCError(
                f"training stopped at step {step}: {self.in_a_row} optimizer steps in a row had a NaN or infinite "
                f"loss or gradient norm ({what}), so the weights were left as they were. Check the reward functions' "
                "values (rollouts.jsonl) and model.learning_rate; raise model.max_skipped_steps to tolerate more"
            )
        log.warning(
            "step %d: %s; optimizer step skipped, weights unchanged (%d in a row, the run stops at %d)",
            step,
            what,
            self.in_a_row,
            self.limit,
        )
        return True
