"""Score benchmarks at every checkpoint: `python -m probes.evaluate --ckpt-dir DIR` -> DIR/evals.parquet.

    python -m probes.evaluate --ckpt-dir runs/demo/full                     # the benchmarks run.json names
    python -m probes.evaluate --ckpt-dir RUN --benchmarks cub200,colour --limit 200
    python -m probes.evaluate --ckpt-dir RUN --benchmark-file docvqa_val=docvqa/val.json \\
        --images docvqa/images --scorer anls --split heldout --max-new-tokens 32
    python -m probes.evaluate --ckpt-dir RUN --registry my_benchmarks.yaml     # several local benchmarks
    python -m probes.evaluate --ckpt-dir RUN --preset ai2d=/data/ai2d --preset mmstar=/data/MMStar \
        --profile study                        # study benchmarks as lmms-eval prompts and scores them
    torchrun --nproc-per-node 8 -m probes.evaluate --ckpt-dir RUN ...         # batches sharded over ranks

For every checkpoint (probes.discover) and benchmark (probes.benchmarks): batched greedy generation from
each test prompt (probes.engine, the checkpoint's own chat template, raw logits, up to max_new_tokens),
the benchmark's scorer on each answer, and score = 100 x the mean over the items. One row per (stage,
benchmark): run, stage, stage_name, task, recipe, checkpoint, benchmark, split, metric (the scorer), score
(0-100), n (items scored). Rows already in the table for the same checkpoint, metric, split and n are skipped, so
a rerun continues; a row is written after every benchmark (atomically, under the table's lock). A
checkpoint that fails is reported and the others still run; the exit status is then 1 (2: bad input).
Per item (RUN/items.parquet: run, stage, benchmark, item_id, prediction, score 0-1, metric) the answers
and their scores are kept too. A --preset benchmark (probes.presets, docs/benchmarks.md) takes its prompt,
generation limit, scorer and aggregation from its preset in the chosen --profile; its rows add the
columns preset and profile.
The driver (processes, lock, resume, failures) is probes.sweep's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from training.checkpoints import load

from . import benchmarks as B
from . import table
from .batching import EncodeCache
from .cli import add_loading_arguments
from .discover import RunDir
from .engine import Engine
from .preset_data import PresetData, load_preset
from .presets import ALIASES, PROFILES
from .scorers import SCORERS, get_scorer
from .sweep import Command, SweepOptions, sweep


@dataclass(frozen=True, kw_only=True)
class EvaluateOptions(SweepOptions):
    benchmarks: list[str] | None = None       # names (default: run.json's, then every local one)
    benchmark_file: list[str] | None = None   # NAME=PATH local benchmarks
    images: str | None = None                 # their images root
    scorer: str | None = None                 # their scorer
    split: str | None = None                  # their split
    registry: list[str] | None = None         # YAML/JSON benchmark registries
    preset: list[str] | None = None           # NAME=PATH study benchmarks read and scored by probes.presets
    profile: str | None = None                # their profile (default: run.json's eval.profile, else lmms-eval)
    limit: int | None = None
    max_new_tokens: int | None = None
    batch_size: int = 32
    padding_side: str = "left"
    save_predictions: bool = False


def parse_args(argv=None) -> EvaluateOptions:
    ap = argparse.ArgumentParser(prog="python -m probes.evaluate", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1] + "\nBenchmark sources: probes/benchmarks.py; "
                                 "docs/probes.md", formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", required=True, help="a run directory (run.json) or a folder of checkpoints")
    ap.add_argument("--benchmarks", nargs="+", metavar="NAMES",
                    help="benchmark names, comma- or space-separated (default: run.json's, then every "
                         "--registry / --benchmark-file one)")
    ap.add_argument("--benchmark-file", action="append", metavar="NAME=PATH",
                    help="a local benchmark: LLaVA JSON/JSONL test file (repeatable)")
    ap.add_argument("--images", help="images root of the --benchmark-file benchmarks (default: each file's folder)")
    ap.add_argument("--scorer", help=f"scorer of the --benchmark-file benchmarks ({', '.join(sorted(SCORERS))})")
    ap.add_argument("--split", choices=["target", "heldout"],
                    help="split of the --benchmark-file benchmarks (default: target if it names a run task)")
    ap.add_argument("--registry", action="append", metavar="FILE",
                    help="YAML/JSON file defining benchmarks {name: {test, images, scorer, split, max_new_tokens}}")
    ap.add_argument("--preset", action="append", metavar="NAME=PATH",
                    help="a study benchmark's local copy (Hub snapshot, save_to_disk folder or TSV), prompted and "
                         "scored as lmms-eval does (probes.presets; docs/benchmarks.md) (repeatable)")
    ap.add_argument("--profile", choices=PROFILES,
                    help="the presets' lmms-eval version: study (the paper's fork) or lmms-eval (current main); "
                         "default: the run config's eval.profile, else lmms-eval")
    ap.add_argument("--limit", type=int, default=None,
                    help="score only the first N records of each benchmark (the first N good ones, without --strict)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help=f"generation length limit for every benchmark (default: each benchmark's own, else "
                         f"{B.DEFAULT_MAX_NEW_TOKENS})")
    ap.add_argument("--batch-size", type=int, default=32, help="prompts per forward pass (default 32)")
    ap.add_argument("--padding-side", choices=["left", "right"], default="left",
                    help="batch padding (results do not depend on it; left is the faster)")
    ap.add_argument("--save-predictions", action="store_true",
                    help="also write RUN/predictions/STAGE/BENCHMARK.jsonl (id, turn, prediction, references, score)")
    ap.add_argument("--out", help="the table (default: CKPT_DIR/evals.parquet)")
    add_loading_arguments(ap, records="benchmark record")
    ap.add_argument("--replace", action="store_true",
                    help="recompute rows whose checkpoint, metric or n differ from this run's instead of stopping")
    args = ap.parse_args(argv)
    for flag in ("batch_size", "max_new_tokens", "limit"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    names = args.benchmarks and list(dict.fromkeys(n.strip() for s in args.benchmarks for n in s.split(",")
                                                   if n.strip()))
    return EvaluateOptions.from_args(args, benchmarks=names)


# -- planning --------------------------------------------------------------------------------------
def load_benchmarks(opts: EvaluateOptions, run: RunDir) -> list[B.BenchmarkData]:
    local: dict[str, B.Benchmark] = {}
    for f in opts.registry or []:
        local |= B.from_registry_file(f)
    local |= B.from_cli(opts.benchmark_file, opts.images, opts.scorer, opts.split)
    tasks = B.run_tasks(run.manifest)
    out = []
    presets, profile = run_presets(opts, run.manifest)
    rest = _without(run.manifest, presets)
    # --preset alone: run.json's benchmarks are not added; config presets covering all of them: none are left
    only_presets = presets and not (opts.benchmarks or local) and (opts.preset or not rest.get("benchmarks"))
    for b in [] if only_presets else B.resolve(opts.benchmarks, rest, local):
        b = replace(b, split=B.split_of(b, tasks),
                    max_new_tokens=opts.max_new_tokens or b.max_new_tokens or B.DEFAULT_MAX_NEW_TOKENS)
        out.append(B.load(b, opts.limit, strict=opts.strict))
    for spec in presets:
        d = load_preset(spec, profile, opts.limit, strict=opts.strict)
        d.bench = replace(d.bench, split=B.split_of(d.bench, tasks),
                          max_new_tokens=opts.max_new_tokens or d.bench.max_new_tokens)
        out.append(d)
    return out


def run_presets(opts: EvaluateOptions, manifest: dict) -> tuple[list[str], str]:
    """The NAME=PATH presets to score and their profile: the flags', else (without --benchmarks, --preset,
    --benchmark-file or --registry) the run config's eval.presets; the profile likewise."""
    ev = (manifest.get("config") or {}).get("eval") or {}
    flags = opts.preset or opts.benchmarks or opts.benchmark_file or opts.registry
    specs = opts.preset or ([] if flags else [f"{n}={p}" for n, p in (ev.get("presets") or {}).items()])
    return specs, opts.profile or ev.get("profile") or "lmms-eval"


def _without(manifest: dict, presets: list[str]) -> dict:
    """run.json with the benchmarks that presets score taken out of its "benchmarks" list."""
    names = {n for spec in presets for n in (spec.partition("=")[0], _canonical(spec.partition("=")[0]))}
    return {**manifest, "benchmarks": [b for b in manifest.get("benchmarks") or [] if b not in names]}


def _canonical(name: str) -> str:
    return ALIASES.get(name, name)


# -- scoring ---------------------------------------------------------------------------------------
def score_predictions(d: B.BenchmarkData, predictions: dict[int, str]) -> tuple[float, list[float]]:
    """(score 0-100, per-item scores): the scorer per item, 100 x the mean."""
    if sorted(predictions) != list(range(len(d.items))):
        raise RuntimeError(f"benchmark {d.bench.name!r}: got predictions for {len(predictions)} of "
                           f"{len(d.items)} items")
    if isinstance(d, PresetData):
        return d.score([predictions[i] for i in range(len(d.items))])
    scorer = get_scorer(d.bench.scorer)
    per_item = [float(scorer(predictions[i], it.references)) for i, it in enumerate(d.items)]
    return 100.0 * sum(per_item) / len(per_item), per_item


def save_predictions(root: Path, ck, d: B.BenchmarkData, predictions: dict[int, str], per_item: list[float]) -> Path:
    stage_dir = ck.path.name if ck.rel not in (".", "") else ck.stage_name
    path = root / "predictions" / stage_dir / f"{d.bench.name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for i, it in enumerate(d.items):
            f.write(json.dumps({"id": it.record_id, "turn": it.turn, "prediction": predictions[i],
                                "references": it.references, "score": per_item[i]}, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def item_rows(run: RunDir, ck, d: B.BenchmarkData, predictions: dict[int, str], per_item: list) -> list[dict]:
    """One row per item: item_id = the record's id (a preset's: the row number), '#turn' after the first
    turn; where those repeat (ids need not be unique in LLaVA files), the item's position instead."""
    ids = [it.record_id if it.turn == 0 else f"{it.record_id}#{it.turn}" for it in d.items]
    if len(set(ids)) < len(ids):
        ids = [str(i) for i in range(len(ids))]
    return [{"run": run.name, "stage": ck.stage, "benchmark": d.bench.name, "item_id": item_id,
             "prediction": predictions[i], "score": per_item[i], "metric": d.bench.scorer}
            for i, item_id in enumerate(ids)]


def row_for(run: RunDir, ck, d: B.BenchmarkData, score: float) -> dict:
    return {"run": run.name, "stage": ck.stage, "stage_name": ck.stage_name, "task": ck.task, "recipe": run.recipe,
            "checkpoint": ck.rel, "benchmark": d.bench.name, "split": d.bench.split, "metric": d.bench.scorer,
            "score": score, "n": len(d.items), **_preset_columns(d)}


def _preset_columns(d: B.BenchmarkData) -> dict:
    """evals.parquet's added preset and profile columns, for benchmarks from presets (others: empty there)."""
    return {"preset": d.preset.name, "profile": d.preset.profile} if isinstance(d, PresetData) else {}


def _recorded(value) -> str | None:
    return None if value is None or pd.isna(value) else value


def _same_profile(row, profile: str | None) -> bool:
    return _recorded(row.get("profile")) == profile


def _profile_note(profile) -> str:
    return f", {_recorded(profile)} profile" if _recorded(profile) else ""


class Evaluate(Command):
    """Per checkpoint, one unit per benchmark still to score: its answers generated in shares, scored and written."""
    prog, table_file, unit_desc = "probes.evaluate", "evals.parquet", "benchmarks"
    input_errors = (*Command.input_errors, B.BenchmarkError)
    known_errors = (*Command.known_errors, B.BenchmarkError)

    def setup(self, run, out, procs) -> None:
        super().setup(run, out, procs)
        self.data = load_benchmarks(self.opts, run)
        self.cache = EncodeCache()          # the checkpoints share a processor: encode each prompt once

    def plan(self, checkpoints, out) -> list[tuple[list[int], str | None]]:
        """Per checkpoint: the indices of the benchmarks still to score, and a clash that stops it."""
        df = table.read_evals(out)
        plan = []
        for ck in checkpoints:
            need, clash = [], None
            for j, d in enumerate(self.data):
                sel = df[(df["stage"] == ck.stage) & (df["benchmark"] == d.bench.name)] if len(df) else df
                if not len(sel):
                    need.append(j)
                    continue
                r = sel.iloc[0]
                same = (r["checkpoint"] == ck.rel and r["metric"] == d.bench.scorer and r["split"] == d.bench.split
                        and not pd.isna(r["n"]) and int(r["n"]) == len(d.items)
                        and _same_profile(r, _preset_columns(d).get("profile")))
                if same:
                    continue
                if not self.opts.replace:
                    was, now = _profile_note(r.get("profile")), _profile_note(_preset_columns(d).get("profile"))
                    clash = (f"{out} already has stage {ck.stage} / {d.bench.name} scored on {r['n']} items with "
                             f"{r['metric']} ({r['split']}{was}) for checkpoint {r['checkpoint']}; this run scores "
                             f"{len(d.items)} items with {d.bench.scorer} ({d.bench.split}{now}) for {ck.rel}. Use "
                             "--out for a separate table, or --replace")
                    break
                need.append(j)
            plan.append((need, clash))
        return plan

    def header(self) -> list[str]:
        o = self.opts.load
        lines = [f"probes.evaluate: {len(self.run.checkpoints)} checkpoint(s) in {self.run.root}; {self.procs.world} "
                 f"process(es); {o.device} {o.dtype} -> {self.out}"]
        return lines + [f"  {b.name}: {b.split}, {b.scorer}, {len(d.items)} items, max {b.max_new_tokens} new tokens "
                        f"({b.test})" for d in self.data for b in [d.bench]]

    def warnings(self) -> list[str]:
        return [f"{d.bench.name}: skipped {d.n_skipped} bad record(s) (--strict makes this an error); the first: "
                f"{d.first_skipped}" for d in self.data if d.n_skipped]

    def open(self, ck) -> Engine:
        model, processor = load(ck.path, self.opts.load)
        return Engine(model, processor, token_sets=(), encode_cache=self.cache)

    def compute(self, eng: Engine, ck, j: int) -> dict[int, str]:
        """This rank's share: whole batches of the length-sorted plan, every world-th one."""
        d = self.data[j]
        mine = self.procs.share(eng.plan(d.samples, self.opts.batch_size, False))
        gens = eng.generate(d.samples, max_new_tokens=d.bench.max_new_tokens, batches=mine,
                            padding_side=self.opts.padding_side, progress=self.procs.main)
        return {g.index: g.text.strip() for g in gens}

    def label(self, j: int) -> str:
        return self.data[j].bench.name

    def rows(self, ck, j: int, shares: list[dict[int, str]]) -> list[dict]:
        """The benchmark's row; its items' answers and scores go to the item table (written first, so a
        benchmark row always has its items) and, with --save-predictions, to a JSONL file."""
        d, preds = self.data[j], {}
        for s in shares:
            preds.update(s)
        score, per_item = score_predictions(d, preds)
        table.append_items(table.items_path(self.out), item_rows(self.run, ck, d, preds, per_item))
        if self.opts.save_predictions:
            save_predictions(self.run.root, ck, d, preds, per_item)
        return [row_for(self.run, ck, d, score)]

    def append(self, out, rows) -> None:
        table.append_evals(out, rows)

    def summary(self, status) -> None:
        print_summary(self.run, self.out, self.data, status)


def main(argv=None) -> int:
    return sweep(Evaluate(parse_args(argv)))


def print_summary(run: RunDir, out_path: Path, data: list[B.BenchmarkData], status: dict[int, str]) -> None:
    """Per checkpoint: each benchmark's score, the target and held-out means, and what happened."""
    df = table.read_evals(out_path)
    names = [d.bench.name for d in data]
    split = {d.bench.name: d.bench.split for d in data}
    lines = []
    for ck in run.checkpoints:
        row = {"stage": ck.stage, "name": ck.stage_name}
        sel = df[(df["stage"] == ck.stage) & df["benchmark"].isin(names)] if len(df) else df
        scores = dict(zip(sel["benchmark"], sel["score"]))
        for n in names:
            row[f"{n} [{'T' if split[n] == 'target' else 'H'}]"] = f"{scores[n]:.1f}" if n in scores else ""
        for s, label in (("target", "target avg"), ("heldout", "heldout avg")):
            vals = [scores[n] for n in names if split[n] == s and n in scores]
            row[label] = f"{sum(vals) / len(vals):.1f}" if vals else ""
        st = status.get(ck.stage, "").splitlines()[0] if status.get(ck.stage) else ""
        row["status"] = st if len(st) <= 100 else st[:97] + "..."
        lines.append(row)
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 120):
        print(f"\n{out_path} (score 0-100; [T] target, [H] held-out)")
        print(pd.DataFrame(lines).to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
