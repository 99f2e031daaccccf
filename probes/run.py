"""Probe every checkpoint of a run: `python -m probes.run --ckpt-dir DIR [options]` -> DIR/probes.parquet.

    python -m probes.run --ckpt-dir runs/demo/full                       # the run's own caption set
    python -m probes.run --ckpt-dir RUN --captions blip_laion_cc_sbu_558k.json --images LCS-558K/ \\
        --num-samples 1000 --mode both --batch-size 32
    torchrun --nproc-per-node 8 -m probes.run --ckpt-dir RUN ...      # captions sharded over ranks

Checkpoints come from RUN/run.json, or are the sub-folders that are checkpoints (see probes.discover).
Rows already in the table for the same checkpoint and caption subset are skipped, so a rerun continues
where it stopped; rows are written after every checkpoint. A checkpoint that fails is reported and the
others still run; the exit status is then 1. With several processes each rank probes whole batches of
the same length-sorted plan, per-sample values are gathered on rank 0, which alone reduces and writes,
so the table equals the one-process table.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import traceback
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from training.checkpoints import LoadOptions, load, load_processor
from training.families import CheckpointError

from . import extras as drift_extras
from . import table
from .batching import EncodeCache
from .captions import CaptionDataError, load_captions
from .cli import add_loading_arguments, load_options
from .decode import MAX_NEW_TOKENS
from .discover import DiscoveryError, RunDir, discover
from .drift import DriftError
from .engine import Engine
from .tokensets import TOKEN_SETS, decoded_vocab, token_set, vocab_fingerprint
from .vision_cache import VisionCache

SHORT = {"teacher-forced": "tf", "generate": "gen"}
MODES = {"teacher-forced": ("teacher-forced",), "generate": ("generate",),
         "both": ("teacher-forced", "generate")}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m probes.run", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1] + "\nDefinitions: docs/probes.md",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", required=True, help="a run directory (run.json) or a folder of checkpoints")
    ap.add_argument("--captions", help="LCS-558K-style JSON, JSONL, parquet or HF dataset folder "
                                       "(default: the caption set run.json names)")
    ap.add_argument("--images", help="images root (default: run.json's, else the caption file's folder)")
    ap.add_argument("--num-samples", type=int, default=None,
                    help="how many captions (default: the first 1000, or all if fewer)")
    ap.add_argument("--sample", choices=["first", "random"], default="first",
                    help="first N records (the study's choice) or N at random with --seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=list(MODES), default="teacher-forced",
                    help="teacher-forced on the reference captions (default), greedy generation (the study's), or both")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="generation length limit")
    ap.add_argument("--token-sets", default="number",
                    help=f"comma-separated token sets to probe (known: {', '.join(sorted(TOKEN_SETS))})")
    ap.add_argument("--out", help="the table (default: CKPT_DIR/probes.parquet)")
    add_loading_arguments(ap, records="caption record")
    ap.add_argument("--workers", type=int, default=None,
                    help="image preprocessing processes (default: 0 on a CPU, up to 8 beside a GPU)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decoder layers (GPUs)")
    ap.add_argument("--no-vision-cache", action="store_true",
                    help="recompute image features for every checkpoint (by default checkpoints whose vision "
                         "encoder and projector are bitwise equal share them)")
    ap.add_argument("--replace", action="store_true",
                    help="replace rows computed on a different caption subset instead of stopping")
    drift_extras.add_arguments(ap)
    args = ap.parse_args(argv)
    drift_extras.check_arguments(ap, args)
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    args.token_sets = [s.strip() for s in args.token_sets.split(",") if s.strip()]
    unknown = [s for s in args.token_sets if s not in TOKEN_SETS]
    if unknown:
        ap.error(f"unknown token set(s) {unknown}; known: {', '.join(sorted(TOKEN_SETS))}")
    return args


# -- processes -------------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def gather(obj, rank: int, world: int) -> list | None:
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast(obj, rank: int, world: int):
    if world == 1:
        return obj
    import torch.distributed as dist

    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# -- the work --------------------------------------------------------------------------------------
def caption_set(args, run: RunDir):
    if args.captions:
        return load_captions(args.captions, args.images, args.num_samples, args.sample, args.seed, args.strict)
    if run.captions:
        images = args.images or run.captions.get("images")
        return load_captions(run.captions["path"], images, args.num_samples, args.sample, args.seed, args.strict)
    raise CaptionDataError(f"no caption set: pass --captions PATH (and --images DIR); {run.root} has no run.json "
                           "naming one" if not run.manifest else
                           f"no caption set: pass --captions PATH; {run.root / 'run.json'} names none "
                           "(no \"captions\": {\"path\", \"images\"})")


def probe_checkpoint(ck, processor, args, caps, modes, opts: LoadOptions, set_ids, rank, world,
                     cache=None, vision_cache=None) -> dict:
    """This rank's share of every needed mode: {mode: {sample index: values}}. Raises on failure."""
    extras = getattr(args, "extras", None)          # drift and task signatures (probes.extras)
    set_ids = set_ids | extras.sig_sets if extras is not None else set_ids
    model, processor = load(ck.path, opts, processor=processor)
    try:
        eng = Engine(model, processor, set_ids=set_ids, encode_cache=cache, vision_cache=vision_cache,
                     workers=getattr(args, "workers", None), compile=getattr(args, "compile", False))
        out = {}
        for mode in modes:
            with_answer = mode == "teacher-forced"
            mine = eng.plan(caps.samples, args.batch_size, with_answer)[rank::world]
            if with_answer and extras is not None and extras.drift:
                out[mode] = extras.teacher_forced(eng, caps.samples, mine, opts=opts, cache=cache, progress=rank == 0)
            elif with_answer:
                out[mode] = eng.teacher_forced(caps.samples, batches=mine, progress=rank == 0)
            else:
                gens = eng.generate(caps.samples, max_new_tokens=args.max_new_tokens, stats=True, batches=mine,
                                    progress=rank == 0)
                out[mode] = {g.index: g.stats | {"n_positions": g.n_steps} for g in gens}
        return out
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def rows_for(run: RunDir, ck, mode: str, per_sample: dict[int, dict], names: list[str], caps) -> list[dict]:
    n = len(caps.samples)
    if sorted(per_sample) != list(range(n)):
        raise RuntimeError(f"{ck.path}: {mode}: got values for {len(per_sample)} of {n} samples")
    ordered = [per_sample[i] for i in range(n)]
    n_pos = int(sum(v["n_positions"] for v in ordered))
    rows = []
    for p in names:
        rows.append({"run": run.name, "stage": ck.stage, "stage_name": ck.stage_name, "task": ck.task,
                     "recipe": run.recipe, "checkpoint": ck.rel, "probe": p, "mode": mode,
                     **table.summarize(v[p] for v in ordered), "n_positions": n_pos,
                     "dataset": caps.name, "dataset_hash": caps.hash})
    return rows


def plan_work(args, run, caps, names, out_path) -> list[tuple]:
    """Rank 0 decides, from the table as it is now, what each checkpoint still needs."""
    df = table.read_table(out_path)
    plan = []
    for ck in run.checkpoints:
        need, clash = [], None
        for mode in MODES[args.mode]:
            if table.done(df, ck.stage, ck.rel, mode, names[mode], caps.hash):
                continue
            c = table.conflicts(df, ck.stage, ck.rel, mode, names[mode], caps.hash)
            if len(c) and not args.replace:
                r = c.iloc[0]
                clash = (f"{out_path} already has {mode} rows for stage {ck.stage} computed on "
                         f"{r['dataset']} (hash {r['dataset_hash']}, checkpoint {r['checkpoint']}); this run uses "
                         f"{caps.name} (hash {caps.hash}). Use --out for a separate table, or --replace")
                break
            need.append(mode)
        plan.append((need, clash))
    return plan


def main(argv=None) -> int:
    with contextlib.ExitStack() as held:      # the run lock on the table, released however main ends
        return _main(argv, held)


def _main(argv, held: contextlib.ExitStack) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()      # one bar per checkpoint and per batch is ours; no weight-loading bars
    rank, world = init_distributed()
    say = print if rank == 0 else (lambda *a, **k: None)
    plan = error = None
    try:                      # every rank reads the same inputs and fails alike; only rank 0 reads the table
        run = discover(args.ckpt_dir)
        caps = caption_set(args, run)
        out_path = Path(args.out) if args.out else run.root / "probes.parquet"
        args.extras = drift_extras.setup(args, run, caps, out_path, rank, say=print if rank == 0 else lambda *a: None)
        names = {m: args.extras.names(args.token_sets, m) for m in MODES[args.mode]}   # per mode: drift is tf only
        if rank == 0:
            held.enter_context(table.RunLock(out_path, "probes.run"))   # a second command on this table is refused
            plan = plan_work(args, run, caps, names, out_path)
    except (DiscoveryError, CaptionDataError, CheckpointError, table.TableError, DriftError) as e:
        error = str(e)
    plan, error = broadcast((plan, error) if rank == 0 else None, rank, world)
    if error is not None:
        if rank == 0:
            print(f"probes.run: error: {error}", file=sys.stderr)
        return 2
    opts = load_options(args)
    say(f"probes.run: {len(run.checkpoints)} checkpoint(s) in {run.root}; captions {caps.source} "
        f"({len(caps.samples)} samples, hash {caps.hash}); modes {', '.join(MODES[args.mode])}; {opts.device} {opts.dtype}; "
        f"{world} process(es) -> {out_path}")
    if rank == 0 and caps.report():
        print(f"probes.run: warning: {caps.report()}", file=sys.stderr)

    status: dict[int, str] = {}
    ref = None                          # (path, fingerprint, vocabulary size) of the run's tokenizer
    set_cache: dict[str, dict] = {}
    encode_cache = EncodeCache()        # the checkpoints share a processor: encode each caption once
    vision_cache = None if args.no_vision_cache else VisionCache()   # LM-only stages share image features
    for ck, (need, clash) in tqdm(list(zip(run.checkpoints, plan)), desc="checkpoints", unit="ckpt",
                                  disable=rank != 0):
        if clash:
            status[ck.stage] = f"FAILED: {clash}"
            continue
        if ref is None or need:
            try:
                processor = load_processor(ck.path, opts)
                fp = vocab_fingerprint(processor.tokenizer)    # same id -> token map = same token sets
                if ref is None:
                    ref = (ck.path, fp, len(processor.tokenizer))
                elif fp != ref[1]:
                    raise CheckpointError(
                        f"{ck.path}: its tokenizer ({len(processor.tokenizer)} tokens, fingerprint {fp}) differs "
                        f"from {ref[0]}'s ({ref[2]} tokens, {ref[1]}); token-set probes across different "
                        "vocabularies are not comparable, so probe it in a run of its own")
            except CheckpointError as e:
                processor, err = None, e
            else:
                err = None
        if not need:
            status[ck.stage] = "skipped (already in the table)"
            continue
        payload: dict = {}
        try:
            if err is not None:
                raise err
            if fp not in set_cache:
                vocab = decoded_vocab(processor.tokenizer)
                set_cache[fp] = {s: token_set(processor.tokenizer, s, vocab) for s in args.token_sets}
            payload["values"] = probe_checkpoint(ck, processor, args, caps, need, opts,
                                                 set_cache[fp], rank, world, encode_cache, vision_cache)
        except Exception as e:  # any failure of one checkpoint: report it, keep going with the others
            payload["error"] = f"{type(e).__name__}: {e}"
            if not isinstance(e, (CheckpointError, CaptionDataError, ValueError)):
                payload["error"] += "\n" + traceback.format_exc(limit=3)
        parts = gather(payload, rank, world)
        if rank != 0:
            continue
        errors = [f"rank {r}: {p['error']}" if world > 1 else p["error"] for r, p in enumerate(parts) if "error" in p]
        if errors:
            status[ck.stage] = f"FAILED: {errors[0]}"
            continue
        rows = []
        try:
            for mode in need:
                merged = {}
                for p in parts:
                    merged.update(p["values"][mode])
                rows += rows_for(run, ck, mode, merged, names[mode], caps)
            table.append_rows(out_path, rows)
            status[ck.stage] = "done"
        except Exception as e:
            status[ck.stage] = f"FAILED: {type(e).__name__}: {e}"

    failed = [ck for ck in run.checkpoints if status.get(ck.stage, "").startswith("FAILED")]
    if rank == 0:
        print_summary(run, out_path, status, caps.hash)
        for ck in failed:
            print(f"probes.run: stage {ck.stage} ({ck.path}) {status[ck.stage]}", file=sys.stderr)
        if failed:
            print(f"probes.run: {len(failed)} checkpoint(s) failed; the others are in {out_path}", file=sys.stderr)
        if caps.report():
            print(f"probes.run: warning: {caps.report()}", file=sys.stderr)
    n_failed = broadcast(len(failed) if rank == 0 else None, rank, world)   # every rank exits alike
    if world > 1:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 1 if n_failed else 0


def print_summary(run: RunDir, out_path: Path, status: dict[int, str], dataset_hash: str) -> None:
    df = table.read_table(out_path)
    df = df[df["dataset_hash"] == dataset_hash] if len(df) else df
    lines = []
    for ck in run.checkpoints:
        row = {"stage": ck.stage, "name": ck.stage_name}
        sel = df[df["stage"] == ck.stage] if len(df) else df
        for _, r in sel.iterrows():
            row[f"{r['probe']} [{SHORT[r['mode']]}]"] = f"{r['mean']:.4f} ± {(r['ci_high'] - r['ci_low']) / 2:.4f}"
        st = status.get(ck.stage, "").splitlines()[0] if status.get(ck.stage) else ""
        row["status"] = st if len(st) <= 100 else st[:97] + "..."
        lines.append(row)
    with pd.option_context("display.max_columns", None, "display.width", 250, "display.max_colwidth", 120):
        print(f"\n{out_path} (mean ± 95% CI half-width over samples; tf = teacher-forced, gen = generate)")
        print(pd.DataFrame(lines).fillna("").to_string(index=False))


if __name__ == "__main__":
    sys.exit(main())
