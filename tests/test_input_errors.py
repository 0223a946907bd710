"""A user's mistakes in configs, overrides and data files: each ends in one clear `raysdpb: error: ...` line and
exit code 2, with no traceback, and nothing is written to the results folder (a sweep's storage, a trial's
output folder). Broken inputs by hand (table below) and fuzzed ones (hypothesis), through the in-process
entry points (`run_cli` with `raysdpb.train.main` / `raysdpb.sweep.cli.main`, and the loaders `load_experiment`,
`load_trial_config`, `load_examples`); a few through `python -m` for real."""

from __future__ import annotations

import json
import os
import shutil
import string
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from raysdpb.sweep import cli as sweep_cli
from raysdpb import train as train_cli
from raysdpb.config import TrialConfig, load_experiment, load_trial_config
from raysdpb.errors import UserError, run_cli
from raysdpb.models import resolve_model
from raysdpb.sweep.checks import check_data, check_models
from raysdpb.sweep.plan import plan_sweep
from raysdpb.tasks import custom_task_spec, get_task, load_examples

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_FOLDER = resolve_model("smollm2-135m").path  # the pip package's folder, holding its GGUF file
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.filter_too_much])


def _case_id(value):
    return value if isinstance(value, str) and len(value) < 40 and "\n" not in value and ":" not in value else None


def _base(data_dir, storage) -> dict:
    return {"task": "superglue/cb", "model": "tiny-bert", "data_dir": str(data_dir), "epochs": 1,
            "max_train_samples": 16, "max_eval_samples": 8, "max_length": 32,
            "sweep": {"name": "broken", "storage_path": str(storage)}}


def _error_line(err: str) -> str:
    """The one `raysdpb: error:` line of a run's stderr (and no traceback anywhere)."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("raysdpb: error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def _cli(capsys, main, argv) -> tuple[int, str]:
    capsys.readouterr()
    code = run_cli(main, argv)
    return code, capsys.readouterr().err


def _nothing_written(*folders: Path) -> None:
    for folder in folders:
        assert not folder.exists(), f"{folder} was created: {sorted(p.name for p in folder.rglob('*'))}"


# --- broken configs and overrides, by hand ---------------------------------------------------------------------

# (id, change to the base config or raw YAML text, overrides, what the error line must say)
CONFIGS = [
    ("empty-file", "", [], "task: required key is missing"),
    ("top-level-list", "- task\n- model\n", [], "the top level must be a mapping"),
    ("yaml-syntax", "task: superglue/cb\n  model: [tiny-bert\n", [], "not valid YAML"),
    ("tab-indent", "task:\tsuperglue/cb\n", [], "not valid YAML"),
    ("unknown-key", {"learning_rate": 1e-4}, [], "learning_rate: unknown key; allowed keys: task, model"),
    ("unknown-method", {"method": "dlb"}, [], "method: unknown method 'dlb'; allowed: finetune"),
    ("unknown-task", {"task": "glue/nope"}, [], "task: unknown task 'glue/nope'"),
    ("task-not-a-string", {"task": [1, 2]}, [], "task: Input should be a valid string"),
    ("lr-negative", {"lr": -1}, [], "lr: Input should be greater than 0"),
    ("lr-too-big", {"lr": 5}, [], "lr: Input should be less than 1"),
    ("lr-nan", {"lr": float("nan")}, [], "lr:"),
    ("epochs-text", {"epochs": "three"}, [], "epochs: Input should be a valid integer"),
    ("batch-size-zero", {"batch_size": 0}, [], "batch_size: Input should be greater than or equal to 1"),
    ("tau-scales", {"tau_min_scale": 3.0, "tau_max_scale": 2.0}, [], "tau_min_scale must not exceed tau_max_scale"),
    ("precision", {"precision": "fp8"}, [], "precision: Input should be 'auto', 'fp32', 'bf16' or 'fp16'"),
    ("lora-not-a-block", {"lora": "yes"}, [], "lora: Input should be a valid dictionary"),
    ("lora-r-zero", {"lora": {"r": 0}}, [], "lora.r: Input should be greater than or equal to 1"),
    ("lora-unknown-key", {"lora": {"rank": 8}}, [], "lora.rank: unknown key; allowed keys: r, alpha"),
    ("custom-without-block", {"task": "custom"}, [], "task 'custom' needs a custom_task block"),
    ("custom-block-wrong-task", {"custom_task": {"files": {"train": "a.csv"}, "text_fields": ["t"],
                                                 "label_field": "l"}}, [], "custom_task is given, so task must be"),
    ("custom-no-train-file", {"task": "custom", "custom_task": {"files": {"dev": "a.csv"}, "text_fields": ["t"],
                                                                "label_field": "l"}}, [], "needs a 'train' entry"),
    ("custom-three-text-fields", {"task": "custom", "custom_task": {"files": {"train": "a.csv"},
                                  "text_fields": ["a", "b", "c"], "label_field": "l"}}, [], "custom_task.text_fields"),
    ("custom-train-missing", {"task": "custom", "custom_task": {"files": {"train": "/nonexistent/t.csv",
                              "validation": "/nonexistent/v.csv"}, "text_fields": ["t"], "label_field": "l"}}, [],
     "custom_task.files.train: /nonexistent/t.csv not found"),
    ("model-folder-missing", {"model": "/nonexistent/model"}, [], "model: '/nonexistent/model' is no folder"),
    ("model-folder-not-a-model", {"model": "/"}, [], "model '/' could not be loaded from '/'"),
    ("model-hub-id-offline", {"model": "nobody/no-such-model"}, [], "model 'nobody/no-such-model' could not be loaded"),
    ("model-gguf-missing", {"model": SMOLLM2_FOLDER, "gguf_file": "nope.gguf"}, [], "could not be loaded from"),
    ("gguf-file-with-alias", {"model": "smollm2-135m", "gguf_file": "other.gguf"}, [],
     "gguf_file: 'other.gguf' does not apply to the alias 'smollm2-135m', which loads its own SmolLM2-135M"),
    ("gguf-file-with-encoder-alias", {"gguf_file": "x.gguf"}, [],
     "does not apply to the alias 'tiny-bert', which loads random"),
    ("num-layers-too-deep", {"model": "minilm-l6", "num_layers": 7}, [],
     "num_layers=7 exceeds the 6 layers of minilm-l6"),
    ("data-dir-missing", {"data_dir": "/nonexistent/mirror"}, [], "data directory /nonexistent/mirror does not exist"),
    ("overlap-odd-batch", {"method": "dynsdpb", "batch_size": 7}, [],
     "dynsdpb needs an even batch_size (each batch's first half repeats the previous batch's second half); "
     "got batch_size=7"),
    ("overlap-odd-batch-searched", {"method": "sequential_dlb", "search": {"batch_size": [8, 5]}}, [],
     "sequential_dlb needs an even batch_size"),
    ("train-smaller-than-a-batch", {"method": "random_dlb", "max_train_samples": 5, "batch_size": 8}, [],
     "random_dlb: the training set has 5 examples: dataset too small: "
     "5 samples cannot fill one overlapping batch of 8"),
    ("heldout-fraction-above-one", {"heldout_dev": {"size": 1.5}}, [],
     "heldout_dev.size: 1.5: a fraction must be in (0, 1); a number of examples is an int"),
    ("heldout-size-zero", {"heldout_dev": {"size": 0}}, [], "heldout_dev.size: 0 examples: hold out at least 1"),
    ("heldout-size-missing", {"heldout_dev": {"seed": 1}}, [], "heldout_dev.size: required key is missing"),
    ("heldout-unknown-key", {"heldout_dev": {"size": 10, "fraction": 0.1}}, [],
     "heldout_dev.fraction: unknown key; allowed keys: size, seed, stratify"),
    ("heldout-whole-split", {"heldout_dev": {"size": 250}}, [],
     "heldout_dev.size: 250 examples leave no training example: the training split has 250"),
    ("split-unknown", {"eval_split": "dev"}, [], "unknown split 'dev'"),
    ("split-empty-slice", {"eval_split": "validation[5:2]"}, [], "split 'validation[5:2]' is empty"),
    ("search-not-a-list", {"search": {"lr": 0.1}}, [], "search.lr: Input should be a valid list"),
    ("search-empty-list", {"search": {"lr": []}}, [], "search.lr: must be a non-empty list of values"),
    ("search-unknown-key", {"search": {"learning_rate": [1e-4]}}, [], "search.learning_rate: not a trial key"),
    ("search-bad-value", {"search": {"batch_size": [8, 0]}}, [], "search.batch_size: value 0 is invalid"),
    ("search-a-list", {"search": [1, 2]}, [], "search: Input should be a valid dictionary"),
    ("override-not-key-value", {}, ["lr"], "override 'lr' is not key=value"),
    ("override-unknown-key", {}, ["sweep.num_workerz=2"], "sweep.num_workerz: unknown key"),
    ("override-bad-value", {}, ["seed=abc"], "seed: Input should be a valid integer"),
    ("override-search-unclosed", {}, ["search.lr=[1e-4"], "search.lr: Input should be a valid list"),
]
SWEEP_CONFIGS = [  # what only a sweep reads
    ("sweep-not-a-block", {"sweep": "x"}, [], "sweep: Input should be a valid dictionary"),
    ("sweep-bad-name", {"sweep": {"name": "my sweep"}}, [], "sweep.name: String should match pattern"),
    ("sweep-no-name", {"sweep": {"num_workers": 1}}, [], "sweep.name: required key is missing"),
    ("sweep-workers-zero", {"sweep": {"name": "b", "num_workers": 0}}, [], "sweep.num_workers: Input should be"),
    ("asha-unknown-key", {"sweep": {"name": "b", "asha": {"grace": 1}}}, [], "sweep.asha.grace: unknown key"),
    ("asha-grace-over-max-t", {"sweep": {"name": "b", "asha": {"grace_period": 5}}}, [],
     "sweep.asha.grace_period: 5 exceeds max_t=1"),
    ("asha-metric-not-reported", {"sweep": {"name": "b", "asha": {"metric": "eval_f1"}}}, [],
     "sweep.asha.metric: 'eval_f1' is not reported by every trial"),
    ("cuda-without-gpus", {"device": "cuda"}, [], "device: cuda needs sweep.use_gpu: true"),
    ("gpu-share-ddp", {"sweep": {"name": "b", "use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5}}, [],
     "sweep.gpus_per_worker: 0.5 with num_workers: 2: a trial with several workers (DDP ranks) needs a whole GPU"),
    ("gpu-share-above-one", {"sweep": {"name": "b", "use_gpu": True, "gpus_per_worker": 1.5}}, [],
     "sweep.gpus_per_worker: 1.5: a worker takes a share of one GPU (0.25, 0.5) or whole GPUs (1, 2)"),
]


def _config_file(tmp_path, shared_data_dir, change) -> tuple[Path, Path]:
    storage = tmp_path / "results"
    path = tmp_path / "config.yaml"
    if isinstance(change, str):
        path.write_text(change)
    else:
        raw = _base(shared_data_dir, storage)
        for key, value in change.items():
            if key == "sweep" and isinstance(value, dict):
                raw["sweep"] = {"storage_path": str(storage), **value}
            else:
                raw[key] = value
        path.write_text(yaml.safe_dump(raw))
    return path, storage


@pytest.mark.parametrize("case, change, overrides, expected", CONFIGS + SWEEP_CONFIGS, ids=_case_id)
def test_a_broken_config_is_one_line_through_the_sweep_cli(case, change, overrides, expected, tmp_path,
                                                           shared_data_dir, capsys):
    config, storage = _config_file(tmp_path, shared_data_dir, change)
    for dry in (["--dry-run"], []):  # the real run stops at the same place, before Ray starts
        code, err = _cli(capsys, sweep_cli.main, [str(config), *overrides, "-q", *dry])
        assert code == 2
        assert expected in _error_line(err)
    _nothing_written(storage)


@pytest.mark.parametrize("case, change, overrides, expected", CONFIGS, ids=_case_id)
def test_a_broken_config_is_one_line_through_the_train_cli(case, change, overrides, expected, tmp_path,
                                                           shared_data_dir, capsys):
    config, _ = _config_file(tmp_path, shared_data_dir, change)
    out = tmp_path / "out"
    code, err = _cli(capsys, train_cli.main, [str(config), *overrides, "--output-dir", str(out), "-q"])
    assert code == 2
    assert expected in _error_line(err)
    _nothing_written(out)


def test_a_missing_or_unreadable_config_file(tmp_path, capsys):
    code, err = _cli(capsys, sweep_cli.main, [str(tmp_path / "missing.yaml"), "--dry-run"])
    assert code == 2 and "config file" in _error_line(err) and "not found" in err
    code, err = _cli(capsys, train_cli.main, [str(tmp_path)])  # a folder, not a file
    assert code == 2 and "not found" in _error_line(err)


def test_a_config_that_is_not_text(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(b"\xff\xfe\x00task: \x80\x81")
    with pytest.raises(UserError, match="binary.yaml"):
        load_experiment(path)


@pytest.mark.parametrize("key, value", [("data_dir", "a\x00b"), ("data_dir", "~no-such-user-xyz/data")])
def test_a_path_that_cannot_be_a_path(key, value, tmp_path, shared_data_dir):
    raw = {**_base(shared_data_dir, tmp_path / "results"), key: value}
    with pytest.raises(UserError, match=key):
        load_experiment(None, raw=raw)


@pytest.mark.parametrize("key", ["seed", "data_seed", "heldout_dev.seed"])
def test_a_seed_too_large_for_the_generators(key, tmp_path, shared_data_dir):
    raw = _base(shared_data_dir, tmp_path / "results")
    if key == "heldout_dev.seed":
        raw["heldout_dev"] = {"size": 10, "seed": 10**20}
    else:
        raw[key] = 10**20
    with pytest.raises(UserError, match=rf"{key}: Input should be less than 4294967296"):
        load_experiment(None, raw=raw)
        raise AssertionError(f"{key}=10**20 was accepted")


# --- broken data files, by hand ---------------------------------------------------------------------------------

GOOD_CSV = "sentence,label\ngreat movie,pos\nawful movie,neg\nfine film,pos\n"
DATA = [  # (id, file name, content, what the error line must say)
    ("empty-csv", "t.csv", b"", "unreadable CSV"),
    ("header-only", "t.csv", b"sentence,label\n", "is empty"),
    ("no-label-column", "t.csv", b"sentence\nhi\nho\n", "record 1 (line 2): field 'label': missing"),
    ("not-utf8", "t.csv", b"\xff\xfe\x00\x81,\x00\n", "unreadable CSV ('utf-8' codec can't decode"),
    ("unclosed-quote", "t.csv", b'sentence,label\n"great,pos\nbad,neg\n', "unreadable CSV"),
    ("one-class", "t.csv", b"sentence,label\na,pos\nb,pos\n", "every record has the label 'pos'"),
    ("bad-json-line", "t.jsonl", b'{"sentence": "a", "label": "pos"}\n{oops\n', "record 2 (line 2): unreadable row"),
    ("json-line-not-object", "t.jsonl", b'{"sentence": "a", "label": "pos"}\n[1, 2]\n', "expected a JSON object"),
    ("json-not-array", "t.json", b'"hello"', "expected a JSON array of objects"),
    ("json-truncated", "t.json", b'[{"sentence": ', "unreadable JSON"),
    ("json-columns-uneven", "t.json", b'{"sentence": ["a"], "label": ["pos", "neg"]}', "equally long lists"),
    ("parquet-garbage", "t.parquet", b"PAR1 not really PAR1", "unreadable Parquet"),
    ("unknown-extension", "t.txt", b"sentence,label\na,pos\n", "cannot tell the format"),
]


def _custom(tmp_path, name, content, role) -> dict:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / name).write_bytes(content)
    (data / "good.csv").write_text(GOOD_CSV)
    files = {"train": str(data / name), "validation": str(data / "good.csv")} if role == "train" else \
        {"train": str(data / "good.csv"), "validation": str(data / name)}
    return {"task": "custom", "custom_task": {"files": files, "text_fields": ["sentence"], "label_field": "label"}}


@pytest.mark.parametrize("case, name, content, expected, role", [
    pytest.param(*case, role, id=f"{case[0]}-{role}") for case in DATA for role in ("train", "validation")
    if not (case[0] == "one-class" and role == "validation")])  # a validation file may hold one class
def test_a_broken_data_file_is_one_line_before_anything_runs(case, name, content, expected, role, tmp_path,
                                                              shared_data_dir, capsys):
    raw = {**_base(shared_data_dir, tmp_path / "results"), **_custom(tmp_path, name, content, role)}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    code, err = _cli(capsys, sweep_cli.main, [str(config), "-q", "--dry-run"])
    assert code == 2
    line = _error_line(err)
    assert expected in line and name in line, err  # what is wrong, and in which file
    _nothing_written(tmp_path / "results")


def test_a_broken_mirror_file_is_one_line_in_both_clis(tmp_path, shared_data_dir, capsys):
    """A registered task read from a local mirror with one bad record in its validation file."""
    mirror = tmp_path / "mirror" / "superglue" / "cb"
    shutil.copytree(shared_data_dir / "superglue" / "cb", mirror)
    validation = next(p for p in ("val.jsonl", "validation.jsonl") if (mirror / p).exists())
    lines = (mirror / validation).read_text().splitlines()
    record = json.loads(lines[2])
    record["label"] = "maybe"
    lines[2] = json.dumps(record)
    (mirror / validation).write_text("\n".join(lines) + "\n")
    raw = {**_base(tmp_path / "mirror", tmp_path / "results")}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    expected = f"{validation}, record 3 (line 3): field 'label'"
    for main, argv in ((sweep_cli.main, ["--dry-run"]), (sweep_cli.main, []),
                       (train_cli.main, ["--output-dir", str(tmp_path / "out")])):
        code, err = _cli(capsys, main, [str(config), "-q", *argv])
        assert code == 2 and expected in _error_line(err), err
        assert "'maybe'" in _error_line(err)
    _nothing_written(tmp_path / "results", tmp_path / "out")


# --- fuzzed configs, overrides and data files -------------------------------------------------------------------

_SAFE_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00~"), max_size=12)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                     _SAFE_TEXT, st.sampled_from(["superglue/cb", "glue/rte", "custom", "dynsdpb", "finetune",
                                                  "tiny-bert", "auto", "cpu", "fp32", "train", "validation[:4]"]))
_VALUES = st.recursive(_SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(_SAFE_TEXT, inner, max_size=3)), max_leaves=6)
_KEYS = st.sampled_from([k for k in TrialConfig.model_fields if k not in ("output_dir",)]
                        + ["search", "sweep", "typo_key", "lora.r"])


def _fuzzed_outcome(raw: dict) -> None:
    """Load, plan and check a fuzzed config: it is fine, or a UserError with a message; nothing else."""
    try:
        experiment = load_experiment(None, raw=raw)
        experiment.first_point()
        if experiment.sweep is not None:
            plan = plan_sweep(experiment)
            check_data(plan)
            check_models(plan)
    except UserError as err:
        assert str(err).strip()


@FUZZ
@given(changes=st.dictionaries(_KEYS, _VALUES, max_size=4))
def test_fuzzed_config_values_are_accepted_or_refused_with_a_user_error(changes, tmp_path, shared_data_dir):
    raw = _base(shared_data_dir, tmp_path / "results")
    for key, value in changes.items():
        if key in ("data_dir", "model", "gguf_file") and isinstance(value, str):
            assume(not value.startswith("/"))  # no stray absolute paths into the machine
        raw[key] = value
    _fuzzed_outcome(raw)
    _nothing_written(tmp_path / "results")


@FUZZ
@given(search=st.dictionaries(_KEYS, st.one_of(_VALUES, st.lists(_SCALARS, min_size=1, max_size=3)), max_size=3),
       sweep=st.dictionaries(st.sampled_from(["name", "num_workers", "cpus_per_worker", "asha", "max_failures",
                                              "keep_checkpoints", "report_every_steps", "use_gpu", "typo"]),
                             _VALUES, max_size=3))
def test_fuzzed_search_and_sweep_blocks(search, sweep, tmp_path, shared_data_dir):
    raw = _base(shared_data_dir, tmp_path / "results")
    raw["search"] = search
    raw["sweep"] = {**raw["sweep"], **sweep}
    _fuzzed_outcome(raw)


@FUZZ
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=200))
def test_fuzzed_yaml_text(text, tmp_path):
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_trial_config(path)
    except UserError as err:
        assert str(err).strip()


@FUZZ
@given(items=st.lists(st.one_of(
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from(list(TrialConfig.model_fields) + ["sweep.name", "search.lr",
                                                        "lora.r", "sweep.asha.max_t", "a.b.c", ""]),
              st.text(alphabet=string.printable.replace("\x0b", "").replace("\x0c", ""), max_size=15)),
    st.text(alphabet=string.ascii_letters + "=.[]{}:, ", max_size=15)), max_size=4))
def test_fuzzed_overrides(items, tmp_path, shared_data_dir):
    items = [i for i in items if not i.split("=", 1)[-1].lstrip().startswith(("/", "~"))]
    raw = _base(shared_data_dir, tmp_path / "results")
    try:
        experiment = load_experiment(None, items, raw=raw)
        if experiment.sweep is not None:
            plan_sweep(experiment)
    except UserError as err:
        assert str(err).strip()


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8-sig")
        return True
    except UnicodeDecodeError:
        return False


def test_a_custom_json_file_that_is_not_text(tmp_path):
    from raysdpb.config import CustomTaskConfig

    (tmp_path / "train.json").write_bytes(b"\x80")
    (tmp_path / "dev.csv").write_text(GOOD_CSV)
    custom = CustomTaskConfig(files={"train": str(tmp_path / "train.json"), "validation": str(tmp_path / "dev.csv")},
                              text_fields=["sentence"], label_field="label", labels=["neg", "pos"])
    with pytest.raises(UserError, match="train.json"):
        load_examples(custom_task_spec(custom), "train")


_CELL = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.floats(allow_nan=True), st.none(), st.booleans(),
                  st.lists(st.integers(), max_size=2))


@FUZZ
@given(fmt=st.sampled_from(["csv", "tsv", "jsonl", "json", "parquet"]),
       rows=st.lists(st.dictionaries(st.sampled_from(["sentence", "label", "other", ""]), _CELL, max_size=3),
                     max_size=6),
       garbage=st.one_of(st.none(), st.binary(max_size=64)))
def test_fuzzed_data_files_load_or_fail_with_a_user_error(fmt, rows, garbage, tmp_path):
    """A custom task's train file, structurally fuzzed (rows of any fields and values) or raw bytes."""
    path = tmp_path / f"train.{fmt}"
    if garbage is not None:
        if fmt == "json":  # see test_a_custom_json_file_that_is_not_text
            assume(_utf8(garbage))
        path.write_bytes(garbage)
    elif fmt in ("csv", "tsv"):
        import pandas as pd

        pd.DataFrame(rows).to_csv(path, sep="," if fmt == "csv" else "\t", index=False)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, ValueError):
            assume(False)
        pq.write_table(table, path)
    (tmp_path / "dev.csv").write_text(GOOD_CSV)
    from raysdpb.config import CustomTaskConfig

    custom = CustomTaskConfig(files={"train": str(path), "validation": str(tmp_path / "dev.csv")},
                              text_fields=["sentence"], label_field="label", labels=["neg", "pos"])
    try:
        spec = custom_task_spec(custom)
        for split in ("train", "validation"):
            records = load_examples(spec, split)
            assert all(r["label"] in (0, 1) and isinstance(r["text"], str) for r in records)
    except UserError as err:
        assert str(err).strip()


@FUZZ
@given(lines=st.lists(st.one_of(
    st.fixed_dictionaries({"premise": _CELL, "hypothesis": _CELL, "label": st.one_of(
        st.sampled_from(["entailment", "contradiction", "neutral", "maybe", 0, 2, 7]), _CELL)}),
    st.dictionaries(st.sampled_from(["premise", "hypothesis", "label", "idx"]), _CELL, max_size=4)), min_size=0,
    max_size=5), junk=st.one_of(st.none(), st.text(max_size=20)))
def test_fuzzed_mirror_records(lines, junk, tmp_path):
    """A registered task's mirror file (SuperGLUE CB JSONL) with fuzzed records, or a junk line."""
    folder = tmp_path / "superglue" / "cb"
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in lines) + ((junk + "\n") if junk is not None else "")
    for name in ("train.jsonl", "val.jsonl"):
        (folder / name).write_text(text)
    try:
        records = load_examples(get_task("superglue/cb"), "train", str(tmp_path))
        assert all(r["label"] in (0, 1, 2) for r in records)
    except UserError as err:
        assert str(err).strip()


# --- a few real command lines -------------------------------------------------------------------------------------

def _run(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def test_real_command_lines_end_in_one_line_and_write_nothing(tmp_path, shared_data_dir):
    raw = {**_base(shared_data_dir, tmp_path / "results"), **_custom(tmp_path, "t.jsonl",
                                                                      b'{"sentence": "a", "label": "pos"}\n{oops\n',
                                                                      "validation")}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    swept = _run("raysdpb.sweep", str(config), "-q", cwd=tmp_path)  # not a dry run: stops before Ray
    assert swept.returncode == 2 and "t.jsonl, record 2 (line 2): unreadable row" in _error_line(swept.stderr)
    trained = _run("raysdpb.train", str(config), "lr=2", "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert trained.returncode == 2 and "lr: Input should be less than 1" in _error_line(trained.stderr)
    trained = _run("raysdpb.train", str(config), "--output-dir", str(tmp_path / "out"), "-q", cwd=tmp_path)
    assert trained.returncode == 2 and "t.jsonl, record 2 (line 2)" in _error_line(trained.stderr)
    _nothing_written(tmp_path / "results", tmp_path / "out")
