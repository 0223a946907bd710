"""The dev split held out from the training split (`heldout_dev:`, raysdpb.tasks.heldout): the pure rule against
hand-computed cases and invariants over many, the trial's records on real data, the metric keys and the sweep's
metric."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raysdpb.config import load_experiment
from raysdpb.errors import UserError
from raysdpb.recipe.components import training_records
from raysdpb.results.schema import best_per_method, eval_metric_keys, main_metric
from raysdpb.sweep.plan import plan_sweep
from raysdpb.tasks import get_task, load_examples, resolve_task
from raysdpb.tasks.heldout import heldout_size, heldout_split
from trial_configs import encoder_trial, sweep_raw


# --- the pure rule -----------------------------------------------------------------------------------------------

def test_stratified_quotas_by_hand():
    # n=10: six of class 0, three of class 1, one of class 2; k=5 -> exact shares 3, 1.5, 0.5: floors 3, 1, 0 and
    # the one left over goes to the largest remainder (1.5 and 0.5 tie at 0.5: to class 1, seen first)
    labels = [0, 1, 0, 0, 2, 1, 0, 0, 1, 0]
    train, dev = heldout_split(labels, 5, seed=0)
    assert Counter(labels[i] for i in dev) == {0: 3, 1: 2}
    # 0.4 of 10 = 4 -> shares 2.4, 1.2, 0.4: floors 2, 1, 0; the one left to class 0 (remainder 0.4 ties class 2's,
    # class 0 seen first)
    _, dev = heldout_split(labels, 0.4, seed=0)
    assert Counter(labels[i] for i in dev) == {0: 3, 1: 1}


def test_sizes_and_errors():
    assert heldout_size(3, 10) == 3 and heldout_size(0.25, 100) == 25 and heldout_size(0.5, 3) == 2
    for size, n, message in [(10, 10, "leave no training example: the training split has 10"),
                             (11, 10, "leave no training example"), (0.04, 10, "hold out no example"),
                             (0.99, 10, "leave no training example")]:
        with pytest.raises(ValueError, match=message):
            heldout_split([0] * n, size, seed=0)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(labels=st.lists(st.integers(0, 3), min_size=2, max_size=60), share=st.floats(0.01, 0.99),
       seed=st.integers(0, 2**32 - 1), stratify=st.booleans())
def test_split_invariants(labels, share, seed, stratify):
    n = len(labels)
    k = min(max(1, round(share * n)), n - 1)
    train, dev = heldout_split(labels, k, seed, stratify)
    assert len(dev) == k and len(train) == n - k  # exact sizes
    assert sorted(train + dev) == list(range(n)) and not set(train) & set(dev)  # disjoint, together the split
    assert train == sorted(train) and dev == sorted(dev)
    assert heldout_split(labels, k, seed, stratify) == (train, dev)  # stable under the seed
    if stratify:
        counts, in_dev = Counter(labels), Counter(labels[i] for i in dev)
        for label, n_c in counts.items():  # each class within one example of its share
            assert abs(in_dev[label] - k * n_c / n) < 1


def test_different_seeds_pick_different_examples():
    labels = [i % 3 for i in range(300)]
    picks = {tuple(heldout_split(labels, 60, seed)[1]) for seed in range(5)}
    assert len(picks) == 5
    assert len({tuple(heldout_split(labels, 60, seed, stratify=False)[1]) for seed in range(5)}) == 5


# --- a trial's records on real data ------------------------------------------------------------------------------

def _key(record: dict) -> tuple:
    return record["text"], record.get("text_pair")


@pytest.mark.parametrize("task_name", ["superglue/cb", "glue/rte", "glue/mrpc"])
def test_dev_is_disjoint_from_training_and_validation(task_name, shared_data_dir):
    cfg = encoder_trial(shared_data_dir, task=task_name, max_train_samples=None, heldout_dev={"size": 0.1, "seed": 3})
    task = resolve_task(cfg)
    whole = load_examples(task, "train", str(shared_data_dir))
    train, dev = training_records(cfg, task)
    assert len(dev) == round(0.1 * len(whole)) and len(train) + len(dev) == len(whole)
    assert not {r["idx"] for r in train} & {r["idx"] for r in dev}
    validation = {_key(r) for r in load_examples(task, "validation", str(shared_data_dir))}
    assert not validation & {_key(r) for r in dev}
    # stratified: each class's share of the dev set within one example of its share of the split
    whole_counts, dev_counts = Counter(r["label"] for r in whole), Counter(r["label"] for r in dev)
    for label, n_c in whole_counts.items():
        assert abs(dev_counts[label] - len(dev) * n_c / len(whole)) < 1


def test_dev_does_not_move_with_the_training_subset_or_the_trial_seeds(shared_data_dir):
    task = get_task("superglue/cb")
    heldout = {"size": 40, "seed": 7}
    full_train, dev = training_records(encoder_trial(shared_data_dir, max_train_samples=None, heldout_dev=heldout),
                                       task)
    for overrides in [{"max_train_samples": 32}, {"max_train_samples": 100, "seed": 5}, {"seed": 9}]:
        train, same_dev = training_records(encoder_trial(shared_data_dir, heldout_dev=heldout, **overrides), task)
        assert same_dev == dev
        # max_train_samples takes the first examples of what the dev set leaves
        assert train == full_train[: overrides.get("max_train_samples", 48)]
    other = training_records(encoder_trial(shared_data_dir, heldout_dev={"size": 40, "seed": 8}), task)[1]
    assert [r["idx"] for r in other] != [r["idx"] for r in dev]
    assert training_records(encoder_trial(shared_data_dir), task)[1] is None


def test_a_dev_set_as_large_as_the_split_is_a_user_error(shared_data_dir):
    cfg = encoder_trial(shared_data_dir, heldout_dev={"size": 250})  # CB's training split has 250 examples
    with pytest.raises(UserError, match=r"heldout_dev\.size: 250 examples leave no training example: the training "
                                        r"split has 250 \(superglue/cb:train\)"):
        training_records(cfg, get_task("superglue/cb"))


# --- metric keys and the sweep's metric --------------------------------------------------------------------------

def test_metric_keys_with_a_dev_split():
    cb, mnli = get_task("superglue/cb"), get_task("glue/mnli")
    assert eval_metric_keys(cb, heldout_dev=True) == ["eval_dev_accuracy", "eval_dev_macro_f1", "eval_dev_loss",
                                                      "eval_accuracy", "eval_macro_f1", "eval_loss"]
    assert main_metric(cb, heldout_dev=True) == "eval_dev_accuracy" and main_metric(cb) == "eval_accuracy"
    assert eval_metric_keys(mnli, heldout_dev=True) == ["eval_dev_accuracy", "eval_dev_loss", "eval_accuracy",
                                                        "eval_loss", "eval_mm_accuracy", "eval_mm_loss"]
    assert eval_metric_keys(cb, "validation[:10]", heldout_dev=True)[:4] == [
        "eval_dev_accuracy", "eval_dev_macro_f1", "eval_dev_loss", "eval_accuracy"]


def test_the_sweep_selects_on_the_dev_split(tmp_path, shared_data_dir):
    raw = sweep_raw(shared_data_dir, tmp_path, "dev", {"method": ["finetune", "dynsdpb"]},
                    heldout_dev={"size": 32})
    plan = plan_sweep(load_experiment(None, raw=raw))
    assert plan.metric == "eval_dev_accuracy"  # the main metric: each trial is selected on its dev split
    assert set(plan.score_metrics.values()) == {"eval_dev_accuracy"}
    assert {t.main_metric for t in plan.trials} == {"eval_dev_accuracy"}
    for metric in ("eval_dev_macro_f1", "eval_accuracy"):  # ASHA may use any key every trial reports
        raw["sweep"]["asha"] = {"metric": metric}
        assert plan_sweep(load_experiment(None, raw=raw)).metric == metric
    del raw["heldout_dev"]
    raw["sweep"]["asha"] = {"metric": "eval_dev_accuracy"}
    with pytest.raises(UserError, match=r"sweep\.asha\.metric: 'eval_dev_accuracy' is not reported by every trial"):
        plan_sweep(load_experiment(None, raw=raw))
    # the best-trial rule takes the dev metric like any other
    rows = [{"method": m, "best_eval_dev_accuracy": v} for m, v in [("finetune", 0.5), ("finetune", 0.7),
                                                                     ("dynsdpb", 0.6)]]
    assert [r["best_eval_dev_accuracy"] for r in best_per_method(rows, "eval_dev_accuracy")] == [0.7, 0.6]


def test_a_custom_split_named_dev_clashes_with_the_dev_keys(tmp_path):
    rows = "sentence,label\n" + "".join(f"s{i},{'ab'[i % 2]}\n" for i in range(20))
    for name in ("train", "validation", "dev"):
        (tmp_path / f"{name}.csv").write_text(rows)
    raw = sweep_raw(tmp_path, tmp_path / "results", "clash", {}, task="custom", heldout_dev={"size": 4},
                    custom_task={"files": {n: str(tmp_path / f"{n}.csv") for n in ("train", "validation", "dev")},
                                 "text_fields": ["sentence"], "label_field": "label"})
    with pytest.raises(UserError, match=r"heldout_dev: task custom's evaluation split 'dev' already reports "
                                        r"eval_dev_<metric>"):
        plan_sweep(load_experiment(None, raw=raw))


def test_the_report_falls_back_to_the_dev_metric_of_a_trial_with_a_dev_split():
    import pandas as pd

    from raysdpb.report.tables import prepare

    trials = pd.DataFrame([dict(method="finetune", task="superglue/cb", seed=0, status="completed",
                                **{"heldout_dev.size": size}, best_eval_dev_accuracy=0.6, best_eval_accuracy=0.8)
                           for size in (20, None)])
    prepared = prepare(trials)  # no main_metric column (an older sweep): the rule of schema.main_metric
    assert list(prepared["_metric"]) == ["eval_dev_accuracy", "eval_accuracy"]
    assert list(prepared["_value"]) == [0.6, 0.8]


# --- what a trial evaluates: heldout_dev.evaluate ---------------------------------------------------------------

def test_what_a_trial_with_a_dev_split_evaluates(shared_data_dir, tmp_path):
    """`heldout_dev.evaluate`: "dev" evaluates the dev split alone (no validation example is even read), and the
    sweep selects on it; "validation" the validation split alone, the dev examples still out of training; "both"
    (the default) both, dev first. The keys the sweep plans are the keys a real trial reports, and the training
    examples are the same in every mode."""
    from raysdpb.recipe import run_trial
    from raysdpb.recipe.components import load_trial_data
    from raysdpb.recipe.context import LocalContext

    cb = get_task("superglue/cb")
    assert eval_metric_keys(cb, heldout_dev="dev") == ["eval_dev_accuracy", "eval_dev_macro_f1", "eval_dev_loss"]
    assert eval_metric_keys(cb, heldout_dev="validation") == ["eval_accuracy", "eval_macro_f1", "eval_loss"]
    assert eval_metric_keys(cb, heldout_dev="both") == eval_metric_keys(cb, heldout_dev=True)
    assert main_metric(cb, heldout_dev="validation") == "eval_accuracy"
    train_sets = {}
    for mode, keys in (("dev", ["eval_dev_accuracy", "eval_dev_macro_f1", "eval_dev_loss"]),
                       ("validation", ["eval_accuracy", "eval_macro_f1", "eval_loss"]),
                       ("both", ["eval_dev_accuracy", "eval_dev_macro_f1", "eval_dev_loss", "eval_accuracy",
                                 "eval_macro_f1", "eval_loss"])):
        heldout = {"size": 24, "evaluate": mode}
        cfg = encoder_trial(shared_data_dir, heldout_dev=heldout, method="finetune", max_eval_samples=8)
        _, evals = load_trial_data(cfg, resolve_task(cfg), _tokenizer(cfg))
        train_sets[mode] = [r["idx"] for r in training_records(cfg, cb)[0]]
        expected = {"dev": {"dev_": 24}, "validation": {"": 8}, "both": {"dev_": 24, "": 8}}[mode]
        assert {prefix: len(records) for prefix, records, _ in evals} == expected
        result = run_trial(cfg, LocalContext(tmp_path / mode))
        assert sorted(k for k in result.history[-1] if k.startswith("eval_")) == sorted(keys), mode
        raw = sweep_raw(shared_data_dir, tmp_path / "plans", mode, {"method": ["finetune"]}, heldout_dev=heldout)
        plan = plan_sweep(load_experiment(None, raw=raw))
        assert plan.metric == keys[0] and {t.main_metric for t in plan.trials} == {keys[0]}
    assert train_sets["dev"] == train_sets["validation"] == train_sets["both"]


def _tokenizer(cfg):
    from raysdpb.models import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(cfg.model))


def test_the_report_scores_a_validation_only_trial_on_validation():
    import pandas as pd

    from raysdpb.report.tables import prepare

    rows = [{"heldout_dev.size": 20, "heldout_dev.evaluate": mode} for mode in ("validation", "dev", None)]
    trials = pd.DataFrame([dict(method="finetune", task="superglue/cb", seed=0, status="completed", **row,
                                best_eval_dev_accuracy=0.6, best_eval_accuracy=0.8) for row in rows])
    assert list(prepare(trials)["_metric"]) == ["eval_accuracy", "eval_dev_accuracy", "eval_dev_accuracy"]
