"""The GLUE and SuperGLUE tasks: their converters (`pair`, `wic`, `copa`) and registrations."""

from __future__ import annotations

from typing import Any, Mapping

from raysdpb.tasks.fields import _class_id, _get, _RowError, _text
from raysdpb.tasks.readers import jsonl_reader, tsv_reader, wic_text_reader
from raysdpb.tasks.spec import Converter, HubSource, LocalFiles, LocalSource, Reader, TaskSpec, register


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
