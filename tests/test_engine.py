"""The training recipe end to end: real trials of a tiny random BERT and of MiniLM-L6 on real SuperGLUE CB."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from raysdpb.config import load_trial_config
from raysdpb.recipe.checkpoint import CHECKPOINT_PREFIX, checkpoint_name, is_complete_folder, load_state, mark_complete
from raysdpb.recipe.context import LocalContext
from raysdpb.recipe import run_trial
from raysdpb.errors import UserError
from raysdpb.methods import METHODS
from trial_configs import RecordingContext, make_teacher
from trial_configs import encoder_trial as _config

REPO = Path(__file__).resolve().parents[1]




@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_evaluates(method, shared_data_dir, tmp_path, monkeypatch):
    # PS-KD's targets are the previous epoch's predictions: a second epoch to have some; KD's a teacher's
    targets = METHODS[method].soft_targets
    extra = {}
    if targets == "teacher":
        monkeypatch.setenv("RAYSDPB_CACHE", str(tmp_path / "cache"))
        extra = {"teacher_model": str(make_teacher(tmp_path / "teacher")), "alpha": 0.5}
    cfg = _config(shared_data_dir, method=method, log_every_steps=1,
                  epochs=2 if targets == "previous_epoch" else 1, **extra)
    context = RecordingContext(tmp_path / "run")
    result = run_trial(cfg, context)
    assert result.status == "completed"
    assert set(result.metrics) == {"eval_accuracy", "eval_macro_f1", "eval_loss"}
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0 and result.metrics["eval_loss"] > 0
    epochs = cfg.epochs * METHODS[method].epoch_multiplier
    assert len(result.history) == epochs and result.history[-1]["epoch"] == epochs
    # samples seen at each epoch's end: N a plain epoch; an overlap epoch forwards every sample twice (2N), less
    # the first epoch's one batch that only primes the stream
    n, b = cfg.max_train_samples, cfg.batch_size
    overlap = METHODS[method].loader == "overlap"
    assert [h["samples_seen"] for h in result.history] == [
        (2 * n * e - b if overlap else n * e) for e in range(1, epochs + 1)]
    losses = [s["train/loss"] for _, s in context.scalars if "train/loss" in s]
    assert losses and all(math.isfinite(x) for x in losses)
    distilled = [s for _, s in context.scalars if "train/distill" in s]
    assert bool(distilled) == METHODS[method].distills
    # TensorBoard events were written
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_dynsdpb_alpha_and_tau_stay_in_bounds(shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, method="dynsdpb", alpha=0.7, tau=3.0, log_every_steps=1, epochs=2)
    context = RecordingContext(tmp_path / "run")
    run_trial(cfg, context)
    logged = [s for _, s in context.scalars if "dynamic/alpha_mean" in s]
    assert len(logged) > 5
    for s in logged:
        assert 0.0 <= s["dynamic/alpha_min"] <= s["dynamic/alpha_max"] <= 0.7 + 1e-6
        assert 3.0 * 0.5 - 1e-6 <= s["dynamic/tau_min"] <= s["dynamic/tau_max"] <= 3.0 * 2.0 + 1e-6
    # the per-sample values really vary (they are dynamic, not the constants)
    assert any(s["dynamic/tau_std"] > 0 for s in logged)


def test_a_heldout_dev_split_is_evaluated_besides_the_validation_split(shared_data_dir, tmp_path):
    from raysdpb.recipe import Recipe

    cfg = _config(shared_data_dir, heldout_dev={"size": 20, "seed": 1})
    recipe = Recipe(cfg, LocalContext(tmp_path / "run")).setup()
    assert [(prefix, len(records)) for prefix, records, _ in recipe.eval_sets] == [("dev_", 20), ("", 24)]
    assert len(recipe.train_data) == 48  # max_train_samples of the 230 the dev set leaves
    result = recipe.train()
    assert set(result.metrics) == {"eval_dev_accuracy", "eval_dev_macro_f1", "eval_dev_loss", "eval_accuracy",
                                   "eval_macro_f1", "eval_loss"}
    assert result.history[-1]["eval_dev_accuracy"] == result.metrics["eval_dev_accuracy"]


@pytest.mark.parametrize("method", ["dynsdpb", "finetune"])
def test_data_seed_seeds_the_data_order_and_nothing_else(method, shared_data_dir, tmp_path):
    """`data_seed` moves the batch order alone, `seed` the initial weights (the new head) alone; without
    `data_seed` the order is `seed`'s, as before there was one."""
    from raysdpb.recipe import Recipe
    from raysdpb.recipe.context import WorkerContext

    def start(**seeds):
        recipe = Recipe(_config(shared_data_dir, method=method, **seeds), WorkerContext()).setup()
        head = {k: v.clone() for k, v in recipe.model.state_dict().items() if k.startswith("classifier")}
        order = [batch["index"].tolist() for batch in recipe.loader]
        return head, order

    def same_head(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    base_head, base_order = start(seed=1)
    assert (base_head, base_order) != ({}, [])
    head, order = start(seed=1, data_seed=2)  # same seed, another data order
    assert same_head(head, base_head) and order != base_order
    other_head, other_order = start(seed=3, data_seed=2)  # same data order, another seed
    assert not same_head(other_head, head) and other_order == order
    assert start(seed=2)[1] == order  # data_seed 2 orders the data as seed 2 did on its own
    assert start(seed=1, data_seed=1)[1] == base_order


def test_saved_predictions_reproduce_every_reported_metric(shared_data_dir, tmp_path):
    """`save_predictions`: every evaluation (before training, every 3 steps, each epoch's end) of the dev split
    and the validation split leaves a Parquet file whose predictions and labels give the reported metrics
    exactly; its `idx` are the examples' indices in their split."""
    import pyarrow.parquet as pq

    from raysdpb.metrics import compute_metrics
    from raysdpb.recipe.components import training_records
    from raysdpb.tasks import get_task, load_examples

    task = get_task("superglue/cb")
    cfg = _config(shared_data_dir, heldout_dev={"size": 20, "seed": 1}, save_predictions=True, eval_every_steps=4,
                  eval_before_training=True, epochs=2)
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    reported = {0: {k.removeprefix("initial_"): v for k, v in result.metrics.items() if k.startswith("initial_")}}
    reported |= {entry["step"]: entry for entry in result.history}
    assert len(reported) == len(result.history) + 1 >= 5  # before training, every 4 steps and each epoch's end
    files = sorted(p.name for p in (tmp_path / "run" / "predictions").iterdir())
    assert files == sorted(f"{name}_step{step:08d}.parquet" for step in reported for name in ("dev", "eval"))
    dev_idx = [r["idx"] for r in training_records(cfg, task)[1]]
    validation_idx = [r["idx"] for r in load_examples(task, "validation", str(shared_data_dir))[:24]]
    for step, metrics in reported.items():
        for name, prefix, idx in (("dev", "dev_", dev_idx), ("eval", "", validation_idx)):
            table = pq.read_table(tmp_path / "run" / "predictions" / f"{name}_step{step:08d}.parquet").to_pydict()
            assert table["idx"] == idx
            scores = compute_metrics(task.metrics, table["prediction"], table["label"])
            assert {f"eval_{prefix}{k}": v for k, v in scores.items()} == {
                f"eval_{prefix}{m}": metrics[f"eval_{prefix}{m}"] for m in task.metrics}
    # off by default: nothing written
    run_trial(_config(shared_data_dir), LocalContext(tmp_path / "plain"))
    assert not (tmp_path / "plain" / "predictions").exists()


def _ddp_evaluate(rank, world_size, init_file, data_dir, out):
    import torch.distributed as dist

    from raysdpb.data import collate, tokenize_records
    from raysdpb.models import build_model, load_tokenizer, resolve_model
    from raysdpb.recipe.components import seed_everything
    from raysdpb.recipe.evaluation import evaluate_split
    from raysdpb.tasks import get_task, load_examples

    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    seed_everything(0)
    task = get_task("superglue/cb")
    source = resolve_model("tiny-bert")
    tokenizer = load_tokenizer(source)
    model = build_model(source, kind=task.kind, num_labels=task.num_labels, tokenizer=tokenizer)
    records = load_examples(task, "validation", data_dir)[:23]
    metrics = evaluate_split(model, task, tokenize_records(records, task.kind, tokenizer, 64), records, batch_size=4,
                             collator=collate(tokenizer.pad_token_id), device=torch.device("cpu"), rank=rank,
                             world_size=world_size, predictions_path=Path(out) / f"rank{rank}_of{world_size}.parquet")
    Path(out, f"metrics{rank}_of{world_size}.json").write_text(json.dumps(metrics))
    if world_size > 1:
        dist.destroy_process_group()


def test_under_ddp_rank_0_writes_the_gathered_predictions_once(shared_data_dir, tmp_path):
    import pyarrow.parquet as pq
    import torch.multiprocessing as mp

    mp.spawn(_ddp_evaluate, args=(2, str(tmp_path / "init"), str(shared_data_dir), str(tmp_path)), nprocs=2)
    _ddp_evaluate(0, 1, None, str(shared_data_dir), str(tmp_path))
    written = sorted(p.name for p in tmp_path.glob("*.parquet"))
    assert written == ["rank0_of1.parquet", "rank0_of2.parquet"]  # rank 1 wrote nothing
    single, gathered = (pq.read_table(tmp_path / name).to_pydict() for name in written)
    assert gathered == single and len(gathered["idx"]) == 23  # every example once, in split order
    metrics = {name: json.loads((tmp_path / name).read_text()) for name in
               ("metrics0_of1.json", "metrics0_of2.json", "metrics1_of2.json")}
    assert metrics["metrics0_of2.json"] == metrics["metrics1_of2.json"] == metrics["metrics0_of1.json"]


@pytest.mark.parametrize("task_name", ["superglue/cb", "superglue/copa"])
def test_eval_loss_is_the_mean_cross_entropy_of_the_labels_by_hand(task_name, shared_data_dir):
    """`eval_loss`: each example alone through the model (no padding, no batch), the cross-entropy of its label
    by hand (log-sum-exp of the logits minus the label's logit), averaged; a classifier and a multiple-choice
    task."""
    from raysdpb.data import collate, tokenize_records
    from raysdpb.models import build_model, load_tokenizer, resolve_model
    from raysdpb.recipe.components import seed_everything
    from raysdpb.recipe.evaluation import evaluate_split
    from raysdpb.tasks import get_task, load_examples

    seed_everything(0)
    task = get_task(task_name)
    source = resolve_model("tiny-bert")
    tokenizer = load_tokenizer(source)
    model = build_model(source, kind=task.kind, num_labels=task.num_labels, tokenizer=tokenizer)
    records = load_examples(task, "validation", str(shared_data_dir))[:21]
    dataset = tokenize_records(records, task.kind, tokenizer, 64)
    collator = collate(tokenizer.pad_token_id)
    metrics = evaluate_split(model, task, dataset, records, batch_size=8, collator=collator,
                             device=torch.device("cpu"))
    model.eval()
    by_hand = []
    with torch.no_grad():
        for i, record in enumerate(records):
            batch = collator([dataset[i]])
            logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "index")}).logits[0].double()
            by_hand.append(float(torch.logsumexp(logits, 0) - logits[record["label"]]))
    assert metrics["eval_loss"] == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    assert set(metrics) == {f"eval_{m}" for m in task.metrics} | {"eval_loss"}


def test_same_seed_same_metrics_and_different_seed_differs(shared_data_dir, tmp_path):
    runs = [run_trial(_config(shared_data_dir, method="random_dlb", seed=s), LocalContext(tmp_path / f"r{i}"))
            for i, s in enumerate([3, 3, 4])]
    assert runs[0].history == runs[1].history
    assert runs[0].history[-1]["train_loss"] != runs[2].history[-1]["train_loss"]


def test_report_points_by_hand():
    from raysdpb.recipe.progress import report_points

    assert [report_points(s, 0.25, 100) for s in (0, 24, 25, 49, 50, 100, 199, 200)] == [0, 0, 1, 1, 2, 4, 7, 8]
    # 0.1 is a tenth: the 10th point is reached at N samples exactly (the float 0.1 x 100 is above 10)
    assert [report_points(s, 0.1, 100) for s in (9, 10, 99, 100)] == [0, 1, 9, 10]
    assert report_points(12, 1 / 3, 36) == 1 and report_points(11, 1 / 3, 36) == 0
    assert report_points(300, 1.5, 100) == 2


def test_eval_every_reports_every_method_at_the_same_samples_seen(shared_data_dir, tmp_path):
    """eval_every 0.25 of an epoch of N=48 examples, batches of 8: a report at the first step reaching each of 12,
    24, 36, ... samples, for a plain method (an epoch of 6 steps) as for an overlap one (an epoch of about 12):
    every point of the trial's run is met by a report within one batch of it, and no report comes between
    points but the method's own epoch ends."""
    b, every = 8, 12  # the batch; a quarter of N=48
    histories = {}
    for method in ("finetune", "double_finetune", "dynsdpb"):
        cfg = _config(shared_data_dir, method=method, eval_every=0.25)
        histories[method] = run_trial(cfg, LocalContext(tmp_path / method)).history
    # by hand, a plain epoch: points 12, 24, 36, 48 met at 16, 24, 40 and the epoch's end 48
    assert [h["samples_seen"] for h in histories["finetune"]] == [16, 24, 40, 48]
    assert [h["epoch"] for h in histories["finetune"]] == [pytest.approx(2 / 6, abs=1e-4), 0.5,
                                                           pytest.approx(5 / 6, abs=1e-4), 1.0]
    for method, history in histories.items():
        seen = [h["samples_seen"] for h in history]
        assert seen == sorted(set(seen)), method
        for point in range(every, seen[-1] + 1, every):
            assert any(point <= s < point + b for s in seen), (method, point, seen)
        epoch_ends = {h["samples_seen"] for h in history if float(h["epoch"]).is_integer()}
        between = [s for s in seen if s not in epoch_ends]
        assert all((s - b) // every < s // every for s in between), (method, seen)  # each the first past a point
    assert [h["samples_seen"] for h in histories["double_finetune"]] == [16, 24, 40, 48, 64, 72, 88, 96]
    # an overlap epoch of N=48 is 11 batches (88 samples, each example about twice): twice the reports of a plain one
    assert [h["samples_seen"] for h in histories["dynsdpb"]] == [16, 24, 40, 48, 64, 72, 88]


@pytest.mark.parametrize("method, extra", [("dynsdpb", {}), ("finetune", {}), ("dynsdpb", {"eval_every": 0.25}),
                                           ("ps_kd", {})])
def test_resume_mid_epoch_matches_uninterrupted_run(method, extra, shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, method=method, epochs=2, checkpoint_every_steps=4, **extra)
    full_ctx = LocalContext(tmp_path / "full", keep=100)
    full = run_trial(cfg, full_ctx)
    # a checkpoint taken mid-epoch (step 4 of the first epoch): keep a copy and resume from it
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(4)
    assert is_complete_folder(mid)
    state = load_state(mid)
    assert state["sampler"]["epoch"] == 0 and state["sampler"]["position"] == 4
    # the rank's own state (soft targets, random state, running losses) is kept once, in the list of ranks
    assert len(state["ranks"]) == 1 and not {"cache", "rng", "running", "history"} & set(state)
    if METHODS[method].distills:
        assert state["ranks"][0]["cache"], "the logit cache is part of the checkpoint"
    if METHODS[method].soft_targets == "previous_epoch":  # PS-KD: the predictions of the 4 batches trained on
        memory = state["ranks"][0]["cache"]
        assert memory["probs"].shape == (48, 3) and int(memory["seen"].sum()) == 4 * 8
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(mid, resumed_dir / "from")
    resumed = run_trial(cfg, LocalContext(resumed_dir, resume_from=resumed_dir / "from"))
    assert resumed.metrics == full.metrics
    assert resumed.history == full.history
    assert resumed.steps == full.steps


def test_a_checkpoint_of_an_older_raysdpb_is_one_clear_message(shared_data_dir, tmp_path):
    """Before a release there is no old format to load: a checkpoint of another format (here the one written
    before the recipe: no format key, the rank's state at the top level) and an output folder in the old layout
    (`step_<n>` folders) each end in one message naming what to do."""
    cfg = _config(shared_data_dir, method="dynsdpb", epochs=1)
    run_trial(cfg, LocalContext(tmp_path / "run"))
    saved = sorted((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[-1]
    state = load_state(saved)
    older = {k: v for k, v in state.items() if k not in ("ranks", "format")} | state["ranks"][0]
    torch.save(older, saved / "state.pt")
    mark_complete(saved)
    with pytest.raises(UserError, match=r"written by an older raysdpb \(format 1\).*start the trial again"):
        run_trial(cfg, LocalContext(tmp_path / "again", resume_from=saved))
    old_layout = tmp_path / "old" / "checkpoints" / "step_00000004"
    old_layout.mkdir(parents=True)
    (old_layout / "COMPLETE").touch()
    with pytest.raises(UserError, match="holds checkpoints of an older raysdpb"):
        LocalContext(tmp_path / "old", resume_from="latest")


def test_resume_refuses_a_checkpoint_of_another_world_size(shared_data_dir, tmp_path):
    """A DDP checkpoint holds one state per rank; resuming it with another number of ranks would hand a rank
    soft targets of samples it never sees, so it ends in a UserError that says what to do."""
    cfg = _config(shared_data_dir, method="dynsdpb", epochs=1)
    run_trial(cfg, LocalContext(tmp_path / "run"))
    saved = sorted((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[-1]
    state = load_state(saved)
    torch.save({**state, "ranks": state["ranks"] * 2}, saved / "state.pt")  # as if two ranks had written it
    mark_complete(saved)
    with pytest.raises(UserError, match=r"holds the state of 2 rank\(s\), not of this trial's 1; resume with the "
                                        r"world size that wrote it"):
        run_trial(cfg, LocalContext(tmp_path / "again", resume_from=saved))


def test_elapsed_time_is_reported_and_carried_across_a_resume(shared_data_dir, tmp_path):
    """Every report carries the trial's clock (`elapsed_s`, which results use as `wall_time_s`): increasing,
    within the run's wall time, and on a resume continued from the checkpoint's clock; the history (what the
    trial computed) has no timing in it, so a resumed run's history still equals the uninterrupted one's."""
    import time

    cfg = _config(shared_data_dir, method="finetune", epochs=2, checkpoint_every_steps=4)
    full_ctx = LocalContext(tmp_path / "full", keep=100)
    t0 = time.perf_counter()
    full = run_trial(cfg, full_ctx)
    wall = time.perf_counter() - t0
    clocks = [r["elapsed_s"] for r in full_ctx.reports]
    assert len(clocks) == 2 and 0 < clocks[0] < clocks[1] <= wall
    assert not any("elapsed_s" in entry for entry in full.history)
    mid = tmp_path / "full" / "checkpoints" / checkpoint_name(4)
    state = load_state(mid)
    assert 0 < state["elapsed_s"] < clocks[0]
    # the checkpoint as if its trial had already run for 1000 s
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(mid, resumed_dir / "from")
    torch.save({**state, "elapsed_s": 1000.0}, resumed_dir / "from" / "state.pt")
    mark_complete(resumed_dir / "from")
    ctx = LocalContext(resumed_dir, resume_from=resumed_dir / "from")
    t0 = time.perf_counter()
    resumed = run_trial(cfg, ctx)
    wall = time.perf_counter() - t0
    resumed_clocks = [r["elapsed_s"] for r in ctx.reports]
    assert len(resumed_clocks) == 2 and 1000.0 < resumed_clocks[0] < resumed_clocks[1] <= 1000.0 + wall
    assert resumed.history == full.history


def test_checkpoints_on_disk_are_bounded(shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, method="finetune", epochs=2, checkpoint_every_steps=1)
    run_trial(cfg, LocalContext(tmp_path / "run", keep=2))
    kept = list((tmp_path / "run" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))
    assert len(kept) == 2 and all(is_complete_folder(k) for k in kept)


def test_a_checkpoint_is_written_while_training_goes_on(shared_data_dir, tmp_path):
    """`background_checkpoints` (the default for one process): the first report's checkpoint is written by a
    thread that cannot finish until training has taken two more steps (so training did not wait for it); the
    report goes out only once its checkpoint is whole, late but in order; every checkpoint holds exactly what the
    same trial writes when it waits for each write (weights, optimizer, sampler, history), and the losses and
    scores are the same."""
    import threading

    from safetensors.torch import load_file

    from raysdpb.recipe import Recipe

    cfg = _config(shared_data_dir, method="dynsdpb", epochs=2, eval_every=0.5)
    waited = _config(shared_data_dir, method="dynsdpb", epochs=2, eval_every=0.5, background_checkpoints=False)

    class Watching(LocalContext):
        def report(self, metrics, checkpoint_dir=None):
            handed.append((metrics["step"], recipe.step, is_complete_folder(checkpoint_dir)))
            super().report(metrics, checkpoint_dir)

    handed: list[tuple[int, int, bool]] = []
    recipe = Recipe(cfg, Watching(tmp_path / "background", keep=100)).setup()
    stepped = threading.Event()
    first: list[int] = []
    write, train_step = recipe.write_checkpoint, recipe.train_step

    def slow_first_write(path, state):
        if not first:
            first.append(state["step"])
            assert stepped.wait(60), "training waited for the checkpoint"  # the loop must step on meanwhile
        write(path, state)

    def step_and_signal(batch):
        terms = train_step(batch)
        if first and recipe.step >= first[0] + 2:
            stepped.set()
        return terms

    recipe.write_checkpoint, recipe.train_step = slow_first_write, step_and_signal
    background = recipe.train()
    assert background.status == "completed" and stepped.is_set()
    reported = [step for step, _, _ in handed]
    assert len(handed) >= 3 and reported == sorted(reported) and reported[0] == first[0]
    assert handed[0][1] >= first[0] + 2  # the first report went out after the steps its write waited for
    assert all(whole for _, _, whole in handed)  # never before its checkpoint was whole

    plain = Recipe(waited, LocalContext(tmp_path / "waited", keep=100)).setup()
    synchronous = plain.train()
    assert [e["train_loss"] for e in background.history] == [e["train_loss"] for e in synchronous.history]
    assert [e["eval_accuracy"] for e in background.history] == [e["eval_accuracy"] for e in synchronous.history]
    folders = sorted((tmp_path / "waited" / "checkpoints").iterdir())
    assert [f.name for f in folders] == [checkpoint_name(s) for s in reported]
    for folder in folders:
        ours = tmp_path / "background" / "checkpoints" / folder.name
        a, b = load_file(str(ours / "model.safetensors")), load_file(str(folder / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        sa, sb = load_state(ours), load_state(folder)
        assert sa["sampler"] == sb["sampler"] and sa["step"] == sb["step"]
        assert sa["ranks"][0]["history"] == sb["ranks"][0]["history"]
        for x, y in zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values()):
            assert all(torch.equal(x[k], y[k]) for k in x)


def _run_cli(args, **kwargs):
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "raysdpb.train", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=600, **kwargs)


def test_cli_prints_metrics_json_last(shared_data_dir, tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(
        f"task: superglue/cb\nmodel: tiny-bert\nmethod: random_dlb\ndata_dir: {shared_data_dir}\n"
        "epochs: 1\nbatch_size: 8\nmax_train_samples: 32\nmax_eval_samples: 16\nmax_length: 64\n"
        "search:\n  method: [dynsdpb, finetune]\n  seed: [5, 6]\n"
    )
    proc = _run_cli([str(config), "seed=7", "--output-dir", str(tmp_path / "out"), "-q"])
    assert proc.returncode == 0, proc.stderr
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    # a searched key takes its first value (method), an override wins (seed)
    assert last["method"] == "dynsdpb" and last["seed"] == 7 and last["task"] == "superglue/cb"
    assert {"eval_accuracy", "eval_macro_f1", "status"} <= set(last)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("method=dlb", "unknown method 'dlb'"),
        ("task=glue/nope", "unknown task 'glue/nope'"),
        ("lr=-1", "lr"),
        ("batch_size=0", "batch_size"),
        ("learning_rate=1e-5", "learning_rate: unknown key"),
        ("model=/nonexistent/model", "is no folder on this machine"),
    ],
)
def test_cli_user_errors_are_one_clear_line(override, expected, shared_data_dir, tmp_path):
    config = tmp_path / "trial.yaml"
    config.write_text(f"task: superglue/cb\nmodel: tiny-bert\ndata_dir: {shared_data_dir}\nmax_train_samples: 16\n")
    proc = _run_cli([str(config), override, "--output-dir", str(tmp_path / "out"), "-q"])
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("raysdpb: error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr


def test_cli_missing_config_file(tmp_path):
    proc = _run_cli([str(tmp_path / "missing.yaml")])
    assert proc.returncode == 2 and "not found" in proc.stderr and "Traceback" not in proc.stderr


def test_custom_csv_task(tmp_path):
    import random

    rng = random.Random(0)
    rows = ["sentence,label"]
    for i in range(40):
        good = rng.random() < 0.5
        rows.append(f"\"{'great wonderful' if good else 'awful terrible'} movie {i}\",{'pos' if good else 'neg'}")
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:17]) + "\n")
    cfg = load_trial_config(None, raw=dict(
        task="custom", model="tiny-bert", method="dynsdpb", epochs=3, batch_size=8, lr=3e-3, progress_bar=False,
        custom_task=dict(files={"train": str(tmp_path / "train.csv"), "validation": str(tmp_path / "dev.csv")},
                         text_fields=["sentence"], label_field="label", metric="accuracy")))
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    assert result.status == "completed"
    assert result.metrics["eval_accuracy"] >= 0.9  # a trivially separable task is learned


def test_minilm_on_real_cb(shared_data_dir, tmp_path):
    cfg = _config(shared_data_dir, model="minilm-l6", method="dynsdpb", lr=5e-5, max_train_samples=64,
                  max_eval_samples=56, max_length=128)
    result = run_trial(cfg, LocalContext(tmp_path / "run"))
    assert result.status == "completed"
    assert 0.0 <= result.metrics["eval_accuracy"] <= 1.0 and "eval_macro_f1" in result.metrics


def test_eval_before_training_scores_the_model_as_loaded_and_survives_a_resume(shared_data_dir, tmp_path):
    """`eval_before_training`: the metrics of the untrained model (checked against evaluating a freshly built
    model with the same seed by hand), carried as initial_eval_* in every report and in the result, also
    after a resume from a mid-run checkpoint."""
    from raysdpb.data import collate, tokenize_records
    from raysdpb.recipe.evaluation import evaluate_split
    from raysdpb.models import build_model, load_tokenizer, resolve_model
    from raysdpb.recipe.components import seed_everything
    from raysdpb.tasks import get_task, load_examples

    cfg = _config(shared_data_dir, eval_before_training=True, epochs=2, max_eval_samples=56)
    result = run_trial(cfg, LocalContext(tmp_path / "a"))
    assert result.status == "completed"

    seed_everything(0)
    task = get_task("superglue/cb")
    source = resolve_model("tiny-bert")
    tokenizer = load_tokenizer(source)
    model = build_model(source, kind=task.kind, num_labels=task.num_labels, tokenizer=tokenizer)
    records = load_examples(task, "validation", str(shared_data_dir))[:56]
    by_hand = evaluate_split(model, task, tokenize_records(records, task.kind, tokenizer, 64), records,
                             batch_size=16, collator=collate(tokenizer.pad_token_id), device=torch.device("cpu"))
    assert {f"initial_{k}": v for k, v in by_hand.items()} == {k: v for k, v in result.metrics.items()
                                                               if k.startswith("initial_")}
    assert all(entry["initial_eval_accuracy"] == by_hand["eval_accuracy"] for entry in result.history)
    assert result.metrics["eval_accuracy"] == result.history[-1]["eval_accuracy"]

    # resumed from the checkpoint of epoch 1: the initial metrics come from the checkpoint (no new evaluation:
    # the trained model would score differently), the run ends as the uninterrupted one did
    epoch_one = sorted((tmp_path / "a" / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*"))[0]
    resumed = run_trial(cfg, LocalContext(tmp_path / "b", resume_from=epoch_one))
    assert resumed.metrics == result.metrics
