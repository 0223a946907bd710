"""The task registry on the real mirror (shared/data), on small generated mirrors in the real GLUE/SuperGLUE
formats for the splits the mirror lacks, on a faked hub, and on custom files; plus every error a user can
cause with bad data. Nothing here reaches the network."""

from __future__ import annotations

import csv
import json
import os
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raysdpb.config import CustomTaskConfig, load_trial_config
from raysdpb.errors import UserError
from raysdpb.tasks import TASKS, TaskSpec, data_dir_from, get_task, load_examples, resolve_task

SETTINGS = settings(max_examples=int(os.environ.get("RAYSDPB_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])

# record counts of the shared mirror (MANIFEST.md)
MIRROR_COUNTS = {
    ("glue/cola", "train"): 8551, ("glue/cola", "validation"): 1043,
    ("glue/sst2", "train"): 67349, ("glue/sst2", "validation"): 872,
    ("glue/mrpc", "train"): 3668, ("glue/mrpc", "validation"): 408,
    ("glue/rte", "train"): 2490, ("glue/rte", "validation"): 277,
    ("superglue/boolq", "validation"): 3270,
    ("superglue/cb", "train"): 250, ("superglue/cb", "validation"): 56,
    ("superglue/copa", "train"): 400, ("superglue/copa", "validation"): 100,
    ("superglue/rte", "train"): 2490, ("superglue/rte", "validation"): 277,
    ("superglue/wic", "train"): 5428, ("superglue/wic", "validation"): 638, ("superglue/wic", "test"): 1400,
}
# splits the shared mirror lacks: read from a generated mirror (GENERATED below)
NOT_IN_MIRROR = {("superglue/boolq", "train"), ("glue/qnli", "train"), ("glue/qnli", "validation"),
                 ("glue/qqp", "train"), ("glue/qqp", "validation"), ("glue/mnli", "train"),
                 ("glue/mnli", "validation_matched"), ("glue/mnli", "validation_mismatched")}

LABELS = {
    "glue/rte": ("entailment", "not_entailment"), "glue/qnli": ("entailment", "not_entailment"),
    "glue/cola": ("unacceptable", "acceptable"), "glue/sst2": ("negative", "positive"),
    "glue/mnli": ("entailment", "neutral", "contradiction"), "glue/qqp": ("not_duplicate", "duplicate"),
    "glue/mrpc": ("not_equivalent", "equivalent"), "superglue/boolq": ("false", "true"),
    "superglue/cb": ("entailment", "contradiction", "neutral"), "superglue/copa": ("choice1", "choice2"),
    "superglue/rte": ("entailment", "not_entailment"), "superglue/wic": ("false", "true"),
}
METRICS = {"glue/cola": ("matthews", "accuracy"), "glue/qqp": ("accuracy", "f1"), "glue/mrpc": ("accuracy", "f1"),
           "superglue/cb": ("accuracy", "macro_f1")}


def check_records(spec: TaskSpec, records: list[dict]) -> None:
    """Every record has its kind's fields with the right types, and its label is a class id."""
    assert records
    for r in records:
        assert isinstance(r["idx"], int)
        if spec.kind == "classification":
            assert set(r) == {"idx", "text", "text_pair", "label"}
            assert isinstance(r["text"], str) and (r["text_pair"] is None or isinstance(r["text_pair"], str))
        elif spec.kind == "multiple_choice":
            assert set(r) == {"idx", "context", "choices", "label"}
            assert isinstance(r["context"], str) and len(r["choices"]) == spec.num_labels
            assert all(isinstance(c, str) and c for c in r["choices"])
        else:
            assert {"idx", "prompt", "answer", "reference"} <= set(r)
            continue
        assert isinstance(r["label"], int) and 0 <= r["label"] < spec.num_labels


# --- the registry ----------------------------------------------------------------------------------------

def test_registry_has_the_benchmark_tasks_with_hub_class_ids():
    assert set(LABELS) <= set(TASKS)
    for name, labels in LABELS.items():
        spec = get_task(name)
        assert spec.labels == labels and spec.num_labels == len(labels)
        assert spec.metrics == METRICS.get(name, ("accuracy",))
        assert spec.kind == ("multiple_choice" if name == "superglue/copa" else "classification")
    assert get_task("glue/mnli").eval_splits == (("validation_matched", ""), ("validation_mismatched", "mm_"))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_registered_task_is_covered_here(name):
    spec = TASKS[name]
    if spec.kind == "generation":
        return  # NLG tasks are tested with the NLG readers
    for split in (spec.train_split, *(s for s, _ in spec.eval_splits)):
        assert (name, split) in MIRROR_COUNTS or (name, split) in NOT_IN_MIRROR, (name, split)


def test_unknown_task_lists_the_allowed_names(shared_data_dir):
    with pytest.raises(UserError, match="unknown task 'glue/nope'.*glue/cola.*superglue/wic"):
        get_task("glue/nope")
    with pytest.raises(UserError, match="unknown task"):
        load_examples("superglue/nope", "train", str(shared_data_dir))
    with pytest.raises(UserError, match="unknown split 'dev'.*train, validation"):
        load_examples("superglue/cb", "dev", str(shared_data_dir))


def test_data_dir_from(monkeypatch):
    monkeypatch.setenv("RAYSDPB_DATA_DIR", "/from/env")
    assert data_dir_from("/from/config") == "/from/config"
    assert data_dir_from(None) == "/from/env"
    monkeypatch.delenv("RAYSDPB_DATA_DIR")
    assert data_dir_from(None) is None


# --- the shared mirror -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, split", sorted(MIRROR_COUNTS))
def test_mirror_counts_and_labels(name, split, shared_data_dir):
    spec = get_task(name)
    records = load_examples(name, split, str(shared_data_dir))
    assert len(records) == MIRROR_COUNTS[name, split]
    check_records(spec, records)
    counts = Counter(r["label"] for r in records)
    assert set(counts) == set(range(spec.num_labels))  # every class occurs
    assert len({r["idx"] for r in records}) == len(records)


def test_mirror_label_distributions(shared_data_dir):
    def counts(name, split):
        c = Counter(r["label"] for r in load_examples(name, split, str(shared_data_dir)))
        return [c[i] for i in range(get_task(name).num_labels)]

    assert counts("superglue/wic", "train") == [2714, 2714]
    assert counts("superglue/wic", "validation") == [319, 319]
    assert counts("superglue/cb", "validation") == [23, 28, 5]          # entailment, contradiction, neutral
    assert counts("superglue/boolq", "validation") == [1237, 2033]      # 62% true
    assert counts("glue/sst2", "validation") == [428, 444]
    assert counts("glue/mrpc", "train") == [1194, 2474]                 # 67% paraphrases
    assert counts("glue/rte", "train") == [1249, 1241]


def test_cola_validation_is_in_domain_then_out_of_domain_dev(shared_data_dir):
    records = load_examples("glue/cola", "validation", str(shared_data_dir))
    assert records[0]["text"] == "The sailors rode the breeze clear of the rocks."
    assert records[527]["text"] == "Somebody just left - guess who."
    assert [r["idx"] for r in records] == list(range(1043))


def test_mrpc_bom_and_raw_quotes(shared_data_dir):
    first = load_examples("glue/mrpc", "train", str(shared_data_dir))[0]
    assert first["label"] == 1
    assert first["text"].startswith("Amrozi accused his brother, whom he called \"the witness\"")
    assert first["text_pair"].startswith("Referring to him as only \"the witness\"")


def test_superglue_rte_and_glue_rte_give_the_same_labels(shared_data_dir):
    for split in ("train", "validation"):
        glue = load_examples("glue/rte", split, str(shared_data_dir))
        superglue = load_examples("superglue/rte", split, str(shared_data_dir))
        assert [r["label"] for r in glue] == [r["label"] for r in superglue]


def test_wic_formats_agree(shared_data_dir, tmp_path):
    """The original WiC release (data.txt + gold.txt) gives the same (word, label) counts as SuperGLUE JSONL."""
    wic = tmp_path / "superglue" / "wic"
    wic.mkdir(parents=True)
    for name in ("train", "dev"):
        for kind in ("data", "gold"):
            (wic / f"{name}.{kind}.txt").symlink_to(shared_data_dir / "superglue" / "wic" / f"{name}.{kind}.txt")
    for split in ("train", "validation"):
        jsonl = load_examples("superglue/wic", split, str(shared_data_dir))
        text = load_examples("superglue/wic", split, str(tmp_path))
        assert len(jsonl) == len(text)
        key = lambda r: (r["text"].split(":")[0], r["label"])  # noqa: E731 - the target word leads the text
        assert Counter(map(key, jsonl)) == Counter(map(key, text))
    first = load_examples("superglue/wic", "train", str(tmp_path))[0]
    assert first == {"idx": 0, "text": "carry: You must carry your camping gear .",
                     "text_pair": "Sound carries well over water .", "label": 0}


def test_copa_context_and_choices(shared_data_dir):
    first = load_examples("superglue/copa", "validation", str(shared_data_dir))[0]
    assert first == {"idx": 0, "context": "The man turned on the faucet so",
                     "choices": ["The toilet filled with water.", "Water flowed from the spout."], "label": 1}
    cause = load_examples("superglue/copa", "train", str(shared_data_dir))[0]
    assert cause["context"] == "My body cast a shadow over the grass because" and cause["label"] == 0


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name, source, target, relabel", [
    # SuperGLUE release (string/bool labels) -> Hugging Face export (int labels), and back
    ("superglue/rte", "train.jsonl", "train.jsonl", lambda v: ["entailment", "not_entailment"].index(v)),
    ("superglue/boolq", "val.jsonl", "validation.jsonl", int),
    ("superglue/wic", "val.jsonl", "validation.jsonl", int),
    ("superglue/cb", "validation.jsonl", "val.jsonl", lambda v: ["entailment", "contradiction", "neutral"][v]),
])
def test_both_superglue_label_forms(name, source, target, relabel, shared_data_dir, tmp_path):
    task = name.split("/")[1]
    rows = read_jsonl(shared_data_dir / "superglue" / task / source)
    write_jsonl(tmp_path / "superglue" / task / target, [{**r, "label": relabel(r["label"])} for r in rows])
    split = "train" if source.startswith("train") else "validation"
    original = load_examples(name, split, str(shared_data_dir))
    converted = load_examples(name, split, str(tmp_path))
    assert [r["label"] for r in converted] == [r["label"] for r in original]
    assert converted == original


# --- generated mirrors for the splits the shared mirror lacks -----------------------------------------------

MNLI_TRAIN_HEADER = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
                     "sentence1_parse", "sentence2_parse", "sentence1", "sentence2", "label1", "gold_label"]
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + ["label2", "label3", "label4", "label5", "gold_label"]


def write_tsv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join("\t".join(map(str, r)) for r in [header, *rows]) + "\n", encoding="utf-8")


def mnli_row(i: int, label: str, dev: bool) -> list:
    s1, s2 = f"Premise {i} with a \"quote\".", f"Hypothesis {i}."
    parses = [f"( {s1} )", f"( {s2} )", f"(ROOT {s1})", f"(ROOT {s2})"]
    return [i, 1000 + i, f"{1000 + i}e", "fiction", *parses, s1, s2, label, *([label] * 4 if dev else []), label]


@pytest.fixture
def generated_mirror(tmp_path) -> Path:
    """QNLI, QQP, MNLI and BoolQ train in the real GLUE TSV / SuperGLUE JSONL formats."""
    nli3 = ["entailment", "neutral", "contradiction"]
    write_tsv(tmp_path / "glue/mnli/train.tsv", MNLI_TRAIN_HEADER, [mnli_row(i, nli3[i % 3], False) for i in range(9)])
    for name in ("dev_matched", "dev_mismatched"):
        write_tsv(tmp_path / f"glue/mnli/{name}.tsv", MNLI_DEV_HEADER,
                  [mnli_row(i, nli3[i % 3], True) for i in range(6)])
    for name, n in (("train", 8), ("dev", 4)):
        write_tsv(tmp_path / f"glue/qnli/{name}.tsv", ["index", "question", "sentence", "label"],
                  [[i, f"What is {i}?", f"It is \"{i}\".", ["entailment", "not_entailment"][i % 2]] for i in range(n)])
        write_tsv(tmp_path / f"glue/qqp/{name}.tsv", ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"],
                  [[i, 2 * i, 2 * i + 1, f"How {i}?", f"Why {i}?", i % 2] for i in range(n)])
    write_jsonl(tmp_path / "superglue/boolq/train.jsonl",
                [{"question": f"is it {i}", "passage": f"Passage {i}.", "idx": i, "label": i % 3 == 0}
                 for i in range(6)])
    return tmp_path


@pytest.mark.parametrize("name, split, count", [
    ("glue/mnli", "train", 9), ("glue/mnli", "validation_matched", 6), ("glue/mnli", "validation_mismatched", 6),
    ("glue/qnli", "train", 8), ("glue/qnli", "validation", 4), ("glue/qqp", "train", 8), ("glue/qqp", "validation", 4),
    ("superglue/boolq", "train", 6),
])
def test_generated_mirror(name, split, count, generated_mirror):
    assert (name, split) in NOT_IN_MIRROR
    spec = get_task(name)
    records = load_examples(name, split, str(generated_mirror))
    assert len(records) == count
    check_records(spec, records)
    if name == "glue/mnli":
        assert [r["label"] for r in records] == [i % 3 for i in range(count)]  # entailment, neutral, contradiction
        assert records[1]["text"] == "Premise 1 with a \"quote\"." and records[1]["text_pair"] == "Hypothesis 1."
    elif name == "superglue/boolq":
        assert [r["label"] for r in records] == [1, 0, 0, 1, 0, 0]
        assert (records[0]["text"], records[0]["text_pair"]) == ("is it 0", "Passage 0.")
    else:
        assert [r["label"] for r in records] == [i % 2 for i in range(count)]
        assert records[2]["text_pair"] in ("It is \"2\".", "Why 2?")


# --- the hub (faked; the real one is unreachable in tests) ------------------------------------------------

HUB_ROWS = {  # one row per config, with the fields of the Hugging Face datasets
    "cola": {"sentence": "A sentence.", "label": 1, "idx": 0},
    "sst2": {"sentence": "great film ", "label": 1, "idx": 0},
    "mrpc": {"sentence1": "A.", "sentence2": "B.", "label": 1, "idx": 0},
    "qqp": {"question1": "A?", "question2": "B?", "label": 1, "idx": 0},
    "qnli": {"question": "A?", "sentence": "B.", "label": 1, "idx": 0},
    "rte": {"sentence1": "A.", "sentence2": "B.", "label": 1, "idx": 0},
    "mnli": {"premise": "A.", "hypothesis": "B.", "label": 1, "idx": 0},
    "boolq": {"question": "A?", "passage": "B.", "idx": 0, "label": 1},
    "cb": {"premise": "A.", "hypothesis": "B.", "idx": 0, "label": 1},
    "copa": {"premise": "A.", "choice1": "B.", "choice2": "C.", "question": "effect", "idx": 0, "label": 1},
    "wic": {"word": "w", "sentence1": "A w.", "sentence2": "B w.", "start1": 2, "start2": 2, "end1": 3, "end2": 3,
            "idx": 0, "label": 1},
}
SUPERGLUE_RTE = {"premise": "A.", "hypothesis": "B.", "idx": 0, "label": 1}


@pytest.mark.parametrize("name", sorted(LABELS))
def test_hub_field_mappings(name, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        row = SUPERGLUE_RTE if (path, name) == ("aps/super_glue", "rte") else HUB_ROWS[name]
        return datasets.Dataset.from_list([row, {**row, "idx": 1, "label": 0}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = get_task(name)
    for split, _ in ((spec.train_split, ""), *spec.eval_splits):
        records = load_examples(name, split, None)
        check_records(spec, records)
        assert [r["label"] for r in records] == [1, 0] and [r["idx"] for r in records] == [0, 1]
    benchmark, config = name.split("/")
    assert calls[0] == ({"glue": "nyu-mll/glue", "superglue": "aps/super_glue"}[benchmark], config, "train")
    if name == "glue/mnli":
        assert [c[2] for c in calls] == ["train", "validation_matched", "validation_mismatched"]
    if name == "superglue/wic":
        assert records[0]["text"] == "w: A w." and records[0]["text_pair"] == "B w."
    if name == "superglue/copa":
        assert records[0]["context"] == "A so" and records[0]["choices"] == ["B.", "C."]


def test_hub_unlabelled_test_rows_are_rejected(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset",
                        lambda *a, **k: datasets.Dataset.from_list([{**HUB_ROWS["cb"], "label": -1}]))
    with pytest.raises(UserError, match=r"record 1: field 'label': label -1 is outside the label set"):
        load_examples("superglue/cb", "validation")


@pytest.mark.parametrize("name", ["superglue/cb", "glue/rte"])
def test_no_network_and_no_mirror_asks_for_a_mirror(name, hub_offline):
    start = time.monotonic()
    with pytest.raises(UserError, match="RAYSDPB_DATA_DIR") as err:
        load_examples(name, "train", data_dir_from(None))
    assert "Hugging Face hub" in str(err.value) and "data_dir" in str(err.value)
    assert time.monotonic() - start < 20


# --- errors in the mirror ----------------------------------------------------------------------------------

def test_missing_file_names_the_path(tmp_path, shared_data_dir):
    with pytest.raises(UserError, match=r"split 'train' not found: missing .*superglue/cb/train\.jsonl"):
        load_examples("superglue/cb", "train", str(tmp_path))
    with pytest.raises(UserError, match=r"missing .*superglue/boolq/train\.jsonl.*no BoolQ train split"):
        load_examples("superglue/boolq", "train", str(shared_data_dir))
    with pytest.raises(UserError, match=r"missing .*glue/mnli/dev_mismatched\.tsv"):
        load_examples("glue/mnli", "validation_mismatched", str(shared_data_dir))
    with pytest.raises(UserError, match="does not exist"):
        load_examples("superglue/cb", "train", str(tmp_path / "nowhere"))


def test_missing_field_names_file_record_and_field(tmp_path):
    rows = [{"premise": "P.", "hypothesis": "H.", "idx": i, "label": 0} for i in range(3)]
    del rows[2]["hypothesis"]
    write_jsonl(tmp_path / "superglue/cb/train.jsonl", rows)
    with pytest.raises(UserError) as err:
        load_examples("superglue/cb", "train", str(tmp_path))
    message = str(err.value)
    assert "superglue/cb/train.jsonl" in message and "record 3 (line 3)" in message and "'hypothesis'" in message


def test_missing_tsv_column_names_the_field(tmp_path):
    write_tsv(tmp_path / "glue/rte/dev.tsv", ["index", "sentence1", "label"], [[0, "A.", "entailment"]])
    with pytest.raises(UserError, match=r"glue/rte/dev\.tsv, record 1 \(line 2\): field 'sentence2': missing"):
        load_examples("glue/rte", "validation", str(tmp_path))


def test_label_outside_the_set(tmp_path):
    write_jsonl(tmp_path / "superglue/cb/train.jsonl",
                [{"premise": "P.", "hypothesis": "H.", "idx": 0, "label": 0},
                 {"premise": "P.", "hypothesis": "H.", "idx": 1, "label": 7}])
    with pytest.raises(UserError, match=r"train\.jsonl, record 2 \(line 2\): field 'label': label 7 is outside"):
        load_examples("superglue/cb", "train", str(tmp_path))
    write_tsv(tmp_path / "glue/rte/train.tsv", ["index", "sentence1", "sentence2", "label"],
              [[0, "A.", "B.", "entailment"], [1, "A.", "B.", "maybe"]])
    with pytest.raises(UserError, match=r"record 2 \(line 3\): field 'label': label 'maybe' is outside"):
        load_examples("glue/rte", "train", str(tmp_path))


def test_empty_split(tmp_path):
    (tmp_path / "superglue/cb").mkdir(parents=True)
    (tmp_path / "superglue/cb/train.jsonl").write_text("\n")
    with pytest.raises(UserError, match=r"split 'train' is empty.*train\.jsonl"):
        load_examples("superglue/cb", "train", str(tmp_path))
    write_tsv(tmp_path / "glue/rte/train.tsv", ["index", "sentence1", "sentence2", "label"], [])
    with pytest.raises(UserError, match="is empty"):
        load_examples("glue/rte", "train", str(tmp_path))


def test_unreadable_rows(tmp_path):
    (tmp_path / "superglue/cb").mkdir(parents=True)
    (tmp_path / "superglue/cb/train.jsonl").write_text('{"premise": "P.", "hypothesis": "H.", "label": 0}\n'
                                                       '{"premise": \n')
    with pytest.raises(UserError, match=r"train\.jsonl, record 2 \(line 2\): unreadable row: not valid JSON"):
        load_examples("superglue/cb", "train", str(tmp_path))
    write_tsv(tmp_path / "glue/rte/train.tsv", ["index", "sentence1", "sentence2", "label"],
              [[0, "A.", "B.", "entailment"], [1, "A.", "B\tC.", "entailment"]])
    with pytest.raises(UserError, match=r"record 2 \(line 3\): unreadable row: 5 tab-separated columns, expected 4"):
        load_examples("glue/rte", "train", str(tmp_path))


def test_wic_gold_file_must_align(tmp_path, shared_data_dir):
    wic = tmp_path / "superglue/wic"
    wic.mkdir(parents=True)
    (wic / "dev.data.txt").symlink_to(shared_data_dir / "superglue/wic/dev.data.txt")
    (wic / "dev.gold.txt").write_text("T\nF\n")
    with pytest.raises(UserError, match="638 records but .*dev.gold.txt has 2 labels"):
        load_examples("superglue/wic", "validation", str(tmp_path))


# --- custom tasks --------------------------------------------------------------------------------------

ROWS = [("good film", "a", "pos"), ("bad, \"awful\" film", "b", "neg"), ("fine\nfilm", "c", "pos"), ("meh", "d", "neg")]


def write_custom(path: Path, rows=ROWS, fields=("review", "extra", "sentiment")) -> Path:
    import pandas as pd

    frame = pd.DataFrame(list(rows), columns=list(fields))
    suffix = path.suffix
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".tsv":
        frame.to_csv(path, index=False, sep="\t")
    elif suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True)
    elif suffix == ".json":
        frame.to_json(path, orient="records")
    elif suffix == ".parquet":
        frame.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_custom_task_formats(suffix, tmp_path):
    train = write_custom(tmp_path / f"train{suffix}")
    dev = write_custom(tmp_path / f"dev{suffix}", ROWS[:2])
    cfg = load_trial_config(None, raw={"task": "custom", "model": "tiny-bert", "custom_task": {
        "files": {"train": str(train), "validation": str(dev)}, "text_fields": ["review", "extra"],
        "label_field": "sentiment", "metric": "macro_f1"}})
    spec = resolve_task(cfg)
    assert spec.name == "custom" and spec.kind == "classification"
    assert spec.labels == ("neg", "pos") and spec.metrics == ("macro_f1", "accuracy")
    assert spec.eval_splits == (("validation", ""),)
    records = load_examples(spec, "train", None, custom=cfg.custom_task)
    assert [(r["text"], r["text_pair"], r["label"]) for r in records] == [(t, p, int(l == "pos")) for t, p, l in ROWS]
    assert [r["idx"] for r in records] == [0, 1, 2, 3]
    assert len(load_examples("custom", "validation", None, custom=cfg.custom_task)) == 2


def test_custom_task_label_order_and_relative_paths(tmp_path, monkeypatch):
    write_custom(tmp_path / "train.csv", [("a", "x", 10), ("b", "x", 2), ("c", "x", 2)])
    write_custom(tmp_path / "test.csv", [("d", "x", 10)])
    monkeypatch.chdir(tmp_path)
    custom = CustomTaskConfig(files={"train": "train.csv", "test": "test.csv"}, text_fields=["review"],
                              label_field="sentiment")
    spec = load_trial_config(None, raw={"task": "custom", "model": "m", "custom_task": custom.model_dump()})
    spec = resolve_task(spec)
    assert spec.labels == ("2", "10")  # numbers sort as numbers
    assert spec.eval_splits == (("test", ""),)
    assert [r["label"] for r in load_examples(spec, "train")] == [1, 0, 0]
    assert all(r["text_pair"] is None for r in load_examples(spec, "test"))
    given = CustomTaskConfig(files={"train": "train.csv", "test": "test.csv"}, text_fields=["review"],
                             label_field="sentiment", labels=["10", "2", "7"])
    raw = {"task": "custom", "model": "m", "custom_task": given.model_dump()}
    spec = resolve_task(load_trial_config(None, raw=raw))
    assert spec.labels == ("10", "2", "7") and [r["label"] for r in load_examples(spec, "train")] == [0, 1, 1]


def test_custom_task_errors(tmp_path):
    def spec_for(path, **kwargs):
        custom = CustomTaskConfig(**{"files": {"train": str(path), "validation": str(path)},
                                     "text_fields": ["review"], "label_field": "sentiment", **kwargs})
        return custom

    csv_path = write_custom(tmp_path / "t.csv")
    with pytest.raises(UserError, match=r"t\.csv, record 1 \(line 2\): field 'nope': missing \(the record has: review"):
        load_examples("custom", "train", custom=spec_for(csv_path, text_fields=["nope"], labels=["neg", "pos"]))
    with pytest.raises(UserError, match=r"t\.csv, record 1 \(line 2\): field 'label': missing"):
        load_examples("custom", "train", custom=spec_for(csv_path, label_field="label"))
    with pytest.raises(UserError, match=r"record 2 \(line 3\): field 'sentiment': "
                                        r"label 'neg' is outside the label set \['pos', 'x'\]"):
        load_examples("custom", "train", custom=spec_for(csv_path, labels=["pos", "x"]))
    empty = tmp_path / "empty.csv"
    empty.write_text("review,sentiment\n")
    with pytest.raises(UserError, match="empty"):
        load_examples("custom", "train", custom=spec_for(empty, labels=["neg", "pos"]))
    with pytest.raises(UserError, match=r"custom_task.files.train: .*missing\.csv not found"):
        load_examples("custom", "train", custom=spec_for(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match=r"split 'train' not found: missing .*missing\.csv"):
        load_examples("custom", "train", custom=spec_for(tmp_path / "missing.csv", labels=["a", "b"]))
    with pytest.raises(UserError, match="cannot tell the format"):
        load_examples("custom", "train", custom=spec_for(tmp_path / "t.xlsx"))
    with pytest.raises(UserError, match="at least two classes"):
        load_examples("custom", "train", custom=spec_for(write_custom(tmp_path / "one.csv", ROWS[:1])))
    only_train = CustomTaskConfig(files={"train": str(csv_path)}, text_fields=["review"], label_field="sentiment")
    with pytest.raises(UserError, match="only a 'train' file"):
        load_examples("custom", "train", custom=only_train)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"review": "a", "sentiment": "pos"}\n[1, 2]\n')
    with pytest.raises(UserError, match=r"bad\.jsonl, record 2 \(line 2\): unreadable row: expected a JSON object"):
        load_examples("custom", "train", custom=spec_for(bad, labels=["neg", "pos"]))
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("review,sentiment\na,pos\nb,neg,extra\n")
    with pytest.raises(UserError, match=r"ragged\.csv: unreadable CSV .*line 3"):
        load_examples("custom", "train", custom=spec_for(ragged, labels=["neg", "pos"]))


TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r")
               | st.sampled_from([",", "\"", "\n", "\t", " ", "#"]), max_size=30) \
    | st.sampled_from(["", "NA", "null", "nan", " padded ", "#comment", "1.0"])  # strings a CSV reader may mangle


@SETTINGS
@given(rows=st.lists(st.tuples(TEXT, TEXT, st.sampled_from(["neg", "pos", "so so", "0", "1"])),
                    min_size=1, max_size=12),
       sep=st.sampled_from([",", "\t"]))
def test_custom_csv_round_trips(rows, sep):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("data.csv" if sep == "," else "data.tsv")
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, delimiter=sep, lineterminator="\n")
            writer.writerow(["a", "b", "y"])
            writer.writerows(rows)
        custom = CustomTaskConfig(files={"train": str(path), "validation": str(path)}, text_fields=["a", "b"],
                                  label_field="y", labels=["neg", "pos", "so so", "0", "1"])
        records = load_examples("custom", "train", custom=custom)
        assert [(r["text"], r["text_pair"], custom.labels[r["label"]]) for r in records] == [tuple(r) for r in rows]
        distinct = {r[2] for r in rows}
        if len(distinct) > 1:  # default label set: the sorted train labels (numerically when all are numbers)
            default = load_examples("custom", "validation", custom=custom.model_copy(update={"labels": None}))
            expected = sorted(distinct, key=float) if all(y.isdigit() for y in distinct) else sorted(distinct)
            assert [expected[r["label"]] for r in default] == [r[2] for r in rows]
