"""raysdpb's batch stream as a Hugging Face Trainer iterates it.

The Trainer assumes epochs of one fixed number of batches, calls `set_epoch` before each and, when it resumes
mid-epoch, skips the batches already trained. raysdpb's samplers (`raysdpb.sampler`) are built as in a trial
(`recipe.components.make_sampler`: the method's sampler over this rank's share, from the global seed, the rank
and the world size); `TrainerBatchSampler` shows them to the Trainer:

* plain methods (finetune, ...): Trainer epoch `e` is the sampler's epoch `e`.
* overlap methods (DLB, DynSDPB): the stream of half-batches `s_0, s_1, ...` gives batch `g = [s_g ; s_g+1]`;
  Trainer epoch `e` holds the `H` batches whose *first* half is of epoch `e` (`H` = half-batches per epoch),
  so its last batch takes its second half from epoch `e + 1` and the next epoch opens with that half. The
  batches, in order, are exactly those of `OverlapBatchSampler` (whose epoch 0 has `H - 1` batches because it
  counts a batch in the epoch of its second half); only the epoch boundaries sit one batch later.

Every item goes to the collator with its dataset index (`IndexedDataset`, `IndexCollator`): the batch's
`index` tensor is what `LogitCache` checks the soft targets against.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset

from raysdpb.errors import UserError
from raysdpb.sampler import OverlapBatchSampler

__all__ = ["TrainerBatchSampler", "IndexedDataset", "IndexCollator", "keep_own_batches"]


class TrainerBatchSampler:
    """A batch sampler of fixed-length epochs over a raysdpb sampler (`stream`), with `set_epoch` and
    `skip_next` (the Trainer's resume position). Not named `.sampler` on purpose: accelerate treats an attribute of
    that name as the sampler to re-seed or replace."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.batch_size = stream.batch_size
        self.drop_last = False
        self.epoch = 0
        self._skip = 0

    @property
    def overlap(self) -> bool:
        return isinstance(self.stream, OverlapBatchSampler)

    def __len__(self) -> int:
        return self.stream.halves_in_epoch() if self.overlap else len(self.stream)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_next(self, batches: int) -> None:
        """Start the next iteration `batches` into its epoch (a resumed Trainer skips what it trained)."""
        self._skip = int(batches)

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of Trainer epoch `epoch`, in order."""
        if not self.overlap:
            return self.stream.epoch_batches(epoch)
        halves = self.stream.half_batches(epoch) + self.stream.half_batches(epoch + 1)[:1]
        return [halves[k] + halves[k + 1] for k in range(len(halves) - 1)]

    def __iter__(self) -> Iterator[list[int]]:
        start, self._skip = self._skip, 0
        yield from self.epoch_batches(self.epoch)[start:]

    def state_dict(self) -> dict:
        """What a checkpoint keeps to check that a resume fits (seed, data size, batch size, world size)."""
        return {**self.stream.state_dict(), "epoch": self.epoch}

    def check_resume(self, state: dict, checkpoint: str) -> None:
        try:
            self.stream.load_state_dict({**state, "position": 0})
        except ValueError as err:
            raise UserError(f"the checkpoint {checkpoint} does not fit this training: {err}") from None


class IndexedDataset(Dataset):
    """`dataset[i]` as `(i, item)`, so that the collator can put each batch's dataset indices in it."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return int(i), self.dataset[i]


class IndexCollator:
    """The user's collator on the items, plus the batch's `index` (a `LongTensor` of dataset indices)."""

    def __init__(self, collator) -> None:
        self.collator = collator

    def __call__(self, pairs: list) -> dict:
        batch = self.collator([item for _, item in pairs])
        if not isinstance(batch, dict) and not hasattr(batch, "keys"):
            raise UserError(f"the data collator returned a {type(batch).__name__}; SelfDistillationTrainer needs a "
                            "mapping of model inputs (as DataCollatorWithPadding and default_data_collator return)")
        batch["index"] = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return batch


def keep_own_batches(loader, batches: TrainerBatchSampler):
    """Undo accelerate's re-sharding of a prepared training loader: with several processes, `prepare` wraps the
    batch sampler in a `BatchSamplerShard` that deals consecutive batches to different ranks, which would break
    every rank's overlap. `batches` already is this rank's share, so the wrapper is made a pass-through (one
    process, no padding of a short last batch), as transformers does for its own rank-aware `BatchRebalanceSampler`."""
    from accelerate.data_loader import BatchSamplerShard

    wrapper = getattr(loader, "batch_sampler", None)
    if wrapper is batches:  # one process: nothing was wrapped
        return loader
    if isinstance(wrapper, BatchSamplerShard) and wrapper.batch_sampler is batches:
        wrapper.num_processes, wrapper.process_index = 1, 0
        wrapper.even_batches, wrapper.split_batches = False, False
        return loader
    raise UserError(f"accelerate replaced the training batches ({type(loader).__name__} over "
                    f"{type(wrapper).__name__}); each rank must draw its own overlapping stream: leave "
                    "accelerator_config's dispatch_batches and split_batches off")
