"""Recording a sweep: each trial's reports as curve rows, its summary row, and `ResultsRecorder`, which keeps
the rows of one sweep (and reloads them on `--resume`) and writes trials.parquet and curves.parquet atomically
(`raysdpb.results.storage`). The rows are built by pure functions over plain dicts. No Ray here: the Tune
callback in `raysdpb.sweep` only forwards Tune's events.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import pyarrow as pa

from raysdpb.results.schema import FINISHED, PHASE_TIME_KEYS, TERMINAL, is_number, metric_direction
from raysdpb.results.storage import join, read_json, read_rows, remove_stale_temporaries, write_json, write_table

__all__ = [
    "TrialInfo", "curve_row", "summarize_trial", "to_table", "ResultsRecorder", "finished_marker_path",
    "write_finished_marker", "read_finished_marker", "format_table",
]

# what Tune adds to every result that is about the trial process, not the training
_TUNE_BOOKKEEPING = frozenset({
    "config", "date", "hostname", "node_ip", "pid", "done", "trial_id", "experiment_tag", "should_checkpoint",
    "iterations_since_restore", "time_since_restore", "timesteps_total", "episodes_total",
    "timesteps_since_restore", "warmup_time", "checkpoint_dir_name",
    "worker_placement_group",  # the sweep's own bookkeeping (raysdpb.sweep.cleanup)
})
# curve columns that are not metrics (no best_/last_ columns for them)
_NOT_METRICS = frozenset({
    "trial_id", "epoch", "step", "samples_seen", "tokens_per_s", "mfu", "training_iteration", "timestamp",
    "time_this_iter_s", "time_total_s",
    "checkpoint_path", "status", "message", "replayed", "elapsed_s", *PHASE_TIME_KEYS,
})


# A trial that finished leaves `<experiment>/finished/<trial_id>.json` with its status and last result: a sweep
# resumed after its Tune state was lost announces that result instead of training the trial again.
def finished_marker_path(experiment_path: str, trial_id: str) -> str:
    return join(experiment_path, "finished", f"{trial_id}.json")


def write_finished_marker(experiment_path: str, trial_id: str, status: str, last_result: dict) -> None:
    write_json(finished_marker_path(experiment_path, trial_id), {"status": status, "last_result": last_result})


def read_finished_marker(experiment_path: str, trial_id: str) -> dict | None:
    """The marker `{"status", "last_result"}` of a finished trial, None if it has not finished."""
    return read_json(finished_marker_path(experiment_path, trial_id))


# --- rows ------------------------------------------------------------------------------------------------

def _plain(value: Any) -> Any:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return value.item()
    return value


def curve_row(trial_id: str, result: dict) -> dict:
    """One report of a trial as a curve row: Tune's per-process bookkeeping dropped, nested values as JSON."""
    row = {"trial_id": trial_id}
    for key, value in result.items():
        if key in _TUNE_BOOKKEEPING or key.startswith("config/"):
            continue
        row[key] = _plain(value)
    return row


@dataclass
class TrialInfo:
    """What the grid says about a trial (its row before any report)."""

    trial_id: str
    label: str
    config: dict           # flat config columns
    planned_epochs: float  # epochs x the method's epoch multiplier
    main_metric: str | None = None  # its own task's main metric (schema.main_metric), the report's score


def summarize_trial(info: TrialInfo, curves: list[dict], *, status: str, message: str = "", stop_reason: str = "",
                    main_metric: str | None = None, mode: str = "max", attempts: int = 0,
                    finished_at: float | None = None) -> dict:
    """The trial's row: config columns, status, its task's main metric (`info.main_metric`), best/last of every
    metric, epochs, wall time. `main_metric` and `mode`: the sweep's metric, which `best_epoch` follows."""
    curves = sorted(curves, key=lambda r: (r.get("step") or 0, r.get("training_iteration") or 0))
    row: dict[str, Any] = dict(info.config)
    row |= {"trial_id": info.trial_id, "label": info.label, "status": status, "message": message,
            "stop_reason": stop_reason, "main_metric": info.main_metric}
    names: list[str] = []
    for curve in curves:
        names += [k for k in curve if k not in _NOT_METRICS and k not in names]
    best_epoch = None
    for name in names:
        values = [(c.get(name), c.get("epoch")) for c in curves if c.get(name) is not None]
        row[f"last_{name}"] = values[-1][0] if values else None
        direction = metric_direction(name, main_metric, mode)
        if direction is None:
            continue
        numbers = [(v, e) for v, e in values if is_number(v)]
        if not numbers:
            row[f"best_{name}"] = None
            continue
        pick = max if direction == "max" else min
        best, epoch = pick(numbers, key=lambda ve: ve[0])
        row[f"best_{name}"] = best
        if name == main_metric:
            best_epoch = epoch
    last = curves[-1] if curves else {}
    row |= {
        "best_epoch": best_epoch,
        "epochs_run": last.get("epoch", 0.0) or 0.0,
        "planned_epochs": info.planned_epochs,
        "steps": last.get("step", 0) or 0,
        "samples_seen": last.get("samples_seen"),  # training examples forwarded, over all ranks (None: not reported)
        # throughput over the whole trial up to its last report (raysdpb.throughput; mfu None without a known peak)
        "tokens_per_s": last.get("tokens_per_s"),
        "mfu": last.get("mfu"),
        **{key: last.get(key) for key in PHASE_TIME_KEYS},  # where the wall time went
        "reports": len(curves),
        "wall_time_s": _wall_time(curves),
        "attempts": attempts,
        "finished_at": finished_at,
    }
    return row


def _wall_time(curves: list[dict]) -> float:
    """A trial's seconds: the engine's clock `elapsed_s` at its last report (every report carries it; its
    checkpoints carry it across resumes, where Tune's own times restart with each attempt); 0.0 before any."""
    clock = curves[-1].get("elapsed_s") if curves else None
    return float(clock) if is_number(clock) else 0.0


def _column(values: list) -> pa.Array:
    """A column as pyarrow infers it; values of mixed kinds (a number and a string) become strings."""
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError):
        return pa.array([None if v is None else (v if isinstance(v, str) else json.dumps(v, default=str))
                         for v in values], type=pa.string())


def to_table(rows: list[dict], first: Iterable[str] = ()) -> pa.Table:
    """Rows (dicts with possibly different keys) as a table; `first` columns lead, the rest in first-seen order."""
    names: list[str] = [n for n in first if any(n in r for r in rows)]
    for row in rows:
        names += [k for k in row if k not in names]
    if not rows:
        return pa.table({n: pa.array([], type=pa.string()) for n in names})
    return pa.table({name: _column([row.get(name) for row in rows]) for name in names})


# --- the summary printed at the end ----------------------------------------------------------------------

def format_table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table (numbers to 4 significant digits)."""
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    cells = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


# --- the recorder of one sweep ---------------------------------------------------------------------------

@dataclass
class _TrialState:
    info: TrialInfo
    status: str = "pending"
    message: str = ""
    stop_reason: str = ""
    attempts: int = 0
    finished_at: float | None = None
    stopped_at: dict | None = None  # the result on which the scheduler stopped the trial
    curves: dict = field(default_factory=dict)  # (step, epoch) -> row


class ResultsRecorder:
    """Rows of one sweep, kept in memory and written to `<experiment>/trials.parquet` and `curves.parquet`.

    `on_result` / `on_start` / `on_complete` / `on_error` mirror Tune's trial events; `write()` writes
    both files (done on every trial end, at most every `flush_every_s` while results arrive, and by
    `close()`).
    A trial that finished keeps a marker `<experiment>/finished/<trial_id>.json` with its last result, so a
    sweep killed before Tune saved its own state does not train it again on `--resume`.
    """

    def __init__(self, experiment_path: str, trials: list[TrialInfo], *, metric: str | None, mode: str = "max",
                 time_attr: str = "epoch", flush_every_s: float = 10.0, scheduler: str = "ASHA") -> None:
        self.experiment_path = experiment_path
        self.scheduler = scheduler  # who stops trials early, as the stop reason names it (ASHA, or BOHB's HyperBand)
        self.metric, self.mode, self.time_attr = metric, mode, time_attr
        self.flush_every_s = flush_every_s
        self.trials: dict[str, _TrialState] = {t.trial_id: _TrialState(t) for t in trials}
        self._last_write = 0.0
        self._unwritten = False  # results recorded since the last write

    def add_trial(self, info: TrialInfo) -> None:
        """A trial a searcher suggested (its row appears as it is suggested, in that order)."""
        if info.trial_id not in self.trials:
            self.trials[info.trial_id] = _TrialState(info)

    # paths
    @property
    def trials_path(self) -> str:
        return join(self.experiment_path, "trials.parquet")

    @property
    def curves_path(self) -> str:
        return join(self.experiment_path, "curves.parquet")

    def marker_path(self, trial_id: str) -> str:
        return finished_marker_path(self.experiment_path, trial_id)

    # resume: what an earlier run of the sweep already recorded
    def load(self) -> None:
        for folder in (self.experiment_path, join(self.experiment_path, "finished")):
            remove_stale_temporaries(folder)  # a run killed while writing
        for row in read_rows(self.curves_path):
            state = self.trials.get(row.get("trial_id"))
            if state is not None:
                row = {k: v for k, v in row.items() if v is not None}
                state.curves[(row.get("step"), row.get("epoch"))] = row
        for row in read_rows(self.trials_path):
            state = self.trials.get(row.get("trial_id"))
            if state is None:
                continue
            state.attempts = int(row.get("attempts") or 0)
            if row.get("status") in TERMINAL:
                state.status, state.message = row["status"], row.get("message") or ""
                state.stop_reason, state.finished_at = row.get("stop_reason") or "", row.get("finished_at")

    # Tune's events
    def on_start(self, trial_id: str) -> None:
        state = self.trials[trial_id]
        if state.status in FINISHED:  # only re-announces its last result (see raysdpb.sweep.trial_driver)
            return
        state.status, state.message, state.stop_reason = "running", "", ""
        state.stopped_at = None
        state.attempts += 1

    def on_result(self, trial_id: str, result: dict, *, stopped: bool = False) -> None:
        """A report. `stopped`: the scheduler decided to stop the trial on this result."""
        state = self.trials[trial_id]
        if state.status in FINISHED:  # a finished trial re-announcing its last result after a resume
            return
        row = curve_row(trial_id, result)
        key = (row.get("step"), row.get("epoch"))
        replayed = row.pop("replayed", None)
        if stopped:  # the scheduler may stop a resumed trial on a report it sends again
            state.stopped_at = state.curves.get(key, row)
        if replayed and key in state.curves:
            return  # a resumed trial sending again a report that was already recorded
        state.curves[key] = row
        state.status = "running"
        self._unwritten = True
        self.flush_due()

    def flush_due(self) -> None:
        """Write the files if results arrived since the last write and that was `flush_every_s` ago (called on
        each result and on each of Tune's loop steps, so a result the trials fall quiet after is written too)."""
        if self._unwritten and time.monotonic() - self._last_write >= self.flush_every_s:
            self.write()

    def on_complete(self, trial_id: str, *, stopped_while_paused: bool = False) -> None:
        """The trial ended. `stopped_while_paused`: the scheduler stopped it while it was paused (HyperBand ends the
        trials of a rung it does not promote so), on its last result."""
        state = self.trials[trial_id]
        if stopped_while_paused and state.stopped_at is None and state.curves:
            state.stopped_at = self._curves(state)[-1]
        if state.status in FINISHED:  # replayed after a resume: keep the row of the first run
            self.write()
            return
        curves = self._curves(state)
        last = curves[-1] if curves else {}
        epochs_run = last.get("epoch", 0.0) or 0.0
        if last.get("status") == "diverged":
            state.status, state.message = "diverged", str(last.get("message", ""))
            state.stop_reason = f"diverged at epoch {epochs_run:g}: {state.message}"
        elif epochs_run + 1e-9 >= state.info.planned_epochs:
            state.status, state.stop_reason = "completed", f"ran all {state.info.planned_epochs:g} epochs"
        elif state.stopped_at is not None:
            at = state.stopped_at
            value = at.get(self.metric)
            shown = f"{value:.4g}" if is_number(value) else value
            state.status = "stopped_by_asha"
            where = at.get(self.time_attr, epochs_run)
            state.stop_reason = (f"{self.scheduler} stopped it at {self.time_attr} {where:g}: "
                                 f"{self.metric}={shown} was worse than its rung's cutoff")
        else:
            state.status = "interrupted"
            state.stop_reason = f"ended after {epochs_run:g} of {state.info.planned_epochs:g} epochs"
        state.finished_at = time.time()
        if state.status in FINISHED:
            write_finished_marker(self.experiment_path, trial_id, state.status, last)
        self.write()

    def on_error(self, trial_id: str, message: str) -> None:
        state = self.trials[trial_id]
        state.status, state.message = "errored", message
        state.stop_reason = f"error: {message.strip().splitlines()[-1] if message.strip() else 'unknown'}"
        state.finished_at = time.time()
        self.write()

    def close(self) -> None:
        """The end of the sweep: trials that did not finish are `interrupted` (or still `pending`)."""
        for state in self.trials.values():
            if state.status == "running":
                state.status = "interrupted"
                state.stop_reason = "the sweep ended before the trial did; `--resume` continues it"
        self.write()

    # tables
    def curves_of(self, trial_id: str) -> list[dict]:
        return self._curves(self.trials[trial_id])

    def _curves(self, state: _TrialState) -> list[dict]:
        return sorted(state.curves.values(), key=lambda r: (r.get("step") or 0, r.get("epoch") or 0))

    def trial_rows(self) -> list[dict]:
        return [summarize_trial(s.info, self._curves(s), status=s.status, message=s.message,
                                stop_reason=s.stop_reason, main_metric=self.metric, mode=self.mode,
                                attempts=s.attempts, finished_at=s.finished_at)
                for s in self.trials.values()]

    def curve_rows(self) -> list[dict]:
        return [row for s in self.trials.values() for row in self._curves(s)]

    def write(self) -> None:
        write_table(to_table(self.trial_rows(), first=("trial_id", "label", "status", "method")), self.trials_path)
        write_table(to_table(self.curve_rows(), first=("trial_id", "step", "epoch")), self.curves_path)
        self._last_write = time.monotonic()
        self._unwritten = False
