"""Tasks as data: a registry mapping a name (`superglue/cb`) to where its data is and how to read it.

INTERFACE (fixed; the training loop relies on it):

* `TASKS: dict[str, TaskSpec]`, filled by `register(TaskSpec(...))` entries.
* `TaskSpec.kind`: "classification" | "multiple_choice" | "generation".
* `load_examples(task, split, data_dir=None) -> list[dict]`, with records normalised per kind:
    - classification:   {"idx": int, "text": str, "text_pair": str | None, "label": int}
    - multiple_choice:  {"idx": int, "context": str, "choices": list[str], "label": int}
    - generation:       {"idx": int, "prompt": str, "answer": str, "reference": str, ...}
  `label` is a class id into `TaskSpec.labels`.
* `resolve_task(config)` -> the `TaskSpec` of a `TrialConfig` (a registered task, or one built from
  `config.custom_task`).
"""

from __future__ import annotations
