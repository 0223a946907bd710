"""The searchers replayed on a grid that ran to the end (issue 33): how much compute random search, Optuna's TPE and
BOHB need to reach the grid's best score, without running a new trial.

    python benchmarks/searcher_replay.py EXPERIMENT [EXPERIMENT ...] [--group-by method none]
        [--searchers grid random optuna bohb] [--seeds 20] [--num-samples N] [--metric M] [--select best|last]
        [--eval-examples N] [--json OUT]

Trials are seeded and deterministic on a CPU, so a searcher that suggests a point of a grid that already ran to the
end would get exactly the curve the grid recorded. The searchers and schedulers run for real, built from the grid's
own config by raysdpb's own code (`plan_sweep`; `raysdpb.sweep.driver.make_scheduler`: ASHA per group with the
config's settings, else the sweep's defaults, and HyperBandForBOHB for bohb; `search_settings`: random search's
seeded draws, `SampledTrials` around OptunaSearch and TuneBOHB), driven by a real `ray.tune.Tuner` (one local Ray for
the whole process, one trial at a time, so the searchers see results in one order: deterministic) whose trainable
looks the suggested trial up in the grid and `tune.report`s its recorded reports in order, so that ASHA and
HyperBand stop it (and BOHB pauses and resumes it, from a checkpoint of its place) as they would stop the trial.

* **The space is the grid's points.** Each searched key keeps the grid's own list, which a sampled search takes as a
  categorical choice (`raysdpb.sweep.space`), so every suggestion is a trial the grid ran. The searchers do not
  search the continuous ranges a real search would (`benchmarks/searchers.py` runs those): a replay can only answer
  with a recorded curve. A space point the grid lacks is an error before Ray starts.
* **Groups.** `--group-by method`: each method its own replay over its own grid (the keys it ignores dropped, as
  one would write its grid alone); a folder that does not search `method` is one method's grid (protocol v2's
  `qv2-grid-<task>-<method>` folders). `--group-by none`: the whole grid, `method` a searched key as the
  quickstart searches it (ASHA per method, the sweep's default groups; bohb: one HyperBand over every trial, which
  it needs `asha.group_by: []` for). Several folders make one whole grid only when their searches are one product.
* **Counted per replay**, from the reports in the order Tune received them: the compute (the training examples
  forwarded, `samples_seen`, of each trial's last report by then, summed) until the first report that reaches the
  target, the trials started by then, and whether it was reached. The target is the grid's best score by the
  sweep's selection rule less one validation example (1 / `--eval-examples`): `--select best` (the trial's best
  report, `best_<metric>`; the default) or `last` (its last report: protocol v2's rule, the default for a grid with a
  held-out dev split), and under `last` only a trial's final report counts (the end of its budget: what the sweep
  would select it by; a trial ASHA stopped has none). Compute is a fraction of the whole grid's (every trial to its
  end).
* **Per searcher**, over `--seeds` replays (`sweep.seed` 0 .. N-1): the median and interquartile range of that
  fraction (a replay that never reaches the target counts as infinite, "never"), the fraction of seeds that reached
  it, the trials started. References: the grid in grid order without ASHA (no Ray: the recorded curves in order)
  and `grid` (the grid with ASHA as the sweep would run it: one replay, it has no seed).
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SELECT_RULES, scored_examples, selected_value, table, write_json  # noqa: E402

from raysdpb.results.schema import is_number  # noqa: E402

SEARCHERS = ("grid", "random", "optuna", "bohb")
CONFIG_FILES = ("sweep.yaml", "config.yaml")
# a trial's status that means its curve is whole: it ran to its end (or diverged, and stopped where it did)
WHOLE = ("completed", "diverged")
# what the trainable reports of a recorded report: the keys a scheduler or searcher may read (the metric is added)
REPORTED = ("epoch", "step", "samples_seen")

__all__ = ["RecordedGroup", "load_groups", "compute_to_reach", "selection_scores", "replay", "grid_order_events",
           "replay_trial", "OutsideGrid", "main"]


class OutsideGrid(LookupError):
    """A searcher suggested (or a space holds) a trial the recorded grid did not run."""


# --- the recorded grid ----------------------------------------------------------------------------------------

@dataclass
class RecordedGroup:
    """The trials a replay searches: the config whose `search:` block spans them (trial keys, `search`, `sweep`,
    as a sweep YAML holds them), their ids in grid order and each one's reports in order."""

    name: str
    raw: dict
    trial_ids: list[str]
    curves: dict[str, list[dict]]

    @property
    def full_compute(self) -> float:
        """The training examples the whole grid forwarded: each trial's last report's samples_seen, summed."""
        return sum(float(self.curves[t][-1]["samples_seen"]) for t in self.trial_ids if self.curves[t])


def read_config(folder: Path) -> dict:
    for name in CONFIG_FILES:
        if (folder / name).is_file():
            return yaml.safe_load((folder / name).read_text())
    raise SystemExit(f"searcher_replay: {folder}: no sweep config ({' or '.join(CONFIG_FILES)}) in the folder")


def read_experiment(folder: Path) -> tuple[dict, list[dict], dict[str, list[dict]]]:
    """A fully-run grid: its config, its trials.parquet rows (grid order) and each trial's curve rows in order of
    samples seen. A trial that did not run to its end (stopped by ASHA, errored, unfinished) is an error: its later
    reports are missing."""
    import pyarrow.parquet as pq

    from asha_replay import derive_samples_seen

    raw = read_config(folder)
    trials = pq.read_table(folder / "trials.parquet").to_pylist()
    curves = pq.read_table(folder / "curves.parquet").to_pylist()
    cut = [f"{t['trial_id']} ({t.get('status')})" for t in trials if t.get("status") not in WHOLE]
    if cut:
        raise SystemExit(f"searcher_replay: {folder}: a replay needs every trial run to its end (asha: null); not "
                         f"so: {', '.join(cut)}")
    derive_samples_seen(trials, curves)
    by_trial: dict[str, list[dict]] = {t["trial_id"]: [] for t in trials}
    for row in curves:
        if row.get("trial_id") in by_trial and row.get("samples_seen") is not None:
            by_trial[row["trial_id"]].append(row)
    for rows in by_trial.values():
        rows.sort(key=lambda r: (r["samples_seen"], r.get("step") or 0))
    return raw, trials, by_trial


def _method_of(raw: dict) -> str:
    """The method of a config's trials that does not search it (the trial's own, else TrialConfig's default)."""
    from raysdpb.config import TrialConfig

    return raw.get("method") or TrialConfig.model_fields["method"].default


def _method_grid(raw: dict, method: str) -> dict:
    """One method's grid of a config that searches `method`: the method fixed, the keys it ignores dropped."""
    from raysdpb.methods import METHODS
    from raysdpb.sweep.grid import method_hyperparameters

    optional = method_hyperparameters()
    uses = METHODS[method].hyperparameters
    own = copy.deepcopy(raw)
    own["method"] = method
    own["search"] = {k: v for k, v in raw["search"].items() if k != "method" and (k not in optional or k in uses)}
    return own


def _expanded(raw: dict) -> list[str]:
    """The trial ids of a config's grid, in grid order (raysdpb's own expansion and ids)."""
    from raysdpb.config import load_experiment
    from raysdpb.sweep.grid import expand

    grid = {**raw, "sweep": {**(raw.get("sweep") or {}), "search": "grid", "num_samples": None}}
    experiment = load_experiment(None, raw=grid)
    # the sweep's report cadence is part of each trial's config (eval_every_steps), and so of its id
    cadence = {"report_every_steps": experiment.sweep.report_every_steps, "report_every": experiment.sweep.report_every}
    return [p.trial_id for p in expand(experiment, **cadence)]


def _group(name: str, raw: dict, curves: dict[str, list[dict]], source: str, recorded: set[str]) -> RecordedGroup:
    ids = _expanded(raw)
    missing = [t for t in ids if t not in curves]
    if missing:
        raise OutsideGrid(f"searcher_replay: {source}: group {name}: the search space holds {len(missing)} trial(s) "
                          f"the grid did not run ({', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''}): "
                          "a replay can only answer a suggestion with a recorded curve")
    if set(ids) != recorded:  # the config makes fewer trials than recorded: it is not the grid's config
        extra = sorted(recorded - set(ids))
        raise OutsideGrid(f"searcher_replay: {source}: group {name}: the config's grid makes {len(ids)} trials, the "
                          f"folder recorded {len(recorded)} (not made: {', '.join(extra[:4])}); is it the grid's own "
                          "config?")
    return RecordedGroup(name, raw, ids, {t: curves[t] for t in ids})


def load_groups(folders: list[Path], group_by: str) -> list[RecordedGroup]:
    """The groups to replay (`group_by`: "method", or "none" for the whole grid) of fully-run grid folders."""
    loaded = [(folder, *read_experiment(folder)) for folder in folders]
    if group_by == "method":
        groups: dict[str, RecordedGroup] = {}
        for folder, raw, trials, curves in loaded:
            methods = raw.get("search", {}).get("method") or [_method_of(raw)]
            for method in methods:
                if method in groups:
                    raise SystemExit(f"searcher_replay: method {method} is in two of the folders given; replay them "
                                     "one at a time")
                own = _method_grid(raw, method) if "method" in raw.get("search", {}) else raw
                recorded = {t["trial_id"] for t in trials if t.get("method") == method}
                groups[method] = _group(method, own, curves, str(folder), recorded)
        return list(groups.values())
    if len(loaded) == 1:
        folder, raw, trials, curves = loaded[0]
        return [_group("whole grid", raw, curves, str(folder), {t["trial_id"] for t in trials})]
    return [_merged(loaded)]


def _merged(loaded: list) -> RecordedGroup:
    """Several one-method grids as one whole grid (`method` searched): only when their trial settings agree apart
    from the method and their searches make one product."""
    first = loaded[0][1]
    common = {k: v for k, v in first.items() if k not in ("method", "search", "sweep")}
    search: dict[str, list] = {"method": []}
    curves, recorded = {}, set()
    for folder, raw, trials, rows in loaded:
        if "method" in raw.get("search", {}):
            raise SystemExit(f"searcher_replay: {folder} searches method itself; give it alone for a whole-grid replay")
        if {k: v for k, v in raw.items() if k not in ("method", "search", "sweep")} != common:
            raise SystemExit(f"searcher_replay: {folder}: its trial settings differ from {loaded[0][0]}'s (apart from "
                             "the method): not one grid; use --group-by method")
        search["method"].append(_method_of(raw))
        for key, values in raw.get("search", {}).items():
            search.setdefault(key, [])
            search[key] += [v for v in values if v not in search[key]]
        curves |= rows
        recorded |= {t["trial_id"] for t in trials}
    raw = {**common, "method": search["method"][0], "search": search, "sweep": first.get("sweep")}
    try:
        return _group("whole grid", raw, curves, ", ".join(str(f) for f, *_ in loaded), recorded)
    except OutsideGrid as err:
        raise SystemExit(f"{err}\nsearcher_replay: the folders' grids are not one product of lists; replay them with "
                         "--group-by method") from None


# --- counting (pure functions of the reports, in the order they arrived) ---------------------------------------

def selection_scores(curves: dict[str, list[dict]], metric: str, select: str, mode: str = "max") -> dict[str, float]:
    """Each trial's score by the sweep's selection rule: its best report (`best`, the best_<metric> column) or its
    last report (`last`, protocol v2's `last_<metric>`); a trial without the metric is left out."""
    out = {}
    for trial_id, rows in curves.items():
        values = [float(r[metric]) for r in rows if is_number(r.get(metric))]
        if values:
            out[trial_id] = selected_value(values, select, mode)
    return out


def compute_to_reach(events: list[dict], metric: str, target: float, *, select: str = "best",
                     mode: str = "max") -> dict:
    """From a replay's reports in the order they arrived (`trial_id`, `samples_seen`, the metric): the compute
    (each trial's largest samples_seen by then, summed) until the first report that reaches `target`, the trials
    started by then and whether it was reached; unreached: the whole replay's. Under `select` "last" only a
    trial's final report counts (`final`: the last of its recorded curve, the end of its budget; the score the
    sweep would select it by), so a trial ASHA stopped never reaches the target."""
    sign = 1.0 if mode == "max" else -1.0
    hit = None
    for i, event in enumerate(events):
        if select == "last" and not event["final"]:
            continue
        if is_number(event.get(metric)) and sign * (event[metric] - target) >= -1e-12:
            hit = i
            break
    until = events if hit is None else events[:hit + 1]
    seen: dict[str, float] = {}
    for event in until:
        seen[event["trial_id"]] = max(seen.get(event["trial_id"], 0.0), float(event["samples_seen"]))
    return {"reached": hit is not None, "compute": sum(seen.values()), "trials_started": len(seen),
            "by_trial": events[hit]["trial_id"] if hit is not None else None}


def grid_order_events(group: RecordedGroup, metric: str) -> list[dict]:
    """The grid without ASHA, one trial at a time in grid order: every recorded report, in that order."""
    return [{"trial_id": t, "samples_seen": float(r["samples_seen"]), metric: r.get(metric),
             "final": i == len(group.curves[t]) - 1}
            for t in group.trial_ids for i, r in enumerate(group.curves[t])]


# --- the replay on Ray Tune -------------------------------------------------------------------------------------

def replay_trial(config: dict, curves: dict[str, list[dict]], checkpoints: bool) -> None:
    """The Tune trainable: the suggested trial's recorded reports, in order, from where its checkpoint (if any)
    left off. `checkpoints`: a checkpoint of its place with every report (what a trial HyperBandForBOHB pauses
    resumes from)."""
    import json
    import os

    from ray import tune

    trial_id = config["trial_id"]
    if trial_id not in curves:
        raise OutsideGrid(f"searcher_replay: the searcher suggested trial {trial_id} "
                          f"({ {k: v for k, v in config.items() if k != 'trial_id'} }), which the grid did not run")
    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            start = json.loads(Path(folder, "place.json").read_text())["next"]
    for index in range(start, len(curves[trial_id])):
        result = {**curves[trial_id][index], "replay_index": index}
        if not checkpoints:
            tune.report(result)
            continue
        with tempfile.TemporaryDirectory() as folder:
            Path(folder, "place.json").write_text(json.dumps({"next": index + 1}))
            tune.report(result, checkpoint=tune.Checkpoint.from_directory(os.fspath(folder)))


def _recorder(metric: str, lengths: dict[str, int]):
    from ray.tune import Callback

    class ReportLog(Callback):
        """Every report in the order Tune's controller received it (what its scheduler and searcher saw), and the
        trials in the order they started; `repeated` counts reports received twice (a trial resumed without its
        place would send its first reports again: its compute twice). `final`: the report is the last of the
        trial's recorded curve (`lengths`: reports per trial)."""

        def __init__(self) -> None:
            self.events: list[dict] = []
            self.started: list[str] = []
            self.repeated = 0
            self._seen: set[tuple[str, int]] = set()

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            if trial.config["trial_id"] not in self.started:
                self.started.append(trial.config["trial_id"])

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            key = (trial.config["trial_id"], result.get("replay_index"))
            if key[1] is None:
                return
            if key in self._seen:
                self.repeated += 1
                return
            self._seen.add(key)
            self.events.append({"trial_id": key[0], "index": key[1], "samples_seen": float(result["samples_seen"]),
                                metric: result.get(metric), "final": key[1] == lengths[key[0]] - 1})

    return ReportLog()


def replay_config(group: RecordedGroup, searcher: str, seed: int, num_samples: int, storage: Path,
                  metric: str | None = None) -> dict:
    """The group's config as a sweep of `searcher` would run it: the grid's lists as the search (choices), the
    config's ASHA (the sweep's defaults where the grid ran with asha: null), `metric` as ASHA's and the searcher's,
    one trial at a time; bohb over a searched `asha.group_by` key gets one group (what it needs)."""
    raw = copy.deepcopy(group.raw)
    asha = dict((raw.get("sweep") or {}).get("asha") or {})
    if metric:
        asha["metric"] = metric
    if searcher == "bohb":
        from raysdpb.config import ASHA_GROUP_BY

        if any(k in raw["search"] for k in asha.get("group_by", ASHA_GROUP_BY)):
            asha["group_by"] = []
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", f"replay-{group.name}-{searcher}-{seed}")
    # the grid's report cadence kept: it is part of each trial's config (eval_every_steps), and so of its id
    cadence = {k: v for k, v in (raw.get("sweep") or {}).items() if k in ("report_every_steps", "report_every")}
    raw["sweep"] = {**cadence, "name": name, "storage_path": str(storage), "num_workers": 1, "cpus_per_worker": 1,
                    "max_concurrent_trials": 1, "keep_checkpoints": 1, "keep_weights": "none", "asha": asha,
                    "search": searcher, "seed": seed, "num_samples": None if searcher == "grid" else num_samples}
    return raw


@dataclass
class Replay:
    searcher: str
    seed: int
    started: list[str]     # the trials in the order they started (the searcher's suggestions, run)
    events: list[dict]     # every report in the order Tune received it
    repeated: int          # reports received twice (none: a paused trial resumes where it was)
    wall_s: float


def replay(group: RecordedGroup, searcher: str, seed: int, num_samples: int, work: Path,
           metric: str | None = None) -> tuple[Replay, object]:
    """One replay of `searcher` with `sweep.seed` `seed` on a real Tuner (Ray must be running); the Replay and the
    sweep's plan."""
    import os

    from ray import tune

    from raysdpb.config import load_experiment
    from raysdpb.sweep.driver import make_scheduler, search_settings
    from raysdpb.sweep.plan import plan_sweep

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")  # as the sweep: a report may lack the metric
    raw = replay_config(group, searcher, seed, num_samples, work, metric)
    plan = plan_sweep(load_experiment(None, raw=raw), source=f"replay {group.name}")
    scheduler = make_scheduler(plan)
    param_space, searched = search_settings(plan)
    fields = (*REPORTED, plan.metric)
    curves = {t: [{k: r[k] for k in fields if is_number(r.get(k))} for r in rows] for t, rows in group.curves.items()}
    log = _recorder(plan.metric, {t: len(rows) for t, rows in curves.items()})
    t0 = time.perf_counter()
    tuner = tune.Tuner(
        tune.with_parameters(replay_trial, curves=curves, checkpoints=searcher == "bohb"),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=plan.metric, mode=plan.mode, scheduler=scheduler, max_concurrent_trials=1,
                                    reuse_actors=True, **searched),
        run_config=tune.RunConfig(name=plan.sweep.name, storage_path=plan.storage_path, callbacks=[log], verbose=0),
    )
    results = tuner.fit()
    wall = time.perf_counter() - t0
    shutil.rmtree(plan.experiment_path, ignore_errors=True)
    if results.errors:
        raise RuntimeError(f"searcher_replay: {searcher} seed {seed} on {group.name}: a trial failed: "
                           f"{results.errors[0]}")
    return Replay(searcher, seed, list(log.started), list(log.events), log.repeated, wall), plan


def start_ray(cpus: int = 1) -> None:
    """One local Ray for every replay of the process (its start-up is the slow part)."""
    import logging
    import os

    import ray

    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's legacy output at verbose 0 prints nothing
    if __name__ != "__main__":  # imported (the tests): Ray's workers cannot import benchmarks/, so the trainable
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # travels by value, as a script's does
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)


# --- summaries ---------------------------------------------------------------------------------------------------

def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile in which an infinity (never reached) stays infinite."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    if lo == hi or s[lo] == s[hi]:
        return s[lo]
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarise(outcomes: list[dict]) -> dict:
    """Median and IQR over seeds of the compute fraction to reach (infinite when not reached), the fraction of
    seeds that reached the target, the median trials started and the median fraction of the grid each replay ran."""
    to_reach = [o["fraction"] if o["reached"] else math.inf for o in outcomes]
    return {"seeds": len(outcomes), "reached": sum(o["reached"] for o in outcomes) / len(outcomes),
            "median": _quantile(to_reach, 0.5), "q25": _quantile(to_reach, 0.25), "q75": _quantile(to_reach, 0.75),
            "trials_started_median": _quantile([o["trials_started"] for o in outcomes], 0.5),
            "ran_median": _quantile([o["ran_fraction"] for o in outcomes], 0.5)}


def eval_examples_of(raw: dict) -> int:
    """Validation examples the trials of a sweep config (`raw`) score on (`_common.scored_examples`)."""
    from raysdpb.config import load_trial_config

    return scored_examples(load_trial_config(None, raw={k: v for k, v in raw.items() if k not in ("search", "sweep")}))


def score_group(group: RecordedGroup, args, work: Path) -> dict:
    """Every replay of one group, counted, and the references."""
    from raysdpb.config import load_experiment
    from raysdpb.sweep.plan import plan_sweep

    plan = plan_sweep(load_experiment(None, raw=replay_config(group, "grid", 0, 1, work, args.metric)))
    metric, mode = plan.metric, plan.mode
    select = args.select or ("last" if group.raw.get("heldout_dev") else "best")
    n_eval = args.eval_examples or eval_examples_of(group.raw)
    scores = selection_scores(group.curves, metric, select, mode)
    best = max(scores.values()) if mode == "max" else min(scores.values())
    target = best - 1.0 / n_eval if mode == "max" else best + 1.0 / n_eval
    full = group.full_compute
    num_samples = args.num_samples or len(group.trial_ids)
    out = {"group": group.name, "trials": len(group.trial_ids), "metric": metric, "mode": mode, "select": select,
           "eval_examples": n_eval, "best_score": best,
           "best_trials": sorted(t for t, s in scores.items() if s == best),
           "target": target, "grid_compute": full, "num_samples": num_samples,
           "time_attr": plan.sweep.asha.time_attr, "searchers": {}}
    grid_order = compute_to_reach(grid_order_events(group, metric), metric, target, select=select, mode=mode)
    out["grid_order"] = {**grid_order, "fraction": grid_order["compute"] / full}
    for searcher in args.searchers:
        seeds = [0] if searcher == "grid" else list(range(args.seeds))
        outcomes = []
        for seed in seeds:
            run, _ = replay(group, searcher, seed, num_samples, work, args.metric)
            reach = compute_to_reach(run.events, metric, target, select=select, mode=mode)
            ran = compute_to_reach(run.events, metric, math.inf, mode="max")["compute"]  # all it ran
            outcomes.append({"seed": seed, **reach, "fraction": reach["compute"] / full, "ran_fraction": ran / full,
                             "trials_run": len(run.started), "suggested": run.started, "repeated": run.repeated,
                             "wall_s": run.wall_s})
            print(f"  {group.name:>16} {searcher:>6} seed {seed:>2}: "
                  f"{'reached' if reach['reached'] else 'not reached'} at {reach['compute'] / full:.3f} of the grid, "
                  f"{reach['trials_started']} trials ({len(run.started)} run, {run.wall_s:.1f} s)", flush=True)
        out["searchers"][searcher] = {"summary": summarise(outcomes), "replays": outcomes}
    return out


def _fraction(value: float | None) -> str:
    return "never" if value is None or math.isinf(value) else f"{value:.2f}"


def print_table(groups: list[dict]) -> None:
    rows = []
    for g in groups:
        rows.append({"group": g["group"], "trials": g["trials"], "searcher": "grid order, no ASHA", "seeds": 1,
                     "reached": 1.0 if g["grid_order"]["reached"] else 0.0,
                     "compute": _fraction(g["grid_order"]["fraction"]), "iqr": "",
                     "started": float(g["grid_order"]["trials_started"])})
        for name, s in g["searchers"].items():
            summary = s["summary"]
            rows.append({"group": g["group"], "trials": g["trials"], "searcher": name, "seeds": summary["seeds"],
                         "reached": summary["reached"], "compute": _fraction(summary["median"]),
                         "iqr": f"{_fraction(summary['q25'])}-{_fraction(summary['q75'])}",
                         "started": summary["trials_started_median"]})
    print(table(rows, [("group", "group", "s"), ("trials", "trials", "d"), ("searcher", "searcher", "s"),
                       ("seeds", "seeds", "d"), ("reached", "reached", ".2f"),
                       ("compute", "compute to reach (median)", "s"), ("iqr", "IQR", "s"),
                       ("started", "trials started", ".1f")]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", type=Path, help="experiment folders of fully-run grids")
    p.add_argument("--group-by", nargs="+", choices=["method", "none"], default=["method", "none"],
                   help="method: a replay per method; none: the whole grid (method searched)")
    p.add_argument("--searchers", nargs="+", choices=list(SEARCHERS), default=list(SEARCHERS))
    p.add_argument("--seeds", type=int, default=20, help="replays per searcher, sweep.seed 0 .. N-1")
    p.add_argument("--num-samples", type=int, default=None, help="trials a searcher runs; default: the group's grid "
                                                                   "size")
    p.add_argument("--metric", default=None, help="default: the task's main metric (eval_dev_<metric> with a held-out "
                                                  "dev split)")
    p.add_argument("--select", choices=SELECT_RULES, default=None,
                   help="the sweep's selection rule: best report, or last (default: last with a held-out dev split)")
    p.add_argument("--eval-examples", type=int, default=None, help="validation examples (one example = 1/N); "
                                                                   "default: from the task's data")
    p.add_argument("--cpus", type=int, default=1, help="CPUs of the local Ray (the replays run one trial at a time)")
    p.add_argument("--json", default=None, help="write the replays and summaries here")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    from _common import offline_env

    offline_env()
    args = parse_args(argv)
    groups = [g for mode in args.group_by for g in load_groups(args.experiments, mode)]
    start_ray(args.cpus)
    results = {"experiments": [str(e) for e in args.experiments],
               "settings": {k: v for k, v in vars(args).items() if k not in ("experiments", "json")}, "groups": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="searcher-replay-") as work:
        for group in groups:
            print(f"[{group.name}] {len(group.trial_ids)} trials", flush=True)
            results["groups"].append(score_group(group, args, Path(work)))
    results["wall_s"] = time.perf_counter() - t0
    print_table(results["groups"])
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
