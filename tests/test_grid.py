"""The grid of a sweep: cartesian product, methods not multiplied by hyperparameters they ignore, stable ids."""

from __future__ import annotations

import pytest

from raysdpb.config import TrialConfig, load_experiment
from raysdpb.errors import UserError
from raysdpb.sweep.grid import expand, flatten_config, method_hyperparameters, trial_id
from raysdpb.methods import METHODS

# trial ids of one config per block (test_known_ids_of_trials_with_every_block_do_not_drift)
PINNED_BLOCK_IDS = ["dynsdpb-874093e8", "dynsdpb-b3cb1e57", "dynsdpb-425921e6"]
BASE = {"task": "superglue/cb", "model": "tiny-bert", "method": "dynsdpb", "alpha": 1.0, "tau": 2.0, "lr": 5e-5,
        "sweep": {"name": "t"}}


def _experiment(search: dict, **trial):
    return load_experiment(None, raw={**BASE, **trial, "search": search})


def test_cartesian_product_without_ignored_hyperparameters():
    exp = _experiment({"method": ["finetune", "random_dlb", "dynsdpb"], "lr": [5e-5, 1e-4],
                       "alpha": [0.5, 1.0], "tau": [2.0, 3.0]})
    points = expand(exp)
    by_method: dict[str, list] = {}
    for p in points:
        by_method.setdefault(p.config.method, []).append(p)
    # finetune ignores alpha and tau: one trial per lr, with the base alpha/tau
    assert len(by_method["finetune"]) == 2
    assert {(p.config.alpha, p.config.tau) for p in by_method["finetune"]} == {(1.0, 2.0)}
    assert len(by_method["random_dlb"]) == len(by_method["dynsdpb"]) == 8
    assert len(points) == 18
    assert len({p.trial_id for p in points}) == 18
    # grid order: the first searched key varies slowest
    assert [p.config.method for p in points[:2]] == ["finetune", "finetune"]


def test_dynamic_finetune_is_multiplied_by_alpha_only():
    assert METHODS["dynamic_finetune"].hyperparameters == ("alpha",)
    points = expand(_experiment({"method": ["dynamic_finetune"], "alpha": [0.5, 1.0, 2.0], "tau": [1.0, 4.0]}))
    assert sorted(p.config.alpha for p in points) == [0.5, 1.0, 2.0]
    assert {p.config.tau for p in points} == {2.0}
    assert all("tau" not in p.label for p in points)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_is_multiplied_exactly_by_what_it_uses(method):
    alphas = [0.25, 0.5] if METHODS[method].alpha_at_most == 1.0 else [0.5, 1.5]  # PS-KD's and KD's mix in [0, 1]
    search = {"method": [method], "alpha": alphas, "tau": [1.0, 3.0], "seed": [0, 1]}
    points = expand(_experiment(search, teacher_model="/a/teacher"))  # kd's; the others ignore it
    used = [k for k in ("alpha", "tau") if k in METHODS[method].hyperparameters]
    assert len(points) == 2 * 2 ** len(used)
    assert method_hyperparameters() >= set(METHODS[method].hyperparameters)


def test_trial_ids_are_stable_and_depend_only_on_what_is_trained(tmp_path):
    search = {"method": ["finetune", "dynsdpb"], "lr": [5e-5, 1e-4]}
    first = expand(_experiment(search))
    again = expand(_experiment(dict(reversed(list(search.items())))))  # another key order: same trials
    assert {p.trial_id for p in first} == {p.trial_id for p in again}
    assert [p.trial_id for p in first] == [p.trial_id for p in expand(_experiment(search))]
    # where the data is on this machine does not change the id; a trained value does
    moved = expand(_experiment(search, data_dir=str(tmp_path), progress_bar=False))
    assert [p.trial_id for p in moved] == [p.trial_id for p in first]
    other = expand(_experiment(search, seed=7))
    assert not {p.trial_id for p in other} & {p.trial_id for p in first}
    # adding points to the grid leaves the ids of the old ones as they were
    bigger = expand(_experiment({**search, "lr": [5e-5, 1e-4, 3e-4]}))
    assert {p.trial_id for p in first} < {p.trial_id for p in bigger}
    # the id is the method plus 8 hex digits, the same in every process (no hash randomisation)
    assert all(p.trial_id.startswith(p.config.method + "-") and len(p.trial_id.split("-")[-1]) == 8 for p in first)
    assert trial_id(first[0].config) == first[0].trial_id


def test_known_trial_id_does_not_drift():
    # a fixed value: if this changes, every saved sweep loses its --resume. Hashed: the values that differ
    # from the defaults, {"lr":5e-05,"model":"tiny-bert","task":"superglue/cb","tau":2.0} (alpha=1.0 and
    # method=dynsdpb are defaults)
    point = expand(_experiment({}))[0]
    assert point.trial_id == trial_id(point.config) == "dynsdpb-462157b4"


def test_a_key_added_to_a_block_leaves_the_ids_of_sweeps_started_before_it():
    # a real trial of protocol v2 (MRPC, random DLB), started before `heldout_dev.evaluate` existed: its id, as
    # saved in that sweep's grid.json, must survive the new key at its default, or the sweep cannot --resume
    trial = TrialConfig.model_validate({
        "task": "glue/mrpc", "model": "minilm-l6", "method": "random_dlb", "max_train_samples": 800,
        "heldout_dev": {"size": 200, "seed": 0, "stratify": True}, "alpha": 0.5, "lr": 5e-05, "warmup_ratio": 0.1,
        "eval_batch_size": 64, "max_length": 96, "device": "cpu", "eval_every_steps": 50})
    assert trial.heldout_dev.evaluate == "both"
    assert trial_id(trial) == "random_dlb-f853c847"
    # set away from its default, the new key is a different trial
    dev_only = trial.model_copy(update={"heldout_dev": trial.heldout_dev.model_copy(update={"evaluate": "dev"})})
    assert trial_id(dev_only) not in {trial_id(trial), "random_dlb-f853c847"}


def test_known_ids_of_trials_with_every_block_do_not_drift():
    # pinned: a new key in `heldout_dev:`, `lora:` or `custom_task:` changes these unless it is listed in
    # raysdpb.config.HASHED_WHEN_SET, and every saved sweep with that block would lose its --resume
    blocks = {"heldout_dev": {"size": 50}, "lora": {"r": 4},
              "custom_task": {"files": {"train": "t.jsonl"}, "text_fields": ["s"], "label_field": "y"}}
    ids = [trial_id(TrialConfig.model_validate({"task": "custom" if k == "custom_task" else "superglue/cb",
                                                "model": "tiny-bert", k: v})) for k, v in blocks.items()]
    assert ids == PINNED_BLOCK_IDS


def test_report_every_steps_sets_eval_every_steps_unless_the_trial_has_its_own():
    exp = _experiment({"lr": [1e-4]})
    assert expand(exp, report_every_steps=5)[0].config.eval_every_steps == 5
    exp = _experiment({"lr": [1e-4]}, eval_every_steps=3)
    assert expand(exp, report_every_steps=5)[0].config.eval_every_steps == 3


def test_report_every_sets_eval_every_unless_the_trial_has_a_cadence_of_its_own():
    exp = _experiment({"lr": [1e-4]})
    point = expand(exp, report_every=0.25)[0]
    assert point.config.eval_every == 0.25 and point.config.eval_every_steps is None
    assert expand(_experiment({"lr": [1e-4]}, eval_every=0.5), report_every=0.25)[0].config.eval_every == 0.5
    own_steps = expand(_experiment({"lr": [1e-4]}, eval_every_steps=3), report_every=0.25)[0].config
    assert (own_steps.eval_every, own_steps.eval_every_steps) == (None, 3)
    # a new key with its default leaves the ids of existing grids as they were
    assert expand(exp)[0].trial_id == expand(_experiment({"lr": [1e-4]}, eval_every=None))[0].trial_id


def test_one_report_cadence_per_trial_and_per_sweep():
    with pytest.raises(UserError, match=r"eval_every \(a fraction of an epoch, in samples seen\) and "
                                        r"eval_every_steps: set one"):
        _experiment({}, eval_every=0.25, eval_every_steps=3)
    with pytest.raises(UserError, match=r"sweep: report_every \(a fraction of an epoch, in samples seen\) and "
                                        r"report_every_steps: set one"):
        _experiment({}, sweep={"name": "x", "report_every": 0.25, "report_every_steps": 3})
    with pytest.raises(UserError, match=r"sweep\.report_every: Input should be greater than 0"):
        _experiment({}, sweep={"name": "x", "report_every": 0})


def test_labels_name_the_searched_values():
    points = expand(_experiment({"method": ["finetune", "dynsdpb"], "alpha": [0.5]}))
    assert [p.label for p in points] == ["method=finetune", "method=dynsdpb,alpha=0.5"]
    assert expand(_experiment({}))[0].label == "dynsdpb"


def test_flatten_config_dots_nested_keys():
    exp = _experiment({}, lora={"r": 4})
    flat = flatten_config(expand(exp)[0].config)
    assert flat["lora.r"] == 4 and flat["lr"] == 5e-5 and "lora" not in flat
    assert flat["custom_task"] is None


def test_a_grid_point_a_method_refuses_is_one_clear_error():
    """Each searched value is valid on the base trial, but ps_kd with alpha 1.5 is not: one line naming the point."""
    from raysdpb.errors import UserError

    with pytest.raises(UserError, match=r"search: the point method=ps_kd,alpha=1.5 is invalid: ps_kd: alpha mixes "
                                        r"its two targets"):
        expand(_experiment({"method": ["dynsdpb", "ps_kd"], "alpha": [0.5, 1.5]}))


def test_teacher_model_is_in_kd_trial_ids_only():
    points = expand(_experiment({"method": ["finetune", "kd"], "alpha": [0.5]}, teacher_model="/a/teacher"))
    plain = expand(_experiment({"method": ["finetune"]}))
    assert points[0].trial_id == plain[0].trial_id  # finetune ignores the teacher
    other = expand(_experiment({"method": ["finetune", "kd"], "alpha": [0.5]}, teacher_model="/b/teacher"))
    assert points[1].trial_id != other[1].trial_id and points[1].config.teacher_model == "/a/teacher"
