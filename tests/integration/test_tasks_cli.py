"""Both PrimeVul tasks through `ttc fit`, `validate`, `test` and `predict` on the tiny model and shipped sample."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.helpers import HELPERS, REPO, G, read_metrics
from ttc_lightning.data.base import SAMPLE_DIR
from ttc_lightning.data.tasks import PrimeVulClassificationDataModule
from ttc_lightning.oracle.harness import HARNESSES

SMALL = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.enable_progress_bar",
    "false",
    "--trainer.default_root_dir",
    "run",
    "--model.model_name_or_path",
    "tiny",
    "--model.max_new_tokens",
    "8",
    "--model.num_generations",
    "2",
    "--model.eval_num_samples",
    "2",
    "--model.eval_temperature",
    "1.0",
    "--model.gradient_checkpointing",
    "false",
    "--model.lora",
    "{r: 4, alpha: 8}",
    "--data.data_path",
    SAMPLE_DIR,
]
# The config's overlong buffer (256 of 1,024 tokens), scaled to the 8 tokens here.
PATCH = ["--config", str(REPO / "configs" / "patch.yaml"), *SMALL, "--model.overlong_buffer", "{length: 2}"]
CLASSIFY = ["--config", str(REPO / "configs" / "classify.yaml"), *SMALL]


@pytest.mark.slow
def test_patch_fit_validate_predict(run_ttc, tmp_path):
    code, _, err = run_ttc(
        "fit", *PATCH, "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--data.max_val_prompts", "2"
    )
    assert code == 0, err
    logged = {key for row in read_metrics(tmp_path / "run") for key, value in row.items() if value}
    assert {"val/patch_reward", "val/applied_pass@1", "val/applied_pass@2", "val/exact_pass@1"} <= logged
    # validated once, at step 2: that is the best final_patch_reward so far, kept beside last.ckpt
    assert torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=False)["global_step"] == 2
    assert "val/final_patch_reward" in err and "the best so far" in err
    code, _, err = run_ttc("test", *PATCH, "--ckpt_path", "best")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "logs" / "version_1" / "metrics.json").read_text())["stage"] == "test"

    # evaluation needs the weights only: drop the optimizer state, as a user sharing a checkpoint might
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    del ckpt["optimizer_states"], ckpt["lr_schedulers"]
    torch.save(ckpt, tmp_path / "weights.ckpt")
    code, _, err = run_ttc("validate", *PATCH, "--ckpt_path", str(tmp_path / "weights.ckpt"))
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "logs" / "version_2" / "metrics.json").read_text())
    assert summary["stage"] == "val" and summary["num_prompts"] == 3  # the sample's 3 validation pairs
    expected = {"patch_reward", "applied_pass@1", "exact_pass@2", "final_exact", "format_valid", "mean_length"}
    assert expected <= set(summary["metrics"])

    code, _, err = run_ttc("predict", *PATCH, "--ckpt_path", str(tmp_path / "weights.ckpt"))
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "logs" / "version_3" / "predictions.jsonl").open()]
    assert len(lines) == 3  # the sample's 3 test pairs
    assert {"id", "completions", "patches", "final", "score"} <= set(lines[0])
    assert len(lines[0]["completions"]) == 2


@pytest.mark.slow
def test_classification_fit_test_predict(run_ttc, tmp_path):
    # classify.yaml samples again while groups tie (dynamic sampling): the random tiny model ties every group, and a
    # run that trains nothing exits 3; this test is about the commands that follow a run that trained
    code, _, err = run_ttc(
        "fit", *CLASSIFY, "--trainer.max_steps", "2", "--data.val_split", "null", "--model.dynamic_sampling", "false"
    )
    assert code == 0, err
    assert {"rewards/format_reward/mean", "rewards/label_reward/mean"} <= set(read_metrics(tmp_path / "run")[0])

    code, _, err = run_ttc("test", *CLASSIFY, "--ckpt_path", "last")
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "logs" / "version_1" / "metrics.json").read_text())["metrics"]
    expected = {"accuracy", "accuracy_single", "precision", "recall", "f1", "vd_score", "format_valid", "P-C", "P-R"}
    assert expected <= set(metrics)
    assert sum(metrics[k] for k in ("P-C", "P-V", "P-B", "P-R")) == pytest.approx(1.0)  # fractions of the pairs

    code, _, err = run_ttc("predict", *CLASSIFY, "--ckpt_path", "last")
    assert code == 0, err
    lines = [json.loads(x) for x in (tmp_path / "run" / "logs" / "version_2" / "predictions.jsonl").open()]
    assert len(lines) == 6  # 3 test pairs, both halves
    assert {"id", "completions", "answers", "final", "score"} <= set(lines[0])
    assert 0.0 <= lines[0]["score"] <= 1.0


SAMPLE_RUN = ["--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", "run", "--trainer.max_steps", "2"]
SAMPLE_RUN += ["--trainer.val_check_interval", "2", "--model.max_new_tokens", "8"]


@pytest.mark.slow
def test_patch_sample_config_trains_and_validates(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", "--config", str(REPO / "configs" / "patch_sample.yaml"), *SAMPLE_RUN)
    assert code == 0, err
    rows = read_metrics(tmp_path / "run")
    logged = {key for row in rows for key, value in row.items() if value}
    assert {"val/patch_reward", "val/applied_pass@1", "val/rewards/parsed_patch_reward/mean"} <= logged
    # the random tiny model writes no well-formed answer: -1 (malformed) from the syntax-gated patch reward
    assert [float(row["rewards/parsed_patch_reward/mean"]) for row in rows if row["loss"]] == [-1.0] * 2


@pytest.mark.slow
def test_classify_sample_config_trains_on_whole_pairs_and_validates(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", "--config", str(REPO / "configs" / "classify_sample.yaml"), *SAMPLE_RUN)
    assert code == 0, err
    logged = {key for row in read_metrics(tmp_path / "run") for key, value in row.items() if value}
    assert {"val/accuracy", "val/P-C", "val/P-V", "val/P-B", "val/P-R", "val/rewards/label_reward/mean"} <= logged
    data = PrimeVulClassificationDataModule(paired=True)
    data.setup("fit")
    pair_of = {row["id"]: row["pair_id"] for row in data.train_rows}
    pairs = {}  # (step, prompt index) -> pair id
    for line in (tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl").read_text().splitlines():
        record = json.loads(line)
        pairs[record["step"], record["prompt_index"]] = pair_of[record["id"]]
    assert sorted(pairs) == [(step, p) for step in (1, 2) for p in range(4)]  # labelled with the steps done
    for step in (1, 2):
        assert pairs[step, 0] == pairs[step, 1] != pairs[step, 2] == pairs[step, 3]  # 4 prompts: two whole pairs


@pytest.mark.slow
def test_patch_oracle_config_checks_its_harnesses_and_logs_the_oracle(run_ttc, tmp_path):
    code, _, err = run_ttc("fit", "--config", str(REPO / "configs" / "patch_oracle.yaml"), *SAMPLE_RUN)
    assert code == 0, err
    # 12 train + 3 valid records, each with a harness, checked before the first step
    assert "ttc: oracle: 15 harnesses hold for their records" in err
    rows = read_metrics(tmp_path / "run")
    logged = {key for row in rows for key, value in row.items() if value}
    assert {
        "rewards/oracle_reward/checks",
        "rewards/oracle_reward/wall_s",
        "val/oracle/oracle_reward/final_pass",
    } <= logged
    # the tiny model writes no patch: every completion is malformed (-1) and nothing is built
    assert [float(row["rewards/oracle_reward/mean"]) for row in rows if row["loss"]] == [-1.0] * 2
    assert [float(row["rewards/oracle_reward/checks"]) for row in rows if row["loss"]] == [0.0] * 2


@pytest.mark.slow
def test_the_oracle_scores_patches_in_a_run(run_ttc, tmp_path):
    reward = f"[{{function: {HELPERS}.oracle_on_scripted_patches, name: oracle}}]"
    code, _, err = run_ttc(
        "fit",
        "--config",
        str(REPO / "configs" / "patch_sample.yaml"),
        *SAMPLE_RUN,
        "--model.rewards",
        reward,
        "--model.reward_weights",
        "[1.0]",
        "--model.num_generations",
        str(G),
        "--trainer.max_steps",
        "3",
        "--trainer.limit_val_batches",
        "0",
    )
    assert code == 0, err
    steps = [row for row in read_metrics(tmp_path / "run") if row["loss"]]
    # each group: the real fix (1.0) and a still-vulnerable copy (0.25): mean (1.0 + 0.25) / 2 = 0.625
    assert [float(row["rewards/oracle/mean"]) for row in steps] == [0.625] * 3
    # 2 prompts a step, 2 distinct functions each: 4 a step, built or found in the verdict cache (which lives as long
    # as the process: an earlier run in this one may have seeded it with the real fixes)
    assert [float(row["rewards/oracle/checks"]) + float(row["rewards/oracle/cache_hits"]) for row in steps] == [4.0] * 3
    assert all(float(row["rewards/oracle/compile_s"]) > 0 for row in steps if float(row["rewards/oracle/checks"]))


def oracle_run(run_ttc, harnesses: Path) -> tuple[int, str]:
    reward = f"[{{function: ttc_lightning.rewards.oracle_reward, args: {{harnesses: {harnesses}}}}}]"
    config = str(REPO / "configs" / "patch_sample.yaml")
    code, _, err = run_ttc(
        "fit", "--config", config, *SAMPLE_RUN, "--model.rewards", reward, "--model.reward_weights", "[1.0]"
    )
    return code, err


@pytest.mark.slow
def test_a_harness_that_proves_nothing_stops_the_run_before_training(run_ttc, tmp_path):
    harness = tmp_path / "harnesses" / "900097"
    shutil.copytree(HARNESSES / "900097", harness)
    manifest = harness / "harness.toml"
    # the proof becomes a case the vulnerable function passes (a short value fits the buffer)
    manifest.write_text(
        manifest.read_text()
        .replace('proof = "long_value"', 'proof = "short_value"')
        .replace('"short_value", ', '"long_value", ')
    )
    code, err = oracle_run(run_ttc, tmp_path / "harnesses")
    assert code == 1
    [line] = [line for line in err.splitlines() if line.startswith("ttc: error:")]
    assert f"{harness}: the vulnerable function passes the proof 'short_value'" in line
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_data_without_any_harness_stops_the_run_before_training(run_ttc, tmp_path):
    shutil.copytree(HARNESSES / "195017", tmp_path / "harnesses" / "195017")  # a real pair's: not in the sample
    code, err = oracle_run(run_ttc, tmp_path / "harnesses")
    assert code == 1
    assert "none of the data's 15 records has a harness in" in err
