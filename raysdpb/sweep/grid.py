"""The sweep's grid: the `search:` block of a config expanded into trial configs, with stable trial ids.

Pure functions of the validated config (no Ray), so the grid can be tested and printed on its own.

* The grid is the cartesian product of the searched keys, in the order the config lists them. A searcher's
  sampled values become a trial the same way (`point_of`, used by `raysdpb.sweep.space`).
* A method does not get multiplied by the grid of a hyperparameter it does not use (`Method.hyperparameters`):
  `finetune` ignores alpha and tau, so a 3-alpha x 2-tau grid gives 6 dynsdpb trials but one finetune trial.
  Such a key keeps the base trial's value, and the duplicates this makes are dropped.
* A trial id is the method and a hash of the trial's config values (those that differ from the defaults), so
  it is the same in every run of the same grid (what `--resume` relies on), and does not change when other
  points are added to the grid or a new config key with a default appears. Keys that only say where things
  are on this machine (`data_dir`, `output_dir`, `progress_bar`) are not hashed, nor `teacher_model` in a
  method without a teacher (which ignores it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import dataclasses
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from raysdpb.config import HASHED_WHEN_SET, NOT_HASHED, Distribution, ExperimentConfig, TrialConfig
from raysdpb.errors import UserError
from raysdpb.methods import METHODS

__all__ = ["TrialPoint", "expand", "expand_search", "point_of", "base_trial", "trial_id", "method_hyperparameters",
           "flatten_config"]


@dataclass(frozen=True)
class TrialPoint:
    """One trial of the search: its stable id, a short label of its searched values, its config, and the searched
    values it uses (those of hyperparameters its method ignores dropped)."""

    trial_id: str
    label: str
    config: TrialConfig
    values: dict = dataclasses.field(default_factory=dict, compare=False)


def method_hyperparameters() -> frozenset[str]:
    """The trial keys some method uses and others ignore (the union of `Method.hyperparameters`)."""
    return frozenset(k for m in METHODS.values() for k in m.hyperparameters)


def trial_id(config: TrialConfig) -> str:
    """`<method>-<8 hex>`: a hash of the config values that change what is trained and differ from the
    defaults (so a new config key with a default leaves the ids of existing sweeps as they were; a new key of a block
    does where it is listed in `raysdpb.config.HASHED_WHEN_SET`)."""
    dumped = config.model_dump(mode="json")
    values = {}
    for name, field in TrialConfig.model_fields.items():
        if name in NOT_HASHED or (name == "teacher_model" and METHODS[config.method].soft_targets != "teacher"):
            continue
        if field.is_required() or getattr(config, name) != field.get_default(call_default_factory=True):
            values[name] = _hashed_block(name, getattr(config, name), dumped[name])
    digest = hashlib.sha1(json.dumps(values, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{config.method}-{digest[:8]}"


def _hashed_block(name: str, value: Any, dumped: Any) -> Any:
    """A block's dumped values less its keys in `HASHED_WHEN_SET` that are at their default."""
    if not isinstance(value, BaseModel):
        return dumped
    fields = type(value).model_fields
    return {k: v for k, v in dumped.items() if f"{name}.{k}" not in HASHED_WHEN_SET
            or getattr(value, k) != fields[k].get_default(call_default_factory=True)}


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def base_trial(experiment: ExperimentConfig, *, report_every_steps: int | None = None,
               report_every: float | None = None) -> dict:
    """The trial every point starts from, as a plain dict. `report_every_steps` (the sweep's `report_every_steps`)
    sets `eval_every_steps`, and `report_every` (a fraction of an epoch, in samples seen) `eval_every`, of trials
    that set neither, so ASHA sees a result that often as well as at every epoch end."""
    base = experiment.trial.model_dump()
    own_cadence = base.get("eval_every_steps") is not None or base.get("eval_every") is not None
    if report_every_steps and not own_cadence:
        base["eval_every_steps"] = report_every_steps
    if report_every and not own_cadence:
        base["eval_every"] = report_every
    return base


def point_of(base: dict, values: dict) -> TrialPoint:
    """The trial of `base` with the searched `values`; a hyperparameter its method ignores keeps the base value (so
    it does not multiply the trials, and a sampled value of it is dropped)."""
    method = METHODS[values.get("method", base["method"])]
    per_method = method_hyperparameters()
    used = {k: v for k, v in values.items() if k not in per_method or k in method.hyperparameters}
    label = ",".join(f"{k}={_format(v)}" for k, v in used.items()) or method.name
    try:  # each searched value is valid on the base trial, but a combination may not be (ps_kd, alpha 1.5)
        config = TrialConfig.model_validate({**base, **used})
    except ValidationError as err:
        first = err.errors()[0]
        raise UserError(f"search: the point {label} is invalid: {first['msg'].removeprefix('Value error, ')}; "
                        "search that method in a grid of its own") from None
    return TrialPoint(trial_id(config), label, config, used)


def expand_search(base: dict, search: dict[str, list]) -> list[TrialPoint]:
    """Every point of the cartesian product of `search`'s lists over `base`, in grid order, without duplicates."""
    keys = list(search)
    points: list[TrialPoint] = []
    seen: set[str] = set()
    for combo in itertools.product(*(search[k] for k in keys)):
        point = point_of(base, dict(zip(keys, combo)))
        if point.trial_id not in seen:
            seen.add(point.trial_id)
            points.append(point)
    return points


def expand(experiment: ExperimentConfig, *, report_every_steps: int | None = None,
           report_every: float | None = None) -> list[TrialPoint]:
    """Every trial of the grid, in grid order, without duplicates (a distribution is not a grid: its bounds are
    taken, as `raysdpb.sweep.space.corner_points` does)."""
    search = {k: list(v.bounds()) if isinstance(v, Distribution) else v for k, v in experiment.search.items()}
    return expand_search(base_trial(experiment, report_every_steps=report_every_steps, report_every=report_every),
                         search)


def flatten_config(config: TrialConfig | dict, prefix: str = "") -> dict[str, Any]:
    """Config values as flat columns: nested blocks become dotted keys (`lora.r`), as on the command line."""
    data = config.model_dump(mode="json") if isinstance(config, TrialConfig) else config
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= flatten_config(value, prefix=f"{name}.")
        else:
            out[name] = value
    return out
