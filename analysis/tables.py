"""Reading run directories: run.json (training.manifest), evals.parquet, probes.parquet and, where there is
one, items.parquet (probes.schemas), checked against the contracts in docs/design.md. Every problem is reported with the file it is in."""
from __future__ import annotations

import glob
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pandas as pd

from probes.schemas import EVALS, ITEMS, PROBES, SPLITS, TableError
from training.manifest import STAGE_KEYS, ManifestError, read_full

REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    """One run directory's tables. `label` is its name in an analysis (unique among the runs loaded)."""
    label: str
    path: Path
    manifest: dict
    evals: pd.DataFrame
    probes: pd.DataFrame | None
    items: pd.DataFrame | None = None      # per-item scores (items.parquet), where the run has them

    @property
    def recipe(self) -> str:
        return str(self.manifest["recipe"])

    @property
    def family(self) -> str:
        return str(self.manifest["family"])

    @cached_property
    def stages(self) -> pd.DataFrame:
        """index, name, task of every stage, in order (stage 0 is the base model)."""
        return pd.DataFrame(self.manifest["stages"], columns=list(STAGE_KEYS)).set_index("index", drop=False)


def read_manifest(run_dir: Path) -> dict:
    """run.json with every key of the contract (training.manifest.read_full)."""
    try:
        return read_full(run_dir)
    except ManifestError as e:
        raise TableError(str(e)) from None


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """A parquet table with at least `columns`; a missing file or column is an error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # pyarrow's errors do not name the file
        raise TableError(f"{path}: not a readable parquet table ({e})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TableError(f"{path}: lacks columns {missing} (has {list(table.columns)})")
    return table


def _check_rows(table: pd.DataFrame, path: Path, key: list[str], n_stages: int) -> None:
    dup = table[table.duplicated(key, keep=False)]
    if len(dup):
        raise TableError(f"{path}: {len(dup)} rows repeat the key {key}, e.g.\n{dup[key].head(4).to_string()}")
    bad = sorted(set(table["stage"]) - set(range(n_stages)))
    if bad:
        raise TableError(f"{path}: stages {bad} are not in run.json (stages 0..{n_stages - 1})")


def load_run(run_dir: str | Path, probes: bool = True, label: str | None = None) -> Run:
    """Read one run directory. With `probes=False` a missing probes.parquet is allowed (metrics only)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    n_stages = len(manifest["stages"])
    evals_path = run_dir / EVALS.file
    evals = read_table(evals_path, EVALS.columns)
    evals["stage"] = evals["stage"].astype(int)
    evals["score"] = pd.to_numeric(evals["score"], errors="raise").astype(float)
    _check_rows(evals, evals_path, ["stage", "benchmark"], n_stages)
    bad_split = sorted(set(evals["split"]) - set(SPLITS))
    if bad_split:
        raise TableError(f"{evals_path}: split values {bad_split}; allowed: {list(SPLITS)}")
    mixed = evals.groupby("benchmark")["split"].nunique()
    if (mixed > 1).any():
        raise TableError(f"{evals_path}: benchmarks {list(mixed[mixed > 1].index)} are both target and heldout")
    probe_table = None
    probes_path = run_dir / PROBES.file
    if probes or probes_path.exists():
        probe_table = read_table(probes_path, PROBES.columns)
        probe_table["stage"] = probe_table["stage"].astype(int)
        _check_rows(probe_table, probes_path, ["stage", "probe", "mode"], n_stages)
    items = None
    if (run_dir / ITEMS.file).exists():
        items = read_table(run_dir / ITEMS.file, ITEMS.columns)
        items["stage"] = items["stage"].astype(int)
    return Run(label or run_dir.name, run_dir, manifest, evals, probe_table, items)


def expand_run_dirs(paths) -> list[Path]:
    """Run directories from paths: a folder with run.json is a run; a folder without one stands for its
    sub-folders that have one (so `--run-dir runs/demo` means every run in it)."""
    out = []
    for p in map(Path, paths):
        if (p / "run.json").is_file():
            out.append(p)
        elif p.is_dir() and (subs := sorted(q for q in p.iterdir() if (q / "run.json").is_file())):
            out.extend(subs)
        else:
            raise TableError(f"{p / 'run.json'}: no such file, and {p} holds no run directories")
    return out


def find_runs(pattern: str) -> list[Path]:
    """Run directories (folders with run.json) matching a glob; a relative pattern that matches nothing
    here is also tried from the repository root, so notebooks work from notebooks/ too."""
    hits = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "run.json").is_file())
    if not hits and not Path(pattern).is_absolute():
        hits = sorted(Path(p) for p in glob.glob(str(REPO_ROOT / pattern)) if (Path(p) / "run.json").is_file())
    return hits


def load_runs(paths, probes: bool = True) -> list[Run]:
    """Load several runs with unique labels (the folder name, or parent/name when names repeat)."""
    dirs = expand_run_dirs([paths] if isinstance(paths, (str, Path)) else paths)
    if not dirs:
        raise TableError("no run directories given")
    names = [d.name for d in dirs]
    labels = [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]
    if len(set(labels)) < len(labels):
        labels = [str(d) for d in dirs]
    return [load_run(d, probes=probes, label=lab) for d, lab in zip(dirs, labels)]
