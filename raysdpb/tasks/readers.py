"""Readers: files -> raw rows `(file, record, line, fields)`: GLUE TSVs, JSON lines, the original WiC release,
JSON arrays, HellaSwag's text release, per-file record readers (`records_reader`, with the `as_is` converter) and
`_sliced` (a fixed part of what a reader yields)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from raysdpb.errors import UserError
from raysdpb.tasks.fields import _where
from raysdpb.tasks.nlg import hellaswag_rows
from raysdpb.tasks.spec import RawRow, Reader, TaskSpec

# the package's logger: log lines keep the name they had when the tasks were one module
log = logging.getLogger("raysdpb.tasks")


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
    """Adapt a reader that returns finished records per file (e.g. `raysdpb.tasks.nlg.read_gsm8k`); use it with
    `convert=as_is`."""

    def reader(paths: Sequence[Path]) -> Iterator[RawRow]:
        for path in paths:
            for i, row in enumerate(read(path)):
                yield path, i + 1, None, row

    return reader


def as_is(row: Mapping[str, Any], spec: TaskSpec) -> dict:
    return dict(row)


# --- the NLG tasks' files ---------------------------------------------------------------------------------

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
