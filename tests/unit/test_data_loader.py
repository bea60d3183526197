import pytest
import torch

from ttc_lightning.data.common import ResumableLoader, collate_rows

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
