"""`ttc fit` end to end on the tiny model, in-process, on CPU."""

import importlib
import inspect
import json

import pytest
import torch
import yaml

from tests.helpers import CONFIGS, FAST, OLD_FULL, OLD_LORA, TINY, read_metrics

STEP_METRICS = [
    "reward",
    "reward_std",
    "rewards/char_fraction_reward/mean",
    "rewards/char_fraction_reward/std",
    "frac_reward_zero_std",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "entropy",
    "completions/mean_length",
    "completions/clipped_ratio",
    "loss",
    "grad_norm",
    "lr",
    "tokens_per_second",
    "time/generate",
    "time/train",
]


def test_demo_fit_writes_checkpoint_metrics_and_rollouts(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "3",
        "--trainer.default_root_dir",
        "[lr 1e-5]/run",  # brackets, which rich would read as markup in the summary
        "--model.beta",
        "0.04",
        *FAST,
    )
    assert code == 0, err
    # The run names the sampling backend that ran, with its levers, once, and how the training passes go.
    assert err.count("ttc: sampling with ttc's decoding loop, shared prompt cache") == 1
    assert "ttc: training log-probs with one pass per prompt" in err
    run = tmp_path / "[lr 1e-5]" / "run"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    rows = read_metrics(run)
    assert len(rows) == 3
    assert set(STEP_METRICS + ["kl"]) <= set(rows[0])
    rollouts = [json.loads(line) for line in (run / "logs" / "version_0" / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 4 * 2  # steps x prompts x G
    # Each step's rows are labelled with the optimizer steps taken once it is done, in both files.
    assert [r["step"] for r in rollouts[::8]] == [int(r["step"]) for r in rows] == [1, 2, 3]
    assert {"step", "prompt", "completion", "rewards", "reward", "advantage"} <= set(rollouts[0])
    assert "reward 0." in err  # the end-of-run summary line
    assert f"last checkpoint    {run / 'checkpoints' / 'last.ckpt'}\n" in err
    assert f"last checkpoint: {run / 'checkpoints' / 'last.ckpt'}\n" in err
    assert not [line for line in err.splitlines() if line.endswith(" ")]  # piped: no padding to a table's width


def test_last_ckpt_holds_the_final_step_when_the_interval_does_not_divide_it(run_ttc, tmp_path):
    # 3 steps saving every 2: the periodic save is at step 2, and the end of fit must write step 3 over it.
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", "run", *FAST, "--trainer.max_steps", "3"]
    code, _, err = run_ttc(*args, "--checkpoint.every_n_train_steps", "2")
    assert code == 0, err
    checkpoints = tmp_path / "run" / "checkpoints"
    step = {p.name: torch.load(p, weights_only=False)["global_step"] for p in checkpoints.glob("*.ckpt")}
    assert step == {"last.ckpt": 3, "step=2.ckpt": 2}
    code, _, err = run_ttc(*args, "--ckpt_path", "last")
    assert code == 1 and "is already at max_steps 3 (step 3)" in err  # nothing to train again


@pytest.mark.slow
def test_resume_from_last_continues_at_the_same_step(run_ttc, tmp_path):
    # full fine-tuning with a KL term: the frozen reference is not in the checkpoint and must not be needed
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", "run", "--model.beta", "0.04", *FAST]
    assert run_ttc(*args, "--trainer.max_steps", "2")[0] == 0
    first = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["global_step"] == 2
    code, _, err = run_ttc(*args, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert code == 0, err
    second = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert second["global_step"] == 4
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run", version=1)] == [3, 4]  # resumed, not restarted
    assert second["lr_schedulers"][0]["last_epoch"] == 4  # the schedule continued too


@pytest.mark.slow
def test_lora_checkpoint_holds_only_adapters(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "1",
        "--trainer.default_root_dir",
        "run",
        "--model.lora",
        "{r: 4, alpha: 8}",
        *FAST,
    )
    assert code == 0, err
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert state and all("lora_" in key for key in state)
    saved = sum(t.numel() for t in state.values())
    assert saved < 0.2 * 90_880  # the tiny model has 90,880 parameters; r=4 adapters are a small fraction


@pytest.mark.slow
def test_qlora_4bit_trains_on_cpu(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        "run",
        "--model.lora",
        "{r: 4}",
        "--model.load_in_4bit",
        "true",
        "--model.beta",
        "0.04",
        *FAST,
    )
    assert code == 0, err
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and float(rows[-1]["kl"]) >= 0.0


@pytest.mark.slow
def test_gradient_checkpointing_with_lora_trains(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        "run",
        "--model.lora",
        "{r: 4}",
        "--model.gradient_checkpointing",
        "true",
        "--model.rewards",
        "[tests.integration.test_fit.first_char_reward]",
        *FAST,
    )
    assert code == 0, err
    assert float(read_metrics(tmp_path / "run")[-1]["grad_norm"]) > 0  # gradients reach the adapters


def test_bad_reward_path_is_a_one_line_error(run_ttc):
    code, _, err = run_ttc("fit", "--config", TINY, "--model.rewards", "[ttc_lightning.rewards.missing]")
    assert code == 1
    assert "ttc: error: model.rewards[0]: cannot import 'ttc_lightning.rewards.missing'" in err
    assert "Traceback" not in err


COMPILES = {"function": "ttc_lightning.rewards.command_reward", "name": "compiles", "args": {"timeout": 30}}


def test_reward_entries_parse_from_yaml_and_from_the_command_line(run_ttc, tmp_path):
    config = tmp_path / "rewards.yaml"
    config.write_text(
        "model:\n"
        "  init_args:\n"
        "    rewards:\n"
        "      - ttc_lightning.rewards.parses_reward\n"
        "      - function: ttc_lightning.rewards.command_reward\n"
        "        name: compiles\n"
        "        args: {command: 'gcc -fsyntax-only {file}', timeout: 30, exit_rewards: {0: 1.0, 1: null}}\n"
        "    reward_weights: [1.0, 0.5]\n"
    )
    code, out, err = run_ttc("fit", "--config", TINY, "--config", str(config), "--print_config")
    assert code == 0, err
    expected = """
    rewards:
    - ttc_lightning.rewards.parses_reward
    - function: ttc_lightning.rewards.command_reward
      args:
        command: gcc -fsyntax-only {file}
        timeout: 30
        exit_rewards:
          0: 1.0
          1: null
      name: compiles
"""
    assert expected in out
    entries = f"[ttc_lightning.rewards.parses_reward, {json.dumps(COMPILES)}]"
    code, out, err = run_ttc("fit", "--config", TINY, "--model.rewards", entries, "--print_config")
    assert code == 0, err
    entry = [
        "    - function: ttc_lightning.rewards.command_reward",
        "      args:",
        "        timeout: 30",
        "      name: compiles",
    ]
    assert "\n".join(entry) in out


def test_bad_reward_entry_is_a_one_line_error(run_ttc):
    entries = f"[ttc_lightning.rewards.format_reward, {json.dumps({**COMPILES, 'args': {'comand': 'gcc'}})}]"
    code, _, err = run_ttc("fit", "--config", TINY, "--model.rewards", entries, *FAST)
    assert code == 1
    assert "ttc: error: model.rewards[1].args: ttc_lightning.rewards.command_reward has no parameter 'comand'" in err
    assert "Traceback" not in err
    code, _, err = run_ttc("fit", "--config", TINY, "--model.rewards", '[{"function": "a.b", "weight": 1}]', *FAST)
    assert code == 1
    assert "ttc: error: model.rewards[0]: unknown key 'weight'" in err


def test_malformed_prompt_file_names_file_and_line(run_ttc, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    code, _, err = run_ttc("fit", "--config", TINY, "--data.train_path", str(prompts), *FAST)
    assert code == 1
    assert f"{prompts}:2: prompt: expected a string or a list of chat messages" in err
    assert "Traceback" not in err


def test_failing_reward_stops_with_function_and_prompt(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--model.rewards",
        "[tests.integration.test_fit.broken_reward]",
        "--trainer.default_root_dir",
        "run",
        *FAST,
    )
    assert code == 1
    assert "reward function broken_reward raised ZeroDivisionError: division by zero on prompt 0" in err


def test_skipped_reward_errors_are_counted_and_training_goes_on(run_ttc, tmp_path):
    rewards = "[tests.integration.test_fit.broken_reward, ttc_lightning.rewards.char_fraction_reward]"
    args = ["--model.rewards", rewards, "--model.reward_errors", "skip", "--model.reward_workers", "2"]
    code, _, err = run_ttc(
        "fit", "--config", TINY, *args, "--trainer.max_steps", "2", "--trainer.default_root_dir", "run", *FAST
    )
    assert code == 0, err
    assert err.count("ttc: warning: reward function broken_reward raised ZeroDivisionError") == 2  # once a step
    rows = read_metrics(tmp_path / "run")
    assert [float(row["rewards/broken_reward/errors"]) for row in rows] == [1.0, 1.0]
    assert [float(row["rewards/char_fraction_reward/errors"]) for row in rows] == [0.0, 0.0]
    assert all(row["rewards/broken_reward/mean"] == "nan" for row in rows)


def first_char_reward(completions, **_):
    """Differs between almost any two completions, so every group has a non-zero advantage."""
    return [float(ord(text[0])) if text else 0.0 for text in completions]


def broken_reward(completions, **_):
    return [1 / 0 for _ in completions]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(run_ttc, config):
    code, out, err = run_ttc("fit", "--config", str(config), "--print_config")
    assert code == 0, err
    assert "class_path: ttc_lightning." in out


def test_every_config_starts_with_a_comment():
    for config in CONFIGS:
        lines = config.read_text().splitlines()
        assert lines[0].startswith("# "), config
        assert any("ttc " in line for line in lines if line.startswith("#")), f"{config}: no command in header"


def test_help_shows_documented_fields(run_ttc):
    code, out, _ = run_ttc("fit", "--model.help", "ttc_lightning.GRPOModule")
    assert code == 0
    assert "Weight of the KL penalty to the reference policy" in out
    assert "Reward functions running at once" in out
    code, out, _ = run_ttc("fit", "--data.help", "ttc_lightning.data.PrimeVulClassificationDataModule")
    assert code == 0
    assert "Train on whole pairs" in out


@pytest.mark.parametrize(
    ("args", "class_path"),
    [
        (["--model.help", "ttc_lightning.GRPOModule"], "ttc_lightning.GRPOModule"),
        (["--data.help", "ttc_lightning.data.PrimeVulPatchDataModule"], "ttc_lightning.data.PrimeVulPatchDataModule"),
        (
            ["--data.help", "ttc_lightning.data.PrimeVulClassificationDataModule"],
            "ttc_lightning.data.PrimeVulClassificationDataModule",
        ),
        (["--data.help", "ttc_lightning.data.PromptDataModule"], "ttc_lightning.data.PromptDataModule"),
        # The module's help lists these without a value; each works alone, as listed.
        (["--model.lora.help"], "ttc_lightning.LoRA"),
        (["--model.rewards.help"], "ttc_lightning.rewards.entries.RewardSpec"),
        (["--model.overlong_buffer.help"], "ttc_lightning.OverlongBuffer"),
    ],
)
def test_a_class_help_is_headed_by_its_whole_first_paragraph(run_ttc, args, class_path):
    # The heading is the docstring's first line alone: a first paragraph wrapped over two lines loses its end.
    module, _, name = class_path.rpartition(".")
    first = " ".join(inspect.getdoc(getattr(importlib.import_module(module), name)).split("\n\n")[0].split())
    code, out, _ = run_ttc("fit", *args)
    assert code == 0
    assert f"\n{first.removesuffix('.')}:\n" in out, out[:400]


OLD_SETTINGS = ["--model.beta", "0.04", *FAST]  # those the checkpoints of the first layout (OLD_LORA, OLD_FULL) had


@pytest.mark.slow
@pytest.mark.parametrize(
    ("ckpt", "lora"), [(OLD_LORA, ["--model.lora", "{r: 4, alpha: 8}"]), (OLD_FULL, [])], ids=["lora", "full"]
)
def test_checkpoints_of_the_first_layout_resume_and_evaluate(run_ttc, tmp_path, ckpt, lora):
    args = ["--config", TINY, "--trainer.default_root_dir", "run", *OLD_SETTINGS, *lora]
    code, _, err = run_ttc("fit", *args, "--trainer.max_steps", "3", "--ckpt_path", ckpt)
    assert code == 0, err
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 3
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run")] == [3]  # resumed at step 2, not restarted
    prompts = tmp_path / "val.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    code, _, err = run_ttc("validate", *args, "--data.val_path", str(prompts), "--ckpt_path", ckpt)
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "logs" / "version_1" / "metrics.json").read_text())["num_prompts"] == 2


def test_a_fit_without_a_config_logs_every_step(run_ttc):
    # Lightning logs every 50th step by default; a 3-step run would write no metrics row.
    code, out, err = run_ttc(
        "fit", "--model.rewards", '["ttc_lightning.rewards.char_fraction_reward"]', "--print_config"
    )
    assert code == 0, err
    assert yaml.safe_load(out)["trainer"]["log_every_n_steps"] == 1
