"""analysis.forecast: planted relations are recovered, intervals cover at their level, LORO is honest."""
import numpy as np
import pandas as pd
import pytest

from analysis import forecast as F


def _points(rng, n_runs=12, per_run=5, noise=0.5, coef=(-40.0, 0.0, 0.0, 0.0, 0.0), start=0):
    X = rng.normal(size=(n_runs * per_run, len(F.FEATURES))) * 0.1
    y = 2.0 + X @ np.array(coef) + rng.normal(scale=noise, size=len(X))
    df = pd.DataFrame(X, columns=list(F.FEATURES))
    df["run"] = [f"r{start + i // per_run}" for i in range(len(X))]
    df["recipe"] = "sa_proj"
    df["early_step"] = 2
    df[F.TARGET] = y
    return df


def test_a_planted_linear_effect_is_recovered():
    pts = _points(np.random.default_rng(0), n_runs=20, noise=0.1)
    f, loro = F.fit(pts)
    pred = f.predict(pd.DataFrame({k: [0.1 if k == "kl_to_base" else 0.0] for k in F.FEATURES}))
    assert pred[0] == pytest.approx(2.0 - 4.0, abs=0.2)
    assert f.loro["spearman"] > 0.9
    assert f.loro["mae"] < 0.2


def test_intervals_cover_at_the_nominal_rate():
    rng = np.random.default_rng(1)
    hits = []
    for _ in range(150):
        f, _ = F.fit(_points(rng, n_runs=10, per_run=3, noise=1.0))
        new = _points(rng, n_runs=1, per_run=20, noise=1.0)
        _, lo, hi = f.interval(new)
        hits.append(np.mean((new[F.TARGET] >= lo) & (new[F.TARGET] <= hi)))
    assert 0.86 <= np.mean(hits) <= 0.95


def test_loro_never_sees_the_held_out_run():
    pts = _points(np.random.default_rng(2))
    before = F.loro_predictions(pts)
    changed = pts.copy()
    held = changed["run"] == "r3"
    changed.loc[held, F.TARGET] += 1000.0      # the held-out run's own targets cannot move its predictions
    after = F.loro_predictions(changed)
    assert np.allclose(before[held.to_numpy()], after[held.to_numpy()])
    assert not np.allclose(before[~held.to_numpy()], after[~held.to_numpy()])


def test_saved_json_round_trips_and_refuses_other_json(tmp_path):
    f, _ = F.fit(_points(np.random.default_rng(3)))
    g = F.Forecaster.load(f.save(tmp_path / "f.json"))
    row = _points(np.random.default_rng(4), n_runs=1, per_run=1)
    assert g.interval(row)[0] == pytest.approx(f.interval(row)[0])
    (tmp_path / "x.json").write_text('{"a": 1}')
    with pytest.raises(F.TableError, match="not a forecaster"):
        F.Forecaster.load(tmp_path / "x.json")


def test_stage_features_read_the_early_check():
    rows = []
    for stage, step, kl, num, sig in [(0, 0, 0.0, 0.10, 0.2), (1, 0, 0.0, 0.10, 0.2), (1, 2, 0.04, 0.16, 0.5),
                                      (1, 4, 0.09, 0.30, 0.9)]:
        rows += [{"stage": stage, "step": step, "probe": p, "value": v}
                 for p, v in (("kl_to_base", kl), ("number_mass", num), ("sig_count_mass", sig))]
    mon = pd.DataFrame(rows)
    f = F.stage_features(mon, 1, "count")
    assert f["early_step"] == 2 and f["kl_to_base"] == pytest.approx(0.04)
    assert f["number_mass_shift"] == pytest.approx(0.06) and f["signature_mass_shift"] == pytest.approx(0.3)
    assert f["kl_to_base_slope"] == pytest.approx(0.02) and f["number_mass_slope"] == pytest.approx(0.03)
    assert F.stage_features(mon, 1, "count", horizon=4)["kl_to_base"] == pytest.approx(0.09)
    assert F.stage_features(mon, 1, "other")["signature_mass_shift"] == 0.0
    assert F.stage_features(mon, 2, "count") is None


def test_cli_reads_run_folders_and_writes_the_json(tmp_path, capsys):
    from .test_drift_analysis import _planted_run

    rng = np.random.default_rng(5)
    for i in range(4):
        kl = rng.uniform(0.01, 0.2, size=2)
        h = [50.0, 50 - 100 * kl[0], 50 - 100 * kl[1]]   # held-out change = -100 KL at the early check
        mon = {"kl_to_base": [[0.0], [0.0, kl[0], 2 * kl[0]], [2 * kl[0], kl[1], kl[1]]],
               "number_mass": [[0.1], [0.1, 0.1, 0.1], [0.1, 0.1, 0.1]]}
        _planted_run(tmp_path / "runs", f"r{i}", "sa_proj", h, mon)
    out = tmp_path / "f.json"
    assert F.main(["--run-dir", str(tmp_path / "runs"), "--out", str(out), "--points", str(tmp_path / "p.csv"),
                   "--figure", str(tmp_path / "f.png"), "--alpha", "1e-6"]) == 0
    f = F.Forecaster.load(out)
    assert f.fitted_on["points"] == 8 and f.fitted_on["runs"] == ["r0", "r1", "r2", "r3"]
    assert f.loro["mae"] < 1e-3 and f.loro["spearman"] == pytest.approx(1.0)
    assert "leave-one-run-out" in capsys.readouterr().out and (tmp_path / "f.png").is_file()
    assert F.main(["--run-dir", str(tmp_path / "runs" / "r0"), "--out", str(out)]) == 2   # one run: too few
