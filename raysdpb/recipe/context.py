"""What the recipe needs from where it runs: rank and world size, a device, a place for TensorBoard events,
reporting of metrics (with a checkpoint), where checkpoints go and the checkpoint to resume from.

`LocalContext` is one process on one device (`python -m raysdpb.train`). The Ray Train context,
`raysdpb.sweep.worker.RayTrainContext`, lives with the sweep so that nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from raysdpb.errors import UserError
from raysdpb.recipe.checkpoint import CHECKPOINT_PREFIX, checkpoint_name, complete_checkpoints, is_complete_folder

log = logging.getLogger(__name__)

__all__ = ["WorkerContext", "LocalContext"]


class WorkerContext:
    """Base: single process, no reporting. Subclasses override what differs."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __init__(self, tensorboard_dir: str | Path | None = None, artifacts_dir: str | Path | None = None) -> None:
        self.tensorboard_dir = Path(tensorboard_dir) if tensorboard_dir else None
        self.artifacts_dir = Path(artifacts_dir) if artifacts_dir else None  # e.g. generated predictions
        self._writer = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, preference: str = "auto") -> torch.device:
        """The CPU for `cpu`, or for `auto` where no CUDA GPU is visible; else this rank's GPU (`gpu()`)."""
        if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise UserError("device: cuda was asked for, but no CUDA GPU is visible; use device=auto or device=cpu")
        return self.gpu()

    def gpu(self) -> torch.device:
        """This rank's GPU: the one of its local rank."""
        return torch.device("cuda", self.local_rank)

    # -- TensorBoard (rank 0 only) ----------------------------------------------------------------------
    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main or self.tensorboard_dir is None:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        for key, value in scalars.items():
            self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # -- agreement between ranks -----------------------------------------------------------------------
    def all_ranks(self, flag: bool) -> bool:
        """True where `flag` is true on every rank. The loop asks this before it skips a step, so that all
        DDP ranks skip it together (a rank that skipped its backward alone would hang the others' all-reduce)."""
        if self.world_size <= 1:
            return bool(flag)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return bool(flag)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def sum_over_ranks(self, value: int) -> int:
        """`value` summed over every rank (a collective: every rank must call it)."""
        if self.world_size <= 1:
            return int(value)
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return int(value)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        total = torch.tensor([int(value)], dtype=torch.int64, device=device)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return int(total.item())

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `tensor` (the same shape on every rank), in rank order; `[tensor]` in a single process. A
        collective: every rank must call it."""
        if self.world_size <= 1:
            return [tensor]
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [tensor]
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor.contiguous())
        return gathered

    def gather_to_main(self, obj: Any) -> list | None:
        """Every rank's `obj` as a list on rank 0 (None on the others); `[obj]` in a single process. A collective:
        every rank must call it."""
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return [obj]
        gathered: list | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    # -- reporting and checkpoints ------------------------------------------------------------------------
    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """Hand metrics (and optionally a checkpoint folder the loop just wrote) to the driver."""

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path | None:
        """A folder to write the next checkpoint into, or None where checkpoints are not kept.
        `reported=False` is a checkpoint between reports (`checkpoint_every_steps`)."""
        return None

    def latest_checkpoint(self) -> Path | None:
        return None

    # -- what a process keeps between trials --------------------------------------------------------------
    def memo(self, key: tuple, build: Callable[[], Any]) -> Any:
        """`build()`, or what it returned for `key` in an earlier trial of this process, where the context's
        process runs trial after trial (a sweep's trial actor). The value must not be modified by its users."""
        return build()


class LocalContext(WorkerContext):
    """One process on one device; checkpoints under `output_dir/checkpoints`, events under `output_dir/tensorboard`.

    `resume_from` restores a checkpoint folder (or the newest in `output_dir/checkpoints` with "latest").
    `keep` bounds how many checkpoints stay on disk. `trackers` (`raysdpb.trackers.LocalTrackers`, set where the
    config asks for MLflow or W&B) get every step scalar and every report too.
    """

    def __init__(self, output_dir: str | Path, resume_from: str | Path | None = None, keep: int = 2) -> None:
        self.output_dir = Path(output_dir)
        super().__init__(self.output_dir / "tensorboard", self.output_dir)
        self.trackers = None
        self.checkpoints = self.output_dir / "checkpoints"
        self.resume_from = resume_from
        self.keep = keep
        self.reports: list[dict] = []
        older = sorted(p.name for p in self.checkpoints.glob("step_*") if p.is_dir())
        if older:  # the layout before checkpoint format 2: `step_<n>` folders with a COMPLETE marker
            raise UserError(f"{self.checkpoints} holds checkpoints of an older raysdpb ({older[-1]}, ...), which this "
                            "version cannot resume; start this run in another --output-dir (or delete that folder)")
        earlier = self._saved() if resume_from is None else []
        if earlier:
            # a new run here would prune by step number: the earlier run's later checkpoints would outlive
            # the new run's, and a later `--resume latest` would pick up the earlier run
            raise UserError(f"{self.output_dir} already holds the checkpoints of an earlier run (newest: "
                            f"{earlier[-1].name}); continue it with --resume latest, or start this run in "
                            "another --output-dir (or delete that folder)")

    def log_scalars(self, step: int, scalars: dict[str, float]) -> None:
        super().log_scalars(step, scalars)
        if self.trackers is not None:
            self.trackers.log_metrics(step, scalars)

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if self.trackers is not None:
            self.trackers.log_metrics(int(metrics.get("step", 0)), metrics)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                 if k.startswith("eval_") or k in ("epoch", "step")}
        log.info("report %s", json.dumps(shown))

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path:
        self._prune(room_for_one=True)
        path = self.checkpoints / checkpoint_name(step)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _prune(self, room_for_one: bool = False) -> None:
        """Keep the newest `keep` whole checkpoints (one fewer when a new one is about to be written); folders
        that are not whole (a crash mid-save) are removed."""
        saved = self._saved()
        for partial in set(self.checkpoints.glob(f"{CHECKPOINT_PREFIX}*")) - set(saved):
            shutil.rmtree(partial, ignore_errors=True)
        keep = max(self.keep - 1, 1) if room_for_one else self.keep
        for old in saved[: max(len(saved) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def _saved(self) -> list[Path]:
        """The whole checkpoints in the output folder, oldest first (by step)."""
        return [Path(path) for _, path in complete_checkpoints(self.checkpoints)]

    def latest_checkpoint(self) -> Path | None:
        if self.resume_from is None:
            return None
        if str(self.resume_from) == "latest":
            saved = self._saved()
            return saved[-1] if saved else None
        path = Path(self.resume_from)
        if not is_complete_folder(path):
            raise UserError(f"resume_from: {self.resume_from} is not a complete raysdpb checkpoint folder")
        return path
