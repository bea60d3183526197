"""Lightning's SLURM detection under simulated `srun` variables, alone and in the Trainer that `ttc` builds."""

import os
import signal
import sys
from unittest import mock

import lightning as L
import pytest
from lightning.fabric.plugins.environments import SLURMEnvironment

from tests.helpers import TINY
from ttc_lightning.module import GRPOModule
from ttc_lightning.run.cli import TTCCLI

# Task 5 of a job with 2 nodes x 4 tasks: the second task on the second node.
SRUN = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "ttc-fit",
    "SLURM_NTASKS": "8",
    "SLURM_NTASKS_PER_NODE": "4",
    "SLURM_NNODES": "2",
    "SLURM_NODELIST": "gpu[017-018]",
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NODEID": "1",
}
# Variables by which Lightning would detect another launcher, or that would override SLURM's address and port.
OTHER_LAUNCHERS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


@pytest.fixture
def srun(request):
    """The environment of an `srun` task (SRUN, updated by an indirect parameter), restored afterwards."""
    with mock.patch.dict(os.environ):
        for name in [n for n in os.environ if n.startswith("SLURM_") or n in OTHER_LAUNCHERS]:
            del os.environ[name]
        os.environ.update({**SRUN, **getattr(request, "param", {})})
        yield


def build_trainer(*args: str) -> L.Trainer:
    """The Trainer `ttc fit --config tiny.yaml ARGS` would run, built by ttc's CLI class without running."""
    with mock.patch.object(sys, "argv", ["ttc"]):  # pytest's own arguments are not meant for the CLI
        cli = TTCCLI(
            GRPOModule,
            L.LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            run=False,
            args=["--config", TINY, "--trainer.enable_progress_bar", "false", *args],
        )
    return cli.trainer


def test_slurm_environment_reads_ranks_and_address_from_srun(srun):
    assert SLURMEnvironment.detect()
    env = SLURMEnvironment()
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)
    assert env.main_address == "gpu017"  # the first node of the range
    assert env.main_port == 4242 + 15000  # the job id's last 4 digits + 15000: every task derives the same port
    assert env.auto_requeue and env.requeue_signal == signal.SIGUSR1


@pytest.mark.parametrize("srun", [{"SLURM_JOB_NAME": "interactive"}], indirect=True)
def test_interactive_allocation_is_not_treated_as_srun(srun):
    # `srun --job-name=interactive --pty bash` then `ttc fit`: Lightning launches the processes itself.
    assert not SLURMEnvironment.detect()


def test_ttc_trainer_under_srun_takes_its_ranks_from_slurm(srun):
    trainer = build_trainer("--trainer.devices", "4", "--trainer.num_nodes", "2", "--trainer.strategy", "ddp")
    env = trainer.strategy.cluster_environment
    assert isinstance(env, SLURMEnvironment)
    assert env.auto_requeue  # SIGUSR1 before the time limit saves hpc_ckpt_<n>.ckpt and requeues the job
    assert (trainer.world_size, trainer.global_rank, trainer.local_rank, trainer.node_rank) == (8, 5, 1, 1)
    assert env.creates_processes_externally  # srun started every task: Lightning's launcher starts no more
