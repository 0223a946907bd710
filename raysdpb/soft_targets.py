"""Where a method's soft targets come from, on one rank: one source per `Method.soft_targets`.

Every source has the same three calls, which `raysdpb.recipe.Recipe.train_step` (and the HF Trainer's
`compute_loss`) make for every method, so the step is one function whatever the method:

    targets = source.take(indices, device, epoch)   # the soft targets of this batch's samples, or None
    ...the loss, backward, the optimizer step...
    source.put(indices, outputs, params)            # what this step leaves for later steps

and `state_dict()` / `load_state_dict()`, the rank's part of a checkpoint (under its `cache` key), so that a
resumed run continues with the same targets.

* `NoTargets` (`none`, `other_pass`: R-Drop's targets are the step's own second pass, not kept).
* `PreviousBatch` (`previous_batch`): the `LogitCache` of the previous step's second half (DLB, DynSDPB).
"""

from __future__ import annotations

import torch

from raysdpb.methods import LogitCache, Method, MethodParams, Outputs, TeacherState

__all__ = ["SoftTargetSource", "NoTargets", "PreviousBatch", "make_soft_targets"]


class SoftTargetSource:
    """The interface; a source that holds nothing (`none`, `other_pass`)."""

    def take(self, indices: torch.Tensor, device: torch.device | str, epoch: int) -> TeacherState | None:
        return None

    def put(self, indices: torch.Tensor, outputs: Outputs, params: MethodParams) -> None:
        return None

    def clear(self) -> None:
        """Forget what is held for the next step (a step that failed, a new loader)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} holds no state, but the checkpoint has some: "
                             f"{sorted(state)}")


NoTargets = SoftTargetSource


class PreviousBatch(SoftTargetSource):
    """The previous step's second half is this step's first half (the overlap sampler): its soft targets, at the
    method's `teacher_temperature`, cached in a `LogitCache` that checks the overlap lines up."""

    def __init__(self, method: Method) -> None:
        self.method = method
        self.cache = LogitCache()

    def take(self, indices: torch.Tensor, device: torch.device | str, epoch: int) -> TeacherState | None:
        return self.cache.take(indices[: len(indices) // 2], device)

    def put(self, indices: torch.Tensor, outputs: Outputs, params: MethodParams) -> None:
        half = len(indices) // 2
        self.cache.put(self.method.teacher_state(outputs.slice(slice(half, None)), indices[half:], params))

    def clear(self) -> None:
        self.cache.clear()

    def state_dict(self) -> dict:
        return self.cache.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.cache.load_state_dict(state)


def make_soft_targets(method: Method) -> SoftTargetSource:
    """The source of `method`'s soft targets, empty."""
    if method.soft_targets == "previous_batch":
        return PreviousBatch(method)
    if method.soft_targets in ("none", "other_pass"):
        return NoTargets()
    raise ValueError(f"{method.name}: no source of {method.soft_targets!r} soft targets")
