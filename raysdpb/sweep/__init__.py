"""A sweep on Ray: the grid of a config as Ray Tune trials, each trial a Ray Train run of the recipe.

    python -m raysdpb.sweep CONFIG [--resume] [--dry-run] [key=value ...]

The modules, in the order a sweep uses them: `grid` (the search block as trial configs with stable ids),
`plan` (metric, ASHA, storage: no Ray), `checks` (data, models, resources, the experiment folder),
`driver` (Ray, Tune, and each trial: warm, or a `TorchTrainer`), `scheduler` (ASHA per group of comparable
trials), `worker` (the recipe on a Ray Train worker), `trial_actor` (a warm single-worker trial in Tune's
actor), `callback` (Tune's events into Parquet), `trackers` (MLflow and W&B through Tune's logger callbacks,
`sweep.loggers`), `cleanup` (what ended trials leave: placement groups, checkpoints Ray Train did not delete),
`cli`.

* Ray: the cluster at `$RAY_ADDRESS` or `sweep.address` ("auto" or host:port) when set, else a local Ray
  instance with this machine's CPUs and GPUs.
* The grid (`grid`): one Tune trial per point, named by its stable trial id.
* A single-worker trial runs warm (`sweep.warm_trials`, the default): the recipe in Tune's own trial actor, which
  Tune reuses for the next trial (`trial_actor`), reserving the worker's CPUs and GPU share. Otherwise each Tune
  trial is a thin driver (`trial_driver`) that builds a `ray.train.torch.TorchTrainer` with the
  sweep's `ScalingConfig` (workers per trial, CPUs and GPUs per worker) and calls `fit()`; every worker runs
  the recipe (`raysdpb.recipe`) with a `RayTrainContext`. The driver itself reserves no CPU (only a little
  memory), so a trial's CPUs and GPUs are exactly its Train workers'; `max_concurrent_trials` follows from
  the cluster's resources. The recipe wraps DDP itself and keeps its own overlap batch sampler: Ray's
  `prepare_data_loader` is never called (it would swap the sampler for a `DistributedSampler`).
* ASHA stops weak trials on the validation metric (default: the task's main metric, `eval_<metric>`, or
  `score`, each trial's own task's main metric, when the grid's tasks differ), measured in epochs by default;
  one ASHA per group of comparable trials (`sweep.asha.group_by`; `scheduler.GroupedASHA`).
* Checkpoints: Ray Train keeps `keep_checkpoints` per trial (best by the metric, plus always the latest);
  Train and Tune retry failures up to `max_failures` times, resuming from the newest whole checkpoint on the
  storage (which can be newer than the one Train registered: see `worker.RayTrainContext.latest_checkpoint`).
  Each checkpoint holds the reports up to it, which a resumed run sends again so that Tune misses none.
  Once a trial has finished, it keeps only its best checkpoint's weights, and only if it is among the
  `keep_weights` best of its task, model and method (`cleanup`): what `python -m raysdpb.export` needs.
* What the console shows: a line per trial event and a summary line a minute (`console`); `-v` adds Tune's
  tables and the trials' own output.
* Before Ray starts (and with `--dry-run`), every local data file the trials will read is read once, and
  every model's config, so a broken file or a missing model is one error line, not a failure of every
  trial. docs/reliability.md lists the failures a sweep survives and the tests that show it.
* The experiment lives at `<storage_path>/<name>` (a local folder, or a cloud URI such as `s3://bucket/x`):
  Tune's state, `trials.parquet`, `curves.parquet`, TensorBoard events (`tensorboard --logdir` on it), and
  `train_runs/<trial_id>` (the checkpoints), `artifacts/<trial_id>/predictions/*.jsonl` (decoder trials: every
  generated answer, per evaluation) and `*.parquet` (classification trials with `save_predictions`). The name
  has no timestamp, so `--resume` finds it again: finished trials are not rerun, unfinished ones continue from
  their last checkpoint.
"""

import os

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")  # before ray.train is imported anywhere
