"""Paired comparisons of checkpoints on the same items (RUN/items.parquet), so that a change in a benchmark
score comes with its uncertainty.

For each run, benchmark and stage s > 0, against the base (stage 0) and against the previous stage: the
items both stages scored (matched by item_id), the mean per-item difference (stage s minus the other, in
percentage points), a seeded paired-bootstrap 95% interval of it (items resampled with replacement, the
percentile interval), and where every score is 0 or 1 the exact McNemar p-value (two-sided binomial test on
the discordant pairs). Identical checkpoints give a difference of 0 with an interval [0, 0] and p = 1.

`mean_change_interval` bounds a mean over several benchmarks (the held-out change H[s] - H[0]): each
benchmark's items are resampled on their own (a stratified paired bootstrap), the mean over benchmarks of
their mean differences taken per resample; for one benchmark it is paired_difference's interval.
`metric_intervals` gives these for the rows of metrics.csv that compare a stage with the base.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from probes.schemas import ITEMS, TableError

COLUMNS = ("run", "benchmark", "stage", "against", "against_stage", "n", "mean_diff", "ci_low", "ci_high",
           "mcnemar_p")


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p for paired 0/1 outcomes: binomial test of the discordant pairs at 1/2."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue)


def paired_difference(before, after, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """mean(after - before) in percentage points, its paired-bootstrap interval, McNemar p if binary."""
    before, after = np.asarray(before, float), np.asarray(after, float)
    if before.shape != after.shape or before.size == 0:
        raise ValueError("paired scores must be two equally long, non-empty sequences")
    diff = 100.0 * (after - before)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(n_boot, diff.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    binary = bool(np.isin(before, (0.0, 1.0)).all() and np.isin(after, (0.0, 1.0)).all())
    return {"n": int(diff.size), "mean_diff": float(diff.mean()), "ci_low": float(np.percentile(means, tail)),
            "ci_high": float(np.percentile(means, 100 - tail)),
            "mcnemar_p": mcnemar_exact(before, after) if binary else float("nan")}


def _paired_items(items: pd.DataFrame, bench: str, stage: int, other: int) -> np.ndarray | None:
    """100 x (score at `stage` - score at `other`) of the items of `bench` both stages scored; None: none."""
    g = items[items["benchmark"] == bench]
    a = g[g["stage"] == other].set_index("item_id")["score"]
    b = g[g["stage"] == stage].set_index("item_id")["score"]
    both = pd.concat([a, b], axis=1, join="inner").dropna()
    return 100.0 * (both.iloc[:, 1] - both.iloc[:, 0]).to_numpy(float) if len(both) else None


def mean_change_interval(items: pd.DataFrame, benchmarks, stage: int, other: int, n_boot: int = 2000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Paired-bootstrap interval (pp) of the mean over `benchmarks` of their mean item difference between
    `stage` and `other`; (nan, nan) when a benchmark has no items scored at both (the mean is not bounded
    by the items of the others)."""
    diffs = [_paired_items(items, b, stage, other) for b in benchmarks]
    if not diffs or any(d is None for d in diffs):
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.mean([d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1) for d in diffs], axis=0)
    tail = 100 * (1 - level) / 2
    return float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def metric_intervals(items: pd.DataFrame, stages, heldout, targets: dict[str, int], n_boot: int = 2000,
                     seed: int = 0) -> dict[tuple, tuple[float, float]]:
    """(metric, stage, benchmark) -> (ci_low, ci_high) for metrics.csv's comparisons with the base:
    heldout_change per stage > 0 and heldout_change_final (over the held-out benchmarks), and
    target_learning per target (its benchmark at its stage vs the base)."""
    stages = sorted(stages)
    out = {}
    for s in stages[1:]:
        out[("heldout_change", s, None)] = mean_change_interval(items, heldout, s, stages[0], n_boot, seed)
    if len(stages) > 1:
        out[("heldout_change_final", None, None)] = out[("heldout_change", stages[-1], None)]
    for t, s in targets.items():
        out[("target_learning", s, t)] = mean_change_interval(items, [t], s, stages[0], n_boot, seed)
    return out


def compare_stages(items: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """One row per (run, benchmark, stage > 0, against base / previous); see the module doc."""
    rows = []
    for (run, bench), g in items.groupby(["run", "benchmark"], sort=True):
        by_stage = {s: sg.set_index("item_id")["score"] for s, sg in g.groupby("stage")}
        stages = sorted(by_stage)
        for i, s in enumerate(stages[1:], 1):
            for against, other in (("base", stages[0]), ("previous", stages[i - 1])):
                if against == "previous" and other == stages[0]:
                    continue   # the same comparison as against the base
                both = pd.concat([by_stage[other], by_stage[s]], axis=1, join="inner").dropna()
                if not len(both):
                    continue
                stats = paired_difference(both.iloc[:, 0], both.iloc[:, 1], n_boot, seed)
                rows.append({"run": run, "benchmark": bench, "stage": s, "against": against,
                             "against_stage": other, **stats})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def compare_runs(run_dirs, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """compare_stages over the runs that have an items.parquet (written by probes.evaluate)."""
    tables = []
    for d in run_dirs:
        path = Path(d) / ITEMS.file
        if path.exists():
            df = pd.read_parquet(path)
            missing = [c for c in ITEMS.columns if c not in df.columns]
            if missing:
                raise TableError(f"{path}: not an item table (lacks columns {missing})")
            tables.append(df)
    return compare_stages(pd.concat(tables), n_boot, seed) if tables else pd.DataFrame(columns=list(COLUMNS))
