import json
import re
from pathlib import Path

import pytest

from tests.helpers import REAL_PRIMEVUL, block
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.patch import (
    apply_completion,
    file_language,
    make_oracle_edits,
    parsed_patch_reward,
    parses,
    parses_reward,
    patch_reward,
    score_patch,
    source_language,
)

SAMPLE = Path(SAMPLE_DIR)

V = "int f(int x)\n{\n  return x;\n}"
F = "int f(int x)\n{\n  return x & 1;\n}"


def completion(answer: str) -> str:
    return f"<think>\nmask the value\n</think>\n<answer>\n{answer}\n</answer>"


def read(path: Path) -> list[dict]:
    """The records of a .jsonl file, `file_name` "None" read as None (as the loader does)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row | {"file_name": None if row["file_name"] == "None" else row["file_name"]} for row in rows]


def paired(rows: list[dict]) -> list[tuple[dict, dict]]:
    return list(zip(rows[::2], rows[1::2], strict=True))


def shipped_pairs() -> list[tuple[dict, dict]]:
    return [pair for path in sorted(SAMPLE.glob("*_paired.jsonl")) for pair in paired(read(path))]


def real_records() -> list[dict]:
    files = sorted(REAL_PRIMEVUL.glob("*.jsonl")) if REAL_PRIMEVUL.is_dir() else []
    if not files:
        pytest.skip("the real PrimeVul sample is not beside the repository")
    return [row for path in files for row in read(path)]


# The grammar


@pytest.mark.parametrize(
    ("name", "language"),
    [
        ("a.c", "c"),
        ("a.C", "cpp"),  # capital C is C++ (GCC's convention)
        ("a.cc", "cpp"),
        ("a.cpp", "cpp"),
        ("a.cxx", "cpp"),
        ("a.hpp", "cpp"),
        ("a.hh", "cpp"),
        ("a.h", None),  # either language
        ("Makefile", None),
        (None, None),
    ],
)
def test_file_language(name, language):
    assert file_language(name) == language


def test_every_function_of_the_shipped_sample_parses_as_c():
    functions = {r["func"]: r["file_name"] for path in SAMPLE.glob("*.jsonl") for r in read(path)}
    assert len(functions) == 50  # 18 pairs (36 functions) and 14 benign functions
    assert {source_language(func, name) for func, name in functions.items()} == {"c"}


def test_every_function_of_the_real_sample_parses():
    rows = real_records()
    assert len(rows) == 40
    for r in rows:
        # C++ files are judged as C++. The others as C, except functions that start at their name (the return type
        # was on the line above: 6 in .c files, 2 unnamed) and tensorflow's unnamed C++ one: only C++ reads them.
        starts_at_name = re.match(r"\w+\(", r["func"]) is not None
        cpp = file_language(r["file_name"]) == "cpp" or starts_at_name or "::" in r["func"]
        assert source_language(r["func"], r["file_name"]) == ("cpp" if cpp else "c"), r["idx"]
    assert sum(re.match(r"\w+\(", r["func"]) is not None for r in rows) == 8


def test_source_language_falls_back_to_cpp_only_from_c():
    at_name = "f(int x)\n{\n  return x;\n}"  # no return type: not C
    assert (parses(at_name, "c"), parses(at_name, "cpp")) == (False, True)
    assert source_language(at_name, "a.c") == source_language(at_name) == "cpp"
    not_cpp = "int f(int new)\n{\n  return new;\n}"  # `new` is a C++ keyword
    assert (parses(not_cpp, "c"), parses(not_cpp, "cpp")) == (True, False)
    assert source_language(not_cpp, "a.c") == "c"
    assert source_language(not_cpp, "a.cpp") is None  # a C++ file is not read as C


# parses_reward


def test_correct_patches_give_one_on_the_shipped_sample():
    pairs = shipped_pairs()
    assert len(pairs) == 18
    completions = [completion(make_oracle_edits(v["func"], f["func"])) for v, f in pairs]
    vulnerable, names = [v["func"] for v, _ in pairs], [v["file_name"] for v, _ in pairs]
    assert parses_reward(completions, vulnerable, file_name=names) == [1.0] * 18


def test_correct_patches_give_one_on_the_real_sample():
    pairs = paired(real_records())
    completions = [completion(make_oracle_edits(v["func"], f["func"])) for v, f in pairs]
    vulnerable, names = [v["func"] for v, _ in pairs], [v["file_name"] for v, _ in pairs]
    assert parses_reward(completions, vulnerable, file_name=names) == [1.0] * len(pairs)


READ_IDENT = next(v["func"] for v, _ in shipped_pairs() if v["func"].startswith("int read_ident"))


@pytest.mark.parametrize(
    ("search", "replace"),
    [
        ("    return (int)len;\n}\n", "    return (int)len;\n"),  # the closing brace deleted
        ("        n = read(fd, buf + len, size - len);\n", "        n = read(fd, buf + len, size - len;\n"),
        ("    buf[len] = '\\0';\n", "    buf[len] = '\\0';\n    else\n        return -1;\n"),  # stray else
        ("    size_t len = 0;\n", "    size_t len = 0\n"),  # missing semicolon (a MISSING node)
    ],
)
def test_patches_that_break_the_syntax_give_zero(search, replace):
    text = completion(block(search, replace))
    assert apply_completion(text, READ_IDENT)[0] is not None  # the edit applies: the parse is what fails
    assert parses_reward([text], [READ_IDENT], file_name=["ident.c"]) == [0.0]


@pytest.mark.parametrize(
    "text",
    [
        block("  return x;\n", "  return x & 1;\n"),  # no think/answer tags
        completion("mask it with 1"),  # no block
        completion(block("  return y;\n", "  return x & 1;\n")),  # SEARCH not found
    ],
)
def test_malformed_answers_give_minus_one(text):
    assert parses_reward([text], [V]) == [-1.0]


def test_an_original_that_does_not_parse_gives_no_score():
    unclosed = V[: -len("\n}")]  # "int f(int x)\n{\n  return x;": a MISSING "}" in C and C++
    assert source_language(unclosed) is None
    fine = completion(block("  return x;\n", "  return x & 1;\n"))
    assert parses_reward([fine, "no answer"], [unclosed] * 2) == [None, -1.0]


def test_the_grammar_follows_file_name():
    # std::size_t is C++: fine in a .cpp file, a syntax error in the C function of a .c file.
    text = completion(block("  return x;\n", "  std::size_t n = 0;\n  return x;\n"))
    assert parses_reward([text] * 3, [V] * 3, [F] * 3, file_name=["a.c", "a.cpp", None]) == [0.0, 1.0, 0.0]


def test_a_completion_is_applied_once_for_all_patch_rewards():
    texts = [completion(block("  return x;\n", f"  return x & {k};\n")) for k in range(3)]
    columns = {"vulnerable_func": [V] * 3, "fixed_func": [F] * 3, "file_name": ["a.c"] * 3}
    apply_completion.cache_clear()
    score_patch.cache_clear()
    patch_reward(texts, **columns)  # 3 misses
    parses_reward(texts, **columns)  # 3 hits
    parsed_patch_reward(texts, **columns)  # none: score_patch's own cache answers
    assert (apply_completion.cache_info().misses, apply_completion.cache_info().hits) == (3, 3)


def test_columns_need_one_value_per_completion():
    with pytest.raises(TTCError, match="parses_reward: got 2 completions but 1 file_name values"):
        parses_reward(["a", "b"], [V, V], file_name=["a.c"])


# parsed_patch_reward


def test_parsed_patch_reward_hand_worked():
    # Oracle diff (header dropped): "@@ -1,4 +1,4 @@" 15 + "\n int f(int x)" 14 + "\n {" 3 + "\n-  return x;" 13
    # + "\n+  return x & 1;" 17 + "\n }" 3 = 65 characters.
    similar = completion(block("  return x;\n", "  return x | 1;\n"))
    # Same length, one character differs ("|" for "&"): 64 matched, ratio 2 * 64 / 130 = 64 / 65.
    broken = completion(block("  return x;\n", "  return (x & 1;\n"))
    # The oracle diff plus "(" (66 characters): all 65 of the oracle's match, 2 * 65 / 131 = 130 / 131 as SWE-RL's,
    # but the parenthesis is unbalanced: 0.
    columns = {"vulnerable_func": [V] * 3, "fixed_func": [F] * 3, "file_name": ["a.c"] * 3}
    texts = [similar, broken, "no answer"]
    assert patch_reward(texts, **columns) == pytest.approx([64 / 65, 130 / 131, -1.0])
    assert parsed_patch_reward(texts, **columns) == pytest.approx([64 / 65, 0.0, -1.0])


def test_parsed_patch_reward_without_a_parse_of_the_original_is_the_similarity():
    unclosed_v, unclosed_f = V[: -len("\n}")], F[: -len("\n}")]
    # Diffs without the "\n }" line: 65 - 3 = 62 characters, one differs: 61 / 62. The result does not parse
    # either, but there is no parse to break.
    texts = [completion(block("  return x;\n", "  return x | 1;\n"))]
    assert parsed_patch_reward(texts, [unclosed_v], [unclosed_f]) == pytest.approx([61 / 62])
