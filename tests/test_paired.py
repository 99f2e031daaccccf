"""analysis.paired: paired comparisons on planted per-item differences."""
import numpy as np
import pandas as pd
import pytest

from analysis.paired import compare_stages, mcnemar_exact, paired_difference


def test_mcnemar_exact_two_sided_binomial_on_discordant_pairs():
    before = [1] * 10 + [0] * 2 + [1] * 30
    after = [0] * 10 + [1] * 2 + [1] * 30
    assert mcnemar_exact(before, after) == pytest.approx(2 * (1 + 12 + 66) / 2 ** 12)   # 2 P(X <= 2), X ~ B(12, 1/2)
    assert mcnemar_exact([1, 0], [1, 0]) == 1.0


def _items(run, bench, stage_scores):
    return pd.DataFrame([{"run": run, "stage": s, "benchmark": bench, "item_id": str(i), "prediction": "",
                          "score": float(v), "metric": "x"} for s, scores in stage_scores.items()
                         for i, v in enumerate(scores)])


def test_a_planted_five_point_drop_is_found_and_identical_checkpoints_give_zero():
    rng = np.random.default_rng(1)
    base = (rng.random(1000) < 0.8).astype(float)
    dropped = base.copy()
    dropped[np.flatnonzero(base)[:50]] = 0.0                      # 50 of 1000 items lost: -5 points
    items = _items("r", "b", {0: base, 1: dropped, 2: dropped})
    out = compare_stages(items, n_boot=1000, seed=0).set_index(["stage", "against"])
    drop = out.loc[(1, "base")]
    assert drop["n"] == 1000 and drop["mean_diff"] == pytest.approx(-5.0)
    assert drop["ci_high"] < 0 and drop["ci_low"] < -5 < drop["ci_high"] and drop["mcnemar_p"] < 1e-10
    same = out.loc[(2, "previous")]                               # stage 2 = stage 1's answers
    assert (same["mean_diff"], same["ci_low"], same["ci_high"], same["mcnemar_p"]) == (0.0, 0.0, 0.0, 1.0)
    assert (1, "previous") not in out.index                       # previous of stage 1 is the base


def test_non_binary_scores_get_no_mcnemar_and_unmatched_items_are_left_out():
    items = _items("r", "anls", {0: [0.5, 1.0, 0.0], 1: [1.0, 1.0]})   # item 2 missing at stage 1
    (row,) = compare_stages(items, n_boot=200).to_dict("records")
    assert row["n"] == 2 and row["mean_diff"] == pytest.approx(25.0) and np.isnan(row["mcnemar_p"])
    with pytest.raises(ValueError, match="paired scores"):
        paired_difference([], [])


def test_analysis_run_writes_paired_csv_for_runs_with_items(tmp_path):
    from analysis.run import main as run_main
    from tests.synthetic import hand_run

    run = hand_run(tmp_path)
    assert run_main(["--run-dir", str(run), "--no-probes", "--n-boot", "50"]) == 0
    assert not (run / "analysis" / "paired.csv").exists()          # no items.parquet: no paired table
    _items("hand", "h1", {0: [1, 1, 0, 1], 1: [0, 1, 0, 1]}).to_parquet(run / "items.parquet")
    assert run_main(["--run-dir", str(run), "--no-probes", "--n-boot", "50"]) == 0
    paired = pd.read_csv(run / "analysis" / "paired.csv")
    assert paired[["benchmark", "stage", "against", "n", "mean_diff"]].values.tolist() == [["h1", 1, "base", 4, -25.0]]


def _hand_items(n=200, seed=3):
    """Per-item 0/1 scores for hand_run's h1, h2 and count whose means are that run's scores / 100."""
    from tests.synthetic import hand_run  # noqa: F401  (the run these items belong to)
    scores = {"h1": [60, 40, 50, 58], "h2": [40, 30, 42, 44], "count": [10, 70, 50, 60]}
    rng = np.random.default_rng(seed)
    frames = []
    for bench, by_stage in scores.items():
        order = rng.permutation(n)
        stages = {s: (order < round(v * n / 100)).astype(float) for s, v in enumerate(by_stage)}
        frames.append(_items("hand", bench, stages))
    return pd.concat(frames, ignore_index=True)


def test_mean_change_interval_is_paired_difference_for_one_benchmark_and_bounds_a_planted_drop():
    from analysis.paired import mean_change_interval, metric_intervals
    items = _hand_items()
    one = paired_difference(items[(items.benchmark == "h1") & (items.stage == 0)].score,
                            items[(items.benchmark == "h1") & (items.stage == 1)].score, n_boot=500, seed=4)
    assert mean_change_interval(items, ["h1"], 1, 0, n_boot=500, seed=4) == (one["ci_low"], one["ci_high"])
    low, high = mean_change_interval(items, ["h1", "h2"], 1, 0, n_boot=500)
    assert low < -15 < high < 0                                   # H[1] - H[0] = (-20 - 10) / 2 = -15
    assert np.isnan(mean_change_interval(items, ["h1", "nope"], 1, 0)[0])   # a benchmark without items
    cis = metric_intervals(items, [0, 1, 2, 3], ["h1", "h2"], {"count": 1, "clock": 3}, n_boot=200)
    assert cis[("heldout_change_final", None, None)] == cis[("heldout_change", 3, None)]
    assert cis[("target_learning", 1, "count")][0] > 0 and np.isnan(cis[("target_learning", 3, "clock")][0])


def test_metrics_and_heldout_figure_show_intervals_only_for_runs_with_items(tmp_path):
    from matplotlib.container import ErrorbarContainer

    from analysis import analyze
    from analysis.figures import close, heldout_over_sequence
    from tests.synthetic import hand_run

    run = hand_run(tmp_path)
    plain = analyze([run], probes=False, n_boot=100)
    assert "ci_low" not in plain.metrics_long and "heldout_change_ci_low" not in plain.curves
    fig = heldout_over_sequence(plain)
    assert not [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    close(fig)

    _hand_items().to_parquet(run / "items.parquet")
    an = analyze([run], probes=False, n_boot=100)
    ml = an.metrics_long
    assert list(ml.columns[:len(plain.metrics_long.columns)]) == list(plain.metrics_long.columns)
    pd.testing.assert_frame_equal(ml[plain.metrics_long.columns], plain.metrics_long)   # nothing else moves
    change = ml[ml.metric == "heldout_change"].set_index("stage")
    assert np.isnan(change.loc[0, "ci_low"]) and change.loc[1, "ci_low"] < change.loc[1, "value"] < change.loc[1, "ci_high"]
    learn = ml[(ml.metric == "target_learning") & (ml.benchmark == "count")].iloc[0]
    assert learn.ci_low < 60 < learn.ci_high and ml[ml.metric == "accuracy"].ci_low.isna().all()
    fig = heldout_over_sequence(an)
    bars = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    segments = bars[0].lines[2][0].get_segments() if len(bars) == 1 else []
    H = an.curves.set_index("stage").heldout_mean
    assert [seg[0][0] for seg in segments] == [1, 2, 3]                      # a bar per stage after the base
    assert all(seg[0][1] <= H[int(seg[0][0])] <= seg[1][1] for seg in segments)
    close(fig)
