"""Figures for a paper: each function takes an Analysis and returns a matplotlib Figure."""
from __future__ import annotations

import sys

import matplotlib

if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")  # files only, no display needed; notebooks keep their inline backend
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from .drift import preferred_mode  # noqa: E402

# Recipes in the order the study discusses them; others follow alphabetically.
RECIPE_ORDER = ["full", "llm", "vision", "projector", "mlp", "mlp_gate_up", "mlp_down", "sa_proj", "sa_qkv"]
PROBE_LABELS = {"number_mass": "number-token probability mass"}
METHOD_SYMBOL = {"pearson": "Pearson r", "spearman": "Spearman ρ", "kendall": "Kendall τ"}

sns.set_theme(context="paper", style="whitegrid", font_scale=1.1)


def close(fig) -> None:
    plt.close(fig)


def recipe_palette(recipes) -> dict[str, tuple]:
    names = sorted(set(recipes), key=lambda r: (RECIPE_ORDER.index(r) if r in RECIPE_ORDER else len(RECIPE_ORDER), r))
    colours = sns.color_palette("colorblind", max(len(names), 1))
    return {r: colours[i % len(colours)] for i, r in enumerate(names)}


def _stage_ticks(ax, an) -> None:
    """Stage indices on the x axis, labelled with the first run's stage names ("1\\ncub")."""
    names = an.curves.drop_duplicates("stage").set_index("stage")["stage_name"].sort_index()
    ax.set_xticks(list(names.index))
    ax.set_xticklabels([f"{s}\n{n}" for s, n in names.items()])
    ax.set_xlabel("stage (task trained at that stage)")


def probe_label(probe: str) -> str:
    return PROBE_LABELS.get(probe, probe)


def learning_vs_forgetting(an, x: str = "target_overall"):
    """The paper's first figure, left: target learning (x) against held-out change (y), per recipe
    (mean over the runs of a recipe, +- one standard deviation when there are several)."""
    s = an.summary
    pal = recipe_palette(s["recipe"])
    g = s.groupby("recipe").agg(mx=(x, "mean"), my=("heldout_change_final", "mean"),
                               sx=(x, "std"), sy=("heldout_change_final", "std"), n=("run", "count"))
    fig, ax = plt.subplots(figsize=(6.2, 4.8))
    for recipe in pal:
        r = g.loc[recipe]
        several = r["n"] > 1
        ax.errorbar(r["mx"], r["my"], xerr=r["sx"] if several else None, yerr=r["sy"] if several else None,
                    fmt="o", ms=9, color=pal[recipe], capsize=3, label=f"{recipe} (runs: {int(r['n'])})")
        ax.annotate(recipe, (r["mx"], r["my"]), xytext=(6, 5), textcoords="offset points", fontsize=10)
    ax.axhline(0, color="0.4", lw=0.8, ls="--")
    ax.axvline(0, color="0.4", lw=0.8, ls="--")
    xlabel = {"target_overall": "target learning: mean over targets of A[last, t] − A[0, t] (pp)",
              "target_learning_mean": "target learning: mean over targets of A[s(t), t] − A[0, t] (pp)"}
    ax.set_xlabel(xlabel.get(x, f"{x} (pp)"))
    ax.set_ylabel("held-out change: H[last] − H[0] (pp)")
    ax.set_title("Learning vs held-out forgetting per recipe")
    ax.legend(title="recipe (runs)", fontsize=8, loc="best")
    ax.margins(0.15)
    fig.tight_layout()
    return fig


def heldout_over_sequence(an):
    """The paper's first figure, right: held-out average score after each stage, one line per recipe
    (mean over runs, band = +- one standard deviation when a recipe has several runs). For runs with
    per-item scores, error bars: the paired-bootstrap 95% interval of the change from the base."""
    c = an.curves
    pal = recipe_palette(c["recipe"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    style = "family" if c["family"].nunique() > 1 else None
    sns.lineplot(data=c, x="stage", y="heldout_mean", hue="recipe", style=style, palette=pal, marker="o",
                 errorbar="sd", ax=ax, hue_order=list(pal))
    _change_intervals(ax, c, pal)
    _stage_ticks(ax, an)
    ax.set_ylabel("held-out average score (0-100)")
    ax.set_title("Held-out average over the sequence")
    ax.legend(title="recipe", fontsize=8)
    fig.tight_layout()
    return fig


def _change_intervals(ax, curves, pal) -> None:
    """Error bars at each run's points: the interval of H[s] - H[0] moved onto the score axis (H[0] + CI),
    drawn about the point (a benchmark aggregated other than as its items' mean shifts it a little)."""
    if "heldout_change_ci_low" not in curves:
        return
    c = curves.dropna(subset=["heldout_change_ci_low", "heldout_change_ci_high"])
    for (recipe, _), g in c.groupby(["recipe", "run"], sort=False):
        base = g["heldout_mean"] - g["heldout_change"]
        low = (g["heldout_mean"] - (base + g["heldout_change_ci_low"])).clip(lower=0)
        high = (base + g["heldout_change_ci_high"] - g["heldout_mean"]).clip(lower=0)
        ax.errorbar(g["stage"], g["heldout_mean"], yerr=[low, high], fmt="none", ecolor=pal[recipe], capsize=3,
                    lw=1)


def _without_signatures(table):
    """Task-signature probes (sig_*) have their own figure (analysis.drift_report); one panel or figure for
    each would bury the others. Their correlations stay in correlations.csv."""
    return table[~table["probe"].str.startswith("sig_")]


def probe_over_sequence(an):
    """Each probe's mean after each stage with its confidence interval (from probes.parquet), one line
    per run, coloured by recipe; one panel per (probe, mode)."""
    p = _without_signatures(an.probes)
    keys = list(p.groupby(["probe", "mode"]).groups)
    pal = recipe_palette(p["recipe"])
    ncol = min(2, len(keys))
    nrow = int(np.ceil(len(keys) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.5 * ncol, 4.2 * nrow), squeeze=False)
    runs = list(dict.fromkeys(p["run"]))
    for ax, (probe, mode) in zip(axes.flat, keys):
        d = p[(p["probe"] == probe) & (p["mode"] == mode)]
        seen = set()
        for i, run in enumerate(runs):
            r = d[d["run"] == run].sort_values("stage")
            if r.empty:
                continue
            recipe = r["recipe"].iloc[0]
            dodge = (i - (len(runs) - 1) / 2) * 0.04  # keep overlapping error bars apart
            yerr = np.vstack([r["mean"] - r["ci_low"], r["ci_high"] - r["mean"]]).clip(min=0)
            ax.errorbar(r["stage"] + dodge, r["mean"], yerr=yerr, marker="o", ms=4, capsize=2,
                        color=pal[recipe], label=recipe if recipe not in seen else None)
            seen.add(recipe)
        _stage_ticks(ax, an)
        ax.set_ylabel(probe_label(probe))
        ax.set_title(f"{probe} ({mode}) over the sequence")
        ax.legend(title="recipe", fontsize=8)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    fig.suptitle("Probe value after each stage (error bars: the probe's CI)")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title above the panels
    return fig


def _stats_text(an, probe, mode, comparison) -> str:
    c = an.correlations
    c = c[(c["probe"] == probe) & (c["mode"] == mode) & (c["comparison"] == comparison) & (c["group"] == "pooled")]
    lines = []
    for method, symbol in METHOD_SYMBOL.items():
        r = c[c["method"] == method]
        if len(r):
            r = r.iloc[0]
            lines.append(f"{symbol} = {r.estimate:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}], p = {r.p_value:.3g}")
    r = c[c["method"] == "partial_spearman"]
    if len(r):
        lines.append(f"partial ρ | target gain = {r.iloc[0].estimate:+.2f}")
    n = int(c["n"].iloc[0]) if len(c) else 0
    return "\n".join(lines + [f"n = {n} stages (95% bootstrap CI, permutation p)"])


def probe_vs_heldout(an, probe: str | None = None, mode: str | None = None):
    """Probe shift against held-out change, pooled over runs: vs the base (left) and stage to stage
    (right), with the least-squares line, its 95% band, and the correlations with CIs."""
    if probe is None:
        probe, mode = an.primary()
    mode = mode or preferred_mode(an.points.loc[an.points["probe"] == probe, "mode"])
    d = an.points[(an.points["probe"] == probe) & (an.points["mode"] == mode)]
    pal = recipe_palette(d["recipe"])
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 5))
    panels = [("vs_base", "probe_shift", "heldout_change", "vs the base model",
               f"{probe} shift: P[s] − P[0]", "held-out change: H[s] − H[0] (pp)"),
              ("stage_to_stage", "probe_step", "heldout_step", "stage to stage",
               f"{probe} change in the stage: P[s] − P[s−1]", "held-out change in the stage: H[s] − H[s−1] (pp)")]
    for ax, (comp, xc, yc, title, xl, yl) in zip(axes, panels):
        if len(d) >= 2 and d[xc].nunique() > 1:
            sns.regplot(data=d, x=xc, y=yc, scatter=False, ax=ax, color="0.3", seed=0, ci=95,
                        line_kws={"lw": 1.2}, n_boot=500)
        sns.scatterplot(data=d, x=xc, y=yc, hue="recipe", palette=pal, hue_order=list(pal), s=55, ax=ax,
                        edgecolor="white")
        ax.axhline(0, color="0.5", lw=0.7, ls=":")
        ax.axvline(0, color="0.5", lw=0.7, ls=":")
        unit = " (probability mass)" if probe == "number_mass" else ""
        ax.set_xlabel(xl + unit)
        ax.set_ylabel(yl)
        ax.set_title(f"{probe} ({mode}) vs held-out change, {title}")
        ax.text(0.02, 0.02, _stats_text(an, probe, mode, comp), transform=ax.transAxes, fontsize=8,
                va="bottom", ha="left", bbox={"boxstyle": "round", "fc": "white", "ec": "0.7", "alpha": 0.9})
        ax.legend(title="recipe", fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def accuracy_heatmap(an, run_label: str):
    """A[s, b] of one run (left, 0-100) and A[s, b] − A[0, b] (right, pp); targets in training order,
    then held-out benchmarks, split by a line."""
    m = an.metrics[run_label]
    run = m.run
    targets = sorted(m.target_benchmarks, key=lambda b: (m.targets.get(b, 10**9), b))
    cols = targets + sorted(m.heldout)
    A = m.A[cols]
    rows = [f"{s} {m.stage_names[s]}" for s in A.index]
    delta = A - A.loc[0]
    width = max(8, 0.75 * len(cols) * 2 + 3)
    fig, axes = plt.subplots(1, 2, figsize=(width, 0.5 * len(rows) + 2.6))
    annot = len(cols) <= 16
    lim = max(1.0, float(np.nanmax(np.abs(delta.values))))
    sns.heatmap(pd.DataFrame(A.values, rows, cols), ax=axes[0], vmin=0, vmax=100, cmap="viridis", annot=annot,
                fmt=".1f", annot_kws={"fontsize": 7}, cbar_kws={"label": "score (0-100)"})
    sns.heatmap(pd.DataFrame(delta.values, rows, cols), ax=axes[1], vmin=-lim, vmax=lim, cmap="RdBu",
                center=0, annot=annot, fmt="+.1f", annot_kws={"fontsize": 7},
                cbar_kws={"label": "change vs base (pp)"})
    for ax, title in zip(axes, ["A[s, b]: score after each stage", "A[s, b] − A[0, b]: change vs base"]):
        if targets and m.heldout:
            ax.axvline(len(targets), color="white" if ax is axes[0] else "black", lw=2.5)
        ax.set_xlabel(f"benchmark (targets: {len(targets)} | held-out: {len(m.heldout)})")
        ax.set_ylabel("stage")
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=45)
        ax.tick_params(axis="y", rotation=0)
        for lab in ax.get_xticklabels():
            lab.set_horizontalalignment("right")
    fig.suptitle(f"Accuracy matrix of {run_label} (recipe {run.recipe}, {run.family})")
    fig.tight_layout()
    return fig


def all_figures(an):
    """(file stem, Figure) for everything analysis.run writes; probe figures only when probes exist."""
    yield "learning_vs_forgetting", learning_vs_forgetting(an)
    yield "heldout_over_sequence", heldout_over_sequence(an)
    if not an.probes.empty:
        yield "probe_over_sequence", probe_over_sequence(an)
        for probe, mode in _without_signatures(an.points).groupby(["probe", "mode"]).groups:
            yield f"probe_vs_heldout_{probe}_{mode}", probe_vs_heldout(an, probe, mode)
    for label in an.metrics:
        yield f"accuracy_matrix_{label}", accuracy_heatmap(an, label)
