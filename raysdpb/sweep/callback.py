"""The Tune callback: Tune's trial events into the sweep's Parquet results (`raysdpb.results.recorder`), ASHA's
past results back on `--resume`, and what ended trials leave behind cleaned up (`raysdpb.sweep.cleanup`)."""

from __future__ import annotations

from pathlib import Path

from ray.tune import Callback

from raysdpb.results.recorder import ResultsRecorder, TrialInfo
from raysdpb.results.schema import FINISHED
from raysdpb.sweep.cleanup import TrialCleanup
from raysdpb.sweep.searchers import read_samples

__all__ = ["ResultsCallback", "trial_name"]


def trial_name(trial) -> str:
    """The sweep's own id of a Tune trial (stable across Tune runs, unlike Tune's)."""
    return trial.config["trial_id"]


def _error_message(trial) -> str:
    try:
        error = trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may be gone; the row must still be written
        error = None
    text = str(error) if error is not None else ""
    if not text and trial.error_file:
        try:
            text = Path(trial.error_file).read_text()
        except OSError:
            text = ""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    # the innermost "SomeError: message" line says most; keep the tail of the traceback for context
    headline = next((line.strip() for line in reversed(lines) if "Error:" in line or "Exception:" in line),
                    lines[-1].strip() if lines else "unknown error")
    return headline if len(lines) <= 1 else f"{headline}\n" + "\n".join(lines[-20:])

class ResultsCallback(Callback):
    """Forwards Tune's trial events to a `ResultsRecorder` (the Parquet files). Tune pickles it into the
    experiment state; the rows are not pickled, `setup` reloads them from the Parquet files on `--resume`."""

    keep_weights: int | str = 1  # (a sweep pickled before this setting existed resumes with the default)

    sampled, bohb = None, False  # (a sweep pickled before searchers existed resumes as a grid)

    def __init__(self, experiment_path: str, trials: list[TrialInfo], metric: str, mode: str, time_attr: str,
                 scheduler=None, keep_checkpoints: int = 1, keep_weights: int | str = 1, sampled=None,
                 bohb: bool = False):
        self.args = (experiment_path, trials, metric, mode, time_attr)
        self.keep_checkpoints, self.keep_weights = keep_checkpoints, keep_weights
        # a searcher's sweep: (its SampledSpace, what each trial holds, the task's main metric), to give each trial
        # it suggests (raysdpb.sweep.searchers, samples.json) its row
        self.sampled = sampled
        self.bohb = bohb  # HyperBandForBOHB stops (and pauses) the trials, not ASHA
        self.scheduler = scheduler  # the sweep's ASHA: pickled with this callback, so the same object on resume
        self.recorder: ResultsRecorder | None = None
        self.cleanup: TrialCleanup | None = None

    def setup(self, **info):
        experiment_path, trials, metric, mode, time_attr = self.args
        self.cleanup = TrialCleanup(experiment_path, metric, mode, self.keep_checkpoints, self.keep_weights)
        self.recorder = ResultsRecorder(experiment_path, trials, metric=metric, mode=mode, time_attr=time_attr,
                                        scheduler="HyperBand (BOHB)" if self.bohb else "ASHA")
        self.values: dict[str, dict] = {}  # a sampled trial's values
        if self.sampled is not None:  # on --resume: the trials suggested in earlier runs, in their order
            for sample in read_samples(experiment_path):
                self._add_sampled(sample["trial_id"], sample["values"])
        self.recorder.load()
        self.recorder.write()
        if self.scheduler is not None:
            self._replay_recorded_results()

    def _replay_recorded_results(self) -> None:
        """On --resume: Tune does not save its scheduler's state, so ASHA would start with empty rungs: it
        would stop nothing until new trials filled them, and judge a resumed trial's reports again against
        rungs filled in another order. Give it every result recorded before, of finished and unfinished
        trials, keyed by the sweep's trial ids (see raysdpb.sweep.scheduler)."""
        for trial_id in self.recorder.trials:
            self.scheduler.record_past_results(trial_id, self.recorder.curves_of(trial_id), self.values.get(trial_id))

    def _add_sampled(self, trial_id: str, values: dict) -> None:
        from raysdpb.sweep.plan import trial_info

        space, held, main_metric = self.sampled
        point = space.point(values)
        if point.trial_id != trial_id:  # the same rule makes both: a mismatch is a bug, not the user's
            raise RuntimeError(f"sampled trial {trial_id}: its values {values} make trial {point.trial_id}")
        self.values[trial_id] = point.values
        self.recorder.add_trial(trial_info(point, held, main_metric))

    def _sampled_trial(self, trial) -> None:
        """A trial the searcher suggested: its row, before its first event."""
        if self.sampled is not None and trial_name(trial) not in self.recorder.trials:
            self._add_sampled(trial_name(trial), {k: v for k, v in trial.config.items() if k != "trial_id"})

    def on_trial_start(self, iteration, trials, trial, **info):
        self._sampled_trial(trial)
        self.recorder.on_start(trial_name(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        # Tune sets `done` on a result when the scheduler (ASHA) stops the trial on it
        self.recorder.on_result(trial_name(trial), result, stopped=bool(result.get("done")))
        self.cleanup.seen(trial_name(trial), result)

    def on_trial_complete(self, iteration, trials, trial, **info):
        # (Tune calls this before it marks the trial terminated: a paused trial here is one its scheduler stopped)
        self.recorder.on_complete(trial_name(trial), stopped_while_paused=trial.status == "PAUSED")
        self.cleanup.trial_ended(trial_name(trial), finished=self.recorder.trials[trial_name(trial)].status in FINISHED)

    def on_trial_recover(self, iteration, trials, trial, **info):
        # Tune retries a trial whose actor died (its node was lost): the dead attempt's Train controller went with
        # it, so nothing else releases the placement group its workers held, and the retry would wait for it
        # forever on a full cluster. Its checkpoints stay: the retry resumes from them.
        self.cleanup.trial_ended(trial_name(trial), finished=False, prune=False)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.recorder.on_error(trial_name(trial), _error_message(trial))
        self.cleanup.trial_ended(trial_name(trial), finished=False)

    def on_step_end(self, iteration, trials, **info):
        self.recorder.flush_due()
        for trial in trials:
            # HyperBandForBOHB pauses trials: Tune ends the trial's actor, and with it its Train controller, which
            # leaves its workers' placement group (as when Tune stops a trial); resuming it, Train starts from its
            # latest checkpoint
            if trial.status == "PAUSED" and trial_name(trial) in self.cleanup.groups:
                self.cleanup.trial_ended(trial_name(trial), finished=False, prune=False)
        self.cleanup.run(self.recorder.trial_rows)

    def on_experiment_end(self, trials, **info):
        self.recorder.close()
        # the trials that ended in the last seconds (their processes are gone by now), and every finished trial
        # down to the weights the sweep keeps
        self.cleanup.finish(self.recorder.trial_rows)

    def __getstate__(self):
        return {"args": self.args, "scheduler": self.scheduler, "keep_checkpoints": self.keep_checkpoints,
                "keep_weights": self.keep_weights, "sampled": self.sampled, "bohb": self.bohb, "recorder": None,
                "cleanup": None}
