"""Reading an experiment folder, local or on an object store: trials.parquet and curves.parquet (pandas over
pyarrow), and the scalars the recipe wrote to TensorBoard (`<experiment>/tensorboard/<trial_id>/events.out.tfevents.*`,
see `raysdpb.sweep.worker`), read with TensorBoard's own `EventAccumulator`."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysdpb.errors import UserError
from raysdpb.results.storage import download, exists, filesystem, join

log = logging.getLogger(__name__)

__all__ = ["load_experiments", "read_scalars", "resolve", "tensorboard_dir"]


def _read(path: str) -> pd.DataFrame | None:
    if not exists(path):
        return None
    fs, p = filesystem(path)
    return pq.read_table(p, filesystem=fs).to_pandas()


def resolve(path: str) -> str:
    """A local path made absolute (a URI as it is)."""
    return str(path) if "://" in str(path) else os.path.abspath(os.path.expanduser(str(path)))


def load_experiments(paths: list[str]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """The trials and curves of every experiment folder, with an `experiment` column; a trial id found in
    an earlier folder too keeps the earlier folder's row (the same config and seed, so the same trial).
    Returns (trials, curves, notes). A folder without trials.parquet is a `UserError`."""
    trials, curves, notes = [], [], []
    seen: set[str] = set()
    for path in paths:
        path = resolve(path)
        fs, p = filesystem(path)
        info = fs.get_file_info(p)
        if info.type == pafs.FileType.NotFound:
            raise UserError(f"{path}: no such folder; give an experiment folder a sweep wrote "
                            "(<sweep.storage_path>/<sweep.name>, e.g. ray_results/quickstart)")
        found = _read(join(path, "trials.parquet"))
        if found is None:
            hint = ""
            if info.type == pafs.FileType.Directory and isinstance(fs, pafs.LocalFileSystem):
                below = sorted(str(x.parent.relative_to(p)) for x in Path(p).glob("*/trials.parquet"))
                if below:
                    hint = f"; the experiment folders below it are: {', '.join(below)}"
            raise UserError(f"{path}: no trials.parquet here, so this is not an experiment folder of "
                            f"`python -m raysdpb.sweep` (it writes <sweep.storage_path>/<sweep.name>/trials.parquet)"
                            f"{hint}")
        found["experiment"] = path
        if "trial_id" in found:
            repeated = found["trial_id"].isin(seen)
            if repeated.any():
                notes.append(f"{int(repeated.sum())} trial(s) of {path} were already in an earlier folder (same "
                             "config and seed) and are counted once.")
                found = found[~repeated]
            seen.update(found["trial_id"])
        trials.append(found)
        curve = _read(join(path, "curves.parquet"))
        if curve is not None and len(curve):
            curve["experiment"] = path
            if "trial_id" in curve and "trial_id" in found:
                curve = curve[curve["trial_id"].isin(found["trial_id"])]
            curves.append(curve)
    all_trials = pd.concat(trials, ignore_index=True, sort=False) if trials else pd.DataFrame()
    all_curves = pd.concat(curves, ignore_index=True, sort=False) if curves else pd.DataFrame()
    return all_trials, all_curves, notes


def tensorboard_dir(experiment: str, trial_id: str, cache: Path | None = None) -> Path | None:
    """Where the recipe of a trial wrote its TensorBoard events (rank 0), as a local folder: the experiment's own
    on this machine; for an experiment on an object store (`s3://...`), a copy of the trial's events in `cache`
    (read once). None where the trial has no events."""
    if "://" not in str(experiment):
        path = Path(experiment) / "tensorboard" / str(trial_id)
        return path if path.is_dir() and any(path.glob("events.out.tfevents.*")) else None
    if cache is None:
        return None
    local = cache / str(trial_id)
    if not local.is_dir():
        remote = join(str(experiment), "tensorboard", str(trial_id))
        fs, inside = filesystem(remote)
        if fs.get_file_info(inside).type != pafs.FileType.Directory:
            return None
        download(remote, local)
    return local if any(local.glob("events.out.tfevents.*")) else None


def read_scalars(directory: Path, prefixes: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """Every scalar series whose tag starts with one of `prefixes`, as `{tag: DataFrame(step, value)}`; a step
    written twice (a trial resumed from a checkpoint logs its steps again) keeps its last value."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:  # tensorboard is a dependency; without it the figures that need it are left out
        return {}
    try:
        accumulator = EventAccumulator(str(directory), size_guidance={"scalars": 0})
        accumulator.Reload()
        tags = [t for t in accumulator.Tags().get("scalars", []) if t.startswith(prefixes)]
        out = {}
        for tag in tags:
            events = accumulator.Scalars(tag)
            frame = pd.DataFrame({"step": [e.step for e in events], "value": [e.value for e in events],
                                  "wall_time": [e.wall_time for e in events]})
            frame = frame.sort_values("wall_time").drop_duplicates("step", keep="last").sort_values("step")
            out[tag] = frame[["step", "value"]].reset_index(drop=True)
        return out
    except Exception as err:  # noqa: BLE001 - a truncated or foreign event file must not end the report
        log.warning("could not read TensorBoard events in %s: %s", directory, err)
        return {}
