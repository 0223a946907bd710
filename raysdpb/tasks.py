"""Tasks as data: a registry mapping a name (`superglue/cb`) to where its data is and how to read it.

INTERFACE (fixed; the training loop relies on it):

* `TASKS: dict[str, TaskSpec]`, filled by `register(TaskSpec(...))` entries.
* `TaskSpec.kind`: "classification" | "multiple_choice" | "generation".
* `load_examples(task, split, data_dir=None, *, custom=None) -> list[dict]`, with records normalised per kind:
    - classification:   {"idx": int, "text": str, "text_pair": str | None, "label": int}
    - multiple_choice:  {"idx": int, "context": str, "choices": list[str], "label": int}
    - generation:       {"idx": int, "prompt": str, "answer": str, "reference": str, ...}
  `label` is a class id into `TaskSpec.labels`.
* `resolve_task(config)` -> the `TaskSpec` of a `TrialConfig` (a registered task, or one built from
  `config.custom_task`).
* `data_dir_from(value)` -> the local mirror to read: the config's `data_dir`, else `$RAYSDPB_DATA_DIR`, else
  None, which means the Hugging Face hub.

Where the data comes from:

* `data_dir` None: the Hugging Face hub (`TaskSpec.hub`, read with `datasets.load_dataset`). Without a
  network (or with `HF_HUB_OFFLINE=1` and nothing cached) a `UserError` says to point `RAYSDPB_DATA_DIR` at a
  local mirror.
* `data_dir` set: a local mirror laid out like `shared/data` (`TaskSpec.local`): per split one or more
  alternative file sets, relative to `data_dir`; the first whose files all exist is read. A file set is read
  by a reader (GLUE TSVs with the csv module, JSONL with the json module, custom CSV/TSV/Parquet with
  pandas/pyarrow) into raw rows, and each row is made a record by the set's converter.

A bad row (a missing field, a label outside the label set, a row that cannot be parsed) or an empty split
stops loading with a `UserError` naming the file, the record (and line) and the field. Nothing is dropped
silently: the only rows skipped are blank lines, and their count is logged.

Adding a task means adding one `register(TaskSpec(...))` entry below.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

from raysdpb.errors import UserError

__all__ = [
    "TaskSpec", "HubSource", "LocalFiles", "LocalSource", "TASKS", "register", "get_task", "resolve_task",
    "custom_task_spec", "load_examples", "parse_split", "data_dir_from", "DATA_DIR_ENV",
    # building blocks for new entries
    "tsv_reader", "jsonl_reader", "wic_text_reader", "records_reader", "as_is", "pair",
]

log = logging.getLogger(__name__)

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


def resolve_task(config) -> TaskSpec:
    """The `TaskSpec` of a `TrialConfig`: a registered task, or one built from `config.custom_task`."""
    if config.task == "custom":
        if config.custom_task is None:
            raise UserError("task 'custom' needs a custom_task block (files, text_fields, label_field)")
        return custom_task_spec(config.custom_task, data_dir_from(config.data_dir), eval_split=config.eval_split)
    return get_task(config.task)


# --- loading -----------------------------------------------------------------------------------------------

class _RowError(Exception):
    """A bad field in one row; the loader adds the file and record to the message."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


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


def _where(path: Path | str, record: int, line: int | None) -> str:
    return f"{path}, record {record}" + (f" (line {line})" if line is not None else "")


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


# --- field access and labels ---------------------------------------------------------------------------------

def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _first_present(row: Mapping[str, Any], names: Sequence[str]) -> Any:
    for name in names:
        value = row.get(name)
        if not _missing(value):
            return value
    return None


def _get(row: Mapping[str, Any], *names: str) -> Any:
    """The value of the first of `names` that the row has (a field may have alternative names)."""
    value = _first_present(row, names)
    if value is None:
        fields = ", ".join(str(k) for k in row.keys() if k is not None)
        raise _RowError(" or ".join(names), f"missing (the record has: {fields or 'no fields'})")
    return value


def _text(row: Mapping[str, Any], *names: str) -> str:
    value = _get(row, *names)
    return value if isinstance(value, str) else str(value)


def _int_or(value: Any, default: int) -> int:
    if isinstance(value, bool) or value is None:
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return default


def _class_id(value: Any, labels: Sequence[str], field_name: str = "label") -> int:
    """A class id from the label forms the files use: an id (int or digits), a class name (any case) or a
    boolean (for the classes ("false", "true"))."""
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int):
        if 0 <= value < len(labels):
            return value
    elif isinstance(value, str):
        s = value.strip()
        if s in labels:
            return labels.index(s)
        lower = [name.lower() for name in labels]
        if s.lower() in lower:
            return lower.index(s.lower())
        if s.lstrip("-").isdigit() and 0 <= int(s) < len(labels):
            return int(s)
    raise _RowError(field_name, f"label {value!r} is outside the label set {list(labels)} "
                                f"(or class ids 0..{len(labels) - 1})")


def _label_text(value: Any) -> str:
    """A label value of a custom file as a string: booleans as true/false, whole floats without '.0'."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _named_id(value: Any, labels: Sequence[str], field_name: str) -> int:
    """A custom task's class id: the label's position in the label set (matched as a string)."""
    s = _label_text(value)
    if s in labels:
        return labels.index(s)
    matches = [i for i, name in enumerate(labels) if name.lower() == s.lower()]
    if len(matches) == 1:
        return matches[0]
    raise _RowError(field_name, f"label {s!r} is outside the label set {list(labels)}")


# --- readers -------------------------------------------------------------------------------------------------

def _log_blank(path: Path, blank: int) -> None:
    if blank:
        log.info("%s: skipped %d blank line(s)", path, blank)


def _open_text(path: Path):
    # utf-8-sig: MRPC (and some exports) start with a byte order mark, which would otherwise end up in the
    # name of the first column.
    return open(path, encoding="utf-8-sig", newline="")


def tsv_reader(columns: Sequence[str] | None = None) -> Reader:
    """GLUE TSVs: a header row (or `columns` for headerless files such as CoLA's), tab-separated, no quoting
    (GLUE texts contain raw quote characters)."""

    def read(paths: Sequence[Path]) -> Iterator[RawRow]:
        for path in paths:
            blank = 0
            try:
                with _open_text(path) as f:
                    rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
                    names = list(columns) if columns is not None else next(rows, None)
                    if names is None:
                        continue
                    record = 0
                    for values in rows:
                        if not values:
                            blank += 1
                            continue
                        record += 1
                        if len(values) > len(names):
                            raise UserError(f"{_where(path, record, rows.line_num)}: unreadable row: "
                                            f"{len(values)} tab-separated columns, expected {len(names)} "
                                            f"({', '.join(names)})")
                        yield path, record, rows.line_num, dict(zip(names, values))
            except UnicodeDecodeError as err:
                raise UserError(f"{path}: not UTF-8 text ({err})") from None
            except csv.Error as err:
                raise UserError(f"{path}: unreadable TSV ({err})") from None
            _log_blank(path, blank)

    return read


def _jsonl_rows(path: Path) -> Iterator[RawRow]:
    blank = record = 0
    try:
        with _open_text(path) as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    blank += 1
                    continue
                record += 1
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{_where(path, record, line_no)}: unreadable row: "
                                    f"not valid JSON ({err})") from None
                if not isinstance(row, dict):
                    raise UserError(f"{_where(path, record, line_no)}: unreadable row: expected a JSON object, "
                                    f"got {type(row).__name__}")
                yield path, record, line_no, row
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text ({err})") from None
    _log_blank(path, blank)


def jsonl_reader(paths: Sequence[Path]) -> Iterator[RawRow]:
    """JSON lines: one object per line."""
    for path in paths:
        yield from _jsonl_rows(path)


def wic_text_reader(paths: Sequence[Path]) -> Iterator[RawRow]:
    """The original WiC release: `<split>.data.txt` (target word, PoS, indices, sentence 1, sentence 2; tab
    separated, no header) and `<split>.gold.txt` (T or F per line, aligned with the data lines)."""
    data_path, gold_path = paths
    columns = ("word", "pos", "indices", "sentence1", "sentence2")
    data = list(tsv_reader(columns)([data_path]))
    try:
        gold = [line.strip() for line in gold_path.read_text(encoding="utf-8-sig").splitlines() if line.strip()]
    except UnicodeDecodeError as err:
        raise UserError(f"{gold_path}: not UTF-8 text ({err})") from None
    if len(gold) != len(data):
        raise UserError(f"{data_path} has {len(data)} records but {gold_path} has {len(gold)} labels; the two "
                        "files must be aligned line by line")
    for (path, record, line, row), label in zip(data, gold):
        value = {"T": True, "F": False}.get(label, label)
        yield path, record, line, {**row, "label": value}


def records_reader(read: Callable[[Path], list[dict]]) -> Reader:
    """Adapt a reader that returns finished records per file (e.g. `raysdpb.nlg.read_gsm8k`); use it with
    `convert=as_is`."""

    def reader(paths: Sequence[Path]) -> Iterator[RawRow]:
        for path in paths:
            for i, row in enumerate(read(path)):
                yield path, i + 1, None, row

    return reader


def as_is(row: Mapping[str, Any], spec: TaskSpec) -> dict:
    return dict(row)


# --- converters ------------------------------------------------------------------------------------------

def pair(text: str | tuple[str, ...], text_pair: str | tuple[str, ...] | None = None,
         label: str = "label") -> Converter:
    """A classification converter: `text` (and `text_pair`) fields, each a name or alternative names."""
    text_names = (text,) if isinstance(text, str) else text
    pair_names = (text_pair,) if isinstance(text_pair, str) else text_pair

    def convert(row: Mapping[str, Any], spec: TaskSpec) -> dict:
        return {
            "text": _text(row, *text_names),
            "text_pair": _text(row, *pair_names) if pair_names else None,
            "label": _class_id(_get(row, label), spec.labels, label),
        }

    return convert


def wic(row: Mapping[str, Any], spec: TaskSpec) -> dict:
    # The model must know which word's sense is asked about: it leads the first text.
    return {
        "text": f"{_text(row, 'word')}: {_text(row, 'sentence1')}",
        "text_pair": _text(row, "sentence2"),
        "label": _class_id(_get(row, "label"), spec.labels),
    }


COPA_CONNECTIVES = {"cause": " because", "effect": " so"}


def copa(row: Mapping[str, Any], spec: TaskSpec) -> dict:
    # "The man turned on the faucet." + effect -> "The man turned on the faucet so" + each choice.
    question = _text(row, "question").strip()
    if question not in COPA_CONNECTIVES:
        raise _RowError("question", f"{question!r} is neither 'cause' nor 'effect'")
    premise = _text(row, "premise").strip()
    context = premise[:-1] if premise.endswith(".") else premise
    return {
        "context": context + COPA_CONNECTIVES[question],
        "choices": [_text(row, "choice1"), _text(row, "choice2")],
        "label": _class_id(_get(row, "label"), spec.labels),
    }


# --- the registered tasks --------------------------------------------------------------------------------

GLUE = "nyu-mll/glue"
SUPER_GLUE = "aps/super_glue"
_TSV = tsv_reader()
_COLA_COLUMNS = ("source", "label", "original_label", "sentence")   # the raw CoLA release has no header


def _glue_files(task: str, convert: Converter, splits: Mapping[str, str], reader: Reader = _TSV) -> dict:
    return {split: (LocalFiles((f"glue/{task}/{file}",), reader, convert),) for split, file in splits.items()}


def _superglue_files(task: str, convert: Converter, val_names=("val.jsonl", "validation.jsonl"),
                     train_names=("train.jsonl",)) -> dict:
    """The original SuperGLUE release names `val.jsonl`; a Hugging Face export names `validation.jsonl`."""
    return {
        "train": tuple(LocalFiles((f"superglue/{task}/{n}",), jsonl_reader, convert) for n in train_names),
        "validation": tuple(LocalFiles((f"superglue/{task}/{n}",), jsonl_reader, convert) for n in val_names),
    }


NLI2 = ("entailment", "not_entailment")

register(TaskSpec(
    name="glue/cola", kind="classification", labels=("unacceptable", "acceptable"), metrics=("matthews", "accuracy"),
    hub=HubSource(GLUE, "cola", pair("sentence")),
    local=LocalSource({
        # the raw CoLA release (GLUE's train.tsv is in_domain_train.tsv, its dev.tsv both dev files)
        "train": (LocalFiles(("glue/cola/in_domain_train.tsv",), tsv_reader(_COLA_COLUMNS), pair("sentence")),
                  LocalFiles(("glue/cola/train.tsv",), tsv_reader(_COLA_COLUMNS), pair("sentence"))),
        "validation": (LocalFiles(("glue/cola/in_domain_dev.tsv", "glue/cola/out_of_domain_dev.tsv"),
                                  tsv_reader(_COLA_COLUMNS), pair("sentence")),
                       LocalFiles(("glue/cola/dev.tsv",), tsv_reader(_COLA_COLUMNS), pair("sentence"))),
    }),
))

register(TaskSpec(
    name="glue/sst2", kind="classification", labels=("negative", "positive"), metrics=("accuracy",),
    hub=HubSource(GLUE, "sst2", pair("sentence")),
    # GLUE's header names the text `sentence`; the shared mirror's copy names it `text`
    local=LocalSource(_glue_files("sst2", pair(("sentence", "text")), {"train": "train.tsv", "validation": "dev.tsv"})),
))

register(TaskSpec(
    name="glue/mrpc", kind="classification", labels=("not_equivalent", "equivalent"), metrics=("accuracy", "f1"),
    hub=HubSource(GLUE, "mrpc", pair("sentence1", "sentence2")),
    local=LocalSource(_glue_files("mrpc", pair("#1 String", "#2 String", "Quality"),
                                  {"train": "train.tsv", "validation": "dev.tsv"})),
))

register(TaskSpec(
    name="glue/qqp", kind="classification", labels=("not_duplicate", "duplicate"), metrics=("accuracy", "f1"),
    hub=HubSource(GLUE, "qqp", pair("question1", "question2")),
    local=LocalSource(_glue_files("qqp", pair("question1", "question2", "is_duplicate"),
                                  {"train": "train.tsv", "validation": "dev.tsv"}),
                      note="the shared mirror has no QQP; add the GLUE QQP TSVs to your mirror"),
))

register(TaskSpec(
    name="glue/qnli", kind="classification", labels=NLI2, metrics=("accuracy",),
    hub=HubSource(GLUE, "qnli", pair("question", "sentence")),
    local=LocalSource(_glue_files("qnli", pair("question", "sentence"),
                                  {"train": "train.tsv", "validation": "dev.tsv"}),
                      note="the shared mirror has no QNLI; add the GLUE QNLI TSVs to your mirror"),
))

register(TaskSpec(
    name="glue/rte", kind="classification", labels=NLI2, metrics=("accuracy",),
    hub=HubSource(GLUE, "rte", pair("sentence1", "sentence2")),
    local=LocalSource(_glue_files("rte", pair("sentence1", "sentence2"),
                                  {"train": "train.tsv", "validation": "dev.tsv"})),
))

register(TaskSpec(
    name="glue/mnli", kind="classification", labels=("entailment", "neutral", "contradiction"), metrics=("accuracy",),
    eval_splits=(("validation_matched", ""), ("validation_mismatched", "mm_")),
    hub=HubSource(GLUE, "mnli", pair("premise", "hypothesis"),
                  splits={s: s for s in ("train", "validation_matched", "validation_mismatched")}),
    local=LocalSource(_glue_files("mnli", pair("sentence1", "sentence2", "gold_label"),
                                  {"train": "train.tsv", "validation_matched": "dev_matched.tsv",
                                   "validation_mismatched": "dev_mismatched.tsv"}),
                      note="the shared mirror has no MNLI; add the GLUE MNLI TSVs to your mirror"),
))

register(TaskSpec(
    name="superglue/boolq", kind="classification", labels=("false", "true"), metrics=("accuracy",),
    hub=HubSource(SUPER_GLUE, "boolq", pair("question", "passage")),
    local=LocalSource(_superglue_files("boolq", pair("question", "passage")),
                      note="the shared mirror has no BoolQ train split: add superglue/boolq/train.jsonl to your "
                           "mirror, or set train_split (or pick another task)"),
))

register(TaskSpec(
    name="superglue/cb", kind="classification", labels=("entailment", "contradiction", "neutral"),
    metrics=("accuracy", "macro_f1"),
    hub=HubSource(SUPER_GLUE, "cb", pair("premise", "hypothesis")),
    local=LocalSource(_superglue_files("cb", pair("premise", "hypothesis"),
                                       val_names=("validation.jsonl", "val.jsonl"))),
))

register(TaskSpec(
    name="superglue/copa", kind="multiple_choice", labels=("choice1", "choice2"), metrics=("accuracy",),
    hub=HubSource(SUPER_GLUE, "copa", copa),
    local=LocalSource(_superglue_files("copa", copa, val_names=("validation.jsonl", "val.jsonl"))),
))

register(TaskSpec(
    name="superglue/rte", kind="classification", labels=NLI2, metrics=("accuracy",),
    hub=HubSource(SUPER_GLUE, "rte", pair("premise", "hypothesis")),
    local=LocalSource(_superglue_files("rte", pair("premise", "hypothesis"))),
))

_WIC_TEXT = {split: LocalFiles((f"superglue/wic/{name}.data.txt", f"superglue/wic/{name}.gold.txt"),
                               wic_text_reader, wic)
             for split, name in (("train", "train"), ("validation", "dev"), ("test", "test"))}
register(TaskSpec(
    name="superglue/wic", kind="classification", labels=("false", "true"), metrics=("accuracy",),
    hub=HubSource(SUPER_GLUE, "wic", wic),
    # SuperGLUE JSONL when present, else the original WiC release (which also has a labelled test split)
    local=LocalSource({
        "train": (LocalFiles(("superglue/wic/train.jsonl",), jsonl_reader, wic), _WIC_TEXT["train"]),
        "validation": (LocalFiles(("superglue/wic/val.jsonl",), jsonl_reader, wic),
                       LocalFiles(("superglue/wic/validation.jsonl",), jsonl_reader, wic), _WIC_TEXT["validation"]),
        "test": (_WIC_TEXT["test"],),
    }),
))


# --- decoder-only (NLG) tasks: prompt + answer, evaluated by generation (raysdpb.nlg) ------------------------

def _json_records_reader(paths: Sequence[Path]) -> Iterator[RawRow]:
    """A JSON array of objects, or JSON lines (AQuA's `.json` files are JSON lines)."""
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err})") from None
        if not text.lstrip().startswith("["):
            yield from _jsonl_rows(path)
            continue
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}: not valid JSON ({err})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserError(f"{_where(path, i + 1, None)}: unreadable row: expected a JSON object, "
                                f"got {type(row).__name__}")
            yield path, i + 1, None, row


def _hellaswag_reader(paths: Sequence[Path]) -> Iterator[RawRow]:
    from raysdpb.nlg import hellaswag_rows

    for path in paths:
        try:
            rows = hellaswag_rows(path)
        except (OSError, EOFError, ValueError) as err:
            raise UserError(f"{path}: unreadable HellaSwag text release ({err})") from None
        for i, row in enumerate(rows):
            yield path, i + 1, 6 * i + 1, row


def _sliced(reader: Reader, start: int | None, stop: int | None) -> Reader:
    def read(paths: Sequence[Path]) -> Iterator[RawRow]:
        yield from list(reader(paths))[start:stop]

    return read


def _nlg(example: Callable[[dict], dict], hub_row: Callable[[dict], dict] | None = None) -> Converter:
    """A converter from one of `raysdpb.nlg`'s example builders; a missing or bad field names itself."""

    def convert(row: Mapping[str, Any], spec: TaskSpec) -> dict:
        try:
            return example(hub_row(dict(row)) if hub_row else dict(row))
        except KeyError as err:
            fields = ", ".join(str(k) for k in row.keys())
            raise _RowError(str(err.args[0]), f"missing (the record has: {fields or 'no fields'})") from None
        except (ValueError, TypeError, AttributeError) as err:
            name, _, message = str(err).partition(": ")
            raise _RowError(name if message else "record", message or str(err)) from None

    return convert


def _register_nlg() -> None:
    from raysdpb import nlg

    gsm8k, svamp = _nlg(nlg.gsm8k_example), _nlg(nlg.svamp_example)
    aqua, mathqa = _nlg(nlg.aqua_example), _nlg(nlg.mathqa_example)
    hellaswag = _nlg(nlg.hellaswag_example)
    register(TaskSpec(
        name="nlg/gsm8k", kind="generation", labels=(), metrics=("exact_match",), answer_type="number",
        eval_splits=(("test", ""),),
        hub=HubSource("openai/gsm8k", "main", gsm8k, splits={"train": "train", "test": "test"}),
        local=LocalSource({split: (LocalFiles((f"nlg/gsm8k/{split}.jsonl",), jsonl_reader, gsm8k),)
                           for split in ("train", "test")}),
    ))
    # SVAMP is one 1000-problem challenge set. The hub's ChilleD/SVAMP splits it 700/300; from the original
    # file the mirror takes the first 700 as train and the last 300 as test (same sizes, not the same problems),
    # and `all` is the whole set (e.g. train_split: gsm8k-style training elsewhere, eval_split: all)
    svamp_file = ("nlg/svamp/SVAMP.json",)
    register(TaskSpec(
        name="nlg/svamp", kind="generation", labels=(), metrics=("exact_match",), answer_type="number",
        eval_splits=(("test", ""),),
        hub=HubSource("ChilleD/SVAMP", None, svamp, splits={"train": "train", "test": "test"}),
        local=LocalSource({
            "train": (LocalFiles(svamp_file, _sliced(_json_records_reader, None, 700), svamp),),
            "test": (LocalFiles(svamp_file, _sliced(_json_records_reader, 700, None), svamp),),
            "all": (LocalFiles(svamp_file, _json_records_reader, svamp),),
        }),
    ))
    register(TaskSpec(
        name="nlg/aqua", kind="generation", labels=tuple(nlg.LETTERS), metrics=("exact_match",), answer_type="choice",
        eval_splits=(("test", ""),),
        hub=HubSource("deepmind/aqua_rat", "raw", aqua, splits={"train": "train", "validation": "validation",
                                                                "test": "test"}),
        local=LocalSource({"validation": (LocalFiles(("nlg/aqua/dev.json",), _json_records_reader, aqua),),
                           "test": (LocalFiles(("nlg/aqua/test.json",), _json_records_reader, aqua),)},
                          note="the shared mirror has AQuA's dev and test files only: set train_split: validation "
                               "(or add nlg/aqua/train.json)"),
    ))
    register(TaskSpec(
        name="nlg/mathqa", kind="generation", labels=tuple(nlg.LETTERS), metrics=("exact_match",),
        answer_type="choice", eval_splits=(("test", ""),),
        hub=HubSource("allenai/math_qa", None, mathqa, splits={"train": "train", "validation": "validation",
                                                             "test": "test"}),
        local=LocalSource({"validation": (LocalFiles(("nlg/mathqa/dev.json",), _json_records_reader, mathqa),),
                           "test": (LocalFiles(("nlg/mathqa/test.json",), _json_records_reader, mathqa),)},
                          note="the shared mirror has MathQA's dev and test files only: set train_split: validation "
                               "(or add nlg/mathqa/train.json)"),
    ))
    register(TaskSpec(
        name="nlg/hellaswag", kind="generation", labels=tuple(nlg.LETTERS[:4]), metrics=("exact_match",),
        answer_type="choice",
        hub=HubSource("Rowan/hellaswag", None, _nlg(nlg.hellaswag_example, nlg.hellaswag_hub_row)),
        local=LocalSource({"validation": (LocalFiles(("nlg/hellaswag/hellaswag_val_full.txt.bz2",),
                                                     _hellaswag_reader, hellaswag),)},
                          note="the shared mirror has HellaSwag's validation set only: train and evaluate on "
                               "slices of it, e.g. train_split: 'validation[:8000]', eval_split: "
                               "'validation[8000:]'"),
    ))


_register_nlg()


# --- custom tasks from the user's files ------------------------------------------------------------------

CUSTOM_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet",
                  ".pq": "parquet"}


def _custom_format(path: Path, given: str | None) -> str:
    if given:
        return given
    fmt = CUSTOM_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"custom_task.files: cannot tell the format of {path} from its extension; use one of "
                        f"{', '.join(CUSTOM_FORMATS)} or set custom_task.format (csv, tsv, jsonl, json, parquet)")
    return fmt


def _table_rows(path: Path, rows: list[dict], first_line: int | None) -> Iterator[RawRow]:
    for i, row in enumerate(rows):
        yield path, i + 1, (first_line + i if first_line is not None else None), row


def _read_custom_file(path: Path, fmt: str) -> Iterator[RawRow]:
    if fmt in ("csv", "tsv"):
        import pandas as pd

        try:
            frame = pd.read_csv(path, sep="," if fmt == "csv" else "\t", dtype=str, keep_default_na=False,
                                encoding="utf-8-sig")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
            raise UserError(f"{path}: unreadable {fmt.upper()} ({err})") from None
        # record n is on line n + 1 after the header (unless a quoted text spans lines)
        return _table_rows(path, frame.to_dict("records"), 2)
    if fmt == "jsonl":
        return _jsonl_rows(path)
    if fmt == "json":
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not UTF-8 text ({err})") from None
        except json.JSONDecodeError as err:
            if err.msg == "Extra data":  # JSON lines under a .json name
                return _jsonl_rows(path)
            raise UserError(f"{path}: unreadable JSON ({err})") from None
        if isinstance(data, dict):  # columns: {"text": [...], "label": [...]}
            import pandas as pd

            try:
                data = pd.DataFrame(data).to_dict("records")
            except ValueError as err:
                raise UserError(f"{path}: a JSON object must map column names to equally long lists ({err})") from None
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a JSON array of objects (or JSON lines)")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise UserError(f"{_where(path, i + 1, None)}: unreadable row: expected a JSON object, got "
                                f"{type(row).__name__}")
        return _table_rows(path, data, None)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{path}: unreadable Parquet ({err})") from None
        return _table_rows(path, rows, None)
    raise UserError(f"custom_task.format {fmt!r} is not supported; use csv, tsv, jsonl, json or parquet")


def _resolve_custom_path(value: str, data_dir: str | None) -> Path:
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    if not path.exists() and data_dir is not None and (Path(data_dir) / path).exists():
        return (Path(data_dir) / path).resolve()
    return path.resolve()


def _natural_order(values: Iterable[str]) -> list[str]:
    values = sorted(set(values))
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def custom_task_spec(custom, data_dir: str | None = None, *, eval_split: str | None = None) -> TaskSpec:
    """A `TaskSpec` for `custom_task` (a `CustomTaskConfig`): its files (relative paths are resolved against
    the working directory, else `data_dir`), text fields, label field, label set and metric.

    Without `custom.labels` the label set is the sorted distinct labels of the train file (as strings;
    numerically sorted when they are all numbers). Evaluation runs on every split other than train (the
    first one unprefixed, the others prefixed `<split>_`)."""
    files = {split: _resolve_custom_path(p, data_dir) for split, p in custom.files.items()}
    formats = {split: _custom_format(p, custom.format) for split, p in files.items()}
    text_fields = tuple(custom.text_fields)
    label_field = custom.label_field

    def reader(split: str) -> Reader:
        def read(paths: Sequence[Path]) -> Iterator[RawRow]:
            for path in paths:
                yield from _read_custom_file(path, formats[split])

        return read

    if custom.labels is not None:
        labels = tuple(str(x).strip() for x in custom.labels)
        if len(set(labels)) != len(labels):
            raise UserError(f"custom_task.labels has duplicates: {list(labels)}")
    else:
        if not files["train"].is_file():
            raise UserError(f"custom_task.files.train: {files['train']} not found")
        seen = []
        for path, record, line, row in reader("train")([files["train"]]):
            try:
                seen.append(_label_text(_get(row, label_field)))
            except _RowError as err:
                raise UserError(f"{_where(path, record, line)}: field {err.field!r}: {err.message}") from None
        if not seen:
            raise UserError(f"task custom: split 'train' is empty ({files['train']} has no records)")
        labels = tuple(_natural_order(seen))
        if len(labels) < 2:
            raise UserError(f"{files['train']}: every record has the label {labels[0]!r}; a classifier needs at "
                            "least two classes (give them in custom_task.labels)")
    if len(labels) < 2:
        raise UserError(f"custom_task.labels needs at least two classes, got {list(labels)}")

    def convert(row: Mapping[str, Any], spec: TaskSpec) -> dict:
        return {
            "text": _text(row, text_fields[0]),
            "text_pair": _text(row, text_fields[1]) if len(text_fields) > 1 else None,
            "label": _named_id(_get(row, label_field), spec.labels, label_field),
        }

    others = [s for s in files if s != "train"]
    if others:
        eval_splits = tuple((s, "" if i == 0 else f"{s}_") for i, s in enumerate(others))
    elif eval_split:
        eval_splits = ((eval_split, ""),)
    else:
        raise UserError("custom_task.files has only a 'train' file; add a validation file (custom_task.files."
                        "validation) or set eval_split: train")
    metrics = (custom.metric,) + (("accuracy",) if custom.metric != "accuracy" else ())
    return TaskSpec(
        name="custom", kind="classification", labels=labels, metrics=metrics, eval_splits=eval_splits,
        local=LocalSource({split: (LocalFiles((str(path),), reader(split), convert),)
                           for split, path in files.items()}),
    )
