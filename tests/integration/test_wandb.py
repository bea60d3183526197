"""W&B tracking end to end on the tiny model, offline: what reaches the run files, and the set-up errors."""

import json
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import FAST, REPO, TINY
from ttc_lightning.run.progress import SummaryTable
from ttc_lightning.run.tracking import RunInfo, SaveConfigToWandb, default_run_name, git_state, prepare_wandb

WANDB_YAML = str(REPO / "configs" / "wandb.yaml")


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """W&B offline, every W&B directory under tmp_path, no credentials; the run is finished afterwards."""
    wandb = pytest.importorskip("wandb")
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_NAME", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # WandbLogger(offline=True) rewrites it: restored on teardown
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / name.lower()))
    yield
    wandb.finish()  # Lightning leaves the run open until the process exits


@pytest.fixture
def wired(monkeypatch):
    """`ttc` with the tracking wiring: the W&B check, the resolved config in W&B, and the default callbacks."""
    from ttc_lightning.run import cli

    class WiredCLI(cli.TTCCLI):
        def __init__(self, *args, **kwargs):
            kwargs["save_config_callback"] = SaveConfigToWandb
            kwargs["trainer_defaults"] = {"callbacks": [SummaryTable(), RunInfo()]}
            super().__init__(*args, **kwargs)

        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            prepare_wandb(self.config[self.subcommand])

    monkeypatch.setattr(cli, "TTCCLI", WiredCLI)


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a `.wandb` file: a LevelDB-style log of 32 KiB blocks after a 7-byte header."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, records = 32768, 7, [], []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        if kind == 0:
            break
        chunks.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: the record is complete
            record = Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
    return records


def wait_for_records(path: Path, timeout_s: float = 60.0) -> list:
    """W&B's writer process flushes the run file after the run ends: wait until it holds the run and its history."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = read_wandb_records(path)
        kinds = {r.WhichOneof("record_type") for r in records}
        if {"run", "history"} <= kinds or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def test_offline_run_logs_metrics_config_run_info_and_completions(run_ttc, tmp_path, wandb_env, wired):
    code, _, err = run_ttc(
        "fit",
        "--config",
        TINY,
        "--config",
        WANDB_YAML,
        "--trainer.logger.init_args.offline",
        "true",
        "--trainer.callbacks.init_args.every_n_steps",
        "1",
        "--trainer.max_steps",
        "2",
        "--trainer.default_root_dir",
        "run",
        *FAST,
    )
    assert code == 0, err
    import wandb

    # ttc ends the W&B run itself (Lightning leaves it to the interpreter's exit, when wandb writes its closing lines,
    # `wandb sync` among them, to stdout with colour codes), so they come on stderr as plain text.
    assert wandb.run is None
    run = tmp_path / "run"
    [offline] = (run / "wandb").glob("offline-run-*")  # the W&B files live in the run directory
    records = wait_for_records(next(offline.glob("*.wandb")))

    [info] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert info.display_name == default_run_name("prompt", "tiny", (git_state() or {}).get("commit"))
    assert info.project == "ttc" and list(info.tags) == ["grpo", "primevul"]

    history = [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    keys = set().union(*history)
    assert {"reward", "rewards/char_fraction_reward/mean", "loss", "grad_norm", "completions/mean_length"} <= keys
    tables = [h for h in history if h.get("completions/_type") == "table-file"]
    assert [h["trainer/global_step"] for h in tables] == [1, 2]  # every_n_steps=1: one table per step
    table = json.loads((offline / "files" / tables[0]["completions/path"]).read_text())
    assert table["columns"][:2] == ["step", "prompt_index"]
    assert {"prompt", "completion", "reward", "advantage", "reward/char_fraction_reward"} <= set(table["columns"])
    assert len(table["data"]) == 4 * 2  # prompts x G

    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") in ("config", "run")
        for item in (r.config.update if r.WhichOneof("record_type") == "config" else r.run.config.update)
    }
    assert config["config"]["trainer"]["max_steps"] == 2  # the resolved config
    assert config["config"]["model"]["init_args"]["num_generations"] == 2
    assert config["num_generations"] == 2  # the module's hyperparameters
    assert config["run_info"]["world_size"] == 1 and config["run_info"]["precision"] == "32-true"

    # Local copies, as in a run without W&B: metrics.csv, run_info.json, the same rows as the tables in rollouts.jsonl.
    logs = run / "logs" / "version_0"
    assert json.loads((logs / "run_info.json").read_text()) == config["run_info"]
    assert len((logs / "rollouts.jsonl").read_text().splitlines()) == 2 * 4 * 2  # steps x prompts x G
    assert "reward" in (logs / "metrics.csv").read_text().splitlines()[0]
    assert "reward 0." in err


def test_missing_login_stops_before_training(run_ttc, tmp_path, wandb_env, wired, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    code, _, err = run_ttc("fit", "--config", TINY, "--config", WANDB_YAML, "--trainer.default_root_dir", "run", *FAST)
    assert code == 1
    assert (
        err.strip().splitlines()[-1].startswith("ttc: error: trainer.logger: W&B is not logged in: run `wandb login`")
    )
    assert "Traceback" not in err
    assert not (tmp_path / "run").exists()  # nothing started


def test_missing_wandb_package_stops_before_training(run_ttc, tmp_path, wandb_env, wired, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    code, _, err = run_ttc("fit", "--config", TINY, "--config", WANDB_YAML, "--trainer.default_root_dir", "run", *FAST)
    assert code == 1
    assert "ttc: error: trainer.logger: WandbLogger needs the wandb package: `pip install wandb`" in err
    assert "Traceback" not in err
