"""The report of one or more sweeps: the paper's tables and figures from an experiment folder.

    python -m raysdpb.report <storage_path>/<name> [more experiment folders ...] [--out DIR]
                             [--metric eval_macro_f1] [--at best|last]

Reads `trials.parquet` and `curves.parquet` (and the TensorBoard events the training loop wrote under
`<experiment>/tensorboard/<trial_id>`) and writes `report.md`, `report.html` (self-contained: the figures are
embedded) and the PNG figures into DIR (default `<first experiment>/report`):

* the results table: methods as rows, tasks (and models, when more than one) as columns; each cell the main
  validation metric of the method's best configuration (every config value but the seed; chosen by its mean
  over seeds), as mean ± std over seeds, the best of each column in bold, with the number of trials behind it;
* the cost per method: trial-hours, worker-hours, GPU-hours where the columns tell the GPUs, epochs run
  against epochs planned (what ASHA saved);
* the compute of each method at its selected configuration next to its score (optimizer steps, forward passes,
  teacher passes, wall time per trial) and a score-against-compute figure per task;
* alpha x tau heatmaps per task and method (the paper's Figure 3) from whatever grid the sweep ran;
* training and validation curves of each method's best trial, and DynSDPB's alpha_i / tau_i over training;
* per-layer gradient norms over training, method next to method (the paper's Figure 2);
* each method against finetune and double_finetune, paired by seed (mean difference, paired t-test).

A section the results cannot fill (one seed, one method, no grid, no gradient norms) is replaced by a
sentence saying why. The numbers come from the pure functions of `raysdpb.report.tables`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from raysdpb.errors import UserError
from raysdpb.report import figures
from raysdpb.report.load import load_experiments, read_scalars, resolve, tensorboard_dir
from raysdpb.report.render import Figure, Section, to_html, to_markdown
from raysdpb.report.tables import (BASELINES, alpha_tau_grid, comparison_table, compute_costs, compute_table,
                                   cost_table, method_order,
                                   paired_comparisons, prepare, results_table, select_configs, selection_table,
                                   value_scale)
from raysdpb.results.schema import FINISHED, STATUSES

log = logging.getLogger(__name__)

__all__ = ["build_report", "main"]

# the figures' file names: <prefix>_<column>.png
FIGURE_PREFIXES = ("heatmap", "curves", "dynamics", "grad_norms", "compute")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower() or "all"


def _list(values) -> str:
    values = [f"{v:g}" if isinstance(v, float) else str(v) for v in values]
    return "{" + ", ".join(values) + "}"


class _Report:
    """Builds the sections of one report; figures go to `out` as they are made."""

    def __init__(self, trials: pd.DataFrame, curves: pd.DataFrame, out: Path, metric: str | None, at: str,
                 download: Path | None = None, validation: bool = False):
        self.trials, self.curves, self.out, self.at = trials, curves, out, at
        self.prepared = prepare(trials, metric=metric, at=at, validation=validation)
        self.selection = select_configs(self.prepared)
        self.scale = value_scale(self.selection)
        self.figures: list[Path] = []
        self._tb_cache: dict[tuple[str, str], dict[str, pd.DataFrame]] = {}
        self.download = download  # where TensorBoard events of experiments on an object store are copied

    # helpers
    def _figure(self, name: str) -> Path:
        path, k = self.out / name, 1
        while path in self.figures:  # two columns whose names make the same file name
            k += 1
            path = self.out / f"{Path(name).stem}-{k}.png"
        self.figures.append(path)
        return path

    def _experiment_of(self, trial_id) -> str | None:
        if "trial_id" not in self.trials or "experiment" not in self.trials:
            return None
        found = self.trials.loc[self.trials["trial_id"] == trial_id, "experiment"]
        return str(found.iloc[0]) if len(found) else None

    def _scalars(self, trial_id, prefixes: tuple[str, ...]) -> dict[str, pd.DataFrame]:
        experiment = self._experiment_of(trial_id)
        if experiment is None:
            return {}
        key = (experiment, str(trial_id))
        if key not in self._tb_cache:
            # an experiment on an object store: its trials' events are copied here once
            cache = self.download / _slug(experiment) if self.download else None
            directory = tensorboard_dir(experiment, str(trial_id), cache)
            self._tb_cache[key] = read_scalars(directory, ("train/", "dynamic/", "grad_norm/")) if directory else {}
        return {k: v for k, v in self._tb_cache[key].items() if k.startswith(prefixes)}

    def _curve(self, trial_id) -> pd.DataFrame:
        if self.curves.empty or "trial_id" not in self.curves:
            return pd.DataFrame()
        experiment = self._experiment_of(trial_id)
        rows = self.curves[self.curves["trial_id"] == trial_id]
        if experiment is not None and "experiment" in rows:
            rows = rows[rows["experiment"] == experiment]
        return rows.sort_values([c for c in ("epoch", "step") if c in rows]) if len(rows) else rows

    def _best_trials(self) -> dict[str, dict[str, object]]:
        """column -> method -> the best trial id of its selected configuration."""
        out: dict[str, dict[str, object]] = {}
        for r in self.selection.itertuples(index=False):
            if r.best_trial_id is not None:
                out.setdefault(r.column, {})[r.method] = r.best_trial_id
        return out

    # sections
    def overview(self, paths: list[str], notes: list[str]) -> Section:
        p = self.prepared
        status = p["status"].value_counts() if "status" in p else pd.Series({"completed": len(p)})
        counts = ", ".join(f"{n} {s}" for s, n in status.items())
        metrics = sorted(set(p["_metric"].dropna())) if len(p) else []
        blocks = ["Experiments:", "\n".join(f"- `{path}`" for path in paths),
                  f"{len(p)} trial{'s' if len(p) != 1 else ''}: {counts}." if len(p) else "No trials yet."]
        if metrics:
            what = "the best value over its reports" if self.at == "best" else "its last report's value"
            on_dev = [m.startswith("eval_dev_") for m in metrics]
            split = "held-out dev split's " if all(on_dev) else "" if any(on_dev) else "validation "
            blocks.append(f"Each trial's score is its {split}{', '.join(f'`{m}`' for m in metrics)} "
                          f"({what}, `{self.at}_<metric>` in trials.parquet). The tables use the finished trials "
                          f"({', '.join(s for s in STATUSES if s in FINISHED)}) that have a score.")
        unknown = int(p["_metric"].isna().sum()) if len(p) else 0
        if unknown:
            blocks.append(f"{unknown} trial(s) had no known main metric (no `main_metric` in trials.parquet "
                          "and a task that is not registered, e.g. `custom`), so they have no score; "
                          "`--metric eval_<name>` picks one for every trial.")
        left_out = p[~p["_finished"]] if len(p) else p
        if len(left_out):
            blocks.append(f"{len(left_out)} trial(s) not finished ({', '.join(sorted(set(left_out['status'])))}) "
                          "are left out of the results; they count in the cost table.")
        cut_short = int(p["_cut_short"].sum()) if len(p) else 0
        if cut_short:
            blocks.append(f"{cut_short} trial(s) stopped by ASHA have no score at their last report (it is where "
                          "ASHA stopped them, not the end of the budget the others' last reports are at), so they "
                          "are left out of the results under `--at last`; they count in the cost table.")
        no_value = p[p["_finished"] & p["_value"].isna() & p["_metric"].notna() & ~p["_cut_short"]] if len(p) else p
        if len(no_value):
            blocks.append(f"{len(no_value)} finished trial(s) never reported their metric and are left out.")
        blocks += notes
        return Section("Overview", blocks)

    def results(self) -> Section:
        section = Section("Results: best configuration per method, chosen on validation")
        if self.selection.empty:
            finished = self.prepared[self.prepared["_finished"]] if len(self.prepared) else self.prepared
            if len(finished):
                wanted = ", ".join(sorted({f"{self.at}_{m}" for m in finished["_metric"].dropna()}))
                have = sorted(c for c in self.trials.columns if str(c).startswith(f"{self.at}_eval_"))
                section.blocks.append(f"No finished trial has a validation score ({wanted or 'no known metric'}), so "
                                      f"there is no results table. Scores in trials.parquet: "
                                      f"{', '.join(have) or 'none'} (choose one with --metric).")
            else:
                section.blocks.append("No finished trial has a validation score yet, so there is no results table.")
            return section
        unit = " Values are ×100 (points), as in the paper." if self.scale == 100.0 else ""
        section.blocks.append(
            "Each cell: the configuration (every config value but the seed) with the best mean over seeds, as "
            "mean ± sample std (ddof=1) over its seeds; n=k/N: k trials at that configuration, of N finished trials "
            f"of the method searched. Best per column in bold.{unit}")
        section.blocks.append(results_table(self.selection, self.scale))
        if int(self.selection["n"].max()) < 2:
            section.blocks.append("One seed per configuration: no ± std (it needs at least two seeds).")
        section.blocks.append("The selected configurations (what distinguishes them from the others searched):")
        section.blocks.append(selection_table(self.selection))
        return section

    def cost(self) -> Section:
        section = Section("Cost per method")
        if self.prepared.empty:
            section.blocks.append("No trials.")
            return section
        table, notes = cost_table(self.prepared)
        section.blocks.append(table)
        section.blocks.append("\n".join(f"- {n}" for n in notes))
        return section

    def compute(self) -> Section:
        section = Section("Score against compute")
        costs = compute_costs(self.prepared, self.selection) if len(self.selection) else pd.DataFrame()
        if costs.empty:
            section.blocks.append("Left out: no finished trial has a validation score.")
            return section
        section.blocks.append(
            "Each method at its selected configuration, the mean per trial over its seeds: optimizer steps, "
            "forward passes through the student (steps × batch size × ranks × the method's passes per example: 2 "
            "for a method that runs each batch twice), passes through a separate teacher for the soft targets "
            "(`teacher_table_passes`: one per training example, computed once and shared through the cache, so "
            "counted for every trial that distils from them; ~: estimated as one epoch's examples, for rows from "
            "before that column; the teacher's own fine-tuning is not counted), their total against finetune's (or, "
            "without finetune, the column's smallest), and wall minutes (`wall_time_s`). A method that wins by "
            "spending more shows as such.")
        section.blocks.append(compute_table(costs, self.scale))
        for column, here in costs.groupby("column", sort=False):
            if len(here) < 2:  # one method: nothing to set against it
                continue
            path = self._figure(f"compute_{_slug(column)}.png")
            figures.compute_figure(column, here, path, self.scale)
            section.blocks.append(Figure(path, (
                f"{column}: validation {here['metric'].iloc[0]} (mean ± std over seeds) against forward passes per "
                "trial (student + teacher; a dotted line from the student's own passes where a teacher adds some; "
                "methods at the same compute are spread a little sideways so that each error bar shows).")))
        return section

    def heatmaps(self) -> Section:
        section = Section("Alpha × tau (the paper's Figure 3)")
        grids, missing = alpha_tau_grid(self.prepared)
        if not grids:
            why = missing[0] if missing and "columns" in missing[0] else \
                "no method's finished trials ran more than one value of alpha or tau"
            section.blocks.append(f"Left out: {why}, so there is no alpha × tau grid to draw.")
            return section
        for column in dict.fromkeys(g.column for g in grids):
            here = [g for g in grids if g.column == column]
            path = self._figure(f"heatmap_{_slug(column)}.png")
            figures.heatmap_figure(here, path, self.scale)
            averaged = [f"seeds {_list(here[0].seeds)}"]
            others = {k: v for g in here for k, v in g.others.items()}
            averaged += [f"{k} ∈ {_list(v)}" for k, v in others.items()]
            fixed = "" if others else " (no other searched key varies)"
            spread = any(np.ptp(g.mean[np.isfinite(g.mean)]) > 1e-12 for g in here if np.isfinite(g.mean).any())
            best = "the best cell outlined in red" if spread else "every cell has the same score"
            section.blocks.append(Figure(path, (
                f"{column}: validation {here[0].metric} at each (alpha, tau), mean over {' and over '.join(averaged)}"
                f"{fixed}; n = trials per cell; {best}.")))
        if missing:
            section.blocks.append(f"No grid (one alpha and one tau) for: {', '.join(missing)}.")
        return section

    def curves_section(self) -> Section:
        section = Section("Training and validation curves")
        best = self._best_trials()
        if not best:
            section.blocks.append("Left out: no finished trial has a validation score, so there is no best trial.")
            return section
        if self.curves.empty:
            section.blocks.append("Left out: curves.parquet is missing or empty.")
            return section
        for column, methods in best.items():
            metric = self.selection.loc[self.selection["column"] == column, "metric"].iloc[0]
            curves = {m: self._curve(t) for m, t in methods.items()}
            curves = {m: c for m, c in curves.items() if len(c)}
            if not curves:
                section.blocks.append(f"{column}: no curve rows for the best trials.")
                continue
            losses = {m: self._scalars(methods[m], ("train/loss",)).get("train/loss") for m in curves}
            losses = {m: v for m, v in losses.items() if v is not None}
            path = self._figure(f"curves_{_slug(column)}.png")
            figures.curves_figure(column, metric, curves, losses, path, self.scale)
            faint = (" Faint lines: the per-step training loss from TensorBoard (moving average over long runs)."
                     if losses else "")
            trials = ", ".join(f"{m}: `{t}`" for m, t in methods.items() if m in curves)
            section.blocks.append(Figure(path, (
                f"{column}: training loss and validation {metric} per report of each method's best trial (the best "
                f"seed of its selected configuration; {trials}). Markers: the epoch's mean training loss and the "
                f"validation score at each report.{faint}")))
        section.blocks += self._dynamics(best)
        return section

    def _dynamics(self, best: dict[str, dict[str, object]]) -> list:
        blocks: list = []
        for column, methods in best.items():
            series: dict[str, dict[str, pd.DataFrame]] = {}
            source = ("TensorBoard (`dynamic/alpha_mean`, `dynamic/tau_mean` and their `_min`/`_max`, per logged step; "
                      "the band spans the smallest to the largest value of the step's samples)")
            for method, trial_id in methods.items():
                scalars = self._scalars(trial_id, ("dynamic/",))
                parts = {k[len("dynamic/"):]: v for k, v in scalars.items()
                         if k[len("dynamic/"):] in {f"{n}_{s}" for n in ("alpha", "tau")
                                                    for s in ("mean", "std", "min", "max")}}
                if "alpha_mean" not in parts and "tau_mean" not in parts:
                    curve = self._curve(trial_id)
                    for name in ("alpha_mean", "tau_mean"):
                        if name in curve and curve[name].notna().any():
                            c = curve.dropna(subset=[name])
                            parts[name] = pd.DataFrame({"step": c["step"], "value": c[name]})
                    if parts:
                        source = "curves.parquet (`alpha_mean`, `tau_mean`: the mean over each report's steps)"
                if parts:
                    series[method] = parts
            if not series:
                continue
            varying = [m for m, parts in series.items()
                       if any(len(v) and np.ptp(v["value"].to_numpy(dtype=float)) > 1e-9 for v in parts.values())]
            path = self._figure(f"dynamics_{_slug(column)}.png")
            figures.dynamics_figure(column, series, path)
            note = ("" if len(varying) == len(series) else
                    f" Flat lines ({', '.join(m for m in series if m not in varying)}): a fixed alpha and tau.")
            blocks.append(Figure(path, (
                f"{column}: the batch mean of the per-sample alpha_i and tau_i (the distilled first half of each "
                f"batch) over training, best trial per method, from {source}.{note}")))
        if not blocks:
            blocks.append("No alpha_i / tau_i traces: none of the best trials logged `dynamic/alpha_mean` or "
                          "reported `alpha_mean` (only methods that distil or reweight, e.g. dynsdpb, do).")
        return blocks

    def grad_norms(self) -> Section:
        section = Section("Per-layer gradient norms (the paper's Figure 2)")
        best = self._best_trials()
        if not best:
            section.blocks.append("Left out: no finished trial has a validation score, so there is no best trial.")
            return section
        drew = False
        for column, methods in best.items():
            norms = {}
            # the paper's pair first, side by side; then the other methods
            order = [m for m in ("finetune", "dynsdpb") if m in methods]
            for method in order + [m for m in method_order(methods) if m not in order]:
                scalars = self._scalars(methods[method], ("grad_norm/",))
                if scalars:
                    norms[method] = {k[len("grad_norm/"):]: v for k, v in scalars.items()}
            if not norms:
                continue
            path = self._figure(f"grad_norms_{_slug(column)}.png")
            window, _ = figures.grad_norm_figure(column, norms, path)
            points = max(len(v) for parts in norms.values() for v in parts.values())
            smooth = (f" Thick lines: a centred moving average over about {window} logged steps; faint: as logged."
                      if window > 1 else "")
            few = (f" Only {points} logged step(s) per trial: lower `grad_norm_every_steps` "
                   "for a fuller picture." if points < 5 else "")
            pair = "finetune next to dynsdpb" if {"finetune", "dynsdpb"} <= set(norms) else \
                ", ".join(norms)
            section.blocks.append(Figure(path, (
                f"{column}: L2 norm of the gradient of each parameter group (before clipping) over training, "
                f"{pair}, best trial per method, from the TensorBoard scalars `grad_norm/<group>` under "
                f"`<experiment>/tensorboard/<trial_id>`.{smooth}{few}")))
            drew = True
        if not drew:
            section.blocks.append(
                "Left out: no gradient norms. The training loop logs them as TensorBoard scalars `grad_norm/<group>` "
                "(rank 0, every `grad_norm_every_steps` steps) under `<experiment>/tensorboard/<trial_id>`, and "
                "none were found there for the best trials.")
        return section

    def paired(self) -> Section:
        section = Section("Paired comparison over seeds")
        sel = self.selection
        if sel.empty:
            section.blocks.append("Left out: no finished trial has a validation score.")
            return section
        if sel["method"].nunique() < 2:
            section.blocks.append(f"Left out: one method only ({sel['method'].iloc[0]}), nothing to compare it with.")
            return section
        if not sel["method"].isin(BASELINES).any():
            section.blocks.append("Left out: no finetune or double_finetune trials to compare the methods with.")
            return section
        comparisons = paired_comparisons(sel)
        if comparisons.empty:
            section.blocks.append("Left out: no task has a baseline and another method side by side.")
            return section
        if int(comparisons["shared"].max()) < 2:
            section.blocks.append("Left out: at most one seed is shared by a method and its baseline at their selected "
                                  "configurations, so there is nothing to pair (run more seeds: `search.seed`).")
            return section
        unit = " (×100)" if self.scale == 100.0 else ""
        section.blocks.append(
            f"Each method at its selected configuration against the baseline at its own, paired by seed: the mean "
            f"of (method − baseline){unit} over the shared seeds, and the two-sided p-value of a paired t-test "
            "(`scipy.stats.ttest_rel`) when at least 3 seeds are shared, and that p-value Holm-adjusted over the "
            "task's comparisons (the family-wise error rate of all of them); Holm p < 0.05 in bold. The "
            "configurations were chosen on the same validation scores, which no correction accounts for.")
        section.blocks.append(comparison_table(comparisons, self.scale))
        return section


def build_report(paths: list[str], out: str | Path | None = None, *, metric: str | None = None,
                 at: str = "best", validation: bool = False) -> dict[str, object]:
    """Write report.md, report.html and the PNG figures for these experiment folders; returns their paths.
    `validation`: score on each task's validation split where trials hold a dev split out (`prepare`)."""
    if not paths:
        raise UserError("give at least one experiment folder (<sweep.storage_path>/<sweep.name>)")
    if metric and validation:
        raise UserError(f"--metric {metric} and --validation: give one (--metric names its split itself: "
                        "eval_<m> is the validation split, eval_dev_<m> the held-out dev split)")
    if at not in ("best", "last"):
        raise UserError(f"--at: {at!r}; allowed: best, last")
    trials, curves, notes = load_experiments([str(p) for p in paths])
    if out is None:
        if "://" in str(paths[0]):
            raise UserError(f"{paths[0]} is not a local folder; give --out DIR for the report")
        out = Path(resolve(str(paths[0]))) / "report"
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for prefix in FIGURE_PREFIXES:  # figures of an earlier report that this one may not draw again
        for old in out.glob(f"{prefix}_*.png"):
            old.unlink()
    with tempfile.TemporaryDirectory(prefix="raysdpb-report-") as download:
        return _write_report(paths, trials, curves, notes, out, metric, at, Path(download), validation)


def _write_report(paths, trials, curves, notes, out: Path, metric, at, download: Path,
                  validation: bool = False) -> dict[str, object]:
    report = _Report(trials, curves, out, metric, at, download, validation)
    experiments = list(dict.fromkeys(resolve(str(p)) for p in paths))
    sections = [report.overview(experiments, notes), report.results(), report.cost(), report.compute(), report.paired(),
                report.heatmaps(), report.curves_section(), report.grad_norms()]
    names = ", ".join(Path(str(p).rstrip("/")).name for p in experiments)
    title = f"raysdpb report: {names}"
    markdown, page = out / "report.md", out / "report.html"
    markdown.write_text(to_markdown(title, sections), encoding="utf-8")
    page.write_text(to_html(title, sections), encoding="utf-8")
    return {"markdown": markdown, "html": page, "figures": report.figures, "selection": report.selection}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raysdpb.report", description=__doc__.split("\n\n")[0])
    p.add_argument("experiments", nargs="+", help="experiment folders a sweep wrote (<storage_path>/<name>)")
    p.add_argument("--out", default=None, help="where the report goes (default: <first experiment>/report)")
    p.add_argument("--metric", default=None,
                   help="one validation metric for every trial, as reported (e.g. eval_macro_f1); default: each "
                        "task's main metric")
    p.add_argument("--at", choices=("best", "last"), default="best",
                   help="a trial's score: the best value over its reports (default) or its last report's")
    p.add_argument("--validation", action="store_true",
                   help="score trials that hold a dev split out (heldout_dev) on the task's validation split, "
                        "their final score after selection on dev (default: the dev split, as their sweep "
                        "selected)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    written = build_report(args.experiments, args.out, metric=args.metric, at=args.at, validation=args.validation)
    print(f"report: {written['markdown']}\n        {written['html']}\n"
          f"figures: {len(written['figures'])} PNG in {Path(written['html']).parent}", flush=True)
    return 0
