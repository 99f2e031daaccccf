"""Does the output-distribution probe track forgetting? Per-stage points joining a probe's shift with
the held-out change, their correlations (pooled and per recipe), and the recovery events with the probe
change in their stage.

For stage s >= 1 of a run, with P[s] a probe's mean at stage s and H[s] the held-out mean:
- vs base:        x = P[s] - P[0],    y = H[s] - H[0],    z = T[s] - T[0]
- stage to stage: x = P[s] - P[s-1],  y = H[s] - H[s-1],  z = T[s] - T[s-1]
where T[s] is the mean over target benchmarks of A[s, t] (the "target gain" the partial correlations
hold fixed). Stage 0 is left out: its shift is zero by definition.
"""
from __future__ import annotations

import pandas as pd

from .metrics import RunMetrics, recovery_events
from .stats import correlate
from .tables import Run

PRIMARY_PROBE = "number_mass"
MODE_PREFERENCE = ("teacher-forced", "generate")
COMPARISONS = {"vs_base": ("probe_shift", "heldout_change", "target_gain"),
               "stage_to_stage": ("probe_step", "heldout_step", "target_step")}
CORRELATION_COLUMNS = ["probe", "mode", "comparison", "group", "recipe", "method", "control", "n",
                       "estimate", "ci_low", "ci_high", "p_value", "n_boot", "n_boot_valid", "n_perm",
                       "seed", "x", "y"]


def probe_curves(run: Run) -> pd.DataFrame:
    """One row per (stage, probe, mode): the probe table's mean and CI with the shift from the base."""
    if run.probes is None:
        return pd.DataFrame(columns=["run", "recipe", "family", "stage", "stage_name", "probe", "mode",
                                     "mean", "ci_low", "ci_high", "shift"])
    p = run.probes[["stage", "stage_name", "probe", "mode", "mean", "ci_low", "ci_high"]].copy()
    base = p[p["stage"] == 0].set_index(["probe", "mode"])["mean"]
    p["shift"] = p["mean"] - [base.get((a, b), float("nan")) for a, b in zip(p["probe"], p["mode"])]
    p.insert(0, "family", run.family)
    p.insert(0, "recipe", run.recipe)
    p.insert(0, "run", run.label)
    return p.sort_values(["probe", "mode", "stage"]).reset_index(drop=True)


def stage_points(run: Run, metrics: RunMetrics) -> pd.DataFrame:
    """The (x, y, z) of both comparisons for every stage >= 1 and every (probe, mode) of the run."""
    cols = ["run", "recipe", "family", "stage", "stage_name", "task", "probe", "mode", "probe_value",
            "probe_shift", "probe_step", "heldout_mean", "heldout_change", "heldout_step", "target_gain",
            "target_step"]
    if run.probes is None or not metrics.heldout:
        return pd.DataFrame(columns=cols)
    H, T = metrics.H, metrics.target_mean()
    stages = list(metrics.A.index)
    prev = dict(zip(stages[1:], stages[:-1]))
    tasks = run.stages["task"]
    rows = []
    for (probe, mode), g in run.probes.groupby(["probe", "mode"]):
        P = g.set_index("stage")["mean"]
        for s in stages[1:]:
            p = prev[s]
            if not {0, s, p} <= set(P.index):
                continue
            rows.append({"run": run.label, "recipe": run.recipe, "family": run.family, "stage": s,
                         "stage_name": metrics.stage_names[s], "task": tasks.get(s), "probe": probe,
                         "mode": mode, "probe_value": P[s], "probe_shift": P[s] - P[0],
                         "probe_step": P[s] - P[p], "heldout_mean": H[s], "heldout_change": H[s] - H[0],
                         "heldout_step": H[s] - H[p], "target_gain": T[s] - T[0], "target_step": T[s] - T[p]})
    return pd.DataFrame(rows, columns=cols)


def correlation_table(points: pd.DataFrame, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0,
                      level: float = 0.95) -> pd.DataFrame:
    """Every (probe, mode) x comparison x group (pooled over all runs, and each recipe) x method."""
    rows = []
    for (probe, mode), pm in points.groupby(["probe", "mode"], sort=True):
        groups = [("pooled", "", pm)] + [(f"recipe:{r}", r, g) for r, g in pm.groupby("recipe", sort=True)]
        for comparison, (xc, yc, zc) in COMPARISONS.items():
            for group, recipe, g in groups:
                for method in ("pearson", "spearman", "kendall", "partial_pearson", "partial_spearman"):
                    partial = method.startswith("partial")
                    res = correlate(g[xc], g[yc], method, z=g[zc] if partial else None, n_boot=n_boot,
                                    n_perm=n_perm, seed=seed, level=level)
                    rows.append({"probe": probe, "mode": mode, "comparison": comparison, "group": group,
                                 "recipe": recipe, "method": method, "control": zc if partial else "",
                                 **res, "n_boot": n_boot, "n_perm": n_perm, "seed": seed, "x": xc, "y": yc})
    return pd.DataFrame(rows, columns=CORRELATION_COLUMNS)


def recovery_table(run: Run, metrics: RunMetrics, min_change: float = 0.0) -> pd.DataFrame:
    """Recovery events of the run, one row per event and (probe, mode): the probe's value before and at
    the event's stage, its change in that stage and its shift from the base. Without probes, one row per
    event with empty probe columns."""
    ev = recovery_events(metrics.H, min_change)
    ev.insert(1, "stage_name", [metrics.stage_names[s] for s in ev["stage"]])
    ev.insert(2, "task", [run.stages["task"].get(s) for s in ev["stage"]])
    ev.insert(0, "recipe", run.recipe)
    ev.insert(0, "run", run.label)
    probe_cols = ["probe", "mode", "probe_prev", "probe_at", "probe_change", "probe_shift"]
    if run.probes is None or ev.empty:
        return ev.assign(**{c: None for c in probe_cols})
    rows = []
    for (probe, mode), g in run.probes.groupby(["probe", "mode"]):
        P = g.set_index("stage")["mean"]
        for _, e in ev.iterrows():
            s, p = e["stage"], e["prev_stage"]
            rows.append({**e.to_dict(), "probe": probe, "mode": mode, "probe_prev": P.get(p),
                         "probe_at": P.get(s), "probe_change": P.get(s) - P.get(p) if {s, p} <= set(P.index)
                         else None, "probe_shift": P.get(s) - P.get(0) if {s, 0} <= set(P.index) else None})
    return pd.DataFrame(rows)


def preferred_mode(modes) -> str | None:
    """The mode figures and summaries use when a probe has several: teacher-forced, then generate."""
    modes = list(dict.fromkeys(modes))
    for m in MODE_PREFERENCE:
        if m in modes:
            return m
    return modes[0] if modes else None
