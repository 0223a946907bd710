"""The report's numbers as pure functions of the trials (and curves) frames: no files, no plots.

The frames are `trials.parquet` and `curves.parquet` as pandas reads them (`raysdpb.results` writes them);
`prepare` adds the few columns every other function here works on:

* `_column`: the table column a trial belongs to: its task, or `<model> / <task>` when the trials come
  from more than one model;
* `_metric` / `_value`: the trial's main validation metric (`eval_accuracy`, `eval_matthews`, ...; see
  `trial_metric`) and the trial's value of it (`best_<metric>`: the best value over the trial's reports, or
  `last_<metric>`); both empty where the metric cannot be told;
* `_seed`, `_config` (the configuration: every config value but the seed, as a hashable key) and
  `_finished` (completed, stopped by ASHA or diverged: the trials the tables use).

`select_configs` picks, per column and method, the configuration with the best mean over seeds; the
results table, the paired comparisons, the heatmaps and the curves all start from that choice. The rules
(statuses, main metric, direction) are `raysdpb.results.schema`'s; the methods' order is the registry's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any, Iterable

import numpy as np
import pandas as pd

from raysdpb.config import evaluated_splits
from raysdpb.methods import METHODS
from raysdpb.report.stats import holm_adjusted
from raysdpb.results import schema
from raysdpb.tasks import TASKS

__all__ = [
    "BASELINES", "Table", "Grid", "config_columns", "trial_metric", "prepare", "method_order", "select_configs",
    "results_table", "selection_table", "cost_table", "compute_costs", "compute_table", "alpha_tau_grid",
    "paired_comparisons", "holm_adjusted",
    "comparison_table", "format_value", "value_scale",
]

BASELINES = ("finetune", "double_finetune")

# trial-row columns that are not config values (raysdpb.results.summarize_trial)
_BOOKKEEPING = frozenset({
    "trial_id", "label", "status", "message", "stop_reason", "main_metric", "best_epoch", "epochs_run",
    "planned_epochs", "steps", "reports", "wall_time_s", "attempts", "finished_at", "experiment",
    "samples_seen", "tokens_per_s", "mfu", *schema.PHASE_TIME_KEYS,
})
# config keys that are not part of "the configuration": what the table's rows and columns already are and the
# seeds (averaged over); the keys that do not change what is trained (raysdpb.config.NOT_HASHED) come with the
# config model
_NOT_CONFIG = frozenset({"method", "task", "model", "seed", "data_seed"})


@dataclass
class Table:
    """A table ready to render: header, cells as text, the (row, column) cells shown in bold."""

    columns: list[str]
    rows: list[list[str]]
    bold: set[tuple[int, int]] = field(default_factory=set)


# --- which columns, which metric ---------------------------------------------------------------------------

def _config_fields() -> tuple[frozenset[str] | None, frozenset[str]]:
    """The trial config's fields and those of them that do not change what is trained (None and empty where
    the config model cannot be imported)."""
    try:
        from raysdpb.config import NOT_HASHED, TrialConfig
    except Exception:  # noqa: BLE001 - the report also works where the config model cannot be imported
        return None, frozenset()
    return frozenset(TrialConfig.model_fields), NOT_HASHED


def config_columns(trials: pd.DataFrame) -> list[str]:
    """The columns that make a trial's configuration: config values (nested ones dotted: `lora.r`) other
    than method, task, model, seed and the keys that do not change what is trained (paths, progress bar,
    gradient checkpointing)."""
    fields, not_trained = _config_fields()
    skipped = _NOT_CONFIG | not_trained
    out = []
    for name in trials.columns:
        name = str(name)
        if name.startswith(("best_", "last_", "_")) or name in _BOOKKEEPING or name in skipped:
            continue
        if fields is not None and name.split(".")[0] not in fields:
            continue
        out.append(name)
    return out


def trial_metric(main_metric: Any, task: Any, eval_split: Any = None, heldout_dev: bool | str = False) -> str | None:
    """A trial's main metric: its `main_metric` column (the sweep wrote its task's); without one, the rule of
    `raysdpb.results.schema.main_metric` for a registered task; else None: a custom or unknown task's metric
    cannot be told, and guessing `eval_accuracy` would score the trial by a metric it may not report."""
    if isinstance(main_metric, str) and main_metric:
        return main_metric
    spec = TASKS.get(task) if isinstance(task, str) else None
    if spec is None:
        return None
    return schema.main_metric(spec, eval_split if isinstance(eval_split, str) and eval_split else None, heldout_dev)


def method_order(methods: Iterable[str]) -> list[str]:
    """The methods in the registry's order (`raysdpb.methods.METHODS` registers the paper's rows in its
    order, docs/method.md section 5), then those not registered, by name."""
    methods = list(dict.fromkeys(methods))
    known = [m for m in METHODS if m in methods]
    return known + sorted(m for m in methods if m not in METHODS)


def _direction(metric: str) -> str:
    return schema.metric_direction(metric) or "max"


def _hashable(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (list, dict, np.ndarray)):
        return repr(value)
    if isinstance(value, np.generic):
        return value.item()
    return value


def _model_name(model: Any) -> str:
    return PurePath(str(model)).name or str(model)


def on_validation(metric: str | None) -> str | None:
    """A main metric on the task's validation split: `eval_dev_<m>` (a trial that holds a dev split out is
    selected on it) becomes `eval_<m>`; any other stays as it is."""
    dev = "eval_dev_"
    return "eval_" + metric[len(dev):] if isinstance(metric, str) and metric.startswith(dev) else metric


def prepare(trials: pd.DataFrame, *, metric: str | None = None, at: str = "best",
            validation: bool = False) -> pd.DataFrame:
    """The trials with `_column`, `_metric`, `_value`, `_seed`, `_config`, `_finished`, `_cut_short` added (a copy).

    `metric`: one metric for every trial (default: each task's main metric, on the held-out dev split for a
    trial that holds one out). `at`: "best" (the best value over the trial's reports, `best_<metric>`) or "last"
    (`last_<metric>`: a score at the end of the trial's budget, so a trial that ASHA stopped has none under "last",
    `_cut_short`). `validation`: each task's main metric on its validation split even where the trial holds a
    dev split out (final scores, after selection on dev: protocol v2's stage 2)."""
    df = trials.copy().reset_index(drop=True)
    if "method" not in df:
        df["method"] = "(method)"
    df["method"] = df["method"].astype(str)
    tasks = df["task"].astype(str) if "task" in df else pd.Series("(task)", index=df.index)
    if "model" in df and df["model"].nunique(dropna=True) > 1:
        df["_column"] = [f"{_model_name(m)} / {t}" for m, t in zip(df["model"], tasks)]
    else:
        df["_column"] = tasks
    if metric:
        df["_metric"] = metric
    else:
        none = pd.Series(None, index=df.index, dtype=object)
        own = df["main_metric"] if "main_metric" in df else none
        eval_split = df["eval_split"] if "eval_split" in df else none
        # a trial with a held-out dev split has its `heldout_dev.size` column set, and what it evaluated in
        # `heldout_dev.evaluate` (raysdpb.config.evaluated_splits)
        heldout = df["heldout_dev.size"].notna() if "heldout_dev.size" in df else pd.Series(False, index=df.index)
        evaluated = df["heldout_dev.evaluate"] if "heldout_dev.evaluate" in df else none
        modes = [evaluated_splits(h, e if isinstance(e, str) else None) for h, e in zip(heldout, evaluated)]
        metrics = [trial_metric(m, t, s, h) for m, t, s, h in zip(own, tasks, eval_split, modes)]
        if validation:
            metrics = [on_validation(m) for m in metrics]
        df["_metric"] = pd.Series(metrics, index=df.index, dtype=object)
    values = []
    for i, name in enumerate(df["_metric"]):
        column = f"{at}_{name}"
        values.append(df.at[i, column] if isinstance(name, str) and column in df else None)
    df["_value"] = pd.to_numeric(pd.Series(values, index=df.index, dtype=object), errors="coerce")
    df.loc[~np.isfinite(df["_value"].astype(float)), "_value"] = np.nan
    # "last" scores a trial at its budget's end: a trial ASHA stopped ended early, so its last report is no score
    # of that kind (it would be set against the others' final ones); it keeps its place in the cost table
    status = df["status"].astype(str) if "status" in df else pd.Series("completed", index=df.index)
    df["_cut_short"] = (status == "stopped_by_asha") & (at == "last")
    df.loc[df["_cut_short"], "_value"] = np.nan
    df["_seed"] = df["seed"] if "seed" in df else 0
    if "data_seed" in df:  # a data order seeded apart from the initialisation: a seed is the pair (seed/data_seed)
        data = df["data_seed"].where(df["data_seed"].notna(), df["_seed"])
        if (data != df["_seed"]).any():
            df["_seed"] = [f"{_short(s)}/{_short(d)}" for s, d in zip(df["_seed"], data)]
    columns = config_columns(trials)
    df["_config"] = [tuple((c, _hashable(v)) for c, v in zip(columns, row))
                     for row in df[columns].itertuples(index=False, name=None)] if columns else [()] * len(df)
    df["_finished"] = status.isin(schema.FINISHED)
    return df


def _varying(configs: Iterable[tuple]) -> list[str]:
    """The config keys whose value differs between these configurations."""
    seen: dict[str, set] = {}
    for config in configs:
        for key, value in config:
            seen.setdefault(key, set()).add(repr(value))
    return [k for k, values in seen.items() if len(values) > 1]


def _label(config: tuple, keys: list[str]) -> str:
    values = dict(config)
    shown = [f"{k}={_short(values.get(k))}" for k in keys]
    return ", ".join(shown) if shown else "(one configuration)"


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --- the best configuration per method ---------------------------------------------------------------------

def select_configs(prepared: pd.DataFrame) -> pd.DataFrame:
    """Per (column, method): the configuration with the best mean of `_value` over its seeds, among the
    finished trials with a value. Ties go to the configuration with more seeds, then to the one whose first
    trial comes first in the frame (grid order, as `raysdpb.results.schema.best_per_method` breaks ties).

    Columns: `column`, `method`, `metric`, `config` (the key), `label` (the searched values that pick it out),
    `mean`, `std` (sample std over seeds, ddof=1; NaN for one seed), `n` (trials at this configuration),
    `seeds` (seed -> value; several trials of one seed are averaged), `trial_ids`, `best_trial_id` (its
    best seed's trial), `n_trials` (finished trials searched in this cell), `n_configs`."""
    rows = []
    usable = prepared[prepared["_finished"] & prepared["_value"].notna()]
    for (column, method), group in usable.groupby(["_column", "method"], sort=False):
        metric = group["_metric"].iloc[0]
        better = _direction(metric)
        keys = _varying(group["_config"])
        candidates = []
        for config, trials in group.groupby("_config", sort=False):
            seeds = trials.groupby("_seed", sort=True, dropna=False)["_value"].mean()
            values = trials["_value"].to_numpy(dtype=float)
            mean = float(values.mean())
            candidates.append((config, trials, seeds, mean, _label(config, keys)))
        sign = 1.0 if better == "max" else -1.0
        config, trials, seeds, mean, label = min(
            candidates, key=lambda c: (-sign * c[3], -len(c[1]), c[1].index.min()))
        values = trials["_value"].to_numpy(dtype=float)
        pick = trials["_value"].idxmax() if better == "max" else trials["_value"].idxmin()
        rows.append({
            "column": column, "method": method, "metric": metric, "config": config, "label": label,
            "mean": mean, "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "n": len(values), "seeds": {_hashable(k): float(v) for k, v in seeds.items()},
            "trial_ids": list(trials["trial_id"]) if "trial_id" in trials else [],
            "best_trial_id": trials.at[pick, "trial_id"] if "trial_id" in trials else None,
            "n_trials": len(group), "n_configs": len(candidates),
        })
    columns = ["column", "method", "metric", "config", "label", "mean", "std", "n", "seeds", "trial_ids",
               "best_trial_id", "n_trials", "n_configs"]
    out = pd.DataFrame(rows, columns=columns)
    if len(out):
        order = {m: i for i, m in enumerate(method_order(out["method"]))}
        out = out.sort_values(["column", "method"], key=lambda s: s.map(order) if s.name == "method" else s,
                              kind="stable").reset_index(drop=True)
    return out


def value_scale(selection: pd.DataFrame) -> float:
    """100 when every value is a validation score in [-1, 1] (shown as the paper does, in points), else 1."""
    if not len(selection):
        return 1.0
    metrics_ok = all(str(m).startswith("eval_") for m in selection["metric"])
    values = selection["mean"].to_numpy(dtype=float)
    return 100.0 if metrics_ok and np.all(np.abs(values[np.isfinite(values)]) <= 1.0) else 1.0


def format_value(mean: float, std: float, scale: float = 1.0) -> str:
    digits = 2 if scale == 100.0 else 4
    text = f"{mean * scale:.{digits}f}"
    if std is not None and np.isfinite(std):
        text += f" ± {std * scale:.{digits}f}"
    return text


def results_table(selection: pd.DataFrame, scale: float | None = None) -> Table:
    """Methods as rows, columns (tasks, or model / task) as columns; each cell `mean ± std (n=k/N)`: k trials
    (seeds) at the selected configuration, of N finished trials searched; the best mean per column in bold."""
    scale = value_scale(selection) if scale is None else scale
    columns = list(dict.fromkeys(selection["column"]))
    methods = method_order(selection["method"])
    metric_of = {c: selection.loc[selection["column"] == c, "metric"].iloc[0] for c in columns}
    header = ["method"] + [f"{c} ({metric_of[c]})" for c in columns]
    rows, bold = [], set()
    cells = {(r.column, r.method): r for r in selection.itertuples(index=False)}
    for i, method in enumerate(methods):
        row = [method]
        for j, column in enumerate(columns):
            cell = cells.get((column, method))
            row.append("—" if cell is None else
                       f"{format_value(cell.mean, cell.std, scale)} (n={cell.n}/{cell.n_trials})")
        rows.append(row)
    for j, column in enumerate(columns):
        here = selection[selection["column"] == column]
        better = _direction(metric_of[column])
        best = here["mean"].max() if better == "max" else here["mean"].min()
        for method in here.loc[np.isclose(here["mean"], best, rtol=0, atol=1e-12), "method"]:
            bold.add((methods.index(method), j + 1))
    return Table(header, rows, bold)


def selection_table(selection: pd.DataFrame) -> Table:
    """Which configuration each cell of the results table is, and over which seeds."""
    rows = []
    for r in selection.itertuples(index=False):
        seeds = ", ".join(_short(s) for s in r.seeds)
        rows.append([r.column, r.method, r.label, seeds, f"{r.n_configs}", str(r.best_trial_id)])
    return Table(["column", "method", "selected configuration", "seeds", "configurations searched",
                  "best trial (curves)"], rows)


# --- the cost ---------------------------------------------------------------------------------------------

def _gpus_per_trial(trials: pd.DataFrame) -> tuple[pd.Series | None, str]:
    """GPUs each trial held, from whatever columns say so, and which columns those were."""
    for name in ("gpus_per_trial", "last_gpus_per_trial", "sweep.gpus_per_trial"):
        if name in trials:
            return pd.to_numeric(trials[name], errors="coerce"), name
    per_worker = next((n for n in ("gpus_per_worker", "sweep.gpus_per_worker", "last_gpus_per_worker")
                       if n in trials), None)
    workers = next((n for n in ("num_workers", "sweep.num_workers", "last_world_size") if n in trials), None)
    if per_worker and workers:
        gpus = pd.to_numeric(trials[per_worker], errors="coerce") * pd.to_numeric(trials[workers], errors="coerce")
        use_gpu = next((n for n in ("use_gpu", "sweep.use_gpu", "last_use_gpu") if n in trials), None)
        if use_gpu:
            gpus = gpus.where(trials[use_gpu].fillna(False).astype(bool), 0.0)
        return gpus, f"{per_worker} × {workers}" + (f" (where {use_gpu})" if use_gpu else "")
    return None, ""


def _median(values: pd.Series, fmt: str) -> str:
    values = values.dropna()
    return fmt.format(float(values.median())) if len(values) else "—"


def cost_table(prepared: pd.DataFrame) -> tuple[Table, list[str]]:
    """Per method, over every trial of the sweep(s) (whatever its status: it held its workers): trials by
    status, epochs run against epochs planned (what ASHA saved), trial-hours (wall time), worker-hours
    (wall time × workers per trial), GPU-hours (wall time × GPUs per trial, when the columns say how many)."""
    notes = []
    df = prepared
    wall = pd.to_numeric(df["wall_time_s"], errors="coerce").fillna(0.0) if "wall_time_s" in df else None
    run = pd.to_numeric(df["epochs_run"], errors="coerce").fillna(0.0) if "epochs_run" in df else None
    planned = pd.to_numeric(df["planned_epochs"], errors="coerce") if "planned_epochs" in df else None
    workers = pd.to_numeric(df["last_world_size"], errors="coerce") if "last_world_size" in df else None
    gpus, gpu_source = _gpus_per_trial(df)
    rate = pd.to_numeric(df["tokens_per_s"], errors="coerce") if "tokens_per_s" in df else None
    util = pd.to_numeric(df["mfu"], errors="coerce") if "mfu" in df else None
    if util is not None and util.isna().all():
        util = None
    status = df["status"] if "status" in df else pd.Series("completed", index=df.index)
    header = ["method", "trials", "completed", "stopped by ASHA", "other"]
    if run is not None:
        header += ["epochs run", "epochs planned", "saved by ASHA"] if planned is not None else ["epochs run"]
    if wall is not None:
        header += ["trial-hours", "mean min/trial"]
        if workers is not None:
            header += ["worker-hours"]
        if gpus is not None:
            header += ["GPU-hours"]
    if rate is not None:
        header += ["median tokens/s"] + (["median MFU"] if util is not None else [])
    if run is not None and planned is not None:
        # what ASHA saved: the epochs its stopped trials did not run (not those of trials that have not run yet)
        saved_epochs = (planned.fillna(0) - run).clip(lower=0).where(status == "stopped_by_asha", 0.0)
    rows = []
    totals = {"trials": 0, "run": 0.0, "planned": 0.0, "saved": 0.0, "wall": 0.0, "ran": 0, "worker": 0.0,
              "gpu": 0.0}
    for method in method_order(df["method"]):
        m = df["method"] == method
        n = int(m.sum())
        completed = int((status[m] == "completed").sum())
        asha = int((status[m] == "stopped_by_asha").sum())
        other = status[m][~status[m].isin(["completed", "stopped_by_asha"])].value_counts()
        row = [method, str(n), str(completed), str(asha),
               ", ".join(f"{k} {v}" for k, v in other.items()) or "0"]
        totals["trials"] += n
        if run is not None:
            r = float(run[m].sum())
            totals["run"] += r
            row.append(f"{r:g}")
            if planned is not None:
                p = float(planned[m].fillna(0).sum())
                saved = float(saved_epochs[m].sum())
                totals["planned"] += p
                totals["saved"] += saved
                row += [f"{p:g}", f"{100 * saved / p:.0f}%" if p > 0 else "—"]
        if wall is not None:
            w = float(wall[m].sum())
            ran = int((wall[m] > 0).sum())
            totals["wall"] += w
            totals["ran"] += ran
            row += [f"{w / 3600:.3f}", f"{w / 60 / ran:.2f}" if ran else "—"]
            if workers is not None:
                wh = float((wall[m] * workers[m].fillna(1)).sum())
                totals["worker"] += wh
                row.append(f"{wh / 3600:.3f}")
            if gpus is not None:
                g = float((wall[m] * gpus[m].fillna(0)).sum())
                totals["gpu"] += g
                row.append(f"{g / 3600:.3f}")
        if rate is not None:
            row += [_median(rate[m], "{:.0f}")] + ([_median(100 * util[m], "{:.1f}%")] if util is not None else [])
        rows.append(row)
    if len(rows) > 1:
        row = ["total", str(totals["trials"]), str(int((status == "completed").sum())),
               str(int((status == "stopped_by_asha").sum())),
               str(int((~status.isin(["completed", "stopped_by_asha"])).sum()))]
        if run is not None:
            row.append(f"{totals['run']:g}")
            if planned is not None:
                p = totals["planned"]
                row += [f"{p:g}", f"{100 * totals['saved'] / p:.0f}%" if p > 0 else "—"]
        if wall is not None:
            row += [f"{totals['wall'] / 3600:.3f}",
                    f"{totals['wall'] / 60 / totals['ran']:.2f}" if totals["ran"] else "—"]
            if workers is not None:
                row.append(f"{totals['worker'] / 3600:.3f}")
            if gpus is not None:
                row.append(f"{totals['gpu'] / 3600:.3f}")
        if rate is not None:
            row += [_median(rate, "{:.0f}")] + ([_median(100 * util, "{:.1f}%")] if util is not None else [])
        rows.append(row)
    if wall is None:
        notes.append("No hours: the trials have no `wall_time_s` column.")
    else:
        notes.append("Trial-hours are the trials' wall times (`wall_time_s`: the trial's own clock at its last "
                     "report, set-up, training and evaluation over every attempt) in hours.")
        if workers is not None:
            notes.append("Worker-hours are wall time × the Ray Train workers the trial ran (`last_world_size`): "
                         "the CPU or GPU slots it held.")
        if gpus is not None:
            notes.append(f"GPU-hours are wall time × GPUs per trial ({gpu_source}).")
        else:
            notes.append("No GPU-hours: trials.parquet does not say how many GPUs a trial held (no "
                         "`gpus_per_trial`, or `gpus_per_worker` with `use_gpu` and a worker count, column).")
    if rate is not None:
        notes.append("Tokens/s: each trial's non-padding training tokens (all workers) per second of training "
                     "(evaluation and checkpoints left out); MFU: that many tokens x (4N + 2N trainable) FLOPs a token "
                     "over the peak of the trial's GPUs (N: the parameters that multiply; raysdpb.throughput). "
                     "Medians over the trials that report them." + ("" if util is not None else
                                                                    " No MFU: no trial ran on a GPU of known peak "
                                                                    "(set $RAYSDPB_PEAK_FLOPS)."))
    if run is not None and planned is not None:
        notes.append("Epochs planned are each trial's epochs × the method's epoch multiplier (double_finetune "
                     "runs twice as many); \"saved by ASHA\" is the share of the planned epochs that the trials ASHA "
                     "stopped did not run. \"mean min/trial\" is over the trials that ran.")
    return Table(header, rows), notes


def _per_trial(frame: pd.DataFrame, name: str, default: float) -> pd.Series:
    values = pd.to_numeric(frame[name], errors="coerce") if name in frame else pd.Series(default, index=frame.index)
    return values.fillna(default).astype(float)


def teacher_passes_of(trials: pd.DataFrame, method: str, batched: pd.Series) -> tuple[pd.Series, bool]:
    """Per trial, the teacher forward passes its soft targets took: `last_teacher_table_passes` (the recipe's
    `teacher_table_passes`, one per training example, whichever trial computed the cached table); for a teacher
    method's row from before that column, one epoch's examples (`batched`, the examples its steps took, over the
    epochs run), and True (estimated). 0 for a method without a separate teacher."""
    spec = METHODS.get(method)
    if spec is None or getattr(spec, "soft_targets", None) != "teacher":
        return pd.Series(0.0, index=trials.index), False
    recorded = _per_trial(trials, "last_teacher_table_passes", float("nan"))
    missing = recorded.isna()
    if not missing.any():
        return recorded, False
    per_epoch = batched / _per_trial(trials, "epochs_run", float("nan")).where(lambda e: e > 0)
    return recorded.where(~missing, per_epoch).fillna(0.0), True


def compute_costs(prepared: pd.DataFrame, selection: pd.DataFrame) -> pd.DataFrame:
    """Per (column, method), at its selected configuration, the mean per trial (over its seeds) of what it spent:

    * `steps`: optimizer steps (trials.parquet's `steps`, the last report's step);
    * `forward_passes`: examples through the student, steps x batch_size x ranks (`last_world_size`, default 1)
      x the method's `forward_passes` (a `Method` field: 2 for a method that runs each batch twice, e.g.
      R-Drop; 1 where the registry does not say); an overlap method's step is a full batch, half of it the
      previous batch's second half, so it counts as batch_size passes;
    * `teacher_passes`: examples through a separate teacher for the trial's soft targets (`teacher_passes_of`):
      one per training example, computed once and shared through the cache, so counted for every trial that
      distils from them (what one such run costs on its own); 0 for a method without a teacher;
      `teacher_estimated`: some of them estimated (rows from before the column);
    * `total_passes` (student + teacher) and `wall_s` (`wall_time_s`, the trial's own clock);

    with the score (`mean`, `std`) of `selection` and `n`, the trials averaged."""
    rows = []
    by_id = prepared.set_index("trial_id") if "trial_id" in prepared else None
    for r in selection.itertuples(index=False):
        if by_id is None or not r.trial_ids:
            continue
        trials = by_id.loc[[t for t in r.trial_ids if t in by_id.index]]
        per_pass = float(getattr(METHODS.get(r.method), "forward_passes", 1) or 1)
        steps = _per_trial(trials, "steps", 0.0)
        batched = steps * _per_trial(trials, "batch_size", float("nan")) * _per_trial(trials, "last_world_size", 1.0)
        passes = batched * per_pass
        teacher, estimated = teacher_passes_of(trials, r.method, batched)
        wall = _per_trial(trials, "wall_time_s", float("nan"))
        rows.append({"column": r.column, "method": r.method, "metric": r.metric, "mean": r.mean, "std": r.std,
                     "n": len(trials), "steps": float(steps.mean()), "forward_passes": float(passes.mean()),
                     "forward_passes_per_step": per_pass, "teacher_passes": float(teacher.mean()),
                     "teacher_estimated": estimated, "total_passes": float((passes + teacher).mean()),
                     "wall_s": float(wall.mean())})
    columns = ["column", "method", "metric", "mean", "std", "n", "steps", "forward_passes", "forward_passes_per_step",
               "teacher_passes", "teacher_estimated", "total_passes", "wall_s"]
    return pd.DataFrame(rows, columns=columns)


def _count(value: float) -> str:
    if not np.isfinite(value):
        return "—"
    return f"{value / 1e6:.2f}M" if abs(value) >= 1e6 else f"{value:,.0f}"


def compute_table(costs: pd.DataFrame, scale: float = 1.0) -> Table:
    """The cost column next to the score: per column and method (selected configuration, mean per trial),
    score, optimizer steps, student forward passes, teacher passes, their total relative to finetune's (or to
    the column's smallest), and wall minutes per trial."""
    rows = []
    for column, here in costs.groupby("column", sort=False):
        base = here.loc[here["method"] == "finetune", "total_passes"]
        reference = float(base.iloc[0]) if len(base) else float(here["total_passes"].min())
        for r in here.itertuples(index=False):
            relative = f"{r.total_passes / reference:.2f}x" if reference > 0 and np.isfinite(r.total_passes) else "—"
            teacher = ("~" if r.teacher_estimated else "") + _count(r.teacher_passes)
            rows.append([column, r.method, format_value(r.mean, r.std, scale), f"{r.steps:,.0f}",
                         _count(r.forward_passes), teacher, relative,
                         f"{r.wall_s / 60:.1f}" if np.isfinite(r.wall_s) else "—"])
    return Table(["column", "method", "score", "optimizer steps", "forward passes", "teacher passes",
                  "passes vs finetune", "wall min/trial"], rows)


# --- the alpha x tau grid ------------------------------------------------------------------------------------

@dataclass
class Grid:
    """A heatmap's numbers: `mean[i, j]` and `n[i, j]` at `tau[i]`, `alpha[j]`, and what was averaged over."""

    column: str
    method: str
    metric: str
    alpha: list[float]
    tau: list[float]
    mean: np.ndarray
    n: np.ndarray
    seeds: list[Any]
    others: dict[str, list[Any]]   # other config keys that vary in this cell, with their values


def alpha_tau_grid(prepared: pd.DataFrame) -> tuple[list[Grid], list[str]]:
    """Per (column, method) whose finished trials ran more than one alpha or tau: the mean of `_value` at each
    (tau, alpha), over seeds and over every other searched key. Also the (column, method) pairs without a
    grid, as sentences."""
    grids, missing = [], []
    if "alpha" not in prepared or "tau" not in prepared:
        return [], ["the trials have no alpha and tau columns"]
    usable = prepared[prepared["_finished"] & prepared["_value"].notna()]
    for (column, method), group in usable.groupby(["_column", "method"], sort=False):
        alphas = sorted(pd.to_numeric(group["alpha"], errors="coerce").dropna().unique())
        taus = sorted(pd.to_numeric(group["tau"], errors="coerce").dropna().unique())
        if len(alphas) < 2 and len(taus) < 2:
            missing.append(f"{method} on {column}")
            continue
        mean = np.full((len(taus), len(alphas)), np.nan)
        n = np.zeros((len(taus), len(alphas)), dtype=int)
        for (tau, alpha), cell in group.groupby(["tau", "alpha"]):
            i, j = taus.index(tau), alphas.index(alpha)
            mean[i, j] = cell["_value"].mean()
            n[i, j] = len(cell)
        others = {}
        for key in _varying(group["_config"]):
            if key in ("alpha", "tau"):
                continue
            others[key] = sorted({dict(c)[key] for c in group["_config"]}, key=lambda v: (v is None, str(v)))
        seeds = sorted(group["_seed"].dropna().unique().tolist())
        grids.append(Grid(column, method, group["_metric"].iloc[0], [float(a) for a in alphas],
                          [float(t) for t in taus], mean, n, seeds, others))
    order = {m: i for i, m in enumerate(method_order(usable["method"]))}
    grids.sort(key=lambda g: (g.column, order.get(g.method, 99)))
    return grids, missing


# --- paired comparisons ----------------------------------------------------------------------------------

def paired_comparisons(selection: pd.DataFrame, baselines: Iterable[str] = BASELINES,
                       min_seeds: int = 3) -> pd.DataFrame:
    """Each method against each baseline present in the same column, both at their selected configuration,
    paired by seed: `shared` seeds, `mean_diff` (method − baseline), wins/ties/losses, `p` of a paired
    t-test (`scipy.stats.ttest_rel`, two-sided) when at least `min_seeds` seeds are shared (else NaN, with
    `why`), and `p_holm`, `p` Holm-adjusted over the comparisons of the same column (one family per task
    and metric)."""
    from scipy import stats

    rows = []
    for column, here in selection.groupby("column", sort=False):
        done: set[tuple[str, str]] = set()  # finetune vs double_finetune once, not again the other way round
        cells = {r.method: r for r in here.itertuples(index=False)}
        for baseline in baselines:
            if baseline not in cells:
                continue
            base = cells[baseline]
            for method in method_order(cells):
                if method == baseline or (method in BASELINES and (baseline, method) in done):
                    continue
                done.add((method, baseline))
                cell = cells[method]
                shared = [s for s in cell.seeds if s in base.seeds]
                a = np.array([cell.seeds[s] for s in shared], dtype=float)
                b = np.array([base.seeds[s] for s in shared], dtype=float)
                diff = a - b
                p, why = float("nan"), ""
                if len(shared) < min_seeds:
                    why = f"needs ≥{min_seeds} shared seeds"
                elif np.allclose(diff, diff[0], rtol=0, atol=1e-12):
                    why = "no variance: every seed's difference is the same"
                else:
                    p = float(stats.ttest_rel(a, b).pvalue)
                rows.append({
                    "column": column, "method": method, "baseline": baseline, "metric": cell.metric,
                    "shared": len(shared), "seeds": shared,
                    "mean_diff": float(diff.mean()) if len(diff) else float("nan"),
                    "wins": int((diff > 1e-12).sum()), "ties": int((np.abs(diff) <= 1e-12).sum()),
                    "losses": int((diff < -1e-12).sum()), "p": p, "why": why,
                })
    columns = ["column", "method", "baseline", "metric", "shared", "seeds", "mean_diff", "wins", "ties", "losses",
               "p", "p_holm", "why"]
    out = pd.DataFrame(rows, columns=columns)
    out["p_holm"] = out.groupby("column", sort=False)["p"].transform(holm_adjusted).astype(float)
    return out


def comparison_table(comparisons: pd.DataFrame, scale: float = 1.0) -> Table:
    digits = 2 if scale == 100.0 else 4
    rows, bold = [], set()
    for i, r in enumerate(comparisons.itertuples(index=False)):
        diff = "—" if not np.isfinite(r.mean_diff) else f"{r.mean_diff * scale:+.{digits}f}"
        p = f"{r.p:.3g}" if np.isfinite(r.p) else f"n/a ({r.why})"
        holm = f"{r.p_holm:.3g}" if np.isfinite(r.p_holm) else "n/a"
        rows.append([r.column, r.method, r.baseline, str(r.shared), diff, f"{r.wins}/{r.ties}/{r.losses}", p, holm])
        if np.isfinite(r.p_holm) and r.p_holm < 0.05:
            bold.add((i, 7))
    return Table(["column", "method", "vs", "shared seeds", "mean difference", "wins/ties/losses", "p (paired t)",
                  "p (Holm)"], rows, bold)
