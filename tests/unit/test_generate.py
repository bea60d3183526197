"""`ttc generate`'s report of one completion: reasoning, answer, and the label or the patch as a diff."""

from ttc_lightning.run.generate import report

FUNC = "int get(char *b, int n) {\n    return b[n];\n}\n"


def test_a_patch_that_applies_is_shown_as_a_diff():
    completion = (
        "<think>n is not checked</think><answer>\n<<<<<<< SEARCH\n    return b[n];\n=======\n"
        "    if (n < 0) return -1;\n    return b[n];\n>>>>>>> REPLACE\n</answer>"
    )
    text = report("patch", FUNC, completion)
    assert text.startswith("reasoning:\nn is not checked\n\nanswer:\n<<<<<<< SEARCH")
    assert text.endswith(
        "patch:\n--- function\n+++ patched\n@@ -1,3 +1,4 @@\n int get(char *b, int n) {\n"
        "+    if (n < 0) return -1;\n     return b[n];\n }"
    )


def test_a_patch_that_does_not_apply_says_why():
    completion = "<think>x</think><answer><<<<<<< SEARCH\nnot there\n=======\ny\n>>>>>>> REPLACE</answer>"
    assert "patch: does not apply: " in report("patch", FUNC, completion)


def test_a_label_and_a_malformed_completion():
    assert report("classify", FUNC, "<think>b[n]</think><answer>Vulnerable</answer>").endswith("label: vulnerable")
    assert report("classify", FUNC, "<think></think><answer>maybe</answer>").endswith(
        "label: none (the answer holds no valid label)"
    )
    assert report("patch", FUNC, "  \n").endswith("'  \\n' (whitespace only)")
