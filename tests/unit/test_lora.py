import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import Linear

from ttc_lightning.model.lora import fuse_lora
from ttc_lightning.model.tiny import build_tiny_model, build_tiny_tokenizer


def lora_model(alpha: int = 32, dropout: float = 0.0) -> torch.nn.Module:
    model = build_tiny_model(build_tiny_tokenizer(), seed=0)
    torch.manual_seed(0)  # peft draws A from the global generator
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=alpha, lora_dropout=dropout, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at 0, which would hide the update
            torch.nn.init.normal_(param, std=0.1)
    return model


def logits_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad()
    logits = model(input_ids=ids).logits
    logits.logsumexp(-1).sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("alpha", [32, 8])  # scaling 2 (exact in binary) and 0.5
def test_fused_lora_layers_give_peft_outputs_and_gradients(alpha):
    ids = torch.randint(3, 250, (2, 7))
    peft_model, fused_model = lora_model(alpha), lora_model(alpha)
    assert fuse_lora(fused_model) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    expected, expected_grads = logits_and_grads(peft_model, ids)
    got, grads = logits_and_grads(fused_model, ids)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads)


def test_other_states_take_pefts_forward(monkeypatch):
    model = lora_model(dropout=0.1)
    fuse_lora(model)
    calls = []
    original = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ids = torch.randint(3, 250, (2, 5))
    model.train()
    model(input_ids=ids)  # dropout active while training: peft's path
    assert len(calls) == 14
    model.eval()
    calls.clear()
    model(input_ids=ids)  # dropout off in eval mode: fused
    assert not calls
    with model.disable_adapter():  # the reference policy: base only
        model(input_ids=ids)
    assert len(calls) == 14
    calls.clear()
    model.merge_adapter()
    model(input_ids=ids)
    model.unmerge_adapter()
    assert len(calls) == 14


def test_a_copy_computes_with_its_own_weights():
    model = lora_model()
    fuse_lora(model)
    clone = copy.deepcopy(model)
    for name, param in clone.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(param)
    ids = torch.randint(3, 250, (1, 5))
    with torch.no_grad(), clone.disable_adapter():
        base = clone(input_ids=ids).logits
    with torch.no_grad():
        torch.testing.assert_close(clone(input_ids=ids).logits, base)  # B = 0 in the copy: no update
        assert not torch.allclose(model(input_ids=ids).logits, base)  # the original keeps its own B


def test_float32_adapters_over_a_bfloat16_base_are_fused_under_autocast(monkeypatch):
    # What a GPU run loads: a bf16 base, peft's float32 adapters, bf16-mixed autocast around the step.
    peft_model = lora_model().to(torch.bfloat16)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
    fused_model = copy.deepcopy(peft_model)
    fuse_lora(fused_model)
    calls = []
    original = Linear.forward
    monkeypatch.setattr(Linear, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ids = torch.randint(3, 250, (2, 7))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = fused_model(input_ids=ids).logits
        assert not calls  # every adapted layer took the fused path
        expected = peft_model(input_ids=ids).logits
    assert len(calls) == 14
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)  # bf16: rounding in another order
    calls.clear()
    fused_model(input_ids=ids)  # without autocast a bf16 input cannot meet float32 adapters in one matmul: peft's
    assert len(calls) == 14
