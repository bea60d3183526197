import math

import pytest
import torch

from ttc_lightning.training.grpo import (
    accumulation_weight,
    group_advantages,
    grpo_loss,
    informative_groups,
    logprob_mismatch,
    overlong_penalty,
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


def test_informative_groups():
    rewards = torch.tensor(
        [
            [1.0, 1.0, 1.0],  # all right: advantages all 0, dropped
            [1.0, 1.0, 0.0],  # one differs: kept
            [0.25, 0.25, 0.25],  # exact tie of a real-valued reward: dropped
            [0.0, 0.0, 1e-6],  # max 1e-6 != min 0: kept, however small the spread
            [-1.0, -1.0, -1.0],  # all malformed patches: dropped
        ]
    ).reshape(-1)  # [15], G=3
    keep = informative_groups(rewards, 3)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False, True, False]


def test_informative_groups_rejects_partial_groups():
    with pytest.raises(ValueError, match="multiple of group_size=3"):
        informative_groups(REWARDS, 3)


def test_overlong_penalty():
    # L_max 10, buffer 4: free up to 10 - 4 = 6, then (6 - L) / 4 * 0.5
    lengths = torch.tensor([3, 6, 7, 9, 10])
    # 3, 6 -> 0; 7 -> -1/4 * 0.5 = -0.125; 9 -> -3/4 * 0.5 = -0.375; 10 (= L_max, e.g. cut) -> -4/4 * 0.5 = -0.5
    expected = torch.tensor([0.0, 0.0, -0.125, -0.375, -0.5])
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, 0.5), expected)


def test_overlong_penalty_beyond_max_and_whole_range_buffer():
    # beyond L_max: -factor, no further
    assert overlong_penalty(torch.tensor([12]), 10, 4, 1.0).tolist() == [-1.0]
    # buffer = L_max: the penalty starts at once, L=5 -> (0 - 5) / 10 = -0.5; factor 0 switches it off
    torch.testing.assert_close(overlong_penalty(torch.tensor([0, 5]), 10, 10, 1.0), torch.tensor([0.0, -0.5]))
    torch.testing.assert_close(overlong_penalty(torch.tensor([0, 10]), 10, 10, 0.0), torch.tensor([0.0, 0.0]))


@pytest.mark.parametrize(
    ("buffer_length", "factor", "match"),
    [(0, 1.0, "buffer_length"), (11, 1.0, "buffer_length"), (4, -0.5, "penalty_factor")],
)
def test_overlong_penalty_rejects_bad_arguments(buffer_length, factor, match):
    with pytest.raises(ValueError, match=match):
        overlong_penalty(torch.tensor([5]), 10, buffer_length, factor)


# One completion of two tokens whose log-ratios are 0.1 and 0.3: token ratios e^0.1 = 1.10517, e^0.3 = 1.34986,
# sequence ratio e^((0.1 + 0.3) / 2) = e^0.2 = 1.22140.
DRIFTED_OLD = torch.tensor([[-0.1, -0.3]])


def test_sequence_level_ratio_versus_token_level():
    logps = torch.zeros(1, 2)
    token, _ = grpo_loss(logps, DRIFTED_OLD, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0)
    # token level: second token clipped to 1.2 alone: -(1.10517 + 1.2) / 2 = -1.15259
    assert token.item() == pytest.approx(-1.152585, abs=1e-5)
    sequence, stats = grpo_loss(
        logps, DRIFTED_OLD, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0, importance_sampling_level="sequence"
    )
    # sequence level: 1.22140 > 1.2, so the whole completion is clipped: -1.2
    assert sequence.item() == pytest.approx(-1.2)
    assert stats["clip_ratio/high_mean"].item() == 1.0  # both tokens belong to the clipped completion


@pytest.mark.parametrize(
    ("advantage", "epsilon_high", "loss", "grad"),
    [
        (1.0, None, -1.2, 0.0),  # 1.22140 clipped to 1.2: constant, no gradient
        (1.0, 0.28, -1.221403, -0.610701),  # inside 1.28: -s; ds/dlogp_t = s / |y| = 1.22140 / 2
        (-1.0, None, 1.221403, 0.610701),  # -min(-1.22140, -1.2) = 1.22140, unclipped for A < 0
    ],
)
def test_sequence_level_clipping_gradient(advantage, epsilon_high, loss, grad):
    logps = torch.zeros(1, 2, requires_grad=True)
    value, _ = grpo_loss(
        logps,
        DRIFTED_OLD,
        None,
        torch.tensor([advantage]),
        torch.ones(1, 2),
        beta=0.0,
        epsilon_high=epsilon_high,
        importance_sampling_level="sequence",
    )
    assert value.item() == pytest.approx(loss, abs=1e-5)
    value.backward()
    torch.testing.assert_close(logps.grad, torch.full((1, 2), grad), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("loss_type", "expected"), [("dapo", -3.4 / 3), ("grpo", (-1.2 - 1.0) / 2)])
def test_sequence_level_ignores_padding_and_counts_clipped_tokens(loss_type, expected):
    # row 0: s = e^0.2 = 1.22140 -> clipped to 1.2, two tokens; row 1: one token, log-ratio 0 -> s = 1. Row 1's padded
    # slot holds a log-ratio of -5: counted, it would make s = e^(-5 / 2).
    old = torch.tensor([[-0.1, -0.3], [0.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_loss(
        torch.zeros(2, 2),
        old,
        None,
        torch.tensor([1.0, 1.0]),
        mask,
        beta=0.0,
        loss_type=loss_type,
        importance_sampling_level="sequence",
    )
    # dapo: (-1.2 * 2 - 1) / 3 tokens = -1.13333; grpo: mean of the per-sequence means (-1.2, -1)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    # 2 of the 3 real tokens lie in the clipped completion
    assert stats["clip_ratio/high_mean"].item() == pytest.approx(2 / 3)
    assert stats["clip_ratio/region_mean"].item() == pytest.approx(2 / 3)
    assert stats["clip_ratio/low_mean"].item() == 0.0


def test_sequence_level_on_policy_gradient_is_advantage_weighted_mean_logprob_gradient():
    # GSPO's gradient: -1/N sum_i s_i A_i (1 / |y_i|) sum_t grad log pi(y_i,t), with s_i = 1 on-policy.
    # row 0: A = 2, |y| = 2 -> -2 / (2 * 2) = -0.5 per token; row 1: A = -1, |y| = 1 -> +1 / (2 * 1) = 0.5
    expected = torch.tensor([[-0.5, -0.5, 0.0], [0.5, 0.0, 0.0]])
    grads = {}
    for level in ("sequence", "token"):
        logps = LOGPS.clone().requires_grad_()
        loss, _ = grpo_loss(
            logps, logps.detach(), None, ADV, MASK, beta=0.0, loss_type="grpo", importance_sampling_level=level
        )
        assert loss.item() == pytest.approx((-2.0 + 1.0) / 2)
        loss.backward()
        grads[level] = logps.grad
    torch.testing.assert_close(grads["sequence"], expected)
    torch.testing.assert_close(grads["token"], expected)  # on-policy the two levels coincide


def test_sequence_level_gradient_matches_gspo_objective():
    # Off-policy, the paper's clipping ranges: some completions clipped, some not; autograd of grpo_loss
    # against a row-by-row transcription of J_GSPO = 1/N sum_i min(s_i A_i, clip(s_i, 1 - 3e-4, 1 + 4e-4) A_i).
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(6, 5, generator=gen)
    old = base + 1e-3 * torch.randn(6, 5, generator=gen)
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5, 0.7, -0.2])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1] * 5])

    logps = base.clone().requires_grad_()
    loss, _ = grpo_loss(
        logps,
        old,
        None,
        adv,
        mask,
        beta=0.0,
        epsilon=3e-4,
        epsilon_high=4e-4,
        loss_type="grpo",
        importance_sampling_level="sequence",
    )
    loss.backward()

    direct_logps = base.clone().requires_grad_()
    terms, clipped = [], []
    for i in range(6):
        real = mask[i].bool()
        s = torch.exp((direct_logps[i, real] - old[i, real]).mean())
        terms.append(torch.min(s * adv[i], torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * adv[i]))
        clipped.append(bool((s * adv[i] > torch.clamp(s, 1 - 3e-4, 1 + 4e-4) * adv[i]).item()))
    direct = -torch.stack(terms).mean()
    direct.backward()

    assert any(clipped) and not all(clipped)  # both branches of the min are exercised
    torch.testing.assert_close(loss, direct)
    torch.testing.assert_close(logps.grad, direct_logps.grad)


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_all_masked_rows_give_zero_loss_and_gradient(level, loss_type):
    logps = torch.zeros(2, 3, requires_grad=True)
    old = torch.full((2, 3), -0.5)
    mask = torch.zeros(2, 3)
    loss, stats = grpo_loss(
        logps,
        old,
        None,
        ADV,
        mask,
        beta=0.0,
        loss_type=loss_type,
        importance_sampling_level=level,
        tis_cap=2.0,
        sampler_logps=old - 1.0,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert logps.grad.abs().sum().item() == 0.0
    assert all(value.item() == 0.0 for value in stats.values())


def test_rejects_unknown_importance_sampling_level():
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(LOGPS, None, None, ADV, MASK, beta=0.0, importance_sampling_level="token_mean")


# Sampler log-probs ln(1.5) and ln(3) below the trainer's: TIS weights exp(old - sampler) = 1.5 and 3, capped at 2.
SAMPLER = -torch.log(torch.tensor([[1.5, 3.0]]))


@pytest.mark.parametrize(
    ("level", "grad"),
    [
        # token: loss = -(1.5 r_1 + 2 r_2) / 2 with r = 1 -> d/dlogp_t = -w_t / 2 = [-0.75, -1.0]
        ("token", [-0.75, -1.0]),
        # sequence: loss = -s (1.5 + 2) / 2 with s = 1 and ds/dlogp_t = s / 2 -> -3.5 / 4 = -0.875 each
        ("sequence", [-0.875, -0.875]),
    ],
)
def test_truncated_importance_sampling(level, grad):
    # old_logps=None: the trainer's own log-probs (0) are the old ones; the weights must stay constants
    logps = torch.zeros(1, 2, requires_grad=True)
    loss, _ = grpo_loss(
        logps,
        None,
        None,
        torch.tensor([1.0]),
        torch.ones(1, 2),
        beta=0.0,
        importance_sampling_level=level,
        sampler_logps=SAMPLER,
        tis_cap=2.0,
    )
    # -(1.5 + min(3, 2)) / 2 = -1.75
    assert loss.item() == pytest.approx(-1.75)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([grad]))


def test_truncated_importance_sampling_cap_and_kl():
    logps, mask, adv = torch.zeros(1, 2), torch.ones(1, 2), torch.tensor([1.0])
    # a cap of 10 truncates nothing: -(1.5 + 3) / 2 = -2.25
    uncapped, _ = grpo_loss(logps, None, None, adv, mask, beta=0.0, sampler_logps=SAMPLER, tis_cap=10.0)
    assert uncapped.item() == pytest.approx(-2.25)
    # the KL penalty is not reweighted: -1.75 + 0.1 * 0.306853 (k3 of ln 2, as in test_grpo_loss_kl_term)
    ref = logps + math.log(2.0)
    with_kl, _ = grpo_loss(logps, None, ref, adv, mask, beta=0.1, sampler_logps=SAMPLER, tis_cap=2.0)
    assert with_kl.item() == pytest.approx(-1.75 + 0.0306853, abs=1e-6)
    # sampler log-probs without a cap change nothing
    plain, _ = grpo_loss(logps, None, None, adv, mask, beta=0.0)
    ignored, _ = grpo_loss(logps, None, None, adv, mask, beta=0.0, sampler_logps=SAMPLER)
    assert ignored.item() == plain.item() == -1.0


def test_truncated_importance_sampling_weight_is_a_constant():
    # old_logps passed as logps itself, gradient attached: the ratio exp(logps - old) = 1 has zero gradient, so any
    # gradient would come through the weight exp(old - sampler) = 1.5 (its derivative -1.5 / 2 = -0.75): none must.
    logps = torch.zeros(1, 2, requires_grad=True)
    loss, _ = grpo_loss(
        logps, logps, None, torch.tensor([1.0]), torch.ones(1, 2), beta=0.0, sampler_logps=SAMPLER, tis_cap=2.0
    )
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.zeros(1, 2))


@pytest.mark.parametrize(("sampler", "cap"), [(None, 2.0), (SAMPLER, 0.0)])
def test_truncated_importance_sampling_rejects_bad_arguments(sampler, cap):
    with pytest.raises(ValueError, match="tis_cap"):
        grpo_loss(
            torch.zeros(1, 2),
            None,
            None,
            torch.tensor([1.0]),
            torch.ones(1, 2),
            beta=0.0,
            sampler_logps=sampler,
            tis_cap=cap,
        )


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_sequence_level_with_tis_accumulates_like_the_full_batch(loss_type):
    # Sequence ratios are per row, so micro-batches by rows keep the full batch's gradient.
    gen = torch.Generator().manual_seed(3)
    logps = torch.randn(6, 5, generator=gen)
    old = logps + 0.05 * torch.randn(6, 5, generator=gen)
    sampler = old + 0.3 * torch.randn(6, 5, generator=gen)
    adv = torch.randn(6, generator=gen)
    mask = (torch.rand(6, 5, generator=gen) > 0.3).long()
    mask[:, 0] = 1
    kwargs = dict(
        beta=0.0, loss_type=loss_type, max_completion_length=5, importance_sampling_level="sequence", tis_cap=1.5
    )
    full, _ = grpo_loss(logps, old, None, adv, mask, sampler_logps=sampler, **kwargs)
    total_tokens = float(mask.sum())
    accumulated = 0.0
    for rows in (slice(0, 4), slice(4, 6)):
        part, _ = grpo_loss(logps[rows], old[rows], None, adv[rows], mask[rows], sampler_logps=sampler[rows], **kwargs)
        n = logps[rows].size(0)
        accumulated += part * accumulation_weight(loss_type, n, 6, int(mask[rows].sum()), total_tokens, 2)
    torch.testing.assert_close(accumulated, full)


def test_logprob_mismatch():
    train = torch.tensor([[-1.0, -2.0, -3.0]])
    sampler = torch.tensor([[-1.1, -2.0, -9.0]])  # the padded slot's gap of 6 must not count
    mask = torch.tensor([[1, 1, 0]])
    stats = logprob_mismatch(train, sampler, mask)
    # |diff|: (0.1 + 0) / 2 = 0.05; k3 with d = train - sampler = 0.1: e^0.1 - 0.1 - 1 = 0.0051709, / 2 tokens
    assert stats["mismatch/abs_logp_diff"].item() == pytest.approx(0.05, abs=1e-6)
    assert stats["mismatch/kl"].item() == pytest.approx(0.00258546, abs=1e-7)
    # k3 is not symmetric: the other direction, d = -0.1: e^-0.1 + 0.1 - 1 = 0.0048374, / 2 = 0.0024187
    assert logprob_mismatch(sampler, train, mask)["mismatch/kl"].item() == pytest.approx(0.0024187, abs=1e-7)


def test_logprob_mismatch_is_zero_when_equal_or_empty():
    equal = logprob_mismatch(LOGPS, LOGPS.clone(), MASK)
    empty = logprob_mismatch(LOGPS, LOGPS - 1.0, torch.zeros_like(MASK))
    for stats in (equal, empty):
        assert stats["mismatch/abs_logp_diff"].item() == 0.0
        assert stats["mismatch/kl"].item() == 0.0
