"""Joining, selecting and scoring rollouts: the pieces a step with dynamic sampling or DAPO's overlong shaping adds."""

import math

import pytest
import torch

from ttc_lightning.training.rollout import (
    OverlongBuffer,
    Rollout,
    Round,
    add_overlong_penalty,
    concat_rollouts,
    concat_rounds,
    select_groups,
    step_records,
    training_rollout,
    truncated,
)

PAD, EOS = 0, 2


def rollout(
    prompt_ids: list[list[int]], completion_ids: list[list[int]], reward: list[float], logps: bool = True
) -> Rollout:
    """Prompts left-padded with 0 and completions right-padded with 0 (mask 0 there); one reward column."""
    p = max(map(len, prompt_ids))
    c = max(map(len, completion_ids))
    n = len(reward)
    completion_mask = torch.tensor([[1] * len(row) + [0] * (c - len(row)) for row in completion_ids])
    return Rollout(
        prompt_ids=torch.tensor([[PAD] * (p - len(row)) + row for row in prompt_ids]),
        prompt_mask=torch.tensor([[0] * (p - len(row)) + [1] * len(row) for row in prompt_ids]),
        completion_ids=torch.tensor([row + [PAD] * (c - len(row)) for row in completion_ids]),
        completion_mask=completion_mask,
        completions=[str(row) for row in completion_ids],
        rewards=torch.tensor(reward, dtype=torch.float).unsqueeze(1),
        reward=torch.tensor(reward, dtype=torch.float),
        advantages=torch.zeros(n),
        sampler_logps=-completion_mask.float() if logps else None,
    )


def test_concat_rollouts_pads_prompts_left_and_completions_right():
    # part one: 2 rows, prompts of 1 token, completions up to 3; part two: 1 row, a 3-token prompt, a 1-token completion
    one = rollout([[5], [5]], [[7, 8, EOS], [9]], [1.0, 0.0])
    two = rollout([[4, 4, 4]], [[EOS]], [0.5])
    joined = concat_rollouts([one, two], pad_id=PAD)
    assert joined.prompt_ids.tolist() == [[PAD, PAD, 5], [PAD, PAD, 5], [4, 4, 4]]
    assert joined.prompt_mask.tolist() == [[0, 0, 1], [0, 0, 1], [1, 1, 1]]
    assert joined.completion_ids.tolist() == [[7, 8, EOS], [9, PAD, PAD], [EOS, PAD, PAD]]
    assert joined.completion_mask.tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert joined.sampler_logps.tolist() == [[-1, -1, -1], [-1, 0, 0], [-1, 0, 0]]
    assert joined.reward.tolist() == [1.0, 0.0, 0.5] and joined.rewards.shape == (3, 1)
    assert joined.completions == ["[7, 8, 2]", "[9]", "[2]"]
    assert joined.old_logps is None and joined.ref_logps is None


def test_concat_rollouts_without_sampler_logps_in_one_part_has_none():
    one, two = rollout([[5]], [[7]], [1.0]), rollout([[5]], [[7]], [1.0], logps=False)
    assert concat_rollouts([one, two], PAD).sampler_logps is None


def scored(batch: dict[str, list], rollout: Rollout) -> Round:
    """A round whose task reward is its reward (no overlong penalty)."""
    return Round(batch, rollout, rollout.reward)


def test_rounds_join_and_select_groups_in_order():
    # G = 2: round one has prompts a, b; round two has c. Groups 2 and 0 are picked, in that order.
    one = scored({"prompt": ["a", "b"], "id": [1, 2]}, rollout([[5]] * 4, [[7], [8], [9], [10, 11]], [1, 2, 3, 4]))
    two = scored({"prompt": ["c"], "id": [3]}, rollout([[6, 6]] * 2, [[12], [13]], [5, 6]))
    joined = concat_rounds([one, two], PAD)
    assert joined.batch == {"prompt": ["a", "b", "c"], "id": [1, 2, 3]}
    picked = select_groups(joined, torch.tensor([2, 0]), group_size=2)
    assert picked.batch == {"prompt": ["c", "a"], "id": [3, 1]}
    assert picked.rollout.reward.tolist() == [5, 6, 1, 2]
    assert picked.rollout.completion_ids.tolist() == [[12], [13], [7], [8]]  # trimmed: none of these is 2 long


def test_training_rollout_advantages_of_the_kept_groups_and_truncation_mask():
    # G = 2. Group 0 rewards [1, 0]; group 1 rewards [3, 3]. Only group 0 is trained on: its advantages are
    # (1 - 0.5) / (std 0.70711 + 1e-4) = 0.70701 and the opposite. Its second completion has no EOS (cut).
    sampled = scored({"prompt": ["a", "b"]}, rollout([[5]] * 4, [[7, EOS], [8, 9], [EOS], [EOS]], [1, 0, 3, 3]))
    kept = training_rollout(sampled, torch.tensor([0]), 2, "group", truncated_by=None)
    torch.testing.assert_close(kept.advantages, torch.tensor([0.70701, -0.70701]), atol=1e-5, rtol=0)
    assert kept.completion_mask.tolist() == [[1, 1], [1, 1]]
    masked = training_rollout(sampled, torch.tensor([0]), 2, "group", truncated_by=[EOS])
    assert masked.completion_mask.tolist() == [[1, 1], [0, 0]]  # the cut completion gets no loss
    assert torch.equal(masked.advantages, kept.advantages)
    assert sampled.rollout.completion_mask[1].tolist() == [1, 1]  # the sampled rows keep their mask (metrics)


def test_truncated_is_no_eos_at_the_end():
    ids = torch.tensor([[7, EOS, PAD], [7, 8, 9], [EOS, PAD, PAD]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    assert truncated(ids, mask, [EOS]).tolist() == [False, True, False]


def test_overlong_penalty_is_one_more_reward_column():
    # max_new_tokens 8, buffer 4: lengths 3, 6, 8 -> 0, -(6 - 4) / 4 * 0.5 = -0.25, -0.5
    mask = torch.tensor([[1] * 3 + [0] * 5, [1] * 6 + [0] * 2, [1] * 8])
    scores, reward = torch.tensor([[1.0], [float("nan")], [0.5]]), torch.tensor([1.0, 0.0, 0.5])
    scores, reward = add_overlong_penalty(scores, reward, mask, 8, OverlongBuffer(length=4, penalty=0.5))
    assert scores[:, 1].tolist() == [0.0, -0.25, -0.5]
    assert math.isnan(scores[1, 0]) and scores[2, 0] == 0.5
    assert reward.tolist() == [1.0, -0.25, 0.0]
    same = add_overlong_penalty(scores[:, :1], reward, mask, 8, None)
    assert same[0].shape == (3, 1) and same[1] is reward


@pytest.mark.parametrize("flag", [True, False])
def test_step_records_cover_every_sampled_completion(flag):
    sampled = scored({"prompt": ["a", "b"], "id": ["x", "y"]}, rollout([[5]] * 4, [[7], [8], [9], [10]], [1, 0, 3, 3]))
    kept = training_rollout(sampled, torch.tensor([0]), 2, "none", truncated_by=None)  # advantages 0.5, -0.5
    records = step_records(4, sampled, (torch.tensor([0]), kept), ["r"], 2, flag)
    assert [r["advantage"] for r in records] == [0.5, -0.5, 0.0, 0.0]
    assert [r["id"] for r in records] == ["x", "x", "y", "y"] and {r["step"] for r in records} == {4}
    assert [r.get("trained") for r in records] == ([True, True, False, False] if flag else [None] * 4)
    nothing = step_records(4, sampled, None, ["r"], 2, True)
    assert [r["trained"] for r in nothing] == [False] * 4 and {r["advantage"] for r in nothing} == {0.0}
