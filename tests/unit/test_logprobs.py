"""Chunked log-probs through the output head: the values and gradients of the plain computation, in bounded memory."""

import math
import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ttc_lightning.training import logprobs
from ttc_lightning.training.logprobs import _ZeroGradientTo, selective_log_softmax, token_entropy, token_logps


def reference(hidden, head, ids, temperature):
    """The plain computation: the whole `[n, C, V]` log-softmax."""
    logp = torch.log_softmax(head(hidden).float() / temperature, dim=-1)  # [n, C, V]
    entropy = -(logp.exp() * logp).sum(-1)  # [n, C]
    return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1), entropy.detach()


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen head", "trainable head"])
def test_chunks_give_the_values_and_gradients_of_the_whole_log_softmax(monkeypatch, trainable):
    # 3 x 7 = 21 tokens of a 50-entry vocabulary, 4 tokens per chunk (4 x 50 x 4 bytes): 5 full chunks and one of 1.
    monkeypatch.setattr(logprobs, "LOGITS_CHUNK_BYTES", 4 * 50 * 4)
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=trainable).requires_grad_(trainable)
    ids = torch.randint(0, 50, (3, 7))
    weights = torch.randn(3, 7)  # an upstream gradient that differs per token, as the GRPO loss gives
    results = []
    for fn in (token_logps, reference):
        hidden = torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        logps, entropy = fn(hidden, head, ids, 0.7, *([True] if fn is token_logps else []))
        params = [hidden, *(p for p in head.parameters() if p.requires_grad)]
        results.append((logps, entropy, torch.autograd.grad((logps * weights).sum(), params)))
    (logps, entropy, grads), (want, want_entropy, want_grads) = results
    torch.testing.assert_close(logps, want)
    torch.testing.assert_close(entropy, want_entropy)
    assert not entropy.requires_grad
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected)


class LiveTensorBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages created under this mode (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.seen:
                    self.seen.add(key)
                    self.live += storage.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, key, storage.nbytes())
        return out

    def _free(self, key: int, nbytes: int) -> None:
        self.seen.discard(key)
        self.live -= nbytes


def peak_bytes(vocab: int) -> int:
    # A GRPO micro-batch: 16 rows x 256 completion tokens, frozen tied head (LoRA), forward and backward.
    torch.manual_seed(0)
    head = torch.nn.Linear(32, vocab, bias=False).requires_grad_(False)
    hidden = torch.randn(16, 256, 32, requires_grad=True)
    ids = torch.randint(0, vocab, (16, 256))
    with LiveTensorBytes() as mode:
        logps, _ = token_logps(hidden, head, ids, 1.0, with_entropy=True)
        logps.sum().backward()
    return mode.peak


@pytest.mark.slow
def test_peak_memory_hardly_grows_with_the_vocabulary():
    small, large = peak_bytes(8_192), peak_bytes(151_936)
    # Unchunked, the step holds [16, 256, V] float32 logits at least twice: 2 x 4096 x 151,936 x 4 bytes = 4.98 GB at
    # Qwen2.5's vocabulary, 18.5 times the 268 MB at 8,192 entries. Chunked, both stay near 2 x 128 MiB.
    assert large <= 1.5 * small, (small, large)
    assert large < 2 * 4096 * 151_936 * 4 / 10


@pytest.mark.parametrize("trainable", [False, True], ids=["frozen head", "trainable head"])
def test_entropy_under_bfloat16_autocast_is_summed_in_float32(trainable):
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 4096, bias=False).requires_grad_(trainable)
    hidden = torch.randn(2, 8, 64, requires_grad=True)
    ids = torch.randint(0, 4096, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, entropy = token_logps(hidden, head, ids, temperature=1.0, with_entropy=True)
        logits = head(hidden).float()  # [2, 8, V], the logits autocast gives (bf16 products, as float32)
    logp = logits.log_softmax(-1)
    expected = -(logp.exp() * logp).sum(-1)  # [2, 8] summed in float32
    # Summed by a bf16 bmm the entropy of ~8 nats is off by up to ~0.03 (8 bits of mantissa); in float32 by ~1e-6.
    torch.testing.assert_close(entropy, expected, atol=1e-4, rtol=1e-5)


def test_selective_log_softmax_matches_log_softmax():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 4, 7, generator=gen)
    index = torch.randint(0, 7, (3, 4), generator=gen)
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), expected)


def test_token_entropy_of_uniform_is_log_vocab():
    # uniform over 8 tokens: entropy = ln 8 = 2.07944
    torch.testing.assert_close(token_entropy(torch.zeros(2, 3, 8)), torch.full((2, 3), math.log(8)))


def test_the_prompt_pass_link_passes_values_and_gives_a_zero_gradient():
    # out = hidden, unchanged; d(sum out)/d hidden = 1 each; `other` gets zeros, not None: FSDP2's backward hook on
    # the prompt pass's outputs fires from it (`_ZeroGradientTo`)
    hidden = torch.tensor([1.0, 2.0], requires_grad=True)
    other = torch.tensor([[3.0]], requires_grad=True)
    out = _ZeroGradientTo.apply(hidden, other)
    assert out.tolist() == [1.0, 2.0]
    out.sum().backward()
    assert hidden.grad.tolist() == [1.0, 1.0]
    assert other.grad.tolist() == [[0.0]]
