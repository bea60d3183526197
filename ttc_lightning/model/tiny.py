"""`tiny`: a small randomly initialised causal LM and its tokenizer, built in code with no network; and the same
builder at the shape of the real model (`save_qwen_shaped`), for benchmarks and tests that must see its costs.

The tokenizer is byte-level (every byte is one token, no merges), so it needs no training data and is the same
on every machine. The model is Qwen2-shaped, like the real models ttc trains, and deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

TINY = "tiny"
PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# Qwen2.5-Coder's shapes (the Hub models' config.json) and the Instruct models' generation_config.json.
QWEN_VOCAB = 151_936
QWEN_CODER = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_layers": 28, "num_heads": 12, "num_kv_heads": 2},
}
QWEN_ROPE_THETA = 1_000_000.0
QWEN_INSTRUCT_GENERATION = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.1}

# ChatML, as used by Qwen2.5: the tiny model speaks the same format as the models it stands in for.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: 256 byte tokens, then the ChatML special tokens.

    With `vocab_size`, filler tokens (two or three byte symbols each, never produced by encoding, which has no
    merges) make it that large, so that a model with a real vocabulary's size can decode whatever it samples.
    """
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    symbols = list(alphabet)
    fillers = (a + b for a in alphabet for b in alphabet)
    triples = (a + b + c for a in alphabet for b in alphabet for c in alphabet)
    while vocab_size is not None and len(symbols) < vocab_size - 3:
        symbols.append(next(fillers, None) or next(triples))
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([PAD, BOS, EOS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS,
        pad_token=PAD,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=8192,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    num_kv_heads: int | None = None,
    rope_theta: float = 10_000.0,
    max_position_embeddings: int = 8192,
) -> torch.nn.Module:
    """A Qwen2-shaped causal LM with random weights that depend on `seed` only (not on the global RNG)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or max(1, num_heads // 2),
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny(directory: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write the tiny model and tokenizer as a Hugging Face directory, loadable like any local model."""
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer()
    build_tiny_model(tokenizer, seed=seed, **sizes).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def save_qwen_shaped(directory: str | Path, size: str = "1.5b", num_layers: int | None = None, seed: int = 0) -> Path:
    """A random model with Qwen2.5-Coder-`size`-Instruct's shape (vocabulary 151,936 with tied embeddings, GQA, rope
    theta 1e6; `num_layers` of them, all by default) and its generation config, with the wide byte-level tokenizer.

    Random weights: the costs of the real model, not its answers.
    """
    directory = Path(directory)
    tokenizer = build_tiny_tokenizer(vocab_size=QWEN_VOCAB)
    shape = {**QWEN_CODER[size], **({"num_layers": num_layers} if num_layers else {})}
    model = build_tiny_model(tokenizer, seed, rope_theta=QWEN_ROPE_THETA, max_position_embeddings=32_768, **shape)
    model.generation_config.update(**QWEN_INSTRUCT_GENERATION)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]  # <|im_end|>, <|endoftext|>
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
