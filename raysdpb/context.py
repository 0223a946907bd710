"""What the training loop needs from where it runs: rank and world size, a device, a place for
TensorBoard events, reporting of metrics (with a checkpoint) and the checkpoint to resume from.

`LocalContext` is one process on one device (`python -m raysdpb.train`). The Ray Train context lives in
`raysdpb.sweep` so that nothing here imports Ray.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

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
        if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
            return torch.device("cpu")
        if not torch.cuda.is_available():
            from raysdpb.errors import UserError

            raise UserError("device: cuda was asked for, but no CUDA GPU is visible; use device=auto or device=cpu")
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

    # -- reporting and checkpoints ------------------------------------------------------------------------
    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        """Hand metrics (and optionally a checkpoint folder the loop just wrote) to the driver."""

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path | None:
        """A folder to write the next checkpoint into, or None where checkpoints are not kept.
        `reported=False` is a checkpoint between reports (`checkpoint_every_steps`)."""
        return None

    def latest_checkpoint(self) -> Path | None:
        return None


class LocalContext(WorkerContext):
    """One process on one device; checkpoints under `output_dir/checkpoints`, events under `output_dir/tensorboard`.

    `resume_from` restores a checkpoint folder (or the newest in `output_dir/checkpoints` with "latest").
    `keep` bounds how many checkpoints stay on disk.
    """

    def __init__(self, output_dir: str | Path, resume_from: str | Path | None = None, keep: int = 2) -> None:
        self.output_dir = Path(output_dir)
        super().__init__(self.output_dir / "tensorboard", self.output_dir)
        self.checkpoints = self.output_dir / "checkpoints"
        self.resume_from = resume_from
        self.keep = keep
        self.reports: list[dict] = []

    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()
                 if k.startswith("eval_") or k in ("epoch", "step")}
        log.info("report %s", json.dumps(shown))

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path:
        self._prune(room_for_one=True)
        path = self.checkpoints / f"step_{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _prune(self, room_for_one: bool = False) -> None:
        """Keep the newest `keep` complete checkpoints (one fewer when a new one is about to be written);
        incomplete folders (a crash mid-save) are removed."""
        for partial in self.checkpoints.glob("step_*"):
            if not (partial / "COMPLETE").exists():
                shutil.rmtree(partial, ignore_errors=True)
        saved = sorted(p for p in self.checkpoints.glob("step_*") if (p / "COMPLETE").exists())
        keep = max(self.keep - 1, 1) if room_for_one else self.keep
        for old in saved[: max(len(saved) - keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def latest_checkpoint(self) -> Path | None:
        if self.resume_from is None:
            return None
        if str(self.resume_from) == "latest":
            saved = sorted(p for p in self.checkpoints.glob("step_*") if (p / "COMPLETE").exists())
            return saved[-1] if saved else None
        path = Path(self.resume_from)
        if not (path / "COMPLETE").exists():
            from raysdpb.errors import UserError

            raise UserError(f"resume_from: {path} is not a complete raysdpb checkpoint folder")
        return path
