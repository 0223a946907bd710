"""Fault injection for the reliability tests, from the outside: `FaultyRecipe`, a `Recipe` subclass that
`$RAYSDPB_RECIPE=faults:FaultyRecipe` puts in place of the recipe in `python -m raysdpb.train` and on
every Ray Train worker of a sweep (the variable travels to the workers with the other `RAYSDPB_*` ones, and
the tests' `PYTHONPATH` holds `tests/`). Nothing of it is in the production loop.

`$RAYSDPB_FAULTS` is a JSON list of faults `{"point": ..., "step": N, ...}`; at its `point` and step N:

* `loss`: the step's loss counts as non-finite (the recipe's `loss_is_finite` says no);
* `after_step`: right after optimizer step N the process SIGKILLs itself (a worker dying for real: no
  `finally`, no flush; a checkpoint still being written in the background is finished and reported first);
  with `until` (a file path) it holds there instead until that file exists (a trial kept at a known step,
  after its reports so far, while a test acts);
* `save`: the checkpoint of step N is written to a full disk (its temporary file is `/dev/full`), so the
  checkpoint writer meets a real ENOSPC.

Optional keys: `times` (fire on the first `times` matches in this process; default 1), `where` (trial config
values that must match, to pick one trial of a sweep), `rank` (only on that rank), `marker` (a file path: fire
only if this call creates the file, so at most once across processes and restarts; the file holds the pid).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from pathlib import Path

from raysdpb.recipe import Recipe
from raysdpb.recipe.checkpoint import STATE_FILE
from raysdpb.recipe.recipe import RECIPE_ENV

log = logging.getLogger(__name__)

FAULTS_ENV = "RAYSDPB_FAULTS"
RECIPE = "faults:FaultyRecipe"  # tests/ is on the path of the tests' commands (trial_configs.sweep_env)


def fault_env(*faults: dict) -> dict[str, str]:
    """The environment variables that inject these faults into a command's trials."""
    return {FAULTS_ENV: json.dumps(list(faults)), RECIPE_ENV: RECIPE}


class Faults:
    """The faults of `$RAYSDPB_FAULTS` (read when created), and how often each has fired in this process."""

    def __init__(self, raw: str | None = None) -> None:
        raw = os.environ.get(FAULTS_ENV) if raw is None else raw
        faults = json.loads(raw) if raw else []
        self.faults = faults if isinstance(faults, list) else [faults]
        self.fired = [0] * len(self.faults)

    def _matching(self, point: str, step: int, config=None, rank: int = 0) -> list[int]:
        """The faults set for `point` and `step` on this trial and rank that have not fired their `times` yet."""
        found = []
        for i, fault in enumerate(self.faults):
            if fault.get("point") != point or int(fault.get("step", -1)) != int(step):
                continue
            if fault.get("rank") is not None and int(fault["rank"]) != int(rank):
                continue
            if any(_value(config, k) != v for k, v in (fault.get("where") or {}).items()):
                continue
            if self.fired[i] >= int(fault.get("times", 1)):
                continue
            found.append(i)
        return found

    def due(self, point: str, step: int, config=None, rank: int = 0) -> bool:
        """Whether a fault may fire at `point` and `step` (its marker not taken yet); nothing is counted."""
        return any(not self.faults[i].get("marker") or not os.path.exists(self.faults[i]["marker"])
                   for i in self._matching(point, step, config, rank))

    def fire(self, point: str, step: int, config=None, rank: int = 0) -> bool:
        """Whether a fault fires at `point` and `step` for this trial and rank (counting it if so)."""
        hit = False
        for i in self._matching(point, step, config, rank):
            fault = self.faults[i]
            if not _claim(fault.get("marker")):
                continue
            self.fired[i] += 1
            log.warning("fault injection (%s): %s at step %d", FAULTS_ENV, point, step)
            if point == "after_step" and fault.get("until"):
                while not os.path.exists(fault["until"]):
                    time.sleep(0.2)
            elif point == "after_step":
                os.kill(os.getpid(), signal.SIGKILL)
            hit = True
        return hit


def _value(config, key: str):
    return config.get(key) if isinstance(config, dict) else getattr(config, key, None)


def _claim(marker: str | None) -> bool:
    """True unless `marker` names a file that exists already (created now, holding this pid)."""
    if not marker:
        return True
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


class FaultyRecipe(Recipe):
    """The recipe with `$RAYSDPB_FAULTS` injected at the three points above."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.faults = Faults()

    def loss_is_finite(self, terms) -> bool:
        return super().loss_is_finite(terms) and not self.faults.fire("loss", self.step, self.cfg, self.context.rank)

    def train_step(self, batch):
        terms = super().train_step(batch)
        if terms is not None:
            if self.faults.due("after_step", self.step, self.cfg, self.context.rank):
                # the checkpoint a writer thread may still be writing finished and reported first, so a test knows
                # which checkpoint a kill after step N leaves (a kill during a write: tests/test_engine.py)
                self.finish_checkpoint()
            self.faults.fire("after_step", self.step, self.cfg, self.context.rank)
        return terms

    def write_checkpoint(self, path: Path, state: dict) -> None:
        # the state's step, not self.step: a writer thread runs while the loop takes further steps
        if self.faults.fire("save", state["step"], self.cfg, self.context.rank):
            path.mkdir(parents=True, exist_ok=True)
            (path / f"{STATE_FILE}.tmp").symlink_to("/dev/full")  # the writer meets a real ENOSPC there
        super().write_checkpoint(path, state)
