"""Reward functions at work: `model.rewards` entries, values, parallel calls, time limits, skipped errors."""

import functools
import logging
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from fractions import Fraction

import numpy as np
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from ttc_lightning.errors import TTCError
from ttc_lightning.rewards import command_reward, label_reward, patch, scoring
from ttc_lightning.rewards.entries import Reward, RewardSpec, load_rewards
from ttc_lightning.rewards.scoring import RewardScorer, run_calls
from ttc_lightning.training.rollout import Rollout, rollout_metrics

COMMAND = "ttc_lightning.rewards.command_reward"


def length_reward(completions, **_):
    return [float(len(c)) for c in completions]


def none_for_empty(completions, **_):
    return [None if not c else 1.0 for c in completions]


def never_scores(completions, **_):
    return [None] * len(completions)


def scorer(*fns, **options) -> RewardScorer:
    return RewardScorer([Reward(fn.__name__, fn) for fn in fns], **options)


def test_scores_columns_and_none():
    # 2 prompts x G=2; the second function gives no score for empty completions (NaN in the matrix)
    scores, errors = scorer(length_reward, none_for_empty).score(["ab", "", "abc", "a"], {}, group_size=2)
    assert scores[:, 0].tolist() == [2.0, 0.0, 3.0, 1.0]
    assert scores[0, 1].item() == 1.0 and math.isnan(scores[1, 1].item())
    assert errors is None  # counted under reward_errors: skip only


def test_reward_that_raises_names_function_and_prompt():
    def picky(completions, id, **_):
        if "p1" in id:
            raise KeyError("boom")
        return [0.0] * len(completions)

    columns = {"id": ["p0", "p0", "p1", "p1"]}
    with pytest.raises(
        TTCError, match=r"reward function picky raised KeyError: 'boom' on prompt 1 of the batch \(id p1\)"
    ):
        scorer(picky).score(["a", "b", "c", "d"], columns, group_size=2)


class Exotic(BaseException):
    """A BaseException that is neither an Exception nor one of Python's own ways to stop."""


@pytest.mark.parametrize(
    ("raised", "said"),
    [
        (SystemExit(0), "called sys.exit(0)"),
        (SystemExit(3), "called sys.exit(3)"),
        (SystemExit(), "called sys.exit()"),
        (Exotic("odd"), "raised Exotic: odd"),
    ],
    ids=["exit-0", "exit-3", "exit", "base-exception"],
)
@pytest.mark.parametrize("workers", [1, 2], ids=["here", "threads"])
def test_a_reward_that_exits_is_a_reward_error(raised, said, workers):
    # sys.exit(0) deep in a reward must not end the run as if it had finished
    def leaving(completions, **_):
        raise raised

    with pytest.raises(TTCError, match=rf"^reward function leaving {re.escape(said)} on prompt 0 of the batch$"):
        scorer(leaving, workers=workers).score(["a", "b"], {}, group_size=2)
    scores, errors = scorer(leaving, workers=workers, errors="skip").score(["a", "b"], {}, group_size=2)
    assert errors.tolist() == [1.0] and scores.isnan().all()


def test_ctrl_c_in_a_reward_stops_the_run():
    def interrupted(completions, **_):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: Python's handler raises KeyboardInterrupt here
        time.sleep(5)
        return [1.0]

    with pytest.raises(KeyboardInterrupt):
        scorer(interrupted).score(["a"], {}, group_size=1)


def test_a_keyboard_interrupt_a_reward_raises_itself_is_its_error():
    # no SIGINT behind it: the function's own doing, named like any other exception, not taken for Ctrl-C
    def pretending(completions, **_):
        raise KeyboardInterrupt

    with pytest.raises(TTCError, match=r"^reward function pretending raised KeyboardInterrupt on prompt 0"):
        scorer(pretending).score(["a"], {}, group_size=1)


def test_reward_with_wrong_length_is_an_error():
    with pytest.raises(TTCError, match=r"short returned 1 values for 4 completions \(2 prompts x 2\)"):
        RewardScorer([Reward("short", lambda c, **_: [1.0])]).score(["a"] * 4, {}, group_size=2)


@pytest.mark.parametrize(
    "values",
    [
        [0.5, 2],  # a float and an int
        [np.float64(0.5), np.int64(2)],
        [np.array(0.5), np.array(2)],  # 0-d arrays
        [torch.tensor(0.5), torch.tensor(2)],  # 0-d tensors
        (Fraction(1, 2), 2),  # a tuple, and any real number
        np.array([0.5, 2.0]),
        torch.tensor([0.5, 2.0]),
        np.array([0.5, None], dtype=object),
    ],
    ids=["python", "numpy-scalars", "0d-arrays", "0d-tensors", "tuple", "array", "tensor", "object-array"],
)
def test_any_real_number_and_array_is_a_reward(values):
    scores, _ = RewardScorer([Reward("r", lambda c, **_: values)]).score(["a", "b"], {}, group_size=2)
    assert scores[0, 0].item() == 0.5
    assert scores[1, 0].item() == 2.0 or (values[1] is None and math.isnan(scores[1, 0].item()))


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([1.0, "x"], "returned 'x' for completion 1 of prompt 0 of the batch; expected a float or None"),
        ([1.0, float("nan")], "returned nan for completion 1 of prompt 0 of the batch; rewards must be finite"),
        ([float("inf"), 1.0], "returned inf for completion 0 of prompt 0"),
        ([1.0, np.float64("-inf")], "returned -inf for completion 1 of prompt 0"),
        ([1e39, 1.0], "returned 1e\\+39 .*within float32's range"),  # finite in Python, inf in float32
        ([True, 1.0], "returned True for completion 0 of prompt 0 of the batch; a bool is not taken as a reward"),
        ([1.0, np.bool_(False)], "returned False for completion 1 .* a bool is not taken"),
        (torch.tensor([True, False]), "returned True for completion 0 .* a bool is not taken"),
        (np.zeros((2, 1)), r"returned an array of shape \(2, 1\)"),
        ("ab", "returned str; it must return one float or None per completion"),
        (iter([1.0, 1.0]), "returned list_iterator"),
    ],
    ids=["str-value", "nan", "inf", "numpy-inf", "float32-overflow", "bool", "numpy-bool", "bool-tensor", "2d", "str",
         "iterator"],
)  # fmt: skip
def test_values_that_are_not_finite_real_numbers_are_refused(values, message):
    with pytest.raises(TTCError, match=f"reward function bad {message}"):
        RewardScorer([Reward("bad", lambda c, **_: values)]).score(["a", "b"], {}, group_size=2)


def test_reward_errors_metric_is_logged_only_when_errors_are_counted():
    rollout = Rollout(
        prompt_ids=torch.zeros(2, 1, dtype=torch.long),
        prompt_mask=torch.ones(2, 1),
        completion_ids=torch.ones(2, 1, dtype=torch.long),
        completion_mask=torch.ones(2, 1, dtype=torch.long),
        completions=["a", "b"],
        rewards=torch.tensor([[1.0, float("nan")], [3.0, float("nan")]]),
        reward=torch.tensor([1.0, 3.0]),
        advantages=torch.zeros(2),
    )
    assert not any(key.endswith("/errors") for key in rollout_metrics(rollout, 2, [1], ["a", "b"]))
    metrics = rollout_metrics(rollout, 2, [1], ["a", "b"], reward_errors=torch.tensor([0.0, 1.0]))
    assert (metrics["rewards/a/errors"].item(), metrics["rewards/b/errors"].item()) == (0.0, 1.0)


# ---------------------------------------------------------------- model.rewards entries


def test_entries_by_path_and_by_mapping():
    rewards = load_rewards(
        [
            "ttc_lightning.rewards.format_reward",
            {"function": COMMAND, "args": {"command": "true {file}", "timeout": 5}},
            RewardSpec(COMMAND, {"command": "false"}, name="fails"),
        ]
    )
    assert [r.name for r in rewards] == ["format_reward", "command_reward", "fails"]  # a partial's: its function's
    bound = rewards[1].fn
    assert isinstance(bound, functools.partial) and bound.func is command_reward
    assert bound.keywords == {"command": "true {file}", "timeout": 5}
    assert rewards[2].fn.keywords == {"command": "false"}


def test_a_bound_command_reward_runs_with_its_options():
    [reward] = load_rewards([{"function": COMMAND, "args": {"command": "false", "exit_rewards": {1: 0.5}}}])
    edit = "<<<<<<< SEARCH\n  return x;\n=======\n  return x & 1;\n>>>>>>> REPLACE"
    completion = f"<think>\nmask\n</think>\n<answer>\n{edit}\n</answer>"
    vulnerable = "int f(int x)\n{\n  return x;\n}"
    assert reward.fn([completion, "no answer"], vulnerable_func=[vulnerable] * 2) == [0.5, -1.0]  # `false` exits 1


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"function": COMMAND, "arguments": {}}, r"model.rewards\[0\]: unknown key 'arguments'; an entry is an import"),
        ({"args": {"command": "true"}}, r"model.rewards\[0\]: no `function`"),
        ({"function": COMMAND, "args": {"comand": "true"}},
         r"model.rewards\[0\].args: .*command_reward has no parameter 'comand' \(it names: command, vulnerable_func"),
        ({"function": COMMAND, "args": {"completions": []}}, "has no parameter 'completions'"),
        ({"function": COMMAND, "args": ["command"]}, r"model.rewards\[0\].args: expected a mapping"),
        ({"function": "ttc_lightning.rewards.nope"}, r"model.rewards\[0\].function: cannot import"),
        ({"function": "nope"}, r"model.rewards\[0\].function: 'nope' is not an import path"),
        ({"function": COMMAND, "name": ""}, r"model.rewards\[0\].name: expected a non-empty name"),
        (3, r"model.rewards\[0\]: got int 3; an entry is an import path"),
    ],
)  # fmt: skip
def test_bad_entries_name_the_entry(entry, message):
    with pytest.raises(TTCError, match=message):
        load_rewards([entry])


def test_two_entries_logged_under_one_name_are_refused():
    with pytest.raises(
        TTCError, match=r"model.rewards\[0\] and model.rewards\[1\] are both logged as 'command_reward'"
    ):
        load_rewards([{"function": COMMAND, "args": {"command": "true"}}, {"function": COMMAND}])


def test_a_column_must_not_replace_a_bound_argument():
    [reward] = load_rewards([{"function": "ttc_lightning.rewards.label_reward", "args": {"label": ["benign"]}}])
    assert reward.fn.func is label_reward
    with pytest.raises(TTCError, match="the batch has a column 'label', which would replace the argument"):
        RewardScorer([reward]).score(["a"], {"label": ["vulnerable"]}, group_size=1)


# ---------------------------------------------------------------- parallel calls, time limits, skipped errors


def test_reward_workers_run_functions_at_the_same_time():
    # Each function waits at a barrier for the other: they return only if both run at once.
    barrier = [threading.Barrier(2, timeout=5)]

    def meet(completions, **_):
        barrier[0].wait()
        return [1.0] * len(completions)

    two = [Reward("first", meet), Reward("second", meet)]
    scores, _ = RewardScorer(two, workers=2).score(["a", "b"], {}, group_size=2)
    assert scores.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    barrier[0] = threading.Barrier(2, timeout=0.3)
    with pytest.raises(TTCError, match="reward function first raised BrokenBarrierError"):
        RewardScorer(two, workers=1, timeout=30).score(["a", "b"], {}, group_size=2)  # one at a time: nobody comes


def test_run_calls_keeps_the_order_and_leaves_a_late_call_behind():
    release = threading.Event()

    def late():
        release.wait(10)
        return "late"

    started = time.monotonic()
    futures = run_calls([lambda: 1, late, lambda: 3], workers=2, timeout=0.2)
    assert time.monotonic() - started < 2  # the late call did not hold the others
    assert futures[0].result() == 1 and futures[1] is None and futures[2].result() == 3
    release.set()


def test_a_call_past_the_timeout_stops_training_or_is_skipped(caplog):
    release = threading.Event()

    def stuck(completions, **_):
        release.wait(10)
        return [5.0] * len(completions)

    columns = {"id": ["a", "a", "b", "b"]}
    started = time.monotonic()
    with pytest.raises(TTCError, match=r"stuck did not return within model.reward_timeout=0.2 s on the batch's 4 "
                                       r"completions \(prompt ids a, b\); raise the limit"):  # fmt: skip
        scorer(stuck, length_reward, timeout=0.2).score(["a", "bb", "c", "d"], columns, group_size=2)
    assert time.monotonic() - started < 2

    skipping = scorer(stuck, length_reward, timeout=0.2, errors="skip")
    scores, errors = skipping.score(["a", "bb", "c", "d"], columns, group_size=2)
    assert torch.isnan(scores[:, 0]).all() and scores[:, 1].tolist() == [1.0, 2.0, 1.0, 1.0]
    assert errors.tolist() == [1.0, 0.0]
    assert "stuck did not return within" in caplog.text and "its 4 completions go unscored" in caplog.text
    release.set()  # the late calls return [5.0, ...] now: nobody reads it
    time.sleep(0.05)
    scores, errors = skipping.score(["a", "b"], {}, group_size=2)
    assert scores[:, 0].tolist() == [5.0, 5.0] and errors.tolist() == [0.0, 0.0]


def test_skipped_errors_leave_no_score_and_are_counted(caplog):
    def broken(completions, **_):
        raise ZeroDivisionError("division by zero")

    scores, errors = scorer(broken, length_reward, errors="skip").score(["a", "bb"], {}, group_size=2)
    assert torch.isnan(scores[:, 0]).all() and scores[:, 1].tolist() == [1.0, 2.0]
    assert errors.tolist() == [1.0, 0.0]
    assert "reward function broken raised ZeroDivisionError: division by zero" in caplog.text


def test_a_configuration_mistake_stops_training_even_when_errors_are_skipped():
    def misconfigured(completions, **_):
        raise TTCError("command_reward: cannot run command 'nope'")

    with pytest.raises(TTCError, match="cannot run command 'nope'"):
        scorer(misconfigured, errors="skip").score(["a"], {}, group_size=1)


def test_a_function_that_never_scores_warns_once_and_an_empty_batch_every_time(caplog):
    caplog.set_level(logging.WARNING, logger="ttc")
    scoring = scorer(never_scores, length_reward)
    scoring.score(["a", "b"], {}, group_size=2)
    scoring.score(["c", "d"], {}, group_size=2)
    assert caplog.text.count("reward function never_scores gave no score (None) to any of a batch's 2") == 1
    assert "no reward function scored" not in caplog.text
    alone = scorer(never_scores)
    alone.score(["a", "b"], {}, group_size=2)
    alone.score(["c", "d"], {}, group_size=2)
    assert caplog.text.count("no reward function scored any of this batch's 2 completions") == 2


EXIT_WITH_A_STUCK_REWARD = """
import threading
from ttc_lightning.rewards.entries import Reward
from ttc_lightning.rewards.scoring import RewardScorer

def stuck(completions, **_):
    threading.Event().wait()  # forever
    return [0.0] * len(completions)

scores, errors = RewardScorer([Reward("stuck", stuck)], timeout=0.1, errors="skip").score(["a"], {}, 1)
print(errors.tolist())
"""


def test_a_stuck_reward_does_not_keep_the_program_from_exiting():
    done = subprocess.run([sys.executable, "-c", EXIT_WITH_A_STUCK_REWARD], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[1.0]"


def test_each_thread_parses_with_its_own_parser():
    # A tree-sitter parser must not be used by two threads at once; reward functions may run in parallel threads.
    here = patch._parser("c")
    assert patch._parser("c") is here and patch._parser("cpp") is not here
    elsewhere = []
    thread = threading.Thread(target=lambda: elsewhere.append(patch._parser("c")))
    thread.start()
    thread.join()
    assert elsewhere[0] is not here


def test_scores_stay_float32_under_a_bfloat16_default_dtype():
    # `--trainer.precision bf16-true` makes bfloat16 the default dtype inside a step: a score of 1,001 characters
    # would become 1,000 and a similarity of 0.1234 would become 0.1235 (8 bits of mantissa).
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        scores, _ = scorer(length_reward).score(["x" * 1001, "y"], {}, group_size=2)
        skipped = scorer(length_reward, errors="skip").score(["x" * 1001, "y"], {}, group_size=2)[1]
    finally:
        torch.set_default_dtype(default)
    assert scores.dtype == torch.float32 and scores[0, 0].item() == 1001.0
    assert skipped.dtype == torch.float32


# ---------------------------------------------------------------- each call's own arguments


def test_a_reward_that_mutates_its_arguments_changes_nothing_for_the_next():
    # The first function appends to, sorts and clears what it is given; the second reads the `id` of every completion.
    def mutating(completions, id, **columns):
        completions.append("extra")
        completions.sort(reverse=True)
        id.clear()
        for values in columns.values():
            values.reverse()
        return [0.0] * 4

    seen = {}

    def reader(completions, id, tag, **_):
        seen.update(completions=list(completions), id=list(id), tag=list(tag))
        return [float(int(i[1:])) for i in id]  # an IndexError, or a wrong count, if the list was cleared

    completions = ["a", "b", "c", "d"]
    columns = {"id": ["p0", "p0", "p1", "p1"], "tag": [1, 2, 3, 4]}
    for workers, timeout in [(1, None), (2, 30.0)]:  # in the calling thread, and in worker threads
        seen.clear()
        scores, _ = scorer(mutating, reader, workers=workers, timeout=timeout).score(completions, columns, 2)
        assert seen == {"completions": ["a", "b", "c", "d"], "id": ["p0", "p0", "p1", "p1"], "tag": [1, 2, 3, 4]}
        assert scores[:, 1].tolist() == [0.0, 0.0, 1.0, 1.0]
    # what the step records (rollouts.jsonl) and names in errors
    assert completions == ["a", "b", "c", "d"] and columns == {"id": ["p0", "p0", "p1", "p1"], "tag": [1, 2, 3, 4]}


def test_a_reward_that_clears_a_column_does_not_change_whom_the_next_reward_error_names():
    def clearing(completions, id, **_):
        id.clear()
        return [0.0] * len(completions)

    def picky(completions, id, **_):
        if "p1" in id:
            raise KeyError("boom")
        return [0.0] * len(completions)

    columns = {"id": ["p0", "p0", "p1", "p1"]}
    with pytest.raises(TTCError, match=r"picky raised KeyError: 'boom' on prompt 1 of the batch \(id p1\)"):
        scorer(clearing, picky).score(["a", "b", "c", "d"], columns, group_size=2)


# ---------------------------------------------------------------- naming the prompt a raising call failed on


def test_a_reward_that_raises_and_then_hangs_is_held_to_the_timeout():
    # It raises on the batch, then hangs when called again on one prompt's completions: the search for the failing
    # prompt gets one more reward_timeout in all, then the error names the batch's prompts.
    release = threading.Event()
    calls = []

    def flaky(completions, **_):
        calls.append(len(completions))
        if len(calls) == 1:
            raise ConnectionError("service unavailable")
        release.wait(10)
        return [0.0] * len(completions)

    columns = {"id": ["a", "a", "b", "b", "c", "c"]}
    started = time.monotonic()
    try:
        with pytest.raises(TTCError) as error:
            scorer(flaky, timeout=0.3).score(["x"] * 6, columns, group_size=2)
    finally:
        release.set()
    assert time.monotonic() - started < 2
    assert str(error.value) == (
        "reward function flaky raised ConnectionError: service unavailable on the batch's 6 completions "
        "(prompt ids a, b, c)"
    )
    assert calls == [6, 2]  # the whole batch, then the first prompt's group, given up at the deadline


def test_the_search_for_the_failing_prompt_stops_at_the_first_that_fails():
    calls = []

    def picky(completions, id, **_):
        calls.append(list(id))
        if "p1" in id:
            raise KeyError("boom")
        return [0.0] * len(completions)

    columns = {"id": ["p0", "p0", "p1", "p1", "p2", "p2"]}
    for options in [{}, {"timeout": 30.0}, {"workers": 2}]:
        calls.clear()
        with pytest.raises(TTCError, match=r"picky raised KeyError: 'boom' on prompt 1 of the batch \(id p1\)$"):
            scorer(picky, **options).score(["a"] * 6, columns, group_size=2)
        assert calls == [columns["id"], ["p0", "p0"], ["p1", "p1"]]  # p2 is not called again


def test_a_reward_that_raises_on_one_prompt_is_not_called_again():
    calls = []

    def broken(completions, **_):
        calls.append(1)
        raise ValueError("bad")

    with pytest.raises(TTCError, match=r"broken raised ValueError: bad on prompt 0 of the batch \(id q\)$"):
        scorer(broken).score(["a", "b"], {"id": ["q", "q"]}, group_size=2)
    assert calls == [1]


def test_a_reward_that_raises_only_on_the_whole_batch_names_the_batch():
    def batch_only(completions, **_):
        if len(completions) > 2:
            raise MemoryError("too many")
        return [0.0] * len(completions)

    with pytest.raises(TTCError, match=r"batch_only raised MemoryError: too many on the batch's 4 completions "
                                       r"\(prompt ids a, b\)$"):  # fmt: skip
        scorer(batch_only).score(["x"] * 4, {"id": ["a", "a", "b", "b"]}, group_size=2)


# ---------------------------------------------------------------- SIGTERM while rewards run


@pytest.fixture
def flagging_sigterm():
    """A SIGTERM handler that notes the signal and returns, as Lightning's does during a run; restored afterwards."""
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    yield received
    signal.signal(signal.SIGTERM, previous)


def sigterm_in(seconds: float) -> threading.Timer:
    timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    return timer


@pytest.mark.parametrize(("workers", "timeout"), [(2, None), (1, 60.0), (1, None)], ids=["workers", "timeout", "here"])
def test_sigterm_stops_the_wait_for_a_running_reward(flagging_sigterm, workers, timeout):
    # (1, None) runs the call in this thread: the exception comes from the handler, inside the call.
    release = threading.Event()
    handler = signal.getsignal(signal.SIGTERM)
    started = time.monotonic()
    timer = sigterm_in(0.3)
    try:
        with pytest.raises(SIGTERMException):
            run_calls([lambda: 1, lambda: release.wait(10)], workers=workers, timeout=timeout)
    finally:
        timer.cancel()
        release.set()
    assert time.monotonic() - started < 2
    assert flagging_sigterm == [signal.SIGTERM]  # the handler in place ran, and is in place again
    assert signal.getsignal(signal.SIGTERM) is handler


def test_sigterm_stops_scoring_even_when_the_reward_catches_the_exception(flagging_sigterm):
    def stubborn(completions, **_):
        try:
            time.sleep(10)
        except BaseException:
            pass
        return [0.0] * len(completions)

    timer = sigterm_in(0.3)
    started = time.monotonic()
    try:
        with pytest.raises(SIGTERMException):
            scorer(stubborn).score(["a"], {}, group_size=1)
    finally:
        timer.cancel()
    assert time.monotonic() - started < 2


def test_sigterm_leaves_the_ranks_of_a_distributed_run_to_stop_together(flagging_sigterm, monkeypatch):
    # One rank leaving in the middle of a step would leave the others waiting in a collective: under DDP the wait
    # goes on, and Lightning stops every rank at the start of the next step.
    monkeypatch.setattr(scoring, "_one_of_several_ranks", lambda: True)
    release = threading.Event()
    timer = sigterm_in(0.2)
    threading.Timer(0.6, release.set).start()
    try:
        [future] = run_calls([lambda: release.wait(10)], workers=2, timeout=None)
    finally:
        timer.cancel()
        release.set()
    assert future.result() is True and flagging_sigterm == [signal.SIGTERM]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def broken(:\n", "cannot import 'ttc_broken_reward.broken': {file}:1: invalid syntax"),
        (
            "import os\nraise RuntimeError('no GPU here')\n",
            "importing 'ttc_broken_reward' raised RuntimeError: no GPU here at {file}:2",
        ),
        ("import sys\nsys.exit()\n", "importing 'ttc_broken_reward' called sys.exit() at {file}:2"),
        ("import sys\nsys.exit(5)\n", "importing 'ttc_broken_reward' called sys.exit(5) at {file}:2"),
    ],
    ids=["syntax-error", "error-at-import", "exit-at-import", "exit-5-at-import"],
)
def test_a_reward_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch, source, message):
    real_exit = sys.exit

    def wrapped_exit(code=None):  # as wandb wraps sys.exit once it has started: the line still names the module
        real_exit(code)

    monkeypatch.setattr(sys, "exit", wrapped_exit)
    module = tmp_path / "ttc_broken_reward.py"
    module.write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TTCError) as e:
        load_rewards(["ttc_broken_reward.broken"])
    assert str(e.value) == "model.rewards[0]: " + message.format(file=module)


def test_a_reward_cannot_switch_off_the_runs_signal_handlers():
    # a reward (or a library under it) that ignores SIGTERM and SIGINT: the run's handlers are back after the call
    def ignoring(completions, **_):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return [1.0]

    def stop(signum, frame):
        raise AssertionError("not called")

    before = signal.signal(signal.SIGTERM, stop), signal.getsignal(signal.SIGINT)
    try:
        scorer(ignoring).score(["a"], {}, group_size=1)
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == (stop, before[1])
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGINT, before[1])
