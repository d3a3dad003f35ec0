"""A resumable, rank-sharded sampler that hands each item its own seed.

Each element is `(index, seed)`: the seed is a function of (run seed, epoch, index) only, so the
randomness of an item (crop, flip, mask, noise) does not depend on the batch size, the number of
processes, the worker count or where a run was resumed. `SeededDataset` applies it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler


def sample_seed(seed: int, epoch: int, index: int) -> int:
    # Any injective-enough mix below 2**63; epochs and datasets are far below these strides.
    return (seed * 1_000_003 + epoch) * 4_294_967_291 + index


class ResumableSampler(Sampler):
    def __init__(self, size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True):
        self.size, self.seed, self.rank, self.world_size, self.shuffle = size, seed, rank, world_size, shuffle
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Iterate `epoch` from this rank's `start`-th item on (for resuming mid-epoch)."""
        self.epoch, self.start = epoch, start

    def order(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.size)
        generator = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        return torch.randperm(self.size, generator=generator)

    def __len__(self) -> int:
        return self.size // self.world_size - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        usable = self.size // self.world_size * self.world_size  # equal shards: drop the remainder
        # Interleaved shards: global batch b holds items [b·G, (b+1)·G) of the order, whatever the world size.
        shard = self.order(self.epoch)[:usable][self.rank :: self.world_size]
        for index in shard[self.start :].tolist():
            yield index, sample_seed(self.seed, self.epoch, index)


class SeededDataset(Dataset):
    """Wraps a dataset of dicts; item `(index, seed)` runs the base item and `extras()` under `seed`.

    `extras` is a task's per-sample randomness (mask noise, diffusion time, ...) returning a dict.
    """

    def __init__(self, base: Dataset, extras: Callable[[], dict] | None = None):
        self.base, self.extras = base, extras

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]) -> dict:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[dict]:
        """A batch of items (the DataLoader's batched fetch): the global generators are saved and restored once
        per batch, and Python's and NumPy's are seeded only for a dataset that may draw from them (timm's
        RandAugment does; a dataset saying `draws_python_random = False` does not), so a cached dataset's items
        cost microseconds. Each item's draws are those of its own seed either way."""
        python_rngs = getattr(self.base, "draws_python_random", True)
        if python_rngs:
            py_state, np_state = random.getstate(), np.random.get_state()
        samples = []
        try:
            with torch.random.fork_rng(devices=[]):
                for index, seed in items:
                    if python_rngs:
                        random.seed(seed)
                        np.random.seed(seed % 2**32)
                    torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed would queue CUDA seeding
                    sample = dict(self.base[index])
                    if self.extras is not None:
                        sample.update(self.extras())
                    samples.append(sample)
        finally:
            if python_rngs:
                random.setstate(py_state)
                np.random.set_state(np_state)
        return samples


class DataStream:
    """Endless micro-batches of `loader` (whose sampler is `sampler`), epoch after epoch, with its position as
    state: (epoch, items of that epoch this rank has consumed). Counting consumed items (edm2 counts
    `cur_nimg`), not optimiser steps, is what makes a resumed stream equal the uninterrupted one when an
    epoch does not hold a whole number of steps (e.g. 100 items, steps of 2 micro-batches of 20: the third
    step takes the last micro-batch of epoch 0 and the first of epoch 1)."""

    def __init__(self, loader, sampler: ResumableSampler, micro_batch: int):
        self.loader, self.sampler, self.micro_batch = loader, sampler, micro_batch
        self.epoch, self.offset = 0, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __iter__(self) -> Iterator[dict]:
        while True:
            self.sampler.set_epoch(self.epoch, self.offset)
            for batch in self.loader:
                self.offset += self.micro_batch  # counted when handed out, not when a worker prefetched it
                yield batch
            self.epoch, self.offset = self.epoch + 1, 0
