"""Self-attention vs MLP write-back per layer, per recipe, from RUN/layers.parquet (probes.layers).

`sa_vs_mlp(table, measure)`: one row per (recipe, layer): the attn and mlp values of `measure` averaged
over the recipe's runs and its stages >= 1, their ratio mlp / attn, and the share of the layer's total
that the MLP writes (mlp / (attn + mlp), for the non-negative measures logit_l2 and resid_l2).
`figure(table, measure)`: a panel per recipe, x = layer, one line per component (mean over stages, thick)
and one thin line per stage.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from probes.schemas import LAYERS, TableError

from .tables import read_table

MEASURE_LABELS = {"logit_l2": "logit-space change (L2, centred)", "number_logit": "number-token logit change",
                  "number_logmass": "number-token log-mass change (linearised)", "resid_l2": "residual write change (L2)"}


def load_layers(run_dirs, labels=None) -> pd.DataFrame:
    """The layers.parquet tables of the runs that have one, with a `run` label per run directory."""
    frames = []
    for i, d in enumerate(run_dirs):
        path = Path(d) / LAYERS.file
        if not path.is_file():
            continue
        t = read_table(path, LAYERS.columns)
        t["run"] = labels[i] if labels else Path(d).name
        frames.append(t)
    if not frames:
        return pd.DataFrame(columns=list(LAYERS.columns))
    return pd.concat(frames, ignore_index=True)


def sa_vs_mlp(table: pd.DataFrame, measure: str = "logit_l2") -> pd.DataFrame:
    t = table[(table["measure"] == measure) & (table["stage"] > 0)]
    if t.empty:
        return pd.DataFrame(columns=["recipe", "layer", "attn", "mlp", "mlp_over_attn", "mlp_share", "n_points"])
    per_run = t.groupby(["recipe", "run", "layer", "component"])["mean"].mean().reset_index()
    wide = per_run.pivot_table(index=["recipe", "layer"], columns="component", values="mean", aggfunc="mean")
    n = t.groupby(["recipe", "layer"]).size().rename("n_points")
    out = wide.join(n).reset_index()
    for c in ("attn", "mlp"):
        if c not in out:
            out[c] = np.nan
    with np.errstate(divide="ignore", invalid="ignore"):
        out["mlp_over_attn"] = out["mlp"] / out["attn"]
        out["mlp_share"] = out["mlp"] / (out["attn"] + out["mlp"]) if measure in ("logit_l2", "resid_l2") else np.nan
    return out[["recipe", "layer", "attn", "mlp", "mlp_over_attn", "mlp_share", "n_points"]]


def figure(table: pd.DataFrame, measure: str = "logit_l2"):
    import matplotlib.pyplot as plt

    from .figures import recipe_palette

    t = table[(table["measure"] == measure) & (table["stage"] > 0)]
    if t.empty:
        raise TableError(f"no {measure} rows for stages >= 1 in the layer tables")
    recipes = list(recipe_palette(t["recipe"]))
    fig, axes = plt.subplots(1, len(recipes), figsize=(4.0 * len(recipes) + 0.5, 3.4), squeeze=False, sharey=True)
    style = {"attn": ("tab:blue", "o", "self-attention out"), "mlp": ("tab:red", "s", "MLP out (write-back)"),
             "xattn": ("tab:purple", "^", "cross-attention out"),
             "linear_attn": ("tab:green", "D", "linear attention out")}
    for ax, recipe in zip(axes[0], recipes):
        g = t[t["recipe"] == recipe]
        for comp, (colour, marker, label) in style.items():
            if comp not in ("attn", "mlp") and not (g["component"] == comp).any():
                continue      # the kinds only some models have (Mllama, Qwen3.5)
            c = g[g["component"] == comp]
            for _, s in c.groupby(["run", "stage"]):
                s = s.sort_values("layer")
                ax.plot(s["layer"], s["mean"], color=colour, lw=0.6, alpha=0.35)
            m = c.groupby("layer")["mean"].mean()
            ax.plot(m.index, m.values, color=colour, lw=2.2, marker=marker, label=label)
        ax.set_title(recipe)
        ax.set_xlabel("decoder layer")
        ax.axhline(0, color="0.6", lw=0.6)
        layers = sorted(g["layer"].unique())
        ax.set_xticks(layers)
    axes[0][0].set_ylabel(MEASURE_LABELS.get(measure, measure))
    axes[0][-1].legend(fontsize=8, loc="best")
    fig.suptitle(f"Checkpoint minus base, per layer: self-attention vs MLP ({measure}; thin: each stage)")
    fig.tight_layout()
    return fig
