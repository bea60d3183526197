"""GRPO must learn: with a reward for emitting "a", the tiny model's reward climbs within a few dozen steps."""

import pytest

from tests.conftest import REPO
from tests.integration.test_fit import read_metrics


@pytest.mark.slow
def test_reward_rises_on_a_learnable_toy_task(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        str(REPO / "tests" / "integration" / "tiny.yaml"),
        "--seed_everything",
        "0",
        "--trainer.max_steps",
        "60",
        "--trainer.default_root_dir",
        "run",
        "--trainer.enable_progress_bar",
        "false",
    )
    assert code == 0, err
    rewards = [float(row["reward"]) for row in read_metrics(tmp_path / "run")]
    assert len(rewards) == 60
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    # a random byte-level policy emits "a" about 1 time in 259 (reward ~0.004); a learning one far more often
    assert first < 0.1
    assert last > first + 0.2, rewards
