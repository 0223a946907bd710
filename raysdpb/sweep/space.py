"""A sampled search: the `search:` block as Ray Tune search-space domains, random search as a seeded list of
trials, and the sampled values of a searcher (Optuna, BOHB) as trials with stable ids. No Ray cluster here.

* Lists become choices (`tune.choice`); distributions become `tune.uniform`, `tune.loguniform` and `tune.randint`
  (whose upper bound Tune excludes: raysdpb's `randint: [a, b]` includes b, so Tune gets b + 1).
* `random` draws its trials when the sweep is planned, with Tune's own variant generator (`generate_variants`, what
  `BasicVariantGenerator(random_state=seed)` runs) and the sweep's seed, so the sweep runs them as a grid of sampled
  points: `--dry-run` lists them, `--resume` finds the same ones. A draw whose trial is drawn already is drawn again
  (sampling without repeats); a search block with fewer distinct trials than `num_samples` gives them all. The
  draws follow the block's keys in the order the config lists them (the same config: the same order too).
* `optuna` and `bohb` choose their trials as results come in (`raysdpb.sweep.searchers`); `SampledSpace` turns each
  suggestion into the trial it names, the same way the grid does (`grid.point_of`: the same id for the same config;
  values of hyperparameters the method does not use dropped). Lists reach those searchers as choices of positions
  (Optuna's and ConfigSpace's categoricals take plain scalars only: a LoRA block or `null` would not do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raysdpb.config import Distribution, ExperimentConfig
from raysdpb.sweep.grid import TrialPoint, base_trial, expand_search, point_of

__all__ = ["SampledSpace", "draw_random", "corner_points", "describe_search", "MAX_DRAWS_PER_SAMPLE"]

# random search draws at most this many times num_samples before it settles for the distinct trials it found
MAX_DRAWS_PER_SAMPLE = 100


def _plain(value: Any) -> Any:
    """numpy scalars (what BOHB returns) as Python values, so they hash and validate like the config's own."""
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value


@dataclass
class SampledSpace:
    """What a searcher samples, as plain data (pickled with the searcher and stored in `grid.json`): the base trial
    and the search block (a list per choice key, `{kind, low, high}` per distribution)."""

    base: dict
    search: dict

    @classmethod
    def of(cls, experiment: ExperimentConfig, report_every_steps: int | None = None,
           report_every: float | None = None) -> "SampledSpace":
        search = {k: v.model_dump() if isinstance(v, Distribution) else list(v) for k, v in experiment.search.items()}
        return cls(base_trial(experiment, report_every_steps=report_every_steps, report_every=report_every), search)

    def to_json(self) -> dict:
        from raysdpb.config import TrialConfig

        return {"base": TrialConfig.model_validate(self.base).model_dump(mode="json"), "search": self.search}

    @classmethod
    def from_json(cls, data: dict) -> "SampledSpace":
        return cls(dict(data["base"]), dict(data["search"]))

    def domains(self, *, positions: bool = False) -> dict:
        """The search block as Ray Tune domains; `positions`: a list as a choice of its positions (0, 1, ...)."""
        from ray import tune

        out = {}
        for key, spec in self.search.items():
            if isinstance(spec, list):
                out[key] = tune.choice(list(range(len(spec))) if positions else spec)
            elif spec["kind"] == "uniform":
                out[key] = tune.uniform(spec["low"], spec["high"])
            elif spec["kind"] == "loguniform":
                out[key] = tune.loguniform(spec["low"], spec["high"])
            else:  # both bounds included: Tune's randint excludes its upper bound
                out[key] = tune.randint(int(spec["low"]), int(spec["high"]) + 1)
        return out

    def values_of(self, suggestion: dict, *, positions: bool = False) -> dict:
        """A suggestion (one value per searched key) as the config values it stands for, in the search block's
        order: positions back to the list's values (with `positions`), numpy scalars as Python ones."""
        values = {}
        for key, spec in self.search.items():
            value = _plain(suggestion[key])
            values[key] = spec[int(value)] if positions and isinstance(spec, list) else value
        return values

    def point(self, values: dict) -> TrialPoint:
        return point_of(self.base, values)


def draw_random(space: SampledSpace, num_samples: int, seed: int) -> list[TrialPoint]:
    """`num_samples` distinct trials drawn by Tune's variant generator with a generator seeded by `seed` (fewer if
    the search block has fewer), in the order drawn."""
    import numpy as np
    from ray.tune.search.variant_generator import generate_variants

    domains = space.domains()
    rng = np.random.default_rng(seed)
    points: list[TrialPoint] = []
    seen: set[str] = set()
    for _ in range(MAX_DRAWS_PER_SAMPLE * num_samples):
        for _, variant in generate_variants(domains, random_state=rng):
            point = space.point(space.values_of(variant))
            if point.trial_id not in seen:
                seen.add(point.trial_id)
                points.append(point)
        if len(points) == num_samples:
            break
    return points


def corner_points(experiment: ExperimentConfig, report_every_steps: int | None = None,
                  report_every: float | None = None) -> list[TrialPoint]:
    """The trials at the ends of the search: each list's values and each distribution's bounds, combined. What a
    sampled search is checked with before Ray starts (every model, task and data file; the longest trial, ASHA's
    max_t), since its trials are not known before it runs."""
    search = {k: list(v.bounds()) if isinstance(v, Distribution) else v for k, v in experiment.search.items()}
    return expand_search(base_trial(experiment, report_every_steps=report_every_steps, report_every=report_every),
                         search)


def describe_search(experiment: ExperimentConfig, drawn: int | None = None) -> str:
    """One line on the search: the searcher, its samples and seed, and each searched key's choices or distribution."""
    sweep = experiment.sweep
    keys = ", ".join(f"{k}: {v.describe() if isinstance(v, Distribution) else v}"
                     for k, v in experiment.search.items()) or "nothing searched"
    if sweep is None or sweep.search == "grid":
        return f"search: grid ({keys})"
    how = {"random": "random (Ray Tune's variant generator)", "optuna": "optuna (OptunaSearch, TPE sampler)",
           "bohb": "bohb (TuneBOHB, with HyperBandForBOHB as the scheduler)"}[sweep.search]
    line = f"search: {how}, num_samples {sweep.num_samples}, seed {sweep.seed}; {keys}"
    if drawn is not None and drawn < sweep.num_samples:
        line += f"; the search block has only {drawn} distinct trials, all drawn"
    return line
