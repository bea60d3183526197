import pytest
import torch
from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.cache_utils import DynamicLayer

from ttc_lightning import cpu
from ttc_lightning.cpu import can_pack, packed_linears
from ttc_lightning.errors import TTCError
from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import LoRA
from ttc_lightning.model.tiny import build_tiny_model, build_tiny_tokenizer
from ttc_lightning.module import GRPOModule
from ttc_lightning.sampling import decoding
from ttc_lightning.sampling import sampler as sampler_py
from ttc_lightning.sampling.decoding import decode_step, fast_decode_model, fast_decoding
from ttc_lightning.sampling.kv_cache import (
    GrowingLayer,
    SharedPrefixLayer,
    StaticCache,
    cache_bytes,
    cache_keyword,
    expand_cache,
    prefill,
)
from ttc_lightning.sampling.sampler import merged_lora, plan_sampling

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


@pytest.mark.parametrize(("dtype", "merges"), [("auto", True), ("bfloat16", False)])
def test_generate_merges_float32_adapters_in_place_only(monkeypatch, dtype, merges):
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
    samples = module.generate(["a prompt", "another one"], num_samples=2, temperature=1.0, max_new_tokens=3)
    ids, texts = samples.completion_ids, samples.texts
    assert len(texts) == 4 and ids.size(0) == 4
    assert calls[0][0] == 4  # every row ran its whole prompt


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


def sample(model, prompt_ids, prompt_mask, group, fast, share=False, do_sample=True, seed=3, max_new_tokens=6):
    config = GenerationConfig(
        do_sample=do_sample, max_new_tokens=max_new_tokens, eos_token_id=2, pad_token_id=0, top_k=0, top_p=1.0
    )
    with torch.no_grad(), fast_decoding(model, fast):
        cache = prefill(model, prompt_ids[:, :-1], prompt_mask[:, :-1], prompt_ids.size(1) + max_new_tokens)
        expand_cache(cache, prompt_mask[:, :-1], group, max_new_tokens + 1, share=share)
        torch.manual_seed(seed)
        return model.generate(
            input_ids=prompt_ids.repeat_interleave(group, 0),
            attention_mask=prompt_mask.repeat_interleave(group, 0),
            generation_config=config,
            **{cache_keyword(model): cache},
        )


def padded_prompts() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(2)
    ids = torch.randint(3, 250, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


@pytest.mark.parametrize("do_sample", [False, True])
def test_fast_decoding_samples_what_generate_samples(monkeypatch, do_sample):
    model, (ids, mask) = tiny_llama(), padded_prompts()
    calls = []
    monkeypatch.setattr(decoding, "decode_step", lambda *a: calls.append(1) or decode_step(*a))
    expected = sample(model, ids, mask, group=3, fast=False, do_sample=do_sample)
    assert not calls
    got = sample(model, ids, mask, group=3, fast=True, do_sample=do_sample)
    assert torch.equal(got, expected)
    assert len(calls) == 6  # every new token, the first one included
    assert "forward" not in vars(model)


def test_prompts_shared_by_their_rows_sample_what_copies_would(monkeypatch):
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    for do_sample in (False, True):
        expected = sample(model, ids, mask, group=4, fast=True, share=False, do_sample=do_sample)
        got = sample(model, ids, mask, group=4, fast=True, share=True, do_sample=do_sample)
        assert torch.equal(got, expected)
    # The logits themselves, token after token, padding included (a padded prompt position must get no weight).
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


def test_small_prompt_caches_are_copied_not_shared_on_cpu():
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    cache = prefill(model, ids, mask)
    copies = cache_bytes(cache) * 3  # 2 prompts x 2 heads x 12 positions x 16 values x 2 (k, v) x 4 bytes x 3 copies
    assert copies == 2 * 2 * 12 * 16 * 2 * 4 * 3 < cpu.SHARE_MIN_BYTES
    config = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=2, pad_token_id=0, top_k=0)
    plan = plan_sampling(model, Levers(), config, lora=False, quantized=False, copy_bytes=copies)
    assert plan.decoder == "loop" and not plan.share_cache and "copying" in plan.off["share_cache"]
    assert plan_sampling(model, Levers(), config, lora=False, quantized=False, copy_bytes=4 << 20).share_cache
    # Off the CPU tricks, the threshold measured on CPU does not apply: the plain path shares whenever it can.
    plan = plan_sampling(model, Levers(cpu=False), config, lora=False, quantized=False, copy_bytes=copies)
    assert plan.share_cache


def test_fast_decoding_leaves_other_models_and_calls_alone():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    assert fast_decode_model(gpt2) is None
    with fast_decoding(gpt2):
        assert "forward" not in vars(gpt2)
    model = tiny_qwen()
    with fast_decoding(model):
        ids = torch.randint(3, 250, (2, 5))
        out = model(input_ids=ids)  # a whole sequence with gradients: the model's own forward
        assert out.logits.shape == (2, 5, model.config.vocab_size) and out.logits.requires_grad


def test_generate_samples_the_policy_not_the_models_repetition_penalty():
    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    prompts = ["a prompt", "another one"]
    expected = module.generate(prompts, num_samples=1, temperature=0.0, max_new_tokens=12)[2]
    module.policy.generation_config.repetition_penalty = 100.0  # as a model's shipped generation config might say
    got = module.generate(prompts, num_samples=1, temperature=0.0, max_new_tokens=12)[2]
    assert torch.equal(got, expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"do_sample": False},
        {"do_sample": True, "top_k": 0, "top_p": 1.0},
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
    ],
)
def test_decode_samples_what_generate_samples(monkeypatch, settings):
    monkeypatch.setattr(decoding, "draw", lambda probs: torch.multinomial(probs, 1))  # generate()'s draw
    model, (ids, mask) = tiny_llama(), padded_prompts()
    model.generation_config.min_new_tokens = 3  # honoured from the model's generation config, as generate() does
    assert decoding.decodes_alone(model)
    config = GenerationConfig(max_new_tokens=12, eos_token_id=[2, 7], pad_token_id=0, **settings)
    rows_ids, rows_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # [6, 12]
    results = []
    for ours in (False, True):
        with torch.no_grad():
            cache = prefill(model, ids[:, :-1], mask[:, :-1], 24)
            expand_cache(cache, mask[:, :-1], 3, 13, share=False)
            torch.manual_seed(5)
            if ours:
                results.append(decoding.decode(model, rows_ids, rows_mask, cache, config).sequences)
            else:
                kwargs = {cache_keyword(model): cache}
                results.append(
                    model.generate(input_ids=rows_ids, attention_mask=rows_mask, generation_config=config, **kwargs)
                )
    expected, got = results
    assert torch.equal(got, expected)
    assert got.size(1) > ids.size(1) + 3


def test_decode_stops_when_every_row_has_ended_and_pads_after_eos():
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    eos = int(model(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())  # row 0's greedy first token
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=[eos], pad_token_id=0)
    with torch.no_grad():
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 22)
        got = decoding.decode(model, ids, mask, cache, config).sequences
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 22)
        expected = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, **{cache_keyword(model): cache}
        )
    assert torch.equal(got, expected)
    assert got[0, 12] == eos and (got[0, 13:] == 0).all()
    everything_ends = GenerationConfig(
        do_sample=False, max_new_tokens=10, eos_token_id=list(range(300)), pad_token_id=0
    )
    with torch.no_grad():
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 22)
        decoded = decoding.decode(model, ids, mask, cache, everything_ends)
        assert decoded.sequences.size(1) == 13  # one token, then no more steps


def test_models_whose_generation_config_adds_processors_sample_through_generate():
    model = tiny_qwen()
    assert decoding.decodes_alone(model)
    model.generation_config.no_repeat_ngram_size = 2
    assert not decoding.decodes_alone(model)
    model.generation_config.no_repeat_ngram_size = None
    model.generation_config.repetition_penalty = 1.05
    assert not decoding.decodes_alone(model)


def test_the_models_own_sampling_settings_do_not_stop_the_decoding_loop():
    # Qwen2.5-Instruct ships temperature 0.7, top-k 20, top-p 0.8 and a repetition penalty of 1.1; ttc sets each of
    # them itself, so generate() would not use the model's either, and the loop samples exactly as generate() would.
    model = tiny_qwen()
    model.generation_config.update(do_sample=True, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.1)
    assert not decoding.decodes_alone(model)  # generate() without ttc's settings would apply the penalty
    config = GenerationConfig(
        do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0, max_new_tokens=4, eos_token_id=2
    )
    assert decoding.decodes_alone(model, config)
    plan = plan_sampling(model, Levers(), config, lora=False, quantized=False)
    assert plan.decoder == "loop" and "decode_loop" not in plan.off
    model.generation_config.no_repeat_ngram_size = 2  # a processor ttc does not set: generate() applies it
    assert plan_sampling(model, Levers(), config, lora=False, quantized=False).decoder == "generate+steps"


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
    plan = plan_sampling(module.policy, Levers(), GenerationConfig(max_new_tokens=2), lora=True, quantized=False)
    assert plan.merge_lora == "copy"
    assert plan_sampling(module.policy, Levers(), GenerationConfig(), lora=True, quantized=True).merge_lora == "off"


def test_sampling_with_merged_adapters_gives_the_unmerged_policys_tokens(monkeypatch):
    import contextlib

    module = lora_module()
    prompts = ["a prompt", "another, longer prompt"]
    merged = module.generate(prompts, num_samples=2, temperature=0.0, max_new_tokens=10)[2]
    monkeypatch.setattr(sampler_py, "merged_lora", lambda model, how: contextlib.nullcontext())
    unmerged = module.generate(prompts, num_samples=2, temperature=0.0, max_new_tokens=10)[2]
    assert torch.equal(merged, unmerged)
    with torch.no_grad(), module.policy.disable_adapter():  # and the adapters do change what is sampled
        base = module.generate(prompts, num_samples=2, temperature=0.0, max_new_tokens=10)[2]
    assert not torch.equal(base, merged)


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
    assert torch.equal(static.sequences, growing.sequences)
    torch.testing.assert_close(static.logps, growing.logps, atol=1e-5, rtol=1e-5)
    assert static.sequences.size(1) == 12 + 10


def test_a_fixed_shape_cache_stops_where_generate_stops():
    model, (ids, mask) = tiny_qwen(), padded_prompts()
    eos = int(model(input_ids=ids, attention_mask=mask).logits[0, -1].argmax())  # row 0's greedy first token
    config = GenerationConfig(do_sample=False, max_new_tokens=40, eos_token_id=[eos], pad_token_id=0)
    growing, static = decode_both_ways(model, ids, mask, config, group=1)
    assert torch.equal(static.sequences, growing.sequences)
    with torch.no_grad():
        cache = prefill(model, ids[:, :-1], mask[:, :-1], 52)
        expected = model.generate(
            input_ids=ids, attention_mask=mask, generation_config=config, **{cache_keyword(model): cache}
        )
    assert torch.equal(growing.sequences, expected)  # checked every 16 tokens, trimmed to where the last row ended


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
    assert decoded.sequences.size(1) == 12 + 64
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


def test_the_runs_plan_line_says_what_each_call_decides_and_names_generate():
    model = tiny_qwen()
    config = GenerationConfig(do_sample=True, max_new_tokens=4, eos_token_id=2, pad_token_id=0, top_k=0)
    # At fit start the prompts' cache size is unknown: on CPU each call shares or copies by it.
    line = plan_sampling(model, Levers(), config, lora=False, quantized=False).describe()
    assert "shared prompt cache (from 2 MB per layer; copied below)" in line
    line = plan_sampling(model, Levers(decode_loop=False), config, lora=False, quantized=False).describe()
    assert line.startswith("sampling with prompt once, generate()")
