"""Reading an experiment folder, local or on an object store: trials.parquet and curves.parquet (pandas over
pyarrow), and the scalars the recipe wrote to TensorBoard (`<experiment>/tensorboard/<trial_id>/events.out.tfevents.*`,
see `raysdpb.sweep.worker`), read with TensorBoard's own `EventAccumulator`. An archived experiment may keep its
events packed as `<experiment>/tensorboard.tar.xz` (`pack_tensorboard`: a sixth of the space, for results a
repository keeps); the report reads them from there as from the folder."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysdpb.errors import UserError
from raysdpb.results.storage import download, exists, filesystem, join

log = logging.getLogger(__name__)

__all__ = ["load_experiments", "read_scalars", "resolve", "tensorboard_dir", "pack_tensorboard", "unpack_trial_events",
           "EVENTS_ARCHIVE"]

EVENTS_ARCHIVE = "tensorboard.tar.xz"  # an experiment's tensorboard/ folder, packed (members: <trial_id>/<file>)


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
    on this machine (or, where the experiment keeps them packed, `EVENTS_ARCHIVE`, the trial's events unpacked
    into `cache`); for an experiment on an object store (`s3://...`), a copy of the trial's events in `cache`
    (read once). None where the trial has no events."""
    if "://" not in str(experiment):
        path = Path(experiment) / "tensorboard" / str(trial_id)
        if path.is_dir() and any(path.glob("events.out.tfevents.*")):
            return path
        packed = Path(experiment) / EVENTS_ARCHIVE  # an archived experiment's events, unpacked into `cache` once
        if cache is None or not packed.is_file():
            return None
        local = cache / str(trial_id)
        if local.is_dir() or unpack_trial_events(packed, str(trial_id), local):
            return local if any(local.glob("events.out.tfevents.*")) else None
        return None
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


def _tarinfo(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A member as packed: no owner, no time (the same events give the same archive, byte for byte)."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mtime = 0
    return info


def pack_tensorboard(experiment: Path) -> Path | None:
    """Replace `<experiment>/tensorboard/` by `<experiment>/tensorboard.tar.xz` (members `<trial_id>/<file>`, in
    name order, without owners or times: the same events pack to the same bytes). An existing archive's members are
    kept where the folder does not have them (packing again after more trials were copied in adds those). Returns
    the archive, or None where the experiment has neither."""
    folder, target = Path(experiment) / "tensorboard", Path(experiment) / EVENTS_ARCHIVE
    if not folder.is_dir():
        return target if target.is_file() else None
    files = {str(f.relative_to(folder)): f for f in folder.rglob("*") if f.is_file()}
    partial = target.with_name(target.name + ".partial")
    with tarfile.open(partial, "w:xz") as out:
        kept: dict[str, bytes] = {}
        if target.is_file():
            with tarfile.open(target, "r:xz") as old:
                for member in old.getmembers():
                    if member.isfile() and member.name not in files:
                        kept[member.name] = old.extractfile(member).read()
        for name in sorted({*files, *kept}):
            if name in files:
                out.add(files[name], arcname=name, filter=_tarinfo)
            else:
                info = _tarinfo(tarfile.TarInfo(name))
                info.size = len(kept[name])
                out.addfile(info, io.BytesIO(kept[name]))
    os.replace(partial, target)
    shutil.rmtree(folder)
    return target


def unpack_trial_events(packed: Path, trial_id: str, dest: Path) -> bool:
    """One trial's event files from a packed experiment (`pack_tensorboard`) into `dest`; False where it has none."""
    with tarfile.open(packed, "r:xz") as archive:
        members = [m for m in archive.getmembers() if m.isfile() and m.name.startswith(f"{trial_id}/")
                   and ".." not in Path(m.name).parts and not Path(m.name).is_absolute()]
        if not members:
            return False
        dest.mkdir(parents=True, exist_ok=True)
        for member in members:
            target = dest / member.name[len(trial_id) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.extractfile(member).read())
    return True


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
