"""Forgetting per cell of the 2x2 framework (arXiv 2603.14493): image-ID/OOD x text-ID/OOD, relative to the
task each stage tunes.

Every benchmark has an image domain and a text domain (run.json "domains": {NAME: {"image", "text"}}, see
training/domains.py). For stage s, which tunes task t, benchmark b is image-ID when its image domain equals
t's and text-ID when its text domain equals t's. Per stage and cell:

    change_prev = mean over b in the cell of A[s, b] - A[s-1, b]    (what tuning on t did)
    change_base = mean over b in the cell of A[s, b] - A[0, b]      (where the sequence stands)

in percentage points; negative = forgetting. The tuned task's own benchmark lies in image-ID/text-ID (that
cell shows learning). `cell_summary` averages change_prev over the stages of each run.
"""
from __future__ import annotations

import warnings

import pandas as pd

from probes.schemas import TableError

from .metrics import accuracy_matrix
from .tables import Run

CELLS = ("image-ID/text-ID", "image-ID/text-OOD", "image-OOD/text-ID", "image-OOD/text-OOD")
COLUMNS = ["run", "recipe", "stage", "stage_name", "task", "cell", "n_benchmarks", "benchmarks", "change_prev",
           "change_base"]


def cell_of(benchmark: dict, task: dict) -> str:
    """The cell of a benchmark's {"image", "text"} tags relative to a tuned task's."""
    image = "ID" if benchmark["image"] == task["image"] else "OOD"
    text = "ID" if benchmark["text"] == task["text"] else "OOD"
    return f"image-{image}/text-{text}"


def run_domains(run: Run) -> dict[str, dict]:
    domains = run.manifest.get("domains")
    if not isinstance(domains, dict) or not domains:
        raise TableError(f"{run.path / 'run.json'}: no \"domains\" (the 2x2 tags {{NAME: {{image, text}}}}); "
                         "set eval.domains in the training config, or pass domains=")
    return domains


def forgetting_by_cell(run: Run, domains: dict[str, dict] | None = None) -> pd.DataFrame:
    """One row per (stage >= 1, cell) with benchmarks in it; columns COLUMNS. `domains` overrides run.json's."""
    domains = run_domains(run) if domains is None else domains
    A = accuracy_matrix(run.evals, str(run.path / "evals.parquet"))
    untagged = [b for b in A.columns if b not in domains]
    if untagged:
        warnings.warn(f"{run.label}: benchmarks {untagged} have no 2x2 tags; left out of the cells", stacklevel=2)
    tagged = [b for b in A.columns if b in domains]
    rows = []
    stages = list(A.index)
    for prev, s in zip(stages[:-1], stages[1:]):
        task = run.stages["task"].get(s)
        if task not in domains:
            warnings.warn(f"{run.label}: stage {s} tunes {task!r}, which has no 2x2 tags; stage left out",
                          stacklevel=2)
            continue
        by_cell: dict[str, list[str]] = {}
        for b in tagged:
            by_cell.setdefault(cell_of(domains[b], domains[task]), []).append(b)
        for cell in CELLS:
            bs = by_cell.get(cell, [])
            if not bs:
                continue
            rows.append({"run": run.label, "recipe": run.recipe, "stage": s,
                         "stage_name": run.stages["name"].get(s, str(s)), "task": task, "cell": cell,
                         "n_benchmarks": len(bs), "benchmarks": ",".join(bs),
                         "change_prev": float((A.loc[s, bs] - A.loc[prev, bs]).mean()),
                         "change_base": float((A.loc[s, bs] - A.loc[0, bs]).mean())})
    return pd.DataFrame(rows, columns=COLUMNS)


def cell_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per run and cell: the mean over stages of change_prev (the average effect of tuning one task on that
    cell), the last stage's change_base, and how many stages had benchmarks in the cell."""
    if table.empty:
        return pd.DataFrame(columns=["run", "recipe", "cell", "stages", "mean_change_prev", "final_change_base"])
    last = table.sort_values("stage").groupby(["run", "cell"]).tail(1).set_index(["run", "cell"])["change_base"]
    out = (table.groupby(["run", "recipe", "cell"], sort=False)
           .agg(stages=("stage", "count"), mean_change_prev=("change_prev", "mean")).reset_index())
    out["final_change_base"] = [last.get((r, c)) for r, c in zip(out["run"], out["cell"])]
    out["cell"] = pd.Categorical(out["cell"], categories=CELLS, ordered=True)
    return out.sort_values(["run", "cell"]).reset_index(drop=True).assign(cell=lambda d: d["cell"].astype(str))
