"""On a CUDA device: the paths users run (bf16, gradient checkpointing, LoRA, 4-bit weights) and every lever against
its plain computation. Skipped without CUDA (tests/conftest.py); `benchmarks/gpu_check.sh` runs them with the
shaped benchmark."""

import pytest
import torch
from transformers import GenerationConfig

from tests.helpers import TINY, read_metrics
from ttc_lightning.levers import Levers
from ttc_lightning.model.loading import LoRA, encode_prompts
from ttc_lightning.model.tiny import build_tiny_model, build_tiny_tokenizer
from ttc_lightning.module import GRPOModule
from ttc_lightning.sampling import decoding
from ttc_lightning.sampling.kv_cache import expand_cache, prefill
from ttc_lightning.training.rollout import Rollout

pytestmark = pytest.mark.gpu

GPU = ["--trainer.accelerator", "gpu", "--trainer.devices", "1", "--trainer.enable_progress_bar", "false"]
FAST = ["--model.max_new_tokens", "8", "--model.num_generations", "4", "--trainer.max_steps", "2"]
TOY = "ttc_lightning.rewards.char_fraction_reward"


@pytest.mark.parametrize(
    "options",
    [
        ["--trainer.precision", "bf16-mixed", "--model.gradient_checkpointing", "true", "--model.lora", "{r: 4}"],
        ["--model.load_in_4bit", "true", "--model.lora", "{r: 4}", "--model.beta", "0.04"],
    ],
    ids=["bf16 checkpointing lora", "4-bit lora kl"],
)
def test_fit_on_the_gpu(run_ttc, tmp_path, options):
    code, _, err = run_ttc("fit", "--config", TINY, "--trainer.default_root_dir", "run", *GPU, *FAST, *options)
    assert code == 0, err
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2
    assert all(float(r["grad_norm"]) > 0 and float(r["loss"]) == float(r["loss"]) for r in rows)  # finite, learning


@pytest.mark.parametrize("cuda_graph", [False, True], ids=["eager loop", "CUDA graph"])
def test_ttcs_backend_samples_the_policys_distribution_on_cuda(cuda_graph):
    # Greedy: the tokens plain generate() gives; sampled: each token's kept log-prob is the policy's own (bf16).
    levers = Levers(cuda_graph=cuda_graph)
    module = GRPOModule(
        rewards=[TOY], lora=LoRA(r=4), dtype="bfloat16", temperature=0.7, top_k=20, top_p=0.9, levers=levers
    )
    module.configure_model()
    module.policy.cuda()
    for name, param in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    assert module.sampler.backend.plan().cuda_graph == cuda_graph
    prompts = ["short", "a longer prompt"]
    greedy = module.generate(prompts, num_samples=2, temperature=0.0, max_new_tokens=10)
    config = module.sampler.generation_config(0.0, 10)
    with torch.no_grad():
        for j, prompt in enumerate(prompts):
            ids = module.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].cuda()
            expected = module.policy.generate(input_ids=ids, generation_config=config)[0, ids.size(1) :]
            for row in (2 * j, 2 * j + 1):
                n = int(greedy.completion_mask[row].sum())
                assert greedy.completion_ids[row, :n].tolist() == expected[:n].tolist()
    sampled = module.generate(prompts, num_samples=4, temperature=0.7, max_new_tokens=12)
    n = len(sampled.texts)
    rollout = Rollout.from_samples(sampled, torch.zeros(n, 1, device="cuda"), torch.zeros(n, device="cuda"))
    with torch.no_grad():
        logps, _ = module.rollout_logps(module.policy, rollout)
    mask = sampled.completion_mask.bool()
    torch.testing.assert_close(sampled.logps[mask], logps[mask], atol=5e-2, rtol=5e-2)  # bf16 activations


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
def test_shared_prompt_pass_matches_each_row_alone_in_bf16(checkpointing):
    module = GRPOModule(
        rewards=[TOY], lora=LoRA(r=4), dtype="bfloat16", gradient_checkpointing=checkpointing, temperature=0.7
    )
    module.configure_model()
    module.policy.cuda()
    for name, param in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    prompt_ids, prompt_mask = encode_prompts(module.tokenizer, ["short", "a longer prompt"], torch.device("cuda"))
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(3, 0), prompt_mask.repeat_interleave(3, 0)
    completion_ids = torch.randint(3, 200, (6, 5), device="cuda")
    completion_mask = torch.ones_like(completion_ids)
    zeros = torch.zeros(6, device="cuda")
    rollout = Rollout(prompt_ids, prompt_mask, completion_ids, completion_mask, [""] * 6, zeros[:, None], zeros, zeros)
    trainable = [p for p in module.policy.parameters() if p.requires_grad]
    shared, _ = module.rollout_logps(module.policy, rollout)
    grads = torch.autograd.grad(shared.sum(), trainable)
    rows = [rollout.rows(torch.tensor([i], device="cuda")) for i in range(6)]
    alone = [module.rollout_logps(module.policy, row)[0] for row in rows]
    alone_grads = torch.autograd.grad(sum(a.sum() for a in alone), trainable)
    torch.testing.assert_close(shared, torch.cat(alone), atol=2e-2, rtol=2e-2)  # bf16 activations
    for a, b in zip(grads, alone_grads, strict=True):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


def test_the_cuda_graph_decodes_what_the_eager_loop_decodes():
    from ttc_lightning.sampling.kv_cache import StaticCache

    model = build_tiny_model(build_tiny_tokenizer(), seed=0).cuda().eval()
    torch.manual_seed(2)
    ids = torch.randint(3, 250, (2, 12), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    config = GenerationConfig(do_sample=True, top_k=0, top_p=1.0, max_new_tokens=40)
    config.update(eos_token_id=[2], pad_token_id=0)
    results = []
    for graph in (False, True):
        with torch.no_grad():
            cache = prefill(model, ids[:, :-1], mask[:, :-1], 52)
            if graph:
                cache = StaticCache.from_prefill(cache, 3, 11 + 40)
            else:
                expand_cache(cache, mask[:, :-1], 3, 41, share=False)
            torch.manual_seed(5)
            rows, rows_mask = ids.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
            results.append(decoding.decode(model, rows, rows_mask, cache, config))
    eager, graphed = results
    assert torch.equal(graphed.completion_ids, eager.completion_ids)
    torch.testing.assert_close(graphed.logps, eager.logps, atol=1e-4, rtol=1e-4)


def test_the_sampler_uses_cuda_graphs_on_a_gpu():
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4), dtype="bfloat16")
    module.configure_model()
    module.policy.cuda()  # as Lightning moves it, after the sampler was built
    plan = module.sampler.backend.plan()
    assert plan.cuda_graph and not plan.share_cache and not plan.cpu_kernels, module.sampler.describe()
    samples = module.generate(["short", "a longer prompt"], num_samples=3, temperature=1.0, max_new_tokens=12)
    assert samples.completion_ids.shape[0] == 6
