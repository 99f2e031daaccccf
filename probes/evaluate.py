"""Score benchmarks at every checkpoint: `python -m probes.evaluate --ckpt-dir DIR` -> DIR/evals.parquet.

    python -m probes.evaluate --ckpt-dir runs/demo/full                     # the benchmarks run.json names
    python -m probes.evaluate --ckpt-dir RUN --benchmarks cub200,colour --limit 200
    python -m probes.evaluate --ckpt-dir RUN --benchmark-file docvqa_val=docvqa/val.json \\
        --images docvqa/images --scorer anls --split heldout --max-new-tokens 32
    python -m probes.evaluate --ckpt-dir RUN --registry my_benchmarks.yaml     # several local benchmarks
    torchrun --nproc-per-node 8 -m probes.evaluate --ckpt-dir RUN ...         # batches sharded over ranks

For every checkpoint (probes.discover) and benchmark (probes.benchmarks): batched greedy generation from
each test prompt (probes.engine, the checkpoint's own chat template, raw logits, up to max_new_tokens),
the benchmark's scorer on each answer, and score = 100 x the mean over the items. One row per (stage,
benchmark): run, stage, stage_name, task, recipe, checkpoint, benchmark, split, metric (the scorer), score
(0-100), n (items scored). Rows already in the table for the same checkpoint, metric, split and n are skipped, so
a rerun continues; a row is written after every benchmark (atomically, under the table's lock). A
checkpoint that fails is reported and the others still run; the exit status is then 1 (2: bad input).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import traceback
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from training.checkpoints import load
from training.families import CheckpointError

from . import benchmarks as B
from . import table
from .batching import EncodeCache
from .captions import CaptionDataError
from .cli import add_loading_arguments, load_options
from .discover import DiscoveryError, RunDir, discover
from .engine import Engine
from .run import broadcast, gather, init_distributed
from .scorers import SCORERS, get_scorer


def parse_args(argv=None) -> argparse.Namespace:
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
    if args.benchmarks:
        args.benchmarks = list(dict.fromkeys(n.strip() for s in args.benchmarks for n in s.split(",") if n.strip()))
    return args


# -- planning --------------------------------------------------------------------------------------
def load_benchmarks(args, run: RunDir) -> list[B.BenchmarkData]:
    local: dict[str, B.Benchmark] = {}
    for f in args.registry or []:
        local |= B.from_registry_file(f)
    local |= B.from_cli(args.benchmark_file, args.images, args.scorer, args.split)
    tasks = B.run_tasks(run.manifest)
    out = []
    for b in B.resolve(args.benchmarks, run.manifest, local):
        b = replace(b, split=B.split_of(b, tasks),
                    max_new_tokens=args.max_new_tokens or b.max_new_tokens or B.DEFAULT_MAX_NEW_TOKENS)
        out.append(B.load(b, args.limit, strict=args.strict))
    return out


def plan_work(args, run: RunDir, data: list[B.BenchmarkData], out_path: Path) -> list[tuple[list[int], str | None]]:
    """Per checkpoint: the indices of the benchmarks still to score, and a clash that stops it (rank 0)."""
    df = table.read_evals(out_path)
    plan = []
    for ck in run.checkpoints:
        need, clash = [], None
        for j, d in enumerate(data):
            sel = df[(df["stage"] == ck.stage) & (df["benchmark"] == d.bench.name)] if len(df) else df
            if not len(sel):
                need.append(j)
                continue
            r = sel.iloc[0]
            same = (r["checkpoint"] == ck.rel and r["metric"] == d.bench.scorer and r["split"] == d.bench.split
                    and not pd.isna(r["n"]) and int(r["n"]) == len(d.items))
            if same:
                continue
            if not args.replace:
                clash = (f"{out_path} already has stage {ck.stage} / {d.bench.name} scored on {r['n']} items with "
                         f"{r['metric']} ({r['split']}) for checkpoint {r['checkpoint']}; this run scores "
                         f"{len(d.items)} items with {d.bench.scorer} ({d.bench.split}) for {ck.rel}. Use --out for "
                         "a separate table, or --replace")
                break
            need.append(j)
        plan.append((need, clash))
    return plan


# -- scoring ---------------------------------------------------------------------------------------
def score_predictions(d: B.BenchmarkData, predictions: dict[int, str]) -> tuple[float, list[float]]:
    """(score 0-100, per-item scores): the scorer per item, 100 x the mean."""
    if sorted(predictions) != list(range(len(d.items))):
        raise RuntimeError(f"benchmark {d.bench.name!r}: got predictions for {len(predictions)} of "
                           f"{len(d.items)} items")
    scorer = get_scorer(d.bench.scorer)
    per_item = [float(scorer(predictions[i], it.references)) for i, it in enumerate(d.items)]
    return 100.0 * sum(per_item) / len(per_item), per_item


def generate(eng: Engine, d: B.BenchmarkData, args, rank: int, world: int) -> dict[int, str]:
    """This rank's share: whole batches of the length-sorted plan, every world-th one."""
    mine = eng.plan(d.samples, args.batch_size, False)[rank::world]
    gens = eng.generate(d.samples, max_new_tokens=d.bench.max_new_tokens, batches=mine,
                        padding_side=args.padding_side, progress=rank == 0)
    return {g.index: g.text.strip() for g in gens}


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


def row_for(run: RunDir, ck, d: B.BenchmarkData, score: float) -> dict:
    return {"run": run.name, "stage": ck.stage, "stage_name": ck.stage_name, "task": ck.task, "recipe": run.recipe,
            "checkpoint": ck.rel, "benchmark": d.bench.name, "split": d.bench.split, "metric": d.bench.scorer,
            "score": score, "n": len(d.items)}


def main(argv=None) -> int:
    with contextlib.ExitStack() as held:      # the run lock on the table, released however main ends
        return _main(argv, held)


def _main(argv, held: contextlib.ExitStack) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rank, world = init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    plan = error = None
    try:                      # every rank reads the same inputs and fails alike; only rank 0 reads the table
        run = discover(args.ckpt_dir)
        data = load_benchmarks(args, run)
        out_path = Path(args.out) if args.out else run.root / "evals.parquet"
        if rank == 0:
            held.enter_context(table.RunLock(out_path, "probes.evaluate"))   # a second command on this table is refused
            plan = plan_work(args, run, data, out_path)
    except (DiscoveryError, B.BenchmarkError, CaptionDataError, table.TableError) as e:
        error = str(e)
    plan, error = broadcast((plan, error) if rank == 0 else None, rank, world)
    if error is not None:
        if rank == 0:
            print(f"probes.evaluate: error: {error}", file=sys.stderr)
        return 2
    opts = load_options(args)
    say(f"probes.evaluate: {len(run.checkpoints)} checkpoint(s) in {run.root}; {world} process(es); {opts.device} {opts.dtype} "
        f"-> {out_path}")
    for d in data:
        b = d.bench
        say(f"  {b.name}: {b.split}, {b.scorer}, {len(d.items)} items, max {b.max_new_tokens} new tokens ({b.test})")
    skipped = [f"{d.bench.name}: skipped {d.n_skipped} bad record(s) (--strict makes this an error); the first: "
               f"{d.first_skipped}" for d in data if d.n_skipped]
    for line in skipped if rank == 0 else []:
        print(f"probes.evaluate: warning: {line}", file=sys.stderr)

    status: dict[int, str] = {}
    cache = EncodeCache()          # the checkpoints share a processor: encode each prompt once
    for ck, (need, clash) in tqdm(list(zip(run.checkpoints, plan)), desc="checkpoints", unit="ckpt",
                                  disable=rank != 0):
        if clash:
            status[ck.stage] = f"FAILED: {clash}"
            continue
        if not need:
            status[ck.stage] = "skipped (already in the table)"
            continue
        model = eng = load_error = None
        try:
            model, processor = load(ck.path, opts)
            eng = Engine(model, processor, token_sets=(), encode_cache=cache)
        except Exception as e:  # noqa: BLE001 (reported with the checkpoint; the others still run)
            load_error = _describe(e)
        # every rank learns whether any rank could not load it, so all skip its benchmarks alike
        load_errors = gather(load_error, rank, world)
        load_error = broadcast(next((f"rank {r}: {m}" if world > 1 else m for r, m in enumerate(load_errors)
                                     if m is not None), None) if rank == 0 else None, rank, world)
        failures = [load_error] if load_error is not None else []
        for j in ([] if load_error else tqdm(need, desc=f"stage {ck.stage} benchmarks", unit="bench", leave=False,
                                             disable=rank != 0)):
            d = data[j]
            payload: dict = {}
            try:
                payload["pred"] = generate(eng, d, args, rank, world)
            except Exception as e:  # noqa: BLE001
                payload["error"] = _describe(e)
            parts = gather(payload, rank, world)
            if rank != 0:
                continue
            try:
                errors = [f"rank {r}: {p['error']}" if world > 1 else p["error"] for r, p in enumerate(parts)
                          if "error" in p]
                if errors:
                    raise RuntimeError(errors[0])
                preds = {}
                for p in parts:
                    preds.update(p["pred"])
                score, per_item = score_predictions(d, preds)
                if args.save_predictions:
                    save_predictions(run.root, ck, d, preds, per_item)
                table.append_evals(out_path, [row_for(run, ck, d, score)])
            except Exception as e:  # noqa: BLE001
                failures.append(f"{d.bench.name}: {e}")
        del model, eng
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if rank == 0:
            status[ck.stage] = f"FAILED: {'; '.join(failures)}" if failures else "done"

    failed = [ck for ck in run.checkpoints if status.get(ck.stage, "").startswith("FAILED")]
    if rank == 0:
        print_summary(run, out_path, data, status)
        for ck in failed:
            print(f"probes.evaluate: stage {ck.stage} ({ck.path}) {status[ck.stage]}", file=sys.stderr)
        if failed:
            print(f"probes.evaluate: {len(failed)} checkpoint(s) failed; the others are in {out_path}", file=sys.stderr)
        for line in skipped:
            print(f"probes.evaluate: warning: {line}", file=sys.stderr)
    n_failed = broadcast(len(failed) if rank == 0 else None, rank, world)   # every rank exits alike
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 1 if n_failed else 0


def _describe(e: Exception) -> str:
    msg = f"{type(e).__name__}: {e}"
    if not isinstance(e, (CheckpointError, CaptionDataError, B.BenchmarkError, ValueError)):
        msg += "\n" + traceback.format_exc(limit=3)
    return msg


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
