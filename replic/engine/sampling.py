"""Deterministic data order and per-sample augmentation seeds: the basis of exact resume.

The order of an epoch is a pure function of (seed, epoch), and the random
augmentation of a sample is a pure function of (seed, epoch, index). Nothing
depends on the global RNG, on the number of data-loader workers, or on where a
run was interrupted, so a resumed run can skip the consumed batches and see
exactly the images (and crops and flips) an uninterrupted run would have seen.
The global RNG stays reserved for the model (dropout), and is checkpointed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

_MASK64 = (1 << 63) - 1


def mix_seed(*parts: int) -> int:
    """Combine integers into one 63-bit seed (splitmix64-style), stable across platforms."""
    state = 0x9E3779B97F4A7C15
    for part in parts:
        state = (state ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 31
        state = state * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        state ^= state >> 29
    return state & _MASK64


def epoch_permutation(n: int, seed: int, epoch: int) -> list[int]:
    """The shuffled order of ``n`` samples for one epoch."""
    generator = torch.Generator().manual_seed(mix_seed(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=generator).tolist()


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this process's batches of ``(epoch, index)`` pairs, from batch ``start`` on.

    Global batch k of an epoch is ``order[k*B*W:(k+1)*B*W]``; process r takes its
    r-th slice of B samples. So W processes with batch B see, together, exactly the
    samples 1 process with batch B*W sees, in the same order. Training drops the
    incomplete last global batch (as DETR's ``BatchSampler(drop_last=True)``).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if num_samples < batch_size * world_size:
            raise ValueError(
                f"dataset has {num_samples} images, fewer than one global batch "
                f"({batch_size} per process x {world_size} processes)"
            )
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.rank = rank
        self.world_size = world_size
        self.start = start

    @property
    def batches_per_epoch(self) -> int:
        """Optimizer steps in one full epoch."""
        return self.num_samples // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        global_batch = self.batch_size * self.world_size
        for k in range(self.start, self.batches_per_epoch):
            lo = k * global_batch + self.rank * self.batch_size
            yield [(self.epoch, i) for i in order[lo : lo + self.batch_size]]


def eval_batches(
    num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1
) -> list[list[tuple[int, int]]]:
    """In-order evaluation batches of this process's contiguous shard (no sample dropped)."""
    per_rank = -(-num_samples // world_size)
    indices = list(range(rank * per_rank, min(num_samples, (rank + 1) * per_rank)))
    return [
        [(0, i) for i in indices[lo : lo + batch_size]] for lo in range(0, len(indices), batch_size)
    ]


class SeededDataset(Dataset):
    """Wraps a dataset so item ``(epoch, index)`` is drawn with its own fixed RNG seed.

    The global torch / NumPy / Python RNG states are saved and restored around the
    call, so loading data never perturbs the model's random stream.
    """

    def __init__(self, dataset: Sequence[Any], seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        sample_seed = mix_seed(self.seed, epoch, index)
        py_state = random.getstate()
        np_state = np.random.get_state()
        torch_state = torch.random.get_rng_state()
        # Only the CPU generator: data loading draws from nothing else, and torch.manual_seed
        # would also queue lazy CUDA/XPU/MTIA seeding, each formatting a stack trace (~1 ms an
        # item, 15 % of a mini training step). Same CPU stream as torch.manual_seed(sample_seed).
        torch.random.default_generator.manual_seed(sample_seed)
        random.seed(sample_seed)
        np.random.seed(sample_seed % (1 << 32))
        try:
            return self.dataset[index]
        finally:
            torch.random.set_rng_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)
