"""benchmarks/quality.py's sweep configs and its selection: ASHA only in stage 1, the paper's grid, the tie rules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from raysdpb.config import load_experiment
from raysdpb.sweep.grid import expand

QUALITY = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", QUALITY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _args(quality, tmp_path, *options):
    """The script's own command line (its defaults: all six methods, 3 epochs, seeds 0 1 2, MiniLM-L6)."""
    return quality.parse_args(["--root", str(tmp_path), *options])


@pytest.mark.parametrize("asha", [True, False])
def test_asha_applies_to_the_grid_only_never_to_the_seeds(quality, tmp_path, asha):
    args = _args(quality, tmp_path, "--grid", "small", *(["--asha"] if asha else []))
    _, grid_path = quality.grid_config("glue/rte", args)
    grid = load_experiment(grid_path)
    assert (grid.sweep.asha is not None) is asha
    if asha:
        assert (grid.sweep.asha.grace_period, grid.sweep.asha.reduction_factor) == (1, 3)
        _, later = quality.grid_config("glue/cola", _args(quality, tmp_path, "--grid", "small", "--asha",
                                                          "--asha-grace", "2"))
        assert load_experiment(later).sweep.asha.grace_period == 2
    chosen = {"lr": 1e-4, "alpha": 0.5, "tau": 2.0}
    _, seeds_path = quality.seeds_config("glue/rte", "dynsdpb", chosen, args)
    seeds = load_experiment(seeds_path)
    # every seed trains its full epochs: an ASHA stop would score a seed at an earlier epoch than the others
    assert seeds.sweep.asha is None
    points = expand(seeds)
    assert sorted(p.config.seed for p in points) == [0, 1, 2]
    assert {(p.config.method, p.config.lr, p.config.alpha, p.config.tau, p.config.epochs) for p in points} == {
        ("dynsdpb", 1e-4, 0.5, 2.0, 3)}


@pytest.mark.parametrize("task,batch,length,n_trials", [("superglue/cb", 8, 256, 96), ("glue/cola", 32, 128, 96)])
def test_paper_grid_per_task(quality, tmp_path, task, batch, length, n_trials):
    args = _args(quality, tmp_path, "--grid", "paper")
    _, path = quality.grid_config(task, args)
    points = expand(load_experiment(path))
    # finetune/double_finetune x 3 lr, the DLBs and dynsdpb x 27, dynamic_finetune x 9 (it uses alpha only)
    assert len(points) == n_trials == 2 * 3 + 3 * 27 + 9
    assert {(p.config.batch_size, p.config.max_length) for p in points} == {(batch, length)}
    assert {p.config.seed for p in points} == {0}


def test_select_takes_the_best_score_and_breaks_ties_to_smaller_values(quality):
    def row(method, lr, alpha, tau, acc, status="completed"):
        return {"method": method, "lr": lr, "alpha": alpha, "tau": tau, "best_eval_accuracy": acc,
                "status": status, "trial_id": f"{method}-{lr}-{alpha}-{tau}", "label": ""}

    rows = [row("dynsdpb", 1e-4, 1.0, 2.0, 0.75), row("dynsdpb", 5e-5, 1.0, 2.0, 0.75),
            row("dynsdpb", 5e-5, 0.5, 2.0, 0.70), row("dynsdpb", 2e-5, 0.5, 1.0, 0.90, status="errored"),
            row("finetune", 5e-5, 1.0, 1.0, float("nan")), row("finetune", 1e-4, 1.0, 1.0, 0.6),
            row("random_dlb", 1e-4, 1.0, 2.0, 0.8, status="stopped_by_asha"),
            row("random_dlb", 1e-4, 0.5, 2.0, 0.8)]
    chosen = quality.select(rows, "superglue/cb", "best")
    # the errored trial's 0.90 does not count; of the two 0.75s the smaller lr wins
    assert (chosen["dynsdpb"]["lr"], chosen["dynsdpb"]["alpha"], chosen["dynsdpb"]["score"]) == (5e-5, 1.0, 0.75)
    # a NaN score is skipped, not selected
    assert chosen["finetune"]["lr"] == 1e-4
    # equal scores: the smaller alpha; a trial ASHA stopped still counts with its best epoch
    assert chosen["random_dlb"]["alpha"] == 0.5
    assert chosen["dynsdpb"]["metric"] == "best_eval_accuracy"


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("method", ["finetune", "double_finetune", "random_dlb", "sequential_dlb", "dynsdpb"])
def test_workload_counts_what_the_engines_sampler_and_collator_produce(quality, method, device):
    """The dry run's padded-token count against the real thing: the engine's sampler in a DataLoader with
    the collator it builds for the device (CUDA pads to a multiple of 8), counting the padded input_ids of
    every batch over every epoch (double_finetune's 2x, the overlap methods' 2x steps), for random lengths
    and an odd dataset size."""
    import random

    from torch.utils.data import DataLoader

    from raysdpb.data import TokenizedDataset, collate, pad_multiple_for
    from raysdpb.recipe.components import make_sampler
    from raysdpb.methods import METHODS

    rng = random.Random(7)
    lengths = [rng.randint(3, 60) for _ in range(203)]
    items = [{"index": i, "input_ids": [5] * n, "attention_mask": [1] * n, "labels": 0} for i, n in enumerate(lengths)]
    spec = METHODS[method]
    sampler = make_sampler(spec, len(items), 16, seed=3)
    pad_to = pad_multiple_for(device)
    loader = DataLoader(TokenizedDataset(items, "classification"), batch_sampler=sampler,
                        collate_fn=collate(0, pad_to_multiple_of=pad_to))
    steps = tokens = 0
    for epoch in range(2 * spec.epoch_multiplier):
        sampler.set_epoch(epoch)
        for batch in loader:
            steps += 1
            tokens += batch["input_ids"].numel()
    assert quality.trial_workload(lengths, method, 16, 2, 3, pad_to_multiple_of=pad_to) == (steps, tokens)
    assert steps == sampler.total_batches(2 * spec.epoch_multiplier)
    assert quality.trial_workload(lengths, method, 16, 2, 3, choices=4, pad_to_multiple_of=pad_to)[1] == 4 * tokens
    if device == "cuda":  # the rounding is counted: without it the CPU count is smaller
        assert quality.trial_workload(lengths, method, 16, 2, 3)[1] < tokens


def test_padded_length_is_the_smallest_multiple_at_least_the_longest():
    """The one padding rule the collator and the dry run share, checked against its definition."""
    from raysdpb.data import Collator, padded_length

    for multiple in (None, 0, 1, 3, 8, 64):
        for longest in range(1, 300):
            got = padded_length(longest, multiple)
            assert Collator(0, multiple).padded_length(longest) == got
            if not multiple:
                assert got == longest
            else:
                assert got % multiple == 0 and longest <= got < longest + multiple


def test_a_seeds_stage_for_some_methods_leaves_stage_1s_config_as_written(quality, tmp_path, monkeypatch):
    """`--stage seeds --methods X` runs X's seeds from the recorded selection; stage 1's grid config still
    lists every method it ran (it once got rewritten with X alone)."""
    _, grid_path = quality.grid_config("glue/rte", _args(quality, tmp_path, "--grid", "small", "--asha"))
    written = grid_path.read_text()
    chosen = {"lr": 5e-5, "alpha": 1.0, "tau": 1.0, "score": 0.56, "metric": "best_accuracy"}
    (tmp_path / "selection.json").write_text(
        quality.json.dumps({"glue/rte": {m: chosen for m in quality.METHODS}}))
    ran = []
    monkeypatch.setattr(quality, "run_sweep", lambda name, path, args, **kw: ran.append((name, Path(path))) or [])
    monkeypatch.setattr("sys.argv", ["quality.py", "--root", str(tmp_path), "--tasks", "glue/rte", "--grid",
                                     "small", "--stage", "seeds", "--resume", "--methods", "random_dlb"])
    quality.main()
    assert grid_path.read_text() == written
    assert "- dynsdpb" in written and "- finetune" in written
    assert [name for name, _ in ran] == ["quality-seeds-glue-rte-random_dlb"]
    seeds = load_experiment(ran[0][1])
    assert (seeds.trial.method, seeds.trial.lr, seeds.search) == ("random_dlb", 5e-5, {"seed": [0, 1, 2]})


def _grid_row(method: str, lr: float, score: float) -> dict:
    """One finished stage-1 trial as `_rows` reads it from trials.parquet (MRPC's main metric)."""
    return {"trial_id": f"{method}-{lr}", "status": "completed", "method": method, "lr": lr, "alpha": 0.5,
            "tau": 2.0, "label": "", "best_eval_accuracy": score}


def test_a_resumed_seeds_stage_adds_the_methods_whose_grid_finished_since(quality, tmp_path, monkeypatch):
    """Stage 2 can run method by method as their stage-1 grids finish: a resume keeps each recorded choice (a
    method's seeds may have started from it) and selects the methods that had no finished trial before."""
    recorded = {"lr": 5e-5, "alpha": 1.0, "tau": 1.0, "score": 0.70, "metric": "best_eval_accuracy"}
    (tmp_path / "selection.json").write_text(quality.json.dumps({"glue/mrpc": {"finetune": recorded}}))

    grids = {"quality-grid-glue-mrpc-finetune": [_grid_row("finetune", 5e-5, 0.70),
                                                 _grid_row("finetune", 1e-4, 0.80)],
             "quality-grid-glue-mrpc-dynsdpb": [_grid_row("dynsdpb", 5e-5, 0.82),
                                                _grid_row("dynsdpb", 1e-4, 0.81)]}
    monkeypatch.setattr(quality, "_rows", lambda experiment: grids.get(Path(experiment).name, []))
    ran = []
    monkeypatch.setattr(quality, "run_sweep", lambda name, path, args, **kw: ran.append(load_experiment(path)) or [])
    options = ["--root", str(tmp_path), "--tasks", "glue/mrpc", "--grid", "small", "--grid-per-method",
               "--stage", "seeds", "--methods", "finetune", "dynsdpb"]
    monkeypatch.setattr("sys.argv", ["quality.py", *options, "--resume"])
    quality.main()
    saved = quality.json.loads((tmp_path / "selection.json").read_text())["glue/mrpc"]
    assert saved["finetune"] == recorded  # kept, though 1e-4 now scores higher
    assert (saved["dynsdpb"]["lr"], saved["dynsdpb"]["score"]) == (5e-5, 0.82)
    assert [(e.trial.method, e.trial.lr) for e in ran] == [("finetune", 5e-5), ("dynsdpb", 5e-5)]
    # without --resume the selection is made again from stage 1 as it stands
    ran.clear()
    monkeypatch.setattr("sys.argv", ["quality.py", *options])
    quality.main()
    assert [(e.trial.method, e.trial.lr) for e in ran] == [("finetune", 1e-4), ("dynsdpb", 5e-5)]


def test_a_grid_per_method_is_the_same_trials_as_the_one_grid(quality, tmp_path):
    args = _args(quality, tmp_path, "--grid", "small", "--asha", "--grid-per-method")
    configs = quality.grid_configs("glue/cola", args)
    assert [name for name, _ in configs] == [f"quality-grid-glue-cola-{m}" for m in quality.METHODS]
    assert quality.grid_names("glue/cola", args) == [name for name, _ in configs]

    def points(path):
        experiment = load_experiment(path)
        assert experiment.sweep.asha is not None and experiment.sweep.name == Path(path).stem
        return sorted((p.config.method, p.config.lr, p.config.alpha, p.config.tau) for p in expand(experiment))

    split = sorted(x for _, path in configs for x in points(path))
    for (name, path), method in zip(configs, quality.METHODS):
        assert {x[0] for x in points(path)} == {method}
    _, whole = quality.grid_config("glue/cola", _args(quality, tmp_path / "one", "--grid", "small", "--asha"))
    assert split == points(whole) and len(split) == 32


def _finished_experiment(folder: Path, statuses: list[str]) -> None:
    """An experiment folder as raysdpb.sweep leaves it: the two tables, TensorBoard events, Tune's files."""
    from raysdpb.results.storage import write_table

    import pyarrow as pa

    folder.mkdir(parents=True)
    rows = [{"trial_id": f"t{i}", "status": s, "method": "finetune", "lr": 5e-5 * (i + 1), "alpha": 1.0,
             "tau": 1.0, "label": "", "best_eval_mcc": 0.1 * i} for i, s in enumerate(statuses)]
    write_table(pa.Table.from_pylist(rows), str(folder / "trials.parquet"))
    write_table(pa.Table.from_pylist([{"trial_id": "t0", "step": 1, "epoch": 1.0, "eval_mcc": 0.0}]),
                str(folder / "curves.parquet"))
    (folder / "tensorboard" / "t0").mkdir(parents=True)
    (folder / "tensorboard" / "t0" / "events.out.tfevents.1").write_bytes(b"events")
    (folder / "tuner.pkl").write_bytes(b"Tune's state")
    (folder / "checkpoint_000001").mkdir()
    (folder / "checkpoint_000001" / "model.pt").write_bytes(b"weights")


def test_an_archived_sweep_is_read_from_the_archive_and_never_run_again(quality, tmp_path, monkeypatch):
    args = _args(quality, tmp_path / "root", "--archive", str(tmp_path / "kept"), "--resume")
    name = "quality-grid-glue-cola-finetune"
    experiment = Path(args.root) / name
    _finished_experiment(experiment, ["completed", "stopped_by_asha"])
    launched = []
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: launched.append(a))
    first = quality.run_sweep(name, Path("unused.yaml"), args)  # finished in --root: archived, not run
    kept = tmp_path / "kept" / name
    assert sorted(p.name for p in kept.iterdir()) == ["curves.parquet", "tensorboard", "trials.parquet"]
    assert (kept / "tensorboard" / "t0" / "events.out.tfevents.1").read_bytes() == b"events"
    # a new checkout: --root is gone; the archived copy is the sweep, finished
    quality.shutil.rmtree(args.root)
    assert quality.experiment_dir(name, args) == kept
    again = quality.run_sweep(name, Path("unused.yaml"), args)
    assert launched == [] and again == first and [r["trial_id"] for r in again] == ["t0", "t1"]


def test_an_unfinished_sweep_is_not_archived_and_runs_again(quality, tmp_path, monkeypatch):
    args = _args(quality, tmp_path / "root", "--archive", str(tmp_path / "kept"), "--resume", "--keep-going")
    name = "quality-grid-glue-cola-dynsdpb"
    _finished_experiment(Path(args.root) / name, ["completed", "running"])
    launched = []
    monkeypatch.setattr(quality.subprocess, "run",
                        lambda cmd, **k: launched.append(cmd) or quality.subprocess.CompletedProcess(cmd, 1))
    quality.run_sweep(name, Path("grid.yaml"), args)
    assert launched and launched[0][-1] == "--resume"  # continued, not skipped
    assert not (tmp_path / "kept" / name).exists()
    assert quality.experiment_dir(name, args) == Path(args.root) / name


def test_an_archived_sweep_with_other_settings_is_refused_not_reused(quality, tmp_path, monkeypatch):
    """The archive lives on (in a repository): a later run that asks for another grid must not take its rows."""
    archive = tmp_path / "kept"
    first = _args(quality, tmp_path / "a", "--grid", "small", "--asha", "--grid-per-method", "--archive",
                  str(archive), "--resume", "--cpus-per-trial", "0.66")
    name, config = quality.grid_config("glue/cola", first, "dynsdpb")
    _finished_experiment(Path(first.root) / name, ["completed"])
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: pytest.fail("a sweep was started"))
    quality.run_sweep(name, config, first)
    assert (archive / name / "config.yaml").read_text() == config.read_text()
    # the same trials from another root and other resources: the archive stands for them
    same = _args(quality, tmp_path / "b", "--grid", "small", "--asha", "--grid-per-method", "--archive",
                 str(archive), "--resume", "--cpus-per-trial", "1")
    assert [r["trial_id"] for r in quality.run_sweep(name, quality.grid_config("glue/cola", same, "dynsdpb")[1],
                                                     same)] == ["t0"]
    # another grid, or ASHA's grace, under the same sweep name: stopped with what differs
    for options in (["--grid", "paper", "--asha"], ["--grid", "small", "--asha", "--asha-grace", "2"],
                    ["--grid", "small", "--asha", "--epochs", "4"]):
        other = _args(quality, tmp_path / "c", *options, "--grid-per-method", "--archive", str(archive), "--resume")
        with pytest.raises(SystemExit, match="other settings.*pass another --archive"):
            quality.run_sweep(name, quality.grid_config("glue/cola", other, "dynsdpb")[1], other)


def test_the_report_stage_on_a_new_checkout_rebuilds_the_selection_from_stage_1(quality, tmp_path, monkeypatch):
    """`--stage report` with no selection.json under --root (a new checkout, the sweeps archived) reports the
    configurations stage 1 selects, not an empty selection; a recorded selection is reported as recorded."""
    grids = {"quality-grid-glue-mrpc-finetune": [_grid_row("finetune", 5e-5, 0.79),
                                                 _grid_row("finetune", 1e-4, 0.80)],
             "quality-grid-glue-mrpc-dynsdpb": [_grid_row("dynsdpb", 5e-5, 0.82),
                                                _grid_row("dynsdpb", 1e-4, 0.75)]}
    monkeypatch.setattr(quality, "_rows", lambda experiment: grids.get(Path(experiment).name, []))
    monkeypatch.setattr(quality, "run_report", lambda *a: False)
    monkeypatch.setattr(quality, "run_sweep", lambda *a: pytest.fail("the report stage ran a sweep"))
    options = ["quality.py", "--root", str(tmp_path), "--tasks", "glue/mrpc", "--grid", "small",
               "--grid-per-method", "--methods", "finetune", "dynsdpb", "--stage", "report", "--json",
               str(tmp_path / "out.json")]
    monkeypatch.setattr("sys.argv", options)
    quality.main()
    selection = quality.json.loads((tmp_path / "out.json").read_text())["selection"]["glue/mrpc"]
    assert {m: (c["lr"], c["score"]) for m, c in selection.items()} == {"finetune": (1e-4, 0.80),
                                                                       "dynsdpb": (5e-5, 0.82)}
    recorded = {"finetune": {"lr": 5e-5, "alpha": 1.0, "tau": 1.0, "score": 0.79, "metric": "best_eval_accuracy"}}
    (tmp_path / "selection.json").write_text(quality.json.dumps({"glue/mrpc": recorded}))
    quality.main()
    assert quality.json.loads((tmp_path / "out.json").read_text())["selection"]["glue/mrpc"] == recorded


# --- stage 2 takes stage 1's finished trial of the same config and seed -----------------------------------------

def _stage1_experiment(folder: Path, trials: dict[str, str]) -> None:
    """A stage-1 experiment as raysdpb.sweep writes it: `trials` maps trial id -> status; two epochs each."""
    import pyarrow as pa

    from raysdpb.results.storage import write_table

    rows = [{"trial_id": t, "status": s, "label": t, "best_eval_accuracy": 0.5 + 0.01 * i, "finished_at": 100.0 + i}
            for i, (t, s) in enumerate(trials.items())]
    curves = [{"trial_id": t, "step": 10 * epoch, "epoch": float(epoch), "eval_accuracy": 0.4 + 0.1 * epoch,
               "train_loss": 1.0 / epoch, "timestamp": 1000 + epoch, "message": None}
              for t in trials for epoch in (2, 1)]  # out of order, as several trials' reports interleave
    write_table(pa.Table.from_pylist(rows), str(folder / "trials.parquet"))
    write_table(pa.Table.from_pylist(curves), str(folder / "curves.parquet"))
    for t in trials:
        (folder / "tensorboard" / t).mkdir(parents=True)
        (folder / "tensorboard" / t / "events.out.tfevents.1").write_bytes(t.encode())


def test_stage_2_reuses_only_stage_1s_trials_that_ran_to_the_end(quality, tmp_path):
    args = _args(quality, tmp_path, "--grid", "small")
    chosen = {"lr": 1e-4, "alpha": 0.5, "tau": 2.0}
    name, config = quality.seeds_config("glue/rte", "dynsdpb", chosen, args)
    ids = {p.config.seed: p.trial_id for p in expand(load_experiment(config))}
    assert sorted(ids) == [0, 1, 2]
    stage1, other = tmp_path / "grid-a", tmp_path / "grid-b"
    stage1.mkdir(), other.mkdir()
    # seed 0 of the selected configuration finished; another configuration did too; seed 1 (not in a stage 1,
    # but as if it were) was stopped early, so it must train
    _stage1_experiment(stage1, {"dynsdpb-other": "completed", ids[0]: "completed"})
    _stage1_experiment(other, {ids[1]: "stopped_by_asha"})
    experiment = tmp_path / name
    assert quality.reuse_finished_trials(experiment, config, [stage1, other]) == [ids[0]]
    import pyarrow.parquet as pq

    # the others pending, as the sweep lists them when it starts: the folder is not a finished sweep
    assert [(r["trial_id"], r["status"]) for r in pq.read_table(experiment / "trials.parquet").to_pylist()] == [
        (ids[0], "completed"), (ids[1], "pending"), (ids[2], "pending")]
    assert not quality._finished(quality._rows(experiment))
    curves = pq.read_table(experiment / "curves.parquet").to_pylist()
    assert sorted((c["trial_id"], c["epoch"]) for c in curves) == [(ids[0], 1.0), (ids[0], 2.0)]
    marker = quality.json.loads((experiment / "finished" / f"{ids[0]}.json").read_text())
    # what the sweep announces for it: its last report (epoch 2), as the recorder's own marker holds it
    assert marker["status"] == "completed"
    assert marker["last_result"] == {"trial_id": ids[0], "step": 20, "epoch": 2.0, "eval_accuracy": 0.6000000000000001,
                                     "train_loss": 0.5, "timestamp": 1002}
    assert (experiment / "tensorboard" / ids[0] / "events.out.tfevents.1").read_bytes() == ids[0].encode()
    assert sorted(p.name for p in (experiment / "tensorboard").iterdir()) == [ids[0]]
    # nothing to reuse: the folder is not created
    assert quality.reuse_finished_trials(tmp_path / "none", config, [other]) == []
    assert not (tmp_path / "none").exists()


def test_a_seeds_sweep_starts_on_its_reused_trials_and_resumes_only_with_tunes_state(quality, tmp_path, monkeypatch):
    """The folder the reuse wrote is this run's, so the sweep starts there (no --resume, none needed); a run
    stopped before Tune wrote its state starts it again; one with Tune's state resumes it."""
    args = _args(quality, tmp_path / "root", "--grid", "small")
    name, config = quality.seeds_config("glue/rte", "finetune", {"lr": 1e-4, "alpha": 1.0, "tau": 1.0}, args)
    seed0 = next(p.trial_id for p in expand(load_experiment(config)) if p.config.seed == 0)
    stage1 = tmp_path / "grid"
    stage1.mkdir()
    _stage1_experiment(stage1, {seed0: "completed"})
    launched = []
    monkeypatch.setattr(quality.subprocess, "run",
                        lambda cmd, **k: launched.append(cmd) or quality.subprocess.CompletedProcess(cmd, 0))
    quality.run_sweep(name, config, args, reuse_from=[stage1])
    experiment = Path(args.root) / name
    assert launched[-1][-1] == str(config) and (experiment / "finished" / f"{seed0}.json").exists()
    # again without --resume: an existing folder is an error, as for any sweep
    with pytest.raises(SystemExit, match="exists and is not finished; continue it with --resume"):
        quality.run_sweep(name, config, args, reuse_from=[stage1])
    resumed = _args(quality, tmp_path / "root", "--grid", "small", "--resume")
    quality.run_sweep(name, config, resumed, reuse_from=[stage1])
    assert launched[-1][-1] == str(config)  # no Tune state yet: started, on the reused trial
    (experiment / "tuner.pkl").write_bytes(b"state")
    quality.run_sweep(name, config, resumed, reuse_from=[stage1])
    assert launched[-1][-1] == "--resume"


@pytest.mark.parametrize("rerun", [False, True])
def test_the_seeds_stage_reuses_stage_1_unless_told_to_rerun(quality, tmp_path, monkeypatch, rerun):
    recorded = {"lr": 5e-5, "alpha": 1.0, "tau": 1.0, "score": 0.70, "metric": "best_eval_accuracy"}
    (tmp_path / "selection.json").write_text(quality.json.dumps({"glue/mrpc": {"finetune": recorded}}))
    calls = []
    monkeypatch.setattr(quality, "run_sweep", lambda name, path, args, **kw: calls.append((name, kw)) or [])
    monkeypatch.setattr("sys.argv", ["quality.py", "--root", str(tmp_path), "--tasks", "glue/mrpc", "--grid", "small",
                                     "--grid-per-method", "--stage", "seeds", "--resume", "--methods", "finetune",
                                     *(["--rerun-grid-trials"] if rerun else [])])
    monkeypatch.setattr(quality, "run_report", lambda *a: False)
    quality.main()
    assert [name for name, _ in calls] == ["quality-seeds-glue-mrpc-finetune"]
    assert calls[0][1]["reuse_from"] == (None if rerun else [tmp_path / "quality-grid-glue-mrpc-finetune"])


@pytest.mark.slow
def test_stage_2_on_real_sweeps_trains_only_the_seeds_stage_1_did_not(quality, tmp_path, shared_data_dir):
    """Real Ray sweeps of a tiny BERT on CB: stage 2's seed 0 is stage 1's trial, announced and not trained
    again; trained again (`--rerun-grid-trials`) it gives the same validation accuracy at every epoch."""
    import pyarrow.parquet as pq

    options = ["--smoke", "--model", "tiny-bert", "--tasks", "superglue/cb", "--methods", "finetune",
               "--data-dir", str(shared_data_dir), "-q"]  # --smoke: 16 examples, 1 epoch
    args = _args(quality, tmp_path / "root", *options)
    name, grid = quality.grid_config("superglue/cb", args, "finetune")
    grid_rows = quality.run_sweep(name, grid, args)
    chosen = quality.select(grid_rows, "superglue/cb", "best")["finetune"]
    seeds_name, seeds = quality.seeds_config("superglue/cb", "finetune", chosen, args)
    rows = {r["seed"]: r for r in quality.run_sweep(seeds_name, seeds, args, reuse_from=[Path(args.root) / name])}
    assert sorted(rows) == [0, 1] and {r["status"] for r in rows.values()} == {"completed"}
    first = grid_rows[0]
    assert rows[0]["trial_id"] == first["trial_id"] == chosen["trial_id"]
    for key in ("finished_at", "attempts", "best_eval_accuracy", "last_eval_accuracy", "epochs_run"):
        assert rows[0][key] == first[key], key
    experiment = Path(args.root) / seeds_name
    trained = sorted(p.name for p in (experiment / "train_runs").iterdir())
    assert trained == [rows[1]["trial_id"]]  # only seed 1 trained here
    assert (experiment / "tensorboard" / first["trial_id"]).is_dir()

    def eval_curve(folder, trial_id):
        return sorted((c["epoch"], c["eval_accuracy"]) for c in pq.read_table(folder / "curves.parquet").to_pylist()
                      if c["trial_id"] == trial_id and c.get("eval_accuracy") is not None)

    assert eval_curve(experiment, first["trial_id"]) == eval_curve(Path(args.root) / name, first["trial_id"])
    assert [epoch for epoch, _ in eval_curve(experiment, first["trial_id"])] == [1]
    again = _args(quality, tmp_path / "again", *options, "--rerun-grid-trials")
    name_again, seeds_again = quality.seeds_config("superglue/cb", "finetune", chosen, again)
    retrained = {r["seed"]: r for r in quality.run_sweep(name_again, seeds_again, again)}
    assert retrained[0]["finished_at"] != first["finished_at"]
    assert eval_curve(Path(again.root) / name_again, first["trial_id"]) == eval_curve(experiment, first["trial_id"])
