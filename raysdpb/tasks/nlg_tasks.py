"""The decoder-only (NLG) tasks' registrations: prompt + answer records built by the example builders of
`raysdpb.tasks.nlg`, evaluated by generation."""

from __future__ import annotations

from typing import Any, Callable, Mapping

from raysdpb.tasks import nlg
from raysdpb.tasks.fields import _RowError
from raysdpb.tasks.readers import _hellaswag_reader, _json_records_reader, _sliced, jsonl_reader
from raysdpb.tasks.spec import Converter, HubSource, LocalFiles, LocalSource, TaskSpec, register


def _nlg(example: Callable[[dict], dict], hub_row: Callable[[dict], dict] | None = None) -> Converter:
    """A converter from one of `raysdpb.tasks.nlg`'s example builders; a missing or bad field names itself."""

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
