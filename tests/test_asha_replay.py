"""benchmarks/asha_replay.py: ASHA's decisions replayed on hand-made fully-run grids whose decisions are worked out
by hand from ASHA's rule (Ray Tune's AsyncHyperBand: at each rung, a trial is stopped when its score is below the
(1 - 1/reduction) quantile of the scores recorded there before it; rungs at grace * reduction^k below max_t)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from trial_configs import load_benchmark


@pytest.fixture(scope="module")
def asha_replay():
    return load_benchmark("asha_replay.py", "asha_replay")


def _grid(scores: dict[str, list[float]], seconds_per_epoch: float = 10.0):
    """trials.parquet and curves.parquet rows: one report per epoch, `score` as given."""
    trials = [{"trial_id": t, "status": "completed", "method": "dynsdpb", "task": "superglue/cb"} for t in scores]
    curves = [{"trial_id": t, "epoch": float(e), "step": 4 * e, "score": s, "time_total_s": seconds_per_epoch * e}
              for t, values in scores.items() for e, s in enumerate(values, 1)]
    return trials, curves


# A at rung 1 (epoch 1) is alone: continues. B: 0.4 < A's 0.5: stopped at epoch 1, though it ends the best (0.95).
# C: 0.8 >= median(0.5, 0.4) = 0.45, then at rung 2 (epoch 2) 0.8 >= A's 0.6: runs to the end. D: 0.45 < median(0.5,
# 0.4, 0.8) = 0.5: stopped. Run: 3 + 1 + 3 + 1 = 8 of 12 epochs (saved 1/3). ASHA's sweep picks C (0.8, more than
# A's 0.7; B's only report was 0.4); the grid's best is B (0.95): regret 0.15, 3 of 20 validation examples.
HAND = {"A": [0.5, 0.6, 0.7], "B": [0.4, 0.9, 0.95], "C": [0.8, 0.8, 0.8], "D": [0.45, 0.6, 0.65]}


def test_replay_takes_asha_s_decisions_in_a_sequential_sweep(asha_replay):
    trials, curves = _grid(HAND)
    result = asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=1,
                                eval_examples={"all": 20})
    assert result.stopped_at == {"B": 1.0, "D": 1.0}
    (group,) = result.groups
    assert (group.trials, group.stopped, group.compute_run, group.compute_full) == (4, 2, 8.0, 12.0)
    assert result.saved == pytest.approx(1 / 3)
    assert (group.chosen, group.chosen_score, group.best, group.best_score) == ("C", 0.8, "B", 0.95)
    assert group.regret == pytest.approx(0.15) and group.regret_examples == pytest.approx(3.0)
    # with reduction 4 the cutoff is the 75th percentile: B (0.4 < 0.5) and D (0.45 < 0.65) stopped too, C passes
    assert asha_replay.replay(trials, curves, grace=1, reduction=4, concurrent=1).stopped_at == {"B": 1.0, "D": 1.0}
    # grace 2: the first rung is at epoch 2 (one rung below max_t 3), where B (0.9 > A's 0.6) survives and D (0.6
    # < median(0.6, 0.9, 0.8) = 0.8) is stopped: the grid's best is kept, regret 0
    late = asha_replay.replay(trials, curves, grace=2, reduction=2, concurrent=1)
    assert late.stopped_at == {"D": 2.0} and late.max_regret == 0.0 and late.groups[0].chosen == "B"
    assert late.saved == pytest.approx(1 / 12)


def test_replay_follows_the_order_reports_arrive_in_with_concurrent_trials(asha_replay):
    """Two at a time: A and B start at 0 and both report epoch 1 at 10 s; A (first in grid order) fills rung 1 first
    and B (0.4 < 0.5) is stopped there, freeing its slot at 10 s: C starts at 10 s and reaches rung 1 at 20 s.
    Trials that report slower arrive later: with B twice as fast as A, B reaches rung 1 alone and is not stopped,
    while A (0.5 >= 0.4) passes too."""
    trials, curves = _grid(HAND)
    result = asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=2)
    assert result.stopped_at == {"B": 1.0, "D": 1.0}
    for row in curves:
        if row["trial_id"] == "B":
            row["time_total_s"] /= 2
    assert "B" not in asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=2).stopped_at


def test_replay_keeps_groups_apart_and_handles_diverged_and_min_metrics(asha_replay):
    """A group's rungs never see another group's scores; a trial with fewer reports (it diverged) ends where it
    did; with mode min the lower score is the better."""
    trials, curves = _grid({"A": [0.5, 0.6, 0.7], "B": [0.4, 0.9, 0.95], "X": [0.1, 0.2, 0.3], "Y": [0.05]})
    groups = {"A": "g1", "B": "g1", "X": "g2", "Y": "g2"}
    result = asha_replay.replay(trials, curves, grace=1, reduction=2, group_of=groups)
    # B is stopped by A's 0.5 in g1; X's 0.1 (g2) would stop A and B, but is not in their rungs. Y's 0.05 is below
    # X's 0.1, but it was Y's last report (it diverged there): nothing was saved by stopping it
    assert result.stopped_at == {"B": 1.0}
    g2 = next(g for g in result.groups if g.group == "g2")
    assert (g2.compute_full, g2.chosen, g2.regret) == (4.0, "X", 0.0)  # Y's one report: 1 epoch in both runs
    losses = {"A": [0.5, 0.4, 0.3], "B": [0.6, 0.2, 0.1]}
    trials, curves = _grid(losses)
    low = asha_replay.replay(trials, curves, grace=1, reduction=2, mode="min")
    assert low.stopped_at == {"B": 1.0} and low.groups[0].best == "B" and low.groups[0].chosen == "A"
    assert low.max_regret == pytest.approx(0.2)


def test_the_command_reads_an_experiment_folder_and_writes_its_json(asha_replay, tmp_path, capsys):
    trials, curves = _grid(HAND)
    experiment = tmp_path / "grid"
    experiment.mkdir()
    pq.write_table(pa.Table.from_pylist(trials), experiment / "trials.parquet")
    pq.write_table(pa.Table.from_pylist(curves), experiment / "curves.parquet")
    out = tmp_path / "replay.json"
    assert asha_replay.main([str(experiment), "--grace", "1", "2", "--reduction", "2", "--concurrent", "1",
                             "--group-by", "method", "--eval-examples", "20", "--json", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[:4] == ["1", "2", "33.3%", "0.1500"] and "(3.00 examples)" in printed[1]
    assert printed[2].split()[:4] == ["2", "2", "8.3%", "0.0000"]
    saved = json.loads(out.read_text())
    assert [(r["grace"], r["stopped_at"]) for r in saved] == [(1.0, {"B": 1.0, "D": 1.0}), (2.0, {"D": 2.0})]
    # a metric where one example is worth 0.1 (Matthews-like, 2/N with N = 20): the regret of 0.15 is 1.5 examples
    asha_replay.main([str(experiment), "--grace", "1", "--reduction", "2", "--concurrent", "1", "--group-by",
                      "method", "--eval-examples", "20", "--example-worth", "0.1"])
    assert "(1.50 examples)" in capsys.readouterr().out.splitlines()[1]
    with pytest.raises(SystemExit, match="--example-worth must be positive"):
        asha_replay.main([str(experiment), "--example-worth", "0"])


def test_experiments_of_one_grid_share_their_groups_with_one_sweep(asha_replay, tmp_path, capsys):
    """Two experiments, {A, C} and {B, D} of HAND, replayed one trial at a time in that order. Apart (each its own
    groups): A and C both pass (C's 0.8 over A's 0.5, then 0.6); B passes alone, D passes rung 1 (0.45 over B's
    0.4) and stops at rung 2 (0.6 under B's 0.9): 1 of 12 epochs saved, no regret. As one grid grouped by task
    (`--one-sweep`): B's 0.4 is under the median of A's and C's 0.5 and 0.8, D's 0.45 under that of 0.5, 0.8 and
    0.4: both stop at epoch 1, 4 of 12 saved, and C (0.8) is chosen over B's 0.95."""
    trials, curves = _grid(HAND)
    for name, members in (("ac", {"A", "C"}), ("bd", {"B", "D"})):
        folder = tmp_path / name
        folder.mkdir()
        pq.write_table(pa.Table.from_pylist([t for t in trials if t["trial_id"] in members]), folder / "trials.parquet")
        pq.write_table(pa.Table.from_pylist([c for c in curves if c["trial_id"] in members]), folder / "curves.parquet")
    options = [str(tmp_path / "ac"), str(tmp_path / "bd"), "--grace", "1", "--reduction", "2", "--concurrent", "1",
               "--group-by", "task"]
    asha_replay.main(options + ["--json", str(tmp_path / "apart.json")])
    asha_replay.main(options + ["--one-sweep", "--json", str(tmp_path / "one.json")])
    apart, = json.loads((tmp_path / "apart.json").read_text())
    one, = json.loads((tmp_path / "one.json").read_text())
    assert apart["stopped_at"] == {"D": 2.0} and len(apart["groups"]) == 2
    assert one["stopped_at"] == {"B": 1.0, "D": 1.0} and len(one["groups"]) == 1
    assert one["groups"][0]["chosen"] == "C" and one["groups"][0]["regret"] == pytest.approx(0.15)
    printed = capsys.readouterr().out.splitlines()
    assert printed[1].split()[2] == "8.3%" and printed[3].split()[2] == "33.3%"


def test_asha_on_one_metric_judged_by_another(asha_replay):
    """ASHA ranks on a loss (min) and the configuration is chosen and judged by the score (HAND, max). Losses,
    the same at every epoch: A 0.5, B 0.1, C 0.9, D 0.2. One at a time, grace 1, reduction 2: A alone passes; B's 0.1
    beats A's 0.5; C's 0.9 is worse than the median of 0.5 and 0.1 (0.3): stopped at epoch 1; D's 0.2 beats the
    median of 0.5, 0.1, 0.9 (0.5) and at rung 2 that of A's and B's (0.3). 2 of 12 epochs saved; B, whose score ends
    the best (0.95), ran to the end and is chosen: regret 0, where ASHA on the score itself stopped B (regret
    0.15)."""
    trials, curves = _grid(HAND)
    loss = {"A": 0.5, "B": 0.1, "C": 0.9, "D": 0.2}
    for row in curves:
        row["loss"] = loss[row["trial_id"]]
    result = asha_replay.replay(trials, curves, metric="loss", mode="min", grace=1, reduction=2, concurrent=1,
                                score_metric="score", score_mode="max")
    assert result.stopped_at == {"C": 1.0} and result.saved == pytest.approx(2 / 12)
    (group,) = result.groups
    assert (group.chosen, group.best, group.regret, group.best_score) == ("B", "B", 0.0, 0.95)
    # chosen by the loss itself (no score metric): B too, the lowest loss, judged by the loss
    by_loss = asha_replay.replay(trials, curves, metric="loss", mode="min", grace=1, reduction=2, concurrent=1)
    assert by_loss.groups[0].chosen == "B" and by_loss.groups[0].best_score == 0.1


def test_the_last_report_rule_chooses_by_the_score_at_the_end_and_never_a_stopped_trial(asha_replay):
    """Protocol v2 selects by a trial's last report. A [0.5, 0.6, 0.7] and B [0.6, 0.95, 0.6], one at a time, grace
    1, reduction 2: neither is stopped (B's 0.6 >= A's 0.5 at rung 1, 0.95 >= 0.6 at rung 2). By the best report
    B is chosen (0.95); by the last, A (0.7 > 0.6), and the grid's best by the same rule is A: regret 0 both ways.
    With C [0.8, 0.5, 0.5] first and D [0.7, 0.7, 0.7] after it, D is stopped at epoch 1 (0.7 < 0.8): its 0.7 there
    is no score at the end of the budget, so by the last report C is chosen (0.5 at the end) though the grid's best
    by that rule is D (0.7): regret 0.2, the cost of stopping D; by the best report C (0.8) is chosen, regret 0."""
    trials, curves = _grid({"A": [0.5, 0.6, 0.7], "B": [0.6, 0.95, 0.6]})
    by_best = asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=1)
    by_last = asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=1, select="last")
    assert by_best.stopped_at == by_last.stopped_at == {}
    assert (by_best.groups[0].chosen, by_best.groups[0].best_score, by_best.max_regret) == ("B", 0.95, 0.0)
    assert (by_last.groups[0].chosen, by_last.groups[0].best_score, by_last.max_regret) == ("A", 0.7, 0.0)
    assert by_last.as_dict()["select"] == "last"

    trials, curves = _grid({"C": [0.8, 0.5, 0.5], "D": [0.7, 0.7, 0.7]})
    stopped = asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=1, select="last")
    assert stopped.stopped_at == {"D": 1.0}
    (group,) = stopped.groups
    assert (group.chosen, group.chosen_score, group.best) == ("C", 0.5, "D") and group.regret == pytest.approx(0.2)
    best = asha_replay.replay(trials, curves, grace=1, reduction=2, concurrent=1).groups[0]
    assert (best.chosen, best.best, best.regret) == ("C", "C", 0.0)
    with pytest.raises(ValueError, match="select"):
        asha_replay.replay(trials, curves, select="first")


def test_the_committed_v2_replays_reproduce_from_the_committed_grids(tmp_path):
    """`benchmarks/asha_replay_v2.sh mrpc` on the archived stage-1 grids writes exactly the committed replays that
    RESULTS.md quotes (per method, whole task, in epochs): a change to the replay, to the scheduler it drives or to
    the order the grids are fed in would show here."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    subprocess.run(["bash", str(repo / "benchmarks" / "asha_replay_v2.sh"), "mrpc", str(tmp_path / "replay")],
                   check=True, capture_output=True, env={**os.environ, "PYTHON": sys.executable})
    for suffix in ("", "_whole", "_epochs"):
        name = f"asha_replay_mrpc_v2{suffix}.json"
        fresh = json.loads((tmp_path / f"replay_mrpc_v2{suffix}.json").read_text())
        committed = json.loads((repo / "benchmarks" / "results" / name).read_text())
        assert [(r["grace"], r["reduction"]) for r in fresh] == [(r["grace"], r["reduction"]) for r in committed]
        for mine, theirs in zip(fresh, committed):
            assert mine["stopped_at"] == theirs["stopped_at"], name
            assert (mine["saved"], mine["max_regret"]) == pytest.approx((theirs["saved"], theirs["max_regret"]))
