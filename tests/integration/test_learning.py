"""GRPO must learn: with a reward for emitting "a", the tiny model's reward climbs within a few dozen steps."""

import pytest

from tests.helpers import TINY, assert_trained_groups_differ, read_metrics, read_rollouts, tied_prompts

HERE = "tests.integration.test_learning"


def tie_or_char_fraction(completions: list[str], tie: list[bool], **_) -> list[float]:
    """0 for a `tie` prompt's completions (`tied_prompts`); else the share of "a" characters (learnable, as the demo's
    reward)."""
    return [
        0.0 if t else (text.count("a") / len(text) if text else 0.0) for text, t in zip(completions, tie, strict=True)
    ]


@pytest.mark.slow
def test_reward_rises_on_a_learnable_toy_task(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
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


@pytest.mark.slow
def test_dynamic_sampling_trains_on_no_tied_group_and_the_reward_rises(run_ttc, tmp_path):
    # Half the prompts always tie (reward 0 for every completion); on the others the reward is the share of "a".
    # Early on most of those tie too (a random policy rarely writes an "a"), so steps need several rounds.
    steps = 20
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        *("--seed_everything", "0", "--trainer.max_steps", str(steps), "--trainer.default_root_dir", "run"),
        *("--trainer.enable_progress_bar", "false", "--data.train_path", str(tied_prompts(tmp_path))),
        *("--model.rewards", f"[{HERE}.tie_or_char_fraction]", "--model.dynamic_sampling", "true"),
        *("--model.learning_rate", "0.01", "--model.lr_scheduler", "constant"),
    )
    assert code == 0, err
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == steps
    records = read_rollouts(tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl")
    assert assert_trained_groups_differ(records, g=8) > 0
    assert {int(r["step"]) for r in records if r["trained"]} == set(range(1, steps + 1))  # every step trained
    assert max(float(row["sampling_rounds"]) for row in rows) > 1
    assert sum(float(row["frac_reward_zero_std"]) for row in rows) / steps > 0.25  # before filtering: many ties
    # The mean reward of every completion sampled (the ties' 0 included) rises.
    rewards = [float(row["reward"]) for row in rows]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert first < 0.05
    assert last > first + 0.15, rewards
