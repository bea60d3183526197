import logging
import os
import signal
import subprocess
import sys
from unittest import mock

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")
pytest.register_assert_rewrite("tests.helpers")  # its asserting helpers report as a test's own asserts do

from tests.helpers import UNREACHABLE  # noqa: E402


@pytest.fixture
def run_ttc(capsys, monkeypatch, tmp_path):
    """Run `ttc ARGS` in-process from tmp_path; returns (exit code, stdout, stderr)."""
    from ttc_lightning.run.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["ttc"])  # the CLI must read `args`, not pytest's own arguments

    def run(*args: str) -> tuple[int, str, str]:
        # Library loggers keep the stream they found at import time, which pytest may have closed since.
        for logger in logging.root.manager.loggerDict.values():
            for handler in getattr(logger, "handlers", []):
                if type(handler) is logging.StreamHandler:
                    handler.stream = sys.stderr
        try:
            main(list(args))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def kill_on_exit():
    """Kills the session of every process registered with it, should a test fail while one is running."""
    procs: list[subprocess.Popen] = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(autouse=True)
def restore_global_rank():
    """A Trainer built under simulated SLURM variables sets Lightning's global rank; later runs must see rank 0."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    saved = rank_zero_only.rank, fabric_rank_zero_only.rank
    yield
    rank_zero_only.rank, fabric_rank_zero_only.rank = saved


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` are skipped where CUDA is not available, so they need no skipif of their own."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """No offline variable, an empty HF_HOME, the Hub at an address that does not answer; the offline switch that a
    failed probe turns on is restored afterwards."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    for name in ("TRANSFORMERS_OFFLINE", "HF_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_ENDPOINT", UNREACHABLE)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    if "datasets.config" in sys.modules:
        monkeypatch.setattr(
            sys.modules["datasets.config"], "HF_HUB_OFFLINE", sys.modules["datasets.config"].HF_HUB_OFFLINE
        )
    return tmp_path / "hf-home"


@pytest.fixture
def probes(monkeypatch):
    """Counts the Hub probes (each still runs)."""
    from ttc_lightning.run import preflight

    calls = []
    real = preflight.hub_reachable

    def counted(endpoint, timeout=preflight.PROBE_TIMEOUT_S):
        calls.append(endpoint)
        return real(endpoint, timeout)

    monkeypatch.setattr(preflight, "hub_reachable", counted)
    return calls


@pytest.fixture
def process_group_cleanup():
    """Restores the environment and destroys the process group an in-process distributed run leaves behind."""
    with mock.patch.dict(os.environ):
        yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
