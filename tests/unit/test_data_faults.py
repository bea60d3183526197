"""Bad data files: each says what is really wrong (encoding with file:line, an empty file, lines out of step), and the
loaders never touch the global random state."""

from __future__ import annotations

import re
import tracemalloc

import pytest
import torch

from tests.helpers import pair, v01, write
from ttc_lightning.data import PrimeVulPatchDataModule, PromptDataModule
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.common import read_jsonl
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
