import pytest
import torch

from ttc_lightning.data.common import collate_rows
from ttc_lightning.data.loader import ResumableLoader

ROWS = [{"prompt": f"p{i}"} for i in range(8)]  # 8 rows, batches of 2: 4 batches an epoch


def loader(trained: list[int], num_workers: int = 0) -> ResumableLoader:
    """`trained[0]` plays the trainer's count of batches trained on in the current epoch."""
    generator = torch.Generator().manual_seed(0)
    return ResumableLoader(
        ROWS,
        batch_size=2,
        shuffle=True,
        generator=generator,
        collate_fn=collate_rows,
        num_workers=num_workers,
        trained=lambda: trained[0],
    )


def epochs(dl: ResumableLoader, n: int) -> list[list[list[str]]]:
    return [[batch["prompt"] for batch in dl] for _ in range(n)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_restored_loader_finishes_the_epoch_then_shuffles_as_before(num_workers):
    expected = epochs(loader([0]), 3)
    assert expected[0] != expected[1]  # each epoch has its own order

    # Stop after 1 batch of epoch 1 (Lightning has fetched one more by then).
    trained = [0]
    first = loader(trained, num_workers)
    epochs(first, 1)
    iterator = iter(first)
    next(iterator), next(iterator)
    trained[0] = 1
    state = first.state_dict()
    assert state["batches"] == 1

    second = loader([0], num_workers)
    second.load_state_dict(state)
    rest, *after = epochs(second, 2)
    assert rest == expected[1][1:]  # the 3 batches epoch 1 had left, in its order
    assert after == [expected[2]]


def test_state_at_the_end_of_an_epoch_starts_the_next_one():
    expected = epochs(loader([0]), 2)
    trained = [0]
    first = loader(trained)
    epochs(first, 1)
    trained[0] = 4  # the epoch's last batch was trained on: a checkpoint from on_train_batch_end
    state = first.state_dict()
    assert state["batches"] == 0
    second = loader([0])
    second.load_state_dict(state)
    assert epochs(second, 1) == [expected[1]]


def test_ddp_sampler_stays_on_the_data_epoch_when_lightning_counts_ahead():
    from torch.utils.data import DistributedSampler

    def ddp_loader(trained: list[int]) -> ResumableLoader:
        sampler = DistributedSampler(ROWS, num_replicas=2, rank=0, shuffle=True, seed=0)  # 4 rows, 2 batches
        return ResumableLoader(ROWS, batch_size=2, sampler=sampler, collate_fn=collate_rows, trained=lambda: trained[0])

    def lightning_epoch(dl: ResumableLoader, epoch: int) -> list[list[str]]:
        dl.sampler.set_epoch(epoch)  # what Lightning does before every pass
        return [batch["prompt"] for batch in dl]

    whole = ddp_loader([0])
    expected = [lightning_epoch(whole, e) for e in range(3)]
    assert expected[0] != expected[1] != expected[2]

    trained = [0]
    first = ddp_loader(trained)
    lightning_epoch(first, 0)
    first.sampler.set_epoch(1)
    iterator = iter(first)
    next(iterator)
    trained[0] = 1  # stopped by max_steps after 1 of epoch 1's 2 batches: Lightning counts epoch 1 as done
    state = first.state_dict()
    assert (state["epoch"], state["batches"]) == (1, 1)

    second = ddp_loader([0])
    second.load_state_dict(state)
    assert lightning_epoch(second, 2) == expected[1][1:]  # the rest of epoch 1, though Lightning says 2
    assert lightning_epoch(second, 3) == expected[2]  # and then epoch 2, in its own order


ROWS16 = [{"prompt": f"q{i}"} for i in range(16)]  # batches of 2: 8 batches an epoch


def loader16(trained: list[int], num_workers: int = 0, batch_size: int = 2) -> ResumableLoader:
    generator = torch.Generator().manual_seed(0)
    return ResumableLoader(
        ROWS16,
        batch_size=batch_size,
        shuffle=True,
        generator=generator,
        collate_fn=collate_rows,
        num_workers=num_workers,
        trained=lambda: trained[0],
    )


def fresh(num_workers: int = 0) -> tuple[ResumableLoader, list[int]]:
    trained = [0]
    return loader16(trained, num_workers), trained


def fit(dl: ResumableLoader, trained: list[int], draws: list[int], crash: bool = False) -> tuple[list, dict]:
    """Steps as Lightning runs them: it fetches one batch ahead of the one it trains on and counts the batches
    trained on in the epoch; step k trains on its batch and draws `draws[k]` more (dynamic sampling). Returns each
    step's prompts (its batch, then its draws) and the loader's state after the last step, which with `crash`
    raised before it finished."""
    steps = []
    epoch = iter(dl)
    ahead = next(epoch, None)
    for k, n in enumerate(draws):
        if ahead is None:  # the epoch is over: Lightning starts the next one
            trained[0], epoch = 0, iter(dl)
            ahead = next(epoch, None)
        batch, ahead = ahead, next(epoch, None)
        drawn = [dl.draw() for _ in range(n)]
        steps.append(batch["prompt"] + [p for d in drawn if d is not None for p in d["prompt"]])
        if not (crash and k == len(draws) - 1):
            trained[0] += 1
    return steps, dl.state_dict()


def resumed(state: dict, draws: list[int], num_workers: int = 0, batch_size: int = 2) -> list:
    trained = [state["batches"]]  # Lightning restores its count of the epoch's trained batches
    dl = loader16(trained, num_workers, batch_size)
    dl.load_state_dict(state)
    return fit(dl, trained, draws)[0]


DRAWS = [2, 0, 1, 1, 0, 3, 0, 0, 1, 0]  # epoch 0 is steps 0-4: batches 0-7, 3 of them drawn by the module


@pytest.mark.parametrize("num_workers", [0, 2])
def test_draws_come_from_the_epoch_after_the_batch_fetched_ahead_and_resume_exactly(num_workers):
    whole = fit(*fresh(num_workers), DRAWS)[0]
    epoch0 = [p for step in whole[:5] for p in step]
    assert sorted(epoch0) == sorted(r["prompt"] for r in ROWS16)  # each prompt once, drawn or handed to Lightning
    # Step 0 trains on batch 0 and draws batches 2 and 3: batch 1 was already fetched for step 1.
    order = [batch["prompt"] for batch in loader16([0])]
    assert whole[0] == order[0] + order[2] + order[3] and whole[1] == order[1]
    assert whole[5][:2] != order[0]  # epoch 1 has an order of its own

    for stop in (3, 5, 7):  # mid-epoch 0, at its end, mid-epoch 1
        _, state = fit(*fresh(num_workers), DRAWS[:stop])
        assert resumed(state, DRAWS[stop:], num_workers) == whole[stop:], stop


def test_state_when_draws_used_up_the_epoch_starts_the_next_one():
    _, state = fit(*fresh(), DRAWS[:5])
    assert state["batches"] == 0 and state["rows"] == 0 and state["held"] == []


def test_a_step_that_failed_draws_its_prompts_again_after_a_restore():
    whole = fit(*fresh(), DRAWS)[0]
    _, state = fit(*fresh(), DRAWS[:4], crash=True)  # step 3 drew a batch, then raised
    assert state["batches"] == 3 and len(state["held"]) == 4  # its own batch and the one fetched ahead, 2 rows each
    assert resumed(state, DRAWS[3:]) == whole[3:]


def test_state_of_a_checkpoint_without_draws_still_restores():
    expected = epochs(loader([0]), 1)[0]
    state = {"generator": torch.Generator().manual_seed(0).get_state(), "batches": 1, "epoch": None}
    second = loader([1])
    second.load_state_dict(state)
    assert epochs(second, 1) == [expected[1:]]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("batch_size", [1, 3, 4, 5])
@pytest.mark.parametrize(("draws", "crash"), [([0, 0, 0], False), ([0, 2, 0, 1], False), ([1, 0, 1], True)])
def test_a_resume_with_another_batch_size_goes_on_after_the_prompts_trained(num_workers, batch_size, draws, crash):
    # The position is kept in rows: the resumed run trains each prompt of the epoch it has not trained yet, once, in
    # the epoch's order (so the batch fetched ahead first), whatever its batch size.
    order, next_epoch = ([p for batch in epoch for p in batch] for epoch in epochs(loader16([0]), 2))
    steps, state = fit(*fresh(num_workers), draws, crash)
    trained = [p for step in (steps[:-1] if crash else steps) for p in step]
    dl = loader16([state["batches"]], num_workers, batch_size)
    dl.load_state_dict(state)
    batches = [batch["prompt"] for batch in dl]
    assert [p for batch in batches for p in batch] == [p for p in order if p not in trained]
    assert all(len(batch) == batch_size for batch in batches[:-1])
    assert [p for batch in dl for p in batch["prompt"]] == next_epoch  # then the next epoch, as an unbroken run's


def test_a_resume_with_another_batch_size_can_be_resumed_again():
    # 2 steps of 2 prompts (the second draws a batch), then 2 steps of 3 (what was fetched ahead held over), then 2 a
    # step again until the epoch ends: every prompt of the epoch once, in the epoch's order but for the draws
    order = [p for batch in loader16([0]) for p in batch["prompt"]]
    first, state = fit(*fresh(), [0, 1])
    trained = [state["batches"]]
    dl = loader16(trained, batch_size=3)
    dl.load_state_dict(state)
    second, state = fit(dl, trained, [0, 0])
    assert [len(step) for step in second] == [3, 3]
    dl = loader16([state["batches"]])
    dl.load_state_dict(state)
    seen = [p for step in first + second for p in step]
    rest = [p for batch in dl for p in batch["prompt"]]
    assert rest == [p for p in order if p not in seen] and sorted(seen + rest) == sorted(order)
