"""Tracking helpers and callbacks on small, hand-built inputs (no training run)."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from ttc_lightning.errors import TTCError
from ttc_lightning.run.progress import (
    ParameterCount,
    ProgressLines,
    StepProgressBar,
    SummaryTable,
    eta_seconds,
    first_last,
    format_duration,
    progress_line,
)
from ttc_lightning.run.tracking import (
    WANDB_MISSING,
    WANDB_NO_LOGIN,
    CompletionsTable,
    RunInfo,
    completion_table,
    default_run_name,
    git_state,
    has_wandb_credentials,
    prepare_wandb,
    quiet_wandb_start,
    task_name,
)

# --- run identity --------------------------------------------------------------------------------------------


def test_task_name_strips_the_data_module_naming():
    assert task_name("ttc_lightning.data.PrimeVulPatchDataModule") == "patch"
    assert task_name("ttc_lightning.data.PrimeVulClassificationDataModule") == "classification"
    assert task_name("ttc_lightning.data.PromptDataModule") == "prompt"
    assert task_name(None) is None


def test_default_run_name_joins_task_model_and_short_commit():
    commit = "1a2b3c4d5e6f" + "0" * 28
    assert (
        default_run_name("patch", "Qwen/Qwen2.5-Coder-7B-Instruct", commit) == "patch-Qwen2.5-Coder-7B-Instruct-1a2b3c4"
    )
    assert default_run_name("patch", "/models/my-model/", None) == "patch-my-model"  # local dir: its name
    assert default_run_name(None, None, None) == "ttc"


def _git(cwd, *args):
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


def test_git_state_reads_commit_and_dirty_flag(tmp_path):
    assert git_state(tmp_path) is None  # not a repository
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "commit", "-q", "-m", "first")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "metrics.csv").write_text("untracked output\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": False}  # untracked files do not count
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path) == {"commit": head, "dirty": True}


# --- W&B set-up ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_wandb_login(monkeypatch, tmp_path):
    """No API key, no .netrc entry, no offline mode: what a machine that never ran `wandb login` looks like."""
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_credentials_come_from_the_environment_or_netrc(no_wandb_login, monkeypatch):
    assert not has_wandb_credentials()
    no_wandb_login.write_text("machine example.com login user password secret\n")
    assert not has_wandb_credentials()  # another host's entry
    no_wandb_login.write_text("machine api.wandb.ai login user password 0123456789abcdef\n")
    assert has_wandb_credentials()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    assert not has_wandb_credentials()  # a self-hosted server needs its own entry
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    assert has_wandb_credentials()


def cli_config(logger, root="runs/x"):
    """What LightningCLI hands `before_instantiate_classes` for `ttc fit` (the parts prepare_wandb reads)."""
    return Namespace(
        trainer=Namespace(logger=logger, default_root_dir=root),
        model=Namespace(class_path="ttc_lightning.GRPOModule", init_args=Namespace(model_name_or_path="org/Coder-1B")),
        data=Namespace(class_path="ttc_lightning.data.PrimeVulPatchDataModule", init_args=Namespace()),
    )


def wandb_logger(**init_args):
    args = {"name": None, "save_dir": ".", "dir": None, "offline": False, "mode": None, **init_args}
    return Namespace(class_path="lightning.pytorch.loggers.WandbLogger", init_args=Namespace(**args))


def test_prepare_wandb_refuses_to_start_without_login(no_wandb_login):
    with pytest.raises(TTCError) as info:
        prepare_wandb(cli_config(wandb_logger()))
    assert str(info.value) == WANDB_NO_LOGIN
    assert "wandb login" in WANDB_NO_LOGIN and "WANDB_MODE=offline" in WANDB_NO_LOGIN


@pytest.mark.parametrize("how", ["offline", "mode", "env", "key"])
def test_prepare_wandb_accepts_offline_runs_and_api_keys(no_wandb_login, monkeypatch, tmp_path, how):
    monkeypatch.chdir(tmp_path)  # not a git repository: no commit in the name
    logger = wandb_logger(offline=how == "offline", mode="offline" if how == "mode" else None)
    if how == "env":
        monkeypatch.setenv("WANDB_MODE", "disabled")
    if how == "key":
        monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef")
    config = cli_config(logger)
    prepare_wandb(config)  # no TTCError: this run needs no login
    args = config.trainer.logger.init_args  # accepted: the logger got its run name and the run directory
    assert (args.name, args.save_dir) == ("patch-Coder-1B", "runs/x")


def test_prepare_wandb_names_the_run_and_puts_it_in_the_run_directory(no_wandb_login, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not a git repository: no commit in the name
    config = cli_config([Namespace(class_path="lightning.pytorch.loggers.CSVLogger"), wandb_logger(offline=True)])
    prepare_wandb(config)
    args = config.trainer.logger[1].init_args
    assert args.name == "patch-Coder-1B"
    assert args.save_dir == "runs/x"
    prepare_wandb(config)  # a second call changes nothing
    assert (args.name, args.save_dir) == ("patch-Coder-1B", "runs/x")


def test_prepare_wandb_keeps_what_the_user_set(no_wandb_login):
    config = cli_config(wandb_logger(offline=True, name="mine", save_dir="elsewhere"))
    prepare_wandb(config)
    assert (config.trainer.logger.init_args.name, config.trainer.logger.init_args.save_dir) == ("mine", "elsewhere")


def test_prepare_wandb_reports_a_missing_package(no_wandb_login, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail as if it were not installed
    with pytest.raises(TTCError) as info:
        prepare_wandb(cli_config(wandb_logger(offline=True)))
    assert str(info.value) == WANDB_MISSING
    prepare_wandb(cli_config({"class_path": "lightning.pytorch.loggers.CSVLogger"}))  # other loggers need nothing
    prepare_wandb(cli_config(False))


def test_wandb_starts_without_anonymous_and_in_an_existing_directory(tmp_path):
    logger = WandbLogger(save_dir=str(tmp_path / "runs" / "x"), offline=True)  # no run starts before `experiment`
    assert "anonymous" in logger._wandb_init  # Lightning passes None; wandb warns about any value
    quiet_wandb_start([CSVLogger(tmp_path), logger])
    assert "anonymous" not in logger._wandb_init
    assert (tmp_path / "runs" / "x").is_dir()  # wandb looks for the git repository from there
    chosen = WandbLogger(save_dir=str(tmp_path), offline=True, anonymous=True)
    quiet_wandb_start([chosen])
    assert chosen._wandb_init["anonymous"] == "allow"  # what the user set stays


# --- completion tables ---------------------------------------------------------------------------------------

RECORDS = [
    {
        "step": 4,
        "prompt_index": 0,
        "prompt": [{"role": "system", "content": "Fix it."}, {"role": "user", "content": "int f();"}],
        "completion": "<answer>x</answer>",
        "rewards": {"format": 1.0, "patch": None},
        "reward": 1.0,
        "advantage": 0.7,
        "id": "17",
    },
    {
        "step": 4,
        "prompt_index": 0,
        "prompt": [{"role": "system", "content": "Fix it."}, {"role": "user", "content": "int f();"}],
        "completion": "no tags",
        "rewards": {"format": -1.0, "patch": -1.0},
        "reward": -2.0,
        "advantage": -0.7,
        "id": "17",
    },
]


def test_completion_table_has_one_column_per_reward_function():
    columns, rows = completion_table(RECORDS)
    assert columns == [
        "step",
        "prompt_index",
        "id",
        "prompt",
        "completion",
        "reward",
        "advantage",
        "reward/format",
        "reward/patch",
    ]
    assert rows[0] == [4, 0, "17", "system: Fix it.\n\nuser: int f();", "<answer>x</answer>", 1.0, 0.7, 1.0, None]
    assert rows[1][-2:] == [-1.0, -1.0]
    assert completion_table([]) == ([], [])


def test_completion_table_shows_what_dynamic_sampling_trained_on():
    records = [{**RECORDS[0], "trained": True}, {**RECORDS[1], "trained": False}]
    columns, rows = completion_table(records)
    assert columns[6:] == ["advantage", "trained", "reward/format", "reward/patch"]
    assert [row[7] for row in rows] == [True, False]


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that records tables instead of starting a W&B run."""

    def __init__(self) -> None:
        self.tables = []

    def log_table(self, key, columns=None, data=None, dataframe=None, step=None):
        self.tables.append((key, columns, data, step))


def test_completions_table_logs_every_n_steps_and_only_to_wandb(tmp_path):
    wandb, csv = RecordingWandbLogger(), CSVLogger(tmp_path)
    callback = CompletionsTable(every_n_steps=2)
    for step in range(5):  # rollouts 0..4: tables at 0, 2 and 4
        outputs = {"rollout": [{**r, "step": step} for r in RECORDS]}  # what training_step returns
        callback.on_train_batch_end(SimpleNamespace(loggers=[csv, wandb], global_step=step + 1), None, outputs, {}, 0)
    assert [(key, step) for key, _, _, step in wandb.tables] == [
        ("completions", 1),
        ("completions", 3),
        ("completions", 5),
    ]
    assert len(wandb.tables[0][2]) == 2  # one row per completion
    with pytest.raises(TTCError, match="every_n_steps must be >= 1"):
        CompletionsTable(every_n_steps=0)


# --- console -------------------------------------------------------------------------------------------------


def test_progress_bar_counts_optimizer_steps_of_the_whole_run(tmp_path):
    logger = CSVLogger(tmp_path)  # has a version, which Lightning's bar would show as v_num
    metrics = {"reward": 0.25, "kl": 0.01}
    bar = StepProgressBar()
    trainer = SimpleNamespace(
        loggers=[logger],
        progress_bar_metrics=metrics,
        global_step=12,
        max_steps=40,
        progress_bar_callback=bar,
        state=SimpleNamespace(fn="fit"),
        sanity_checking=False,
        training=True,
    )
    assert bar.get_metrics(trainer, None) == {"reward": 0.25, "kl": 0.01}
    bar._init_progress(trainer)
    try:
        bar.on_train_epoch_start(trainer, None)
        task = bar.train_progress_bar
        assert (task.description, task.completed, task.total) == ("step", 12, 40)  # not "Epoch 6/-2", batches
        trainer.global_step = 14  # num_iterations 2: one batch, two optimizer steps
        bar.on_train_batch_end(trainer, None, None, {}, 0)
        bar.on_train_epoch_start(trainer, None)  # a new epoch does not restart the bar
        assert (bar.train_progress_bar.completed, bar.train_progress_bar.total) == (14, 40)
    finally:
        bar.progress.stop()


def test_eta_and_progress_line():
    assert eta_seconds(12, 40, 2.5) == 70.0  # (40 - 12) steps x 2.5 s
    assert eta_seconds(40, 40, 2.5) == 0.0
    assert eta_seconds(12, -1, 2.5) is None  # no step limit (max_steps -1): no ETA
    line = progress_line(12, 40, seconds_per_step=2.4125, tokens_per_second=311.6, reward=0.41249, kl=0.0031416)
    # ETA: 28 steps x 2.4125 s = 67.55 s -> 0:01:08
    assert line == "step 12/40 | reward 0.412 | kl 0.00314 | 2.41 s/step | 312 tok/s | ETA 0:01:08"
    assert progress_line(3, -1, 0.5, 10.0) == "step 3 | 0.50 s/step | 10 tok/s"  # no reward yet, no KL, no limit


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_lines_every_n_steps_or_seconds(capsys):
    clock = FakeClock()
    lines = ProgressLines(every_n_steps=2, every_n_seconds=30, clock=clock)
    trainer = SimpleNamespace(global_step=0, max_steps=10, world_size=2, callback_metrics={})
    module, outputs = None, {"rollout": [{}] * 8}  # 8 completions on this rank
    lines.on_train_start(trainer, module)

    def step(at: float, **metrics: float) -> list[str]:
        lines.on_train_batch_start(trainer, module, {}, 0)
        clock.now = at
        trainer.global_step += 1
        trainer.callback_metrics = {"completions/mean_length": torch.tensor(6.0), **metrics}
        lines.on_train_batch_end(trainer, module, outputs, {}, 0)
        return capsys.readouterr().err.splitlines()

    assert step(4.0, reward=torch.tensor(0.1)) == []  # 1 step, 4 s: not yet
    # 2 steps in 9 s: 4.5 s/step; tokens 2 x (6 x 8 x 2 ranks) = 192 in 9 s = 21.3/s; ETA 8 x 4.5 = 36 s
    assert step(9.0, reward=torch.tensor(0.5)) == [
        "ttc: step 2/10 | reward 0.500 | 4.50 s/step | 21 tok/s | ETA 0:00:36"
    ]
    # one step, but 36 s since the last line: 96 tokens / 36 s = 2.7/s; ETA 7 x 36 = 252 s
    assert step(45.0, reward=torch.tensor(0.25), kl=torch.tensor(0.02)) == [
        "ttc: step 3/10 | reward 0.250 | kl 0.02 | 36.00 s/step | 3 tok/s | ETA 0:04:12"
    ]
    lines.on_train_batch_start(trainer, module, {}, 0)  # step 4 starts at 45 s and takes long
    clock.now = 74.0
    lines.check_busy()
    assert capsys.readouterr().err == ""  # 29 s since the last line
    clock.now = 80.0
    lines.check_busy()
    assert capsys.readouterr().err == "ttc: working on step 4/10 for 0:00:35\n"
    clock.now = 81.0
    lines.check_busy()
    assert capsys.readouterr().err == ""  # a line went out 1 s ago
    clock.now = 82.0
    trainer.global_step += 1
    lines.on_train_batch_end(trainer, module, outputs, {}, 0)
    # step 4 ends 37 s after step 3's line: its line goes out though "working on" went out 2 s ago
    assert capsys.readouterr().err.startswith("ttc: step 4/10 | reward 0.250 | kl 0.02 | 37.00 s/step")
    with pytest.raises(TTCError, match="every_n_steps must be >= 1"):
        ProgressLines(every_n_steps=0)


def test_short_steps_get_step_lines_not_working_on_lines(capsys):
    clock = FakeClock()
    lines = ProgressLines(every_n_steps=100, every_n_seconds=2, clock=clock)
    trainer = SimpleNamespace(global_step=0, max_steps=10, world_size=1, callback_metrics={})
    module, outputs = None, {"rollout": []}
    lines.on_train_start(trainer, module)
    for start in (0.0, 0.8, 1.6):  # steps of 0.8 s; the watcher ticks 0.5 s into each, 2.1 s after the last line
        clock.now = start
        lines.on_train_batch_start(trainer, module, {}, 0)
        clock.now = start + 0.5
        lines.check_busy()
        clock.now = start + 0.8
        trainer.global_step += 1
        lines.on_train_batch_end(trainer, module, outputs, {}, 0)
    # nothing until step 3 ends at 2.4 s, then its line: 3 steps in 2.4 s
    assert capsys.readouterr().err == "ttc: step 3/10 | 0.80 s/step | 0 tok/s | ETA 0:00:06\n"


def test_parameter_count_names_the_trained_share(caplog):
    policy = torch.nn.Linear(3, 2)  # 6 weights + 2 biases
    policy.bias.requires_grad_(False)
    with caplog.at_level("INFO"):
        ParameterCount().on_fit_start(None, SimpleNamespace(policy=policy))
    assert "ttc: policy: 8 parameters, 6 trained (75%)" in caplog.messages  # 6 / 8


def test_first_last_means_skip_missing_values():
    history = [{"reward": 0.0, "f": math.nan}, {"reward": 0.3, "f": 1.0}, {"reward": 0.6}, {"reward": 0.9, "f": 0.5}]
    means = first_last(history, window=2)
    assert means["reward"] == pytest.approx((0.15, 0.75))  # (0.0 + 0.3) / 2, (0.6 + 0.9) / 2
    assert means["f"] == pytest.approx((1.0, 0.5))  # NaN and absent entries are skipped
    assert math.isnan(first_last([{"g": math.nan}], window=3)["g"][0])


def test_format_duration():
    assert format_duration(3725.2) == "1:02:05"  # 3725 s = 1 h, 2 min, 5 s
    assert format_duration(59.6) == "0:01:00"


def test_summary_table_reports_rewards_tokens_and_checkpoint(capsys):
    summary = SummaryTable(window=2)
    trainer = SimpleNamespace(
        world_size=2,
        global_step=3,
        checkpoint_callback=SimpleNamespace(last_model_path="ckpts/last.ckpt"),
        callbacks=[],
        max_steps=3,
        max_epochs=None,
        current_epoch=0,
    )
    module, outputs = None, {"rollout": [{}] * 8}  # 8 completions on this rank
    summary.setup(trainer, module, "fit")
    for reward, fraction, length in [(0.1, 0.2, 10.0), (0.2, 0.4, 12.0), (0.5, 0.6, 20.0)]:
        trainer.callback_metrics = {
            "reward": torch.tensor(reward),
            "rewards/char_fraction_reward/mean": torch.tensor(fraction),
            "rewards/char_fraction_reward/std": torch.tensor(1.0),
            "completions/mean_length": torch.tensor(length),
            "loss": torch.tensor(0.5),
        }
        summary.on_train_batch_end(trainer, module, outputs, {}, 0)
    summary.on_fit_end(trainer, module)
    err = capsys.readouterr().err
    # reward: first 2 (0.1 + 0.2) / 2 = 0.150, last 2 (0.2 + 0.5) / 2 = 0.350; fraction: 0.300 -> 0.500
    assert "reward 0.150 -> 0.350 (mean of the first and last 2), last checkpoint: ckpts/last.ckpt" in err
    assert "char_fraction_reward" in err and "0.300" in err and "0.500" in err
    assert "std" not in err
    assert "672" in err  # tokens: (10 + 12 + 20) mean lengths x 8 completions x 2 ranks = 672
    assert "trainer.max_steps (3)" in err  # global_step 3 reached max_steps 3


def test_run_info_is_written_and_logged(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not a git repository: no "git" entry
    monkeypatch.setenv("PL_GLOBAL_SEED", "123")
    logger = CSVLogger(tmp_path, name="logs")
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=logger, enable_progress_bar=False)
    _ = logger.experiment  # fit creates it before the callbacks' setup
    RunInfo().setup(trainer, None, "fit")
    info = json.loads((tmp_path / "logs" / "version_0" / "run_info.json").read_text())
    assert info["versions"]["torch"] == torch.__version__
    assert set(info["versions"]) >= {"lightning", "transformers", "peft", "bitsandbytes"}
    assert (info["precision"], info["accelerator"], info["world_size"], info["seed"]) == ("32-true", "cpu", 1, 123)
    assert len(info["devices"]) == info["devices_per_node"] == 1
    assert "git" not in info
    assert logger.experiment.hparams["run_info"] == info
