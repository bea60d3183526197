"""Bad data files: each says what is really wrong (encoding with file:line, an empty file, lines out of step), and the
loaders never touch the global random state."""

from __future__ import annotations

import logging
import re
import tracemalloc
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.helpers import pair, v01, write
from ttc_lightning.data import PrimeVulPatchDataModule, PromptDataModule
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.common import prompt_token_count, read_jsonl, token_floor
from ttc_lightning.data.primevul import load_pairs, load_records, out_of_step, read_records
from ttc_lightning.data.prompts import DEMO_PROMPTS, load_prompt_rows
from ttc_lightning.errors import TTCError


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (b"\xff\xfe", "byte 0xff at column 13"),  # UTF-16's byte order mark inside a JSON string
        (b"caf\xe9", "byte 0xe9 at column 16"),  # Latin-1 e-acute
        (b"\xe2\x82", "byte 0xe2 at column 13"),  # a UTF-8 sequence cut short
    ],
    ids=["utf16-bom", "latin1", "truncated-sequence"],
)
def test_non_utf8_line_names_file_line_and_byte(tmp_path, raw, where):
    path = tmp_path / "p.jsonl"
    # line 2 is {"prompt": "<raw>"}: the string starts at column 13
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "' + raw + b'"}\n')
    with pytest.raises(TTCError, match=rf"p.jsonl:2: not UTF-8 text \({where}\); re-encode the file as UTF-8"):
        list(read_jsonl(path))


def test_non_utf8_primevul_file_names_its_line(tmp_path):
    path = write(tmp_path / "primevul_train_paired.jsonl", pair(0))
    path.write_bytes(path.read_bytes() + b'{"idx": 5, "func": "caf\xe9"}\n')
    with pytest.raises(TTCError, match=r"primevul_train_paired.jsonl:3: not UTF-8 text"):
        read_records(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_empty_primevul_file_is_called_empty(tmp_path, content):
    (tmp_path / "primevul_train_paired.jsonl").write_text(content)
    with pytest.raises(TTCError, match=r"primevul_train_paired.jsonl: empty, it holds no records"):
        load_pairs(tmp_path, "train")


def test_empty_prompts_file_is_called_empty(tmp_path):
    (tmp_path / "p.jsonl").write_text("")
    with pytest.raises(TTCError, match=r"p.jsonl: no prompts \(the file is empty\)"):
        load_prompt_rows(tmp_path / "p.jsonl")


def five_pairs() -> list[dict]:
    return [line for n in range(5) for line in pair(n)]


@pytest.mark.parametrize(
    ("rows", "line"),
    [
        (five_pairs()[1:], 1),  # the first line lost: lines 2-3 are pair 1
        ([v01(99, 0, "int x;", "other")] + five_pairs(), 1),  # a stray line on top
        (five_pairs()[:4] + five_pairs()[5:], 5),  # pair 2's vulnerable line lost in the middle
    ],
    ids=["first-line-missing", "extra-first-line", "line-missing-in-the-middle"],
)
def test_pairs_out_of_step_are_called_that_not_inverted(tmp_path, rows, line):
    write(tmp_path / "primevul_valid_paired.jsonl", rows)
    with pytest.raises(
        TTCError, match=rf"out of step by one from line {line} on: .* missing or extra near line {line}"
    ):
        load_pairs(tmp_path, "valid")


def test_out_of_step_needs_most_of_the_rest_to_pair_up_shifted(tmp_path):
    assert out_of_step(read_records(write(tmp_path / "a.jsonl", five_pairs()))) is None
    # one mispair in the middle is a mispair, not a shift: lines 6-7 do not pair up either
    broken = five_pairs()
    broken[5] = v01(77, 0, "int y;", "elsewhere")
    assert out_of_step(read_records(write(tmp_path / "b.jsonl", broken))) is None


def test_inverted_pairs_are_still_called_inverted(tmp_path):
    write(tmp_path / "primevul_test_paired.jsonl", [line for n in range(3) for line in reversed(pair(n))])
    with pytest.raises(TTCError, match="pairs list the fixed function .* look inverted"):
        load_records(tmp_path, "test", paired=True)


def test_data_path_null_means_the_shipped_sample():
    assert PrimeVulPatchDataModule(data_path=None).data_path == SAMPLE_DIR
    assert PromptDataModule(train_path=None).train_path == DEMO_PROMPTS


def test_every_split_filtered_away_says_why(tmp_path):
    dm = PrimeVulPatchDataModule(max_prompt_tokens=5)
    dm.tokenizer = SimpleTokenizer()
    with pytest.raises(TTCError, match=r"all \d+ prompts are longer \(data.max_prompt_tokens\)"):
        dm.setup("fit")


class SimpleTokenizer:
    """One token per character of the chat messages' contents."""

    def apply_chat_template(self, messages, **_):
        return list("".join(m["content"] for m in messages))

    def __call__(self, text, **_):
        return {"input_ids": list(text)}


@pytest.mark.parametrize("dm", [PrimeVulPatchDataModule(), PromptDataModule()], ids=["primevul", "prompts"])
def test_loaders_leave_the_global_random_state_alone(dm):
    dm.setup("fit")
    state = torch.get_rng_state()
    for _ in range(2):  # a new iterator each epoch, or after a resume
        next(iter(dm.train_dataloader()))
    assert torch.equal(torch.get_rng_state(), state)


# --- long lines, text that is not text ------------------------------------------------------------------------------


def test_reading_a_long_line_takes_memory_in_proportion_to_it(tmp_path):
    path = write(tmp_path / "prompts.jsonl", [{"prompt": "a" * 4_000_000}, {"prompt": "b"}])
    tracemalloc.start()
    try:
        assert [len(row["prompt"]) for _, row in read_jsonl(path)] == [4_000_000, 1]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # The line's bytes and its text while it is parsed, then the text and the prompt: never three copies at once.
    assert peak < 2.5 * path.stat().st_size


@pytest.mark.parametrize(
    ("line", "field", "char"),
    [
        (r'{"prompt": "x \ud800 y"}', "prompt", r"\ud800 at character 3"),
        (r'{"prompt": [{"role": "user", "content": "ok \ud83d\ude00 \uDC00"}]}', "prompt[0].content", r"\udc00 at"),
        (r'{"prompt": "a", "meta": {"note": "\udfff"}}', "meta.note", r"\udfff at character 1"),
        (r'{"prompt": "a", "k\ud800": 1}', None, r"\ud800 in the name of key 2"),
    ],
    ids=["string", "chat-message", "nested-column", "key"],
)
def test_a_lone_surrogate_is_a_one_line_error_naming_file_line_and_field(tmp_path, line, field, char):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "fine \\ud83d\\ude00"}\n' + line + "\n")  # an escaped pair is a character: fine
    where = f"p.jsonl:2: {field}: " if field else "p.jsonl:2: "
    with pytest.raises(TTCError, match=re.escape(f"{where}a lone surrogate ({char}")) as error:
        load_prompt_rows(path)
    assert "\n" not in str(error.value)
    str(error.value).encode("utf-8")  # the message itself can be printed


def test_a_lone_surrogate_in_a_primevul_file_names_its_line(tmp_path):
    path = write(tmp_path / "primevul_train_paired.jsonl", [line for n in range(2) for line in pair(n)])
    lines = path.read_text().splitlines()
    lines[2] = lines[2].replace('"func": "int', '"func": "\\ud800int')
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TTCError, match=r"primevul_train_paired.jsonl:3: func: a lone surrogate \(\\ud800 at character"):
        load_pairs(tmp_path, "train")


# --- over-long prompts: dropped without being tokenized -------------------------------------------------------------


class CountingTokenizer:
    """The tiny model's tokenizer (byte-level), recording how many characters each text it tokenizes has."""

    def __init__(self) -> None:
        from ttc_lightning.model.tiny import build_tiny_tokenizer

        self.inner = build_tiny_tokenizer()
        self.lengths: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def __call__(self, text, **kwargs):
        self.lengths.append(len(text))
        return self.inner(text, **kwargs)

    def apply_chat_template(self, messages, **kwargs):
        if kwargs.get("tokenize", True):
            self.lengths.append(sum(len(m["content"]) for m in messages))
        return self.inner.apply_chat_template(messages, **kwargs)


HUGE = 3_000_000  # characters: far over any limit below, and slow to tokenize whole


def huge_prompts(tmp_path: Path) -> Path:
    rows = [{"prompt": f"short {i}"} for i in range(4)]
    rows.insert(1, {"prompt": "x" * HUGE})
    rows.insert(3, {"prompt": [{"role": "user", "content": "y " * (HUGE // 2)}]})
    return write(tmp_path / "prompts.jsonl", rows)


@pytest.mark.parametrize(
    ("own", "context", "why"),
    [(100, None, "data.max_prompt_tokens"), (None, 8184, "the model's context minus model.max_new_tokens")],
    ids=["max_prompt_tokens", "model-context"],
)
def test_an_over_long_prompt_is_dropped_without_being_tokenized(tmp_path, caplog, own, context, why):
    tokenizer = CountingTokenizer()
    dm = PromptDataModule(train_path=str(huge_prompts(tmp_path)), max_prompt_tokens=own)
    dm.trainer = SimpleNamespace(lightning_module=SimpleNamespace(tokenizer=tokenizer, prompt_limit=context))
    with caplog.at_level(logging.INFO, logger="ttc"):
        dm.setup("fit")
    assert [row["prompt"] for row in dm.splits["train"]] == [f"short {i}" for i in range(4)]
    assert f"dropped 2 of 6 prompts longer than {own or context} tokens ({why})" in caplog.text
    assert tokenizer.lengths and max(tokenizer.lengths) < 1000  # the short ones were, the huge ones not


def test_an_over_long_primevul_function_is_dropped_without_being_tokenized(tmp_path):
    rows = [line for n in range(3) for line in pair(n)]
    rows[2] = v01(11, 1, "int g(void) { " * (HUGE // 14) + "}", "commit1")  # pair 1's vulnerable function
    write(tmp_path / "primevul_train_paired.jsonl", rows)
    tokenizer = CountingTokenizer()
    dm = PrimeVulPatchDataModule(data_path=str(tmp_path), val_split=None, max_prompt_tokens=2000)
    dm.tokenizer = tokenizer
    dm.setup("fit")
    assert sorted(row["id"] for row in dm.train_rows) == ["1", "21"]
    assert max(tokenizer.lengths) < 10_000


def wrap(backend) -> Any:
    from transformers import PreTrainedTokenizerFast

    from ttc_lightning.model.tiny import CHAT_TEMPLATE

    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=CHAT_TEMPLATE)


def qwen_like() -> Any:
    """Byte-level BPE with merges (so tokens of many bytes), an NFC normalizer and a splitting pre-tokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(r"\s+|[^\s]+"), behavior="isolated")
    backend.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=600, initial_alphabet=alphabet, special_tokens=["<|im_start|>"])
    corpus = ["int main(void) { return 0; }", " " * 64, "a" * 200, "caf\u00e9 \u1100\u1161\u11a8 \U0001f600"] * 50
    backend.train_from_iterator(corpus, trainer)
    return wrap(backend)


def llama2_like() -> Any:
    """BPE with byte fallback, spaces as U+2581 (Prepend and Replace normalizers), no pre-tokenizer."""
    from tokenizers import Tokenizer, models, normalizers

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": b + 1 for b in range(256)}}
    pieces = ["\u2581", "a", "aa", "aaaa", "b", "\u2581a", "\u2581aaaa"]
    vocab.update({piece: 257 + i for i, piece in enumerate(pieces)})
    merges = [("a", "a"), ("aa", "aa"), ("\u2581", "a"), ("\u2581", "aaaa")]
    backend = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    return wrap(backend)


TEXTS = [
    "short",
    " " * 300,
    "a" * 1000,
    "int main(void) { return 0; }" * 20,
    "e\u0301" * 200,  # NFC: two characters become one
    "\u1100\u1161\u11a8" * 100,  # NFC: three Hangul jamo become one syllable
    "\u2126\u212b" * 100,  # NFC: the Ohm and Angstrom signs become Greek and Latin letters
    "\U0001f600 caf\u00e9 " * 100,
    "<|im_start|>" * 50 + "x",  # an added token's text, matched as that token
]


@pytest.mark.parametrize(
    "build", [qwen_like, llama2_like, lambda: CountingTokenizer().inner], ids=["qwen-like", "llama2-like", "tiny"]
)
def test_the_token_floor_is_never_more_than_the_tokens(build):
    tokenizer = build()
    floor = token_floor(tokenizer)
    assert floor is not None and token_floor(tokenizer) is floor  # worked out once
    for text in TEXTS:
        count = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        assert 0 < floor(text) <= count, (text[:20], floor(text), count)
        messages = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert floor(rendered) <= prompt_token_count(tokenizer, messages)
    assert floor("x" * 1_000_000) > 1_000_000 // (floor.longest + 1)


def test_no_token_floor_where_it_would_not_hold():
    from tokenizers import Tokenizer, models, pre_tokenizers

    from ttc_lightning.model.tiny import build_tiny_tokenizer

    vocab = {"[UNK]": 0, "a": 1, "b": 2}
    wordpiece = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))  # unknown words are one token each
    no_fallback = Tokenizer(models.BPE(vocab, [], unk_token="[UNK]"))  # neither byte-level nor byte fallback
    dropping = build_tiny_tokenizer().backend_tokenizer
    dropping.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.ByteLevel()])
    for backend in (wordpiece, no_fallback, dropping):
        assert token_floor(wrap(backend)) is None
    assert token_floor(SimpleTokenizer()) is None  # no Hugging Face tokenizer: its prompts are tokenized
