"""A command line that does not parse: one `ttc: error:` line naming the option, a suggestion for a typo, status 2."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import DEMO, REPO


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.betaa", "0.1"], "unknown option --model.betaa; did you mean --model.beta?"),
        (["--data.batch_sise", "3"], "unknown option --data.batch_sise; did you mean --data.batch_size?"),
        (["--trainer.max_stepz", "3"], "unknown option --trainer.max_stepz; did you mean --trainer.max_steps?"),
        (["--model.lora", "{rr: 3}"], "unknown option --model.lora.rr; did you mean --model.lora.r?"),
        (["--model.levers", "{cuda_grap: 0}"], "unknown option --model.levers.cuda_grap; did you mean "),
        (["--model.loss_type", "dapoo"], "--model.loss_type: 'dapoo' is not a choice; did you mean dapo? (grpo, bnpo,"),
        (["--model.loss_type", "xyz"], "--model.loss_type: 'xyz' is not one of grpo, bnpo, dapo, dr_grpo"),
        (["--progress.mode", "bars"], "--progress.mode: 'bars' is not a choice; did you mean bar? (auto, bar, lines)"),
        (["--model.beta", "abc"], "--model.beta: expected a float, got 'abc'"),
        (["--trainer.max_steps", "abc"], "--trainer.max_steps: expected an int, got 'abc'"),
        (["--trainer.max_epochs", "x"], "--trainer.max_epochs: expected an int or null, got 'x'"),
        (["--trainer.precision", "bf17"], "--trainer.precision: 'bf17' is not a choice; did you mean bf16? (transfor"),
        # No option may be abbreviated: a prefix of an option's name is a typo, also inside a class's options.
        (["--trainer.max_step", "3"], "unknown option --trainer.max_step; did you mean --trainer.max_steps?"),
        (["--model.levers.cuda_grap", "false"], "unknown option --model.levers.cuda_grap; did you mean --model.leve"),
        (["--overwrit"], "unknown option --overwrit; did you mean --overwrite?"),
        # A value left out names the option given, not the class option it belongs to.
        (["--model.beta"], "--model.beta: expected a value"),
        (["--model.lora.r", "--trainer.max_steps", "1"], "--model.lora.r: expected a value"),
        (["--trainer.max_steps"], "--trainer.max_steps: expected a value"),
        # A class path that does not import, with ttc's classes for the option.
        (
            ["--data.class_path", "ttc_lightning.data.PrimeVulPatc"],
            "--data.class_path: cannot import ttc_lightning.data.PrimeVulPatc; did you mean "
            "ttc_lightning.data.PrimeVulPatchDataModule?",
        ),
        (
            ["--data.class_path", "ttc_lightning.data.NoSuch"],
            "--data.class_path: cannot import ttc_lightning.data.NoSuch; ttc's classes for --data: "
            "ttc_lightning.data.PrimeVulClassificationDataModule, ttc_lightning.data.PrimeVulPatchDataModule, "
            "ttc_lightning.data.PromptDataModule",
        ),
        (
            ["--model.class_path", "ttc_lightning.GRPOModul"],
            "--model.class_path: cannot import ttc_lightning.GRPOModul; did you mean ttc_lightning.GRPOModule?",
        ),
        (["--bogus", "1"], "unknown option --bogus; `ttc SUBCOMMAND --help` lists the options"),
        (["stray"], "unexpected argument 'stray': options start with -- (`ttc SUBCOMMAND --help` lists them)"),
        (["--model.rewards", "null"], "--model.rewards: required (not null); give it in a --config file or on the co"),
        (["--config", DEMO.replace("demo.yaml", "nothere.yaml")], "nothere.yaml: no such file\n"),  # none is close
        (["--model.dtype", "fp16"], "--model.dtype: 'fp16' is not a choice; did you mean float16? (auto, float32,"),
        (["--model.dtype", "BF16"], "--model.dtype: 'BF16' is not a choice; did you mean bfloat16? (auto, float32,"),
        # A missing config file as it was given, and the file beside it with the closest name.
        (["--config", "missing.yaml"], "ttc: error: --config missing.yaml: no such file\n"),
        (["--config", DEMO.replace("demo.yaml", "demoo.yaml")], f"demoo.yaml: no such file; did you mean {DEMO}?"),
    ],
)
def test_a_command_line_that_does_not_parse_is_one_line(run_ttc, args, expected):
    code, out, err = run_ttc("fit", "--config", DEMO, *args)
    assert code == 2
    assert err.startswith("ttc: error: ") and expected in err, err
    assert err.count("\n") == 1 and not out  # no usage, no nested report of the union subtypes tried


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["fitt"],
            "unknown command 'fitt'; did you mean fit? (fit, validate, test, predict, export, generate, oracle)",
        ),
        (
            ["exprot"],
            "unknown command 'exprot'; did you mean export? (fit, validate, test, predict, export, generate, oracle)",
        ),
        (["bogus"], "unknown command 'bogus'; give one of fit, validate, test, predict, export, generate"),
        ([], "no command given; give one of fit, validate, test, predict, export, generate"),
    ],
)
def test_an_unknown_command_is_one_line_with_every_command(run_ttc, args, expected):
    code, out, err = run_ttc(*args, "--config", DEMO)
    assert code == 2
    assert err.startswith(f"ttc: error: {expected}") and err.count("\n") == 1 and not out, err


def test_a_config_before_the_subcommand_is_the_subcommands(run_ttc, tmp_path):
    # `ttc --help` shows `ttc [-c CONFIG] {fit,...}`: the file configures the subcommand that follows.
    for args in (["-c", DEMO, "fit"], [f"--config={DEMO}", "fit"]):
        code, out, err = run_ttc(*args, "--print_config")
        assert code == 0, err
        printed = yaml.safe_load(out)
        assert printed["trainer"]["max_steps"] == 40 and printed["trainer"]["default_root_dir"] == "runs/demo"


def test_version(run_ttc):
    from importlib.metadata import version

    assert run_ttc("--version") == (0, f"ttc {version('ttc-lightning')}\n", "")


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_no_config_says_to_give_one(run_ttc, subcommand):
    code, out, err = run_ttc(subcommand)
    expected = "no model or data given: give --config FILE (configs/demo.yaml runs on CPU), or --model and --data"
    assert (code, out, err) == (2, "", f"ttc: error: {expected}\n")


@pytest.mark.parametrize("command", ["export", "generate"])
def test_export_and_generate_take_no_abbreviations_either(run_ttc, command):
    code, _, err = run_ttc(command, "--ckpt", "run", "--output_dir", "out")
    assert (code, err) == (2, "ttc: error: unknown option --ckpt; did you mean --ckpt_path?\n")


def test_a_typo_of_last_or_best_in_ckpt_path_is_named(run_ttc):
    code, out, err = run_ttc("fit", "--config", DEMO, "--ckpt_path", "lastt")
    assert code == 1
    assert err == "ttc: error: --ckpt_path lastt: no such file; did you mean last? (a checkpoint file, last or best)\n"


def test_subcommand_help_starts_with_a_short_usage_and_says_what_ckpt_path_is(run_ttc):
    code, out, _ = run_ttc("fit", "--help")
    assert code == 0
    assert out.startswith("usage: ttc fit [--config FILE] [options]\n\nTrain the policy with GRPO"), out[:300]
    text = " ".join(out.split())
    ckpt_path = text[text.index("--ckpt_path CKPT_PATH") :][:400]
    assert "`last` (the newest of the run's last.ckpt, last-interrupted.ckpt and hpc_ckpt_N.ckpt" in ckpt_path
    assert "`best` (its checkpoints/best.ckpt)" in ckpt_path
    assert "registry" not in ckpt_path and "hpc" not in ckpt_path.replace("hpc_ckpt", "")  # Lightning's keywords
    code, out, _ = run_ttc("test", "--help")
    assert code == 0 and out.startswith("usage: ttc test [--config FILE] [options]\n")
    assert "Leave it out to test the base model" in " ".join(out.split())
    code, out, _ = run_ttc("fit", "--model.help", "ttc_lightning.GRPOModule")
    assert code == 0 and out.startswith("usage: ttc fit [--config FILE] [--model.OPTION VALUE ...]\n"), out[:300]


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_subcommand_help_has_no_section_or_option_in_lightnings_words(run_ttc, subcommand):
    code, out, _ = run_ttc(subcommand, "--help")
    assert code == 0
    text = " ".join(out.split())
    # Lightning's docstrings: headings cut at their first line, defaults ttc changes, its own API's examples.
    for lightning in (
        "The main advantage is",
        "Every logged metrics are passed to the",
        "Runs the full optimization routine",
        "we only keep the ``k`` best checkpoints in memory",
        "By default it is ``None``",
        "before classes instantiation",
        "Customize every aspect of training",
        "Default: ``os.getcwd()``",
        "the default ``TensorBoardLogger``",
        "If ``False``, then the checkpoint files will be overwritten",
    ):
        assert lightning not in text, lightning
    assert "last.ckpt every every_n_train_steps optimizer steps and at the end of fit" in text
    assert "Null: checkpoints/ in trainer.default_root_dir." in text


def test_help_describes_the_subcommands_in_ttcs_words(run_ttc):
    code, out, _ = run_ttc("--help")
    assert code == 0
    text = " ".join(out.split())
    assert text.startswith("usage: ttc ")
    assert "fit Train the policy with GRPO" in text and "predict Write predictions.jsonl" in text
    assert "never run on your" not in text and "model forward function" not in text  # Lightning's docstrings


def test_generate_runs_a_checkpoint_on_a_function_from_a_file_or_stdin(run_ttc, tmp_path, monkeypatch, capsys):
    import io

    fit = ["--trainer.max_steps", "1", "--model.max_new_tokens", "8", "--trainer.default_root_dir", "run"]
    assert run_ttc("fit", "--config", DEMO, *fit)[0] == 0
    func = tmp_path / "func.c"
    func.write_text("int get(char *b, int n) {\n    return b[n];\n}\n")
    code, out, err = run_ttc("generate", "--ckpt_path", "run", "--file", str(func), "--cwe", "CWE-125")
    assert code == 0, err
    assert "ttc: generating with " in err and out.startswith("the completion is malformed")  # the tiny model's text
    monkeypatch.setattr("sys.stdin", io.StringIO(func.read_text()))
    code, out, err = run_ttc("generate", "--ckpt_path", "run", "--task", "classify", "--max_new_tokens", "4")
    assert code == 0, err
    code, _, err = run_ttc("generate", "--ckpt_path", "run", "--file", str(tmp_path / "missing.c"))
    assert code == 1 and err.startswith("ttc: error: --file ") and err.count("\n") == 1
    huge = tmp_path / "huge.c"  # 2.4 MB: refused before it is tokenized whole, let alone run
    huge.write_text("int f(void) {\n" + "    x++;\n" * 240_000 + "}\n")
    code, _, err = run_ttc("generate", "--ckpt_path", "run", "--file", str(huge))
    assert code == 1 and f"ttc: error: --file {huge}: the prompt is longer than the " in err, err
    code, _, err = run_ttc("generate", "--ckpt_path", "run", "--file", str(func), "--user_template", "{function}")
    assert code == 1 and "ttc: error: --user_template: {function} is not a field of this task" in err
    # A prompt the checkpoint was not trained with, an option of the other task, values out of range, a typo.
    given = (
        (
            ["--user_template", "Fix:\n{func}"],
            1,
            "--system_prompt/--user_template: the checkpoint was trained with the task's own",
        ),
        (["--labels", "vulnerable,benign"], 1, "--labels is for --task classify; this is --task patch"),
        (["--temperature", "-1"], 2, "argument --temperature: must be >= 0, got -1"),
        (["--max_new_tokens", "0"], 2, "argument --max_new_tokens: must be >= 1, got 0"),
        (["--max_new_token", "4"], 2, "unknown option --max_new_token; did you mean --max_new_tokens?"),
        (["--max_new_tokens", "100000"], 1, "--max_new_tokens 100000: the model's context holds"),
    )
    given += (
        ((), 2, "the following arguments are required: --output_dir"),
        (("--output_dir", "out", "--merg"), 2, "unknown option --merg; did you mean --merge?"),
    )
    for args, status, message in given[-2:]:  # export's command line, as strict as generate's
        code, _, err = run_ttc("export", "--ckpt_path", "run", *args)
        assert code == status and err == f"ttc: error: {message}\n", (args, err)
    for args, status, message in given[:-2]:
        code, _, err = run_ttc("generate", "--ckpt_path", "run", "--file", str(func), *args)
        last = err.splitlines()[-1]
        assert code == status and last.startswith(f"ttc: error: {message}") and "Traceback" not in err, (args, err)


@pytest.mark.parametrize(
    "given",
    [
        ["--data.user_template", "Fix {cwe}: {func}", "--data.system_prompt", "Be brief: {cwe_desc}"],
        ["--data.user_template=Fix {cwe}: {func}", "--data.system_prompt=Be brief: {cwe_desc}"],
    ],
    ids=["separate", "equals"],
)
def test_a_prompt_text_is_taken_as_written(run_ttc, given):
    # "Fix {cwe}: {func}" is a YAML mapping; as an option's value it is the text itself
    config = str(Path(REPO) / "configs" / "patch_sample.yaml")
    code, out, err = run_ttc("fit", "--config", config, *given, "--data.batch_size", "2", "--print_config")
    assert code == 0, err
    data = yaml.safe_load(out)["data"]["init_args"]
    assert (data["user_template"], data["system_prompt"], data["batch_size"]) == (
        "Fix {cwe}: {func}",
        "Be brief: {cwe_desc}",
        2,
    )
    assert "args parameter" not in err
    code, out, err = run_ttc("fit", "--config", config, "--data.system_prompt", "null", "--print_config")
    assert yaml.safe_load(out)["data"]["init_args"]["system_prompt"] is None


def test_a_config_file_that_is_not_yaml_is_named_with_its_line(run_ttc, tmp_path):
    (tmp_path / "bad.yaml").write_text("trainer:\n  max_steps: 3\n  devices: [1\nmodel:\n")
    code, out, err = run_ttc("fit", "--config", "bad.yaml")
    assert (code, out) == (2, "")  # a config file is part of the command line: status 2, as for an unknown key
    assert err.strip() == "ttc: error: --config bad.yaml:4:6: not valid YAML: expected ',' or ']', but got ':'"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "- just a list\n",
            "--config extra.yaml: holds a list, not a mapping of options (trainer:, model:, data:, ...)",
        ),
        ('trainer:\n  max_steps: "two"\n', "extra.yaml: trainer.max_steps: expected an int, got 'two'"),
        ("", "--config extra.yaml: holds no options (empty, or comments only); give trainer:, model:, data:, ..."),
        ("# only a comment\n", "--config extra.yaml: holds no options (empty, or comments only); give trainer:, mod"),
    ],
    ids=["a-list", "a-bad-value", "empty", "comments-only"],
)
def test_a_config_file_that_holds_no_options_or_a_bad_value_is_named(run_ttc, tmp_path, content, message):
    (tmp_path / "extra.yaml").write_text(content)
    code, _, err = run_ttc("fit", "--config", DEMO, "--config", "extra.yaml")
    assert code == 2 and err.startswith(f"ttc: error: {message}") and err.count("\n") == 1, err


def test_an_unknown_key_in_a_config_file_names_the_file(run_ttc, tmp_path):
    (tmp_path / "typo.yaml").write_text("trainer:\n  max_stepz: 3\n")
    code, _, err = run_ttc("fit", "--config", DEMO, "--config", "typo.yaml")
    assert code == 2
    assert err.strip() == "ttc: error: typo.yaml: unknown key trainer.max_stepz; did you mean trainer.max_steps?"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["oracle", "chek"], "ttc oracle: unknown subcommand 'chek'; did you mean check?"),
        (["oracle"], "ttc oracle: give a subcommand: check"),
        (["oracle", "check", "--worker", "2"], "unknown option --worker; did you mean --workers?"),
        # a mistyped required option is named as mistyped, not as missing
        (["export", "--ckpt_path", "x", "--output-dir", "y"], "unknown option --output-dir; did you mean --output_di"),
        (["generate", "--task", "x", "--ckpt_path", "y"], "ttc generate: unknown --task 'x'; give one of patch, clas"),
    ],
)
def test_the_other_commands_name_a_typo(run_ttc, args, expected):
    code, out, err = run_ttc(*args)
    assert (code, out, err.count("\n")) == (2, "", 1)
    assert err.startswith(f"ttc: error: {expected}")


def test_print_config_to_a_full_disk_is_one_line():
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "ttc_lightning", "fit", "--config", str(DEMO), "--print_config"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            timeout=120,
        )
    assert (done.returncode, done.stderr) == (
        1,
        "ttc: error: cannot write the printed config to the standard output: No space left on device\n",
    )
