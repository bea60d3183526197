"""Sampling: the two backends (plain `generate()`, ttc's own) sample from the same distribution, the backend is chosen
whole for a run and says why, and the pieces of ttc's backend (caches, decoding loop, merged LoRA, CPU kernels)."""

import dataclasses

import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from ttc_lightning import cpu
from ttc_lightning.cpu import can_pack, packed_linears
from ttc_lightning.errors import TTCError
from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import LoRA, Policy
from ttc_lightning.model.tiny import build_tiny_model, build_tiny_tokenizer
from ttc_lightning.module import GRPOModule
from ttc_lightning.sampling import decoding, fast
from ttc_lightning.sampling.decoding import decode_step
from ttc_lightning.sampling.fast import merged_lora, plan_for, refusal, transformers_refusal
from ttc_lightning.sampling.hf import GenerateBackend
from ttc_lightning.sampling.kv_cache import (
    GrowingLayer,
    SharedPrefixLayer,
    StaticCache,
    cache_bytes,
    cache_keyword,
    expand_cache,
    prefill,
)
from ttc_lightning.sampling.sampler import Sampler
from ttc_lightning.training.logprobs import training_passes

TOY = "ttc_lightning.rewards.char_fraction_reward"
PROMPTS = ["a", "a prompt", "another, much longer prompt"]  # "a" is one token: nothing before it to cache


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
        with merged_lora(module.policy, "in place"):
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
    with pytest.raises(RuntimeError), merged_lora(module.policy, "in place"):
        assert any(getattr(m, "merged", False) for m in module.policy.modules())
        raise RuntimeError("generation failed")
    assert not any(getattr(m, "merged", False) for m in module.policy.modules())


# The backends and ttc's levers, each configuration against plain generate(): `edit` adjusts ttc's backend the way a
# run on other hardware would (a fixed-shape cache is what a GPU's CUDA graph replays; on CPU the same step runs
# uncaptured), so every path is exercised here.
CONFIGURATIONS = {
    "generate": (Levers(fast_sampler=False), {}),
    "ttc copied cache": (Levers(share_cache=False, merge_lora=False, cpu=False), {}),
    "ttc shared cache": (Levers(merge_lora=False, cpu=False), {}),
    "ttc fixed-shape cache": (Levers(merge_lora=False, cpu=False), {"cuda_graph": True, "share_cache": False}),
    "ttc merged in place": (Levers(cpu=False), {}),
    "ttc merged copy": (Levers(cpu=False), {"merge_lora": "copy"}),
    "ttc CPU kernels": (Levers(), {}),
}


def lora_sampler(levers: Levers, edit: dict) -> Sampler:
    """The tiny policy with LoRA adapters that change its outputs, and a sampler over it."""
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4), levers=levers, top_k=20, top_p=0.9)
    module.configure_model()
    torch.manual_seed(0)
    for name, param in module.policy.named_parameters():
        if "lora_B" in name:  # peft starts B at 0: the adapters would change nothing
            torch.nn.init.normal_(param, std=0.5)
    sampler = module.sampler
    if edit:
        plan = sampler.backend.plan()
        sampler.backend.plan = lambda: dataclasses.replace(plan, **edit)
    return sampler


def plain_greedy(sampler: Sampler, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """generate() on each prompt alone, unmerged adapters, no cache of ttc's: the reference."""
    config = sampler.generation_config(0.0, max_new_tokens)
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            ids = sampler.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = sampler.model.generate(input_ids=ids, generation_config=config)[0, ids.size(1) :].tolist()
            rows.append(out[: next((i + 1 for i, t in enumerate(out) if t in sampler.eos_token_ids), len(out))])
    return rows


def forward_logps(sampler: Sampler, samples, temperature: float) -> torch.Tensor:
    """log_softmax(logits / temperature) of each sampled token under a plain forward of prompt + completion."""
    ids = torch.cat([samples.prompt_ids, samples.completion_ids], 1)  # [N, P+C]
    mask = torch.cat([samples.prompt_mask, samples.completion_mask], 1)  # [N, P+C]
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    p = samples.prompt_ids.size(1)
    with torch.no_grad():
        logits = sampler.model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, p - 1 : -1]
    logps = (logits.float() / temperature).log_softmax(-1)  # [N, C, V]
    return logps.gather(2, samples.completion_ids.unsqueeze(2)).squeeze(2), logits  # [N, C], [N, C, V]


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_every_backend_samples_the_policys_distribution(name):
    levers, edit = CONFIGURATIONS[name]
    sampler = lora_sampler(levers, edit)
    assert sampler.backend.name == ("generate()" if name == "generate" else "ttc")
    # Greedy: each prompt's rows are the tokens plain generate() gives that prompt alone.
    greedy = sampler.sample(PROMPTS, num_samples=2, temperature=0.0, max_new_tokens=10)
    expected = plain_greedy(sampler, PROMPTS, 10)
    for row in range(6):
        length = int(greedy.completion_mask[row].sum())
        assert greedy.completion_ids[row, :length].tolist() == expected[row // 2], (name, row)
    # Sampled at temperature 0.7, top-k 20, top-p 0.9: every token is one the policy's nucleus allows, and the log-prob
    # the sampler kept for it is the trained distribution's (the policy's own forward, unmerged adapters).
    torch.manual_seed(1)
    sampled = sampler.sample(PROMPTS, num_samples=4, temperature=0.7, max_new_tokens=12)
    mask = sampled.completion_mask.bool()
    expected_logps, logits = forward_logps(sampler, sampled, 0.7)
    top20 = logits.topk(20, dim=-1).indices  # [N, C, 20]
    assert (top20 == sampled.completion_ids.unsqueeze(2)).any(2)[mask].all()
    if sampler.backend.keeps_logps:
        tolerance = 0.05 if name == "ttc merged copy" else 1e-4  # copy: float32 here, merged in another order
        torch.testing.assert_close(sampled.logps[mask], expected_logps[mask], atol=tolerance, rtol=tolerance)
        assert (sampled.logps[~mask] == 0).all()
    else:
        assert sampled.logps is None
    assert len({tuple(r) for r in sampled.completion_ids.tolist()}) > 1  # it did sample


def test_a_run_uses_ttcs_backend_only_where_it_was_tested_and_says_why_not():
    config = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=2, pad_token_id=0, top_k=0)
    model = tiny_qwen()
    assert refusal(model, Levers(), config) is None
    assert refusal(model, Levers(fast_sampler=False), config) == "model.levers.fast_sampler is off"
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert "gpt2 is not a Llama/Qwen2-family model" in refusal(gpt2, Levers(), config)
    model.generation_config.cache_implementation = "static"
    assert "asks for a static cache" in refusal(model, Levers(), config)
    model.generation_config.cache_implementation = None
    model.generation_config.no_repeat_ngram_size = 2  # a processor only generate() applies
    assert "logits processors that only generate() applies" in refusal(model, Levers(), config)
    # The transformers releases it was tested with, and no other.
    assert transformers_refusal("5.17.0") is None and transformers_refusal("5.25.0.dev0") is None
    assert "transformers 5.40.0 is outside the releases it was tested with" in transformers_refusal("5.40.0")
    assert transformers_refusal("5.16.1") is not None


def test_a_newer_transformers_samples_and_trains_through_the_plain_paths(monkeypatch):
    monkeypatch.setattr(fast.transformers, "__version__", "5.40.0")
    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    assert isinstance(module.sampler.backend, GenerateBackend) and not module.prompt_once
    line = module.sampler.describe()
    assert line == (
        "sampling with generate() (ttc's backend off: transformers 5.40.0 is outside the releases it was tested with "
        "(5.17 to below 5.26))"
    )
    assert "one pass per completion (transformers 5.40.0" in training_passes(module.policy, True, False)
    samples = module.generate(["a prompt"], num_samples=2, temperature=1.0, max_new_tokens=4)
    assert samples.logps is None and samples.completion_ids.size(0) == 2


def test_the_runs_sampling_line_names_the_backend_and_its_levers(monkeypatch):
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4))
    module.configure_model()
    # On CPU the prompts' cache size decides each call: shared from 2 MB per layer, copied below.
    assert module.sampler.describe() == (
        "sampling with ttc's decoding loop, shared prompt cache (from 2 MB per layer; copied below), "
        "LoRA merged (in place)"
    )  # no "CPU kernels": none of the tiny model's layers is large enough to pack
    monkeypatch.setattr(cpu, "PACK_MIN_WEIGHTS", 0)
    assert module.sampler.describe().endswith(", CPU kernels") == can_pack(module.policy)
    plan = plan_for(module.policy, Levers(), lora=True, quantized=True)
    assert plan.merge_lora == "off" and plan.off == {"merge_lora": "4-bit weights cannot take the adapters"}
    # The levers follow the model as it is when it samples: the module builds the sampler before Lightning moves
    # the model to the run's device (and dtype).
    module.policy.to(torch.bfloat16)
    assert module.sampler.backend.plan().merge_lora == "copy" and not module.sampler.backend.plan().cpu_kernels


def test_small_prompt_caches_are_copied_not_shared_on_cpu(monkeypatch):
    model = tiny_qwen()
    tokenizer = build_tiny_tokenizer()
    sampler = Sampler(Policy(model, None, tokenizer, [2]), Levers(), lora=False, quantized=False, top_p=1.0, top_k=0)
    shared = []
    original = expand_cache
    monkeypatch.setattr(
        "ttc_lightning.sampling.fast.expand_cache", lambda *a, **k: shared.append(a[4]) or original(*a, **k)
    )
    sampler.sample(["a prompt"], num_samples=3, temperature=1.0, max_new_tokens=3)
    assert shared == [False]  # 2 x 16 x 4 bytes per position and layer: far below 2 MB
    monkeypatch.setattr(cpu, "SHARE_MIN_BYTES", 1)
    sampler.sample(["a prompt"], num_samples=3, temperature=1.0, max_new_tokens=3)
    assert shared == [False, True]
    plan = sampler.backend.plan()
    sampler.backend.plan = lambda: dataclasses.replace(plan, share_by_size=False)  # off CPU: shared whatever the size
    monkeypatch.setattr(cpu, "SHARE_MIN_BYTES", 1 << 40)
    sampler.sample(["a prompt"], num_samples=3, temperature=1.0, max_new_tokens=3)
    assert shared == [False, True, True]


def test_a_model_that_asks_for_its_own_cache_samples_through_generate():
    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    module.policy.generation_config.cache_implementation = "static"
    module.sampler = Sampler(
        Policy(module.policy, None, module.tokenizer, module.sampler.eos_token_ids),
        Levers(),
        lora=False,
        quantized=False,
        top_p=1.0,
        top_k=0,
    )
    assert isinstance(module.sampler.backend, GenerateBackend)
    samples = module.generate(["a prompt", "another one"], num_samples=2, temperature=1.0, max_new_tokens=3)
    assert len(samples.texts) == 4 and samples.completion_ids.size(0) == 4


def test_sampling_ignores_the_models_own_repetition_penalty():
    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    prompts = ["a prompt", "another one"]
    expected = module.generate(prompts, num_samples=1, temperature=0.0, max_new_tokens=12).completion_ids
    module.policy.generation_config.repetition_penalty = 100.0  # as a model's shipped generation config might say
    got = module.generate(prompts, num_samples=1, temperature=0.0, max_new_tokens=12).completion_ids
    assert torch.equal(got, expected)


needs_onednn = pytest.mark.skipif(not can_pack(torch.nn.Linear(2, 2)), reason="this torch build has no oneDNN ops")


@needs_onednn
def test_packed_linears_compute_what_the_layers_compute_and_give_them_back():
    torch.manual_seed(0)
    big = torch.nn.Linear(512, 256)  # 131072 weights: packed
    small = torch.nn.Linear(8, 8)  # below PACK_MIN_WEIGHTS: left alone
    hooked = torch.nn.Linear(256, 512, bias=False)
    own_forward = hooked.forward  # a forward set on the instance, as accelerate's hooks do
    hooked.forward = own_forward
    model = torch.nn.ModuleList([big, small, hooked])
    x = torch.randn(16, 1, 512)
    with torch.no_grad():
        expected = hooked(big(x))
        with packed_linears(model, rows=16):
            assert "forward" in vars(big) and "forward" not in vars(small)
            got = hooked(big(x))
            with torch.enable_grad():  # training-time calls take the layer's own path, with gradients
                assert big(x).requires_grad
            with torch.autocast("cpu", dtype=torch.bfloat16):  # and so do calls under autocast
                assert big(x).dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)  # float32, another summation order
    assert not torch.equal(got, torch.zeros_like(got))
    assert "forward" not in vars(big) and hooked.forward is own_forward


def test_packing_needs_a_float32_cpu_model():
    assert not can_pack(torch.nn.Linear(4, 4).to(torch.bfloat16))


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attention_bias=True, rope_scaling={"rope_type": "linear", "factor": 2.0},
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tiny_qwen() -> torch.nn.Module:
    return build_tiny_model(build_tiny_tokenizer(), seed=0).eval()


def check_decode_steps(model: torch.nn.Module, rows: int, layers: list | None = None) -> None:
    """decode_step and the model's own forward, token after token, from prompts with left padding of two lengths."""
    torch.manual_seed(1)
    ids = torch.randint(3, 250, (rows, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = mask[2, :1] = 0
    with torch.no_grad():
        theirs, ours = prefill(model, ids, mask, capacity=14), prefill(model, ids, mask, capacity=14)
        for _ in range(4):
            token = torch.randint(3, 250, (rows, 1))
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = mask.sum(1, keepdim=True) - 1
            kwargs = {cache_keyword(model): theirs}
            expected = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs)
            got = decode_step(model, token, mask, positions, ours, layers)
            torch.testing.assert_close(got, expected.logits, atol=1e-5, rtol=1e-5)
    assert ours.get_seq_length() == theirs.get_seq_length() == 13


@pytest.mark.parametrize("build", [tiny_qwen, tiny_llama])
def test_decode_step_gives_the_logits_of_the_models_own_forward(build):
    check_decode_steps(build(), rows=3)


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.randint(3, 250, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def test_prompts_shared_by_their_rows_give_the_logits_copies_would():
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    # The logits, token after token, padding included (a padded prompt position must get no weight).
    with torch.no_grad():
        copied, shared = prefill(model, ids, mask), prefill(model, ids, mask)
        expand_cache(copied, mask, group=4, capacity=8, share=False)
        expand_cache(shared, mask, group=4, capacity=8, share=True)
        rows_mask = mask.repeat_interleave(4, 0)  # [8, 12]
        for _ in range(3):
            token = torch.randint(3, 250, (8, 1))
            rows_mask = torch.cat([rows_mask, torch.ones_like(token)], dim=1)
            positions = rows_mask.sum(1, keepdim=True) - 1
            expected = decode_step(model, token, rows_mask, positions, copied)
            torch.testing.assert_close(decode_step(model, token, rows_mask, positions, shared), expected)
    layer = shared.layers[0]
    assert isinstance(layer, SharedPrefixLayer) and layer.prompt_keys.size(0) == 2  # each prompt once, not 4 times
    assert shared.get_seq_length() == copied.get_seq_length() == 15
    with pytest.raises(RuntimeError, match="decode_step"):  # the model's own forward cannot read it
        shared.update(layer.prompt_keys, layer.prompt_values, 0)
    one_token = mask.clone()
    one_token[1, :-1] = 0  # a one-token prompt: nothing before its last token to share
    cache = prefill(model, ids[:, :-1], one_token[:, :-1])  # the cache covers all but the last token
    expand_cache(cache, one_token[:, :-1], group=4, capacity=8, share=True)
    assert not isinstance(cache.layers[0], SharedPrefixLayer)
    assert cache_bytes(copied) == 8 * 2 * 15 * 16 * 4 * 2  # rows x heads x positions x head size x 4 bytes x (k, v)


def test_decode_honours_the_models_min_new_tokens_and_stops_as_generate_does():
    model, (ids, mask) = tiny_llama(), padded_prompts()
    model.generation_config.min_new_tokens = 3  # honoured from the model's generation config, as generate() does
    assert decoding.decodes_alone(model)
    eos = int(model(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())  # row 0's greedy first token
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=[eos, 7], pad_token_id=0)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, 12:]
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 22)
        got = decoding.decode(model, ids, mask, cache, config).completion_ids
    assert torch.equal(got, expected)
    assert got[0, :3].ne(eos).all()  # not before the third token
    everything_ends = GenerationConfig(
        do_sample=False, max_new_tokens=10, eos_token_id=list(range(300)), pad_token_id=0
    )
    model.generation_config.min_new_tokens = None
    with torch.no_grad():
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 22)
        decoded = decoding.decode(model, ids, mask, cache, everything_ends)
    assert decoded.completion_ids.size(1) == 1  # one token, then no more steps


def test_the_models_own_sampling_settings_do_not_stop_ttcs_backend():
    # Qwen2.5-Instruct ships temperature 0.7, top-k 20, top-p 0.8 and a repetition penalty of 1.1; ttc sets each of
    # them itself, so generate() would not use the model's either.
    model = tiny_qwen()
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
    assert not decoding.decodes_alone(model)  # generate() without ttc's settings would apply the penalty
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=4, eos_token_id=2
    )
    assert decoding.decodes_alone(model, config) and refusal(model, Levers(), config) is None


def test_bfloat16_adapters_sample_from_a_merged_copy_and_the_weights_stay_bit_for_bit():
    module = lora_module("bfloat16")
    before = base_weights(module)
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        expected = module.policy(input_ids=ids).logits
        with merged_lora(module.policy, "copy"):
            assert all(not getattr(m, "merged", False) for m in module.policy.modules())  # peft's merge not used
            merged = module.policy(input_ids=ids).logits
        after = module.policy(input_ids=ids).logits
    torch.testing.assert_close(merged, expected, atol=0.1, rtol=0.05)  # one bf16 rounding of W + BA vs three products
    assert torch.equal(after, expected)
    assert all(torch.equal(before[n], w) for n, w in base_weights(module).items())  # no drift, however many merges


def decode_both_ways(model, ids, mask, config, group=3):
    """`decode` over a growing cache and over a fixed-shape one (what a CUDA graph replays), the same seed."""
    rows_ids, rows_mask = ids.repeat_interleave(group, 0), mask.repeat_interleave(group, 0)
    results = []
    for static in (False, True):
        with torch.no_grad():
            cache = prefill(model, ids[:, :-1], mask[:, :-1], ids.size(1) + config.max_new_tokens)
            if static:
                cache = StaticCache.from_prefill(cache, group, ids.size(1) - 1 + config.max_new_tokens)
            else:
                expand_cache(cache, mask[:, :-1], group, config.max_new_tokens + 1, share=False)
            torch.manual_seed(5)
            results.append(decoding.decode(model, rows_ids, rows_mask, cache, config))
    return results


@pytest.mark.parametrize("build", [tiny_qwen, tiny_llama])
def test_a_fixed_shape_cache_decodes_the_tokens_and_log_probs_of_a_growing_one(build):
    model, (ids, mask) = build(), padded_prompts()  # row 1 has 5 positions of left padding
    config = GenerationConfig(do_sample=True, max_new_tokens=10, eos_token_id=[2], pad_token_id=0, top_k=0)
    growing, static = decode_both_ways(model, ids, mask, config)
    assert torch.equal(static.completion_ids, growing.completion_ids)  # the same draws: the same tokens
    torch.testing.assert_close(static.logps, growing.logps, atol=1e-5, rtol=1e-5)
    assert static.completion_ids.size(1) == 10


def test_a_fixed_shape_cache_stops_where_generate_stops():
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    eos = int(model(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())  # row 0's greedy first token
    config = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=[eos], pad_token_id=0)
    growing, static = decode_both_ways(model, ids, mask, config, group=1)
    assert torch.equal(static.completion_ids, growing.completion_ids)
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, 12:]
    assert torch.equal(growing.completion_ids, expected)  # checked every 16 tokens, trimmed to where the last row ended


def test_draw_picks_each_token_with_its_probability(monkeypatch):
    torch.manual_seed(0)
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0]]).repeat(10_000, 1)  # [20000, 5]
    tokens = decoding.draw(probs)
    assert tokens.shape == (20_000, 1) and tokens.dtype == torch.long
    first, second = tokens[0::2, 0], tokens[1::2, 0]
    assert (second == 4).all()
    counts = torch.bincount(first, minlength=5)
    assert counts[1] == counts[4] == 0  # never a token of probability 0
    # 10000 draws of p = 0.5, 0.3, 0.2: standard deviations 50, 46 and 40 counts; 4 of them allowed.
    for token, p in ((0, 0.5), (2, 0.3), (3, 0.2)):
        sd = (10_000 * p * (1 - p)) ** 0.5
        assert abs(counts[token] - 10_000 * p) < 4 * sd
    # A uniform draw at the very top of [0, 1) still lands on the last token with probability.
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.full((1, 1), 1 - 2**-24))
    assert decoding.draw(torch.tensor([[0.25, 0.75, 0.0]])).item() == 1


@needs_onednn
def test_fused_packed_projections_give_the_models_logits(monkeypatch):
    monkeypatch.setattr(cpu, "PACK_MIN_WEIGHTS", 0)  # the tiny models' layers are below it
    for model in (tiny_qwen(), tiny_llama()):
        calls = []
        model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_, calls=calls: calls.append(1))
        check_decode_steps(model, rows=6, layers=decoding.decode_layers(model, rows=6))
        assert len(calls) == 2 + 4  # two prefills, the model's own 4 tokens; decode_step used the fused weights


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts the calls that make the host wait for the device: `.item()`, `bool()`, `.tolist()`, `.cpu()`."""

    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.tolist, torch.Tensor.cpu):
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("static", [False, True], ids=["growing", "fixed-shape"])
def test_the_decoding_loop_waits_for_the_device_once_every_16_tokens(static):
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    model.generation_config.min_new_tokens = 64
    config = GenerationConfig(do_sample=True, max_new_tokens=64, eos_token_id=[2], pad_token_id=0, top_k=0)
    with torch.no_grad():
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 80)
        if static:
            cache = StaticCache.from_prefill(cache, 1, 11 + 64)
        counter = SyncCounter()
        with counter:
            decoded = decoding.decode(model, ids, mask, cache, config)
    assert decoded.completion_ids.size(1) == 64
    # 64 tokens: 4 checks of 2 questions (finite? any row left?), the final length, and the padding check
    # of the growing cache's mask once per call: 8 + 1 (+ 1), not 3 per token.
    assert counter.syncs == 4 * 2 + 1 + (0 if static else 1)


def test_nan_logits_in_the_decoding_loop_are_a_clear_error():
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    with torch.no_grad():
        model.lm_head.weight[5] = float("nan")
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 20)
        config = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=[2], pad_token_id=0, top_k=0)
        with pytest.raises(TTCError, match="probabilities are not finite"):
            decoding.decode(model, ids, mask, cache, config)


def test_draw_in_bfloat16_default_dtype_reaches_the_whole_vocabulary():
    # Under `--trainer.precision bf16-true` Lightning makes bfloat16 the default dtype: a uniform drawn in it has
    # 8 bits of mantissa and reaches a few hundred of 152K equally likely tokens. The draw takes its dtype explicitly.
    torch.manual_seed(0)
    probs = torch.full((2_000, 151_936), 1 / 151_936)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        tokens = decoding.draw(probs)
    finally:
        torch.set_default_dtype(default)
    # 2,000 draws of 151,936 equally likely tokens: about 151,936 * (1 - exp(-2000/151936)) = 1,987 distinct.
    assert tokens.unique().numel() > 1_950
