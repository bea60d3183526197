"""The training loader: an epoch's order from a seeded generator of its own, its place kept in rows so a resumed
run (with any batch size) goes on where the epoch stopped, and further batches lent to dynamic sampling."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, DistributedSampler

from ttc_lightning.errors import TTCError


def seeded_generator(seed: int) -> torch.Generator:
    """A loader's own generator: without one, every new iterator of a DataLoader draws its base seed from the global
    random state, which sampling uses, so a resumed run would sample other completions than an unbroken one."""
    return torch.Generator().manual_seed(seed)


def evaluation_loader(
    rows: Sequence[Any],
    batch_size: int,
    collate_fn: Callable[[list[Any]], Any],
    seed: int,
    trainer: L.Trainer | None,
    num_workers: int = 0,
) -> DataLoader:
    """The rows in order, in batches; on several ranks, each rank's share of them, every rank with as many batches
    (the last round filled with the first rows again): the ranks of a sharded model sample together, so a rank with
    one batch fewer would leave the others waiting for it. The evaluation drops those fill-ins when it gathers the
    ranks' records (`ttc_lightning.evaluation.evaluator.gather_records`). Lightning keeps a sampler given here; its
    own for `predict` deals the rows unevenly."""
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = DistributedSampler(rows, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
    return DataLoader(
        rows,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=num_workers,
        generator=seeded_generator(seed),
    )


class EpochStream:
    """The batches of dataset indices that one pass of a `ResumableLoader` hands out (what the DataLoader's batch
    sampler would): the positions in the epoch's order `held` over from before a restore, then the order from
    position `start` on, `batch_size` at a time. The order is drawn from the sampler whole as the first batch is
    asked for, which takes from its generator what a whole pass through it would."""

    def __init__(self, sampler: Any, batch_size: int, drop_last: bool, held: Sequence[int], start: int) -> None:
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.held, self.start = list(held), start
        self.batches: list[list[int]] = []  # the positions of each batch handed out, in order

    def __iter__(self) -> Iterator[list[int]]:
        order = list(self.sampler)
        positions = itertools.chain(self.held, range(self.start, len(order)))
        while chunk := list(itertools.islice(positions, self.batch_size)):
            if self.drop_last and len(chunk) < self.batch_size:
                return
            self.batches.append(chunk)
            yield [order[p] for p in chunk]

    def __len__(self) -> int:
        n = len(self.held) + max(len(self.sampler) - self.start, 0)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def rest(self, taken: int) -> tuple[list[int], int]:
        """What is left after the first `taken` batches: the positions still held, and where the order goes on."""
        used = sum(len(batch) for batch in self.batches[:taken])
        return self.held[used:], self.start + max(used - len(self.held), 0)


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning resumes in the middle of an epoch instead of starting the epoch over, and from
    which the module can draw further batches of the same epoch (`draw`, for dynamic sampling).

    Lightning saves `state_dict()` in every checkpoint and calls `load_state_dict()` before the first pass after a
    restore. The state is where the epoch's order comes from (the shuffling generator as the epoch began, or the
    epoch number of DDP's sampler) and how far into that order the epoch is, in rows (positions in the order), not
    batches, so that a run resumed with another batch size goes on where the other stopped: the rows taken (by
    Lightning or by `draw`) up to `rows`, and those among them not trained on (`held`): Lightning fetches a batch
    ahead of the one being trained on, so the module's draws come after that one. The restored pass draws the same
    order, hands out the held rows first, then goes on from `rows`, batched by this loader's `batch_size`. `trained`
    reads from the trainer how many of the epoch's batches were trained on.
    """

    def __init__(self, *args: Any, trained: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.batch_sampler is None:
            raise TTCError("ResumableLoader needs a batch_size: it counts an epoch in rows and batches them itself")
        self.trained = trained
        self._epoch_start = self._generator_state()
        self._restored: dict[str, Any] | None = None
        self._restored_epoch: int | None = None
        self._epoch_offset = 0
        self._stream: EpochStream | None = None  # the index batches of this pass
        self._source: Iterator[Any] | None = None
        self._taken = 0  # batches of this pass taken, by Lightning or by `draw`
        self._taken_at_fetch = 0  # ... when Lightning last fetched one
        self._fetched: list[int] = []  # which of this pass's batches Lightning fetched
        self._trained_before = 0  # batches of this epoch trained on before this pass (a restored one)

    @property
    def _index_sampler(self) -> Any:
        # What DataLoader's iterators take their index batches from: this pass's stream.
        return self._stream if self._stream is not None else super()._index_sampler

    def __len__(self) -> int:
        # A pass restored with a larger batch size may have more batches left than the epoch has at that size after
        # the batches Lightning counts as trained: Lightning would end the epoch early at `len`.
        whole = len(self.batch_sampler)
        return whole if self._stream is None else max(whole, self._trained_before + len(self._stream))

    def __iter__(self) -> Iterator[Any]:
        self._epoch_start = self._generator_state()
        restored, self._restored = self._restored, None
        held, start, self._trained_before = self._position(restored)
        self._stream = EpochStream(self.sampler, self.batch_size, self.drop_last, held, start)
        self._taken = self._taken_at_fetch = 0
        self._source, self._fetched = None, []
        return self._batches()

    def _position(self, state: dict[str, Any] | None) -> tuple[list[int], int, int]:
        """(held rows, next row of the order, batches trained on) of a restored state; (nothing, 0, 0) without."""
        if state is None:
            return [], 0, 0
        if "rows" in state:
            return list(state["held"]), state["rows"], state["batches"]
        # Written before the position was kept in rows: in batches, of this loader's size (before `draw` existed,
        # with no "taken": its batches trained on were all taken).
        size, n = self.batch_size, len(self.sampler)
        held = [p for batch in state.get("pending", []) for p in range(batch * size, min((batch + 1) * size, n))]
        return held, state.get("taken", state["batches"]) * size, state["batches"]

    def _batches(self) -> Iterator[Any]:
        # Runs at the first batch, after Lightning has numbered the DDP sampler's epoch. A run stopped by max_steps
        # counts its unfinished epoch as done, so after a restore Lightning's number can be one ahead of the epoch
        # the data is in: keep the sampler on the data's epoch from then on.
        if hasattr(self.sampler, "set_epoch"):
            if self._restored_epoch is not None:
                self._epoch_offset = self._restored_epoch - self.sampler.epoch
                self._restored_epoch = None
            self.sampler.set_epoch(self.sampler.epoch + self._epoch_offset)
        self._source = super().__iter__()
        while (batch := self.draw()) is not None:
            self._fetched.append(self._taken - 1)
            self._taken_at_fetch = self._taken
            yield batch

    def draw(self) -> Any | None:
        """The epoch's next batch after all those taken so far, or None when the epoch has none left."""
        batch = None if self._source is None else next(self._source, None)
        if batch is not None:
            self._taken += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        epoch = getattr(self.sampler, "epoch", None)
        stream = self._stream
        if stream is None:  # no pass yet: the state restored, or the start of the first epoch
            return self._restored or {"generator": self._generator_state(), "batches": 0, "epoch": epoch}
        trained = self.trained()
        pending = self._fetched[max(trained - self._trained_before, 0) :]
        if not pending and self._taken >= len(stream):  # the epoch is over: the next one starts from the generator now
            next_epoch = None if epoch is None else epoch + 1
            return {"generator": self._generator_state(), "batches": 0, "rows": 0, "held": [], "epoch": next_epoch}
        # Two pending batches: the step of the first did not finish (an error), so what it drew is drawn again.
        held, start = stream.rest(self._taken if len(pending) <= 1 else self._taken_at_fetch)
        held = [p for batch in pending for p in stream.batches[batch]] + held
        return {"generator": self._epoch_start, "batches": trained, "rows": start, "held": held, "epoch": epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])
        self._restored = state
        self._restored_epoch = state["epoch"]

    def _generator_state(self) -> Any:
        return None if self.generator is None else self.generator.get_state()


def draw_train_batch(trainer: L.Trainer) -> dict[str, list[Any]] | None:
    """The training loader's next batch of the epoch after those taken so far (`ResumableLoader.draw`)."""
    loader = trainer.train_dataloader
    if not isinstance(loader, ResumableLoader):
        raise TTCError(
            f"model.dynamic_sampling draws further prompts from the training loader, but it is a "
            f"{type(loader).__name__}; return a ttc_lightning.data.loader.ResumableLoader from train_dataloader()"
        )
    return loader.draw()


def trained_batches(trainer: L.Trainer) -> int:
    """Batches of the current epoch that have been trained on (the one in flight counts once it returned)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed
