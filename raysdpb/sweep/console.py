"""What a sweep prints while it runs: one line per trial event (started, each report carrying the sweep's metric,
stopped by ASHA, completed, diverged, failed with its one-line reason) and, every `summary_every_s`, one line on
the whole sweep (trials done / running / pending, the best so far per method, elapsed and estimated time left).
Tune's status tables and Ray's and the libraries' logs are left to `-v` (`raysdpb.sweep.cli`).

`ConsoleCallback` reads the trials' states from the sweep's `ResultsCallback`, which Tune calls first."""

from __future__ import annotations

import sys
import time

from ray.tune import Callback

from raysdpb.results.schema import FINISHED, best_per_method, is_number
from raysdpb.sweep.callback import ResultsCallback, trial_name

__all__ = ["ConsoleCallback", "format_duration", "sweep_line"]


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


# how a trial's status reads in a line
SHOWN = {"stopped_by_asha": "stopped by ASHA", "completed": "completed", "diverged": "diverged", "errored": "errored",
         "interrupted": "interrupted", "running": "running", "pending": "pending"}


def _value(value) -> str:
    return f"{value:.4g}" if is_number(value) else str(value)


def sweep_line(rows: list[dict], metric: str, mode: str, elapsed_s: float, concurrent: int,
               durations: list[float] = (), running_for: list[float] = ()) -> str:
    """One line on the sweep: trials done (and how), running, pending; the best so far of each method; elapsed and
    the time left, estimated from `durations` (seconds from start to end of the trials that ended in this run, as
    the driver saw them: set-up included), how long the running trials have run (`running_for`) and the trials
    that can run at once."""
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    done = sum(n for s, n in counts.items() if s in FINISHED or s == "errored")
    how = ", ".join(f"{counts[s]} {SHOWN[s]}" for s in ("stopped_by_asha", "diverged", "errored") if counts.get(s))
    parts = [f"{done}/{len(rows)} done" + (f" ({how})" if how else ""), f"{counts.get('running', 0)} running",
             f"{counts.get('pending', 0) + counts.get('interrupted', 0)} pending"]
    best = best_per_method(rows, metric, mode)
    if best:
        parts.append(f"best {metric}: " + ", ".join(f"{r['method']} {_value(r[f'best_{metric}'])}" for r in best))
    parts.append(f"{format_duration(elapsed_s)} elapsed")
    left = len(rows) - done
    if durations and left:
        # a running trial takes the mean trial's time, less what it has run; the rest start as slots free up
        mean = sum(durations) / len(durations)
        work = sum(max(mean - age, 0.0) for age in running_for) + (left - len(running_for)) * mean
        estimate = work / max(concurrent, 1)
        parts.append(f"~{format_duration(estimate)} left")
    return " | ".join(parts)


class ConsoleCallback(Callback):
    """Prints the trials' events and a periodic summary line (see the module's docstring)."""

    def __init__(self, results: ResultsCallback, metric: str, mode: str, concurrent: int,
                 summary_every_s: float = 60.0, stream=None) -> None:
        self.results, self.metric, self.mode = results, metric, mode
        self.concurrent, self.summary_every_s = concurrent, summary_every_s
        self.stream = stream
        self._start = self._last_summary = time.monotonic()
        self._started: dict[str, float] = {}  # trial id -> when this run started it
        self._durations: list[float] = []      # the trials that ended in this run: start to end, as seen here

    def setup(self, **info):
        self._start = self._last_summary = time.monotonic()
        self._started, self._durations = {}, []

    # --- output
    def _print(self, text: str) -> None:
        stamp = format_duration(time.monotonic() - self._start)
        print(f"[{stamp:>7}] {text}", file=self.stream or sys.stdout, flush=True)

    def _state(self, trial):
        return self.results.recorder.trials[trial_name(trial)]

    def _label(self, trial) -> str:
        state = self._state(trial)
        return f"{trial_name(trial)} ({state.info.label})" if state.info.label else trial_name(trial)

    # --- Tune's events
    def on_trial_start(self, iteration, trials, trial, **info):
        state = self._state(trial)
        if state.status in FINISHED:  # finished in an earlier run of the sweep: only replays its last report
            return
        again = f", attempt {state.attempts}" if state.attempts > 1 else ""
        self._started[trial_name(trial)] = time.monotonic()
        self._print(f"{self._label(trial)} started{again}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("replayed") or self.metric not in result:
            return
        epoch, step = result.get("epoch"), result.get("step")
        where = f"epoch {_value(epoch)}" + (f" step {step}" if step is not None else "")
        extra = "".join(f" {k}={_value(result[k])}" for k in ("train_loss",) if k in result and k != self.metric)
        self._print(f"{trial_name(trial)} {where}: {self.metric}={_value(result[self.metric])}{extra}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        started = self._ended(trial)
        if started is None:
            return  # finished in an earlier run of the sweep, only re-announced
        state = self._state(trial)
        shown = SHOWN.get(state.status, state.status)
        if state.status == "stopped_by_asha":  # (or by BOHB's HyperBand: the recorder knows which)
            shown = f"stopped by {self.results.recorder.scheduler}"
        self._print(f"{trial_name(trial)} {shown}: {state.stop_reason}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._ended(trial)
        self._print(f"{trial_name(trial)} failed: {self._state(trial).stop_reason.removeprefix('error: ')}")

    def _ended(self, trial) -> float | None:
        started = self._started.pop(trial_name(trial), None)
        if started is not None:
            self._durations.append(time.monotonic() - started)
        return started

    def on_step_end(self, iteration, trials, **info):
        if time.monotonic() - self._last_summary >= self.summary_every_s:
            self._summary()

    def on_experiment_end(self, trials, **info):
        self._summary()

    def _summary(self) -> None:
        self._last_summary = time.monotonic()
        rows = self.results.recorder.trial_rows()
        now = time.monotonic()
        self._print(sweep_line(rows, self.metric, self.mode, now - self._start, self.concurrent, self._durations,
                               [now - started for started in self._started.values()]))

    def __getstate__(self):
        return {**self.__dict__, "stream": None}
