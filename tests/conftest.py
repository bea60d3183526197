import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "offline")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
REAL_PRIMEVUL = REPO.parent / "shared" / "data" / "primevul-real"


@pytest.fixture
def run_ttc(capsys, monkeypatch, tmp_path):
    """Run `ttc ARGS` in-process from tmp_path; returns (exit code, stdout, stderr)."""
    from ttc_lightning.cli import main

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
