"""Where experiment files live, a local folder or a URI (`s3://bucket/x`, `gs://...`), and how they are read
and written: every reader and writer of trials.parquet, curves.parquet and the JSON files goes through here.

Writes are atomic: locally a temporary file `<name>.tmp-<pid>-<random>`, flushed to disk and renamed over the
target (a reader, or a sweep killed at any moment, sees the old file or the new one, never half of one); on an
object store one upload (objects appear whole).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

__all__ = ["filesystem", "join", "exists", "write_table", "read_rows", "write_json", "read_json", "download",
           "upload", "remove_stale_temporaries"]

_TMP_MARK = ".tmp-"  # a file being written: `<name>.tmp-<pid>-<random>`


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path inside it)` of a local path or a URI (`s3://bucket/x`, `gs://...`)."""
    if "://" in str(path):
        return pafs.FileSystem.from_uri(str(path))
    return pafs.LocalFileSystem(), os.path.abspath(str(path))


def join(base: str, *parts: str) -> str:
    return "/".join([str(base).rstrip("/"), *parts])


def exists(path: str) -> bool:
    fs, p = filesystem(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_local(path: str, write: Callable[[str], None]) -> None:
    """`write(temporary)`, then the temporary flushed to disk and renamed over `path` (removed on failure)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}{_TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_table(table: pa.Table, path: str) -> None:
    """Write a Parquet file atomically (see the module's docstring)."""
    fs, p = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(p, lambda tmp: pq.write_table(table, tmp))
    else:  # no directory to create first: an object store has prefixes, not folders (a marker object would show)
        pq.write_table(table, p, filesystem=fs)


def read_rows(path: str) -> list[dict]:
    """The rows of a Parquet file, or [] where there is none."""
    if not exists(path):
        return []
    fs, p = filesystem(path)
    return pq.read_table(p, filesystem=fs).to_pylist()


def write_json(path: str, data: Any) -> None:
    """Write `data` as JSON atomically (values JSON cannot hold as their `str`)."""
    fs, p = filesystem(path)
    payload = json.dumps(data, default=str).encode()
    if isinstance(fs, pafs.LocalFileSystem):
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                f.write(payload)

        _write_local(p, write)
    else:
        with fs.open_output_stream(p) as f:
            f.write(payload)


def read_json(path: str) -> Any | None:
    """The JSON in `path`, None where there is no such file."""
    if not exists(path):
        return None
    fs, p = filesystem(path)
    with fs.open_input_stream(p) as f:
        return json.loads(f.read().decode())


def download(path: str, local: str | os.PathLike, fs: pafs.FileSystem | None = None) -> str:
    """Copy the folder `path` (a local folder or a URI; or a path in the filesystem `fs`) into the local folder
    `local`, which is created (pyarrow's copy into a missing local folder fails on its first file); returns it."""
    fs, source = (fs, path) if fs is not None else filesystem(path)
    os.makedirs(local, exist_ok=True)
    pafs.copy_files(source, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return str(local)


def upload(local: str | os.PathLike, path: str) -> None:
    """Copy the local folder `local` to `path` (a URI or a local folder), replacing files of the same names; each
    file arrives whole (one upload per object)."""
    fs, destination = filesystem(path)
    if isinstance(fs, pafs.LocalFileSystem):
        os.makedirs(destination, exist_ok=True)
    pafs.copy_files(str(local), destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporary files a writer killed mid-write left in a local folder (`*.tmp-<pid>-*` of a
    process that is gone); returns their paths."""
    fs, p = filesystem(folder)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.isdir(p):
        return []
    removed = []
    for name in os.listdir(p):
        if _TMP_MARK not in name:
            continue
        try:
            pid = int(name.rsplit(_TMP_MARK, 1)[1].split("-")[0])
            os.kill(pid, 0)
            continue  # its writer is still alive
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        try:
            os.unlink(os.path.join(p, name))
            removed.append(os.path.join(p, name))
        except OSError:
            pass
    return removed
