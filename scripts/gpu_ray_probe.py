"""What the GPU Ray check (scripts/gpu_ray_driver.py) reads from inside each trial: `ProbeRecipe`, the recipe of
tests/faults.py (`FaultyRecipe`, so the check's faults work as the reliability tests' do) that also writes, for
each Ray Train worker process, one JSON file into `$RAYSDPB_PROBE_DIR`:

* where it ran: the trial id, rank, pid, the torch device and the GPU's name;
* the precision it really ran in: the autocast dtype the recipe chose, and the dtypes the model's Linear layers
  put out during the first training step (bfloat16 under bf16 autocast);
* its step time: the wall time between the starts of consecutive training steps (data, forward, backward,
  optimizer and logging; no synchronisation added), median and mean, and the peak GPU memory.

It is put in place as the reliability tests put theirs, with `RAYSDPB_RECIPE=gpu_ray_probe:ProbeRecipe` and
scripts/ and tests/ on the workers' PYTHONPATH; the production loop is untouched."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from faults import FaultyRecipe

PROBE_ENV = "RAYSDPB_PROBE_DIR"
RECIPE = "gpu_ray_probe:ProbeRecipe"
# written after each report and every few steps: a worker killed mid-trial (by a fault, or by Tune when ASHA stops
# its trial) leaves what it had measured up to then
WRITE_EVERY_STEPS = 10


def step_time_stats(starts: list[float], gap_factor: float = 5.0) -> dict:
    """Median and mean seconds per step from the start times of consecutive steps. The gaps that hold an
    evaluation or a checkpoint (over `gap_factor` times the median) are left out of the mean and counted."""
    gaps = [b - a for a, b in zip(starts, starts[1:]) if b >= a]
    if not gaps:
        return {"steps_timed": 0, "step_time_median_s": None, "step_time_mean_s": None, "gaps_left_out": 0}
    median = statistics.median(gaps)
    kept = [g for g in gaps if g <= gap_factor * median] or gaps
    return {"steps_timed": len(kept), "step_time_median_s": median, "step_time_mean_s": sum(kept) / len(kept),
            "gaps_left_out": len(gaps) - len(kept)}


class ProbeRecipe(FaultyRecipe):
    """`FaultyRecipe` that records where and how fast each step ran (see the module's docstring)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._starts: list[float] = []
        self._linear_dtypes: set[str] = set()
        self._dtypes_seen = False
        folder = os.environ.get(PROBE_ENV)
        self._probe_path = (Path(folder) / f"probe-{os.getpid()}-{time.time_ns()}.json") if folder else None

    def train_step(self, batch):
        self._starts.append(time.perf_counter())
        if self._dtypes_seen:
            if len(self._starts) % WRITE_EVERY_STEPS == 0:
                self._write()
            return super().train_step(batch)
        hooks = [m.register_forward_hook(self._record_dtype) for m in self.model.modules()
                 if isinstance(m, torch.nn.Linear)]
        try:
            return super().train_step(batch)
        finally:
            for hook in hooks:
                hook.remove()
            self._dtypes_seen = True
            self._write()

    def _record_dtype(self, module, inputs, output) -> None:
        if isinstance(output, torch.Tensor):
            self._linear_dtypes.add(str(output.dtype).replace("torch.", ""))

    def train(self):
        try:
            return super().train()
        finally:
            self._write()

    def report(self, *args, **kwargs) -> None:
        self._write()  # before the report that may get the trial stopped
        super().report(*args, **kwargs)

    def probe(self) -> dict:
        device = self.device
        cuda = device.type == "cuda"
        autocast = self.autocast.keywords.get("dtype") if self.autocast is not None else None
        run_path = getattr(self.context, "run_path", None)
        return {
            "trial_id": os.path.basename(str(run_path).rstrip("/")) if run_path else None,
            "method": self.cfg.method, "lr": self.cfg.lr, "seed": self.cfg.seed,
            "rank": self.context.rank, "world_size": self.context.world_size, "pid": os.getpid(),
            "device": str(device), "gpu_name": torch.cuda.get_device_name(device) if cuda else None,
            "autocast_dtype": str(autocast).replace("torch.", "") if autocast is not None else None,
            "grad_scaler": bool(self.needs_scaler), "linear_output_dtypes": sorted(self._linear_dtypes),
            "steps": self.step, **step_time_stats(self._starts),
            "peak_gpu_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None,
            "torch_threads": torch.get_num_threads(),
        }

    def _write(self) -> None:
        if self._probe_path is None:
            return
        tmp = self._probe_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.probe(), indent=1))
        os.replace(tmp, self._probe_path)
