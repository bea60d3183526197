import pytest

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards.answers import normalize_label, parse_answer
from ttc_lightning.rewards.classify import format_reward, label_reward


def wrap(answer: str) -> str:
    return f"<think>The length check happens after the copy.</think>\n<answer>{answer}</answer>"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("vulnerable", "vulnerable"),
        ("  Vulnerable\n", "vulnerable"),
        ("BENIGN", "benign"),
        ("**Vulnerable.**", "vulnerable"),
        ("`benign`", "benign"),
        ("Other", "other"),
        ("CWE-787", "CWE-787"),
        ("cwe-787", "CWE-787"),
        ("CWE 787", "CWE-787"),
        ("CWE_787", "CWE-787"),
        ("cwe787", "CWE-787"),
        ("CWE: 787", "CWE-787"),
        ("CWE-0787", "CWE-787"),
        ("787", None),  # a bare number is not the asked-for form
        ("not vulnerable", None),  # no substring matching: this must not read as "vulnerable"
        ("vulnerable (CWE-787)", None),
        ("CWE-787, CWE-125", None),
        ("", None),
    ],
)
def test_parse_answer_normalises(answer, expected):
    assert parse_answer(wrap(answer)) == expected


@pytest.mark.parametrize(
    "text",
    [
        "<think>x</think> vulnerable",  # no answer block
        "<think>x</think><answer>benign</answer><answer>vulnerable</answer>",  # two answers
        "<think>x</think><answer>benign</answer></answer>",  # stray closing tag
        "<think>x</think><answer>benign",  # unclosed
        "<think>x</think></answer>benign<answer>",  # tags reversed
    ],
)
def test_parse_answer_rejects_malformed_blocks(text):
    assert parse_answer(text) is None


def test_parse_answer_ignores_the_think_block():
    # the answer block alone decides; the layout is format_reward's job
    assert parse_answer("<answer>benign</answer>") == "benign"


def test_normalize_label_on_gold_values():
    assert normalize_label("CWE-20") == "CWE-20"
    assert normalize_label("NVD-CWE-Other") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>a</think><answer>b</answer>", 1.0),  # all four tags once: 4 * 0.25
        ("a</think><answer>b</answer>", 0.75),  # <think> missing
        ("<think>a</think><answer>b</answer><answer>c</answer>", 0.5),  # <answer> and </answer> twice: no credit
        ("<think>a<think>b</think>", 0.25),  # only </think> appears exactly once
        ("just an answer: vulnerable", 0.0),
        ("", 0.0),
    ],
)
def test_format_reward_partial_credit(text, expected):
    assert format_reward([text]) == [expected]


def test_format_reward_one_score_per_completion():
    rewards = format_reward(["<think></think><answer></answer>", "", "<answer>x</answer>"])
    assert rewards == [1.0, 0.0, 0.5]
    assert all(type(r) is float for r in rewards)


def test_label_reward():
    completions = [
        wrap("Vulnerable"),  # right, different case
        wrap("cwe 787"),  # right after normalising both sides
        wrap("benign"),  # wrong
        "<answer>vulnerable</answer><answer>vulnerable</answer>",  # malformed, even though the label is right
        wrap("787"),  # unparsable
    ]
    label = ["vulnerable", "CWE-787", "vulnerable", "vulnerable", "CWE-787"]
    assert label_reward(completions, label=label, prompt_id=[0] * 5) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_label_reward_rejects_bad_gold_labels():
    with pytest.raises(TTCError, match="label: 'NVD-CWE-noinfo'"):
        label_reward([wrap("other")], label=["NVD-CWE-noinfo"])
    with pytest.raises(ValueError, match="2 completions but 1 labels"):
        label_reward([wrap("other"), wrap("other")], label=["other"])
