import json
import random

import pytest

from tests.helpers import REAL_PRIMEVUL, block
from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.answers import split_think_answer
from ttc_lightning.rewards.patch import (
    Edit,
    PatchError,
    apply_edits,
    exact_fix_reward,
    format_edits,
    make_oracle_edits,
    parse_edits,
    patch_reward,
    score_patch,
)

FUNC = "\n".join(
    [
        "int f(int x)",
        "{",
        "  if (x < 0)",
        "    return 0;",
        "  if (x > 9)",
        "    return 0;",
        "  return x;",
        "}",
    ]
)
LINES = FUNC.split("\n")


def completion(answer: str) -> str:
    return f"<think>\nclamp the value\n</think>\n<answer>\n{answer}\n</answer>"


def real_pairs() -> list[tuple[str, str]]:
    files = sorted(REAL_PRIMEVUL.glob("*.jsonl")) if REAL_PRIMEVUL.is_dir() else []
    if not files:
        pytest.skip("the PrimeVul sample is not beside the repository")
    pairs = []
    for path in files:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        pairs += [(v["func"], f["func"]) for v, f in zip(rows[::2], rows[1::2], strict=True)]
    return pairs


# split_think_answer


def test_split_think_answer_strips_both_parts():
    assert split_think_answer("<think> a </think>\n<answer>\nyes\n</answer>") == ("a", "yes")


def test_split_think_answer_allows_surrounding_text_and_empty_think():
    assert split_think_answer("Sure.\n<think>\n\n</think><answer>no</answer> done") == ("", "no")


@pytest.mark.parametrize(
    "text",
    [
        "<answer>yes</answer>",  # no think
        "<think>a</think>",  # no answer
        "<think>a</think><think>b</think><answer>yes</answer>",
        "<think>a</think><answer>yes</answer><answer>no</answer>",
        "<answer>yes</answer><think>a</think>",  # wrong order
        "<think>a<answer>yes</answer></think>",  # answer inside think
        "<think>a</think><answer>yes",  # unterminated
    ],
)
def test_split_think_answer_rejects_missing_duplicated_or_misordered_tags(text):
    assert split_think_answer(text) is None


# parse_edits / format_edits


def test_parse_one_block():
    assert parse_edits(block("a\nb\n", "c\n")) == [Edit("a\nb\n", "c\n")]


def test_parse_ignores_text_and_fences_between_blocks():
    first, second = block("a\n", "b\n"), block("c\n", "")
    text = f"Fix:\n```c\n{first}\n```\nand\n```c\n{second}\n```"
    assert parse_edits(text) == [Edit("a\n", "b\n"), Edit("c\n", "")]


def test_parse_crlf_and_whitespace_around_markers():
    text = "  <<<<<<< SEARCH \r\n  int x;\r\n=======\t\r\n  int x = 0;\r\n>>>>>>> REPLACE  \r\n"
    assert parse_edits(text) == [Edit("  int x;\n", "  int x = 0;\n")]


def test_parse_keeps_blank_lines_apart_from_no_lines():
    # A REPLACE of one blank line is "\n"; an empty REPLACE (a deletion) is "".
    assert parse_edits(block("a\n", "\n")) == [Edit("a\n", "\n")]
    assert parse_edits(block("a\n", "")) == [Edit("a\n", "")]


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("no blocks here", "no SEARCH/REPLACE block"),
        ("", "no SEARCH/REPLACE block"),
        ("<<<<<<< SEARCH\na\n=======\nb\n", "unterminated"),
        ("<<<<<<< SEARCH\na\n", "unterminated"),
        ("<<<<<<< SEARCH\na\n>>>>>>> REPLACE", "before '======='"),
        ("<<<<<<< SEARCH\na\n=======\nb\n=======\n>>>>>>> REPLACE", "second '======='"),
        ("<<<<<<< SEARCH\na\n<<<<<<< SEARCH\na\n=======\n>>>>>>> REPLACE", "line 3"),
        (">>>>>>> REPLACE", "without"),
    ],
)
def test_parse_errors_say_why(text, reason):
    with pytest.raises(PatchError, match=reason):
        parse_edits(text)


def test_format_then_parse_round_trips():
    edits = [Edit("a\n\nb\n", ""), Edit("  c\n", "  c\n  d\n")]
    assert format_edits(edits) == (
        "<<<<<<< SEARCH\na\n\nb\n=======\n>>>>>>> REPLACE\n\n<<<<<<< SEARCH\n  c\n=======\n  c\n  d\n>>>>>>> REPLACE"
    )
    assert parse_edits(format_edits(edits)) == edits


def test_format_refuses_a_line_that_reads_as_a_marker():
    with pytest.raises(PatchError, match="marker"):
        format_edits([Edit("a\n", "=======\n")])


# apply_edits


def test_apply_replaces_whole_lines():
    assert apply_edits("a\nb\nc", [Edit("b\n", "B\nB2\n")]) == "a\nB\nB2\nc"


def test_apply_matches_whole_lines_only():
    # "int x" is a prefix of line 1, not a line: not found.
    with pytest.raises(PatchError, match="edit 1: SEARCH text not found"):
        apply_edits("int x = 0;\nreturn x;", [Edit("int x\n", "int y\n")])


def test_apply_is_exact_about_indentation():
    with pytest.raises(PatchError, match="not found"):
        apply_edits("  return 0;", [Edit("return 0;\n", "return 1;\n")])


def test_apply_in_order_on_the_edited_text():
    # Edit 2 finds "B", which only exists after edit 1.
    assert apply_edits("a\nb", [Edit("b\n", "B\n"), Edit("B\n", "C\n")]) == "a\nC"


def test_apply_search_without_final_newline_is_the_same_line():
    assert apply_edits("a\nb", [Edit("a", "z")]) == "z\nb"


def test_apply_keeps_the_source_final_newline_state():
    assert apply_edits("a\nb\n", [Edit("b\n", "c\n")]) == "a\nc\n"
    assert apply_edits("a\nb", [Edit("b\n", "c\n")]) == "a\nc"
    assert apply_edits("a\nb", [Edit("b\n", "")]) == "a"
    assert apply_edits("a\n", [Edit("a\n", "")]) == ""


def test_apply_reads_crlf_and_writes_lf():
    assert apply_edits("a\r\nb\r\n", [Edit("b\n", "c\n")]) == "a\nc\n"


def test_apply_does_not_split_on_form_feed():
    # str.splitlines would split "\f"; a C file's page break stays inside its line.
    assert apply_edits("a\f\nb", [Edit("a\f\n", "z\n")]) == "z\nb"


@pytest.mark.parametrize(
    ("edits", "reason"),
    [
        ([Edit("", "x\n")], "edit 1: empty SEARCH"),
        ([Edit("b\n", "b\n")], "edit 1: SEARCH equals REPLACE"),
        ([Edit("b\n", "B\n"), Edit("b\n", "B\n")], "edit 2: SEARCH text not found"),
        ([Edit("}\n", "};\n")], r"ambiguous \(found 3 times\)"),
        ([Edit("}\n}\n", "")], r"ambiguous \(found 2 times\)"),  # overlapping matches at lines 2 and 3
    ],
)
def test_apply_errors_say_why(edits, reason):
    with pytest.raises(PatchError, match=reason):
        apply_edits("a\nb\n}\n}\n}", edits)


# make_oracle_edits


def oracle(new_lines: list[str]) -> str:
    edits = make_oracle_edits(FUNC, "\n".join(new_lines))
    assert apply_edits(FUNC, parse_edits(edits)) == "\n".join(new_lines)
    return edits


def test_oracle_change_at_first_line():
    assert oracle(["int f(long x)", *LINES[1:]]) == block("int f(int x)\n", "int f(long x)\n")


def test_oracle_change_at_last_line():
    assert oracle([*LINES[:-1], "} /* f */"]) == block("}\n", "} /* f */\n")


def test_oracle_repeated_line_takes_context_above():
    # "    return 0;" is lines 3 and 5: one line above makes line 5 unique.
    new = [*LINES[:5], "    return 9;", *LINES[6:]]
    assert oracle(new) == block("  if (x > 9)\n    return 0;\n", "  if (x > 9)\n    return 9;\n")


def test_oracle_insertion_anchors_on_the_unique_side():
    # Insert before "  return x;": the line above ("    return 0;") is ambiguous, the one below is unique.
    new = [*LINES[:6], "  x &= 0xff;", *LINES[6:]]
    assert oracle(new) == block("  return x;\n", "  x &= 0xff;\n  return x;\n")


def test_oracle_insertion_at_top_anchors_below():
    assert oracle(["static", *LINES]) == block("int f(int x)\n", "static\nint f(int x)\n")


def test_oracle_insertion_at_end_anchors_above():
    assert oracle([*LINES, "/* end */"]) == block("}\n", "}\n/* end */\n")


def test_oracle_deletion():
    assert oracle([*LINES[:4], *LINES[6:]]) == block("  if (x > 9)\n    return 0;\n", "")


def test_oracle_two_hunks_on_identical_lines():
    # Both "return 0;" lines change; each takes its `if` line above to be unique.
    new = [*LINES[:3], "    return -1;", LINES[4], "    return -1;", *LINES[6:]]
    assert oracle(new) == (
        block("  if (x < 0)\n    return 0;\n", "  if (x < 0)\n    return -1;\n")
        + "\n\n"
        + block("  if (x > 9)\n    return 0;\n", "  if (x > 9)\n    return -1;\n")
    )


def test_oracle_merges_into_the_next_hunk_when_context_reaches_it():
    # "x" and "x q" occur twice; "x q r" is unique but holds the next change (r -> R): one block.
    assert make_oracle_edits("x\nq\nr\ns\nx\nq", "X\nq\nR\ns\nx\nq") == block("x\nq\nr\n", "X\nq\nR\n")


def test_oracle_merges_into_the_previous_hunk_when_no_window_below_it_is_unique():
    # The second "x" (line 4) has only "x", "x }" below the first block, both also at line 1: merged.
    assert make_oracle_edits("{\nx\n}\n{\nx\n}", "{\ny\n}\n{\ny\n}") == block("x\n}\n{\nx\n", "y\n}\n{\ny\n")


def test_oracle_keeps_final_newline_when_both_have_it():
    v, f = "a\nb\nc\n", "a\nB\nc\n"
    assert apply_edits(v, parse_edits(make_oracle_edits(v, f))) == f


def test_oracle_cannot_change_the_final_newline():
    # Edits are whole lines: the result keeps the vulnerable function's missing final newline.
    v, f = "a\nb", "a\nB\n"
    assert apply_edits(v, parse_edits(make_oracle_edits(v, f))) == "a\nB"


@pytest.mark.parametrize(("v", "f"), [(FUNC, FUNC), ("a\nb", "a\nb\n"), ("a\nb", "a\r\nb")])
def test_oracle_of_functions_with_the_same_lines_is_an_error(v, f):
    with pytest.raises(PatchError, match="nothing to edit"):
        make_oracle_edits(v, f)


def test_oracle_of_an_empty_function_is_an_error():
    with pytest.raises(PatchError, match="empty function"):
        make_oracle_edits("", "int x;")


def test_oracle_round_trips_on_random_functions_full_of_repeats():
    # Few distinct lines ("}", "return 0;", blank) make windows ambiguous and force expansion and merging.
    rng = random.Random(0)
    alphabet = ["}", "return 0;", "", "a"]
    for _ in range(2000):
        old = [rng.choice(alphabet) for _ in range(rng.randint(1, 10))]
        new = list(old)
        for _ in range(rng.randint(1, 4)):
            at = rng.randint(0, len(new))
            choice = rng.random()
            if choice < 0.4 or not new:
                new.insert(at, rng.choice([*alphabet, "X"]))
            elif choice < 0.7:
                del new[min(at, len(new) - 1)]
            else:
                new[min(at, len(new) - 1)] = rng.choice([*alphabet, "Y"])
        v, f = "".join(line + "\n" for line in old), "".join(line + "\n" for line in new)
        if old == new:
            continue
        edits = parse_edits(make_oracle_edits(v, f))
        assert apply_edits(v, edits) == f
        for edit in edits:  # each SEARCH is also unique in the vulnerable function itself
            apply_edits(v, [edit])


def test_oracle_round_trips_on_real_pairs():
    for v, f in real_pairs():
        edits = parse_edits(make_oracle_edits(v, f))
        assert apply_edits(v, edits) == f
        for edit in edits:
            apply_edits(v, [edit])


# score_patch and the rewards

V, F = "a\nb\nc", "a\nB\nc"
# Oracle diff of V -> F (header dropped): "@@ -1,3 +1,3 @@\n a\n-b\n+B\n c", 15 + 4 * 3 = 27 characters.


def test_score_of_the_oracle_is_one():
    score = score_patch(completion(make_oracle_edits(V, F)), V, F)
    assert score == score_patch(completion(block("b\n", "B\n")), V, F)
    assert (score.applied, score.patched, score.reward, score.exact, score.error) == (True, F, 1.0, True, None)


def test_score_of_a_wrong_line_hand_worked():
    # Predicted diff "@@ -1,3 +1,3 @@\n a\n-b\n+X\n c" (27 chars) matches the oracle's in its first 23 chars
    # ("@@ -1,3 +1,3 @@" 15 + "\n a" 3 + "\n-b" 3 + "\n+" 2) and its last 3 ("\n c"): ratio 2 * 26 / 54 = 26 / 27.
    score = score_patch(completion(block("b\n", "X\n")), V, F)
    assert (score.applied, score.patched, score.exact) == (True, "a\nX\nc", False)
    assert score.reward == pytest.approx(26 / 27)


def test_score_of_a_fix_with_other_whitespace_is_exact_but_not_one():
    # Predicted "+  B" makes the diff 29 chars; matches: 23-char prefix + "B\n c" (4): 2 * 27 / (29 + 27) = 27 / 28.
    score = score_patch(completion(block("b\n", "  B\n")), V, F)
    assert score.exact
    assert score.reward == pytest.approx(27 / 28)


def test_score_of_edits_that_cancel_out_is_zero():
    score = score_patch(completion(block("b\n", "X\n") + "\n" + block("X\n", "b\n")), V, F)
    assert (score.applied, score.patched, score.reward, score.exact) == (True, V, 0.0, False)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (block("b\n", "B\n"), "malformed completion"),  # no think/answer tags
        (completion("add a check"), "no SEARCH/REPLACE block"),
        (completion(block("z\n", "B\n")), "not found"),
        (completion(block("b\n", "b\n")), "SEARCH equals REPLACE"),
        (completion(block("b\n", "B\n")) + "<answer></answer>", "malformed completion"),
    ],
)
def test_score_of_a_malformed_answer_is_minus_one(text, reason):
    score = score_patch(text, V, F)
    assert (score.applied, score.patched, score.reward, score.exact) == (False, None, -1.0, False)
    assert reason in score.error


def test_score_of_an_ambiguous_search_is_minus_one():
    score = score_patch(completion(block("}\n", "};\n")), "}\n}", "};\n}")
    assert score.reward == -1.0
    assert "found 2 times" in score.error


def test_rewards_per_completion():
    completions = [completion(block("b\n", "B\n")), completion(block("b\n", "X\n")), "no tags", completion("")]
    columns = {"vulnerable_func": [V] * 4, "fixed_func": [F] * 4, "cwe": [["CWE-787"]] * 4}
    assert patch_reward(completions, **columns) == pytest.approx([1.0, 26 / 27, -1.0, -1.0])
    assert exact_fix_reward(completions, **columns) == [1.0, 0.0, 0.0, 0.0]


def test_rewards_on_real_pairs_score_the_oracle_one():
    pairs = real_pairs()
    completions = [completion(make_oracle_edits(v, f)) for v, f in pairs]
    vulnerable, fixed = [v for v, _ in pairs], [f for _, f in pairs]
    assert patch_reward(completions, vulnerable, fixed) == [1.0] * len(pairs)
    assert exact_fix_reward(completions, vulnerable, fixed) == [1.0] * len(pairs)


def test_rewards_need_one_column_value_per_completion():
    with pytest.raises(TTCError, match="2 completions but 1 vulnerable_func"):
        patch_reward(["a", "b"], vulnerable_func=[V], fixed_func=[F, F])
