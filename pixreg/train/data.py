"""Deterministic, resumable, shardable data order.

The training data order is a pure function of ``(seed, step)``: the samples form an
endless stream of epochs, epoch ``e`` being the permutation
``torch.randperm(n, generator=Generator().manual_seed(mix(seed, e)))``; step ``s`` takes
the stream positions ``[s * B, (s + 1) * B)`` (``B`` the global batch; a batch may span
two epochs). Hence

* every method trained with the same seed sees exactly the same images in the same
  order (the order does not depend on the model or on any global RNG);
* resuming at step ``k`` only needs ``k`` (the checkpoint also records the seed, the
  batch size and the dataset length, and they are checked);
* under ``torchrun`` rank ``r`` of ``W`` takes positions ``r, r + W, ...`` of each global
  batch (the same global order, sharded like ``DistributedSampler``), so the union of
  the per-rank batches is the single-process batch.

Augmentation is made a function of ``(data seed, sample index, run seed, epoch)``: the
items handed to the dataset are ``(index, epoch)`` pairs and :class:`SeededDataset`
calls the dataset's ``set_epoch(key)`` (``pixreg.data`` datasets seed their
albumentations pipeline from it) before reading the sample; datasets without
``set_epoch`` get Python/NumPy/torch RNGs seeded per sample inside a forked RNG
context (the global RNG streams are left untouched). Either way the augmentation does
not depend on the number of DataLoader workers or on resuming.
"""
from __future__ import annotations

import random
from typing import Any, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, default_collate

__all__ = ["mix_seed", "epoch_permutation", "StepBatchSampler", "SeededDataset", "collate", "eval_collate", "shard_indices"]


def mix_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from non-negative integer keys (NumPy ``SeedSequence``)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch`` for run seed ``seed`` (``(n,)`` int64)."""
    g = torch.Generator()
    g.manual_seed(mix_seed(seed, 0x5EED, epoch))
    return torch.randperm(n, generator=g)


class StepBatchSampler(Sampler[List[Tuple[int, int]]]):
    """Batch sampler yielding, for steps ``start_step .. num_steps - 1``, this rank's share
    of the global batch as a list of ``(sample index, epoch)`` pairs.

    Args:
        n: dataset length.
        batch_size: global batch size (a multiple of ``world_size``).
        seed: run seed (data order).
        num_steps: total number of steps of the run.
        start_step: first step to yield (resume point).
        rank, world_size: this process's shard.
    """

    def __init__(self, n: int, batch_size: int, seed: int, num_steps: int, start_step: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        if n < 1:
            raise ValueError(f"the training set is empty (n={n})")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"train.batch_size={batch_size} must be a positive multiple of the number of processes ({world_size})")
        if not 0 <= start_step <= num_steps:
            raise ValueError(f"start_step={start_step} must lie in [0, num_steps={num_steps}]")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.num_steps, self.start_step = int(num_steps), int(start_step)
        self.rank, self.world_size = int(rank), int(world_size)
        self._cache: dict = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._cache:
            if len(self._cache) > 2:
                self._cache.pop(min(self._cache))
            self._cache[epoch] = epoch_permutation(self.n, self.seed, epoch)
        return self._cache[epoch]

    def batch(self, step: int) -> List[Tuple[int, int]]:
        """This rank's ``(index, epoch)`` pairs at ``step``."""
        start = step * self.batch_size
        out = []
        for pos in range(start + self.rank, start + self.batch_size, self.world_size):
            epoch, j = divmod(pos, self.n)
            out.append((int(self._perm(epoch)[j]), epoch))
        return out

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        for step in range(self.start_step, self.num_steps):
            yield self.batch(step)

    def __len__(self) -> int:
        return self.num_steps - self.start_step

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batch_size": self.batch_size, "n": self.n, "world_size": self.world_size}


class SeededDataset(Dataset):
    """Wraps a dataset so that items are read as ``ds[(index, epoch)]`` with deterministic
    augmentation (see the module docstring)."""

    def __init__(self, dataset: Dataset, run_seed: int) -> None:
        self.dataset = dataset
        self.run_seed = int(run_seed)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: Tuple[int, int]) -> Any:
        idx, epoch = item
        key = mix_seed(self.run_seed, epoch, 0xA06)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(key)
            return self.dataset[idx]
        sample_seed = mix_seed(key, idx)
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                random.seed(sample_seed)
                np.random.seed(sample_seed % (2**32))
                torch.manual_seed(sample_seed)
                return self.dataset[idx]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def collate(samples: Sequence[Any]) -> Any:
    """``default_collate`` (tuples of tensors stacked along a new batch axis)."""
    return default_collate(list(samples))


def eval_collate(samples: Sequence[Any]) -> List[Any]:
    """Evaluation batches as a list of sub-batches of equal image size (datasets of
    variable-size images can then be evaluated at their native resolution)."""
    groups: List[List[Any]] = []
    for s in samples:
        if groups and _shape(groups[-1][0][0]) == _shape(s[0]):
            groups[-1].append(s)
        else:
            groups.append([s])
    return [default_collate(g) for g in groups]


def _shape(x: Any) -> Tuple:
    """Shape of a tensor, or the shapes of a list of tensors (feature levels)."""
    if isinstance(x, (list, tuple)):
        return tuple(tuple(t.shape) for t in x)
    return tuple(x.shape)


def shard_indices(n: int, rank: int, world_size: int) -> List[int]:
    """Evaluation shard: ``rank, rank + W, ...`` (no padding, no duplicates)."""
    return list(range(rank, n, world_size))
