"""Batch samplers: the overlapping mini-batch stream of DLB/DynSDPB, and the plain one of fine-tuning.

Both are *batch* samplers (`DataLoader(dataset, batch_sampler=...)`), distributed like
`torch.utils.data.DistributedSampler` (one global seeded permutation per epoch, disjoint per-rank shares,
`set_epoch`), and checkpointable (`state_dict` / `load_state_dict`), so a resumed run continues the same
stream. Section 1 of docs/method.md.

How an epoch is cut (both samplers):

* The epoch's permutation is `torch.randperm(N)` seeded by `(seed, epoch)` when `shuffle`, else `0..N-1`.
* It is cut into *global groups* of `num_replicas * half` indices (`half = batch_size // 2`); rank `r`
  takes the `r`-th `half`-sized slice of every group, so ranks are disjoint and stay in step.
* The remainder that does not fill a whole group is handled like `DistributedSampler`:
  ``drop_last=False`` (default) pads the permutation with its own first indices (wrapping around), so every
  sample is seen and a few are seen once more that epoch; ``drop_last=True`` drops the remainder (fewer
  than `num_replicas * half` samples, a different set every epoch when shuffling).

The overlap stream (`OverlapBatchSampler`): the per-rank half-batches of all epochs form one stream
`s_0, s_1, s_2, ...`, and batch `t` is `[s_t ; s_{t+1}]`, so its first half is the previous batch's second
half, across epoch boundaries too. A batch belongs to the epoch of its *second* half; the first epoch
therefore has one batch fewer than the others (its first half-batch only primes the stream).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

__all__ = ["OverlapBatchSampler", "ShuffledBatchSampler"]


class _EpochSampler:
    """Shared epoch/permutation/rank logic and the checkpoint state of both samplers."""

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        shuffle: bool,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas); got rank={rank}, num_replicas={num_replicas}")
        self.num_samples = int(num_samples)
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.drop_last = bool(drop_last)
        self.epoch = 0
        self._position = 0  # batches of the current epoch already yielded (or restored)

    # -- the per-epoch, per-rank index list ------------------------------------------------------------
    @property
    def _chunk(self) -> int:
        """Indices per rank per global group."""
        raise NotImplementedError

    def _groups_per_epoch(self) -> int:
        group = self._chunk * self.num_replicas
        return self.num_samples // group if self.drop_last else math.ceil(self.num_samples / group)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.num_samples)
        generator = torch.Generator()
        generator.manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_samples, generator=generator)

    def rank_indices(self, epoch: int) -> list[int]:
        """This rank's share of `epoch`, in order: `groups_per_epoch * chunk` indices."""
        perm = self._permutation(epoch)
        total = self._groups_per_epoch() * self._chunk * self.num_replicas
        if total > self.num_samples:  # pad by wrapping around, as DistributedSampler does
            reps = math.ceil(total / self.num_samples)
            perm = perm.repeat(reps)
        perm = perm[:total].view(-1, self.num_replicas, self._chunk)
        return perm[:, self.rank, :].reshape(-1).tolist()

    # -- DistributedSampler-style epoch control and checkpointing -----------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch to iterate next (call before each epoch, as with `DistributedSampler`)."""
        if epoch != self.epoch:
            self._position = 0
        self.epoch = int(epoch)

    def state_dict(self, batches_consumed: int | None = None) -> dict:
        """The position in the stream. Pass `batches_consumed` when a DataLoader with workers prefetches
        batches, so the state reflects what the training loop really used."""
        position = self._position if batches_consumed is None else int(batches_consumed)
        return {
            "epoch": self.epoch,
            "position": position,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "num_replicas": self.num_replicas,
            "rank": self.rank,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_samples", "batch_size", "num_replicas"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state[key]}, but this sampler has "
                    f"{key}={getattr(self, key)}; resume with the same data, batch size and world size"
                )
        self.epoch = int(state["epoch"])
        self._position = int(state["position"])

    def __len__(self) -> int:
        return self.batches_in_epoch(self.epoch)

    def batches_in_epoch(self, epoch: int) -> int:
        raise NotImplementedError

    def total_batches(self, num_epochs: int) -> int:
        """Optimizer steps over `num_epochs` epochs (for the learning-rate schedule)."""
        return sum(self.batches_in_epoch(e) for e in range(num_epochs))

    def samples_before(self, epoch: int, position: int) -> int:
        """Samples this rank has forwarded in the batches before `position` of `epoch` (every earlier epoch
        included): what `samples_seen` counts, a function of the stream's position alone, so a resumed run
        continues the count. An overlap batch counts all its `batch_size` samples (each sample is forwarded
        twice per epoch), a plain epoch's short last batch what it holds."""
        return sum(self.samples_in_batches(e, self.batches_in_epoch(e)) for e in range(epoch)) + \
            self.samples_in_batches(epoch, position)

    def samples_in_batches(self, epoch: int, count: int) -> int:
        """Samples in the first `count` batches of `epoch` on this rank."""
        raise NotImplementedError

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order, from the first (whatever the current position is)."""
        return self._batches(epoch)

    def _batches(self, epoch: int) -> list[list[int]]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._batches(self.epoch)
        start = self._position
        for k in range(start, len(batches)):
            self._position = k + 1
            yield batches[k]
        # the next iteration of the same epoch object starts over unless set_epoch/load_state_dict moves it
        self._position = 0


class OverlapBatchSampler(_EpochSampler):
    """Batches whose first half repeats the previous batch's second half (DLB / DynSDPB).

    `shuffle=False` keeps the dataset order (Sequential DLB); `shuffle=True` draws a fresh permutation per
    epoch from `(seed, epoch)`, identical on every rank (Random DLB, DynSDPB).
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False) -> None:
        if batch_size % 2 != 0 or batch_size < 2:
            raise ValueError(
                f"OverlapBatchSampler needs an even batch_size (half repeats the previous batch); got {batch_size}"
            )
        if num_samples < batch_size * num_replicas:
            raise ValueError(
                f"dataset too small: {num_samples} samples cannot fill one overlapping batch of {batch_size} "
                f"on each of {num_replicas} rank(s); use a smaller batch_size or more data"
            )
        super().__init__(num_samples, batch_size, shuffle=shuffle, seed=seed,
                         num_replicas=num_replicas, rank=rank, drop_last=drop_last)

    @property
    def half(self) -> int:
        return self.batch_size // 2

    @property
    def _chunk(self) -> int:
        return self.half

    def halves_in_epoch(self) -> int:
        return self._groups_per_epoch()

    def batches_in_epoch(self, epoch: int) -> int:
        return self.halves_in_epoch() - (1 if epoch == 0 else 0)

    def samples_in_batches(self, epoch: int, count: int) -> int:
        return min(count, self.batches_in_epoch(epoch)) * self.batch_size

    def half_batches(self, epoch: int) -> list[list[int]]:
        """This rank's half-batches of `epoch` (`halves_in_epoch()` of them), in stream order."""
        idx = self.rank_indices(epoch)
        return [idx[j:j + self.half] for j in range(0, len(idx), self.half)]

    def _batches(self, epoch: int) -> list[list[int]]:
        halves = self.half_batches(epoch)
        if epoch > 0:  # the stream continues: the previous epoch's last half opens this epoch
            halves = [self.half_batches(epoch - 1)[-1]] + halves
        return [halves[t] + halves[t + 1] for t in range(len(halves) - 1)]


class ShuffledBatchSampler(_EpochSampler):
    """Plain mini-batches (finetune, double_finetune, dynamic_finetune), distributed and checkpointable.

    With `drop_last=False` the last batch of an epoch may be smaller than `batch_size`.
    """

    def __init__(self, num_samples: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, drop_last: bool = False) -> None:
        if num_samples < num_replicas:
            raise ValueError(f"dataset too small: {num_samples} samples for {num_replicas} rank(s)")
        super().__init__(num_samples, batch_size, shuffle=shuffle, seed=seed,
                         num_replicas=num_replicas, rank=rank, drop_last=drop_last)
        if drop_last and num_samples < batch_size * num_replicas:
            raise ValueError(
                f"dataset too small: {num_samples} samples cannot fill one batch of {batch_size} "
                f"on each of {num_replicas} rank(s) with drop_last=True"
            )

    @property
    def _chunk(self) -> int:
        # ranks share the data sample by sample (one index per rank per group), as DistributedSampler does
        return 1

    def _per_rank(self) -> int:
        return self._groups_per_epoch()

    def batches_in_epoch(self, epoch: int) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def samples_in_batches(self, epoch: int, count: int) -> int:
        full = self._per_rank() if not self.drop_last else self.batches_in_epoch(epoch) * self.batch_size
        return min(count * self.batch_size, full)

    def _groups_per_epoch(self) -> int:
        # pad or drop to a multiple of num_replicas only; batching is then per rank
        r = self.num_replicas
        return self.num_samples // r if self.drop_last else math.ceil(self.num_samples / r)

    def _batches(self, epoch: int) -> list[list[int]]:
        idx = self.rank_indices(epoch)
        n = self.batches_in_epoch(epoch)
        return [idx[k * self.batch_size:(k + 1) * self.batch_size] for k in range(n)]
