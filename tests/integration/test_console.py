"""What `ttc` prints: progress lines in a log, no library notices, the resolved config, problems found up front."""

import re
import time
import warnings
from pathlib import Path

import yaml
from lightning.fabric.utilities.rank_zero import LightningDeprecationWarning

from tests.helpers import DEMO, UNREACHABLE

SMALL = ["--model.max_new_tokens", "8", "--model.num_generations", "2", "--trainer.default_root_dir", "run"]
NUMBER = r"\d+\.\d+"


def console_filters() -> None:
    """Python's default filters (which hide deprecations raised outside `__main__`) plus Lightning's (which shows its
    own), every occurrence recorded."""
    warnings.simplefilter("always")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("always", category=LightningDeprecationWarning)


def test_a_log_gets_progress_lines_and_no_library_warnings(run_ttc):
    # Full fine-tuning with beta > 0: the frozen reference is in eval mode (Lightning would warn about it).
    args = ["fit", "--config", DEMO, *SMALL, "--trainer.max_steps", "3", "--model.beta", "0.04"]
    with warnings.catch_warnings(record=True) as caught:
        console_filters()
        code, out, err = run_ttc(*args, "--progress.every_n_steps", "2")
    assert code == 0, err
    assert [str(w.message) for w in caught] == []
    assert "Tip:" not in err
    assert "ttc: train: 12 prompts" in err.splitlines()  # the `ttc` logger's INFO lines show
    # What ttc says itself, or what does not concern a user, from Lightning: none of its lines.
    for library_line in ("Seed set to", "GPU available:", "TPU available:", "`Trainer.fit` stopped"):
        assert library_line not in err, err
    # stdout and stderr are not terminals here: lines on stderr, every 2 steps and at the end, and no rich bar.
    lines = [line for line in err.splitlines() if line.startswith("ttc: step ")]
    assert [line.split(" | ")[0] for line in lines] == ["ttc: step 2/3", "ttc: step 3/3"]
    fields = rf"reward {NUMBER} \| kl \S+ \| {NUMBER} s/step \| \d+ tok/s \| ETA \d+:\d\d:\d\d"
    for line in lines:
        assert re.fullmatch(rf"ttc: step \d/3 \| {fields}", line), line
    assert "━" not in out  # the rich bar draws on stdout
    assert re.search(r"^ended by +trainer\.max_steps \(3\) *$", err, re.M), err


def test_a_run_stopped_by_max_time_says_so_in_its_summary(run_ttc):
    code, _, err = run_ttc("fit", "--config", DEMO, *SMALL, "--trainer.max_time", "00:00:00:03")
    assert code == 0, err
    assert re.search(r"^ended by +trainer\.max_time \(0:00:03\) *$", err, re.M), err
    assert "Time limit reached" not in err  # Lightning's line, with its own words


def test_resuming_and_validating_a_run_show_no_library_warnings(run_ttc):
    # Lightning warns on resume that the run's checkpoint directory is not empty (ttc's run directory is meant to be
    # resumed), and on validate, or a resume with another checkpoint interval, that the checkpoint's callbacks
    # differ from the trainer's (their state is the list of periodic checkpoints, nothing a run needs back).
    assert run_ttc("fit", "--config", DEMO, *SMALL, "--trainer.max_steps", "2")[0] == 0
    resume = ["--trainer.max_steps", "3", "--checkpoint.every_n_train_steps", "1", "--ckpt_path", "last"]
    validate = ["--data.val_split", "valid", "--data.max_val_prompts", "1", "--ckpt_path", "last"]
    with warnings.catch_warnings(record=True) as caught:
        console_filters()
        for command, args in (("fit", resume), ("validate", validate)):
            code, _, err = run_ttc(command, "--config", DEMO, *SMALL, *args)
            assert code == 0, err
            assert "Restor" not in err and "Loaded model weights" not in err  # ttc names the checkpoint itself
            assert "ttc: checkpoint " in err
    assert [str(w.message) for w in caught] == []
    assert sorted(p.name for p in Path("run/checkpoints").glob("last*")) == ["last.ckpt"]  # not last-v1.ckpt


def test_print_config_shows_the_values_that_will_be_used(run_ttc):
    code, out, err = run_ttc("fit", "--config", DEMO, "--print_config")
    assert code == 0, err
    config = yaml.safe_load(out)
    assert config["trainer"]["precision"] == "32-true"  # chosen for the CPU, not null
    assert config["trainer"]["logger"] == {
        "class_path": "lightning.pytorch.loggers.CSVLogger",
        "init_args": {"save_dir": "runs/demo", "name": "logs"},
    }
    assert config["checkpoint"]["dirpath"] == "runs/demo/checkpoints"
    assert config["trainer"]["limit_val_batches"] == 0  # val_split: null
    assert config["progress"] == {"mode": "auto", "every_n_steps": 10, "every_n_seconds": 30.0}


def test_offline_problems_are_reported_together_before_anything_loads(run_ttc, hub_env, probes):
    started = time.perf_counter()
    code, _, err = run_ttc(
        "fit",
        "--config",
        DEMO,
        "--model.model_name_or_path",
        "org/coder-not-cached",
        "--data.data_path",
        "hf://org/primevul-not-cached",
    )
    assert code == 1
    assert "Traceback" not in err
    assert f"the Hugging Face Hub ({UNREACHABLE}) did not answer" in err
    errors = [line for line in err.splitlines() if line.startswith("ttc: error: ")]
    assert len(errors) == 1
    assert errors[0].startswith("ttc: error: 2 problems: (1) model.model_name_or_path: org/coder-not-cached is not")
    assert "(2) data.data_path: hf://org/primevul-not-cached is not in the Hugging Face cache" in errors[0]
    assert probes == [UNREACHABLE]  # one probe, no retries
    assert time.perf_counter() - started < 20
