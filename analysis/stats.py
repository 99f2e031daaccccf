"""Correlation estimates with seeded bootstrap confidence intervals and permutation p-values.

The statistics are vectorised along the last axis so that thousands of resamples cost one array
operation; tests check them against scipy.stats. Resampling is done here rather than with
scipy.stats.bootstrap because small samples (five stages of one recipe) produce resamples with a
constant variable, whose correlation is undefined: those are dropped, where scipy would return NaN.
"""
from __future__ import annotations

import math
from itertools import permutations

import numpy as np
from scipy.stats import rankdata

METHODS = ("pearson", "spearman", "kendall", "partial_pearson", "partial_spearman")


def pearson(x, y):
    """Pearson r along the last axis; NaN where x or y is constant."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    xm = x - x.mean(-1, keepdims=True)
    ym = y - y.mean(-1, keepdims=True)
    constant = (np.ptp(x, axis=-1) == 0) | (np.ptp(y, axis=-1) == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (xm * ym).sum(-1) / np.sqrt((xm * xm).sum(-1) * (ym * ym).sum(-1))
    return np.where(constant, np.nan, np.clip(r, -1.0, 1.0))


def spearman(x, y):
    """Spearman rho: Pearson r of the ranks (ties get their average rank, as scipy.stats.spearmanr)."""
    return pearson(rankdata(x, axis=-1), rankdata(y, axis=-1))


def kendall(x, y, chunk: int = 256):
    """Kendall tau-b along the last axis: sum over pairs of sign(dx) sign(dy), divided by
    sqrt(#pairs untied in x * #pairs untied in y); as scipy.stats.kendalltau's default."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    n = x.shape[-1]
    iu, ju = np.triu_indices(n, 1)
    bx, by = np.broadcast_arrays(x, y)
    flat_x, flat_y = bx.reshape(-1, n), by.reshape(-1, n)
    out = np.empty(len(flat_x))
    for i in range(0, len(flat_x), chunk):  # chunks bound the memory of the pair arrays
        sx = np.sign(flat_x[i:i + chunk, iu] - flat_x[i:i + chunk, ju])
        sy = np.sign(flat_y[i:i + chunk, iu] - flat_y[i:i + chunk, ju])
        den = np.sqrt(np.abs(sx).sum(-1) * np.abs(sy).sum(-1))
        with np.errstate(invalid="ignore", divide="ignore"):
            out[i:i + chunk] = np.where(den > 0, (sx * sy).sum(-1) / den, np.nan)
    return out.reshape(bx.shape[:-1])


def _partial_from(r_xy, r_xz, r_yz):
    with np.errstate(invalid="ignore", divide="ignore"):
        return (r_xy - r_xz * r_yz) / np.sqrt((1 - r_xz ** 2) * (1 - r_yz ** 2))


def partial_pearson(x, y, z):
    """Pearson r of x and y with z held fixed: (r_xy - r_xz r_yz) / sqrt((1 - r_xz^2)(1 - r_yz^2)),
    equal to the correlation of the residuals of x and of y after a linear fit on z."""
    return _partial_from(pearson(x, y), pearson(x, z), pearson(y, z))


def partial_spearman(x, y, z):
    """The same on ranks."""
    rx, ry, rz = (rankdata(v, axis=-1) for v in (x, y, z))
    return partial_pearson(rx, ry, rz)


_STAT = {"pearson": pearson, "spearman": spearman, "kendall": kendall,
         "partial_pearson": partial_pearson, "partial_spearman": partial_spearman}


def _residual(v, z):
    """Residual of v after a least-squares line on z (what a partial correlation correlates)."""
    A = np.column_stack([np.ones_like(z), z])
    coef, *_ = np.linalg.lstsq(A, v, rcond=None)
    return v - A @ coef


def correlate(x, y, method: str = "spearman", z=None, n_boot: int = 2000, n_perm: int = 2000,
              seed: int = 0, level: float = 0.95) -> dict:
    """Estimate, percentile bootstrap CI and two-sided permutation p-value of one correlation.

    Bootstrap: resample the (x, y[, z]) tuples with replacement `n_boot` times, drop resamples where
    the statistic is undefined, take the (1-level)/2 and (1+level)/2 quantiles.
    Permutation: shuffle y against x (for a partial correlation: the residual of y on z against the
    residual of x on z, Freedman & Lane's scheme) and count |statistic| >= |observed|. With n! <=
    n_perm every permutation is enumerated and p is exact; otherwise p = (1 + count) / (1 + n_perm).
    Returns {"estimate", "ci_low", "ci_high", "p_value", "n", "n_boot_valid"}.
    """
    if method not in _STAT:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    partial = method.startswith("partial")
    if partial and z is None:
        raise ValueError(f"{method} needs a control variable z")
    cols = [np.asarray(x, float), np.asarray(y, float)] + ([np.asarray(z, float)] if partial else [])
    keep = np.logical_and.reduce([np.isfinite(c) for c in cols])
    cols = [c[keep] for c in cols]
    n = len(cols[0])
    stat = _STAT[method]
    out = {"estimate": np.nan, "ci_low": np.nan, "ci_high": np.nan, "p_value": np.nan, "n": n,
           "n_boot_valid": 0}
    if n < (4 if partial else 3):
        return out
    estimate = float(stat(*cols))
    out["estimate"] = estimate
    if not np.isfinite(estimate):
        return out
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = stat(*(c[idx] for c in cols))
    boot = boot[np.isfinite(boot)]
    out["n_boot_valid"] = int(len(boot))
    if len(boot) >= max(20, n_boot // 2):
        out["ci_low"], out["ci_high"] = (float(q) for q in np.quantile(boot, [(1 - level) / 2, (1 + level) / 2]))
    if partial:  # permute residuals; ranks first for the Spearman version
        a, b, c = cols if method == "partial_pearson" else (rankdata(v) for v in cols)
        a, b, perm_stat = _residual(a, c), _residual(b, c), pearson
    else:
        a, b, perm_stat = cols[0], cols[1], stat
    if math.factorial(n) <= n_perm:
        order = np.array(list(permutations(range(n))))
        null = perm_stat(a, b[order])
        out["p_value"] = float(np.mean(np.abs(null) >= abs(estimate) - 1e-12))
    else:
        order = rng.permuted(np.tile(np.arange(n), (n_perm, 1)), axis=1)
        null = perm_stat(a, b[order])
        out["p_value"] = float((1 + np.sum(np.abs(null) >= abs(estimate) - 1e-12)) / (1 + n_perm))
    return out
