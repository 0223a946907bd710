"""A sweep's results as two Parquet files, written as trials finish and complete at the end.

* `<experiment>/curves.parquet`: one row per report (`trial_id`, `step`, `epoch`, every reported metric, the
  Tune iteration and times).
* `<experiment>/trials.parquet`: one row per trial of the grid, in grid order: every config value as its own
  column (nested keys dotted, `lora.r`), `trial_id`, `label`, `status`, `message`, `stop_reason`,
  `main_metric` (the trial's own task's main metric, `eval_<metric>`; null where the sweep did not say),
  `best_<metric>` and `last_<metric>` of every reported metric, `epochs_run`, `planned_epochs`, `steps`,
  `wall_time_s` (the trial's own clock, `elapsed_s`, which its checkpoints carry across a resume), where it went
  (`time_setup_s`, `time_train_s`, `time_eval_s`, `time_checkpoint_s`), `tokens_per_s`, `mfu`, `attempts`.

Statuses: `pending` (not started yet), `running`, `completed`, `stopped_by_asha`, `diverged`, `errored`,
`interrupted` (the sweep ended before the trial did; `--resume` continues it). A failed trial keeps its row
with the error; nothing is dropped.

`schema`: the rules (statuses, main metric, direction, best trial); `storage`: where files live and how they
are written; `recorder`: the rows and the writer of one sweep.
"""

from raysdpb.results.recorder import (ResultsRecorder, TrialInfo, curve_row, finished_marker_path, format_table,
                                      read_finished_marker, summarize_trial, to_table, write_finished_marker)
from raysdpb.results.schema import (FINISHED, SCORE_KEY, STATUSES, TERMINAL, TRAIN_METRICS, best_per_method,
                                    eval_metric_keys, main_metric, metric_direction)
from raysdpb.results.storage import (exists, filesystem, join, read_json, read_rows, remove_stale_temporaries,
                                     write_json, write_table)

__all__ = [
    "STATUSES", "TERMINAL", "FINISHED", "curve_row", "metric_direction", "summarize_trial", "to_table", "write_table",
    "read_rows", "best_per_method", "format_table", "ResultsRecorder", "TrialInfo", "filesystem", "join",
    "read_json", "write_json", "remove_stale_temporaries", "finished_marker_path", "write_finished_marker",
    "read_finished_marker",
    # new with the package
    "SCORE_KEY", "TRAIN_METRICS", "main_metric", "eval_metric_keys", "exists",
]
