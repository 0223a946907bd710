"""Field access and labels: the error for one bad field of a row (`_RowError`, located with `_where`),
reading fields that may be missing or have alternative names, and label -> class id conversion."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence


class _RowError(Exception):
    """A bad field in one row; the loader adds the file and record to the message."""

    def __init__(self, field_name: str, message: str):
        super().__init__(message)
        self.field = field_name
        self.message = message


def _where(path: Path | str, record: int, line: int | None) -> str:
    return f"{path}, record {record}" + (f" (line {line})" if line is not None else "")


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
