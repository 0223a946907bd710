"""Tasks as data: a registry mapping a name (`superglue/cb`) to where its data is and how to read it.

INTERFACE (fixed; the training loop relies on it), all importable from `raysdpb.tasks`:

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

Where each thing lives:

* `spec.py`: `TaskSpec`, `HubSource`, `LocalSource`, `LocalFiles`, the registry (`TASKS`, `register`,
  `get_task`), `data_dir_from`, `DATA_DIR_ENV`, and the `RawRow`/`Reader`/`Converter` types.
* `loading.py`: `load_examples`, `parse_split`, `resolve_task`; reading a split from the mirror or the hub.
* `fields.py`: the error for one bad field of a row, field access, label -> class id.
* `readers.py`: files -> raw rows (`tsv_reader`, `jsonl_reader`, `wic_text_reader`, `records_reader`, `as_is`,
  the JSON-array and HellaSwag readers).
* `glue.py`: the GLUE and SuperGLUE tasks and their converters (`pair`, `wic`, `copa`).
* `nlg.py`: decoder-only (NLG) prompts, example builders, answer extraction (`extract_number`,
  `extract_choice`) and readers of whole files.
* `nlg_tasks.py`: the NLG tasks' registrations (`nlg/gsm8k`, ...).
* `custom.py`: `custom_task_spec`, a task from the user's own files (`custom_task:` in a config).
* `heldout.py`: the dev split a trial holds out of its training split (`heldout_dev:`): `heldout_split`,
  `carve_dev`, `DEV_PREFIX`.

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

Adding a task means adding one `register(TaskSpec(...))` entry to `glue.py` or `nlg_tasks.py` (or a new
module imported below).
"""

from __future__ import annotations

from raysdpb.tasks.custom import custom_task_spec
from raysdpb.tasks.loading import load_examples, parse_split, resolve_task
from raysdpb.tasks.readers import as_is, jsonl_reader, records_reader, tsv_reader, wic_text_reader
from raysdpb.tasks.spec import (DATA_DIR_ENV, TASKS, HubSource, LocalFiles, LocalSource, TaskSpec, data_dir_from,
                                get_task, register)

# Importing these modules registers their tasks, GLUE and SuperGLUE first: the import order is `TASKS`' order.
from raysdpb.tasks.glue import pair
from raysdpb.tasks import nlg_tasks  # noqa: F401

__all__ = [
    "TaskSpec", "HubSource", "LocalFiles", "LocalSource", "TASKS", "register", "get_task", "resolve_task",
    "custom_task_spec", "load_examples", "parse_split", "data_dir_from", "DATA_DIR_ENV",
    # building blocks for new entries
    "tsv_reader", "jsonl_reader", "wic_text_reader", "records_reader", "as_is", "pair",
]
