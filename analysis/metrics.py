"""The study's metrics on the accuracy matrix, as docs/metrics.md defines them.

Notation: A[s, b] is the score (0-100) of benchmark b after stage s; s = 0 is the base model and L the
last stage evaluated. Held-out benchmarks are never trained on; each target benchmark t is trained by
one stage s(t) (the stage whose `task` names it). H[s] is the mean of A[s, b] over held-out b.
All differences are in percentage points (pp). Signs: a negative change, BWT or target forgetting is
forgetting; max-minus-last forgetting is positive when something was forgotten (its usual convention).
"""
from __future__ import annotations

import warnings

import numpy as np
import pandas as pd

from probes.schemas import TableError
from training.manifest import names_task

from .tables import Run


# --- the accuracy matrix ----------------------------------------------------------------------------
def accuracy_matrix(evals: pd.DataFrame, source: str = "evals.parquet") -> pd.DataFrame:
    """A[s, b]: rows are stages (sorted), columns benchmarks. A benchmark not scored at every stage
    cannot be compared across stages: it is dropped with a warning naming it."""
    A = evals.pivot(index="stage", columns="benchmark", values="score").sort_index()
    if 0 not in A.index:
        raise TableError(f"{source}: no scores for stage 0 (the base model); every change is measured from it")
    incomplete = [b for b in A.columns if A[b].isna().any()]
    if incomplete:
        warnings.warn(f"{source}: benchmarks {incomplete} lack scores at some stages; left out", stacklevel=2)
        A = A.drop(columns=incomplete)
    A.columns.name = "benchmark"
    return A


def link_targets(target_benchmarks, stages: pd.DataFrame) -> dict[str, int]:
    """benchmark -> the stage that trains it: the first stage whose `task` equals the benchmark's name;
    failing that, the first whose task it names by a suffix (training.manifest.names_task: task "textvqa",
    benchmark "textvqa_val"). Unlinked targets are left out of the target metrics with a warning."""
    trained = [(int(i), str(t)) for i, t in zip(stages["index"], stages["task"]) if i != 0 and t]
    linked, unlinked = {}, []
    for b in target_benchmarks:
        hit = next((i for i, t in trained if t == b), None)
        if hit is None:
            hit = next((i for i, t in trained if names_task(b, t)), None)
        if hit is None:
            unlinked.append(b)
        else:
            linked[b] = hit
    if unlinked:
        warnings.warn(f"target benchmarks {unlinked} match no stage's task; left out of the target metrics",
                      stacklevel=2)
    return linked


# --- held-out ---------------------------------------------------------------------------------------
def heldout_mean(A: pd.DataFrame, heldout) -> pd.Series:
    """H[s] = mean over held-out b of A[s, b]."""
    heldout = list(heldout)
    if not heldout:
        return pd.Series(np.nan, index=A.index, name="heldout_mean")
    return A[heldout].mean(axis=1).rename("heldout_mean")


def heldout_change(A: pd.DataFrame, heldout) -> pd.Series:
    """Held-out forgetting at stage s: H[s] - H[0] = mean over held-out b of (A[s, b] - A[0, b])."""
    H = heldout_mean(A, heldout)
    return (H - H.loc[0]).rename("heldout_change")


def heldout_max_minus_last(A: pd.DataFrame, heldout) -> pd.Series:
    """Per held-out b: max over s in 0..L-1 of A[s, b], minus A[L, b] (the base counts: it is a real
    score for a benchmark never trained). Positive = ended below its best."""
    before = A.iloc[:-1]
    return (before[list(heldout)].max() - A[list(heldout)].iloc[-1]).rename("heldout_max_minus_last")


# --- targets ----------------------------------------------------------------------------------------
def target_learning(A: pd.DataFrame, targets: dict[str, int]) -> pd.Series:
    """Per target t: A[s(t), t] - A[0, t] (what training on t taught, measured right after)."""
    return pd.Series({t: A.at[s, t] - A.at[0, t] for t, s in targets.items() if s in A.index},
                     name="target_learning", dtype=float)


def target_forgetting(A: pd.DataFrame, targets: dict[str, int]) -> pd.Series:
    """Per target t: A[L, t] - A[s(t), t] (negative = lost after training on it)."""
    last = A.index[-1]
    return pd.Series({t: A.at[last, t] - A.at[s, t] for t, s in targets.items() if s in A.index},
                     name="target_forgetting", dtype=float)


def target_overall(A: pd.DataFrame, targets: dict[str, int]) -> float:
    """Mean over targets t of A[L, t] - A[0, t] (what the whole sequence leaves learned)."""
    if not targets:
        return float("nan")
    return float((A[list(targets)].iloc[-1] - A[list(targets)].loc[0]).mean())


def bwt(A: pd.DataFrame, targets: dict[str, int]) -> float:
    """Backward transfer (Lopez-Paz & Ranzato 2017, GEM): mean over targets t trained before the last
    stage of A[L, t] - A[s(t), t]. Negative = forgetting of earlier targets."""
    last = A.index[-1]
    diffs = [A.at[last, t] - A.at[s, t] for t, s in targets.items() if s in A.index and s < last]
    return float(np.mean(diffs)) if diffs else float("nan")


def fwt(A: pd.DataFrame, targets: dict[str, int]) -> float:
    """Forward transfer (GEM), with the base model as the reference instead of a random init: mean over
    targets t not trained first of A[s(t) - 1, t] - A[0, t] (what earlier stages did to t before it was
    trained). The stage before s(t) is the previous evaluated stage."""
    first = min(targets.values(), default=None)
    diffs = []
    for t, s in targets.items():
        before = A.index[A.index < s]
        if s != first and len(before):
            diffs.append(A.at[before[-1], t] - A.at[0, t])
    return float(np.mean(diffs)) if diffs else float("nan")


def max_minus_last_forgetting(A: pd.DataFrame, targets: dict[str, int]) -> pd.Series:
    """Per target t trained before the last stage (Chaudhry et al. 2018, RWalk): max over stages
    s in 1..L-1 of A[s, t], minus A[L, t]. Positive = forgotten. The run's value is the mean."""
    last = A.index[-1]
    middle = A.loc[(A.index >= 1) & (A.index < last)]
    out = {t: middle[t].max() - A.at[last, t] for t, s in targets.items() if s < last and len(middle)}
    return pd.Series(out, name="max_minus_last_forgetting", dtype=float)


# --- recovery ---------------------------------------------------------------------------------------
def recovery_events(H: pd.Series, min_change: float = 0.0) -> pd.DataFrame:
    """Stages s where the held-out mean rises from the previous stage while it was below the base there:
    H[s-1] < H[0] - min_change and H[s] > H[s-1] + min_change. `recovered_fraction` is the rise over the
    deficit it starts from, (H[s] - H[s-1]) / (H[0] - H[s-1]) (above 1: it ended above the base)."""
    rows = []
    stages = list(H.index)
    for prev, s in zip(stages[:-1], stages[1:]):
        deficit = H.loc[0] - H.loc[prev]
        rise = H.loc[s] - H.loc[prev]
        if deficit > min_change and rise > min_change:
            rows.append({"stage": s, "prev_stage": prev, "heldout_base": H.loc[0], "heldout_prev": H.loc[prev],
                         "heldout": H.loc[s], "rise": rise, "deficit_prev": deficit,
                         "recovered_fraction": rise / deficit})
    cols = ["stage", "prev_stage", "heldout_base", "heldout_prev", "heldout", "rise", "deficit_prev",
            "recovered_fraction"]
    return pd.DataFrame(rows, columns=cols)


# --- one run, everything ----------------------------------------------------------------------------
class RunMetrics:
    """The accuracy matrix of one run and every metric on it (see the module docstring)."""

    def __init__(self, run: Run):
        self.run = run
        source = str(run.path / "evals.parquet")
        self.A = accuracy_matrix(run.evals, source)
        split = run.evals.drop_duplicates("benchmark").set_index("benchmark")["split"]
        self.heldout = [b for b in self.A.columns if split[b] == "heldout"]
        target_cols = [b for b in self.A.columns if split[b] == "target"]
        self.targets = link_targets(target_cols, run.stages)
        self.target_benchmarks = target_cols
        self.H = heldout_mean(self.A, self.heldout)
        names = run.stages["name"]
        self.stage_names = pd.Series({s: names.get(s, str(s)) for s in self.A.index}, name="stage_name")

    def target_mean(self) -> pd.Series:
        if not self.target_benchmarks:
            return pd.Series(np.nan, index=self.A.index, name="target_mean")
        return self.A[self.target_benchmarks].mean(axis=1).rename("target_mean")

    def scalars(self) -> dict[str, float]:
        A, T = self.A, self.targets
        dH = self.H - self.H.loc[0]
        learn = target_learning(A, T)
        return {
            "target_overall": target_overall(A, T),
            "target_learning_mean": float(learn.mean()) if len(learn) else float("nan"),
            "heldout_change_final": float(dH.iloc[-1]),
            "heldout_change_min": float(dH.min()),
            "bwt": bwt(A, T),
            "fwt": fwt(A, T),
            "max_minus_last_forgetting": float(max_minus_last_forgetting(A, T).mean()),
            "heldout_max_minus_last": float(heldout_max_minus_last(A, self.heldout).mean())
            if self.heldout else float("nan"),
            "recovery_events": float(len(recovery_events(self.H))),
        }

    def long(self) -> pd.DataFrame:
        """metrics.csv rows for this run: run, family, recipe, metric, stage, stage_name, benchmark, value."""
        rows = []

        def add(metric, value, stage=None, benchmark=None):
            rows.append({"metric": metric, "stage": stage,
                         "stage_name": self.stage_names.get(stage) if stage is not None else None,
                         "benchmark": benchmark, "value": float(value)})

        for s in self.A.index:
            for b in self.A.columns:
                add("accuracy", self.A.at[s, b], s, b)
        dH, T = self.H - self.H.loc[0], self.target_mean()
        for s in self.A.index:
            add("heldout_mean", self.H.loc[s], s)
            add("heldout_change", dH.loc[s], s)
            add("target_mean", T.loc[s], s)
        last = self.A.index[-1]
        for t, v in target_learning(self.A, self.targets).items():
            add("target_learning", v, self.targets[t], t)
        for t, v in target_forgetting(self.A, self.targets).items():
            add("target_forgetting", v, last, t)
        for t, v in max_minus_last_forgetting(self.A, self.targets).items():
            add("max_minus_last_forgetting", v, last, t)
        if self.heldout:
            for b, v in heldout_max_minus_last(self.A, self.heldout).items():
                add("heldout_max_minus_last", v, last, b)
        for k, v in self.scalars().items():
            add(k, v)
        out = pd.DataFrame(rows)
        out.insert(0, "recipe", self.run.recipe)
        out.insert(0, "family", self.run.family)
        out.insert(0, "run", self.run.label)
        out["stage"] = out["stage"].astype("Int64")
        return out
