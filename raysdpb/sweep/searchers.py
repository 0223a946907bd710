"""The model-based searchers of a sweep (`sweep.search: optuna | bohb`): Ray Tune's `OptunaSearch` (TPE sampler,
seeded) and `TuneBOHB` (seeded, with `HyperBandForBOHB` as the scheduler), inside `SampledTrials`, which makes each
suggestion a trial of the sweep:

* the suggestion becomes the trial it names (`SampledSpace.point`): a stable id from its config, as the grid's, and
  the values of hyperparameters its method does not use dropped. The Tune trial's config is that id and those
  values, from which the trial's driver makes its config (`sampled_config`); the trial is recorded in
  `<experiment>/samples.json` (in the order suggested, with its config) before Tune starts it, where the results
  and the trackers read it as they read `grid.json`'s.
* a suggestion of a trial this sweep has already run or is running is not run twice: the searcher is told the
  earlier trial's last result (or, while it runs, that the repeat failed, which TPE skips) and asked again. TPE
  and BOHB repeat the best points of a small search; after `MAX_REPEATS` repeats in a row the searcher waits for
  running trials (or, with none, the search ends: nothing new is left to try).
* determinism: the searchers are seeded by `sweep.seed`, and BOHB's sampler (hpbandster), which draws from numpy's
  global generator, draws from a generator of its own here, seeded too and saved with the searcher. With one trial
  at a time the same config and seed give the same trials (the results arrive in the same order); with several at
  a time, the first suggestions (Optuna's 10 random start-up trials, BOHB's before its first model) are the same,
  and later ones depend on the order in which results arrive.
* `--resume`: Tune saves the searcher with the experiment's state (`save`/`restore`, the inner searcher's own
  state included) and restores it; trials Tune had not saved are suggested again by the restored (seeded) searcher
  and find their checkpoints or their finished markers (`raysdpb.sweep.driver.trial_driver`).
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from contextlib import contextmanager

from ray.tune.search import Searcher

from raysdpb.errors import UserError
from raysdpb.results.storage import join, read_json, write_json
from raysdpb.sweep.space import SampledSpace

log = logging.getLogger(__name__)

__all__ = ["SampledTrials", "make_searcher", "check_searcher_installed", "read_samples", "sampled_config",
           "SAMPLES_FILE", "MAX_REPEATS", "SEARCH_EXTRA"]

SAMPLES_FILE = "samples.json"
MAX_REPEATS = 50
# the packages each searcher needs (the `search` extra)
SEARCH_EXTRA = {"optuna": ("optuna",), "bohb": ("hpbandster", "ConfigSpace")}


def check_searcher_installed(search: str, source: str = "<config>") -> None:
    """One `UserError` naming the extra before Ray starts, rather than Tune's assertion in the middle of it."""
    import importlib.util

    missing = [name for name in SEARCH_EXTRA.get(search, ()) if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"{source}: sweep.search: {search} needs {', '.join(missing)}, which is not installed: "
                        "pip install 'raysdpb[search]'")


def read_samples(experiment_path: str) -> list[dict]:
    """The sampled trials of a sweep, in the order suggested: `{"trial_id", "label", "values", "config"}`."""
    return (read_json(join(experiment_path, SAMPLES_FILE)) or {}).get("samples", [])


def sampled_config(grid: dict, trial_id: str, values: dict, localize) -> dict:
    """A sampled trial's config as its workers run it, from what the sweep samples (grid.json's `search.space`) and
    the values its Tune config holds: made again by the same rule, not read from samples.json, which Tune's
    copying of its staging folder may hold back for a moment."""
    point = SampledSpace.from_json(grid["search"]["space"]).point(values)
    if point.trial_id != trial_id:  # the same rule made both: a mismatch is a bug, not the user's
        raise RuntimeError(f"sampled trial {trial_id}: its values {values} make trial {point.trial_id}")
    return localize(point.config)


class SampledTrials(Searcher):
    """A Tune searcher's suggestions as the sweep's trials (see the module's docstring)."""

    def __init__(self, inner: Searcher, space: SampledSpace, experiment_path: str, seed: int, *,
                 positions: bool = True, localize=None) -> None:
        import numpy as np

        super().__init__(metric=inner.metric, mode=inner.mode)
        self.inner, self.space, self.experiment_path = inner, space, experiment_path
        self.positions = positions      # the inner searcher sees lists as choices of positions
        self.localize = localize        # the trial config as its workers run it (raysdpb.sweep.driver.localize)
        self.inner_id: dict[str, str] = {}  # Tune's trial id -> the inner searcher's id of its suggestion
        self.sweep_id: dict[str, str] = {}  # Tune's trial id -> the sweep's trial id
        self.running: set[str] = set()      # the sweep's ids of trials suggested and not complete
        self.results: dict[str, dict | None] = {}  # the sweep's id -> last result of a complete trial (None: errored)
        self.repeats = 0                    # suggestions that repeated a trial (told the searcher, not run)
        self.numpy_state = np.random.RandomState(seed).get_state()  # BOHB's sampler's own generator
        self._recorded: dict | None = None  # samples.json as written (read again after a restore)

    # --- the inner searcher, with its own numpy generator
    @contextmanager
    def _own_numpy(self):
        import numpy as np

        outer = np.random.get_state()
        np.random.set_state(self.numpy_state)
        try:
            yield
        finally:
            self.numpy_state = np.random.get_state()
            np.random.set_state(outer)

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # the inner searcher was made with its space, metric and mode

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.inner.set_max_concurrency(max_concurrent)  # TuneBOHB keeps its own count (paused trials apart)

    def suggest(self, trial_id: str):
        for attempt in range(MAX_REPEATS):
            inner_id = trial_id if attempt == 0 else f"{trial_id}~{attempt}"
            with self._own_numpy():
                suggestion = self.inner.suggest(inner_id)
            if suggestion is None or suggestion == Searcher.FINISHED:
                return suggestion
            point = self.space.point(self.space.values_of(suggestion, positions=self.positions))
            sweep_id = point.trial_id
            if sweep_id not in self.running and sweep_id not in self.results:
                self.inner_id[trial_id], self.sweep_id[trial_id] = inner_id, sweep_id
                self.running.add(sweep_id)
                self._record(point)
                return {"trial_id": sweep_id, **point.values}
            # a trial of this sweep again: what it scored is what the repeat would score
            self.repeats += 1
            known = self.results.get(sweep_id)
            with self._own_numpy():
                self.inner.on_trial_complete(inner_id, result=known, error=known is None)
        if self.running:
            return None  # ask again once a running trial has reported
        log.warning("the %s searcher suggested only trials this sweep has run (%d repeats in a row): the search "
                    "ends", type(self.inner).__name__, MAX_REPEATS)
        return Searcher.FINISHED

    def _record(self, point) -> None:
        """The trial in samples.json, before Tune starts it (its driver reads its config there)."""
        path = join(self.experiment_path, SAMPLES_FILE)
        if self._recorded is None:
            self._recorded = read_json(path) or {"samples": []}
        if any(s["trial_id"] == point.trial_id for s in self._recorded["samples"]):
            return  # suggested again after a resume (Tune had not saved it): recorded already
        config = self.localize(point.config) if self.localize else point.config.model_dump(mode="json")
        self._recorded["samples"].append({"trial_id": point.trial_id, "label": point.label,
                                          "values": point.values, "config": config})
        write_json(path, self._recorded)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        # (a resumed trial sends its reports up to its checkpoint again: the searcher has them already)
        if trial_id in self.inner_id and not result.get("replayed"):
            with self._own_numpy():
                self.inner.on_trial_result(self.inner_id[trial_id], result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self.inner_id:
            return
        with self._own_numpy():
            self.inner.on_trial_complete(self.inner_id[trial_id], result=result, error=error)
        sweep_id = self.sweep_id[trial_id]
        self.running.discard(sweep_id)
        self.results[sweep_id] = None if error or not result else {self.metric: result.get(self.metric)}

    # HyperBandForBOHB tells the searcher of the trials it pauses and resumes
    def on_pause(self, trial_id: str) -> None:
        if trial_id in self.inner_id and hasattr(self.inner, "on_pause"):
            self.inner.on_pause(self.inner_id[trial_id])

    def on_unpause(self, trial_id: str) -> None:
        if trial_id in self.inner_id and hasattr(self.inner, "on_unpause"):
            self.inner.on_unpause(self.inner_id[trial_id])

    # --- saved with the experiment's state (Tune's searcher-state file), restored on --resume
    def save(self, checkpoint_path: str) -> None:
        # Tune saves the searcher into its driver's staging folder, then copies that folder to the experiment's. A
        # resumed sweep's staging folder starts as a copy of the experiment's, samples.json with it: left there
        # as it was, it would be copied back over the trials suggested since
        if self._recorded is not None:
            write_json(os.path.join(os.path.dirname(os.path.abspath(checkpoint_path)), SAMPLES_FILE), self._recorded)
        with tempfile.TemporaryDirectory() as folder:
            inner_path = os.path.join(folder, "inner.pkl")
            self.inner.save(inner_path)
            with open(inner_path, "rb") as f:
                inner_state = f.read()
        state = {k: v for k, v in self.__dict__.items() if k not in ("inner", "_recorded")}
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"state": state, "inner": inner_state}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            saved = pickle.load(f)
        with tempfile.TemporaryDirectory() as folder:
            inner_path = os.path.join(folder, "inner.pkl")
            with open(inner_path, "wb") as f:
                f.write(saved["inner"])
            self.inner.restore(inner_path)
        self.__dict__.update(saved["state"])
        self._recorded = None

    def __getstate__(self):
        return {**self.__dict__, "_recorded": None}


def make_searcher(plan, localize=None) -> SampledTrials:
    """The plan's searcher (`sweep.search`: optuna or bohb) over its sampled space, seeded by `sweep.seed`."""
    if localize is None:
        from raysdpb.sweep.driver import localize  # (the driver imports this module)
    sweep, space = plan.sweep, plan.space
    check_searcher_installed(sweep.search)
    domains = space.domains(positions=True)
    if sweep.search == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # a line per trial otherwise
        inner = OptunaSearch(space=OptunaSearch.convert_search_space(domains), metric=plan.metric, mode=plan.mode,
                             sampler=optuna.samplers.TPESampler(seed=sweep.seed))
    else:
        from ray.tune.search.bohb import TuneBOHB

        inner = TuneBOHB(space=TuneBOHB.convert_search_space(domains), metric=plan.metric, mode=plan.mode,
                         seed=sweep.seed)
    return SampledTrials(inner, space, plan.experiment_path, sweep.seed, localize=localize)
