"""Writing the run tables `probes` writes (their schemas: probes.schemas): probes.parquet, one row per
(stage, probe, mode), evals.parquet, one row per (stage, benchmark), and layers.parquet.

Rows are appended after every checkpoint (or benchmark), atomically (write a temporary file next to the
table, then os.replace), under a lock file so two processes never interleave a read-modify-write; a
temporary file left by a process killed while writing is removed by the next writer. A command that
writes a table for a whole run holds `run_lock` on it, so a second one on the same table is refused. A probe
row is "done" when the table holds (stage, checkpoint, probe, mode) with the same dataset_hash; a rerun
skips it (evaluation's own rule is in probes.evaluate).

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

from .schemas import EVALS, ITEMS, PROBES, TableError


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


def empty(columns=PROBES.columns, dtypes: dict = PROBES.dtypes) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=dtypes.get(c, "object")) for c in columns})


def read_table(path: str | os.PathLike, columns=PROBES.columns, dtypes: dict = PROBES.dtypes,
               what: str = PROBES.what) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        return empty(columns, dtypes)
    try:
        df = pd.read_parquet(p)
    except Exception as e:  # pyarrow's errors for a truncated or foreign file
        raise TableError(f"{p}: cannot read the existing {what} ({e}); move it away to start a new one "
                         "(it is never overwritten)") from e
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise TableError(f"{p}: not a {what} (lacks columns {missing}); it is never overwritten")
    return df


def read_evals(path: str | os.PathLike) -> pd.DataFrame:
    return read_table(path, EVALS.columns, EVALS.dtypes, EVALS.what)


@contextlib.contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class TableBusy(TableError):
    """Another command is writing the same table."""


class RunLock:
    """Held by one command (probes.run, probes.evaluate) for as long as it writes `path`: a second command
    on the same table is refused with the holder named. flock, so a killed holder releases it at once."""

    def __init__(self, path: str | os.PathLike, command: str):
        self.path = Path(path)
        self.file = self.path.with_name(f".{self.path.name}.run-lock")
        self.command = command
        self.fh = None

    def acquire(self) -> RunLock:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.file, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise TableBusy(f"{self.path} is being written by {holder}; wait for it to finish (a rerun then "
                            "continues where it stopped), or write elsewhere with --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{self.command} (pid {os.getpid()})\n")
        fh.flush()
        self.fh = fh
        return self

    def release(self) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def append_rows(path: str | os.PathLike, rows: list[dict], *, columns=PROBES.columns,
                dtypes: dict = PROBES.dtypes, key=PROBES.key, order=PROBES.order,
                what: str = PROBES.what) -> pd.DataFrame:
    """Add `rows` (replacing rows with the same key: stage, probe and mode by default) and write the table
    atomically, under the table's lock. Rows of other keys, and columns beyond `columns`, are kept."""
    p = Path(path)
    columns, key = list(columns), list(key)
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in columns))   # added columns are kept
    new = pd.DataFrame(rows, columns=[*columns, *extra]).astype(dtypes)
    with _lock(p):
        for stale in p.parent.glob(f".{p.name}.*.tmp"):  # a writer killed mid-write (writes hold this lock)
            with contextlib.suppress(OSError):
                stale.unlink()
        old = read_table(p, columns, dtypes, what)
        if len(old):
            old = old[~old.set_index(key).index.isin(new.set_index(key).index)]
        df = pd.concat([old.astype(dtypes), new], ignore_index=True) if len(old) else new
        df = df.sort_values(list(order), kind="stable").reset_index(drop=True)
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


def append_evals(path: str | os.PathLike, rows: list[dict]) -> pd.DataFrame:
    """evals.parquet: add rows, replacing those of the same (stage, benchmark)."""
    return append_rows(path, rows, columns=EVALS.columns, dtypes=EVALS.dtypes, key=EVALS.key, order=EVALS.order,
                       what=EVALS.what)


def items_path(evals: str | os.PathLike) -> Path:
    """RUN/items.parquet beside RUN/evals.parquet; beside another table T.parquet, T.items.parquet."""
    evals = Path(evals)
    return evals.with_name("items.parquet" if evals.name == "evals.parquet" else f"{evals.stem}.items.parquet")


def append_items(path: str | os.PathLike, rows: list[dict]) -> pd.DataFrame:
    """items.parquet: add per-item rows, replacing those of the same (stage, benchmark, item_id)."""
    return append_rows(path, rows, columns=ITEMS.columns, dtypes=ITEMS.dtypes, key=ITEMS.key, order=ITEMS.order,
                       what=ITEMS.what)


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
