"""The drift monitor's tables (RUN/monitor.parquet, RUN/monitor_cost.json): the probe along the training
steps, whether it predicts the held-out forgetting measured at each stage's end, and what it costs.

Prediction. For run r, stage s >= 1 and a monitor probe P (value M[s, step]; M0 = stage 0's value):
    end_shift   = M[s, last step] - M0       (the monitor at the end of the stage: what the stage did)
    early_shift = M[s, first step > 0] - M0  (the first check inside the stage: an early warning)
    y           = H[s] - H[0]                (held-out change measured at the stage end, evals.parquet)
`prediction_table` gives Spearman and Kendall correlations of each x with y, pooled over runs and stages
(the same estimator, bootstrap CI and permutation p as analysis.stats / correlations.csv). Forgetting is
negative y, so a probe that grows with forgetting shows a negative correlation.

Cost. `cost_table` reads monitor_cost.json (probes.monitor_cost): seconds per check, seconds of one held-out
evaluation of the same checkpoint, their ratio; and the mean seconds per check measured inside training.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from probes.schemas import MONITOR, TableError

from .metrics import RunMetrics
from .stats import correlate
from .tables import Run, read_table

COST_FILE = "monitor_cost.json"


def load_monitor(run: Run) -> pd.DataFrame | None:
    path = Path(run.path) / MONITOR.file
    if not path.is_file():
        return None
    t = read_table(path, MONITOR.columns)
    t["run"], t["recipe"] = run.label, run.recipe
    return t


def global_steps(mon: pd.DataFrame) -> pd.DataFrame:
    """Adds `x`: the step counted from the run's first stage (stage k's steps follow stage k-1's last)."""
    last = mon.groupby("stage")["step"].max().sort_index()
    offset = last.shift(1, fill_value=0).cumsum()
    return mon.assign(x=mon["step"] + mon["stage"].map(offset))


def prediction_points(runs: list[Run]) -> pd.DataFrame:
    cols = ["run", "recipe", "stage", "stage_name", "probe", "end_shift", "early_shift", "early_step",
            "last_step", "heldout_change"]
    rows = []
    for run in runs:
        mon = load_monitor(run)
        if mon is None or run.evals is None:
            continue
        m = RunMetrics(run)
        if not m.heldout:
            continue
        dH = m.H - m.H.loc[0]
        for probe, g in mon.groupby("probe"):
            base = g.loc[g["stage"] == 0, "value"]
            if base.empty:
                continue
            for s, gs in g[g["stage"] > 0].groupby("stage"):
                if s not in dH.index:
                    continue
                gs = gs.sort_values("step")
                inside = gs[gs["step"] > 0]
                if inside.empty:
                    continue
                rows.append({"run": run.label, "recipe": run.recipe, "stage": s, "stage_name": gs["stage_name"].iloc[0],
                             "probe": probe, "end_shift": inside["value"].iloc[-1] - base.iloc[0],
                             "early_shift": inside["value"].iloc[0] - base.iloc[0],
                             "early_step": int(inside["step"].iloc[0]), "last_step": int(inside["step"].iloc[-1]),
                             "heldout_change": float(dH.loc[s])})
    return pd.DataFrame(rows, columns=cols)


def prediction_table(points: pd.DataFrame, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> pd.DataFrame:
    rows = []
    for probe, g in points.groupby("probe", sort=True):
        for x in ("end_shift", "early_shift"):
            for method in ("spearman", "kendall"):
                res = correlate(g[x], g["heldout_change"], method, n_boot=n_boot, n_perm=n_perm, seed=seed)
                rows.append({"probe": probe, "x": x, "y": "heldout_change", "method": method,
                             "n_runs": g["run"].nunique(), **res})
    return pd.DataFrame(rows, columns=["probe", "x", "y", "method", "n_runs", "estimate", "ci_low", "ci_high",
                                       "p_value", "n", "n_boot_valid"])


def cost_table(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        mon = load_monitor(run)
        in_training = (float(mon[mon["stage"] > 0].drop_duplicates(["stage", "step"])["seconds"].mean())
                       if mon is not None and (mon["stage"] > 0).any() else np.nan)
        path = Path(run.path) / COST_FILE
        c = {}
        if path.is_file():
            try:
                c = json.loads(path.read_text())
            except ValueError as e:
                raise TableError(f"{path}: not valid JSON ({e})") from None
        if not c and np.isnan(in_training):
            continue
        rows.append({"run": run.label, "recipe": run.recipe, "stage": c.get("stage"),
                     "check_seconds": (c.get("monitor") or {}).get("seconds_per_check", np.nan),
                     "check_captions": (c.get("monitor") or {}).get("captions"),
                     "heldout_seconds": (c.get("heldout") or {}).get("seconds", np.nan),
                     "heldout_items": sum(b["items"] for b in ((c.get("heldout") or {}).get("benchmarks") or {}).values())
                     if c else None,
                     "ratio_heldout_to_check": c.get("ratio_heldout_to_check", np.nan),
                     "check_seconds_in_training": in_training,
                     "device": c.get("device")})
    return pd.DataFrame(rows)


def figure(runs: list[Run], probe: str = "number_mass"):
    """The probe along the training steps of every run (colour = recipe), stage boundaries dashed and
    named, budget events marked."""
    import matplotlib.pyplot as plt

    from .figures import recipe_palette

    mons = [m for m in (load_monitor(r) for r in runs) if m is not None]
    mons = [global_steps(m[m["probe"] == probe]) for m in mons if (m["probe"] == probe).any()]
    if not mons:
        raise TableError(f"no monitor rows for probe {probe!r}")
    pal = recipe_palette([m["recipe"].iloc[0] for m in mons])
    fig, ax = plt.subplots(figsize=(8, 3.8))
    seen = set()
    for m in mons:
        recipe = m["recipe"].iloc[0]
        m = m[m["stage"] > 0].sort_values("x")
        ax.plot(m["x"], m["value"], color=pal[recipe], lw=1.4, marker=".", ms=4,
                label=recipe if recipe not in seen else None)
        seen.add(recipe)
        ev = m[m["event"] != ""]
        ax.scatter(ev["x"], ev["value"], marker="x", color="k", zorder=5, s=30)
    first = mons[0][mons[0]["stage"] > 0]
    for s, g in first.groupby("stage"):
        x0 = g["x"].min()
        ax.axvline(x0, color="0.5", ls="--", lw=0.8)
        ax.text(x0, 1.0, f" {s} {g['stage_name'].iloc[0]}", transform=ax.get_xaxis_transform(), va="top",
                fontsize=8, color="0.3")
    base = mons[0].loc[mons[0]["stage"] == 0, "value"]
    if len(base):
        ax.axhline(base.iloc[0], color="0.3", lw=0.8, ls=":", label="base")
    ax.set_xlabel("optimizer step (stages in sequence)")
    ax.set_ylabel(probe)
    ax.legend(fontsize=8, loc="best")
    ax.set_title(f"Drift monitor: {probe} during training (x: budget events)")
    fig.tight_layout()
    return fig
