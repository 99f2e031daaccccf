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
