"""Probe every checkpoint of a run: `python -m probes.run --ckpt-dir DIR [options]` -> DIR/probes.parquet.

    python -m probes.run --ckpt-dir runs/demo/full                       # the run's own caption set
    python -m probes.run --ckpt-dir RUN --captions blip_laion_cc_sbu_558k.json --images LCS-558K/ \\
        --num-samples 1000 --mode both --batch-size 32
    torchrun --nproc-per-node 8 -m probes.run --ckpt-dir RUN ...      # captions sharded over ranks
    python -m probes.run --ckpt-dir RUN --profile study                # the study script's own definition

Checkpoints come from RUN/run.json, or are the sub-folders that are checkpoints (see probes.discover).
Rows already in the table for the same checkpoint and caption subset are skipped, so a rerun continues
where it stopped; rows are written after every checkpoint. A checkpoint that fails is reported and the
others still run; the exit status is then 1. With several processes each rank probes whole batches of
the same length-sorted plan, per-sample values are gathered on rank 0, which alone reduces and writes,
so the table equals the one-process table (the driver: probes.sweep).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd
import torch

from training.chat import tokenizer_of
from training.checkpoints import LoadOptions, load, load_processor
from training.families import CheckpointError

from . import extras as drift_extras
from . import study, table
from .batching import EncodeCache, is_text_only
from .captions import CaptionDataError, load_captions
from .cli import add_loading_arguments
from .decode import MAX_NEW_TOKENS
from .discover import RunDir
from .drift import DriftError
from .engine import Engine
from .sweep import Command, SweepOptions, sweep
from .tokensets import TOKEN_SETS, decoded_vocab, token_set, vocab_fingerprint
from .vision_cache import VisionCache

SHORT = {"teacher-forced": "tf", "generate": "gen"}
MODES = {"teacher-forced": ("teacher-forced",), "generate": ("generate",),
         "both": ("teacher-forced", "generate")}


@dataclass(frozen=True, kw_only=True)
class RunOptions(SweepOptions):
    captions: str | None = None              # the caption set (default: run.json's)
    images: str | None = None
    num_samples: int | None = None
    sample: str = "first"                    # first | random (with seed)
    seed: int = 0
    mode: str = "teacher-forced"             # a key of MODES
    batch_size: int = 32
    max_new_tokens: int = MAX_NEW_TOKENS
    token_sets: list[str] = field(default_factory=lambda: ["number"])
    workers: int | None = None
    compile: bool = False
    no_vision_cache: bool = False
    extras: drift_extras.DriftOptions = field(default_factory=drift_extras.DriftOptions)
    profile: str = "default"                 # study: the study script's probe (probes.study)

    @property
    def load(self) -> LoadOptions:
        opts = super().load
        if self.profile == "study" and opts.device.startswith("cuda"):
            return replace(opts, dtype=torch.float16)      # as the study ran it
        return opts


def parse_args(argv=None) -> RunOptions:
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
    ap.add_argument("--mode", choices=list(MODES), default=None,
                    help="teacher-forced on the reference captions (default), greedy generation (the study's), or both")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per forward pass (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="generation length limit")
    ap.add_argument("--token-sets", default=None,
                    help=f"comma-separated token sets to probe (default number; known: {', '.join(sorted(TOKEN_SETS))})")
    ap.add_argument("--profile", choices=["default", "study"], default="default",
                    help="study: the study script's probe as its code computes it (generation scores, the "
                         "number_study set, its seven statistics, fp16 on a GPU); docs/probes.md")
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
    extras = drift_extras.options(ap, args)
    if args.profile == "study":
        study.configure(ap, args, extras)
    args.mode, args.token_sets = args.mode or "teacher-forced", args.token_sets or "number"
    if args.batch_size < 1:
        ap.error("--batch-size must be at least 1")
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be at least 1")
    token_sets = [s.strip() for s in args.token_sets.split(",") if s.strip()]
    unknown = [s for s in token_sets if s not in TOKEN_SETS]
    if unknown:
        ap.error(f"unknown token set(s) {unknown}; known: {', '.join(sorted(TOKEN_SETS))}")
    return RunOptions.from_args(args, token_sets=token_sets, extras=extras)


def load_run_captions(opts, run: RunDir, text_only: bool = False):
    """The caption set of `opts` (captions, images, num_samples, sample, seed, strict), else the one run.json
    names; for a text-only LM (`text_only`) without images (the instruction and caption alone)."""
    if opts.captions:
        return load_captions(opts.captions, opts.images, opts.num_samples, opts.sample, opts.seed, opts.strict,
                             text_only)
    if run.captions:
        images = opts.images or run.captions.get("images")
        return load_captions(run.captions["path"], images, opts.num_samples, opts.sample, opts.seed, opts.strict,
                             text_only)
    raise CaptionDataError(f"no caption set: pass --captions PATH (and --images DIR); {run.root} has no run.json "
                           "naming one" if not run.manifest else
                           f"no caption set: pass --captions PATH; {run.root / 'run.json'} names none "
                           "(no \"captions\": {\"path\", \"images\"})")


def reference_tokenizer(run: RunDir, opts) -> tuple[Path, object] | None:
    """(path, processor) of the run's tokenizer: the first checkpoint's whose processor loads."""
    for ck in run.checkpoints:
        try:
            return ck.path, load_processor(ck.path, opts.load)
        except CheckpointError:
            continue
    return None


class ProbeRun(Command):
    """Per checkpoint, one unit: the modes the table still lacks, gathered and written together."""
    prog, table_file = "probes.run", "probes.parquet"
    input_errors = Command.input_errors + (DriftError,)

    def setup(self, run, out, procs) -> None:
        super().setup(run, out, procs)
        o = self.opts
        self.reference = reference_tokenizer(run, o)
        self.caps = load_run_captions(o, run, text_only=self.reference is not None and is_text_only(self.reference[1]))
        self.extras = drift_extras.setup(o.extras, run, self.caps, out, o.load, say=procs.say, write=procs.main)
        self.names = {m: self.extras.names(o.token_sets, m) for m in MODES[o.mode]}   # per mode: drift is tf only
        if o.profile == "study":
            self.names = {"generate": list(study.STATISTICS)}
        self.encode_cache = EncodeCache()        # the checkpoints share a processor: encode each caption once
        self.vision_cache = None if o.no_vision_cache else VisionCache()   # LM-only stages share image features

    def plan(self, checkpoints, out):
        """Rank 0 decides, from the table as it is now, what each checkpoint still needs."""
        df = table.read_table(out)
        plan = []
        for ck in checkpoints:
            need, clash = [], None
            for mode in MODES[self.opts.mode]:
                if table.done(df, ck.stage, ck.rel, mode, self.names[mode], self.caps.hash):
                    continue
                c = table.conflicts(df, ck.stage, ck.rel, mode, self.names[mode], self.caps.hash)
                if len(c) and not self.opts.replace:
                    r = c.iloc[0]
                    clash = (f"{out} already has {mode} rows for stage {ck.stage} computed on {r['dataset']} (hash "
                             f"{r['dataset_hash']}, checkpoint {r['checkpoint']}); this run uses {self.caps.name} "
                             f"(hash {self.caps.hash}). Use --out for a separate table, or --replace")
                    break
                need.append(mode)
            plan.append(([tuple(need)] if need else [], clash))
        return plan

    def header(self):
        o, load_opts, caps = self.opts, self.opts.load, self.caps
        return [f"probes.run: {len(self.run.checkpoints)} checkpoint(s) in {self.run.root}; captions {caps.source} "
                f"({len(caps.samples)} samples, hash {caps.hash}); modes {', '.join(MODES[o.mode])}; "
                f"{load_opts.device} {load_opts.dtype}; {self.procs.world} process(es) -> {self.out}"]

    def warnings(self):
        return [self.caps.report()] if self.caps.report() else []

    def start(self, units) -> None:
        """The token sets (of the run's tokenizer) and, for --drift, the base reference."""
        if not units or self.reference is None:      # nothing to do, or every checkpoint fails to load
            return
        tok = tokenizer_of(self.reference[1])
        vocab = decoded_vocab(tok)
        self.set_ids = {s: token_set(tok, s, vocab) for s in self.opts.token_sets} | self.extras.sig_sets
        if self.extras.drift and any("teacher-forced" in modes for modes in units):
            self.extras.start(self.reference[1], self.caps.samples, self.opts.batch_size, self.procs.share,
                              self.opts.load, self.encode_cache, self.vision_cache)

    def open(self, ck) -> Engine:
        processor = load_processor(ck.path, self.opts.load)
        tok, (ref_path, ref) = tokenizer_of(processor), self.reference
        fp, ref_fp = vocab_fingerprint(tok), vocab_fingerprint(tokenizer_of(ref))   # same id -> token map: same sets
        if fp != ref_fp:
            raise CheckpointError(
                f"{ck.path}: its tokenizer ({len(tok)} tokens, fingerprint {fp}) differs from {ref_path}'s "
                f"({len(tokenizer_of(ref))} tokens, {ref_fp}); token-set probes across different vocabularies are not "
                "comparable, so probe it in a run of its own")
        model, processor = load(ck.path, self.opts.load, processor=processor)
        return Engine(model, processor, set_ids=self.set_ids, encode_cache=self.encode_cache,
                      vision_cache=self.vision_cache, workers=self.opts.workers, compile=self.opts.compile)

    def compute(self, eng: Engine, ck, modes) -> dict:
        """This rank's share of every needed mode: {mode: {sample index: values}}."""
        o, samples, main = self.opts, self.caps.samples, self.procs.main
        if o.profile == "study":
            mine = self.procs.share(list(range(len(samples))))
            return {"generate": study.probe_values(eng.model, eng.processor, samples, self.set_ids["number_study"],
                                                   mine, batch_size=o.batch_size, max_new_tokens=o.max_new_tokens,
                                                   progress=main)}
        out = {}
        for mode in modes:
            with_answer = mode == "teacher-forced"
            mine = self.procs.share(eng.plan(samples, o.batch_size, with_answer))
            if with_answer and self.extras.drift:
                out[mode] = self.extras.teacher_forced(eng, samples, mine, progress=main)
            elif with_answer:
                out[mode] = eng.teacher_forced(samples, batches=mine, progress=main)
            else:
                gens = eng.generate(samples, max_new_tokens=o.max_new_tokens, stats=True, batches=mine, progress=main)
                out[mode] = {g.index: g.stats | {"n_positions": g.n_steps} for g in gens}
        return out

    def rows(self, ck, modes, shares) -> list[dict]:
        rows = []
        for mode in modes:
            merged = {}
            for s in shares:
                merged.update(s[mode])
            rows += rows_for(self.run, ck, mode, merged, self.names[mode], self.caps)
        return rows

    def summary(self, status) -> None:
        print_summary(self.run, self.out, status, self.caps.hash)


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


def main(argv=None) -> int:
    return sweep(ProbeRun(parse_args(argv)))


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
