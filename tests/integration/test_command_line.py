"""A command line that does not parse: one `ttc: error:` line naming the option, a suggestion for a typo, status 2."""

import pytest

from tests.conftest import REPO

DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.betaa", "0.1"], "unknown option --model.betaa; did you mean --model.beta?"),
        (["--data.batch_sise", "3"], "unknown option --data.batch_sise; did you mean --data.batch_size?"),
        (["--trainer.max_stepz", "3"], "unknown option --trainer.max_stepz; did you mean --trainer.max_steps?"),
        (["--model.lora", "{rr: 3}"], "unknown option --model.lora.rr; did you mean --model.lora.r?"),
        (["--model.levers", "{cuda_grap: 0}"], "unknown option --model.levers.cuda_grap; did you mean "),
        (["--model.loss_type", "dapoo"], "--model.loss_type: 'dapoo' is not one of grpo, bnpo, dapo, dr_grpo"),
        (["--model.beta", "abc"], "--model.beta: expected a float, got 'abc'"),
        (["--trainer.precision", "bf17"], "--trainer.precision: 'bf17' is not one of transformer-engine,"),
        (["--bogus", "1"], "unknown option --bogus; `ttc SUBCOMMAND --help` lists the options"),
        (["--config", "missing.yaml"], "missing.yaml: no such file"),  # the path as jsonargparse resolved it
    ],
)
def test_a_command_line_that_does_not_parse_is_one_line(run_ttc, args, expected):
    code, out, err = run_ttc("fit", "--config", DEMO, *args)
    assert code == 2
    assert err.startswith("ttc: error: ") and expected in err, err
    assert err.count("\n") == 1 and not out  # no usage, no nested report of the union subtypes tried


def test_help_describes_the_subcommands_in_ttcs_words(run_ttc):
    code, out, _ = run_ttc("--help")
    assert code == 0
    text = " ".join(out.split())
    assert text.startswith("usage: ttc ")
    assert "fit Train the policy with GRPO" in text and "predict Write predictions.jsonl" in text
    assert "never run on your" not in text and "model forward function" not in text  # Lightning's docstrings
