"""What a drift-monitor check costs next to one held-out evaluation of the same checkpoint.

    python -m probes.monitor_cost --ckpt-dir RUN                  # the last stage; the run's monitor settings
    python -m probes.monitor_cost --ckpt-dir RUN --stage 2 --captions 32 --repeats 5

Times, on this machine, with the checkpoint already loaded (neither side counts loading):
- the monitor's check exactly as training.run makes it (training.monitor.build_probe: the first
  `monitor.captions` captions of the run's caption set, number-token and signature masses, KL against
  stage 0; its one-time setup, stage 0's pass that also encodes the captions, is not counted): the first
  check and the mean of `--repeats` further checks;
- one held-out evaluation: every held-out benchmark of the run (probes.evaluate's resolution, greedy answers,
  scored), `--limit` items each when given.
Prints both and their ratio, and writes RUN/monitor_cost.json for analysis.drift_report.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from training.checkpoints import LoadOptions, load
from training.families import CheckpointError

from . import benchmarks as B
from .batching import EncodeCache
from .captions import CaptionDataError
from .cli import pick_device
from .discover import DiscoveryError, discover
from .engine import Engine
from .signatures import SignatureError, task_files

COST_FILE = "monitor_cost.json"


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


def monitor_settings(manifest: dict, captions: int | None) -> dict:
    from training.config import defaults

    m = defaults()["monitor"] | ((manifest.get("config") or {}).get("monitor") or {})
    if captions is not None:
        m["captions"] = captions
    return m


def time_monitor(run, ck, model, processor, m: dict, repeats: int, opts: LoadOptions) -> dict:
    from training.monitor import build_probe

    stage0 = min(run.checkpoints, key=lambda c: c.stage)
    probe, _, _, dataset, dataset_hash = build_probe(m, run.captions, processor, stage0.path,
                                                     task_files(run.manifest) if m["signatures"] else {}, opts)
    _, first = probe(model)
    seconds = [probe(model)[1] for _ in range(repeats)]
    return {"captions": len(probe.samples), "probes": probe.probe_names, "dataset": dataset,
            "dataset_hash": dataset_hash, "seconds_first": first, "seconds_per_check": sum(seconds) / len(seconds)}


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
        model, processor = load(ck.path, opts)
        m = monitor_settings(run.manifest, args.captions)
        mon = time_monitor(run, ck, model, processor, m, args.repeats, opts)
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


if __name__ == "__main__":
    sys.exit(main())
