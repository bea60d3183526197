import pytest
import torch
from transformers.cache_utils import DynamicLayer

from ttc_lightning.module import GRPOModule, LoRA
from ttc_lightning.sampling import GrowingLayer, merged_lora

TOY = "ttc_lightning.rewards.char_fraction_reward"


def test_growing_layer_returns_what_concatenation_would():
    torch.manual_seed(0)
    growing, plain = GrowingLayer(capacity=6), DynamicLayer()
    chunks = [torch.randn(2, 3, n, 4) for n in (3, 1, 1)]  # a prefill of 3 positions, then one token at a time
    for k in chunks:
        expected = plain.update(k, k + 1)
        got = growing.update(k, k + 1)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    buffer = growing.buffers[0]
    assert buffer.size(-2) == 6  # allocated once, with room for the whole generation
    # Reshaped from outside (each prompt's row copied to its samples): the next token is written to a new buffer.
    growing.batch_repeat_interleave(2)
    plain.batch_repeat_interleave(2)
    for k in [torch.randn(4, 3, 1, 4) for _ in range(3)]:  # the third one goes past the capacity of 6
        expected, got = plain.update(k, k), growing.update(k, k)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert growing.get_seq_length() == 8


def lora_module(dtype: str = "auto") -> GRPOModule:
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4), dtype=dtype)
    module.configure_model()
    torch.manual_seed(0)
    for name, param in module.policy.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, which would make merging a no-op
            torch.nn.init.normal_(param, std=0.5)
    return module


def base_weights(module: GRPOModule) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.policy.named_parameters() if "base_layer.weight" in n}


def test_merged_lora_gives_the_same_outputs_and_restores_the_weights():
    module = lora_module()
    ids = torch.randint(3, 200, (2, 9))
    before, weights = module.policy(input_ids=ids).logits, base_weights(module)
    cycles = 20
    for _ in range(cycles):
        with merged_lora(module.policy, enabled=True):
            merged = module.policy(input_ids=ids).logits
            merged_weights = base_weights(module)
    torch.testing.assert_close(merged, before, atol=1e-5, rtol=1e-5)
    # w -> w + d -> (w + d) - d rounds twice, each time by at most half a unit in the last place of the larger of
    # |w|, |w + d| (eps/2 relative, eps = 1.2e-7): after 20 cycles each weight is within 20 * eps * (|w| + |w + d|).
    eps = torch.finfo(torch.float32).eps
    for name, now in base_weights(module).items():
        bound = cycles * eps * (weights[name].abs() + merged_weights[name].abs())
        assert ((now - weights[name]).abs() <= bound).all(), name
        assert not torch.equal(merged_weights[name], weights[name])  # the adapters were really folded in
    assert not any(getattr(m, "merged", False) for m in module.policy.modules())


def test_merged_lora_unmerges_when_sampling_fails():
    module = lora_module()
    with pytest.raises(RuntimeError), merged_lora(module.policy, enabled=True):
        assert any(getattr(m, "merged", False) for m in module.policy.modules())
        raise RuntimeError("generation failed")
    assert not any(getattr(m, "merged", False) for m in module.policy.modules())


@pytest.mark.parametrize(("dtype", "merges"), [("auto", True), ("bfloat16", False)])
def test_generate_merges_float32_adapters_only(monkeypatch, dtype, merges):
    module = lora_module(dtype)
    calls = []
    monkeypatch.setattr(
        type(module.policy), "merge_adapter", lambda self, *a, **k: calls.append("merge"), raising=False
    )
    monkeypatch.setattr(
        type(module.policy), "unmerge_adapter", lambda self, *a, **k: calls.append("unmerge"), raising=False
    )
    module.generate(["a prompt"], num_samples=2, temperature=1.0, max_new_tokens=3)
    assert calls == (["merge", "unmerge"] if merges else [])


def test_a_model_that_asks_for_its_own_cache_samples_without_the_shared_prompt_pass():
    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    module.policy.generation_config.cache_implementation = "static"  # generate() would refuse a cache of ours
    calls = []
    module.policy.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    _, _, ids, _, texts = module.generate(["a prompt", "another one"], num_samples=2, temperature=1.0, max_new_tokens=3)
    assert len(texts) == 4 and ids.size(0) == 4
    assert calls[0][0] == 4  # every row ran its whole prompt
