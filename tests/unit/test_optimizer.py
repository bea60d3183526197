"""The optimizer step: the LR schedule, clipping, and the guard (a non-finite loss or gradient norm -> the step is
skipped and counted, weights and optimizer state untouched; too many in a row stop the run)."""

from types import SimpleNamespace

import pytest
import torch

from ttc_lightning.errors import TTCError
from ttc_lightning.module import GRPOModule
from ttc_lightning.training.optimizer import StepGuard, clip_and_step, lr_multiplier, rollout_totals

TOY = "ttc_lightning.rewards.char_fraction_reward"


def test_finite_steps_are_taken():
    guard = StepGuard(limit=3)
    assert [guard.skip(True, step, 0.5, 1.0) for step in range(4)] == [False] * 4
    assert (guard.skipped, guard.in_a_row) == (0, 0)


def test_a_finite_step_ends_the_run_of_skips_but_not_the_count(caplog):
    guard = StepGuard(limit=3)
    # skip, skip, take, skip: 3 skipped in all, never 3 in a row
    decisions = [guard.skip(finite, step, float("nan"), 1.0) for step, finite in enumerate([False, False, True, False])]
    assert decisions == [True, True, False, True]
    assert (guard.skipped, guard.in_a_row) == (3, 1)
    assert "step 3: loss nan, gradient norm 1; optimizer step skipped, weights unchanged (1 in a row" in caplog.text


def test_limit_in_a_row_stops_with_a_clear_message():
    guard = StepGuard(limit=2)
    assert guard.skip(False, 7, 1.0, float("inf"))
    with pytest.raises(TTCError, match=r"training stopped at step 8: 2 optimizer steps in a row .*loss inf"):
        guard.skip(False, 8, float("inf"), float("nan"))


def test_max_skipped_steps_must_be_positive():
    with pytest.raises(TTCError, match="model.max_skipped_steps must be >= 1"):
        GRPOModule(rewards=[TOY], max_skipped_steps=0)


def stub_trainer(decision: bool | None = None, scaler: torch.amp.GradScaler | None = None) -> SimpleNamespace:
    """A trainer whose strategy answers the all-reduced decision: the local one, or `decision` (another rank's)."""

    def reduce_boolean_decision(local: bool, all: bool = True) -> bool:
        return local if decision is None else (local and decision if all else local or decision)

    strategy = SimpleNamespace(reduce_boolean_decision=reduce_boolean_decision)
    return SimpleNamespace(global_step=5, strategy=strategy, precision_plugin=SimpleNamespace(scaler=scaler))


class ScaledAdamW:
    """AdamW stepped as Lightning's 16-mixed precision steps it: through the gradient scaler."""

    def __init__(self, params: list, scaler: torch.amp.GradScaler) -> None:
        self.optimizer, self.scaler = torch.optim.AdamW(params, lr=0.1), scaler
        self.param_groups, self.state = self.optimizer.param_groups, self.optimizer.state

    def step(self) -> None:
        self.scaler.step(self.optimizer)  # unscales, and skips the step when a gradient is not finite
        self.scaler.update()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


def one_step(
    module: GRPOModule, grad: float, loss: float, other_rank: bool | None = None, scale: float | None = None
) -> tuple[torch.optim.AdamW, torch.Tensor]:
    """Gradients `grad` on every trainable weight (times the loss scale under a scaler), the step's loss `loss`, then
    the module's optimizer step: the optimizer and the gradient norm it returned."""
    scaler = None if scale is None else torch.amp.GradScaler("cpu", init_scale=scale)
    if scaler is not None:
        scaler.scale(torch.ones(()))  # as the backward pass did: the scaler's state starts there
    trainer = stub_trainer(other_rank, scaler)
    params = [p for p in module.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=0.1) if scaler is None else ScaledAdamW(params, scaler)
    for p in params:
        p.grad = torch.full_like(p, grad * (scale or 1.0))
    return optimizer, clip_and_step(optimizer, torch.tensor(loss), module.hparams.max_grad_norm, trainer, module.guard)


@pytest.fixture(scope="module")
def module() -> GRPOModule:
    module = GRPOModule(rewards=[TOY], max_skipped_steps=100)
    module.configure_model()
    return module


@pytest.mark.parametrize(
    ("grad", "loss"),
    [(float("nan"), 0.1), (float("inf"), 0.1), (0.01, float("nan")), (0.01, float("inf")), (0.01, float("-inf"))],
    ids=["nan-grad", "inf-grad", "nan-loss", "inf-loss", "minus-inf-loss"],
)
def test_non_finite_step_leaves_weights_and_optimizer_state_untouched(module, grad, loss):
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    skipped = module.guard.skipped
    optimizer, _ = one_step(module, grad, loss)
    after = module.policy.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not optimizer.state  # AdamW never saw a gradient: no moments, no step count
    assert module.guard.skipped == skipped + 1


def test_finite_step_changes_the_weights(module):
    before = {k: v.clone() for k, v in module.policy.named_parameters()}
    one_step(module, 0.01, 0.1)
    assert any(not torch.equal(before[k], p) for k, p in module.policy.named_parameters())


def test_a_step_another_rank_found_non_finite_is_skipped_here_too(module):
    # Finite here, but the all-reduced decision says a rank's loss was not: every rank must skip together.
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    optimizer, _ = one_step(module, 0.01, 0.1, other_rank=False)
    assert not optimizer.state
    assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())


@pytest.mark.parametrize("grad", [float("nan"), 0.01])
def test_under_a_loss_scale_the_norm_is_the_true_one_and_a_skipped_step_changes_nothing(grad):
    # Under 16-mixed the gradients reach the optimizer step multiplied by the loss scale (1024 here): the norm is
    # reported and clipped unscaled, and a skipped step leaves the weights and AdamW's state alone.
    module = GRPOModule(rewards=[TOY], max_skipped_steps=100, max_grad_norm=1e9)
    module.configure_model()
    before = {k: v.clone() for k, v in module.policy.state_dict().items()}
    optimizer, norm = one_step(module, grad, 0.1, scale=1024.0)
    if grad != grad:  # NaN
        assert all(torch.equal(before[k], v) for k, v in module.policy.state_dict().items())
        assert not any(s.get("step", 0) for s in optimizer.state.values()) and module.guard.skipped == 1
        return
    trainable = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    # every gradient entry is 0.01 once unscaled: the norm is 0.01 * sqrt(entries)
    torch.testing.assert_close(norm, torch.tensor(0.01 * trainable**0.5), rtol=1e-4, atol=0)
    assert module.guard.skipped == 0 and any(
        not torch.equal(before[k], v) for k, v in module.policy.state_dict().items()
    )


def test_rollout_totals_count_exactly_under_a_bfloat16_default_dtype():
    # The DAPO loss divides by the rollout's token count; under `bf16-true` the default dtype inside a step is
    # bfloat16, where 3,000 rounds to 3,008 (the nearest multiple of 16 above 2,048).
    mask = torch.ones(6, 500, dtype=torch.long)  # 6 rows x 500 tokens = 3,000
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        totals = rollout_totals(mask, 1.0)
    finally:
        torch.set_default_dtype(default)
    assert totals.tolist() == [6.0, 3000.0]


def test_lr_multiplier_cosine():
    # warmup 2, total 6: 0, 1/2, then cosine over 4 steps: 1, cos(pi/4) curve..., 0 at 6
    assert lr_multiplier(0, "cosine", 2, 6) == 0.0
    assert lr_multiplier(1, "cosine", 2, 6) == 0.5
    assert lr_multiplier(2, "cosine", 2, 6) == 1.0
    assert lr_multiplier(4, "cosine", 2, 6) == pytest.approx(0.5)  # progress 2/4: 0.5 * (1 + cos(pi/2))
    assert lr_multiplier(6, "cosine", 2, 6) == pytest.approx(0.0)
    assert lr_multiplier(100, "cosine", 2, None) == 1.0


def test_lr_multiplier_cosine_stays_at_zero_after_total_steps():
    # progress 1/4: 0.5 * (1 + cos(pi/4)) = 0.5 * 1.70711 = 0.85355
    assert lr_multiplier(3, "cosine", 2, 6) == pytest.approx(0.853553, abs=1e-6)
    # step 8: progress 6/4 would give transformers' 0.5 * (1 + cos(1.5 pi)) = 0.5, rising again; held at 0
    assert lr_multiplier(8, "cosine", 2, 6) == 0.0


def test_lr_multiplier_linear():
    # warmup 2, total 6: 0, 1/2, then (6 - step) / (6 - 2)
    assert lr_multiplier(0, "linear", 2, 6) == 0.0
    assert lr_multiplier(1, "linear", 2, 6) == 0.5
    assert lr_multiplier(2, "linear", 2, 6) == 1.0
    assert lr_multiplier(3, "linear", 2, 6) == pytest.approx(0.75)  # 3 / 4
    assert lr_multiplier(5, "linear", 2, 6) == pytest.approx(0.25)  # 1 / 4
    assert lr_multiplier(6, "linear", 2, 6) == 0.0
    assert lr_multiplier(9, "linear", 2, 6) == 0.0


def test_lr_multiplier_constant():
    assert lr_multiplier(1, "constant", 2, 6) == 0.5  # still warms up
    assert [lr_multiplier(step, "constant", 2, 6) for step in (2, 4, 6, 50)] == [1.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_multiplier_unknown_total_is_flat_after_warmup(schedule):
    assert lr_multiplier(3, schedule, 4, None) == 0.75  # warmup 3 / 4
    assert lr_multiplier(4, schedule, 4, None) == 1.0
    assert lr_multiplier(10_000, schedule, 4, None) == 1.0


def test_lr_multiplier_without_warmup_starts_at_one():
    assert lr_multiplier(0, "linear", 0, 4) == 1.0
    assert lr_multiplier(1, "linear", 0, 4) == 0.75  # (4 - 1) / 4


def test_lr_multiplier_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="schedule must be"):
        lr_multiplier(0, "step", 2, 6)
