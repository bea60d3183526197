import pytest
import torch

from ttc_lightning.evaluation.evaluator import gather_records
from ttc_lightning.evaluation.records import (
    classification_metrics,
    classify_prediction,
    oracle_metrics,
    patch_metrics,
    patch_prediction,
)


def answer(label: str) -> str:
    return f"<think>looking at the bounds</think><answer>{label}</answer>"


def record(label: str, pair_id: str, completions: list[str]) -> dict:
    return {"columns": {"label": label, "pair_id": pair_id}, "completions": completions, "lengths": [10] * 3}


# Two pairs, k = 3 samples each; gold labels [vulnerable, benign, vulnerable, benign].
RECORDS = [
    record("vulnerable", "a", [answer("vulnerable"), answer("vulnerable"), answer("benign")]),  # vote v, share 2/3
    record("benign", "a", [answer("benign"), answer("benign"), "no tags at all"]),  # vote b, share 0
    record("vulnerable", "b", [answer("benign"), answer("benign"), answer("vulnerable")]),  # vote b, share 1/3
    record("benign", "b", [answer("vulnerable")] * 3),  # vote v, share 1
]


def test_vote_and_score_of_one_prompt():
    prediction = classify_prediction(RECORDS[0])
    assert prediction["final"] == "vulnerable"
    assert prediction["score"] == pytest.approx(2 / 3)
    assert classify_prediction(RECORDS[1])["answers"] == ["benign", "benign", None]


def test_binary_classification_metrics():
    m = classification_metrics(RECORDS, "binary")
    assert m["accuracy"] == 0.5  # votes [v, b, b, v] vs gold [v, b, v, b]: 2 of 4
    assert m["accuracy_single"] == pytest.approx(6 / 12)  # correct samples 2 + 3 + 1 + 0 of 12 (no answer: benign)
    assert m["format_valid"] == pytest.approx(11 / 12)  # one sample has no tags
    # TP 1 (pair a), FP 1 (pair b fixed half), FN 1 (pair b vulnerable half): P = R = F1 = 1/2
    assert (m["precision"], m["recall"], m["f1"]) == (0.5, 0.5, 0.5)
    # pair a (1, 0) is correct, pair b (0, 1) is reversed: 1 of 2 pairs each
    assert (m["P-C"], m["P-V"], m["P-B"], m["P-R"]) == (0.5, 0.0, 0.0, 0.5)
    # the benign half of pair b scores 1.0, above every vulnerable one: at FPR 0 nothing is flagged, FNR = 1
    assert m["vd_score"] == 1.0
    assert m["mean_length"] == 10


def test_no_answer_counts_as_benign_in_every_binary_metric():
    records = [record(label, pair, ["no tags at all"]) for pair in "abc" for label in ("vulnerable", "benign")]
    m = classification_metrics(records, "binary")
    # every function called benign: the 3 benign ones are right (accuracy 3/6), every pair is "both benign"
    assert (m["accuracy"], m["accuracy_single"], m["P-B"], m["P-C"]) == (0.5, 0.5, 1.0, 0.0)
    assert (m["recall"], m["format_valid"]) == (0.0, 0.0)


def test_cwe_metrics_have_a_per_class_table():
    records = [
        record("CWE-787", "", [answer("CWE-787")] * 3),
        record("CWE-125", "", [answer("CWE-787"), answer("cwe 125"), answer("CWE-125")]),  # vote CWE-125
    ]
    m = classification_metrics(records, "cwe")
    assert m["accuracy"] == 1.0
    assert m["accuracy_single"] == pytest.approx(5 / 6)
    assert set(m["per_class"]) == {"CWE-787", "CWE-125"}
    assert m["macro_f1"] == 1.0


VULNERABLE = "int get(int n) {\n  return buf[n];\n}\n"
FIXED = "int get(int n) {\n  if (n < 0) return 0;\n  return buf[n];\n}\n"
FIX = (
    "<think>n can be negative</think><answer>\n<<<<<<< SEARCH\n  return buf[n];\n=======\n"
    "  if (n < 0) return 0;\n  return buf[n];\n>>>>>>> REPLACE\n</answer>"
)
PATCH_RECORD = {
    "columns": {"vulnerable_func": VULNERABLE, "fixed_func": FIXED},
    "completions": [FIX, "I would add a check.", FIX],
    "lengths": [40, 5, 40],
}


def test_final_patch_is_the_most_common_that_applies():
    prediction = patch_prediction(PATCH_RECORD)
    assert prediction["final"] == FIXED
    assert prediction["applied"] == [True, False, True]
    assert prediction["score"] == 1.0 and prediction["final_exact"]


def test_patch_metrics():
    m = patch_metrics([PATCH_RECORD])
    # 2 of 3 samples apply and are exact: pass@1 = 2/3, pass@3 = 1 - C(1,3)/C(3,3) = 1
    assert m["applied_pass@1"] == pytest.approx(2 / 3) and m["applied_pass@3"] == 1.0
    assert m["exact_pass@1"] == pytest.approx(2 / 3) and m["exact_pass@3"] == 1.0
    assert m["patch_reward"] == pytest.approx((1 + -1 + 1) / 3)
    assert m["final_exact"] == 1.0
    assert m["format_valid"] == pytest.approx(2 / 3)
    assert m["mean_length"] == pytest.approx(85 / 3)


def test_no_patch_applies():
    m = patch_prediction({**PATCH_RECORD, "completions": ["nothing"] * 2})
    assert m["final"] is None and m["score"] == -1.0


SLIGHTLY_OFF = FIX.replace("return 0;", "return -1;")  # applies, proof fixed, one test of two fails


def oracle_record(completions: list[str], grades: list[float | None]) -> dict:
    return {**PATCH_RECORD, "completions": completions, "rewards": {"oracle": grades}}


def test_oracle_metrics_read_the_final_patchs_verdict():
    records = [
        # final = FIX (2 votes of 3), its grade 1.0: passes, proof fixed; 2 of 3 samples pass
        oracle_record([FIX, SLIGHTLY_OFF, FIX], [1.0, 0.7, 1.0]),
        # final = SLIGHTLY_OFF (2 votes), grade 0.7 = 0.5 + 0.4 * 1/2: proof fixed, does not pass; 1 of 3 passes
        oracle_record([SLIGHTLY_OFF, FIX, SLIGHTLY_OFF], [0.7, 1.0, 0.7]),
        # nothing applies: no final patch, counts as neither
        oracle_record(["no patch", "no patch", "no patch"], [-1.0, -1.0, -1.0]),
        # no harness: every grade None, left out
        oracle_record([FIX, FIX, FIX], [None, None, None]),
    ]
    m = oracle_metrics(records, "oracle")
    assert m["oracle/oracle/final_pass"] == pytest.approx(1 / 3)  # of the 3 judged prompts, the first
    assert m["oracle/oracle/final_proof_fixed"] == pytest.approx(2 / 3)  # the first two
    # pass@1 per prompt = passing / 3: (2/3 + 1/3 + 0) / 3 = 1/3; pass@3: (1 + 1 + 0) / 3 = 2/3
    assert m["oracle/oracle/pass@1"] == pytest.approx(1 / 3)
    assert m["oracle/oracle/pass@3"] == pytest.approx(2 / 3)


def test_oracle_metrics_are_empty_without_a_judged_prompt():
    assert oracle_metrics([oracle_record([FIX], [None])], "oracle") == {}


def test_piped_metrics_keep_their_whole_names_and_four_decimals():
    import io

    from ttc_lightning.evaluation.evaluator import print_metrics

    stream = io.StringIO()  # not a terminal
    print_metrics("test", {"test/rewards/char_fraction_reward/mean": 24.83333396911621, "test/f1": 0.5}, stream)
    assert stream.getvalue().splitlines() == [
        "test/rewards/char_fraction_reward/mean     24.8333",
        "test/f1                                     0.5000",
    ]


def test_gathered_records_come_back_in_the_data_order_each_once(monkeypatch):
    # 5 rows on 2 ranks: the sampler fills the last round with row 0 again; rank 0 has rows 0, 2, 4 (positions 0, 2,
    # 4), rank 1 rows 1, 3, 0 (positions 1, 3, 5): position 5 >= 5 is the fill-in
    shares = [[{"row": 0}, {"row": 2}, {"row": 4}], [{"row": 1}, {"row": 3}, {"row": 0}]]

    def all_gather_object(out, _mine):
        out[:] = shares

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    assert [r["row"] for r in gather_records(shares[0], 2, total=5)] == [0, 1, 2, 3, 4]
    assert len(gather_records(shares[0], 2)) == 6  # no length known: every record kept
