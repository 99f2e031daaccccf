"""One analysis over one or several runs: every table analysis.run writes, computed once."""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .cells import COLUMNS as CELL_COLUMNS
from .cells import forgetting_by_cell
from .drift import (
    PRIMARY_PROBE,
    correlation_table,
    preferred_mode,
    probe_curves,
    recovery_table,
    stage_points,
)
from .metrics import RunMetrics
from .paired import metric_intervals
from .tables import Run, load_runs


@dataclass
class Analysis:
    runs: list[Run]
    metrics: dict[str, RunMetrics]       # run label -> its accuracy matrix and metrics
    metrics_long: pd.DataFrame           # metrics.csv (+ ci_low, ci_high where a run has items.parquet)
    summary: pd.DataFrame                # one row per run: the headline numbers
    curves: pd.DataFrame                 # one row per (run, stage): held-out and target means (+ the held-out
                                         # change's interval, heldout_change_ci_low / _high, with items)
    probes: pd.DataFrame                 # one row per (run, stage, probe, mode)
    points: pd.DataFrame                 # one row per (run, stage >= 1, probe, mode): x, y, z
    correlations: pd.DataFrame           # correlations.csv
    recovery: pd.DataFrame               # recovery.csv
    settings: dict = field(default_factory=dict)
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)  # cells.csv: 2x2 forgetting (runs with domains)

    def primary(self) -> tuple[str, str] | tuple[None, None]:
        """(probe, mode) the headline uses: number_mass (else the first probe), teacher-forced first."""
        if self.probes.empty:
            return None, None
        names = list(self.probes["probe"].unique())
        probe = PRIMARY_PROBE if PRIMARY_PROBE in names else names[0]
        return probe, preferred_mode(self.probes.loc[self.probes["probe"] == probe, "mode"])


def analyze(runs, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0, recovery_min: float = 0.0,
            probes: bool = True) -> Analysis:
    """Metrics, correlations and recovery events for `runs` (Run objects or run directories)."""
    if not runs or not isinstance(runs[0], Run):
        runs = load_runs(runs, probes=probes)
    metrics = {r.label: RunMetrics(r) for r in runs}
    curves = []
    for r in runs:
        m = metrics[r.label]
        c = pd.DataFrame({"stage": m.A.index, "stage_name": m.stage_names.values,
                          "task": [r.stages["task"].get(s) for s in m.A.index], "heldout_mean": m.H.values,
                          "heldout_change": (m.H - m.H.loc[0]).values, "target_mean": m.target_mean().values})
        curves.append(c.assign(run=r.label, recipe=r.recipe, family=r.family))
    an = Analysis(
        runs=runs, metrics=metrics,
        metrics_long=pd.concat([m.long() for m in metrics.values()], ignore_index=True),
        summary=pd.DataFrame(), curves=pd.concat(curves, ignore_index=True),
        probes=pd.concat([probe_curves(r) for r in runs], ignore_index=True),
        points=pd.concat([stage_points(r, metrics[r.label]) for r in runs], ignore_index=True),
        correlations=pd.DataFrame(),
        recovery=pd.concat([recovery_table(r, metrics[r.label], recovery_min) for r in runs], ignore_index=True),
        settings={"n_boot": n_boot, "n_perm": n_perm, "seed": seed, "recovery_min": recovery_min})
    if any(r.items is not None for r in runs):
        _add_intervals(an, n_boot, seed)
    an.correlations = correlation_table(an.points, n_boot=n_boot, n_perm=n_perm, seed=seed)
    tagged = [forgetting_by_cell(r) for r in runs if r.manifest.get("domains")]
    an.cells = pd.concat(tagged, ignore_index=True) if tagged else pd.DataFrame(columns=CELL_COLUMNS)
    an.summary = _summary(an)
    return an


def _add_intervals(an: Analysis, n_boot: int, seed: int) -> None:
    """Paired-bootstrap intervals (analysis.paired.metric_intervals) as ci_low / ci_high of the metrics.csv
    rows that compare a stage with the base, and of the held-out change in the curves; NaN elsewhere and
    for runs without items. Only called when some run has items, so tables of runs without stay as they were."""
    cis = {}
    for r in an.runs:
        if r.items is not None:
            m = an.metrics[r.label]
            found = metric_intervals(r.items, m.A.index, m.heldout, m.targets, n_boot, seed)
            cis.update({(r.label, *k): v for k, v in found.items()})
    nan = (np.nan, np.nan)

    def key(run, metric, stage, bench):
        return (run, metric, None if pd.isna(stage) else int(stage), None if pd.isna(bench) else bench)
    ml = an.metrics_long
    found = [cis.get(key(*row), nan) for row in ml[["run", "metric", "stage", "benchmark"]].itertuples(index=False)]
    ml["ci_low"], ml["ci_high"] = [f[0] for f in found], [f[1] for f in found]
    c = an.curves
    found = [cis.get((run, "heldout_change", int(s), None), nan) for run, s in zip(c["run"], c["stage"])]
    c["heldout_change_ci_low"], c["heldout_change_ci_high"] = [f[0] for f in found], [f[1] for f in found]


def _summary(an: Analysis) -> pd.DataFrame:
    probe, mode = an.primary()
    rows = []
    for r in an.runs:
        m = an.metrics[r.label]
        row = {"run": r.label, "family": r.family, "recipe": r.recipe, "stages": len(m.A) - 1, **m.scalars()}
        if probe is not None:
            p = an.probes[(an.probes["run"] == r.label) & (an.probes["probe"] == probe) & (an.probes["mode"] == mode)]
            p = p[p["stage"] > 0]
            peak = p.loc[p["shift"].abs().idxmax()] if len(p) and p["shift"].notna().any() else None
            row.update({"probe": f"{probe} ({mode})", "probe_peak_shift": peak["shift"] if peak is not None else np.nan,
                        "probe_peak_stage": peak["stage_name"] if peak is not None else None})
            c = an.correlations
            c = c[(c["probe"] == probe) & (c["mode"] == mode) & (c["comparison"] == "vs_base")
                  & (c["group"] == f"recipe:{r.recipe}") & (c["method"] == "spearman")]
            row["recipe_spearman"] = c["estimate"].iloc[0] if len(c) else np.nan
            row["recipe_spearman_p"] = c["p_value"].iloc[0] if len(c) else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def default_out(run_dirs) -> Path:
    """RUN/analysis for one run; for several, analysis/ in their deepest common folder."""
    paths = [Path(p).resolve() for p in run_dirs]
    if len(paths) == 1:
        return paths[0] / "analysis"
    common = []
    for parts in zip(*(p.parts for p in paths)):
        if len(set(parts)) > 1:
            break
        common.append(parts[0])
    if len(common) <= 1:  # nothing shared but the filesystem root
        return Path.cwd() / "analysis"
    return Path(*common) / "analysis"


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", str(text)).strip("_") or "run"


def write(an: Analysis, out: Path) -> list[Path]:
    """Write metrics.csv, correlations.csv, recovery.csv, summary.csv and figures/*.png under `out`."""
    from .figures import all_figures, close  # matplotlib only when figures are drawn

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in [("metrics.csv", an.metrics_long), ("correlations.csv", an.correlations),
                        ("recovery.csv", an.recovery), ("summary.csv", an.summary)] + (
                            [("cells.csv", an.cells)] if len(an.cells) else []):
        table.to_csv(out / name, index=False)
        written.append(out / name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # tight_layout chatter
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # seaborn's own use of matplotlib
        for name, fig in all_figures(an):
            path = out / "figures" / f"{safe_name(name)}.png"
            fig.savefig(path, dpi=150, bbox_inches="tight")
            close(fig)
            written.append(path)
    return written
