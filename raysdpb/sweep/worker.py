"""The sweep's side of a trial's training process: the recipe's context when it runs in a sweep.

`SweepContext` is what every sweep trial shares, however it runs: reports (with the checkpoint the recipe wrote,
and the reports up to it, which a resumed run sends again), resume from the newest whole checkpoint on the
storage, TensorBoard events and artifacts under the experiment folder, a scratch folder of its own. Two
subclasses say how the trial runs: `RayTrainContext` on each worker of a Ray Train run (`train_worker`; every
multi-worker trial, DDP), and `raysdpb.sweep.trial_actor.TrialActorContext` in Tune's own trial actor (a
single-worker trial, warm: no worker group to start)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from raysdpb.config import TrialConfig
from raysdpb.recipe.checkpoint import checkpoint_name, checkpoint_step, complete_checkpoints, mark_complete
from raysdpb.recipe.context import WorkerContext
from raysdpb.results.schema import SCORE_KEY
from raysdpb.results.storage import download, filesystem, upload
from raysdpb.sweep.cleanup import PLACEMENT_GROUP_KEY

log = logging.getLogger(__name__)

__all__ = ["SweepContext", "RayTrainContext", "run_sweep_trial", "train_worker", "worker_scratch", "REPORT_FILE",
           "SCRATCH_ENV"]

# the reports of the run up to a checkpoint, kept inside it (a resumed run sends them again)
REPORT_FILE = "raysdpb_report.json"


class SweepContext(WorkerContext):
    """The recipe's context in a sweep trial: reports and checkpoints handed to Ray (`_hand_over`, by the
    subclass), resume from the newer of the checkpoint Ray registered (`_registered_checkpoint`) and the newest
    whole one on the storage, TensorBoard events (rank 0) under the experiment folder (written locally and
    copied there when it is a cloud URI)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, tensorboard_path: str,
                 run_path: str | None = None, score_metric: str | None = None,
                 artifacts_path: str | None = None) -> None:
        import ray

        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.scratch = worker_scratch()
        self.reports = 0
        self.resumed_report: dict | None = None  # the report saved with the checkpoint this run resumed from
        self.lineage: list[dict] = []  # every report up to now: those of the resumed checkpoint, then this run's
        self.run_path = run_path  # <experiment>/train_runs/<trial_id>: where this trial's checkpoints are kept
        self.score_metric = score_metric  # reported again as `score` (the task's main metric)
        self._remote_tensorboard = tensorboard_path if "://" in tensorboard_path else None
        local_tb = self.scratch / "tensorboard" if self._remote_tensorboard else Path(tensorboard_path)
        # files the engine writes for people to read (generated predictions): rank 0, copied like the events
        self._remote_artifacts = artifacts_path if artifacts_path and "://" in artifacts_path else None
        local_artifacts = None
        if artifacts_path and self.rank == 0:
            local_artifacts = self.scratch / "artifacts" if self._remote_artifacts else Path(artifacts_path)
        super().__init__(local_tb if self.rank == 0 else None, local_artifacts)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.node_ip = ray.util.get_node_ip_address()
        self.placement_group: str | None = None  # a Train run's workers' group, which the sweep may release
        self.worker_nodes = [self.node_id]

    # -- what the subclasses say ------------------------------------------------------------------------
    def _hand_over(self, metrics: dict, checkpoint_dir: Path | None, name: str | None) -> None:
        """Give Ray the report and, on rank 0, the whole checkpoint folder the recipe wrote (named `name`)."""
        raise NotImplementedError

    # whether Ray registers the checkpoints (Ray Train does; in Tune's trial actor raysdpb keeps them itself)
    registers_checkpoints = False

    def _registered_checkpoint(self) -> tuple | None:
        """`(pyarrow filesystem, path)` of the checkpoint Ray hands this run to resume from, if any."""
        return None

    # -- reports -------------------------------------------------------------------------------------------
    def report(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        self._replay()
        self.lineage.append(dict(metrics))
        whole = None
        if checkpoint_dir is not None and self.is_main and any(Path(checkpoint_dir).iterdir()):
            (Path(checkpoint_dir) / REPORT_FILE).write_text(json.dumps(self.lineage, default=str))
            mark_complete(Path(checkpoint_dir))  # again: the manifest is the last file, and lists the report too
            whole = Path(checkpoint_dir)
        self._send(metrics, whole)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)  # on the storage by now
        self._sync_tensorboard()

    def _send(self, metrics: dict, checkpoint_dir: Path | None = None) -> None:
        metrics = {**metrics, "world_size": self.world_size, "worker_node_id": self.node_id,
                   "worker_node_ip": self.node_ip, "num_worker_nodes": len(self.worker_nodes),
                   "worker_pid": os.getpid(), PLACEMENT_GROUP_KEY: self.placement_group}
        if self.score_metric and metrics.get(self.score_metric) is not None:
            metrics[SCORE_KEY] = metrics[self.score_metric]
        if self.resumed_report is not None:  # this run restarted from the checkpoint of that step
            metrics["resumed_from_step"] = int(self.resumed_report.get("step", 0))
        self.reports += 1
        name = checkpoint_name(int(metrics.get("step", 0))) if checkpoint_dir is not None else None
        self._hand_over(metrics, checkpoint_dir, name)

    def _replay(self) -> None:
        """Before the first report after a resume: send again every report up to the checkpoint, in case Tune
        missed some (a report Train never passed on because its worker died right after it, or reports made
        while the sweep was being stopped); the results drop those they have already."""
        if self.reports == 0 and self.resumed_report is not None:
            for past in self.lineage:
                self._send({**past, "replayed": 1})

    def announce_resumed_report(self) -> None:
        """A resumed run that had nothing left to train: send the checkpoint's reports (see `_replay`)."""
        self._replay()

    def new_checkpoint_dir(self, step: int, reported: bool = True) -> Path | None:
        # a checkpoint goes to the storage with a report; checkpoints between reports are not kept in a sweep
        if not reported:
            return None
        return Path(tempfile.mkdtemp(prefix=f"step_{step:08d}_", dir=self.scratch))

    # -- resume --------------------------------------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The checkpoint to resume from: the newer of the one Ray hands over and the newest whole one on the
        storage. Ray Train learns of a checkpoint only when its controller next polls the worker, so a worker
        that dies within that moment (seconds) after a report leaves a checkpoint on the storage that Train never
        registered, and Train would restart from an older one, or from scratch."""
        chosen = self._registered_checkpoint()
        if self.run_path and self.is_main:
            stored = complete_checkpoints(self.run_path)
            if stored and (chosen is None or stored[-1][0] > checkpoint_step(chosen[1])):
                if self.registers_checkpoints:
                    log.warning("resuming from %s, newer than the checkpoint Ray Train registered (%s)",
                                stored[-1][1], chosen[1] if chosen is not None else "none")
                chosen = (filesystem(self.run_path)[0], stored[-1][1])
        chosen = self._agree(chosen)
        if chosen is None:
            return None
        import pyarrow.fs

        fs, where = chosen
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            path = Path(where)
        else:  # an object store: the checkpoint into the scratch folder
            path = Path(download(where, self.scratch / "restored", fs))
        if (path / REPORT_FILE).exists():
            self.lineage = json.loads((path / REPORT_FILE).read_text())
            self.resumed_report = self.lineage[-1] if self.lineage else None
        return path

    def _agree(self, chosen: tuple | None) -> tuple | None:
        """Every rank resumes from rank 0's choice (one process: its own)."""
        return chosen

    # -- files ---------------------------------------------------------------------------------------------
    def _sync_tensorboard(self) -> None:
        """Copy the events and artifacts written in the scratch folder to a cloud experiment folder."""
        if self._remote_tensorboard and self._writer is not None:
            self._writer.flush()
            upload(self.tensorboard_dir, self._remote_tensorboard)
        if self._remote_artifacts and self.artifacts_dir is not None and self.artifacts_dir.exists():
            upload(self.artifacts_dir, self._remote_artifacts)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._sync_tensorboard()
        super().close()


class RayTrainContext(SweepContext):
    """The recipe's context on a Ray Train worker: rank and world from `ray.train.get_context()`, reports and
    checkpoints through `ray.train.report`, resume from `ray.train.get_checkpoint()` (or a newer whole one)."""

    def __init__(self, tensorboard_path: str, run_path: str | None = None, score_metric: str | None = None,
                 artifacts_path: str | None = None) -> None:
        import ray
        import ray.train

        train_context = ray.train.get_context()
        super().__init__(train_context.get_world_rank(), train_context.get_world_size(),
                         train_context.get_local_rank(), tensorboard_path, run_path, score_metric, artifacts_path)
        group = ray.util.get_current_placement_group()
        self.placement_group = group.id.hex() if group is not None else None
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                gathered: list = [None] * self.world_size
                dist.all_gather_object(gathered, self.node_id)
                self.worker_nodes = sorted(set(gathered))

    def gpu(self):
        import ray.train.torch

        return ray.train.torch.get_device()  # the GPU Ray assigned to this worker

    registers_checkpoints = True

    def _hand_over(self, metrics: dict, checkpoint_dir: Path | None, name: str | None) -> None:
        import ray.train

        # every rank reports (Train waits for all); only rank 0 hands over the checkpoint it wrote
        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)

    def _registered_checkpoint(self) -> tuple | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return (checkpoint.filesystem, checkpoint.path) if checkpoint is not None else None

    def _agree(self, chosen: tuple | None) -> tuple | None:
        if self.world_size <= 1:
            return chosen
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return chosen
        box = [chosen[1] if chosen is not None else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return None
        if chosen is None or chosen[1] != box[0]:
            return (filesystem(self.run_path)[0] if self.run_path else chosen[0], box[0])
        return chosen


SCRATCH_ENV = "RAYSDPB_SCRATCH_DIR"
_SCRATCH_PREFIX = "raysdpb-worker-"


def worker_scratch() -> Path:
    """A worker's scratch folder (checkpoints on their way to the storage, restored checkpoints, events
    bound for a cloud URI) under `$RAYSDPB_SCRATCH_DIR` or the system's temporary folder, named after the
    worker's pid. The worker removes it when it ends; a worker that was killed cannot, so each new worker
    first removes the folders of workers that are no longer alive (a trial killed again and again must not
    fill the disk)."""
    root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f"{_SCRATCH_PREFIX}*-*"):
        try:
            pid = int(stale.name[len(_SCRATCH_PREFIX):].split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_SCRATCH_PREFIX}{os.getpid()}-", dir=root))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def run_sweep_trial(loop_config: dict, context: SweepContext) -> None:
    """The recipe's training loop for a sweep trial in `context`, however the trial runs (a Ray Train worker, or
    Tune's trial actor); the context's scratch folder removed at the end, however it ends."""
    from raysdpb.recipe import run_trial

    try:
        result = run_trial(TrialConfig.model_validate(loop_config["trial"]), context)
        context.announce_resumed_report()  # resumed from the checkpoint of the last epoch: nothing was reported
        if result.status == "diverged":
            log.warning("trial %s diverged: %s", loop_config["trial_id"], result.message)
    finally:
        context.close()  # (again, where the loop ended early: its events flushed)
        shutil.rmtree(context.scratch, ignore_errors=True)


def train_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker of a trial: the recipe's training loop."""
    run_sweep_trial(loop_config, RayTrainContext(loop_config["tensorboard_path"], loop_config.get("run_path"),
                                                 loop_config.get("score_metric"), loop_config.get("artifacts_path")))
