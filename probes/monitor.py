"""The drift monitor's measuring half: the probe `training.run` calls on the model it is training, and what
one check costs next to a held-out evaluation (`python -m probes.monitor_cost`).

The probe (`MonitorProbe`, built by training.run from the `monitor.*` keys; training.monitor, the budget
controller, only calls it): teacher-forced on the first `monitor.captions` captions of the run's caption set,
`number_mass` (the counting-bias probe), `entropy`, the task signatures' `sig_<task>_mass`
(`monitor.signatures`, derived as `probes.run --signatures` derives them, from each run task's training
answers against the first 1000 captions) and, with `monitor.kl`, `kl_to_base` and `top1_agreement` against
stage 0 (whose hidden states at the caption positions are computed once; only its output projection stays
in memory). It is made when stage 0 exists (`reference()`, which also gives stage 0's own values); then
`probe(model) -> (values, seconds)`, deterministic and free of side effects: the model's train/eval mode is
restored and no random number generator is consumed, so the training run stays bitwise the same.

    python -m probes.monitor_cost --ckpt-dir RUN                  # the last stage; the run's monitor settings
    python -m probes.monitor_cost --ckpt-dir RUN --stage 2 --captions 32 --repeats 5

times, on this machine, with the checkpoint already loaded (neither side counts loading):
- the monitor's check exactly as training.run makes it (its one-time setup, stage 0's pass that also
  encodes the captions, is not counted): the first check and the mean of `--repeats` further checks;
- one held-out evaluation: every held-out benchmark of the run (probes.evaluate's resolution, greedy answers,
  scored), `--limit` items each when given.
Prints both and their ratio, and writes RUN/monitor_cost.json for analysis.drift_report.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from torch import nn

from training.chat import tokenizer_of
from training.checkpoints import LoadOptions, load, load_processor
from training.families import CheckpointError

from . import benchmarks as B
from .batching import EncodeCache, is_text_only
from .captions import CaptionDataError, Sample, load_captions, subset_hash
from .cli import pick_device
from .discover import DiscoveryError, discover
from .drift import DRIFT_PROBES, BaseReference, DriftError, teacher_forced
from .engine import Engine
from .signatures import SignatureError, derive, read_answers, set_name, task_files
from .stats import probe_names
from .table import summarize
from .tokensets import decoded_vocab, token_set

SIGNATURE_CAPTIONS = 1000        # captions the signatures are derived against (probes.run's default set)
COST_FILE = "monitor_cost.json"


@dataclass(frozen=True)
class MonitorSettings:
    """The `monitor.*` keys the probe uses; the defaults are training.config's (a test keeps them equal)."""
    captions: int = 16           # the first N captions of the run's caption set
    batch_size: int = 16
    signatures: bool = True      # + sig_<task>_mass of every run task
    kl: bool = True              # + kl_to_base, top1_agreement against stage 0

    @classmethod
    def of(cls, monitor: dict) -> MonitorSettings:
        """From a config's `monitor` section (other keys are the controller's)."""
        return cls(**{f.name: monitor[f.name] for f in fields(cls) if f.name in monitor})


# -- a model being trained, a small fixed caption set ----------------------------------------------------
def unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a PEFT wrapper (its adapters stay active in the forward)."""
    peft = sys.modules.get("peft")
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return model


class _quiet:
    """eval mode, no grad, a forked RNG; restores the model's mode on exit."""

    def __init__(self, model: nn.Module):
        self.model, self.was_training = model, model.training
        devices = [model.device] if getattr(model, "device", torch.device("cpu")).type == "cuda" else []
        self.rng = torch.random.fork_rng(devices=devices)

    def __enter__(self):
        self.rng.__enter__()
        self.model.eval()
        return self

    def __exit__(self, *exc):
        self.model.train(self.was_training)
        return self.rng.__exit__(*exc)


class CaptionProbe:
    """Probes of an in-memory model on a fixed caption set: token-set masses (number, task signatures),
    entropy and, given a base model, kl_to_base / top1_agreement. Deterministic and free of side effects."""

    def __init__(self, processor, samples: Sequence[Sample], set_ids: dict[str, list[int]], *,
                 batch_size: int = 16, base_model: nn.Module | None = None):
        if not samples:
            raise DriftError("the monitor's caption set is empty")
        self.processor, self.samples, self.set_ids = processor, list(samples), dict(set_ids)
        self.cache = EncodeCache()
        self.batch_size = batch_size
        self.batches: list[list[int]] | None = None
        self.ref = None
        self._eng = None
        if base_model is not None:
            with _quiet(base_model):
                self.ref = BaseReference(base_model, processor, encode_cache=self.cache)
                self.batches = self.ref.engine.plan(self.samples, batch_size, True)
                for idx in self.batches:                # cache every batch, then let the base model go
                    self.ref.rows(self.samples, idx)
                if not self.ref.release_model():
                    raise DriftError("the monitor's base hidden states do not fit the cache; use fewer captions")

    @property
    def probe_names(self) -> list[str]:
        return probe_names(self.set_ids) + (list(DRIFT_PROBES) if self.ref is not None else [])

    def engine(self, model: nn.Module) -> Engine:
        """One engine per model object (it reads the live weights), held by a weak reference so that a
        finished stage's model is not kept alive."""
        if self._eng is None or self._eng[0]() is not model:
            self._eng = (weakref.ref(model), Engine(model, self.processor, set_ids=self.set_ids, encode_cache=self.cache))
        return self._eng[1]

    def __call__(self, model: nn.Module) -> tuple[dict[str, dict], float]:
        """({probe: {"mean", "std", "n_samples", "n_positions"}}, seconds)."""
        model = unwrap(model)
        start = time.perf_counter()
        with _quiet(model):
            eng = self.engine(model)
            model.eval()                                 # Engine() sets eval too; _quiet restores the mode
            if self.batches is None:
                self.batches = eng.plan(self.samples, self.batch_size, True)
            if self.ref is not None:
                per = teacher_forced(eng, self.ref, self.samples, self.batches)
            else:
                per = eng.teacher_forced(self.samples, batches=self.batches)
        seconds = time.perf_counter() - start
        ordered = [per[i] for i in range(len(self.samples))]
        n_pos = int(sum(v["n_positions"] for v in ordered))
        out = {}
        for p in self.probe_names:
            s = summarize(v[p] for v in ordered)
            out[p] = {"mean": s["mean"], "std": s["std"], "n_samples": s["n_samples"], "n_positions": n_pos}
        return out, seconds


class MonitorProbe:
    """The drift monitor's probe for one run: `probe_names` (what its values will have) at once, the caption
    probe itself at `reference()`, when stage 0 exists; then `probe(model) -> (values, seconds)`."""

    def __init__(self, settings: MonitorSettings, captions: dict, processor, stage0: Path,
                 task_files: dict[str, Path], opts: LoadOptions):
        self.settings, self.captions, self.processor, self.stage0 = settings, captions, processor, Path(stage0)
        self.task_files, self.opts = dict(task_files) if settings.signatures else {}, opts
        sets = ["number"] + [set_name(t) for t in self.task_files]
        self.probe_names = probe_names(sets) + (list(DRIFT_PROBES) if settings.kl else [])
        self.probe: CaptionProbe | None = None
        self.dataset = self.dataset_hash = None

    def reference(self) -> tuple[dict[str, dict], float]:
        """Build the probe (captions, token sets, signatures, stage 0's hidden states) and return stage 0's
        values and the seconds of that check. `probe_names` then lists the probes it has (a task whose answers
        over-use no token has no signature)."""
        every_caption = load_captions(self.captions["path"], self.captions.get("images"), num_samples=None,
                                      sample="first", text_only=is_text_only(self.processor))
        samples = every_caption.samples[:min(self.settings.captions, len(every_caption.samples))]
        tok = tokenizer_of(self.processor)
        vocab = decoded_vocab(tok)
        set_ids = {"number": token_set(tok, "number", vocab)}
        refs = [s.caption for s in every_caption.samples[:SIGNATURE_CAPTIONS]]
        for name, path in self.task_files.items():
            sig = derive(name, read_answers(path), refs, self.processor, source=str(path), vocab=vocab)
            if sig.tokens:
                set_ids[sig.name] = sig.ids
        base, _ = load(self.stage0, self.opts, processor=self.processor)
        self.probe = CaptionProbe(self.processor, samples, set_ids, batch_size=self.settings.batch_size,
                                  base_model=base if self.settings.kl else None)
        self.probe_names = self.probe.probe_names
        self.dataset, self.dataset_hash = every_caption.name, subset_hash(samples)
        values, seconds = self.probe(base)
        del base
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return values, seconds

    def __call__(self, model: nn.Module) -> tuple[dict[str, dict], float]:
        return self.probe(model)


# -- what a check costs ------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m probes.monitor_cost", description=__doc__.split("\n")[0],
                                 epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt-dir", required=True, help="a run directory (run.json)")
    ap.add_argument("--stage", type=int, default=None, help="which checkpoint (default: the last stage)")
    ap.add_argument("--captions", type=int, default=None, help="monitor captions (default: the run's monitor.captions)")
    ap.add_argument("--repeats", type=int, default=3, help="checks timed after the first (default 3)")
    ap.add_argument("--benchmarks", help="comma-separated held-out benchmarks (default: every held-out one of the run)")
    ap.add_argument("--limit", type=int, default=None, help="items per benchmark (default: all)")
    ap.add_argument("--batch-size", type=int, default=32, help="evaluation batch size (default 32)")
    ap.add_argument("--max-new-tokens", type=int, default=None,
                    help="generation limit for every benchmark (default: each benchmark's own, as probes.evaluate)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    return args


def time_monitor(run, model, processor, settings: MonitorSettings, repeats: int, opts: LoadOptions) -> dict:
    stage0 = min(run.checkpoints, key=lambda c: c.stage)
    probe = MonitorProbe(settings, run.captions, processor, stage0.path,
                         task_files(run.manifest) if settings.signatures else {}, opts)
    probe.reference()
    _, first = probe(model)
    seconds = [probe(model)[1] for _ in range(repeats)]
    return {"captions": len(probe.probe.samples), "probes": probe.probe_names, "dataset": probe.dataset,
            "dataset_hash": probe.dataset_hash, "seconds_first": first, "seconds_per_check": sum(seconds) / len(seconds)}


def time_heldout(run, model, processor, names: list[str] | None, limit: int | None, batch_size: int,
                 max_new_tokens: int | None = None) -> dict:
    from .evaluate import score_predictions

    tasks = B.run_tasks(run.manifest)
    wanted = names or list(run.manifest.get("benchmarks") or [])
    benches = [b for b in B.resolve(wanted, run.manifest, {}) if B.split_of(b, tasks) == "heldout" or names]
    if not benches:
        raise B.BenchmarkError(f"{run.root}: the run names no held-out benchmark; pass --benchmarks NAMES")
    eng = Engine(model, processor, token_sets=(), encode_cache=EncodeCache())
    out, total = {}, 0.0
    for b in benches:
        d = B.load(b, limit)
        start = time.perf_counter()
        gens = eng.generate(d.samples, batch_size=batch_size,
                            max_new_tokens=max_new_tokens or b.max_new_tokens or B.DEFAULT_MAX_NEW_TOKENS)
        score, _ = score_predictions(d, {g.index: g.text.strip() for g in gens})
        sec = time.perf_counter() - start
        total += sec
        out[b.name] = {"items": len(d.items), "seconds": sec, "score": score,
                       "generated_tokens": sum(g.n_steps for g in gens)}
    return {"benchmarks": out, "seconds": total}


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        run = discover(args.ckpt_dir)
        if not run.manifest:
            raise DiscoveryError(f"{run.root}: needs a run directory with run.json (the monitor uses its captions, "
                                 "tasks and stage 0)")
        cks = {c.stage: c for c in run.checkpoints}
        stage = max(cks) if args.stage is None else args.stage
        if stage not in cks:
            raise DiscoveryError(f"{run.root}: no stage {stage} (stages {sorted(cks)})")
        ck = cks[stage]
        device, dtype, attn = pick_device(args.device)
        opts = LoadOptions(dtype=dtype, device=device, attn=attn)
        processor = load_processor(ck.path, opts)
        model, _ = load(ck.path, opts, processor=processor)
        settings = MonitorSettings.of((run.manifest.get("config") or {}).get("monitor") or {})
        if args.captions is not None:
            settings = replace(settings, captions=args.captions)
        mon = time_monitor(run, model, processor, settings, args.repeats, opts)
        names = [n.strip() for n in args.benchmarks.split(",")] if args.benchmarks else None
        held = time_heldout(run, model, processor, names, args.limit, args.batch_size, args.max_new_tokens)
    except (DiscoveryError, CaptionDataError, CheckpointError, B.BenchmarkError, SignatureError, ValueError) as e:
        print(f"probes.monitor_cost: error: {e}", file=sys.stderr)
        return 2
    ratio = held["seconds"] / mon["seconds_per_check"]
    result = {"run": run.name, "stage": stage, "checkpoint": ck.rel, "device": str(device), "monitor": mon,
              "heldout": held, "ratio_heldout_to_check": ratio}
    path = Path(run.root) / COST_FILE
    path.write_text(json.dumps(result, indent=1))
    print(f"monitor check ({mon['captions']} captions, {len(mon['probes'])} probes): "
          f"{mon['seconds_per_check']:.3f} s (first check: {mon['seconds_first']:.3f} s)")
    print(f"held-out evaluation ({len(held['benchmarks'])} benchmarks, "
          f"{sum(b['items'] for b in held['benchmarks'].values())} items): {held['seconds']:.3f} s")
    print(f"ratio: one held-out evaluation = {ratio:.1f} monitor checks  -> {path}")
    return 0
