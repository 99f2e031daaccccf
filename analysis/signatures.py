"""Which stage moves which task signature: the sig_<task>_mass probes of probes.parquet, stage by stage.

For a run, a signature probe S (the mass on task t's answer-token signature over the captions, probes
`--signatures`) and a stage s >= 1 trained on task u:
    step       = S[s] - S[s-1]                     (what stage s did to it)
    log2_step  = log2(S[s] / S[s-1])               (the same as a fold change; the figure's colour)
    shift      = S[s] - S[0],  log2_shift = log2(S[s] / S[0])
    own        = (t == u): the stage trained the signature's own task
    rank       = rank of log2_step among the run's signatures at stage s (1 = moved up the most)
`summary` keeps, per run and stage, the signature that moved most (largest |log2_step|) and where the own
task's signature ranked. The teacher-forced rows are used when a probe has both modes.
"""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .drift import preferred_mode
from .tables import Run

PREFIX, SUFFIX = "sig_", "_mass"
COLUMNS = ["run", "recipe", "stage", "stage_name", "task", "signature", "signature_task", "value", "prev", "base",
           "step", "log2_step", "shift", "log2_shift", "own", "rank"]


def _set_name(task: str) -> str:
    """probes.signatures.set_name (the probe names' task part), repeated here: analysis imports no probes."""
    return PREFIX + (re.sub(r"[^a-z0-9_]+", "_", str(task).lower()).strip("_") or "task")


def signature_moves(run: Run) -> pd.DataFrame:
    """One row per (stage >= 1, signature) of the run (empty when it has no signature probes)."""
    if run.probes is None:
        return pd.DataFrame(columns=COLUMNS)
    p = run.probes[run.probes["probe"].str.startswith(PREFIX) & run.probes["probe"].str.endswith(SUFFIX)]
    if p.empty:
        return pd.DataFrame(columns=COLUMNS)
    tasks = {_set_name(t): t for t in list(run.manifest.get("tasks") or []) + list(run.stages["task"].dropna())}
    rows = []
    for probe, g in p.groupby("probe"):
        g = g[g["mode"] == preferred_mode(g["mode"])].set_index("stage")["mean"].sort_index()
        sig = probe[:-len(SUFFIX)]
        sig_task = tasks.get(sig, sig[len(PREFIX):])
        stages = list(g.index)
        for prev, s in zip(stages, stages[1:]):
            if s == 0 or 0 not in g.index:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                l2s, l2b = np.log2(g[s] / g[prev]), np.log2(g[s] / g[0])
            task = run.stages["task"].get(s)
            rows.append({"run": run.label, "recipe": run.recipe, "stage": s,
                         "stage_name": run.stages["name"].get(s, str(s)), "task": task, "signature": probe,
                         "signature_task": sig_task, "value": g[s], "prev": g[prev], "base": g[0],
                         "step": g[s] - g[prev], "log2_step": l2s, "shift": g[s] - g[0], "log2_shift": l2b,
                         "own": task is not None and sig_task == task})
    out = pd.DataFrame(rows, columns=COLUMNS[:-1])
    out["rank"] = out.groupby("stage")["log2_step"].rank(ascending=False, method="min").astype(int)
    return out.sort_values(["stage", "rank"]).reset_index(drop=True)[COLUMNS]


def summary(moves: pd.DataFrame) -> pd.DataFrame:
    """Per run and stage: the signature that moved most, by how much, and the rank of the own task's."""
    rows = []
    for (run, stage), g in moves.groupby(["run", "stage"], sort=True):
        top = g.loc[g["log2_step"].abs().idxmax()]
        own = g[g["own"]]
        rows.append({"run": run, "recipe": top["recipe"], "stage": stage, "stage_name": top["stage_name"],
                     "task": top["task"], "most_moved": top["signature_task"], "most_moved_log2_step": top["log2_step"],
                     "own_log2_step": own["log2_step"].iloc[0] if len(own) else np.nan,
                     "own_rank": int(own["rank"].iloc[0]) if len(own) else None, "n_signatures": len(g)})
    return pd.DataFrame(rows)


def figure(moves: pd.DataFrame):
    """Per recipe (mean over its runs): a heatmap of log2_step, rows = the stage (task trained), columns =
    the signature's task; boxes mark the own-task cells."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    from .figures import recipe_palette

    recipes = list(recipe_palette(moves["recipe"]))
    fig, axes = plt.subplots(1, len(recipes), figsize=(4.2 * len(recipes) + 1, 3.6), squeeze=False)
    lim = float(np.nanmax(np.abs(moves["log2_step"].replace([np.inf, -np.inf], np.nan)))) or 1.0
    for ax, recipe in zip(axes[0], recipes):
        g = moves[moves["recipe"] == recipe]
        g = g.assign(row=g["stage"].astype(str) + " " + g["stage_name"].astype(str))
        m = g.pivot_table(index="row", columns="signature_task", values="log2_step", aggfunc="mean")
        m = m.loc[sorted(m.index, key=lambda r: int(r.split()[0]))]
        sns.heatmap(m, ax=ax, cmap="RdBu_r", center=0, vmin=-lim, vmax=lim, annot=True, fmt=".2f",
                    cbar=ax is axes[0][-1], cbar_kws={"label": "log2 S[s] / S[s-1]"})
        for i, r in enumerate(m.index):
            name = r.split(" ", 1)[1]
            if name in m.columns:
                ax.add_patch(plt.Rectangle((list(m.columns).index(name), i), 1, 1, fill=False, lw=2, ec="k"))
        ax.set_yticklabels(ax.get_yticklabels(), rotation=0)
        ax.set_title(recipe)
        ax.set_xlabel("signature of task")
        ax.set_ylabel("stage (task trained)" if ax is axes[0][0] else "")
    fig.suptitle("Which stage moves which task signature (mass on the signature over captions)")
    fig.tight_layout()
    return fig
