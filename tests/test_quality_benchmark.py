"""benchmarks/quality.py's sweep configs and its selection: ASHA only in stage 1, the paper's grid, the tie rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raysdpb.config import load_experiment
from raysdpb.sweep.grid import expand
from trial_configs import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality.py", "quality_benchmark")


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


def _finished_experiment(folder: Path, statuses: list[str], **columns) -> None:
    """An experiment folder as raysdpb.sweep leaves it: the two tables, TensorBoard events, Tune's files."""
    from raysdpb.results.storage import write_table

    import pyarrow as pa

    folder.mkdir(parents=True)
    rows = [{"trial_id": f"t{i}", "status": s, "method": "finetune", "lr": 5e-5 * (i + 1), "alpha": 1.0,
             "tau": 1.0, "label": "", "best_eval_mcc": 0.1 * i, **columns} for i, s in enumerate(statuses)]
    write_table(pa.Table.from_pylist(rows), str(folder / "trials.parquet"))
    write_table(pa.Table.from_pylist([{"trial_id": "t0", "step": 1, "epoch": 1.0, "eval_mcc": 0.0}]),
                str(folder / "curves.parquet"))
    (folder / "tensorboard" / "t0").mkdir(parents=True)
    (folder / "tensorboard" / "t0" / "events.out.tfevents.1").write_bytes(b"events")
    (folder / "tuner.pkl").write_bytes(b"Tune's state")
    (folder / "checkpoint_000001").mkdir()
    (folder / "checkpoint_000001" / "model.pt").write_bytes(b"weights")
    (folder / "artifacts" / "t0" / "predictions").mkdir(parents=True)
    (folder / "artifacts" / "t0" / "predictions" / "eval_step000010.parquet").write_bytes(b"predictions")
    (folder / "artifacts" / "t0" / "samples.jsonl").write_bytes(b"generations")


def test_an_archived_sweep_is_read_from_the_archive_and_never_run_again(quality, tmp_path, monkeypatch):
    args = _args(quality, tmp_path / "root", "--archive", str(tmp_path / "kept"), "--resume")
    name = "quality-grid-glue-cola-finetune"
    experiment = Path(args.root) / name
    _finished_experiment(experiment, ["completed", "stopped_by_asha"])
    launched = []
    monkeypatch.setattr(quality.subprocess, "run", lambda *a, **k: launched.append(a))
    first = quality.run_sweep(name, Path("unused.yaml"), args)  # finished in --root: archived, not run
    kept = tmp_path / "kept" / name
    assert sorted(p.name for p in kept.iterdir()) == ["artifacts", "curves.parquet", "tensorboard.tar.xz",
                                                     "trials.parquet"]
    # the events packed (raysdpb.report.load.pack_tensorboard), whole
    from raysdpb.report.load import unpack_trial_events

    assert unpack_trial_events(kept / "tensorboard.tar.xz", "t0", tmp_path / "events")
    assert (tmp_path / "events" / "events.out.tfevents.1").read_bytes() == b"events"
    # of the artifacts, the saved predictions only (protocol v2's bootstrap resamples them)
    assert [str(p.relative_to(kept)) for p in sorted((kept / "artifacts").rglob("*")) if p.is_file()] == [
        "artifacts/t0/predictions/eval_step000010.parquet"]
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
    # the same trials from another root, other resources and the data mirror at another path: the archive stands
    same = _args(quality, tmp_path / "b", "--grid", "small", "--asha", "--grid-per-method", "--archive",
                 str(archive), "--resume", "--cpus-per-trial", "1", "--data-dir", str(tmp_path / "mirror"))
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
    # a stage 1 read from an archive keeps its events packed: the reused trial's are unpacked into the folder
    from raysdpb.report.load import pack_tensorboard

    pack_tensorboard(stage1)
    assert not (stage1 / "tensorboard").exists()
    packed = tmp_path / "from-packed"
    assert quality.reuse_finished_trials(packed, config, [stage1, other]) == [ids[0]]
    assert (packed / "tensorboard" / ids[0] / "events.out.tfevents.1").read_bytes() == ids[0].encode()
    assert sorted(p.name for p in (packed / "tensorboard").iterdir()) == [ids[0]]
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


# --- protocol v2 -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def v2(quality):
    import quality_v2  # benchmarks/ is on sys.path once quality.py is loaded

    return quality_v2


def _v2_args(quality, tmp_path, *options):
    return quality.parse_args(["--root", str(tmp_path), "--protocol", "v2", *options])


def test_v2_plan_gives_every_method_the_same_number_of_configurations(quality, v2, tmp_path):
    """Equal budgets: each method's stage-1 sweep has exactly --configs points (the written search, and the
    sweep's own expansion for the methods this checkout registers); the method list is the protocol's."""
    from raysdpb.methods import METHODS

    for size in (8, 4, 2):
        args = _v2_args(quality, tmp_path / str(size), "--configs", str(size))
        assert args.methods == v2.V2_METHODS and args.tasks == v2.V2_TASKS and args.seeds_n == 5
        planned = v2.write_planned_configs(args)
        assert sorted(planned) == sorted(v2.V2_TASKS)
        for task, paths in planned.items():
            assert len(paths) == len(v2.V2_METHODS)
            for method, path in zip(v2.V2_METHODS, paths):
                body = v2.load_config(path)
                search = {k: v for k, v in body["search"].items() if k != "seed"}
                assert v2.grid_size(search) == size and body["search"]["seed"] == [v2.SELECTION_SEED], (method, body)
                assert body["method"] == method and body.get("num_layers") == v2.V2_STUDENT_LAYERS.get(task)
                if method in METHODS and not args.v2_missing:
                    assert len(expand(load_experiment(path))) == size
                elif method in METHODS:  # the v2 keys are not in this checkout: the sweep's own count on the rest
                    trimmed = {k: v for k, v in body.items() if k not in v2.V2_TRIAL_KEYS}
                    trimmed_path = path.with_name(path.stem + "-trimmed.yaml")
                    trimmed_path.write_text(quality.yaml.safe_dump(trimmed))
                    assert len(expand(load_experiment(trimmed_path))) == size
    # by default each task has its own size and student (CB: 8 configurations of the 3-layer student; the others
    # 4 of the whole model), the same for every method of the task; --student-layers sets every task's
    args = _v2_args(quality, tmp_path / "default")
    for task, paths in v2.write_planned_configs(args).items():
        size = 8 if task == "superglue/cb" else 4
        layers = {v2.load_config(p).get("num_layers") for p in paths}
        assert layers == ({3} if task == "superglue/cb" else {None}), task
        assert {v2.grid_size({k: v for k, v in v2.load_config(p)["search"].items() if k != "seed"})
                for p in paths} == {size}, task
    for option, layers in (("2", 2), ("0", None)):
        args = _v2_args(quality, tmp_path / f"layers{option}", "--student-layers", option)
        args.v2_missing = []
        assert {v2.v2_trial(t, "dynsdpb", args).get("num_layers") for t in v2.V2_TASKS} == {layers}
    # methods without alpha or tau search more learning rates and the warm-up instead
    assert v2.method_grid("finetune", 8) == {"lr": [2e-5, 5e-5, 1e-4, 2e-4], "warmup_ratio": [0.0, 0.1]}
    assert set(v2.method_grid("dynsdpb", 8)) == {"lr", "alpha", "tau"}


def test_v2_stage_2_seeds_are_fresh_and_never_the_selection_run(quality, v2, tmp_path):
    args = _v2_args(quality, tmp_path, "--seeds-n", "7")
    args.v2_missing = []
    chosen = {"lr": 1e-4, "alpha": 0.5, "tau": 2.0, "warmup_ratio": 0.1}
    for task in v2.V2_TASKS:
        _, stage1 = v2.grid_config(task, "dynsdpb", args)
        _, stage2 = v2.seeds_config(task, "dynsdpb", chosen, args)
        one, two = v2.load_config(stage1), v2.load_config(stage2)
        seeds = two["search"]["seed"]
        assert len(seeds) == len(set(seeds)) == 7 and v2.SELECTION_SEED not in seeds
        assert not set(seeds) & set(one["search"]["seed"])
        # data_seed is left to its default (the trial's seed): fresh with every fresh seed, never the selection's
        assert "data_seed" not in two and "data_seed" not in one
        assert two["save_predictions"] is True and "save_predictions" not in one
        assert (two["lr"], two["alpha"], two["tau"], two["warmup_ratio"]) == (1e-4, 0.5, 2.0, 0.1)
        # the same evaluation points (in steps, so in samples: one batch size per task) for every method
        points = {v2.load_config(v2.grid_config(task, m, args)[1])["eval_every_steps"] for m in v2.V2_METHODS}
        assert two["eval_every_steps"] == v2.eval_every(task, args)
        # stage 1 (MRPC: issue 33's grid for the ASHA replay) reports k times as often, the same for every method
        k = v2.V2_GRID_REPORTS_PER_EPOCH.get(task, 1)
        assert points == {-(-two["eval_every_steps"] // k)}


def test_v2_dev_split_settings(quality, v2, tmp_path):
    """Every trial of a task (teacher, grid, seeds) carries the same seeded, stratified held-out dev split, of
    --dev-size (default CB 50, others 200); selection reads its last-epoch score; kd names the teacher."""
    args = _v2_args(quality, tmp_path)
    args.v2_missing = []
    for task in v2.V2_TASKS:
        configs = [v2.teacher_config(task, args)[1], *(v2.grid_config(task, m, args)[1] for m in v2.V2_METHODS),
                   v2.seeds_config(task, "kd", {"lr": 5e-5, "alpha": 1.0, "tau": 1.0}, args)[1]]
        splits = [v2.load_config(p)["heldout_dev"] for p in configs]
        size = 50 if task == "superglue/cb" else 200
        # stage 1 of V2_STAGE1_DEV_ONLY's tasks evaluates the dev split alone; the split is the same everywhere
        evaluated = [split.pop("evaluate", "both") for split in splits]
        stage1 = "dev" if task in v2.V2_STAGE1_DEV_ONLY else "both"
        assert evaluated == ["both", *[stage1] * len(v2.V2_METHODS), "both"]
        assert splits == [{"size": size, "seed": v2.DEV_SEED, "stratify": True}] * len(configs)
        kd = v2.load_config(v2.grid_config(task, "kd", args)[1])
        assert kd["teacher_model"] == str(tmp_path / "teachers" / task.replace("/", "-"))
        teacher = v2.load_config(configs[0])
        assert "num_layers" not in teacher and teacher["method"] == "finetune"
        # the training subset is taken after the dev set is carved out of the whole split (the recipe's order)
        if v2.V2_TRAIN_SAMPLES.get(task):
            assert kd["max_train_samples"] == v2.V2_TRAIN_SAMPLES[task]
    assert v2.selection_column("glue/cola", args) == "last_eval_dev_matthews"
    other = _v2_args(quality, tmp_path / "b", "--dev-size", "120")
    other.v2_missing = []
    assert v2.load_config(v2.grid_config("glue/rte", "finetune", other)[1])["heldout_dev"]["size"] == 120


def test_v2_selection_and_best_at_common_points(v2):
    def row(trial_id, status, lr, score):
        return {"trial_id": trial_id, "status": status, "lr": lr, "alpha": 1.0, "tau": 1.0,
                "last_eval_dev_accuracy": score}

    rows = [row("a", "completed", 5e-5, 0.7), row("b", "completed", 1e-4, 0.7), row("c", "errored", 2e-4, 0.9)]
    chosen = v2.select_v2(rows, "last_eval_dev_accuracy")
    assert (chosen["trial_id"], chosen["score"]) == ("a", 0.7)  # a tie keeps the first; errored never counts
    curves = [{"step": 10, "eval_accuracy": 0.5}, {"step": 13, "eval_accuracy": 0.9},  # 13: an epoch end
              {"step": 20, "eval_accuracy": 0.6}, {"step": 30, "eval_accuracy": 0.55}]
    assert v2.best_at_common_points(curves, "eval_accuracy", 10) == 0.6
    assert v2.best_at_common_points(curves[:2], "eval_accuracy", 7) is None


def test_v2_statistics_on_hand_made_runs(v2):
    """Two tasks: on CB DynSDPB is exactly 0.02 above double finetune at each of 4 seeds (a point interval,
    sign-flip p 2/16); on RTE the differences are +0.01, -0.01, +0.03, +0.01 with predictions saved; pooled
    with equal weights: 0.5 * 0.02 + 0.5 * 0.01."""
    import numpy as np
    import pandas as pd

    def runs(values, predictions=None):
        return [{"seed": 1001 + i, "last": v, "best_common": v,
                 "predictions": None if predictions is None else predictions[i]} for i, v in enumerate(values)]

    labels = np.r_[np.ones(50, int), np.zeros(50, int)]

    def frame(correct):  # the first `correct` examples right
        prediction = labels.copy()
        prediction[correct:] = 1 - prediction[correct:]
        return pd.DataFrame({"idx": np.arange(100), "prediction": prediction, "label": labels})

    a_correct, b_correct = [61, 60, 63, 62], [60, 61, 60, 61]
    data = {"superglue/cb": {"dynsdpb": runs([0.72, 0.74, 0.70, 0.76]),
                             "double_finetune": runs([0.70, 0.72, 0.68, 0.74])},
            "glue/rte": {"dynsdpb": runs([c / 100 for c in a_correct], [frame(c) for c in a_correct]),
                         "double_finetune": runs([c / 100 for c in b_correct], [frame(c) for c in b_correct])}}
    rows = v2.statistics(data, [("dynsdpb", "double_finetune"), ("dynsdpb", "kd")], n_boot=2000)
    by_task = {r["task"]: r for r in rows}
    assert len(rows) == 3  # kd was not run: no rows for it
    cb, rte, pooled = by_task["superglue/cb"], by_task["glue/rte"], by_task["pooled"]
    assert (cb["mean_diff"], cb["ci_low"], cb["ci_high"]) == pytest.approx((0.02, 0.02, 0.02))
    assert cb["p"] == 2 / 16 and cb["examples"] is None
    assert rte["mean_diff"] == pytest.approx(0.01) and rte["examples"] == 100
    assert rte["one_example"] == pytest.approx(0.01)  # accuracy: 1/N, from the runs' predictions
    assert rte["ci_low"] < 0.01 < rte["ci_high"]
    # MDE at 4 seeds (t, 3 df: 3.182 + 0.978 from printed tables) times SD / sqrt(4)
    assert rte["mde"] == pytest.approx((3.182 + 0.978) * np.std([0.01, -0.01, 0.03, 0.01], ddof=1) / 2, rel=1e-3)
    assert pooled["mean_diff"] == pytest.approx(0.015) and pooled["weights"] == {"superglue/cb": 0.5,
                                                                                  "glue/rte": 0.5}
    assert pooled["p_holm"] == pooled["p"]  # one pooled comparison with data: a family of one
    text = v2.markdown(rows, "t")
    assert "| dynsdpb - double_finetune | pooled | 8 | +1.50 |" in text
    from raysdpb.report import stats

    # the verdict: only a pooled row carries one, in the methods' names; per task "—" (5 seeds cannot reach 0.05)
    assert pooled["verdict"] == stats.verdict(pooled["ci_low"], pooled["ci_high"], pooled["p_holm"])
    expected = "dynsdpb > double_finetune" if pooled["verdict"] == "A > B" else pooled["verdict"]
    assert text.splitlines()[-1].endswith(f"| {expected} |")
    assert cb["verdict"] == "not shown"  # its interval is the point +0.02, but p 0.125: 4 seeds cannot show it
    assert [line.endswith("| — |") for line in text.splitlines()[4:]] == [True, True, False]
    assert v2.verdict_text({**pooled, "verdict": "A < B"}) == "dynsdpb < double_finetune"
    wide = v2.wide_table(data | {"glue/mrpc": {"dynsdpb": runs([0.80])}}).splitlines()
    assert wide[0] == "| method | superglue/cb | glue/rte | glue/mrpc | mean over tasks |"
    # CB 72, 74, 70, 76: mean 73, SD 2.58; RTE 61, 60, 63, 62: 61.5, 1.29; MRPC one seed 80; mean of 73, 61.5, 80
    assert wide[2] == "| dynsdpb | 73.00 ± 2.58 | 61.50 ± 1.29 | 80.00 | 71.50 |"
    assert wide[3] == "| double_finetune | 71.00 ± 2.58 | 60.50 ± 0.58 | — | — |"  # no MRPC: no mean


def test_v2_methods_are_registered_and_search_only_what_they_use(v2):
    """Every method of protocol v2 is in the registry, and the keys the harness searches for it are among the
    hyperparameters the method uses (a key it ignores would collapse its grid and break the equal budgets)."""
    from raysdpb.methods import METHODS

    for method in v2.V2_METHODS:
        assert method in METHODS, method
        assert set(v2.KNOBS[method]) <= set(METHODS[method].hyperparameters), method
    # the three comparison families name v2's methods only, and no comparison is in two families (each is one
    # family's Holm correction)
    families = [v2.PRIMARY, v2.ABLATION, v2.PAPER_CLAIMS]
    assert all(a in v2.V2_METHODS and b in v2.V2_METHODS and a != b for f in families for a, b in f)
    pairs = [frozenset(c) for f in families for c in f]
    assert len(pairs) == len(set(pairs))


def test_v2_trains_the_teacher_again_where_its_folder_is_gone(quality, v2, tmp_path, monkeypatch):
    """A new --root (a new checkout, the sweeps archived): the teacher's archived sweep has no weights to export,
    so stage 0 trains it again under --root (not from the archive) and exports it; with the folder there, the
    sweep is read as finished and nothing is exported."""
    args = _v2_args(quality, tmp_path / "root", "--archive", str(tmp_path / "kept"), "--resume",
                    "--tasks", "superglue/cb", "--methods", "kd")
    calls, exported = [], []

    def run_sweep(name, path, run_args, reuse_from=None):
        calls.append((name, run_args.archive))
        return [{"trial_id": "teacher-1", "status": "completed"}] if name.startswith("qv2-teacher") else []

    import quality as harness  # the module quality_v2 imports from (the fixture's is another copy of the file)

    monkeypatch.setattr(harness, "run_sweep", run_sweep)
    monkeypatch.setattr(harness, "archive_sweep", lambda experiment, archive, config: exported.append(
        ("archived", experiment)))
    monkeypatch.setattr(v2.subprocess, "run", lambda cmd, check: exported.append(("export", cmd[3], cmd[-1])))
    v2.main_v2(args)
    teacher = v2.teacher_name("superglue/cb")
    assert calls[0] == (teacher, None)  # trained under --root, the archive not consulted
    experiment = str(Path(args.root) / teacher)
    assert exported == [("archived", Path(experiment)),
                        ("export", experiment, str(v2.teacher_path("superglue/cb", args)))]
    # the folder exported: the next run reads the sweep (from the archive) and exports nothing
    (v2.teacher_path("superglue/cb", args)).mkdir(parents=True)
    (v2.teacher_path("superglue/cb", args) / "config.json").write_text("{}")
    calls.clear(), exported.clear()
    v2.main_v2(args)
    assert calls[0] == (teacher, args.archive) and exported == []


def test_v2_needs_no_teacher_once_kd_has_finished(quality, v2, tmp_path, monkeypatch):
    """kd's two sweeps archived as finished: a new --root (the final report on a new checkout) neither trains nor
    reads the teacher; and their configs, which name the teacher under the old --root, stand for the new one's."""
    import quality as harness

    archive = tmp_path / "kept"
    old = _v2_args(quality, tmp_path / "old", "--archive", str(archive), "--tasks", "superglue/cb", "--methods", "kd")
    old.v2_missing = []
    for name, config in (v2.grid_config("superglue/cb", "kd", old), v2.seeds_config(
            "superglue/cb", "kd", {"lr": 5e-5, "alpha": 1.0, "tau": 1.0}, old)):
        _finished_experiment(archive / name, ["completed"], last_eval_dev_accuracy=0.5, last_eval_accuracy=0.5,
                             warmup_ratio=0.1)
        harness.shutil.copy2(config, archive / name / "config.yaml")
    new = _v2_args(quality, tmp_path / "new", "--archive", str(archive), "--resume", "--tasks", "superglue/cb",
                   "--methods", "kd")
    new.v2_missing = []
    assert v2.kd_finished("superglue/cb", new)
    calls = []
    real = harness.run_sweep
    monkeypatch.setattr(harness, "run_sweep", lambda name, path, a, reuse_from=None: calls.append(name) or real(
        name, path, a))
    monkeypatch.setattr(v2.subprocess, "run", lambda *a, **k: pytest.fail(f"nothing is run: {a}"))
    monkeypatch.setattr(v2, "stage2_runs", lambda *a: [])  # the statistics' input, tested on their own
    v2.main_v2(new)
    assert calls == [v2.grid_name("superglue/cb", "kd"), v2.seeds_name("superglue/cb", "kd")]
    # a method without a finished stage-2 run is a row of its own in the scores, not a crash
    assert "| superglue/cb | kd | 0 | — | — |" in (Path(new.root) / "v2_statistics.md").read_text()
    # an unfinished kd sweep needs the teacher again
    (archive / v2.seeds_name("superglue/cb", "kd") / "trials.parquet").unlink()
    assert not v2.kd_finished("superglue/cb", new)


def test_v2_reads_the_predictions_a_trial_saves(v2, tmp_path):
    """`last_predictions` reads what the recipe writes (`save_predictions`: the evaluation module's writer), the
    last validation evaluation's (not the held-out dev split's), sorted by the example's index."""
    from raysdpb.recipe.evaluation import predictions_file, write_class_predictions

    folder = tmp_path / "experiment" / "artifacts" / "t0" / "predictions"
    folder.mkdir(parents=True)
    write_class_predictions(folder / predictions_file("", 10, ".parquet"), [2, 0, 1], [1, 1, 1], [0, 1, 1])
    write_class_predictions(folder / predictions_file("", 20, ".parquet"), [2, 0, 1], [0, 1, 0], [0, 1, 1])
    write_class_predictions(folder / predictions_file("dev_", 20, ".parquet"), [7, 5], [1, 1], [1, 0])
    frame = v2.last_predictions(tmp_path / "experiment", "t0")
    assert frame["idx"].tolist() == [0, 1, 2]
    assert frame["prediction"].tolist() == [1, 0, 0] and frame["label"].tolist() == [1, 1, 0]
    assert v2.last_predictions(tmp_path / "experiment", "t1") is None


def test_v2_trials_train_on_the_planned_examples_and_the_dry_run_counts_them(quality, v2, tmp_path, shared_data_dir,
                                                                             monkeypatch):
    """Each task's trials train on exactly V2_TRAIN_SAMPLES examples (CB: its split less the dev set), none of
    them in the held-out dev set, and the dry run's workload counts those (it had CB at 150 for 200, and the
    others' trials would have trained on 200 more than planned)."""
    from raysdpb.config import TrialConfig
    from raysdpb.recipe.components import training_records
    from raysdpb.tasks import resolve_task

    monkeypatch.setenv("RAYSDPB_DATA_DIR", str(shared_data_dir))
    args = _v2_args(quality, tmp_path, "--tasks", "superglue/cb", "glue/mrpc")
    args.v2_missing = []
    for task, planned in (("superglue/cb", 250 - 50), ("glue/mrpc", v2.V2_TRAIN_SAMPLES["glue/mrpc"])):
        trial = {k: v for k, v in v2.v2_trial(task, "finetune", args).items() if k in TrialConfig.model_fields}
        cfg = TrialConfig.model_validate(trial)
        train, dev = training_records(cfg, resolve_task(cfg))
        assert len(train) == planned and len(dev) == v2.dev_size(task, args)
        assert not {r["idx"] for r in train} & {r["idx"] for r in dev}
        args.methods = ["finetune"]
        assert v2.v2_workload(task, args)["train_examples"] == planned
    # a smoke run's trials: SMOKE_TRAIN_SAMPLES, not that plus the dev split (they trained on 32 for 24)
    smoke = _v2_args(quality, tmp_path / "smoke", "--smoke", "--tasks", "superglue/cb")
    smoke.v2_missing = []
    cfg = TrialConfig.model_validate({k: v for k, v in v2.v2_trial("superglue/cb", "finetune", smoke).items()
                                      if k in TrialConfig.model_fields})
    train, dev = training_records(cfg, resolve_task(cfg))
    assert len(train) == v2.SMOKE_TRAIN_SAMPLES == 24 and len(dev) == v2.dev_size("superglue/cb", smoke) == 8


def test_v2_never_selects_from_part_of_a_grid(quality, v2, tmp_path, monkeypatch):
    """A stage-1 sweep that stopped short (interrupted, pending) ends the run, even with --keep-going: no stage 2
    from a configuration chosen among the trials that happened to finish. With errored trials (--keep-going) the
    method's stage 2 waits and the run goes on with the next method; once they finish, stage 2 runs."""
    import quality as harness

    args = _v2_args(quality, tmp_path / "root", "--resume", "--keep-going", "--tasks", "superglue/cb",
                    "--methods", "dynsdpb")
    statuses = {"grid": ["completed", "completed", "interrupted", "pending"]}
    calls = []

    def run_sweep(name, path, run_args, reuse_from=None):
        calls.append(name)
        grid = statuses["grid"] if "dynsdpb" in name else ["completed"] * 4
        return [{"trial_id": f"t{i}", "status": s, "lr": 1e-4, "alpha": 1.0, "tau": 1.0, "warmup_ratio": 0.1,
                 "last_eval_dev_accuracy": 0.5 + i / 10} for i, s in enumerate(grid)]

    monkeypatch.setattr(harness, "run_sweep", run_sweep)
    monkeypatch.setattr(v2, "stage2_runs", lambda *a: [])
    with pytest.raises(SystemExit, match="2 of 4 trials unfinished.*--resume"):
        v2.main_v2(args)
    assert calls == [v2.grid_name("superglue/cb", "dynsdpb")]  # no stage 2
    assert not (Path(args.root) / "selection_v2.json").exists() or "dynsdpb" not in (
        Path(args.root) / "selection_v2.json").read_text()
    statuses["grid"] = ["completed", "errored", "completed", "completed"]
    calls.clear()
    args.methods = ["dynsdpb", "finetune"]
    v2.main_v2(args)
    assert calls == [v2.grid_name("superglue/cb", "dynsdpb"),  # errored: no stage 2, and nothing selected
                     v2.grid_name("superglue/cb", "finetune"), v2.seeds_name("superglue/cb", "finetune")]
    selected = json.loads((Path(args.root) / "selection_v2.json").read_text())["superglue/cb"]
    assert list(selected) == ["finetune"]
    statuses["grid"] = ["completed"] * 4  # --resume: the errored trials trained again
    calls.clear()
    v2.main_v2(args)
    assert calls == [v2.grid_name("superglue/cb", "dynsdpb"), v2.seeds_name("superglue/cb", "dynsdpb"),
                     v2.seeds_name("superglue/cb", "finetune")]  # finetune's selection kept


def test_v2_report_stage_recomputes_the_committed_statistics_and_trains_nothing(quality, v2, tmp_path, monkeypatch,
                                                                                 shared_data_dir):
    """`--stage report` on the committed archive: CB's selection, paired differences, bootstrap intervals,
    sign-flip p-values and MDEs as the run itself wrote them (`quality-v2-cb.json`, 2,000 replicates), no sweep or
    subprocess started, and SST-2 counted as left out method by method: the archive given is CB's committed folders
    and SST-2's finetune grid alone (its stage 2 missing), links into the committed archive, so the test stays true
    while SST-2's runs land there."""
    import quality as harness

    monkeypatch.setattr(harness, "_run", lambda *a, **k: pytest.fail(f"report trains nothing: {a[0]}"))
    monkeypatch.setattr(v2.subprocess, "run", lambda *a, **k: pytest.fail(f"report runs nothing: {a}"))
    results = quality.REPO / "benchmarks" / "results"
    archive = tmp_path / "archive"
    archive.mkdir()
    cb = "superglue/cb"
    kept = [v2.teacher_name(cb), *(name(cb, m) for m in v2.V2_METHODS for name in (v2.grid_name, v2.seeds_name)),
            v2.grid_name("glue/sst2", "finetune")]
    missing = [name for name in kept if not (results / "quality-v2" / name).is_dir()]
    assert not missing, missing
    for name in kept:
        (archive / name).symlink_to(results / "quality-v2" / name)
    args = _v2_args(quality, tmp_path / "root", "--stage", "report", "--archive", str(archive),
                    "--tasks", "superglue/cb", "glue/sst2", "--data-dir", str(shared_data_dir), "--n-boot", "2000",
                    "--json", str(tmp_path / "v2.json"))
    v2.main_v2(args)
    got, committed = (json.loads(p.read_text()) for p in (tmp_path / "v2.json", results / "quality-v2-cb.json"))
    assert got["selection"] == committed["selection"]
    assert got["left_out"] == [f"glue/sst2 {m}" for m in v2.V2_METHODS]
    assert [(r["comparison"], r["task"], r["seeds"]) for r in got["primary"]] == [
        (r["comparison"], r["task"], r["seeds"]) for r in committed["primary"]]
    for mine, theirs in zip(got["primary"], committed["primary"]):
        keys = ("mean_diff", "ci_low", "ci_high", "p", "p_holm", "mde", "one_example")
        assert {k: mine[k] for k in keys} == pytest.approx({k: theirs[k] for k in keys})
