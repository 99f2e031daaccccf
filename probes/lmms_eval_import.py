"""Import lmms-eval results into a run's evals.parquet (it reads JSON and writes a table; no model runs).

    python -m probes.lmms_eval_import --run-dir RUN --results 0=PATH --results cub=PATH ...
    python -m probes.lmms_eval_import --run-dir RUN            # RUN/lmms_eval/<stage>/ folders

lmms-eval writes, per evaluation, a JSON with "results": {task: {"metric,filter": value, ...}} (and
"n-samples": {task: {"effective": N}}). STAGE is a stage's index, name or folder (as in run.json);
PATH is that JSON or a folder holding it (the newest *results*.json below it is used). Without
--results, every sub-folder of --results-dir (default RUN/lmms_eval) named after a stage is read.

Each task becomes one row per stage: its primary metric (the table below, --metric TASK=KEY, or else
the first numeric metric), scaled to 0-100 (fractions x 100: every value of a task at or below 1; or
--scale TASK=FACTOR), split "target" when the task names a task of run.json (or is given in
--target), else "heldout". Rows already in evals.parquet for other (stage, benchmark) pairs are kept; the
table is written through probes.table.append_evals (atomic, under the lock probes.evaluate uses).

Per item: where lmms-eval ran with `--log_samples`, it wrote beside DATE_results.json one
DATE_samples_TASK.jsonl per task, a line per document: doc_id, target, filtered_resps (the answer after
the task's filters; `resps` too when they differ), doc_hash, and the values process_results returned per
metric (a number; MMStar a dict with its "score"; SEED-Bench a dict with "pred" and "answer", scored as
its aggregation scores them, 1 where they are equal). Those become rows of RUN/items.parquet
(schemas.ITEMS: item_id = doc_id, prediction = the filtered answer, score = the primary metric's value,
scaled like the task's row to 0-1, metric as in the evals row); a line that carries a "filter" key counts
only under the primary metric's filter. A task without a samples file adds no items (paired statistics
then skip it); a samples file that cannot be read is an error naming it.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pandas as pd

from training.manifest import ManifestError, names_task, read_full
from training.records import BadLine, DataError, read_records

from .schemas import EVALS, ITEMS, TableError
from .table import append_evals, append_items, items_path

# Primary metric of the lmms-eval tasks the study's held-out set uses (all reported as fractions).
PRIMARY_METRIC = {
    "ai2d": "exact_match,flexible-extract", "chartqa": "relaxed_overall,none", "docvqa_val": "anls,none",
    "docvqa_test": "anls,none", "infovqa_val": "anls,none", "infovqa_test": "anls,none",
    "realworldqa": "exact_match,flexible-extract", "seedbench": "seed_image,none",
    "scienceqa_img": "exact_match,none", "mmstar": "average,none", "textvqa_val": "exact_match,none",
    "pope": "pope_accuracy,none", "gqa": "exact_match,none", "mmmu_val": "mmmu_acc,none",
    # the fork's target tasks (LMM_CL's lmms-eval 0.3), primaries as probes.presets scores them
    "cub200": "acc,none", "pixmocount": "pixmocount_accuracy,none", "pathvqa": "pathvqa_exact_match,none",
    "timeclock": "both_accuracy,none", "pixmo_count": "acc,none",
}
SKIP_KEYS = {"alias", "samples", "name", "sample_len", "sample_count"}


class ResultsError(TableError):
    """A results file that cannot be imported; the message names it."""


def find_results(path: Path) -> Path:
    """The results JSON itself, or the newest *results*.json under a folder."""
    path = Path(path)
    if path.is_file():
        return path
    if path.is_dir():
        found = sorted(path.rglob("*results*.json"), key=lambda p: (p.stat().st_mtime, str(p)))
        if found:
            return found[-1]
    raise ResultsError(f"{path}: no lmms-eval results JSON (a *results*.json file or a folder holding one)")


def primary_metric(task: str, values: dict, override: dict[str, str], source: Path) -> str:
    """The key of `values` that scores `task`: --metric, the known table, else the first numeric metric."""
    key = override.get(task) or PRIMARY_METRIC.get(task)
    if key:
        if key not in values:
            raise ResultsError(f"{source}: task {task!r} has no metric {key!r} (has {sorted(values)})")
        return key
    for k, v in values.items():
        if k not in SKIP_KEYS and "_stderr" not in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            return k
    raise ResultsError(f"{source}: task {task!r} has no numeric metric ({sorted(values)})")


def read_results(path: Path, metric_override: dict[str, str], only: set[str] | None) -> dict[str, tuple]:
    """task -> (metric key, value, n) of one results JSON; group entries whose subtasks are present too
    are skipped (their score would count the subtasks twice in a held-out mean)."""
    try:
        data = json.loads(Path(path).read_text())
    except ValueError as e:
        raise ResultsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data.get("results"), dict):
        raise ResultsError(f"{path}: no \"results\" object (is it an lmms-eval results file?)")
    results = data["results"]
    groups = {g for g, subs in (data.get("group_subtasks") or {}).items() if subs and set(subs) & set(results)}
    out = {}
    for task, values in results.items():
        if task in groups or (only and task not in only):
            continue
        key = primary_metric(task, values, metric_override, path)
        value = values[key]
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ResultsError(f"{path}: task {task!r} metric {key!r} is {value!r}, not a number")
        n = ((data.get("n-samples") or {}).get(task) or {}).get("effective")
        out[task] = (key, float(value), n)
    return out


# -- per-sample logs -------------------------------------------------------------------------------
def samples_file(results: Path, task: str) -> Path | None:
    """DATE_samples_TASK.jsonl beside DATE_results.json, else the newest *_samples_TASK.jsonl there."""
    date = results.name.removesuffix("_results.json")
    exact = results.with_name(f"{date}_samples_{task}.jsonl")
    if exact.is_file():
        return exact
    found = sorted(results.parent.glob(f"*_samples_{task}.jsonl"), key=lambda p: (p.stat().st_mtime, str(p)))
    return found[-1] if found else None


def sample_value(sample: dict, metric: str, where: str) -> float | None:
    """The per-item value of `metric` in one logged sample (see the module docstring); None: not counted."""
    value = sample.get(metric)
    if isinstance(value, dict):
        if "score" in value:                                  # MMStar
            value = value["score"]
        elif "pred" in value and "answer" in value:           # SEED-Bench
            value = float(value["pred"] == value["answer"])
        else:
            value = value.get(metric)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (bool, int, float)):
        return float(value)
    raise ResultsError(f"{where}: metric {metric!r} is {value!r}, not a number")


def _answer(sample: dict) -> str:
    """The filtered answer (lists of one answer per request unwrapped), else the raw response."""
    value = sample.get("filtered_resps", sample.get("resps"))
    while isinstance(value, list) and value:
        value = value[0]
    return "" if value is None or value == [] else str(value)


def read_samples(path: Path, key: str) -> list[tuple[str, str, float | None]]:
    """(item_id, prediction, value) per document of one samples file, for the metric key "name,filter"."""
    metric, _, filt = key.partition(",")
    try:
        lines = read_records(path)
    except DataError as e:
        raise ResultsError(str(e)) from None
    by_doc: dict[str, tuple[str, str, float | None]] = {}
    for n, sample in enumerate(lines, 1):
        where = f"{path} sample {n}"
        if isinstance(sample, BadLine) or not isinstance(sample, dict) or "doc_id" not in sample:
            raise ResultsError(f"{where}: " + (sample.reason if isinstance(sample, BadLine)
                                               else "not an lmms-eval sample (no doc_id)"))
        if "filter" in sample and filt and sample["filter"] != filt:
            continue
        item = (str(sample["doc_id"]), _answer(sample), sample_value(sample, metric, where))
        if by_doc.setdefault(item[0], item)[2] != item[2]:
            # the same document logged under several filters, none named: which one scores is unknown
            raise ResultsError(f"{where}: doc_id {item[0]} is logged twice with different {metric!r} values")
    return list(by_doc.values())


def item_rows(run: str, stage: int, bench: str, key: str, factor: float, path: Path) -> list[dict]:
    """items.parquet rows of one stage's samples file, scored 0-1 as the task's evals row is scaled."""
    rows = []
    for item_id, prediction, value in read_samples(path, key):
        score = None if value is None else value * factor / 100.0
        if score is not None and not 0.0 <= score <= 1.0:
            raise ResultsError(f"{path}: doc_id {item_id} {key} = {value} is not a 0-1 or 0-100 score")
        rows.append({"run": run, "stage": stage, "benchmark": bench, "item_id": item_id,
                     "prediction": prediction, "score": score, "metric": key.split(",")[0]})
    return rows


def resolve_stage(stages: list[dict], name: str, source: str) -> dict:
    for s in stages:
        if name in (str(s["index"]), s["name"], s["path"]):
            return s
    raise ResultsError(f"{source}: stage {name!r} is not in run.json "
                              f"(stages: {[s['name'] for s in stages]}; give an index, name or folder)")


def import_results(run_dir: Path, results: dict[str, Path], target: list[str] | None = None,
                   task_map: dict[str, str] | None = None, metric: dict[str, str] | None = None,
                   scale: dict[str, float] | None = None, only: set[str] | None = None) -> pd.DataFrame:
    """evals.parquet rows for the given stage -> results path pairs (see the module docstring)."""
    return import_all(run_dir, results, target, task_map, metric, scale, only)[0]


def import_all(run_dir: Path, results: dict[str, Path], target: list[str] | None = None,
               task_map: dict[str, str] | None = None, metric: dict[str, str] | None = None,
               scale: dict[str, float] | None = None, only: set[str] | None = None
               ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(evals rows, items rows): import_results plus the per-sample logs where lmms-eval wrote them."""
    run_dir = Path(run_dir)
    manifest = read_full(run_dir)
    stages = manifest["stages"]
    task_map, metric, scale = task_map or {}, metric or {}, scale or {}
    tasks = [t for t in manifest.get("tasks") or []] + [s["task"] for s in stages if s["task"]]
    raw = []
    for stage_name, path in results.items():
        st = resolve_stage(stages, stage_name, f"--results {stage_name}={path}")
        source = find_results(path)
        for task, (key, value, n) in read_results(source, metric, only).items():
            raw.append((st, task, key, value, n, source))
    if not raw:
        raise ResultsError(f"{run_dir}: no lmms-eval results to import")
    rows, items = [], []
    by_task = pd.DataFrame([(r[1], r[3]) for r in raw], columns=["task", "value"]).groupby("task")["value"]
    for st, task, key, value, n, source in raw:
        if task in scale:
            factor = scale[task]
        else:
            factor = 100.0 if by_task.get_group(task).max() <= 1.0 else 1.0
        score = value * factor
        if not 0.0 <= score <= 100.0:
            raise ResultsError(f"{source}: task {task!r} {key} = {value} is not a 0-1 or 0-100 score; "
                                      f"give --scale {task}=FACTOR or --metric {task}=KEY")
        bench = task_map.get(task, task)
        is_target = (bench in target) if target is not None else any(names_task(bench, t) for t in tasks)
        rows.append({"run": run_dir.name, "stage": int(st["index"]), "stage_name": st["name"], "task": st["task"],
                     "recipe": manifest["recipe"], "checkpoint": st["path"], "benchmark": bench,
                     "split": "target" if is_target else "heldout", "metric": key.split(",")[0], "score": score,
                     "n": n})
        if (samples := samples_file(source, task)) is not None:
            items += item_rows(run_dir.name, int(st["index"]), bench, key, factor, samples)
    table = pd.DataFrame(rows, columns=list(EVALS.columns))
    table["n"] = table["n"].astype("Int64")
    dup = table[table.duplicated(["stage", "benchmark"], keep=False)]
    if len(dup):
        raise ResultsError(f"{run_dir}: stage/benchmark pairs given twice: "
                                  f"{sorted(set(zip(dup.stage, dup.benchmark)))}")
    return table, pd.DataFrame(items, columns=list(ITEMS.columns))


def _pairs(items, what: str, cast=str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SystemExit(f"{what} {item!r}: expected KEY=VALUE")
        out[key] = cast(value)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m probes.lmms_eval_import", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--results", action="append", metavar="STAGE=PATH", help="results of one stage (repeatable)")
    ap.add_argument("--results-dir", help="folder with one sub-folder per stage (default RUN/lmms_eval)")
    ap.add_argument("--target", nargs="+", help="benchmarks that are targets (default: those naming a run.json task)")
    ap.add_argument("--task-map", action="append", metavar="TASK=BENCHMARK", help="rename an lmms-eval task")
    ap.add_argument("--metric", action="append", metavar="TASK=KEY", help='metric key, e.g. chartqa="relaxed_overall,none"')
    ap.add_argument("--scale", action="append", metavar="TASK=FACTOR", help="multiply a task's value to get 0-100")
    ap.add_argument("--only", nargs="+", help="import only these lmms-eval tasks")
    ap.add_argument("--out", help="output table (default RUN/evals.parquet, merged with what is there)")
    args = ap.parse_args(argv)
    run_dir = Path(args.run_dir)
    try:
        results = {k: Path(v) for k, v in _pairs(args.results, "--results").items()}
        if not results:
            folder = Path(args.results_dir or run_dir / "lmms_eval")
            if not folder.is_dir():
                raise ResultsError(f"{folder}: no such folder; give --results STAGE=PATH or --results-dir")
            manifest = read_full(run_dir)
            names = {n for s in manifest["stages"] for n in (str(s["index"]), s["name"], s["path"])}
            results = {d.name: d for d in sorted(folder.iterdir()) if d.is_dir() and d.name in names}
            if not results:
                raise ResultsError(f"{folder}: no sub-folder is named after a stage of {run_dir / 'run.json'}")
        table, items = import_all(run_dir, results, target=args.target, task_map=_pairs(args.task_map, "--task-map"),
                               metric=_pairs(args.metric, "--metric"), scale=_pairs(args.scale, "--scale", float),
                               only=set(args.only) if args.only else None)
        out = Path(args.out or run_dir / "evals.parquet")
        # new rows replace those of the same (stage, benchmark); written atomically under the table's lock,
        # the one probes.evaluate appends under, so an import during an evaluation loses neither's rows
        if len(items):   # items first, as probes.evaluate writes them: an evals row always has its items
            append_items(items_path(out), items.to_dict("records"))
        merged = append_evals(out, table.to_dict("records"))
    except (TableError, ManifestError) as e:
        print(f"lmms_eval_import: {e}", file=sys.stderr)
        return 2
    print(table.pivot(index="stage", columns="benchmark", values="score").round(1).to_string())
    print(f"imported {len(table)} rows ({table.benchmark.nunique()} benchmarks, {table.stage.nunique()} stages) "
          f"into {out} ({len(merged)} rows)"
          + (f"; {len(items)} items from per-sample logs into {items_path(out)}" if len(items) else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
