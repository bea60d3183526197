"""Dynamic sampling's rounds with a fake sampler: when they stop, what they keep, and how DDP ranks agree."""

import contextlib
import dataclasses
import logging
import re
import threading
from collections.abc import Callable, Iterator

import pytest
import torch

from ttc_lightning.training.dynamic import DynamicSample, nothing_left_to_learn, sample_until_informative
from ttc_lightning.training.rollout import Rollout, Round

G = 2


@contextlib.contextmanager
def ttc_warning(caplog: pytest.LogCaptureFixture, pattern: str = "") -> Iterator[None]:
    """The block logs a warning on ttc's logger (outside the `ttc` command it reaches pytest's `caplog`) whose message
    matches the regular expression `pattern`."""
    with caplog.at_level(logging.WARNING, logger="ttc"):
        start = len(caplog.records)
        yield
    messages = [r.getMessage() for r in caplog.records[start:] if r.name == "ttc" and r.levelno >= logging.WARNING]
    assert any(re.search(pattern, m) for m in messages), messages


def sample(batch: dict[str, list]) -> Round:
    """G completions per prompt; a prompt named "t..." gets rewards [1, 1] (a tie), any other [1, 0]."""
    n = len(batch["prompt"]) * G
    reward = torch.tensor([r for p in batch["prompt"] for r in ((1.0, 1.0) if p.startswith("t") else (1.0, 0.0))])
    ones = torch.ones(n, 1, dtype=torch.long)
    texts = [f"{p}/{i}" for p in batch["prompt"] for i in range(G)]
    rollout = Rollout(ones, ones, ones, ones, texts, reward.unsqueeze(1), reward, torch.zeros(n))
    return Round(dict(batch), rollout, task=reward)


class Stream:
    """The training stream: its batches in order; records what was drawn and what was sampled."""

    def __init__(self, *batches: list[str]) -> None:
        self.batches: Iterator[list[str]] = iter(batches)
        self.drawn: list[list[str]] = []
        self.sampled: list[list[str]] = []

    def draw(self) -> dict[str, list] | None:
        batch = next(self.batches, None)
        if batch is not None:
            self.drawn.append(batch)
        return None if batch is None else {"prompt": batch}

    def sample(self, batch: dict[str, list]) -> Round:
        self.sampled.append(batch["prompt"])
        return sample(batch)


def run(
    first: list[str], stream: Stream, target: int = 2, max_rounds: int = 4, total: Callable | None = None
) -> DynamicSample:
    return sample_until_informative(
        sample({"prompt": first}),
        target=target,
        group_size=G,
        max_rounds=max_rounds,
        draw=stream.draw,
        sample=stream.sample,
        sum_over_ranks=total or (lambda t: t),
        pad_id=0,
    )


def prompts_of(result: DynamicSample) -> list[str]:
    return [result.sampled.batch["prompt"][i] for i in result.kept.tolist()]


def test_rounds_stop_once_there_are_enough_informative_groups():
    # First batch: one tie, one informative (1 of 2). The second round brings a second informative group: stop,
    # and the third batch is never drawn.
    stream = Stream(["t2", "i2"], ["i3", "i4"])
    result = run(["t1", "i1"], stream)
    assert stream.drawn == [["t2", "i2"]]
    assert result.rounds == 2 and prompts_of(result) == ["i1", "i2"]
    assert result.sampled.batch["prompt"] == ["t1", "i1", "t2", "i2"]  # the ties too: their metrics are logged
    assert result.training_groups() == (result.kept, 1.0)
    assert result.metrics() == {"sampling_rounds": 2.0, "groups_kept": 2.0}


def test_a_batch_with_enough_informative_groups_draws_nothing_more():
    stream = Stream(["i9", "i9"])
    result = run(["i1", "i2"], stream)
    assert stream.drawn == [] and result.rounds == 1 and prompts_of(result) == ["i1", "i2"]


def test_the_first_target_groups_in_stream_order_are_kept_and_the_rest_dropped():
    stream = Stream(["i2", "i3"])
    result = run(["i1", "t1"], stream)
    assert prompts_of(result) == ["i1", "i2"]  # i3 was informative too, but the step has its 2 groups


def test_max_rounds_reached_trains_on_what_there_is(caplog):
    # 3 rounds of ties except one group: the step trains on that one group.
    stream = Stream(["t2", "t3"], ["t4", "i4"], ["i5", "i6"])
    with ttc_warning(caplog, "fewer than data.batch_size groups"):
        result = run(["t0", "t1"], stream, max_rounds=3)
    assert stream.drawn == [["t2", "t3"], ["t4", "i4"]]  # max_rounds counts the first batch
    assert result.rounds == 3 and prompts_of(result) == ["i4"]
    assert result.training_groups() == (result.kept, 1.0)


def test_no_informative_group_anywhere_means_no_optimizer_step(caplog):
    stream = Stream(["t2", "t3"])
    with ttc_warning(caplog, "no optimizer step"):
        result = run(["t0", "t1"], stream, max_rounds=2)
    assert result.kept.tolist() == [] and result.kept_everywhere == 0
    assert result.training_groups() is None
    assert result.metrics() == {"sampling_rounds": 2.0, "groups_kept": 0.0}


def test_the_end_of_the_epoch_ends_the_rounds(caplog):
    stream = Stream(["t2", "i2"])  # one batch left in the epoch, and still short of 2 after it
    with ttc_warning(caplog, "fewer than data.batch_size groups"):
        result = run(["t0", "t1"], stream)
    assert result.rounds == 2 and prompts_of(result) == ["i2"]


def test_max_rounds_one_only_filters_the_batch(caplog):
    with ttc_warning(caplog):
        result = run(["t0", "i0"], Stream(["i1", "i2"]), max_rounds=1)
    assert result.rounds == 1 and prompts_of(result) == ["i0"]


def test_ties_are_judged_on_the_task_reward_before_the_overlong_penalty(caplog):
    # t0's completions tie on the task (1, 1) but not after the length penalty (1 - 0.5, 1): DAPO drops the group.
    first = sample({"prompt": ["t0", "i0"]})
    shaped = first.rollout.reward - torch.tensor([0.5, 0.0, 0.0, 0.0])
    first = Round(first.batch, dataclasses.replace(first.rollout, reward=shaped), task=first.rollout.reward)
    with ttc_warning(caplog):
        result = sample_until_informative(
            first,
            target=2,
            group_size=G,
            max_rounds=1,
            draw=Stream().draw,
            sample=sample,
            sum_over_ranks=lambda t: t,
            pad_id=0,
        )
    assert prompts_of(result) == ["i0"]
    assert result.sampled.rollout.reward.tolist() == shaped.tolist()  # the shaped reward is what is trained on


def test_a_rank_that_kept_nothing_joins_the_step_with_weight_zero(caplog):
    # On its own this rank has only ties, but the sum says another rank kept 3 groups.
    with ttc_warning(caplog, "fewer than data.batch_size groups"):
        result = run(["t0", "t1"], Stream(), max_rounds=1, total=lambda t: t + 3)
    groups, weight = result.training_groups()
    assert groups.tolist() == [0] and weight == 0.0


class FakeAllReduce:
    """Sums a tensor over `ranks` threads; a rank that waits for the others in vain fails instead of hanging."""

    def __init__(self, ranks: int) -> None:
        self.barrier = threading.Barrier(ranks, timeout=10)
        self.slots: dict[int, torch.Tensor] = {}
        self.calls = [0] * ranks

    def for_rank(self, rank: int) -> Callable[[torch.Tensor], torch.Tensor]:
        def total(values: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = values.clone()
            self.barrier.wait()
            summed = sum(self.slots.values())
            self.barrier.wait()  # everyone has read the slots before the next sum writes them
            return summed

        return total


def run_ranks(firsts: list[list[str]], streams: list[Stream], **kwargs) -> tuple[list[DynamicSample], FakeAllReduce]:
    reduce = FakeAllReduce(len(firsts))
    results: list = [None] * len(firsts)
    errors: list[BaseException] = []

    def rank(k: int) -> None:
        try:
            results[k] = run(firsts[k], streams[k], total=reduce.for_rank(k), **kwargs)
        except BaseException as e:
            errors.append(e)
            reduce.barrier.abort()

    threads = [threading.Thread(target=rank, args=(k,)) for k in range(len(firsts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, errors
    return results, reduce


def test_ddp_ranks_do_the_same_rounds_and_a_full_rank_draws_without_sampling():
    # Rank 0 is short for two rounds; rank 1 has its 2 groups from the start. Both do 3 rounds and the same number
    # of sums; rank 1 draws a batch in each round (its share of the epoch stays as long as rank 0's) but samples
    # none of them, since none of their groups could be kept.
    streams = [Stream(["t2", "t3"], ["i4", "t4"], ["x", "x"]), Stream(["j2", "j3"], ["j4", "j5"], ["y", "y"])]
    results, reduce = run_ranks([["t0", "i0"], ["j0", "j1"]], streams)
    assert [r.rounds for r in results] == [3, 3]
    assert reduce.calls[0] == reduce.calls[1] == 4  # 3 round decisions (the last says stop) + the kept count
    assert [len(s.drawn) for s in streams] == [2, 2]
    assert streams[0].sampled == [["t2", "t3"], ["i4", "t4"]] and streams[1].sampled == []
    assert prompts_of(results[0]) == ["i0", "i4"] and prompts_of(results[1]) == ["j0", "j1"]
    assert [r.kept_everywhere for r in results] == [4, 4]


def test_ddp_ranks_stop_together_when_one_runs_out_of_prompts(caplog):
    # Rank 1's epoch ends first: both leave after the round in which it found no batch, and neither waits alone.
    streams = [Stream(["t2", "t3"], ["t4", "t5"], ["i6", "i7"]), Stream()]
    with ttc_warning(caplog):
        results, reduce = run_ranks([["t0", "t1"], ["t8", "t9"]], streams)
    assert reduce.calls[0] == reduce.calls[1] == 3
    assert [len(s.drawn) for s in streams] == [1, 0]
    assert [r.training_groups() for r in results] == [None, None]  # no rank has a group that differs: no step


def test_ddp_rank_with_only_ties_trains_with_weight_zero_while_the_other_trains(caplog):
    streams = [Stream(["t2", "t3"]), Stream(["j2", "j3"])]
    with ttc_warning(caplog):
        results, _ = run_ranks([["t0", "t1"], ["j0", "t9"]], streams, max_rounds=2)
    assert results[0].training_groups()[1] == 0.0 and results[1].training_groups()[1] == 1.0
    assert prompts_of(results[1]) == ["j0", "j2"]


def test_a_run_stops_when_an_epoch_of_batches_had_nothing_to_learn(caplog):
    assert not nothing_left_to_learn(7, epoch_batches=8)
    with ttc_warning(caplog, r"no prompt in the last 8 batches \(an epoch's worth\)"):
        assert nothing_left_to_learn(8, epoch_batches=8)
