"""Reads the run tables (run.json, evals.parquet, probes.parquet) and computes the study's metrics,
probe-forgetting correlations, recovery events and figures. Never imports a model.

    from analysis import find_runs, load_runs, analyze
    an = analyze(load_runs(find_runs("runs/demo/*")))
    an.summary, an.correlations, an.recovery        # pandas tables
    an.cells                                         # forgetting per 2x2 cell (runs with "domains")
    from analysis import figures; figures.learning_vs_forgetting(an)
"""
from .cells import cell_summary, forgetting_by_cell
from .metrics import RunMetrics
from .report import Analysis, analyze, write
from .tables import Run, TableError, find_runs, load_run, load_runs

__all__ = ["Analysis", "Run", "RunMetrics", "TableError", "analyze", "cell_summary", "find_runs",
           "forgetting_by_cell", "load_run", "load_runs", "write"]
