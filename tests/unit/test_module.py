import io
import logging
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from ttc_lightning import cpu
from ttc_lightning.errors import TTCError
from ttc_lightning.model.loading import LoRA, encode_prompts, weights_dtype
from ttc_lightning.module import GRPOModule
from ttc_lightning.run.cli import auto_precision
from ttc_lightning.settings import check_trainer
from ttc_lightning.training.rollout import Rollout, nan_mean_std

TOY = "ttc_lightning.rewards.char_fraction_reward"


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
        ({"num_generations": 1}, "num_generations must be >= 2, got 1"),
        ({"load_in_4bit": True}, "load_in_4bit needs model.lora"),
        ({"reward_weights": [1.0, 2.0]}, "reward_weights has 2 entries for 1 reward function: give one"),
        ({"eval_num_samples": 4}, "eval_num_samples > 1 needs model.eval_temperature > 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\], got 0.0"),
        ({"reward_weights": [float("nan")]}, r"reward_weights must be finite numbers, got \[nan\]"),
        ({"reward_weights": [float("inf")]}, "reward_weights must be finite numbers"),
        ({"reward_workers": 0}, "reward_workers must be >= 1, got 0"),
        ({"reward_timeout": 0.0}, "reward_timeout must be > 0 seconds, or null"),
        ({"reward_errors": "ignore"}, "reward_errors must be raise or skip"),
        ({"max_sampling_rounds": 0}, r"max_sampling_rounds must be >= 1 \(1: dynamic sampling only filters"),
        ({"tis_cap": 0.0}, r"tis_cap must be > 0 \(e.g. 2.0\), or null"),
        ({"overlong_buffer": {"length": 200}}, r"overlong_buffer.length must be in \[1, model.max_new_tokens=128\]"),
        ({"overlong_buffer": {"length": 16, "penalty": -1.0}}, "overlong_buffer.penalty must be >= 0"),
        ({"learning_rate": 1e30}, r"learning_rate must be in \(0, 1\), got 1e\+30"),
        ({"warmup_steps": -3}, "warmup_steps must be >= 0, got -3"),
        ({"lora": {"r": 0}}, "lora.r must be >= 1, got 0"),
        ({"lora": {"r": 4, "alpha": -8}}, "lora.alpha must be > 0, got -8"),
        ({"lora": LoRA(r=4, dropout=2.0)}, r"lora.dropout must be in \[0, 1\), got 2.0"),
        ({"dtype": "bfloat16"}, "model.dtype=bfloat16 with full fine-tuning .* set model.dtype: auto"),
        ({"dtype": None}, "model.dtype must be auto, float32, bfloat16 or float16, got None"),
    ],
)
def test_invalid_settings_say_how_to_fix(kwargs, message):
    with pytest.raises(TTCError, match=message):
        GRPOModule(rewards=[TOY], **kwargs)


def test_unknown_reward_path():
    with pytest.raises(TTCError, match=r"model.rewards\[0\]: cannot import 'ttc_lightning.rewards.nope'"):
        GRPOModule(rewards=["ttc_lightning.rewards.nope"])


FAULTS_SCRIPT = """
import ctypes, resource, torch
from ttc_lightning.cpu import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, keep_freed_memory

def faults():  # page faults of 10 rounds of three 12 MiB activations, freed together as a step frees them
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [torch.ones(3 << 20) for _ in range(3)]
        del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

# glibc's documented starting thresholds (it raises them as the program runs, which makes the default's faults
# depend on what ran before)
libc = ctypes.CDLL(None)
libc.mallopt(M_MMAP_THRESHOLD, 128 << 10)
libc.mallopt(M_TRIM_THRESHOLD, 128 << 10)
by_default = faults()
kept = keep_freed_memory()
faults()  # the first round after the call still maps its memory in
print(by_default, kept, faults())
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True).stdout
    by_default, kept, after = out.split()
    # At 128 KiB thresholds each 12 MiB block is mapped on its own and unmapped when freed, so every round faults
    # 36 MiB / 4 KiB = 9216 pages in again (10 rounds: ~92K); kept, the same memory serves the next round.
    assert kept == "True"
    assert int(by_default) > 10 * 9216 // 2
    assert int(after) < 100


def test_training_on_cpu_keeps_freed_memory(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "keep_freed_memory", lambda: calls.append(True))
    module = GRPOModule(rewards=[TOY])
    module.configure_model()
    module._trainer = SimpleNamespace(world_size=1)
    module.on_fit_start()
    assert calls == [True]


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


def _rollout_of(module: GRPOModule, prompts: list[str], completions: list[list[int]], g: int) -> Rollout:
    """Each prompt repeated g times (left-padded), with the given completion ids (right-padded)."""
    prompt_ids, prompt_mask = encode_prompts(module.tokenizer, prompts, module.device)
    prompt_ids, prompt_mask = prompt_ids.repeat_interleave(g, 0), prompt_mask.repeat_interleave(g, 0)
    width = max(map(len, completions))
    completion_ids = torch.tensor([row + [0] * (width - len(row)) for row in completions])
    completion_mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in completions])
    n = len(completions)
    return Rollout(
        prompt_ids,
        prompt_mask,
        completion_ids,
        completion_mask,
        [""] * n,
        torch.zeros(n, 1),
        torch.zeros(n),
        torch.linspace(-1, 1, n),
    )


class Counted(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module, calls: list) -> None:
        super().__init__()
        self.inner, self.calls = inner, calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(1)
        return self.inner(x)


def _decoder(module: GRPOModule) -> torch.nn.Module:
    """The transformer body that runs the training passes (peft's adapters live inside it)."""
    lm = module.policy.get_base_model() if hasattr(module.policy, "get_base_model") else module.policy
    return lm.model


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("lora", [None, LoRA(r=4)], ids=["full", "lora"])
def test_shared_prompt_pass_matches_each_row_alone(lora, checkpointing):
    # Two prompts of different lengths (the shorter left-padded), 3 completions each of lengths 1..6.
    module = GRPOModule(rewards=[TOY], lora=lora, temperature=0.7, gradient_checkpointing=checkpointing)
    module.configure_model()
    torch.manual_seed(0)
    if lora is not None:  # peft starts B at 0; a non-zero adapter must reach the prompt's keys too
        for name, param in module.policy.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    completions = [torch.randint(3, 200, (n,)).tolist() for n in (1, 4, 6, 2, 5, 3)]
    rollout = _rollout_of(module, ["short", "a longer prompt"], completions, g=3)
    calls, layer_calls = [], []
    _decoder(module).register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    # Counts recomputations too, which module hooks do not see.
    _decoder(module).layers[0].mlp.act_fn = Counted(_decoder(module).layers[0].mlp.act_fn, layer_calls)
    shared, _ = module.rollout_logps(module.policy, rollout)
    # One pass over the 2 distinct prompts without their last token, one over the 6 completions (+ that token).
    p = rollout.prompt_ids.size(1)
    assert calls == [torch.Size([2, p - 1]), torch.Size([6, 7])]
    trainable = [q for q in module.policy.parameters() if q.requires_grad]
    grads_shared = torch.autograd.grad((shared * rollout.completion_mask).sum(), trainable)
    # Two passes; under checkpointing the backward pass runs each of them again.
    assert len(layer_calls) == (4 if checkpointing else 2)
    alone, grads_alone = [], None
    for i in range(6):  # a single row has nothing to share and no padding at all
        logps, _ = module.rollout_logps(module.policy, rollout.rows(torch.tensor([i])))
        alone.append(logps[0])
        grads = torch.autograd.grad(logps.sum(), trainable)
        grads_alone = grads if grads_alone is None else [a + b for a, b in zip(grads_alone, grads, strict=True)]
    for i, row in enumerate(alone):
        torch.testing.assert_close(shared[i, : len(completions[i])], row, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_shared, grads_alone, strict=True):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-3)  # sums in another order


def test_generate_encodes_each_prompt_once_and_samples_as_if_it_did_not():
    # Greedy, so the samples of one prompt are identical and must equal that prompt generated on its own.
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4))
    module.configure_model()
    prompts = ["short", "a much longer prompt"]
    calls = []
    hook = module.policy.get_base_model().register_forward_pre_hook(
        lambda _, args, kwargs: calls.append(kwargs["input_ids"].shape), with_kwargs=True
    )
    samples = module.generate(prompts, num_samples=3, temperature=0.0, max_new_tokens=6)
    ids, mask, texts = samples.completion_ids, samples.completion_mask, samples.texts
    hook.remove()
    assert calls[0][0] == 2  # the prompts' pass: 2 rows, not 6
    assert all(shape[0] == 6 and shape[1] == 1 for shape in calls[1:])  # then one token per row per step
    for j, prompt in enumerate(prompts):
        alone = module.generate([prompt], 1, temperature=0.0, max_new_tokens=6)
        alone_ids, alone_mask, alone_texts = alone.completion_ids, alone.completion_mask, alone.texts
        width = alone_ids.size(1)
        for row in range(3 * j, 3 * j + 3):
            assert texts[row] == alone_texts[0]
            assert torch.equal(ids[row, :width][mask[row, :width].bool()], alone_ids[0][alone_mask[0].bool()])


def test_the_samplers_log_probs_are_the_trainers():
    # Sampled at temperature 0.7 with LoRA merged for sampling: the decoding loop's log-prob of each chosen token
    # (full vocabulary, temperature only) is what the training forward computes for it, up to float32 rounding.
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4), temperature=0.7)
    module.configure_model()
    for name, param in module.policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    torch.manual_seed(0)
    samples = module.generate(["a prompt", "another, longer prompt"], 3, temperature=0.7, max_new_tokens=8)
    assert samples.logps is not None and samples.logps.shape == samples.completion_ids.shape
    n = len(samples.texts)
    rollout = Rollout.from_samples(samples, torch.zeros(n, 1), torch.zeros(n))
    with torch.no_grad():
        logps, _ = module.rollout_logps(module.policy, rollout)
    mask = samples.completion_mask.bool()
    torch.testing.assert_close(samples.logps[mask], logps[mask], atol=1e-4, rtol=1e-4)
    assert (samples.logps[~mask] == 0).all() and (samples.logps[mask] < 0).all()


@pytest.mark.parametrize(
    ("dtype", "lora", "cuda", "capability", "expected"),
    [
        ("auto", True, True, (9, 0), torch.bfloat16),  # a frozen LoRA base on Hopper
        ("auto", True, True, (7, 5), torch.float16),  # Turing: bf16 only emulated, the precision is 16-mixed
        ("auto", True, False, (9, 0), torch.float32),  # --trainer.accelerator cpu on a GPU machine
        ("auto", False, True, (9, 0), torch.float32),  # full fine-tuning: float32 master weights for AdamW
        ("bfloat16", True, False, None, torch.bfloat16),  # asked for
    ],
)
def test_weights_dtype(monkeypatch, dtype, lora, cuda, capability, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts there
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: capability)
    assert weights_dtype(dtype, lora, cuda) == expected


def test_4bit_keeps_the_frozen_embedding_and_head_in_the_compute_dtype():
    # peft's prepare_model_for_kbit_training makes every unquantised parameter float32: at Qwen2.5's vocabulary the
    # tied embedding/head would double to 933 MB and be cast back to bf16 at every decoding step.
    from types import SimpleNamespace

    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4), load_in_4bit=True, dtype="bfloat16")
    module._trainer = SimpleNamespace(precision="bf16-mixed", accelerator=None)  # a run under autocast
    module.configure_model()
    base = module.policy.get_base_model()
    assert base.get_input_embeddings().weight.dtype == torch.bfloat16
    assert base.get_output_embeddings().weight.dtype == torch.bfloat16
    norm = base.model.norm.weight  # the small unquantised rest stays float32, as peft wants it
    assert norm.dtype == torch.float32


def test_4bit_without_autocast_keeps_a_float32_head_that_its_hidden_states_can_meet():
    # --model.dtype bfloat16 under 32-true: no autocast, the norms peft keeps float32 feed the head float32 states.
    module = GRPOModule(rewards=[TOY], lora=LoRA(r=4), load_in_4bit=True, dtype="bfloat16")
    module.configure_model()  # no trainer: no autocast
    assert module.policy.get_base_model().get_output_embeddings().weight.dtype == torch.float32
    samples = module.generate(["a prompt"], num_samples=2, temperature=1.0, max_new_tokens=3)
    assert samples.completion_ids.shape[0] == 2


@pytest.mark.parametrize(
    ("precision", "lora", "message"),
    [
        ("16-true", LoRA(r=4), "trainer.precision 16-true stores the trained weights in float16.* use 16-mixed"),
        ("bf16-true", None, "trainer.precision bf16-true with full fine-tuning .* use bf16-mixed"),
    ],
)
def test_true_half_precisions_that_cannot_train_are_refused(precision, lora, message):
    from types import SimpleNamespace

    module = GRPOModule(rewards=[TOY], lora=lora)
    module._trainer = SimpleNamespace(precision=precision, strategy=None, datamodule=None)
    with pytest.raises(TTCError, match=message):
        module.setup("fit")


@pytest.mark.parametrize(("max_steps", "max_epochs", "warned"), [(-1, 1000, True), (5, 1000, False), (-1, 3, False)])
def test_a_fit_of_lightnings_default_length_says_to_set_max_steps(caplog, max_steps, max_epochs, warned):
    trainer = SimpleNamespace(
        precision="32-true", max_steps=max_steps, max_epochs=max_epochs, strategy=SimpleNamespace(), datamodule=None
    )
    with caplog.at_level(logging.WARNING, logger="ttc"):
        check_trainer(trainer, "fit", lora=False)
    assert ("trainer.max_steps is not set: the run goes on for 1000 epochs" in caplog.text) == warned
