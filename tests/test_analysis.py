"""analysis/: metrics recovered exactly from a hand-computed run, statistics recovered within their CI
from planted correlations, recovery events with their probe change, and the command's outputs."""
import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from analysis import TableError, analyze, load_runs
from analysis import stats as st
from analysis.metrics import (
    RunMetrics,
    accuracy_matrix,
    link_targets,
    max_minus_last_forgetting,
    recovery_events,
)
from analysis.report import default_out
from analysis.run import main as run_main

from .synthetic import hand_run, planted_study, write_run


@pytest.fixture(scope="module")
def hand(tmp_path_factory):
    return load_runs([hand_run(tmp_path_factory.mktemp("hand"))])[0]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    planted = planted_study(root, rho={"full": -0.7, "mlp": -0.7, "sa_proj": -0.7, "mlp_gate_up": -0.7})
    return planted, analyze(load_runs([root]))


# --- metrics, exactly ------------------------------------------------------------------------------
# The hand run (tests/synthetic.py: hand_run), stages 0..3 training count, colour, clock:
#   stage | count colour clock | h1 h2 | H = mean(h1, h2)
#     0   |  10    20     30   | 60 40 | 50
#     1   |  70    25     30   | 40 30 | 35
#     2   |  50    80     38   | 50 42 | 46
#     3   |  60    75     85   | 58 44 | 51
def test_metrics_of_the_hand_run(hand):
    m = RunMetrics(hand)
    assert m.targets == {"count": 1, "colour": 2, "clock": 3}
    assert m.heldout == ["h1", "h2"]
    # H[s] - H[0] = 50-50, 35-50, 46-50, 51-50
    assert list(m.H - m.H.loc[0]) == [0.0, -15.0, -4.0, 1.0]
    sc = m.scalars()
    # target overall: mean(60-10, 75-20, 85-30) = mean(50, 55, 55) = 160/3
    assert sc["target_overall"] == pytest.approx(160 / 3)
    # target learning A[s(t),t] - A[0,t]: count 70-10 = 60, colour 80-20 = 60, clock 85-30 = 55; mean 175/3
    assert sc["target_learning_mean"] == pytest.approx(175 / 3)
    # BWT over targets trained before the last stage: count 60-70 = -10, colour 75-80 = -5 -> -7.5
    assert sc["bwt"] == -7.5
    # FWT over targets not trained first: colour A[1]-A[0] = 25-20 = 5, clock A[2]-A[0] = 38-30 = 8 -> 6.5
    assert sc["fwt"] == 6.5
    # max-minus-last (stages 1..2): count max(70,50) - 60 = 10, colour max(25,80) - 75 = 5 -> 7.5
    assert dict(max_minus_last_forgetting(m.A, m.targets)) == {"count": 10.0, "colour": 5.0}
    assert sc["max_minus_last_forgetting"] == 7.5
    # held-out max-minus-last (stages 0..2): h1 max(60,40,50) - 58 = 2, h2 max(40,30,42) - 44 = -2 -> 0
    assert sc["heldout_max_minus_last"] == 0.0
    assert sc["heldout_change_final"] == 1.0 and sc["heldout_change_min"] == -15.0
    long = m.long()
    tf = long[long.metric == "target_forgetting"].set_index("benchmark")["value"]
    assert dict(tf) == {"count": -10.0, "colour": -5.0, "clock": 0.0}  # A[3,t] - A[s(t),t]
    acc = long[long.metric == "accuracy"]
    assert len(acc) == 4 * 5 and acc.set_index(["stage", "benchmark"]).loc[(2, "clock"), "value"] == 38.0


def test_recovery_events_and_their_probe_change(hand):
    an = analyze([hand], n_boot=200, n_perm=200)
    ev = an.recovery[(an.recovery.probe == "number_mass")].set_index("stage")
    # H = 50, 35, 46, 51: stage 2 rises 35 -> 46 from 15 below base; stage 3 rises 46 -> 51 from 4 below
    assert list(ev.index) == [2, 3]
    assert list(ev["rise"]) == [11.0, 5.0] and list(ev["deficit_prev"]) == [15.0, 4.0]
    assert ev.loc[2, "recovered_fraction"] == pytest.approx(11 / 15) and ev.loc[3, "recovered_fraction"] == 1.25
    # number_mass 0.01, 0.20, 0.08, 0.02: change in stage 2 = -0.12, in stage 3 = -0.06
    assert ev.loc[2, "probe_change"] == pytest.approx(-0.12) and ev.loc[3, "probe_change"] == pytest.approx(-0.06)
    assert ev.loc[2, "stage_name"] == "colour" and ev.loc[3, "task"] == "clock"
    assert an.summary.loc[0, "recovery_events"] == 2


def test_recovery_needs_a_deficit():
    H = pd.Series([50.0, 55.0, 52.0, 60.0])            # never below the base: rises are not recoveries
    assert recovery_events(H).empty
    H = pd.Series([50.0, 40.0, 40.5, 49.0, 47.0, 48.0])  # rises at 2 (0.5 pp), 3 (8.5 pp), 5 (1 pp)
    assert list(recovery_events(H)["stage"]) == [2, 3, 5]
    assert list(recovery_events(H, min_change=2.0)["stage"]) == [3]  # 0.5 and 1 pp rises filtered


def test_target_linking_and_incomplete_benchmarks():
    stages = pd.DataFrame({"index": [0, 1, 2, 3], "task": [None, "textvqa", "count", "count2"]})
    assert link_targets(["textvqa_val", "count", "count2"], stages) == {"textvqa_val": 1, "count": 2, "count2": 3}
    with pytest.warns(UserWarning, match="ocr"):
        assert link_targets(["ocr"], stages) == {}
    ev = pd.DataFrame({"stage": [0, 0, 1], "benchmark": ["a", "b", "a"], "score": [1.0, 2.0, 3.0]})
    with pytest.warns(UserWarning, match=r"\['b'\]"):
        assert list(accuracy_matrix(ev).columns) == ["a"]


# --- statistics ------------------------------------------------------------------------------------
def test_vectorised_statistics_match_scipy():
    rng = np.random.default_rng(1)
    for n in (5, 12, 40):
        x = rng.normal(size=(7, n))
        y = x + rng.normal(size=(7, n))
        y[:, :3] = np.round(y[:, :3])  # some ties
        x[:, 1] = x[:, 2]
        for i in range(7):
            assert st.pearson(x, y)[i] == pytest.approx(sps.pearsonr(x[i], y[i]).statistic)
            assert st.spearman(x, y)[i] == pytest.approx(sps.spearmanr(x[i], y[i]).statistic)
            assert st.kendall(x, y)[i] == pytest.approx(sps.kendalltau(x[i], y[i]).statistic)
    assert np.isnan(st.pearson([1, 1, 1], [1, 2, 3]))  # constant: undefined, not 0


def test_partial_correlation_is_the_residual_correlation():
    rng = np.random.default_rng(2)
    z = rng.normal(size=30)
    x, y = z + rng.normal(size=30), z + rng.normal(size=30)
    rx = x - np.polyval(np.polyfit(z, x, 1), z)
    ry = y - np.polyval(np.polyfit(z, y, 1), z)
    assert st.partial_pearson(x, y, z) == pytest.approx(sps.pearsonr(rx, ry).statistic)


def test_exact_permutation_p_value_by_hand():
    # x = y = 1..5: of the 5! = 120 pairings only the identity and the reversal reach |r| = 1 -> 2/120
    res = st.correlate([1, 2, 3, 4, 5], [1, 2, 3, 4, 5], "pearson", n_perm=2000)
    assert res["estimate"] == 1.0 and res["p_value"] == pytest.approx(2 / 120)
    assert math.isnan(st.correlate([1, 2], [2, 1])["estimate"])  # n < 3: undefined


def test_planted_correlation_is_recovered_within_its_ci(study):
    planted, an = study
    pts = an.points[(an.points.probe == "number_mass") & (an.points["mode"] == "teacher-forced")]
    # the tables carry the planted pairs exactly (48 = 4 recipes x 2 runs x 6 stages)
    assert np.allclose(np.sort(pts.probe_shift), np.sort(planted["x"]))
    assert np.allclose(np.sort(pts.heldout_change), np.sort(planted["y"]))
    c = an.correlations.set_index(["probe", "mode", "comparison", "group", "method"])
    rho = -0.7
    population = {"pearson": rho, "spearman": 6 / np.pi * np.arcsin(rho / 2), "kendall": 2 / np.pi * np.arcsin(rho),
                  "partial_pearson": rho}  # z (target gain) is independent of x and y here
    for method, value in population.items():
        r = c.loc[("number_mass", "teacher-forced", "vs_base", "pooled", method)]
        assert r.n == 48 and r.ci_low <= value <= r.ci_high, (method, r.ci_low, value, r.ci_high)
        assert r.p_value < 0.01
    for recipe in ("full", "mlp", "sa_proj", "mlp_gate_up"):  # 12 points each
        r = c.loc[("number_mass", "teacher-forced", "vs_base", f"recipe:{recipe}", "pearson")]
        assert r.n == 12 and r.ci_low <= rho <= r.ci_high, recipe
    s2s = c.loc[("number_mass", "teacher-forced", "stage_to_stage", "pooled", "pearson")]
    assert s2s.ci_high < 0  # differences of independent pairs keep the sign of the correlation


def test_planted_null_and_confounded_correlations():
    rng = np.random.default_rng(3)
    n = 60
    x, y = rng.normal(size=n), rng.normal(size=n)
    for method in ("pearson", "spearman", "kendall"):
        r = st.correlate(x, y, method, seed=0)
        assert r["ci_low"] <= 0 <= r["ci_high"] and r["p_value"] > 0.05, method
    # confounded: x and y both follow z; their own parts are independent -> partial correlation 0
    z = rng.normal(size=n)
    xc, yc = 2 * z + rng.normal(size=n), 2 * z + rng.normal(size=n)
    raw = st.correlate(xc, yc, "pearson")
    assert raw["ci_low"] > 0.5
    for method in ("partial_pearson", "partial_spearman"):
        r = st.correlate(xc, yc, method, z=z)
        assert r["ci_low"] <= 0 <= r["ci_high"] and r["p_value"] > 0.05, method
    # a planted partial correlation: y = 0.75 e1 + z + e2 with x = z + e1 -> 0.75 / sqrt(0.75^2 + 1) = 0.6
    e1, e2 = rng.normal(size=400), rng.normal(size=400)
    z = rng.normal(size=400)
    r = st.correlate(z + e1, 0.75 * e1 + z + e2, "partial_pearson", z=z)
    assert r["ci_low"] <= 0.6 <= r["ci_high"]


def test_correlations_are_seeded(study):
    _, an = study
    again = analyze(an.runs)
    pd.testing.assert_frame_equal(an.correlations, again.correlations)


# --- the command -----------------------------------------------------------------------------------
def test_command_writes_tables_and_figures(tmp_path, capsys):
    planted_study(tmp_path / "runs", n_stages=3, recipes=("full", "sa_proj"), runs_per_recipe=1)
    hand_run(tmp_path / "runs")
    assert run_main(["--run-dir", str(tmp_path / "runs"), "--n-boot", "300", "--n-perm", "300"]) == 0
    out = tmp_path / "runs" / "analysis"
    printed = capsys.readouterr().out
    assert "target overall" in printed and str(out) in printed
    metrics = pd.read_csv(out / "metrics.csv")
    assert set(metrics.columns) == {"run", "family", "recipe", "metric", "stage", "stage_name", "benchmark", "value"}
    hand_bwt = metrics[(metrics.run == "hand") & (metrics.metric == "bwt")]["value"]
    assert list(hand_bwt) == [-7.5]
    corr = pd.read_csv(out / "correlations.csv")
    assert {"pooled", "recipe:full", "recipe:sa_proj"} <= set(corr.group)
    assert set(corr.method) == {"pearson", "spearman", "kendall", "partial_pearson", "partial_spearman"}
    figs = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {"learning_vs_forgetting.png", "heldout_over_sequence.png", "probe_over_sequence.png",
            "probe_vs_heldout_number_mass_teacher-forced.png", "accuracy_matrix_hand.png"} <= set(figs)
    assert all((out / "figures" / f).stat().st_size > 10_000 for f in figs)
    # one run: RUN/analysis
    assert run_main(["--run-dir", str(tmp_path / "runs" / "hand"), "--n-boot", "100", "--n-perm", "100"]) == 0
    assert (tmp_path / "runs" / "hand" / "analysis" / "figures" / "accuracy_matrix_hand.png").exists()


def test_missing_files_and_columns_are_named(tmp_path, capsys):
    run = hand_run(tmp_path)
    (run / "probes.parquet").unlink()
    assert run_main(["--run-dir", str(run)]) == 2
    assert f"{run / 'probes.parquet'}: no such file" in capsys.readouterr().err
    assert run_main(["--run-dir", str(run), "--no-probes", "--n-boot", "50"]) == 0  # metrics only
    pd.read_parquet(run / "evals.parquet").drop(columns=["split"]).to_parquet(run / "evals.parquet")
    assert run_main(["--run-dir", str(run), "--no-probes"]) == 2
    err = capsys.readouterr().err
    assert "evals.parquet: lacks columns ['split']" in err
    manifest = json.loads((run / "run.json").read_text())
    del manifest["stages"]
    (run / "run.json").write_text(json.dumps(manifest))
    with pytest.raises(TableError, match=r"run.json: lacks keys \['stages'\]"):
        load_runs([run])
    with pytest.raises(TableError, match="no run directories"):
        load_runs([tmp_path / "nothing"])


def test_duplicate_rows_are_refused(tmp_path):
    A = pd.DataFrame({"count": [0.0, 50.0], "h": [50.0, 40.0]})
    run = write_run(tmp_path / "r", "full", ["count"], A, {"count": "target", "h": "heldout"})
    ev = pd.read_parquet(run / "evals.parquet")
    pd.concat([ev, ev.iloc[:1]]).to_parquet(run / "evals.parquet")
    with pytest.raises(TableError, match="repeat the key"):
        load_runs([run], probes=False)


def test_default_output_folder(tmp_path):
    assert default_out([tmp_path / "a"]) == (tmp_path / "a" / "analysis").resolve()
    assert default_out([tmp_path / "runs" / "a", tmp_path / "runs" / "b"]) == (tmp_path / "runs" / "analysis").resolve()


def test_runs_without_probes_still_get_metrics(tmp_path):
    A = pd.DataFrame({"count": [0.0, 50.0], "h": [50.0, 40.0]})
    run = write_run(tmp_path / "r", "full", ["count"], A, {"count": "target", "h": "heldout"})
    (run / "probes.parquet").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        an = analyze([run], probes=False)
    assert an.summary.loc[0, "heldout_change_final"] == -10.0 and an.correlations.empty
