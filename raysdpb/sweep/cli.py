"""`python -m raysdpb.sweep CONFIG [--resume] [--dry-run] [key=value ...]`: plan and check the sweep (no Ray), then
run it on the cluster at `$RAY_ADDRESS` or `sweep.address`, or on a local Ray instance; print the best trial
per method and where the results are."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from raysdpb.results.recorder import format_table
from raysdpb.results.schema import best_per_method
from raysdpb.results.storage import join
from raysdpb.sweep.checks import check_data, check_experiment, check_models
from raysdpb.sweep.plan import describe_asha, plan_sweep
from raysdpb.sweep.space import describe_search

__all__ = ["main", "summary"]


def summary(rows: list[dict], metric: str, mode: str) -> str:
    best = best_per_method(rows, metric, mode)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    head = f"{len(rows)} trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    if not best:
        return head + f"\nno trial reported {metric}"
    table = format_table(best, ["method", f"best_{metric}", "best_epoch", "status", "label", "trial_id"])
    return f"{head}\nbest trial per method by {metric} ({mode}):\n{table}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysdpb.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a YAML config with search: and sweep: blocks (e.g. sweeps/quickstart.yaml)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. sweep.name=try2 search.seed=[0,1]")
    p.add_argument("--resume", action="store_true", help="continue the sweep of the same name where it stopped")
    p.add_argument("--dry-run", action="store_true",
                   help="check the config, the local data files and the models, print the trials of the grid "
                        "(or random search's draws), the search and the scheduler, and exit (no Ray)")
    p.add_argument("-q", "--quiet", action="store_true", help="nothing while it runs: the final table and paths only")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="also Tune's status tables and the trials' own output (Ray Train's, the libraries' logs)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_intermixed_args(argv)  # options may come between overrides
    if args.quiet and args.verbose:
        raise UserError("-q and -v: choose one (-q: the final table only; -v: everything Ray and Tune print)")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.verbose:
        for noisy in ("transformers", "datasets", "httpx", "huggingface_hub"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
    experiment = load_experiment(args.config, args.overrides)
    plan = plan_sweep(experiment, source=args.config)
    cluster = bool(os.environ.get("RAY_ADDRESS") or plan.sweep.address)
    check_data(plan, args.config, cluster=cluster)
    check_models(plan, args.config, cluster=cluster)
    if args.dry_run:
        for point in plan.points:
            print(f"{point.trial_id}  {point.label}")
        trials = (f"{len(plan.points)} trials" if plan.space is None
                  else f"{plan.sweep.num_samples} trials, chosen by {plan.sweep.search} as results come in")
        print(f"{trials}; metric {plan.metric} ({plan.mode}); experiment {plan.experiment_path}")
        print(describe_search(plan.experiment, len(plan.points) if plan.sweep.search == "random" else None))
        print(describe_asha(plan))
        return 0

    check_experiment(plan, args.resume, args.config)  # before starting Ray: a mistake here costs nothing
    import ray

    from raysdpb.sweep.driver import connect, run_sweep

    connect(os.environ.get("RAY_ADDRESS") or plan.sweep.address, worker_logs=args.verbose)
    try:
        rows = run_sweep(plan, resume=args.resume, source=args.config, verbose=0 if args.quiet else 2 if args.verbose
                         else 1)
    finally:
        ray.shutdown()
    print(summary(rows, plan.metric, plan.mode), flush=True)
    print(f"results: {join(plan.experiment_path, 'trials.parquet')}, {join(plan.experiment_path, 'curves.parquet')}; "
          f"curves: tensorboard --logdir {plan.experiment_path}", flush=True)
    unfinished = [r for r in rows if r["status"] in ("interrupted", "pending", "running")]
    errored = [r for r in rows if r["status"] == "errored"]
    for row in errored:
        print(f"raysdpb: trial {row['trial_id']} ({row['label']}) failed: {row['stop_reason']}", file=sys.stderr)
    if unfinished:
        print(f"raysdpb: {len(unfinished)} trials did not finish; continue with --resume", file=sys.stderr)
    return 1 if errored or unfinished else 0
