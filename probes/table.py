"""probes.parquet: one row per (stage, probe, mode), columns fixed by DESIGN.md.

Rows are appended after every checkpoint, atomically (write a temporary file next to the table, then
os.replace), under a lock file so two processes never interleave a read-modify-write. A row is "done" when
the table holds (stage, checkpoint, probe, mode) with the same dataset_hash; a rerun skips it.

Statistics over samples (`summarize`): mean; std = sample standard deviation (ddof 1; 0 for one sample);
95% confidence interval of the mean, mean +- t_{0.975, n-1} * std / sqrt(n) (Student t, which is the
normal approximation's 1.96 for large n).
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

COLUMNS = ["run", "stage", "stage_name", "task", "recipe", "checkpoint", "probe", "mode", "mean", "std",
           "ci_low", "ci_high", "n_samples", "n_positions", "dataset", "dataset_hash"]
_DTYPES = {"stage": "int64", "n_samples": "int64", "n_positions": "int64", "mean": "float64", "std": "float64",
           "ci_low": "float64", "ci_high": "float64"}


class TableError(ValueError):
    pass


def summarize(values: Iterable[float]) -> dict:
    v = np.asarray(list(values), dtype=np.float64)
    n = v.size
    if n == 0:
        raise ValueError("no samples to summarize")
    mean = float(v.mean())
    std = float(v.std(ddof=1)) if n > 1 else 0.0
    if n > 1:
        from scipy.stats import t
        half = float(t.ppf(0.975, n - 1)) * std / math.sqrt(n)
    else:
        half = 0.0
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n_samples": n}


def empty() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=_DTYPES.get(c, "object")) for c in COLUMNS})


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        return empty()
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow's errors for a truncated or foreign file
        raise TableError(f"{p}: cannot read the existing probe table ({e}); move it away to start a new one "
                         "(it is never overwritten)") from e
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise TableError(f"{p}: not a probe table (lacks columns {missing}); it is never overwritten")
    return df


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def append_rows(path: str | os.PathLike, rows: list[dict]) -> pd.DataFrame:
    """Add `rows` (replacing rows with the same stage, probe and mode) and write the table atomically."""
    p = Path(path)
    new = pd.DataFrame(rows, columns=COLUMNS).astype(_DTYPES)
    with _lock(p):
        old = read_table(p)
        if len(old):
            replaced = old.set_index(["stage", "probe", "mode"]).index.isin(
                new.set_index(["stage", "probe", "mode"]).index)
            old = old[~replaced]
        df = pd.concat([old, new], ignore_index=True) if len(old) else new
        df = df.sort_values(["stage", "mode", "probe"], kind="stable").reset_index(drop=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
        os.close(fd)
        try:
            df.to_parquet(tmp, index=False)
            os.replace(tmp, p)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return df


def done(df: pd.DataFrame, stage: int, checkpoint: str, mode: str, probes: Iterable[str], dataset_hash: str) -> bool:
    """Whether every probe of this (stage, mode) is already in the table for this checkpoint and data."""
    if not len(df):
        return False
    sel = df[(df["stage"] == stage) & (df["checkpoint"] == checkpoint) & (df["mode"] == mode)
             & (df["dataset_hash"] == dataset_hash)]
    return set(probes) <= set(sel["probe"])


def conflicts(df: pd.DataFrame, stage: int, checkpoint: str, mode: str, probes: Iterable[str],
              dataset_hash: str) -> pd.DataFrame:
    """Rows for the same (stage, probe, mode) computed on other data or another checkpoint folder."""
    if not len(df):
        return df
    sel = df[(df["stage"] == stage) & (df["mode"] == mode) & df["probe"].isin(list(probes))]
    return sel[(sel["dataset_hash"] != dataset_hash) | (sel["checkpoint"] != checkpoint)]
