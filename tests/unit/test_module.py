import io
import math

import pytest
import torch

from ttc_lightning.cli import auto_precision
from ttc_lightning.errors import TTCError
from ttc_lightning.module import GRPOModule, LoRA, Rollout, nan_mean_std, score_completions

TOY = "ttc_lightning.rewards.char_fraction_reward"


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def none_for_empty(completions, **_):
    return [None if not c else 1.0 for c in completions]


def test_score_completions_columns_and_none():
    # 2 prompts x G=2; the second function gives no score for empty completions (NaN in the matrix)
    scores = score_completions(
        [length_reward, none_for_empty], ["length", "nonempty"], ["ab", "", "abc", "a"], {}, group_size=2
    )
    assert scores[:, 0].tolist() == [2.0, 0.0, 3.0, 1.0]
    assert scores[0, 1].item() == 1.0 and math.isnan(scores[1, 1].item())


def test_reward_that_raises_names_function_and_prompt():
    def picky(completions, id, **_):
        if "p1" in id:
            raise KeyError("boom")
        return [0.0] * len(completions)

    with pytest.raises(TTCError, match=r"reward function picky raised KeyError: 'boom' on prompt 1 of the batch"):
        score_completions([picky], ["picky"], ["a", "b", "c", "d"], {"id": ["p0", "p0", "p1", "p1"]}, group_size=2)


def test_reward_with_wrong_length_is_an_error():
    with pytest.raises(TTCError, match=r"short returned 1 values for 4 completions \(2 prompts x 2\)"):
        score_completions([lambda c, **_: [1.0]], ["short"], ["a"] * 4, {}, group_size=2)


def test_reward_with_non_number_names_prompt():
    with pytest.raises(TTCError, match="returned 'x' for completion 1 of prompt 0"):
        score_completions([lambda c, **_: [1.0, "x"]], ["bad"], ["a", "b"], {}, group_size=2)


def test_nan_mean_std_skips_missing_scores():
    mean, std = nan_mean_std(torch.tensor([1.0, float("nan"), 3.0]))
    assert mean.item() == 2.0 and std.item() == pytest.approx(math.sqrt(2.0))  # ((1-2)^2 + (3-2)^2) / 1


@pytest.mark.parametrize(
    ("accelerator", "cuda", "capability", "expected"),
    [
        ("cpu", True, (9, 0), "32-true"),  # an explicit CPU run never gets mixed precision
        ("auto", False, None, "32-true"),
        ("auto", True, (9, 0), "bf16-mixed"),  # Hopper
        ("gpu", True, (8, 0), "bf16-mixed"),  # Ampere
        ("cuda", True, (7, 5), "16-mixed"),  # Turing
        ("auto", True, (6, 0), "16-mixed"),  # Pascal
        ("auto", True, (5, 2), "32-true"),  # Maxwell
    ],
)
def test_auto_precision(monkeypatch, accelerator, cuda, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert auto_precision(accelerator) == expected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_generations": 1}, "num_generations must be >= 2"),
        ({"load_in_4bit": True}, "load_in_4bit needs model.lora"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights has 2 entries for 1 reward functions"),
        ({"eval_num_samples": 4}, "eval_num_samples > 1 needs model.eval_temperature > 0"),
        ({"top_p": 0.0}, "top_p must be in"),
    ],
)
def test_invalid_settings_say_how_to_fix(kwargs, message):
    with pytest.raises(TTCError, match=message):
        GRPOModule(rewards=[TOY], **kwargs)


def test_unknown_reward_path():
    with pytest.raises(TTCError, match=r"model.rewards\[0\]: cannot import 'ttc_lightning.rewards.nope'"):
        GRPOModule(rewards=["ttc_lightning.rewards.nope"])


def test_beta_zero_loads_no_reference():
    module = GRPOModule(rewards=[TOY], beta=0.0)
    module.configure_model()
    assert module.ref_model is None


def test_full_finetuning_with_kl_keeps_a_frozen_copy():
    module = GRPOModule(rewards=[TOY], beta=0.04)
    module.configure_model()
    assert module.ref_model is not None
    assert not any(p.requires_grad for p in module.ref_model.parameters())
    assert module.ref_model is not module.policy


def test_lora_reference_is_the_adapter_free_base():
    module = GRPOModule(rewards=[TOY], beta=0.04, lora=LoRA(r=4))
    module.configure_model()
    assert module.ref_model is None  # no second copy: the reference is the policy with adapters disabled
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_rollout_rows_trims_padding():
    # prompt 0 is left-padded by 2, completion 0 is 1 token, completion 1 is 2 of 3 slots
    rollout = Rollout(
        prompt_ids=torch.tensor([[0, 0, 5], [6, 7, 8]]),
        prompt_mask=torch.tensor([[0, 0, 1], [1, 1, 1]]),
        completion_ids=torch.tensor([[9, 0, 0], [9, 9, 0]]),
        completion_mask=torch.tensor([[1, 0, 0], [1, 1, 0]]),
        completions=["x", "yy"],
        rewards=torch.zeros(2, 1),
        reward=torch.zeros(2),
        advantages=torch.tensor([1.0, -1.0]),
    )
    only_first = rollout.rows(torch.tensor([0]))
    assert only_first.prompt_ids.tolist() == [[5]]  # the two all-padding columns are gone
    assert only_first.completion_ids.tolist() == [[9]]
    assert rollout.rows(torch.tensor([0, 1])).completion_ids.size(1) == 2


def test_checkpoint_restores_the_random_streams():
    import random

    import numpy as np

    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.rand(5), random.random(), np.random.rand()  # the stream moves on, as training would
    module.on_load_checkpoint(checkpoint)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    buffer = io.BytesIO()
    torch.save(checkpoint["ttc"], buffer)
    buffer.seek(0)
    torch.load(buffer, weights_only=True)  # no pickled numpy objects
