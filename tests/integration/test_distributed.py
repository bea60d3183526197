"""`ttc fit` across processes on CPU: DDP over gloo, preemption signals and resuming, the strategies ttc refuses.

Runs that need their own process (DDP, signals) start `ttc` as a subprocess, about 8 s of imports each; DDP starts
its second process itself. The others run `ttc` in this process.
"""

import json
import os
import signal
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.connectors.signal_connector import _HandlersCompose, _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from tests.helpers import (
    DEMO_PROMPTS,
    FAST,
    HELPERS,
    TINY,
    B,
    G,
    assert_trained_groups_differ,
    finish,
    process_env,
    read_metrics,
    read_rollouts,
    rollout_steps,
    start_ttc,
    tied_prompts,
    wait_for,
)
from ttc_lightning.errors import TTCError
from ttc_lightning.run.saving import CheckpointOnInterrupt, sigterm_between_steps
from ttc_lightning.training.grpo import group_advantages

HERE = "tests.integration.test_distributed"
JOB_ID = "4242"
SLURM_JOB = {
    "SLURM_JOB_ID": JOB_ID,
    "SLURM_JOB_NAME": "ttc-fit",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_NODELIST": "localhost",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def first_char_on_rank_zero(completions: list[str], **_) -> list[float]:
    """The first character's code on rank 0 (almost any two completions differ); 0 for all on the other ranks."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    return [float(ord(text[0])) if text and rank == 0 else 0.0 for text in completions]


class SaveTrainable(L.Callback):
    """Each rank writes its trainable weights at the start and end of fit to `trainable.rank<k>.pt`."""

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start = {k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end = {k: p.detach().clone() for k, p in pl_module.named_parameters() if p.requires_grad}
        path = Path(trainer.default_root_dir) / f"trainable.rank{trainer.global_rank}.pt"
        torch.save({"start": self.start, "end": end}, path)


class CPUFSDPStrategy(FSDPStrategy):
    """FSDP that Lightning lets run on CPU: its GPU-only check matches the exact type `FSDPStrategy`."""


@pytest.fixture
def one_thread():
    """One intra-op thread for runs in this process too (see `process_env` in tests/helpers.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_ddp_ranks_split_prompts_and_agree_on_weights_and_metrics(tmp_path, kill_on_exit):
    proc = start_ttc(
        tmp_path,
        *("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "2"),
        *("--model.rewards", f"[{HELPERS}.distinct_chars_reward]", f"--trainer.callbacks+={HERE}.SaveTrainable"),
        # several micro-batches per step: gradients are all-reduced once, after the last one
        *("--model.micro_batch_size", "3"),
    )
    kill_on_exit(proc)
    code, out = finish(proc, tmp_path)
    assert code == 0, out[-3000:]
    run = tmp_path / "run"

    # One last.ckpt, written by rank 0, and no periodic checkpoint at a 50-step interval.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2

    logs = run / "logs" / "version_0"
    ranks = [read_rollouts(logs / "rollouts.jsonl"), read_rollouts(logs / "rollouts.rank1.jsonl")]
    assert [len(rows) for rows in ranks] == [2 * B * G, 2 * B * G]  # 2 steps x 4 prompts x G each
    seen: Counter[str] = Counter()
    for step in (1, 2):  # labelled with the optimizer steps taken once each is done
        per_rank = [[r for r in rows if r["step"] == step] for rows in ranks]
        prompt_sets = []
        for rows in per_rank:
            # A prompt's G completions are all on this rank, and its advantages came from exactly those G rewards.
            groups = Counter(json.dumps(r["prompt"]) for r in rows)
            assert sorted(groups.values()) == [G] * B
            rows = sorted(rows, key=lambda r: r["prompt_index"])
            expected = group_advantages(torch.tensor([r["reward"] for r in rows]), G, "group")
            assert torch.allclose(torch.tensor([r["advantage"] for r in rows]), expected, atol=1e-5)
            prompt_sets.append(set(groups))
        assert not prompt_sets[0] & prompt_sets[1]
        seen.update(prompt_sets[0] | prompt_sets[1])
    # 2 steps x 2 ranks x 4 prompts = the 16 demo prompts, each once: DDP's sampler split the epoch between ranks.
    demo = {json.dumps(json.loads(line)["prompt"]) for line in DEMO_PROMPTS.read_text().splitlines()}
    assert set(seen) == demo and set(seen.values()) == {1}

    # The logged reward is the mean over both ranks' completions, not rank 0's alone.
    metrics = {int(row["step"]): float(row["reward"]) for row in read_metrics(run)}
    assert sorted(metrics) == [1, 2]
    rank0_differs = False
    for step, logged in metrics.items():
        rewards = [[r["reward"] for r in rows if r["step"] == step] for rows in ranks]
        both = sum(rewards[0] + rewards[1]) / (2 * B * G)
        assert logged == pytest.approx(both, abs=1e-4)
        rank0_differs |= abs(sum(rewards[0]) / (B * G) - both) > 1e-3
    assert rank0_differs, "both ranks had the same mean reward at every step: the check above proves nothing"
    # Each rank samples from its own random stream: the same seed on both would tie their completions together.
    same = sum(a["completion"] == b["completion"] for a, b in zip(*ranks, strict=True))
    assert same < len(ranks[0]) // 4, f"{same} of {len(ranks[0])} completions are the same on both ranks"

    # Different prompts give different local gradients; DDP averages them, so the ranks' weights stay identical.
    weights = [torch.load(run / f"trainable.rank{k}.pt") for k in (0, 1)]
    for name, end in weights[0]["end"].items():
        assert torch.equal(end, weights[1]["end"][name]), name
    assert any(not torch.equal(weights[0]["end"][n], s) for n, s in weights[0]["start"].items())


@pytest.mark.slow
def test_sigterm_saves_interrupted_checkpoint_and_resume_continues_there(tmp_path, kill_on_exit, run_ttc, one_thread):
    # 64 prompts, 16 steps an epoch: the signal lands mid-epoch (an epoch's last step is the test below).
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(DEMO_PROMPTS.read_text() * 4)
    data = ["--data.train_path", str(prompts)]
    rollouts = tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl"
    proc = start_ttc(tmp_path, "--trainer.max_steps", "1000", *data)
    kill_on_exit(proc)
    wait_for(proc, tmp_path, lambda: rollout_steps(rollouts) >= 2, "step 2")
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, tmp_path)

    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last-interrupted.ckpt"], out[-3000:]
    k = torch.load(checkpoints / "last-interrupted.ckpt", weights_only=False)["global_step"]
    assert 2 <= k < 16
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run")] == list(range(1, k + 1))

    args = ["--trainer.default_root_dir", "run", "--ckpt_path", "last", "--trainer.max_steps", str(k + 2), *data, *FAST]
    code, _, err = run_ttc("fit", "--config", TINY, *args)
    assert code == 0, err
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run", version=1)] == [
        k + 1,
        k + 2,
    ]  # resumed, not restarted
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == k + 2


def test_resume_from_the_end_of_an_epoch_logs_the_steps_it_trains(run_ttc, tmp_path, one_thread):
    args = ["fit", "--config", TINY, "--trainer.default_root_dir", "run", *FAST]
    assert run_ttc(*args, "--trainer.max_steps", str(16 // B))[0] == 0  # exactly one epoch of the 16 demo prompts
    code, _, err = run_ttc(*args, "--trainer.max_steps", "6", "--ckpt_path", "last")
    assert code == 0, err
    trained = sorted({r["step"] for r in read_rollouts(tmp_path / "run" / "logs" / "version_1" / "rollouts.jsonl")})
    assert trained == [5, 6]
    assert [int(r["step"]) for r in read_metrics(tmp_path / "run", version=1)] == trained


def prompts_per_step(*paths: Path) -> dict[int, list[str]]:
    """The prompts each step trained on, in order, from one or more rollouts files."""
    steps: dict[int, list[str]] = {}
    for path in paths:
        for r in read_rollouts(path):
            steps.setdefault(r["step"], []).append(json.dumps(r["prompt"]))
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("stop", [6, 8], ids=["mid-epoch", "epoch-end"])
def test_resume_mid_epoch_continues_the_epoch_instead_of_replaying_it(run_ttc, tmp_path, one_thread, stop):
    args = ["fit", "--config", TINY, *FAST]
    # 16 prompts, 4 per step, so 4 steps an epoch: stop in the middle of epoch 1 (after step 6) or at the end of
    # epoch 1 (after step 8: the last checkpoint is written after the epoch ended), resume to step 10, and compare
    # with a run that was never stopped. The same prompts in the same order means the epoch went on where it
    # stopped, in the order that epoch had, and the next epoch was shuffled as it would have been.
    assert run_ttc(*args, "--trainer.default_root_dir", "whole", "--trainer.max_steps", "10")[0] == 0
    assert run_ttc(*args, "--trainer.default_root_dir", "run", "--trainer.max_steps", str(stop))[0] == 0
    code, _, err = run_ttc(*args, "--trainer.default_root_dir", "run", "--trainer.max_steps", "10", "--ckpt_path=last")
    assert code == 0, err
    logs = tmp_path / "run" / "logs"
    resumed = prompts_per_step(logs / "version_0" / "rollouts.jsonl", logs / "version_1" / "rollouts.jsonl")
    whole = prompts_per_step(tmp_path / "whole" / "logs" / "version_0" / "rollouts.jsonl")
    assert sorted(resumed) == sorted(whole) == list(range(1, 11))  # labelled with the optimizer steps done
    assert resumed == whole
    assert len({p for step in range(5, 9) for p in whole[step]}) == 16  # steps 5-8 are epoch 1: each prompt once
    assert whole[5] != whole[1] and whole[9] != whole[5]  # each epoch has an order of its own


@pytest.mark.slow
def test_ddp_resume_mid_epoch_continues_each_ranks_share(tmp_path, kill_on_exit):
    # 2 ranks x 4 prompts a step: the 16 demo prompts are 2 steps an epoch. Stop after step 3 (mid-epoch 1), resume
    # to step 6 and compare each rank's prompts with a run that was never stopped.
    ddp = ["--trainer.devices", "2", "--trainer.strategy", "ddp"]
    runs = {"whole": ["--trainer.max_steps", "6"], "part": ["--trainer.max_steps", "3"]}
    runs["rest"] = ["--trainer.max_steps", "6", "--ckpt_path", "last"]
    for name, args in runs.items():
        run_dir = "whole" if name == "whole" else "run"
        proc = start_ttc(tmp_path, *ddp, *args, "--trainer.default_root_dir", run_dir)
        kill_on_exit(proc)
        code, out = finish(proc, tmp_path)
        assert code == 0, out[-3000:]
    for rank_file in ("rollouts.jsonl", "rollouts.rank1.jsonl"):
        logs = tmp_path / "run" / "logs"
        resumed = prompts_per_step(logs / "version_0" / rank_file, logs / "version_1" / rank_file)
        whole = prompts_per_step(tmp_path / "whole" / "logs" / "version_0" / rank_file)
        assert sorted(whole) == list(range(1, 7))
        assert resumed == whole, rank_file


@pytest.mark.slow
def test_resume_with_dynamic_sampling_draws_the_prompts_of_an_unbroken_run(run_ttc, tmp_path, one_thread):
    # 32 prompts, half of them always tied, 4 a batch: a step draws more batches for the groups it dropped. Stop
    # after step 3, resume to step 8, and compare every prompt sampled (trained on or not) with an unbroken run.
    dynamic = ["--model.dynamic_sampling", "true", "--model.rewards", f"[{HELPERS}.tie_or_first_char]"]
    args = ["fit", "--config", TINY, *FAST, *dynamic, "--data.train_path", str(tied_prompts(tmp_path))]
    assert run_ttc(*args, "--trainer.default_root_dir", "whole", "--trainer.max_steps", "8")[0] == 0
    assert run_ttc(*args, "--trainer.default_root_dir", "run", "--trainer.max_steps", "3")[0] == 0
    code, _, err = run_ttc(*args, "--trainer.default_root_dir", "run", "--trainer.max_steps", "8", "--ckpt_path=last")
    assert code == 0, err
    logs = tmp_path / "run" / "logs"
    resumed = prompts_per_step(logs / "version_0" / "rollouts.jsonl", logs / "version_1" / "rollouts.jsonl")
    whole = prompts_per_step(tmp_path / "whole" / "logs" / "version_0" / "rollouts.jsonl")
    assert sorted(whole) == list(range(1, 9))
    assert resumed == whole
    rounds = [float(r["sampling_rounds"]) for r in read_metrics(tmp_path / "whole")]
    assert rounds == [float(r["sampling_rounds"]) for v in (0, 1) for r in read_metrics(tmp_path / "run", v)]
    assert max(rounds[3:]) > 1  # the resumed steps drew prompts beyond Lightning's batches too


@pytest.mark.slow
def test_ddp_with_dynamic_sampling_ranks_agree_on_rounds_and_steps(tmp_path, kill_on_exit):
    # On rank 1 every group ties: it draws and samples every round (rank 0 may be full), keeps nothing and joins
    # each step with a zero-weight backward. 16 prompts a rank, 4 a batch: steps also run out of the epoch.
    proc = start_ttc(
        tmp_path,
        *("--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.max_steps", "4"),
        *("--model.dynamic_sampling", "true", "--model.max_sampling_rounds", "3"),
        *("--model.rewards", f"[{HERE}.first_char_on_rank_zero]", f"--trainer.callbacks+={HERE}.SaveTrainable"),
        *("--data.train_path", str(tied_prompts(tmp_path)), "--model.micro_batch_size", "3"),
    )
    kill_on_exit(proc)
    code, out = finish(proc, tmp_path)
    assert code == 0, out[-3000:]
    run = tmp_path / "run"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    logs = run / "logs" / "version_0"
    ranks = [read_rollouts(logs / "rollouts.jsonl"), read_rollouts(logs / "rollouts.rank1.jsonl")]
    assert [sorted({r["step"] for r in rows}) for rows in ranks] == [[1, 2, 3, 4]] * 2
    assert_trained_groups_differ(ranks[0], g=G, ties_marked=False)
    assert {r["step"] for r in ranks[0] if r["trained"]} == {1, 2, 3, 4} and not any(r["trained"] for r in ranks[1])
    rows = read_metrics(run)
    assert len(rows) == 4
    # Logged as the mean over ranks: a whole number only if both ranks did the same number of rounds.
    assert all(float(r["sampling_rounds"]).is_integer() for r in rows)
    assert any(float(r["sampling_rounds"]) > 1 for r in rows)
    for step, row in enumerate(
        rows, start=1
    ):  # rank 1, never full, sampled every round; rank 0 only while it was short
        counts = [sum(r["step"] == step for r in records) for records in ranks]
        assert counts[1] == float(row["sampling_rounds"]) * B * G and counts[0] <= counts[1], (step, counts)
    weights = [torch.load(run / f"trainable.rank{k}.pt") for k in (0, 1)]
    for name, end in weights[0]["end"].items():
        assert torch.equal(end, weights[1]["end"][name]), name
    assert any(not torch.equal(weights[0]["end"][n], s) for n, s in weights[0]["start"].items())


@pytest.mark.slow
def test_sigusr1_under_slurm_saves_hpc_checkpoint_and_requeues(tmp_path, kill_on_exit):
    # Lightning's SLURM handler needs only srun's variables and an `scontrol` on PATH: this one records its arguments.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/bin/sh\necho "$@" >>"$SCONTROL_LOG"\n')
    (bin_dir / "scontrol").chmod(0o755)
    scontrol_log = tmp_path / "scontrol.log"
    env = process_env(**SLURM_JOB, PATH=f"{bin_dir}:{os.environ['PATH']}", SCONTROL_LOG=str(scontrol_log))
    rollouts = tmp_path / "run" / "logs" / "version_0" / "rollouts.jsonl"
    proc = start_ttc(tmp_path, "--trainer.max_steps", "1000", env=env)
    kill_on_exit(proc)

    wait_for(proc, tmp_path, lambda: rollout_steps(rollouts) >= 1, "step 1")
    proc.send_signal(signal.SIGUSR1)
    # Lightning calls scontrol once the checkpoint is written; then training goes on until SLURM stops the job.
    wait_for(proc, tmp_path, scontrol_log.exists, "scontrol was called")
    assert scontrol_log.read_text() == f"requeue {JOB_ID}\n"
    hpc_step = torch.load(tmp_path / "run" / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"]
    assert hpc_step >= 1

    # A requeue ends the job with SIGTERM, which Lightning's SLURM handler lets the run survive until the step ends.
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, tmp_path)
    interrupted = tmp_path / "run" / "checkpoints" / "last-interrupted.ckpt"
    assert interrupted.is_file(), out[-3000:]
    assert torch.load(interrupted, weights_only=False)["global_step"] >= hpc_step


def test_fsdp1_is_refused_with_one_line_error(run_ttc, tmp_path, process_group_cleanup):
    strategy = f"{{class_path: {HERE}.CPUFSDPStrategy}}"
    code, _, err = run_ttc("fit", "--config", TINY, "--trainer.strategy", strategy, *FAST)
    assert code == 1
    assert "ttc: error: trainer.strategy: ttc does not run under CPUFSDPStrategy; to shard the model use FSDP2" in err
    assert "Traceback" not in err
    assert not list(tmp_path.rglob("rollouts*.jsonl"))  # refused before the first step


def test_sigterm_under_several_processes_is_recorded_without_a_collective(monkeypatch):
    """Lightning's handler broadcasts from inside the signal handler, which deadlocks a rank caught in another
    collective (FSDP2 gathers weights on every pass); ttc's only records the signal and passes it to the launched
    processes, and the training loop's broadcast at the next step's start stops every rank."""
    killed: list[int] = []
    launcher = SimpleNamespace(kill=killed.append)
    trainer = SimpleNamespace(
        world_size=2, strategy=SimpleNamespace(launcher=launcher, root_device=torch.device("cpu"))
    )
    trainer._signal_connector = _SignalConnector(trainer)
    other = mock.Mock()
    composed = _HandlersCompose([trainer._signal_connector._sigterm_notifier_fn, other])
    monkeypatch.setattr(signal, "getsignal", lambda signum: composed)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "broadcast", mock.Mock(side_effect=AssertionError("a collective")))
    sigterm_between_steps(trainer)
    composed(signal.SIGTERM, None)
    composed(signal.SIGTERM, None)
    assert trainer._signal_connector.received_sigterm
    assert killed == [signal.SIGTERM]  # passed on once
    assert other.call_count == 2  # the handlers beside Lightning's still run


def stub_trainer(world_size: int, saved: list) -> SimpleNamespace:
    state = SimpleNamespace(fn="fit")
    return SimpleNamespace(
        state=state, global_step=3, world_size=world_size, save_checkpoint=lambda path, **_: saved.append(path)
    )


def interrupted(tmp_path: Path, trainer: SimpleNamespace, exception: BaseException, started_at: int | None = 1) -> None:
    """`CheckpointOnInterrupt` for a run that started training at `started_at` (None: it never did)."""
    callback = CheckpointOnInterrupt(tmp_path)
    if started_at is not None:
        callback.on_train_start(SimpleNamespace(global_step=started_at), None)
    callback.on_exception(trainer, None, exception)


def test_interrupt_checkpoint_is_saved_on_sigterm_under_ddp(tmp_path):
    # Lightning raises SIGTERMException on every rank together (it broadcasts the signal), so all ranks reach
    # save_checkpoint's barrier.
    saved: list = []
    interrupted(tmp_path, stub_trainer(2, saved), SIGTERMException())
    assert saved == [tmp_path / "last-interrupted.ckpt"]


def test_interrupt_checkpoint_is_saved_on_any_error_in_one_process(tmp_path):
    saved: list = []
    interrupted(tmp_path, stub_trainer(1, saved), TTCError("reward function f raised"))
    assert saved == [tmp_path / "last-interrupted.ckpt"]


@pytest.mark.parametrize("started_at", [None, 3], ids=["failed-while-restoring", "no-step-since-the-start"])
def test_interrupt_checkpoint_is_not_saved_before_a_step_of_this_run(tmp_path, started_at):
    # Resumed at step 3 (or failing before training started): the checkpoint resumed from is as good, and a
    # half-restored state (an optimizer without its moments) must not become the newest checkpoint.
    saved: list = []
    interrupted(tmp_path, stub_trainer(1, saved), TTCError("restore failed"), started_at)
    assert saved == []


def test_interrupt_checkpoint_is_not_saved_when_one_rank_fails_under_ddp(tmp_path):
    saved: list = []
    interrupted(tmp_path, stub_trainer(2, saved), TTCError("reward function f raised"))
    assert saved == []
