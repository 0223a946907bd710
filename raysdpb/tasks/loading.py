"""Loading: `load_examples` (a task's split, optionally sliced, from a local mirror or the Hugging Face hub, as
normalised records), `parse_split`, and `resolve_task` (the `TaskSpec` of a config, registered or custom)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from raysdpb.errors import UserError
from raysdpb.tasks.custom import custom_task_spec
from raysdpb.tasks.fields import _first_present, _int_or, _RowError, _where
from raysdpb.tasks.spec import DATA_DIR_ENV, Converter, RawRow, TaskSpec, data_dir_from, get_task


def resolve_task(config) -> TaskSpec:
    """The `TaskSpec` of a `TrialConfig`: a registered task, or one built from `config.custom_task`."""
    if config.task == "custom":
        if config.custom_task is None:
            raise UserError("task 'custom' needs a custom_task block (files, text_fields, label_field)")
        return custom_task_spec(config.custom_task, data_dir_from(config.data_dir), eval_split=config.eval_split)
    return get_task(config.task)


def load_examples(task: TaskSpec | str, split: str, data_dir: str | None = None, *, custom=None) -> list[dict]:
    """The normalised records of one split: from the local mirror `data_dir` if given, else from the hub.

    `task` is a `TaskSpec` or a registered name; `"custom"` with `custom` (a `CustomTaskConfig`) builds the
    custom task's spec. A custom task always reads its own files."""
    if isinstance(task, TaskSpec):
        spec = task
    elif task == "custom":
        if custom is None:
            raise UserError("task 'custom' needs a custom_task block (files, text_fields, label_field)")
        spec = custom_task_spec(custom, data_dir)
    else:
        spec = get_task(task)
    base, window = parse_split(split)
    if base not in spec.splits:
        raise UserError(f"task {spec.name}: unknown split {base!r}; allowed: {', '.join(spec.splits)} "
                        "(a slice such as 'train[:1000]' or 'validation[80%:]' of one of them also works)")
    if spec.local is not None and (data_dir is not None or spec.hub is None):
        records = _load_local(spec, base, data_dir)
    elif spec.hub is None:
        raise UserError(f"task {spec.name} has no hub source: set {DATA_DIR_ENV} (or data_dir: in the config) "
                        "to a local mirror laid out like shared/data")
    else:
        records = _load_hub(spec, base)
    if window is None:
        return records
    start, stop = (_slice_bound(b, len(records)) for b in window)
    sliced = records[start:stop]
    if not sliced:
        raise UserError(f"task {spec.name}: split {split!r} is empty ({base} has {len(records)} records)")
    return sliced


_SPLIT_SLICE = re.compile(r"^\s*([^\[\]]+?)\s*(?:\[\s*(-?\d+%?)?\s*:\s*(-?\d+%?)?\s*\])?\s*$")


def parse_split(split: str) -> tuple[str, tuple[str | None, str | None] | None]:
    """`"train"` -> ("train", None); `"validation[:80%]"` -> ("validation", (None, "80%")), as in `datasets`."""
    m = _SPLIT_SLICE.match(split)
    if m is None:
        raise UserError(f"split {split!r}: expected a split name, optionally sliced like 'train[:1000]' or "
                        "'validation[80%:]'")
    if "[" not in split:
        return m.group(1), None
    return m.group(1), (m.group(2), m.group(3))


def _slice_bound(bound: str | None, n: int) -> int | None:
    if bound is None:
        return None
    if bound.endswith("%"):
        return round(int(bound[:-1]) * n / 100)
    return int(bound)


def _records_from(rows: Iterable[RawRow], convert: Converter, spec: TaskSpec, split: str, source: str) -> list[dict]:
    records = []
    for path, record, line, row in rows:
        try:
            out = convert(row, spec)
        except _RowError as err:
            raise UserError(f"{_where(path, record, line)}: field {err.field!r}: {err.message}") from None
        if "idx" not in out:
            out = {"idx": _int_or(_first_present(row, ("idx", "index")), len(records)), **out}
        records.append(out)
    if not records:
        raise UserError(f"task {spec.name}: split {split!r} is empty ({source} has no records)")
    return records


def _load_local(spec: TaskSpec, split: str, data_dir: str | None) -> list[dict]:
    base = Path(data_dir) if data_dir is not None else Path.cwd()
    if data_dir is not None and spec.hub is not None and not base.is_dir():
        raise UserError(f"data directory {base} does not exist; set data_dir: (or {DATA_DIR_ENV}) to a local "
                        "mirror laid out like shared/data")
    options = spec.local.splits.get(split) if spec.local else None
    if not options:
        raise UserError(f"task {spec.name}: split {split!r} has no local files; the local mirror has: "
                        f"{', '.join(spec.local.splits) if spec.local else 'nothing'}")
    for option in options:
        paths = [base / p for p in option.paths]
        if all(p.is_file() for p in paths):
            break
    else:
        missing = [str(base / p) for p in options[0].paths if not (base / p).is_file()]
        message = f"task {spec.name}: split {split!r} not found: missing {', '.join(missing)}"
        if len(options) > 1:
            message += "; expected one of: " + " or ".join(" + ".join(o.paths) for o in options)
        if spec.local.note:
            message += f" ({spec.local.note})"
        raise UserError(message)
    source = " + ".join(map(str, paths))
    return _records_from(option.reader(paths), option.convert, spec, split, source)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the hub cannot be reached or the dataset is not there'."""
    errors: list[type[BaseException]] = [OSError, ConnectionError, TimeoutError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import httpx

        errors.append(httpx.HTTPError)
    except ImportError:  # pragma: no cover
        pass
    try:
        from datasets.exceptions import DatasetNotFoundError

        errors.append(DatasetNotFoundError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _load_hub(spec: TaskSpec, split: str) -> list[dict]:
    hub = spec.hub
    if split not in hub.splits:
        raise UserError(f"task {spec.name}: split {split!r} is not on the hub; hub splits: {', '.join(hub.splits)}")
    hub_split = hub.splits[split]
    what = f"{hub.path}" + (f" ({hub.name})" if hub.name else "") + f" split {hub_split}"
    try:
        import datasets
    except ImportError:
        raise UserError(f"reading {what} from the Hugging Face hub needs the `datasets` package; install it, or "
                        f"set {DATA_DIR_ENV} (or data_dir: in the config) to a local mirror laid out like "
                        "shared/data") from None
    try:
        rows = datasets.load_dataset(hub.path, hub.name, split=hub_split).to_list()
    except _hub_errors() as err:
        raise UserError(f"cannot load {what} from the Hugging Face hub ({type(err).__name__}: {err}); without "
                        f"network access set {DATA_DIR_ENV} (or data_dir: in the config) to a local mirror laid "
                        "out like shared/data (see its MANIFEST.md)") from None
    return _records_from(((f"hub {what}", i + 1, None, row) for i, row in enumerate(rows)), hub.convert, spec,
                         split, f"the hub's {what}")
