"""The GRPO variants' options through `ttc fit` on the tiny model: dynamic sampling, overlong handling, GSPO,
truncated importance sampling, the sampler/trainer mismatch metrics and the LR schedules."""

import json
import re

import pytest
import torch
import yaml

from tests.helpers import (
    FAST,
    HELPERS,
    REPO,
    TINY,
    assert_trained_groups_differ,
    read_metrics,
    read_rollouts,
    tied_prompts,
)
from ttc_lightning.module import GRPOModule

HERE = "tests.integration.test_grpo_options"


def test_dynamic_sampling_with_every_new_option_trains_only_on_groups_that_differ(run_ttc, tmp_path):
    args = ["--data.train_path", str(tied_prompts(tmp_path)), "--model.rewards", f"[{HELPERS}.tie_or_first_char]"]
    options = [
        *("--model.dynamic_sampling", "true", "--model.max_sampling_rounds", "3"),
        *("--model.overlong_buffer", "{length: 4, penalty: 0.5}", "--model.mask_truncated_completions", "true"),
        *("--model.importance_sampling_level", "sequence", "--model.epsilon", "3e-4", "--model.epsilon_high", "4e-4"),
        *("--model.tis_cap", "2.0", "--model.num_iterations", "2"),
    ]
    run = ["--trainer.default_root_dir", "run", "--trainer.max_steps", "4", *FAST]
    code, _, err = run_ttc("fit", "--config", TINY, *run, *args, *options)
    assert code == 0, err
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2  # num_iterations 2: two optimizer steps per rollout
    for row in rows:
        assert 1 <= float(row["sampling_rounds"]) <= 3 and 1 <= float(row["groups_kept"]) <= 4
        assert float(row["rewards/overlong_penalty/mean"]) <= 0
        # One float32 model samples and trains: the two log-probs of a token agree to rounding.
        assert float(row["mismatch/abs_logp_diff"]) < 1e-4 and float(row["mismatch/kl"]) < 1e-7
    assert max(float(row["frac_reward_zero_std"]) for row in rows) > 0  # half the prompts tie: there were drops
    records = read_rollouts(tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl")
    assert assert_trained_groups_differ(records, g=2) > 0
    assert {"tie_or_first_char", "overlong_penalty"} == set(records[0]["rewards"])
    assert all(r["reward"] == pytest.approx(sum(r["rewards"].values())) for r in records)


def test_under_generate_there_is_no_mismatch_to_log_and_tis_has_no_effect(run_ttc, tmp_path):
    args = ["--model.levers", "{fast_sampler: false}", "--model.tis_cap", "2.0", "--trainer.max_steps", "2"]
    code, _, err = run_ttc("fit", "--config", TINY, "--trainer.default_root_dir", "run", *args, *FAST)
    assert code == 0, err
    assert "ttc: warning: model.tis_cap has no effect: sampling through generate()" in err
    assert "ttc: sampling with generate() (ttc's backend off: model.levers.fast_sampler is off)" in err
    rows = read_metrics(tmp_path / "run")
    assert len(rows) == 2 and "loss" in rows[0] and not any(key.startswith("mismatch/") for key in rows[0])


def test_a_run_whose_prompts_all_tie_stops_after_an_epoch_of_batches(run_ttc, tmp_path):
    prompts = tmp_path / "all_tied.jsonl"
    prompts.write_text(tied_prompts(tmp_path).read_text().replace('"tie": false', '"tie": true'))
    args = ["--data.train_path", str(prompts), "--model.rewards", f"[{HELPERS}.tie_or_first_char]"]
    run = ["--trainer.default_root_dir", "run", "--model.dynamic_sampling", "true", *FAST]
    code, _, err = run_ttc("fit", "--config", TINY, *run, *args)  # tiny.yaml's max_steps is 40
    assert code == 3, err  # it trained nothing
    assert "ttc: warning: dynamic sampling: no prompt in the last 8 batches (an epoch's worth)" in err
    assert "ttc: error: nothing trained: every group's rewards tied (the run's 2 rollouts)" in err
    rows = read_metrics(tmp_path / "run")
    assert [float(r["groups_kept"]) for r in rows] == [0.0, 0.0]  # 2 steps of 4 rounds: the 8 batches of an epoch
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 0


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # lr 0.003, 2 warmup steps, max_steps 5; the logged lr is the one after each step's scheduler step.
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0]),
        pytest.param("linear", [0.5, 1.0, 2 / 3, 1 / 3, 0.0], marks=pytest.mark.slow),  # after warmup: (5 - k) / 3
        # 0.5 * (1 + cos(pi * (k - 2) / 3)) for k = 3, 4
        pytest.param("cosine", [0.5, 1.0, 0.75, 0.25, 0.0], marks=pytest.mark.slow),
    ],
)
def test_lr_scheduler_option(run_ttc, tmp_path, schedule, expected):
    args = ["--model.lr_scheduler", schedule, "--model.warmup_steps", "2", "--trainer.max_steps", "5"]
    code, _, err = run_ttc("fit", "--config", TINY, "--trainer.default_root_dir", "run", *args, *FAST)
    assert code == 0, err
    assert [float(r["lr"]) for r in read_metrics(tmp_path / "run")] == pytest.approx([0.003 * m for m in expected])


def test_unknown_lr_scheduler_is_a_one_line_error(run_ttc):
    code, _, err = run_ttc("fit", "--config", TINY, "--model.lr_scheduler", "exponential")
    assert code != 0 and "lr_scheduler" in err and "Traceback" not in err


def test_help_documents_the_grpo_options(run_ttc):
    code, out, _ = run_ttc("fit", "--model.help", "ttc_lightning.GRPOModule")
    assert code == 0
    out = " ".join(out.split())  # the help wraps lines
    for text in (
        "--model.lr_scheduler",
        "decay to 0 at `trainer.max_steps`",
        "--model.dynamic_sampling",
        "--model.max_sampling_rounds",
        "--model.mask_truncated_completions",
        "--model.overlong_buffer",
        "--model.importance_sampling_level",
        "GSPO clips at epsilon 3e-4",
        "--model.tis_cap",
    ):
        assert text in out, text


def test_readme_recipes_are_valid_settings():
    text = (REPO / "README.md").read_text()
    recipes = {name: yaml.safe_load(block) for block, name in re.findall(r"```yaml\n(# ([^:]+):.*?)```", text, re.S)}
    assert sorted(recipes) == ["DAPO", "Dr. GRPO", "GSPO"]
    for recipe in recipes.values():
        GRPOModule(rewards=["ttc_lightning.rewards.char_fraction_reward"], max_new_tokens=1024, **recipe)
    assert recipes["GSPO"]["importance_sampling_level"] == "sequence" and recipes["DAPO"]["dynamic_sampling"]


def never_scores(completions, **_):
    return [None] * len(completions)


def test_every_logged_metric_is_on_the_modules_device(run_ttc, tmp_path):
    # Under DDP on GPUs Lightning all-reduces each logged value over NCCL, which reduces GPU tensors only. On CPU
    # every tensor is on the module's device anyway, so the step's metrics are told their device is `meta`: a value
    # built on the CPU (a reward's error count, the fallback of a reward column without scores) stays behind.
    from unittest import mock

    logged = {}
    original = GRPOModule._finish_step

    def finish(self, *args):
        meta = mock.PropertyMock(return_value=torch.device("meta"))
        with (
            mock.patch.object(GRPOModule, "device", new_callable=lambda: meta),
            mock.patch.object(GRPOModule, "log_dict", lambda _, values, **k: logged.update(values)),
            mock.patch.object(GRPOModule, "log", lambda _, name, value, **k: logged.update({name: value})),
        ):
            return original(self, *args)

    rewards = ["ttc_lightning.rewards.char_fraction_reward", f"{HERE}.never_scores"]
    with mock.patch.object(GRPOModule, "_finish_step", finish):
        code, _, err = run_ttc(
            "fit", "--config", str(TINY), *FAST, "--trainer.max_steps", "1", "--model.reward_errors", "skip",
            "--model.rewards", json.dumps(rewards), "--model.reward_weights", "[1.0, 0.0]",
        )  # fmt: skip
    tensors = {name: value.device.type for name, value in logged.items() if isinstance(value, torch.Tensor)}
    assert "rewards/never_scores/errors" in tensors and "rewards/never_scores/mean" in tensors, sorted(tensors)
    assert set(tensors.values()) == {"meta"}, {k: v for k, v in tensors.items() if v != "meta"}
