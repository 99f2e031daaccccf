"""The run tables' schemas (docs/design.md): the one definition of every table's columns, owned by the
writers and imported by the readers (analysis). Torch-free, pandas-free: names only.

A schema: the file in the run directory, its columns (in order; more may be added, none removed or
renamed), the columns that identify a row (`key`), the dtypes the writer enforces, the order rows are
sorted in, and what the table is called in messages.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from training.manifest import SPLITS

__all__ = ["ADVICE", "EVALS", "ITEMS", "LAYERS", "MONITOR", "PROBES", "SPLITS", "Schema", "TableError"]


class TableError(ValueError):
    """A table that is missing, unreadable or breaks its schema; the message names the file."""


@dataclass(frozen=True)
class Schema:
    file: str
    columns: tuple[str, ...]
    key: tuple[str, ...]
    order: tuple[str, ...]
    what: str
    dtypes: dict[str, str] = field(default_factory=dict)


_STAGE = ("run", "stage", "stage_name", "task", "recipe", "checkpoint")
_STATS = ("mean", "std", "ci_low", "ci_high", "n_samples", "n_positions", "dataset", "dataset_hash")
_STAT_DTYPES = {"stage": "int64", "mean": "float64", "std": "float64", "ci_low": "float64", "ci_high": "float64",
                "n_samples": "int64", "n_positions": "int64"}

# probes.run: one row per (stage, probe, mode)
PROBES = Schema("probes.parquet", _STAGE + ("probe", "mode") + _STATS, key=("stage", "probe", "mode"),
                order=("stage", "mode", "probe"), what="probe table", dtypes=_STAT_DTYPES)

# probes.evaluate: one row per (stage, benchmark); split is one of SPLITS, score 0-100.
# n is nullable: lmms-eval results (probes.lmms_eval_import) do not always say how many samples they scored
EVALS = Schema("evals.parquet", _STAGE + ("benchmark", "split", "metric", "score", "n"), key=("stage", "benchmark"),
               order=("stage", "split", "benchmark"), what="evaluation table",
               dtypes={"stage": "int64", "score": "float64", "n": "Int64"})

# probes.evaluate: one row per (stage, benchmark, item)
ITEMS = Schema("items.parquet", ("run", "stage", "benchmark", "item_id", "prediction", "score", "metric"),
               key=("stage", "benchmark", "item_id"), order=("stage", "benchmark", "item_id"), what="item table",
               dtypes={"stage": "int64", "score": "float64"})

# probes.layers: one row per (stage, layer, component, measure); `base` is the checkpoint compared against
LAYERS = Schema("layers.parquet", _STAGE + ("base", "layer", "component", "hook", "measure") + _STATS,
                key=("stage", "layer", "component", "measure"), order=("stage", "layer", "component", "measure"),
                what="layer table", dtypes=_STAT_DTYPES | {"layer": "int64"})

# training.run's drift monitor: one row per (stage, step, probe)
MONITOR = Schema("monitor.parquet", ("run", "stage", "stage_name", "task", "step", "probe", "value", "std",
                                     "n_samples", "n_positions", "seconds", "lr_scale", "event", "dataset",
                                     "dataset_hash"),
                 key=("stage", "step", "probe"), order=("stage", "step", "probe"), what="monitor table")

# training.advise: DIR/advice.parquet, one row per candidate (docs/advise.md)
ADVICE = Schema("advice.parquet", ("candidate", "steps", "learning_proxy", "kl_to_base", "number_mass_shift",
                                   "predicted_heldout_change", "ci_low", "ci_high", "seconds", "rank", "eligible",
                                   "pareto", "recipe", "task", "loss_before", "loss_after", "signature_mass_shift",
                                   "kl_to_base_slope", "number_mass_slope", "train_seconds", "forecaster",
                                   "trial_dir", "target_gain", "target_items"),
                key=("candidate",), order=("rank",), what="advice table",
                dtypes={"steps": "int64", "rank": "int64", "target_items": "int64"})
