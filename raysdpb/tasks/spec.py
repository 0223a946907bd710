"""What a task is: `TaskSpec` and where its data lies (`HubSource`, `LocalSource`, `LocalFiles`), the registry
(`TASKS`, `register`, `get_task`), the local-mirror setting (`data_dir_from`, `DATA_DIR_ENV`) and the types of
readers and converters."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

from raysdpb.errors import UserError

DATA_DIR_ENV = "RAYSDPB_DATA_DIR"

# A raw row as a reader yields it: (file, record number from 1, line number or None, the row's fields).
RawRow = tuple["Path | str", int, "int | None", Mapping[str, Any]]
Reader = Callable[[Sequence[Path]], Iterable[RawRow]]
Converter = Callable[[Mapping[str, Any], "TaskSpec"], dict]


# --- the description of a task -----------------------------------------------------------------------------

@dataclass(frozen=True)
class HubSource:
    """Where a task lies on the Hugging Face hub. `splits` maps the task's split names to the hub's;
    `convert` makes a hub row a normalised record."""

    path: str                                   # "nyu-mll/glue"
    name: str | None                            # the dataset config, "rte"
    convert: Converter
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "validation": "validation"})


@dataclass(frozen=True)
class LocalFiles:
    """One way a split can lie in a local mirror: `paths` (relative to the mirror, or absolute), read in
    order by `reader` and concatenated; `convert` makes each raw row a normalised record."""

    paths: tuple[str, ...]
    reader: Reader
    convert: Converter


@dataclass(frozen=True)
class LocalSource:
    """A task's files in a local mirror: per split, alternative file sets (the first complete one is read).
    `note` is added to the message when a split's files are missing."""

    splits: Mapping[str, tuple[LocalFiles, ...]]
    note: str = ""


@dataclass(frozen=True)
class TaskSpec:
    name: str                                   # "superglue/cb"
    kind: Literal["classification", "multiple_choice", "generation"]
    labels: tuple[str, ...]                     # class names in class-id order (multiple_choice: the options)
    metrics: tuple[str, ...]                    # the first one is the main metric (model selection and ASHA)
    train_split: str = "train"
    eval_splits: tuple[tuple[str, str], ...] = (("validation", ""),)   # (split, metric-key prefix)
    hub: HubSource | None = field(default=None, compare=False, repr=False)
    local: LocalSource | None = field(default=None, compare=False, repr=False)
    answer_type: str | None = None              # generation tasks: "number" or "choice" (answer extraction)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    @property
    def splits(self) -> tuple[str, ...]:
        """Every split name this task can be loaded with (from the hub or from a local mirror)."""
        names = dict.fromkeys([self.train_split, *(s for s, _ in self.eval_splits)])
        for source in (self.hub.splits if self.hub else {}), (self.local.splits if self.local else {}):
            names.update(dict.fromkeys(source))
        return tuple(names)

    # which splits a trial reads: the one rule for the recipe, the sweep's checks and the main metric
    def training_split(self, override: str | None = None) -> str:
        """The split a trial trains on: its `train_split` when set, else the task's."""
        return override or self.train_split

    def evaluation_splits(self, override: str | None = None) -> tuple[tuple[str, str], ...]:
        """The `(split, metric-key prefix)` pairs a trial evaluates on: its `eval_split` alone and unprefixed when
        set, else the task's."""
        return ((override, ""),) if override else tuple(self.eval_splits)


TASKS: dict[str, TaskSpec] = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.name in TASKS:
        raise ValueError(f"task {spec.name!r} is already registered")
    if not spec.metrics:
        raise ValueError(f"task {spec.name!r} needs at least one metric")
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UserError(f"unknown task {name!r}; allowed: {', '.join(sorted(TASKS))}, custom "
                        "(with a custom_task block)") from None


def data_dir_from(config_value: str | None) -> str | None:
    """The local mirror to read: the config's `data_dir`, else `$RAYSDPB_DATA_DIR`, else None (the hub)."""
    value = config_value or os.environ.get(DATA_DIR_ENV) or None
    return str(Path(value).expanduser()) if value else None
