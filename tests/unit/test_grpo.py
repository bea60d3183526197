import math

import pytest
import torch

from ttc_lightning.grpo import (
    accumulation_weight,
    group_advantages,
    grpo_loss,
    selective_log_softmax,
    token_entropy,
    warmup_cosine_lr,
)

REWARDS = torch.tensor([1.0, 0.0, 2.0, 2.0])  # two groups of G=2: [1, 0] and [2, 2]


def test_group_advantages_group_scale():
    # group [1, 0]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = 0.70711; 0.5 / (0.70711 + 1e-4) = 0.70701
    # group [2, 2]: mean 2, std 0 -> 0 / 1e-4 = 0
    expected = torch.tensor([0.70701, -0.70701, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 2, "group"), expected, atol=1e-5, rtol=0)


def test_group_advantages_batch_scale():
    # batch mean 1.25; squared deviations 0.0625 + 1.5625 + 0.5625 + 0.5625 = 2.75; unbiased var 2.75 / 3
    # std 0.95743; centred by the *group* mean: 0.5 / (0.95743 + 1e-4) = 0.52218
    expected = torch.tensor([0.52218, -0.52218, 0.0, 0.0])
    torch.testing.assert_close(group_advantages(REWARDS, 2, "batch"), expected, atol=1e-5, rtol=0)


def test_group_advantages_no_scale():
    torch.testing.assert_close(group_advantages(REWARDS, 2, "none"), torch.tensor([0.5, -0.5, 0.0, 0.0]))


def test_group_advantages_rejects_partial_groups():
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        group_advantages(REWARDS, 3)


# Two completions, three token slots. Row 0 has 2 real tokens, row 1 has 1.
LOGPS = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -2.0, -2.0]])
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])
ADV = torch.tensor([2.0, -1.0])


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [
        # old = logps -> ratio 1, per-token loss = -A: row 0 -> -2 (x2 tokens), row 1 -> +1 (x1 token)
        ("grpo", (-2.0 + 1.0) / 2),  # mean of the per-sequence means (-2, +1)
        ("bnpo", (-2.0 * 2 + 1.0) / 3),  # token sum / 3 tokens
        ("dapo", (-2.0 * 2 + 1.0) / 3),
        ("dr_grpo", (-2.0 * 2 + 1.0) / (2 * 4)),  # token sum / (N=2 * max_completion_length=4)
    ],
)
def test_grpo_loss_aggregation(loss_type, expected):
    loss, stats = grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.0, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(expected)
    assert "kl" not in stats  # beta 0: no reference, no KL
    assert stats["clip_ratio/region_mean"].item() == 0.0


def test_grpo_loss_kl_term():
    # ref - logp = ln 2 everywhere: k3 = e^ln2 - ln2 - 1 = 2 - 0.693147 - 1 = 0.306853 per token
    ref = LOGPS + math.log(2.0)
    loss, stats = grpo_loss(LOGPS, None, ref, ADV, MASK, beta=0.1, loss_type="dapo")
    assert stats["kl"].item() == pytest.approx(0.306853, abs=1e-6)
    # dapo: -1 (surrogate, above) + 0.1 * 0.306853 per token averaged over tokens
    assert loss.item() == pytest.approx(-1.0 + 0.0306853, abs=1e-6)


def test_grpo_loss_needs_reference_when_beta_positive():
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.1)


def test_clipped_tokens_have_zero_gradient():
    # One sequence, A = +1, two tokens with ratios 1.5 (clipped to 1.2) and 1.1 (inside the range).
    logps = torch.zeros(1, 2, requires_grad=True)
    old = -torch.log(torch.tensor([[1.5, 1.1]]))  # ratio = exp(0 - old) = [1.5, 1.1]
    loss, stats = grpo_loss(logps, old, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0, loss_type="dapo")
    # (-min(1.5, 1.2) - 1.1) / 2 = (-1.2 - 1.1) / 2 = -1.15
    assert loss.item() == pytest.approx(-1.15)
    loss.backward()
    # clipped token: the min picks the constant 1.2 -> no gradient; other: d(-ratio/2)/dlogp = -1.1 / 2
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, -0.55]]))
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(0.5)  # 1 of 2 tokens
    assert stats["clip_ratio/low_mean"].item() == 0.0


def test_low_clip_with_negative_advantage():
    # A = -1, ratio 0.5 < 1 - 0.2: -min(0.5 * -1, 0.8 * -1) = 0.8, flagged low-clipped, no gradient
    logps = torch.zeros(1, 1, requires_grad=True)
    old = -torch.log(torch.tensor([[0.5]]))
    loss, stats = grpo_loss(logps, old, None, torch.tensor([-1.0]), torch.ones(1, 1), beta=0.0)
    assert loss.item() == pytest.approx(0.8)
    loss.backward()
    assert logps.grad.item() == 0.0
    assert stats["clip_ratio/low_mean"].item() == 1.0


def test_epsilon_high_widens_upper_clip():
    # ratio 1.25: clipped at 1.2 with epsilon 0.2, free with epsilon_high 0.28
    logps, old = torch.zeros(1, 1), -torch.log(torch.tensor([[1.25]]))
    symmetric, _ = grpo_loss(logps, old, None, torch.tensor([1.0]), torch.ones(1, 1), beta=0.0)
    higher, _ = grpo_loss(logps, old, None, torch.tensor([1.0]), torch.ones(1, 1), beta=0.0, epsilon_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2)
    assert higher.item() == pytest.approx(-1.25)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_accumulated_micro_batches_equal_full_batch(loss_type):
    gen = torch.Generator().manual_seed(0)
    logps = torch.randn(6, 5, generator=gen)
    ref = torch.randn(6, 5, generator=gen)
    adv = torch.randn(6, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    kwargs = dict(beta=0.05, loss_type=loss_type, max_completion_length=5)
    full, _ = grpo_loss(logps, None, ref, adv, mask, **kwargs)
    total_tokens = float(mask.sum())
    accumulated = 0.0
    for rows in (slice(0, 4), slice(4, 6)):
        part, _ = grpo_loss(logps[rows], None, ref[rows], adv[rows], mask[rows], **kwargs)
        n = logps[rows].size(0)
        accumulated += part * accumulation_weight(loss_type, n, 6, int(mask[rows].sum()), total_tokens, 2)
    torch.testing.assert_close(accumulated, full)


def test_bnpo_averages_micro_batch_losses():
    assert accumulation_weight("bnpo", 4, 6, 10, 20.0, 2) == 0.5


def test_selective_log_softmax_matches_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=gen)
    index = torch.randint(0, 7, (3, 4), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), expected)


def test_token_entropy_of_uniform_is_log_vocab():
    # uniform over 8 tokens: entropy = ln 8 = 2.07944
    torch.testing.assert_close(token_entropy(torch.zeros(2, 3, 8)), torch.full((2, 3), math.log(8)))


def test_warmup_cosine_lr():
    # warmup 2, total 6: 0, 1/2, then cosine over 4 steps: 1, cos(pi/4) curve..., 0 at 6
    assert warmup_cosine_lr(0, 2, 6) == 0.0
    assert warmup_cosine_lr(1, 2, 6) == 0.5
    assert warmup_cosine_lr(2, 2, 6) == 1.0
    assert warmup_cosine_lr(4, 2, 6) == pytest.approx(0.5)  # progress 2/4: 0.5 * (1 + cos(pi/2))
    assert warmup_cosine_lr(6, 2, 6) == pytest.approx(0.0)
    assert warmup_cosine_lr(100, 2, None) == 1.0
