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
* `EpochMemory` (`previous_epoch`): every example's prediction when it was last trained on (PS-KD).
* `TeacherTable` (`teacher`): a teacher's logits on every training example (KD), read from the disk cache of
  `raysdpb.teacher` when the recipe is set up; nothing of it is checkpointed (the cache is on disk).
"""

from __future__ import annotations

import torch

from typing import Callable

from raysdpb.methods import LogitCache, Method, MethodParams, Outputs, TeacherState

__all__ = ["SoftTargetSource", "NoTargets", "PreviousBatch", "EpochMemory", "TeacherTable", "make_soft_targets"]


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


class EpochMemory(SoftTargetSource):
    """PS-KD's memory: `p(x)`, the softmax of the model's logits for example x in the forward pass of the step
    that last trained on it (detached), `N x C` floats. In epoch `e` (0-based) of `T` a batch gets the
    predictions of its examples with the weight `(e + 1) / T` (the method multiplies alpha), so that the last
    epoch reaches alpha; the first epoch gets none (plain CE), and an example with no prediction yet gets
    weight 0.

    Under DDP the plain sampler deals every epoch's examples out afresh, so an example's previous prediction may
    have been made on another rank: every step's predictions are gathered from all ranks (`gather`, a
    collective, `B x (C + 1)` floats per rank), and every rank's memory holds every example's. The memory is
    the rank's part of a checkpoint."""

    def __init__(self, num_examples: int, total_epochs: int,
                 gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None) -> None:
        self.num_examples, self.total_epochs = int(num_examples), int(total_epochs)
        self.gather = gather or (lambda t: [t])
        self.probs: torch.Tensor | None = None  # (N, C) float32, allocated at the first put (C from the logits)
        self.seen = torch.zeros(self.num_examples, dtype=torch.bool)

    def take(self, indices: torch.Tensor, device: torch.device | str, epoch: int) -> TeacherState | None:
        if epoch == 0 or self.probs is None:
            return None
        idx = indices.detach().cpu().long()
        progress = (epoch + 1) / self.total_epochs
        weight = self.seen[idx].float() * progress
        state = TeacherState(indices=idx, target=self.probs[idx], tau=torch.ones(len(idx)), weight=weight)
        return state.to(device)

    def put(self, indices: torch.Tensor, outputs: Outputs, params: MethodParams) -> None:
        with torch.no_grad():
            probs = torch.softmax(outputs.logits.detach().float(), dim=-1)
            rows = torch.cat([indices.detach().to(probs.device, torch.float32).unsqueeze(-1), probs], dim=-1)
            gathered = torch.cat(self.gather(rows)).cpu()
        if self.probs is None:
            self.probs = torch.zeros(self.num_examples, probs.shape[-1], dtype=torch.float32)
        idx = gathered[:, 0].round().long()  # indices travel as floats (exact below 2^24 examples)
        self.probs[idx] = gathered[:, 1:]
        self.seen[idx] = True

    def state_dict(self) -> dict:
        return {} if self.probs is None else {"probs": self.probs.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            self.probs, self.seen = None, torch.zeros(self.num_examples, dtype=torch.bool)
            return
        if state["probs"].shape[0] != self.num_examples:
            raise ValueError(f"the checkpoint's prediction memory holds {state['probs'].shape[0]} examples, this "
                             f"trial trains on {self.num_examples}")
        self.probs, self.seen = state["probs"].float(), state["seen"].bool()


class TeacherTable(SoftTargetSource):
    """A teacher's logits `(N, C)` on the training examples, by dataset index, at the fixed temperature `tau`."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.logits = logits.float()

    def take(self, indices: torch.Tensor, device: torch.device | str, epoch: int) -> TeacherState | None:
        idx = indices.detach().cpu().long()
        return TeacherState(indices=idx, target=self.logits[idx], tau=torch.ones(len(idx))).to(device)


def make_soft_targets(method: Method, *, num_examples: int = 0, total_epochs: int = 1,
                      gather: Callable[[torch.Tensor], list[torch.Tensor]] | None = None,
                      teacher_logits: torch.Tensor | None = None) -> SoftTargetSource:
    """The source of `method`'s soft targets, empty (`num_examples`, `total_epochs`, `gather`: the epoch
    memory's; `teacher_logits`: the teacher's table)."""
    if method.soft_targets == "teacher":
        if teacher_logits is None or teacher_logits.shape[0] != num_examples:
            raise ValueError(f"{method.name} needs the teacher's logits of all {num_examples} training examples")
        return TeacherTable(teacher_logits)
    if method.soft_targets == "previous_batch":
        return PreviousBatch(method)
    if method.soft_targets == "previous_epoch":
        return EpochMemory(num_examples, total_epochs, gather)
    if method.soft_targets in ("none", "other_pass"):
        return NoTargets()
    raise ValueError(f"{method.name}: no source of {method.soft_targets!r} soft targets")
