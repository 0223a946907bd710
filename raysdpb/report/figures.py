"""The report's figures (matplotlib, Agg: `Figure` objects rendered straight to PNG, no pyplot, no display).

Every function takes plain numbers (frames, arrays) and a path, writes one PNG and returns nothing; the
choice of trials is the caller's (`raysdpb.report.build_report`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from raysdpb.methods import METHODS
from raysdpb.report.tables import Grid, _direction

__all__ = ["method_color", "heatmap_figure", "curves_figure", "dynamics_figure", "grad_norm_figure", "compute_figure"]

DPI = 110


def _style(method: str, styles: list[str]) -> str:
    """The i-th style for the i-th registered method (the registry's order, the paper's rows); a method past
    the styles or not registered gets one of the styles left over, by its name (the same in every figure)."""
    order = list(METHODS)
    if method in order and order.index(method) < len(styles):
        return styles[order.index(method)]
    free = min(len(order), len(styles) - 1)  # the first style no registered method has (the last at least)
    return styles[free + sum(map(ord, method)) % (len(styles) - free)]


def method_color(method: str) -> str:
    """One colour per method, the same in every figure (tab10, then tab20's light shades, in the registry's
    order: the paper's six, DynSDPB's ablations, the baselines, room for more)."""
    return _style(method, ["#1f77b4", "#ff7f0e", "#8c564b", "#2ca02c", "#9467bd", "#d62728", "#17becf", "#bcbd22",
                           "#e377c2", "#7f7f7f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5"])


def method_marker(method: str) -> str:
    """One marker per method, so that lines lying on top of each other stay told apart."""
    return _style(method, ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "p", "h", "d", "8", "H"])


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=DPI, bbox_inches="tight", facecolor="white")


def _metric_label(metric: str, scale: float) -> str:
    name = metric[5:] if metric.startswith("eval_") else metric
    return f"validation {name}" + (" (×100)" if scale == 100.0 else "")


def _tick(value: float) -> str:
    return f"{value:g}"


# --- alpha x tau ------------------------------------------------------------------------------------------

def heatmap_figure(grids: list[Grid], path: Path, scale: float = 1.0) -> None:
    """One panel per method: validation metric at each (alpha, tau), one colour scale for all panels."""
    panels = len(grids)
    widths = [max(2.6, 0.9 * len(g.alpha) + 1.4) for g in grids]
    height = max(2.6, 0.7 * max(len(g.tau) for g in grids) + 1.6)
    fig = Figure(figsize=(sum(widths) + 1.2, height), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False, width_ratios=widths)[0]
    values = np.concatenate([g.mean[np.isfinite(g.mean)].ravel() for g in grids]) * scale
    vmin, vmax = (float(values.min()), float(values.max())) if len(values) else (0.0, 1.0)
    if vmax - vmin < 1e-12:  # every cell the same: a range around it, so the colours still mean something
        pad = 0.01 * max(abs(vmax), 1.0)
        vmin, vmax = vmin - pad, vmax + pad
    cmap = _cmap("viridis")
    image = None
    for ax, grid in zip(axes, grids):
        data = np.ma.masked_invalid(grid.mean * scale)
        image = ax.imshow(data, cmap=cmap, vmin=vmin, vmax=vmax, origin="lower", aspect="auto")
        ax.set_xticks(range(len(grid.alpha)), [_tick(a) for a in grid.alpha])
        ax.set_yticks(range(len(grid.tau)), [_tick(t) for t in grid.tau])
        ax.set_xlabel("alpha (α)")
        ax.set_ylabel("tau (τ)")
        ax.set_title(grid.method)
        pick = np.nanargmax if _direction(grid.metric) == "max" else np.nanargmin
        finite = grid.mean[np.isfinite(grid.mean)]
        # the best cell, when there is one (every cell the same: none is marked)
        best = pick(grid.mean) if len(finite) and np.ptp(finite) > 1e-12 else None
        for i in range(len(grid.tau)):
            for j in range(len(grid.alpha)):
                value = grid.mean[i, j] * scale
                if not np.isfinite(value):
                    ax.text(j, i, "—", ha="center", va="center", color="0.4", fontsize=9)
                    continue
                dark = (value - vmin) / (vmax - vmin) < 0.6 if vmax > vmin else True
                text = f"{value:.1f}" if scale == 100.0 else f"{value:.3f}"
                weight = "bold" if best is not None and (i, j) == np.unravel_index(best, grid.mean.shape) else "normal"
                ax.text(j, i, f"{text}\nn={grid.n[i, j]}", ha="center", va="center", fontsize=8.5,
                        color="white" if dark else "black", fontweight=weight)
                if weight == "bold":
                    ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="#d62728", linewidth=2.5))
    cbar = fig.colorbar(image, ax=list(axes), shrink=0.9)
    cbar.set_label(_metric_label(grids[0].metric, scale))
    fig.suptitle(f"{grids[0].column}: {_metric_label(grids[0].metric, scale)} by alpha and tau", fontsize=11)
    _save(fig, path)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad="0.85")  # cells without trials: light grey


# --- curves ----------------------------------------------------------------------------------------------

def _epoch_of_steps(curve: pd.DataFrame, steps: np.ndarray) -> np.ndarray:
    """Steps as fractional epochs, by the (step, epoch) pairs of the trial's reports."""
    pairs = curve[["step", "epoch"]].dropna().drop_duplicates("step").sort_values("step")
    known_steps = np.concatenate([[0.0], pairs["step"].to_numpy(dtype=float)])
    known_epochs = np.concatenate([[0.0], pairs["epoch"].to_numpy(dtype=float)])
    return np.interp(steps, known_steps, known_epochs)


def _smooth(values: np.ndarray, points: int = 40) -> tuple[np.ndarray, int]:
    """A centred moving average when there are many points (window about len/points), else as is."""
    window = max(1, len(values) // points)
    if window <= 1:
        return values, 1
    return pd.Series(values).rolling(window, center=True, min_periods=1).mean().to_numpy(), window


def curves_figure(column: str, metric: str, trials: dict[str, pd.DataFrame], step_losses: dict[str, pd.DataFrame],
                  path: Path, scale: float = 1.0) -> None:
    """Training loss and validation metric against epochs, one line per method (its best trial).
    `trials`: method -> its curve rows; `step_losses`: method -> per-step `train/loss` from TensorBoard (drawn
    faintly behind the per-report epoch means, when there)."""
    fig = Figure(figsize=(10.5, 3.8), layout="constrained")
    loss_ax, metric_ax = fig.subplots(1, 2)
    for k, (method, curve) in enumerate(trials.items()):
        color = method_color(method)
        # the first method's markers filled and largest, the next ones hollow and smaller: identical curves show
        size = 5 + 2 * (len(trials) - 1 - k)
        curve = curve.sort_values(["epoch", "step"])
        steps = step_losses.get(method)
        if steps is not None and len(steps) > 1 and {"step", "epoch"} <= set(curve):
            x = _epoch_of_steps(curve, steps["step"].to_numpy(dtype=float))
            smooth, _ = _smooth(steps["value"].to_numpy(dtype=float))
            loss_ax.plot(x, smooth, color=color, alpha=0.35, linewidth=1.0)
        if "train_loss" in curve:
            c = curve.dropna(subset=["train_loss"])
            loss_ax.plot(c["epoch"], c["train_loss"], marker=method_marker(method), color=color, label=method,
                         linewidth=1.8, markersize=size, markerfacecolor="none" if k else color, markeredgewidth=1.4)
        if metric in curve:
            c = curve.dropna(subset=[metric])
            metric_ax.plot(c["epoch"], c[metric] * scale, marker=method_marker(method), color=color, label=method,
                           linewidth=1.8, markersize=size, markerfacecolor="none" if k else color,
                           markeredgewidth=1.4)
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("loss (CE + distillation term)")
    metric_ax.set_title(_metric_label(metric, scale))
    metric_ax.set_xlabel("epoch")
    metric_ax.set_ylabel(_metric_label(metric, scale))
    for ax in (loss_ax, metric_ax):
        ax.grid(True, alpha=0.3)
        ax.set_xlim(left=0)
    handles, labels = metric_ax.get_legend_handles_labels()
    if not handles:
        handles, labels = loss_ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="method")
    fig.suptitle(f"{column}: best trial per method", fontsize=11)
    _save(fig, path)


def dynamics_figure(column: str, series: dict[str, dict[str, pd.DataFrame]], path: Path) -> None:
    """DynSDPB's per-sample weights over training: mean alpha_i and tau_i of each step's distilled half, with
    a band from their smallest to their largest value (± their std where only that was logged). `series`:
    method -> {"alpha_mean": (step, value), "alpha_min": ..., "alpha_max": ..., "alpha_std": ..., "tau_mean": ...}."""
    fig = Figure(figsize=(10.5, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    markers = max((len(f) for parts in series.values() for f in parts.values()), default=0) < 15
    for ax, name, symbol in ((axes[0], "alpha", "α"), (axes[1], "tau", "τ")):
        for k, (method, parts) in enumerate(series.items()):
            mean = parts.get(f"{name}_mean")
            if mean is None or not len(mean):
                continue
            color = method_color(method)
            x = mean["step"].to_numpy(dtype=float)
            y = mean["value"].to_numpy(dtype=float)
            # the band: the smallest and largest alpha_i / tau_i of the step (a ± std band would cross the
            # bounds the method keeps them in, e.g. tau_i below tau * tau_min_scale); ± std if only that was logged
            low, high = parts.get(f"{name}_min"), parts.get(f"{name}_max")
            std = parts.get(f"{name}_std")
            if low is not None and high is not None and len(low) == len(mean) == len(high):
                ax.fill_between(x, low["value"].to_numpy(dtype=float), high["value"].to_numpy(dtype=float),
                                color=color, alpha=0.15, linewidth=0)
            elif std is not None and len(std) == len(mean):
                s = std["value"].to_numpy(dtype=float)
                ax.fill_between(x, y - s, y + s, color=color, alpha=0.15, linewidth=0)
            # a different dash per method: a line lying on another one (a fixed alpha equal to the mean) still shows
            ax.plot(x, y, color=color, label=method, linewidth=1.6, marker="o" if markers else None, markersize=3,
                    linestyle=["-", "--", ":", "-."][k % 4])
        ax.set_title(f"per-sample {symbol}ᵢ: batch mean (band: min to max)")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{symbol}ᵢ")
        ax.grid(True, alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="method")
    fig.suptitle(f"{column}: dynamic alpha and tau over training (best trial per method)", fontsize=11)
    _save(fig, path)


def _group_order(name: str) -> tuple[int, str]:
    if name == "embeddings":
        return (0, name)
    if name == "head":
        return (2, name)
    return (1, name)


def grad_norm_figure(column: str, norms: dict[str, dict[str, pd.DataFrame]], path: Path) -> tuple[int, int]:
    """Per-layer gradient norms (L2, before clipping) over training, one panel per method side by side with a
    shared log y axis; one line per parameter group (embeddings, layer_00 ..., head). `norms`: method ->
    {group: (step, value)}. Returns the largest smoothing window used (1: none) and the panels drawn."""
    methods = list(norms)
    ncols = 2 if len(methods) == 4 else min(3, len(methods))
    nrows = -(-len(methods) // ncols)
    fig = Figure(figsize=(4.2 * ncols + 1.6, 3.4 * nrows + 0.4), layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False, sharey=True)
    axes = grid.ravel()[:len(methods)]
    for ax in grid.ravel()[len(methods):]:
        ax.set_visible(False)
    cmap = _cmap("viridis")
    window_used = 1
    handles = {}
    markers = max(len(f) for parts in norms.values() for f in parts.values()) < 15  # few points: show them
    for ax, method in zip(axes, methods):
        groups = sorted(norms[method], key=_group_order)
        layers = [g for g in groups if g not in ("embeddings", "head")]
        for group in groups:
            frame = norms[method][group]
            x = frame["step"].to_numpy(dtype=float)
            y = frame["value"].to_numpy(dtype=float)
            if group == "embeddings":
                style = {"color": "0.35", "linestyle": "--"}
            elif group == "head":
                style = {"color": "#d62728", "linestyle": "--"}
            else:
                k = layers.index(group)
                style = {"color": cmap(0.05 + 0.85 * k / max(len(layers) - 1, 1))}
            smooth, window = _smooth(y)
            window_used = max(window_used, window)
            if window > 1:
                ax.plot(x, y, alpha=0.15, linewidth=0.6, **style)
            line, = ax.plot(x, smooth, linewidth=1.4, label=group, marker="o" if markers else None,
                            markersize=3, **style)
            handles.setdefault(group, line)
        ax.set_yscale("log")
        ax.set_title(method)
        ax.set_xlabel("training step")
        ax.grid(True, which="both", alpha=0.25)
    for row in grid:
        row[0].set_ylabel("gradient L2 norm (log scale)")
    ordered = sorted(handles, key=_group_order)
    fig.legend([handles[g] for g in ordered], ordered, loc="outside right center", title="parameters")
    fig.suptitle(f"{column}: per-layer gradient norms over training (best trial per method)", fontsize=11)
    _save(fig, path)
    return window_used, len(methods)


# --- score against compute -----------------------------------------------------------------------------

def _passes_unit(largest: float) -> tuple[float, str]:
    """The x axis's unit for forward passes: thousands below a million examples, else millions."""
    return (1e3, "thousands") if largest < 1e6 else (1e6, "millions")


def _dodge(xs: np.ndarray, width: float) -> np.ndarray:
    """Sideways offsets for markers that would sit on one another: the points within `width` of each other's x
    spread evenly over a band `width` wide per neighbour, centred on their x (a lone point keeps its place)."""
    offsets = np.zeros(len(xs))
    order = np.argsort(xs, kind="stable")
    start = 0
    for i in range(1, len(order) + 1):
        if i == len(order) or xs[order[i]] - xs[order[start]] > width:
            n = i - start
            offsets[order[start:i]] = (np.arange(n) - (n - 1) / 2) * width
            start = i
    return offsets


def compute_figure(column: str, costs: pd.DataFrame, path: Path, scale: float = 1.0) -> None:
    """One task's methods at their selected configurations: the score (mean ± std over seeds) against the
    forward passes a trial spent (student + teacher, `raysdpb.report.tables.compute_costs`), a marker per
    method; a method up and to the right wins by spending more. Methods at the same compute (five spend twice
    finetune's passes) are spread a little sideways, so that each one's error bar shows."""
    fig = Figure(figsize=(6.8, 4.2), layout="constrained")
    ax = fig.subplots()
    metric = str(costs["metric"].iloc[0]) if len(costs) else "score"
    totals = costs["total_passes"].to_numpy(dtype=float)
    unit, unit_name = _passes_unit(float(np.nanmax(totals)) if len(totals) else 0.0)
    offsets = _dodge(totals / unit, 0.015 * float(np.nanmax(totals / unit))) if len(totals) else np.zeros(0)
    for r, offset in zip(costs.itertuples(index=False), offsets):
        x = r.total_passes / unit + offset
        err = r.std * scale if np.isfinite(r.std) else None
        ax.errorbar([x], [r.mean * scale], yerr=None if err is None else [[err], [err]],
                    marker=method_marker(r.method), color=method_color(r.method), markersize=8, capsize=3,
                    linestyle="none", label=r.method)
        if r.teacher_passes > 0:  # the student's own share, joined to the total by a dotted line
            ax.plot([r.forward_passes / unit + offset, x], [r.mean * scale] * 2, color=method_color(r.method),
                    linewidth=1, linestyle=":")
    ax.set_xlabel(f"forward passes per trial ({unit_name} of examples; student + teacher)")
    ax.set_ylabel(_metric_label(metric, scale))
    ax.grid(True, alpha=0.3)
    ax.set_xlim(left=0)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="method")
    fig.suptitle(f"{column}: score against compute (selected configuration, mean ± std over seeds)", fontsize=11)
    _save(fig, path)
