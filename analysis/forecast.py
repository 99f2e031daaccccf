"""Forecast a stage's held-out change from the drift monitor's early values (docs/advise.md).

    python -m analysis.forecast --run-dir runs/demo [--run-dir ...] --out forecast.json [--level 0.9]
                                [--horizon STEPS] [--points points.csv] [--figure loro.png]

Points: every run r with monitor.parquet and evals.parquet, every stage s >= 1. With the monitor's values
at stage 0 (the base, `P0`), at the stage's step 0 (`P[s, 0]`) and at its early check e (the first check
inside the stage, or the last one at or before `--horizon`), the features are

    kl_to_base              K[s, e]                              (KL to the base, nats)
    number_mass_shift       N[s, e] - N0                         (number-token mass)
    signature_mass_shift    S[s, e] - S0, S the stage task's sig_<task>_mass (0 when the task has none)
    kl_to_base_slope        (K[s, e] - K[s, 0]) / e              (per optimizer step)
    number_mass_slope       (N[s, e] - N[s, 0]) / e

and the target is the held-out change measured at the stage's end, y = H[s] - H[0] (pp, analysis.metrics).

Model: ridge regression on the standardised features, pooled over runs and recipes, its penalty chosen by
generalised cross-validation on the points it is fitted on. Error: leave-one-run-out (LORO), every point of
run r predicted by a model fitted (penalty included) without run r: MAE and Spearman. Intervals: split-
conformal on the LORO residuals, prediction +- q with q the ceil((n+1) level)-th smallest |residual|.

The fitted model is a small JSON (`Forecaster.save`) that training.advise reads with `Forecaster.load`.
Torch-free: numpy and pandas only.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from probes.schemas import TableError

from .drift_monitor import load_monitor
from .metrics import RunMetrics
from .stats import correlate
from .tables import load_runs

FEATURES = ("kl_to_base", "number_mass_shift", "signature_mass_shift", "kl_to_base_slope", "number_mass_slope")
TARGET = "heldout_change"
KIND = "lmm-drift forecast"
ALPHAS = np.logspace(-3, 3, 25)


# -- features from a monitor table -----------------------------------------------------------------------
def stage_features(mon: pd.DataFrame, stage: int, task: str | None, horizon: int | None = None) -> dict | None:
    """The features of one stage of one run's monitor table (see the module docstring), plus `early_step`;
    None when the stage has no check inside it (at or before `horizon`)."""
    def value(probe, s, step):
        v = mon.loc[(mon["probe"] == probe) & (mon["stage"] == s) & (mon["step"] == step), "value"]
        return float(v.iloc[0]) if len(v) else math.nan

    steps = sorted(int(x) for x in mon.loc[mon["stage"] == stage, "step"].unique() if x > 0)
    if horizon is not None:
        steps = [x for x in steps if x <= horizon]
        steps = steps[-1:]
    if not steps:
        return None
    e = steps[0]
    sig = f"sig_{task}_mass"
    has_sig = bool(task) and (mon["probe"] == sig).any()
    return {"kl_to_base": value("kl_to_base", stage, e),
            "number_mass_shift": value("number_mass", stage, e) - value("number_mass", 0, 0),
            "signature_mass_shift": value(sig, stage, e) - value(sig, 0, 0) if has_sig else 0.0,
            "kl_to_base_slope": (value("kl_to_base", stage, e) - value("kl_to_base", stage, 0)) / e,
            "number_mass_slope": (value("number_mass", stage, e) - value("number_mass", stage, 0)) / e,
            "early_step": e}


def points(run_dirs, horizon: int | None = None) -> pd.DataFrame:
    """One row per (run, stage >= 1) with a monitor check inside the stage and a held-out score: run, recipe,
    stage, stage_name, task, the features, early_step, heldout_change."""
    rows = []
    for run in load_runs(run_dirs, probes=False):
        mon = load_monitor(run)
        if mon is None:
            continue
        m = RunMetrics(run)
        if not m.heldout:
            continue
        dH = m.H - m.H.loc[0]
        for s in (s for s in dH.index if s > 0):
            task = run.stages.loc[s, "task"] if s in run.stages.index else None
            f = stage_features(mon, s, task, horizon)
            if f is None:
                continue
            rows.append({"run": run.label, "recipe": run.recipe, "stage": int(s),
                         "stage_name": run.stages.loc[s, "name"], "task": task, **f, TARGET: float(dH.loc[s])})
    cols = ["run", "recipe", "stage", "stage_name", "task", *FEATURES, "early_step", TARGET]
    out = pd.DataFrame(rows, columns=cols)
    bad = out[list(FEATURES)].isna().any(axis=1)
    if bad.any():
        raise TableError(f"monitor values missing (kl_to_base / number_mass) for {bad.sum()} stage(s), e.g. run "
                         f"{out.loc[bad, 'run'].iloc[0]} stage {out.loc[bad, 'stage'].iloc[0]}; run with monitor.kl")
    return out


# -- the model ---------------------------------------------------------------------------------------------
def _ridge(X: np.ndarray, y: np.ndarray, alpha: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                        float, float]:
    """(mean, scale, coef, intercept, alpha) of ridge on standardised X; alpha=None picks it by GCV."""
    mean, scale = X.mean(axis=0), X.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    Z, yc = (X - mean) / scale, y - y.mean()
    U, d, Vt = np.linalg.svd(Z, full_matrices=False)
    uy = U.T @ yc

    def fit(a):
        shrink = d / (d ** 2 + a)
        return Vt.T @ (shrink * uy), float(np.sum(d ** 2 / (d ** 2 + a)))

    if alpha is None:
        n = len(y)

        def gcv(a):
            coef, dof = fit(a)
            rss = float(np.sum((yc - Z @ coef) ** 2))
            return n * rss / max(n - dof - 1, 1e-9) ** 2   # -1: the intercept
        alpha = float(min(ALPHAS, key=gcv))
    coef, _ = fit(alpha)
    return mean, scale, coef, float(y.mean()), float(alpha)


@dataclass
class Forecaster:
    """A fitted ridge forecaster with its conformal half-width; `save`/`load` read and write its JSON."""
    features: list[str]
    mean: list[float]
    scale: list[float]
    coef: list[float]
    intercept: float
    alpha: float
    level: float
    halfwidth: float
    target: str = TARGET
    horizon: int | None = None
    fitted_on: dict = field(default_factory=dict)
    loro: dict = field(default_factory=dict)
    kind: str = KIND

    def predict(self, rows) -> np.ndarray:
        """Predictions for a DataFrame (or a list of dicts) holding the features."""
        X = pd.DataFrame(rows)[self.features].to_numpy(float)
        return self.intercept + ((X - np.array(self.mean)) / np.array(self.scale)) @ np.array(self.coef)

    def interval(self, rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(prediction, low, high) at the forecaster's level."""
        p = self.predict(rows)
        return p, p - self.halfwidth, p + self.halfwidth

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path) -> Forecaster:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise TableError(f"{path}: cannot read the forecaster ({e})") from None
        if d.get("kind") != KIND:
            raise TableError(f"{path}: not a forecaster JSON (kind {d.get('kind')!r}, expected {KIND!r})")
        return cls(**d)


def conformal_halfwidth(residuals: np.ndarray, level: float) -> float:
    """The ceil((n+1) level)-th smallest |residual| (inf when n is too small for the level)."""
    r = np.sort(np.abs(np.asarray(residuals, float)))
    k = math.ceil((len(r) + 1) * level)
    return float(r[k - 1]) if k <= len(r) else math.inf


def loro_predictions(pts: pd.DataFrame, alpha: float | None = None) -> np.ndarray:
    """Each point predicted by a model fitted without its run (the penalty chosen without it too)."""
    X, y = pts[list(FEATURES)].to_numpy(float), pts[TARGET].to_numpy(float)
    pred = np.full(len(pts), np.nan)
    for run in pts["run"].unique():
        out = (pts["run"] == run).to_numpy()
        mean, scale, coef, b, _ = _ridge(X[~out], y[~out], alpha)
        pred[out] = b + ((X[out] - mean) / scale) @ coef
    return pred


def fit(pts: pd.DataFrame, level: float = 0.9, alpha: float | None = None, horizon: int | None = None,
        fitted_on: dict | None = None) -> tuple[Forecaster, np.ndarray]:
    """The forecaster fitted on every point, its interval from the LORO residuals; returns it and the LORO
    predictions."""
    if pts["run"].nunique() < 3:
        raise TableError(f"{pts['run'].nunique()} run(s) with monitor and evals tables; the forecaster needs >= 3")
    X, y = pts[list(FEATURES)].to_numpy(float), pts[TARGET].to_numpy(float)
    loro = loro_predictions(pts, alpha)
    res = y - loro
    mean, scale, coef, b, a = _ridge(X, y, alpha)
    rho = correlate(loro, y, "spearman", n_boot=1000, n_perm=1000, seed=0)
    lo_hi = conformal_halfwidth(res, level)
    summary = {"n": int(len(y)), "runs": int(pts["run"].nunique()), "mae": float(np.mean(np.abs(res))),
               "spearman": rho["estimate"], "spearman_ci": [rho["ci_low"], rho["ci_high"]],
               "spearman_p": rho["p_value"], "mae_predict_mean": float(np.mean(np.abs(y - y.mean()))),
               "coverage_of_loro_residuals": float(np.mean(np.abs(res) <= lo_hi))}
    on = {"runs": sorted(pts["run"].unique()), "recipes": sorted(pts["recipe"].unique()), "points": int(len(y)),
          "early_steps": sorted(int(s) for s in pts["early_step"].unique()), **(fitted_on or {})}
    f = Forecaster(list(FEATURES), mean.tolist(), scale.tolist(), coef.tolist(), b, a, level, lo_hi,
                   horizon=horizon, fitted_on=on, loro=summary)
    return f, loro


def describe(f: Forecaster) -> str:
    L = f.loro
    lines = [f"forecaster: ridge (alpha {f.alpha:.3g}) of {f.target} on {', '.join(f.features)}",
             f"fitted on {f.fitted_on.get('points')} stages of {len(f.fitted_on.get('runs', []))} runs "
             f"({', '.join(f.fitted_on.get('recipes', []))}); early check at step(s) {f.fitted_on.get('early_steps')}",
             f"leave-one-run-out: MAE {L.get('mae', math.nan):.3f} pp (predicting the mean: "
             f"{L.get('mae_predict_mean', math.nan):.3f}), Spearman {L.get('spearman', math.nan):.3f} "
             f"(95% CI {L.get('spearman_ci', [math.nan] * 2)[0]:.3f} .. {L.get('spearman_ci', [math.nan] * 2)[1]:.3f})",
             f"{f.level:.0%} interval: prediction +- {f.halfwidth:.3f} pp (conformal on the LORO residuals)"]
    return "\n".join(lines)


def figure(pts: pd.DataFrame, loro: np.ndarray, f: Forecaster):
    """LORO prediction (x, with the interval) vs measured held-out change (y), coloured by recipe."""
    import matplotlib.pyplot as plt

    from .figures import recipe_palette

    pal = recipe_palette(sorted(pts["recipe"].unique()))
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for recipe, g in pts.assign(pred=loro).groupby("recipe"):
        ax.errorbar(g["pred"], g[TARGET], xerr=f.halfwidth, fmt="o", color=pal[recipe], ms=5, alpha=0.8,
                    elinewidth=0.6, label=recipe)
    lim = [min(loro.min(), pts[TARGET].min()) - 1, max(loro.max(), pts[TARGET].max()) + 1]
    ax.plot(lim, lim, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("predicted held-out change, leave-one-run-out (pp)")
    ax.set_ylabel("measured held-out change H[s] - H[0] (pp)")
    ax.set_title(f"MAE {f.loro['mae']:.2f} pp, Spearman {f.loro['spearman']:.2f}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.forecast", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", action="append", required=True, help="a run, or a folder of runs (repeatable)")
    ap.add_argument("--out", required=True, help="the forecaster's JSON")
    ap.add_argument("--level", type=float, default=0.9, help="prediction interval level (default 0.9)")
    ap.add_argument("--alpha", type=float, help="ridge penalty on the standardised features (default: GCV)")
    ap.add_argument("--horizon", type=int, help="use the last check at or before this step (default: the first)")
    ap.add_argument("--points", help="write the points with their LORO predictions to this CSV")
    ap.add_argument("--figure", help="write the LORO predicted-vs-measured figure to this PNG")
    ap.add_argument("--note", default="", help="free text stored in the JSON's fitted_on.note")
    args = ap.parse_args(argv)
    try:
        pts = points(args.run_dir, args.horizon)
        f, loro = fit(pts, args.level, args.alpha, args.horizon,
                      {"run_dirs": [str(Path(p).resolve()) for p in args.run_dir], "note": args.note})
    except TableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    f.save(args.out)
    if args.points:
        pts.assign(loro_prediction=loro).to_csv(args.points, index=False)
    if args.figure:
        figure(pts, loro, f).savefig(args.figure, dpi=120)
    print(describe(f))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
