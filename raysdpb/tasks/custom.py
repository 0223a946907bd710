"""Custom tasks from the user's files (`custom_task:` in a config): `custom_task_spec` and the readers of
CSV, TSV, JSON lines, JSON and Parquet files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from raysdpb.errors import UserError
from raysdpb.tasks.fields import _get, _label_text, _named_id, _RowError, _text, _where
from raysdpb.tasks.readers import _jsonl_rows
from raysdpb.tasks.spec import LocalFiles, LocalSource, RawRow, Reader, TaskSpec


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
