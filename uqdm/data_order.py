"""The order and the randomness of training data as functions of (seed, epoch, index), and a loader
that Lightning checkpoints and resumes at any step.

An epoch's order is the permutation torch's `DistributedSampler` draws from ``seed + epoch`` (this
process's shard of it under DDP). Each item's random augmentation is drawn from a generator keyed
by ``(seed, epoch, index)`` (`Draw`), not from the global or a worker's generator. So a batch is
the same whether the data are read in the main process or in any number of workers, and the
loader's state is three integers: the seed, the epoch, and the batches it has handed out in that
epoch. Lightning stores that state in every checkpoint (``loops.fit_loop.state_dict.combined_loader``)
and gives it back before the resumed run draws its first batch, which is then the very batch the
interrupted run would have drawn next.
"""

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .rng import keyed_generator

SEED_RANGE = 1 << 63  # DistributedSampler seeds torch.Generator with seed + epoch


@dataclass(frozen=True)
class Draw:
    """The key `SeededOrder` hands to a dataset: which item, and the epoch and seed whose
    randomness it is drawn with."""

    index: int
    epoch: int = 0
    seed: int = 0

    def generator(self) -> torch.Generator:
        """The item's own generator: a function of (seed, epoch, index) only."""
        return keyed_generator("uqdm/data", self.seed, self.epoch, self.index)


def as_draw(key: "int | Draw") -> Draw:
    """A dataset key as a `Draw` (a plain index draws with epoch 0 and seed 0)."""
    return key if isinstance(key, Draw) else Draw(int(key))


def default_seed() -> int:
    """The seed of torch's global generator (``seed_everything``'s seed, the same on every rank)."""
    return torch.initial_seed() % SEED_RANGE


class SeededOrder(DistributedSampler):
    """`DistributedSampler`'s order (shuffled by ``seed + epoch``, this rank's shard under DDP, one
    shard otherwise), yielding `Draw` keys. Its next iteration can start ``skip`` items in.

    Being a `DistributedSampler`, Lightning keeps it under DDP instead of wrapping it, and calls its
    ``set_epoch`` at every epoch.
    """

    def __init__(self, dataset: Dataset, seed: int, shuffle: bool = True):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed % SEED_RANGE)
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        epoch, seed = self.epoch, self.seed
        indices = list(super().__iter__())
        return (Draw(index, epoch, seed) for index in indices[skip:])


class ResumableLoader(DataLoader):
    """A `DataLoader` over a `SeededOrder` with Lightning's stateful-loader interface.

    ``state_dict()`` is ``{"seed", "epoch", "batches"}``: the batches handed out so far in the
    epoch being iterated. ``load_state_dict`` makes the next iteration continue after them, without
    reading the skipped items (an epoch all handed out continues with the next epoch). Iteration
    starts (and workers are given their first indices) at the first batch requested, so the epoch
    Lightning sets just before is the one drawn.
    """

    def __init__(self, dataset: Dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0):
        order = SeededOrder(dataset, seed, shuffle)
        super().__init__(
            dataset,
            batch_size,
            sampler=order,
            drop_last=shuffle and len(order) >= batch_size,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            generator=torch.Generator().manual_seed(order.seed),  # iterators draw nothing from the global one
        )
        self.order = order
        self._handed_out = 0

    def __iter__(self):
        def batches():
            self._handed_out = self.order.skip // self.batch_size
            for batch in super(ResumableLoader, self).__iter__():
                self._handed_out += 1
                yield batch

        return batches()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.order.seed, "epoch": self.order.epoch, "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):
            epoch, batches = epoch + 1, 0
        self.order.seed = int(state["seed"])
        self.order.set_epoch(epoch)
        self.order.skip = batches * self.batch_size
        self._handed_out = batches
