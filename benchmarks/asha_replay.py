"""ASHA's decisions replayed offline on a grid whose trials all ran to the end: what each setting would have saved,
and what it would have cost in quality.

    python benchmarks/asha_replay.py EXPERIMENT [EXPERIMENT ...] [--grace 1 0.5] [--reduction 2 3 4]
        [--time-attr epoch] [--metric score] [--mode max] [--concurrent 2] [--json OUT]

For each (grace period, reduction factor), the sweep is simulated as `raysdpb.sweep` runs it: the trials start in
grid order, `--concurrent` at a time; each one's reports arrive at its own recorded times (`elapsed_s`, else
`time_total_s`, in `curves.parquet`); each report goes to the same scheduler the sweep uses
(`raysdpb.sweep.scheduler.GroupedASHA`, Ray Tune's ASHA per group of comparable trials, `--group-by`), and a trial it
stops sends nothing more and frees its slot, so the next trial starts earlier, as in a real sweep.
Several experiments are replayed as one sweep (their trials in the order given, `--concurrent` at a time), each
with its own groups; `--one-sweep` takes them for parts of one grid, grouped by `--group-by` alone (`--group-by
task`: one group per task, every method's configurations ranked together, as a sweep that searches `method`).

Reported per group and in all:

* compute: the `time_attr` the trials ran (epochs, or `--time-attr samples_seen`, the training examples forwarded
  that every report carries: the unit in which double_finetune and the overlap methods cost what they do),
  against the whole grid's; `saved` is the fraction not run;
* regret: the configuration the ASHA sweep would choose (ties to grid order, as the sweep's summary) scored by what
  it reached in the full run, against the grid's best; in validation examples too when `--eval-examples` is given
  (and `--example-worth` where one example is not 1/N of the metric, as for Matthews correlation). `--select` is the
  sweep's selection rule: `best` (the default), a trial's best report (`best_<metric>`) among what it reported
  before it was stopped; `last`, its last report (`last_<metric>`: protocol v2's fixed-budget rule), the score at
  the end of training, which a trial ASHA stopped does not have: it cannot be chosen (as `raysdpb.report --at
  last` leaves it out).

The grid must have run without stopping (`asha: null` in its sweep config) and should report every fraction of an
epoch (`eval_every_steps`), so that rungs below an epoch can be replayed. A trial that diverged stops where it did.
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SELECT_RULES, selected_value  # noqa: E402  (puts the checkout's raysdpb on the path)

from raysdpb.results.schema import is_number  # noqa: E402

__all__ = ["replay", "ReplayResult", "derive_samples_seen", "main"]


@dataclass
class GroupResult:
    group: str
    trials: int
    stopped: int
    compute_run: float         # time_attr units the trials ran under ASHA
    compute_full: float        # time_attr units of the whole grid
    chosen: str                # the trial ASHA's sweep would pick
    chosen_score: float        # its score in the full run (best_<metric> over all its reports, or last_<metric>)
    best: str                  # the grid's best trial
    best_score: float
    regret: float              # best_score - chosen_score in the metric's direction (>= 0)
    regret_examples: float | None = None

    @property
    def saved(self) -> float:
        return 1.0 - self.compute_run / self.compute_full if self.compute_full else 0.0


@dataclass
class ReplayResult:
    grace: float
    reduction: float
    time_attr: str
    select: str = "best"
    groups: list[GroupResult] = field(default_factory=list)
    stopped_at: dict[str, float] = field(default_factory=dict)  # trial id -> time_attr of the report it stopped on

    @property
    def saved(self) -> float:
        full = sum(g.compute_full for g in self.groups)
        return 1.0 - sum(g.compute_run for g in self.groups) / full if full else 0.0

    @property
    def max_regret(self) -> float:
        return max((g.regret for g in self.groups), default=0.0)

    def as_dict(self) -> dict:
        return {"grace": self.grace, "reduction": self.reduction, "time_attr": self.time_attr, "select": self.select,
                "saved": self.saved, "max_regret": self.max_regret, "stopped_at": self.stopped_at,
                "groups": [{**asdict(g), "saved": g.saved} for g in self.groups]}


def replay(trials: list[dict], curves: list[dict], *, metric: str = "score", mode: str = "max",
           time_attr: str = "epoch", grace: float = 1.0, reduction: float = 2.0, concurrent: int = 1,
           group_of: dict[str, object] | None = None, eval_examples: dict[str, float] | None = None,
           score_metric: str | None = None, score_mode: str | None = None, select: str = "best") -> ReplayResult:
    """Replay ASHA over fully-run `trials` (trials.parquet rows, grid order) and their `curves` (curves.parquet
    rows). `group_of`: trial id -> its ASHA group (default: one group); `eval_examples`: group -> validation
    examples (for accuracy; in general 1 / one example's worth in the metric), to state the regret in examples.
    ASHA ranks by `metric` (`mode`); the configuration is chosen and the regret stated by `score_metric`
    (`score_mode`), by default the same (e.g. ASHA on `eval_dev_loss`, chosen and judged by `eval_dev_accuracy`).
    `select`: a trial's score is its best report ("best") or its last ("last")."""
    if select not in SELECT_RULES:
        raise ValueError(f"select must be one of {SELECT_RULES}, not {select!r}")
    from raysdpb.sweep.scheduler import GroupedASHA

    by_trial: dict[str, list[dict]] = {t["trial_id"]: [] for t in trials}
    for row in curves:
        if row.get("trial_id") in by_trial and is_number(row.get(time_attr)):
            by_trial[row["trial_id"]].append(row)
    for reports in by_trial.values():
        reports.sort(key=lambda r: r[time_attr])
    group_of = group_of or {t: "all" for t in by_trial}
    max_t = max((r[time_attr] for reports in by_trial.values() for r in reports), default=1.0)
    # the scheduler the sweep runs, with the sweep's settings (raysdpb.sweep.driver): ASHA per group
    scheduler = GroupedASHA(group_of, time_attr=time_attr, max_t=max_t, grace_period=grace,
                            reduction_factor=reduction, stop_last_trials=False)
    scheduler.set_search_properties(metric, mode)

    # the sweep as a sequence of events: trials start in grid order as slots free up; each report arrives at the
    # trial's start plus its recorded time_total_s
    order = [t["trial_id"] for t in trials if by_trial[t["trial_id"]]]
    seen: dict[str, list[dict]] = {t: [] for t in order}
    stopped_at: dict[str, float] = {}
    events: list[tuple[float, int, str, int]] = []  # (time, sequence, trial id, report index)
    sequence = 0
    waiting = list(order)

    def start(trial_id: str, now: float) -> None:
        nonlocal sequence
        scheduler.on_trial_add(None, SimpleNamespace(config={"trial_id": trial_id}))
        at = now
        for index, report in enumerate(by_trial[trial_id]):
            # the trial's own clock over all its attempts (elapsed_s; Tune's time_total_s restarts with a resumed
            # attempt), never going back, so that its reports arrive in order
            elapsed = next((report[k] for k in ("elapsed_s", "time_total_s") if is_number(report.get(k))),
                           report[time_attr])
            at = max(at, now + float(elapsed))
            heapq.heappush(events, (at, sequence, trial_id, index))
            sequence += 1

    for _ in range(min(concurrent, len(waiting))):
        start(waiting.pop(0), 0.0)
    while events:
        now, _, trial_id, index = heapq.heappop(events)
        if trial_id in stopped_at:
            continue
        reports = by_trial[trial_id]
        report = reports[index]
        seen[trial_id].append(report)
        trial = SimpleNamespace(config={"trial_id": trial_id})
        last = index == len(reports) - 1
        decision = scheduler.on_trial_result(None, trial, dict(report))
        if decision == "STOP" and not last:
            stopped_at[trial_id] = float(report[time_attr])
        if decision == "STOP" or last:
            scheduler.on_trial_complete(None, trial, dict(report))
            if waiting:
                start(waiting.pop(0), now)

    result = ReplayResult(grace=grace, reduction=reduction, time_attr=time_attr, select=select,
                          stopped_at=stopped_at)
    metric, mode = score_metric or metric, score_mode or (mode if score_metric is None else "max")
    sign = 1.0 if mode == "max" else -1.0
    groups: dict[object, list[str]] = {}
    for trial_id in order:
        groups.setdefault(group_of[trial_id], []).append(trial_id)
    for key, members in groups.items():
        def score(reports: list[dict]) -> float:
            values = [r[metric] for r in reports if is_number(r.get(metric))]
            return selected_value(values, select, mode) if values else -sign * math.inf

        full = {t: score(by_trial[t]) for t in members}
        # under "last" a score is at the end of the budget: a trial ASHA stopped has none and cannot be chosen
        under_asha = {t: -sign * math.inf if select == "last" and t in stopped_at else score(seen[t])
                      for t in members}
        # max() keeps the first of equal scores: ties go to grid order, as the sweep's summary breaks them
        chosen = max(members, key=lambda t: sign * under_asha[t])
        best = max(members, key=lambda t: sign * full[t])
        regret = sign * (full[best] - full[chosen])
        n = (eval_examples or {}).get(key)
        name = " ".join(str(k).strip("'\"") for k in key) if isinstance(key, tuple) else str(key)
        result.groups.append(GroupResult(
            group=name, trials=len(members), stopped=sum(t in stopped_at for t in members),
            compute_run=sum(float(seen[t][-1][time_attr]) for t in members),
            compute_full=sum(float(by_trial[t][-1][time_attr]) for t in members),
            chosen=chosen, chosen_score=full[chosen], best=best, best_score=full[best], regret=regret,
            regret_examples=regret * n if n else None))
    return result


# --- the command ---------------------------------------------------------------------------------------------

def derive_samples_seen(trials: list[dict], curves: list[dict]) -> bool:
    """Curves of a raysdpb before `samples_seen` was reported get it (in place) as step x batch_size x world_size
    (the training examples a step forwards over all ranks); True when derived."""
    if (curves and not any("samples_seen" in c for c in curves) and all("step" in c for c in curves)
            and all(t.get("batch_size") for t in trials)):
        batch = {t["trial_id"]: int(t["batch_size"]) for t in trials}
        for c in curves:
            c["samples_seen"] = int(c["step"]) * batch[c["trial_id"]] * int(c.get("world_size") or 1)
        return True
    return False


def _load(experiment: Path, group_by: list[str], one_sweep: bool = False
          ) -> tuple[list[dict], list[dict], dict[str, object]]:
    import pyarrow.parquet as pq

    from raysdpb.sweep.scheduler import group_key

    trials = pq.read_table(experiment / "trials.parquet").to_pylist()
    curves = pq.read_table(experiment / "curves.parquet").to_pylist()
    unfinished = [t for t in trials if t.get("status") not in ("completed", "diverged", "stopped_by_asha")]
    if unfinished:  # a grid still running (or cut short): its finished trials only, said
        print(f"asha_replay: {experiment}: left out {len(unfinished)} unfinished trial(s) "
              f"({', '.join(sorted({str(t.get('status')) for t in unfinished}))})", file=sys.stderr)
        trials = [t for t in trials if t not in unfinished]
        kept = {t["trial_id"] for t in trials}
        curves = [c for c in curves if c["trial_id"] in kept]
    if derive_samples_seen(trials, curves):
        print(f"asha_replay: {experiment}: samples_seen derived as step x batch_size x world_size", file=sys.stderr)
    stopped = [t["trial_id"] for t in trials if t.get("status") == "stopped_by_asha"]
    if stopped:
        print(f"asha_replay: {experiment}: {len(stopped)} trials were stopped by ASHA in the run itself; a replay "
              "needs every trial run to the end (asha: null): their later reports are missing", file=sys.stderr)
    # each experiment's groups are its own, unless the experiments are parts of one grid (`one_sweep`)
    group_of = {t["trial_id"]: (*(() if one_sweep else (experiment.name,)), *group_key(t, group_by)) for t in trials}
    return trials, curves, group_of


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", type=Path, help="experiment folders of fully-run grids")
    p.add_argument("--grace", type=float, nargs="+", default=[1.0], help="grace periods (time_attr units)")
    p.add_argument("--reduction", type=float, nargs="+", default=[2.0, 3.0, 4.0], help="reduction factors")
    p.add_argument("--time-attr", default="epoch", help="epoch, or a curves column such as samples_seen")
    p.add_argument("--metric", default="score")
    p.add_argument("--mode", choices=["max", "min"], default="max")
    p.add_argument("--score-metric", default=None,
                   help="the metric the configuration is chosen and the regret stated by (default: --metric), "
                        "e.g. ASHA on eval_dev_loss judged by eval_dev_accuracy")
    p.add_argument("--score-mode", choices=["max", "min"], default=None,
                   help="default: --mode with the same metric, else max")
    p.add_argument("--select", choices=SELECT_RULES, default="best",
                   help="the sweep's selection rule: a trial's best report or its last (protocol v2)")
    p.add_argument("--concurrent", type=int, default=2, help="trials at a time in the simulated sweep")
    p.add_argument("--group-by", nargs="*", default=["task", "model", "num_layers", "method"])
    p.add_argument("--one-sweep", action="store_true",
                   help="the experiments are parts of one grid (e.g. one sweep per method): their trials share "
                        "ASHA groups by --group-by alone (default: each experiment's groups are its own)")
    p.add_argument("--eval-examples", type=int, default=None,
                   help="validation examples of the task(s), to state the regret in examples")
    p.add_argument("--example-worth", type=float, default=None,
                   help="what one example is worth in the score metric, where it is not 1 / --eval-examples (e.g. "
                        "Matthews correlation: about 2.8 / N on protocol v2's CoLA runs, raysdpb.report.stats."
                        "one_example_effect)")
    p.add_argument("--json", type=Path, default=None, help="write every replay's result here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    trials, curves, group_of = [], [], {}
    for experiment in args.experiments:
        t, c, g = _load(experiment, args.group_by, args.one_sweep)
        trials += t
        curves += c
        group_of |= g
    if args.example_worth is not None and args.example_worth <= 0:
        raise SystemExit("asha_replay: --example-worth must be positive (the score metric's change for one example)")
    per_unit = 1.0 / args.example_worth if args.example_worth else args.eval_examples  # examples per metric unit
    examples = {key: per_unit for key in set(group_of.values())} if per_unit else None
    results = []
    print(f"{'grace':>6} {'reduction':>9} {'saved':>7} {'max regret':>10}  worst group")
    for grace in args.grace:
        for reduction in args.reduction:
            r = replay(trials, curves, metric=args.metric, mode=args.mode, time_attr=args.time_attr, grace=grace,
                       reduction=reduction, concurrent=args.concurrent, group_of=group_of, eval_examples=examples,
                       score_metric=args.score_metric, score_mode=args.score_mode, select=args.select)
            worst = max(r.groups, key=lambda g: g.regret)
            in_examples = f" ({worst.regret_examples:.2f} examples)" if worst.regret_examples is not None else ""
            print(f"{grace:>6g} {reduction:>9g} {r.saved:>7.1%} {r.max_regret:>10.4f}  {worst.group}{in_examples}")
            results.append(r.as_dict())
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
