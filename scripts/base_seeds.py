"""How much the world's base model depends on its seed: build it with several seeds, report each ability's spread.

    python scripts/base_seeds.py --seeds 0,1,2 --out runs/base-seeds [--jobs 3] [--size toy]

Each seed is a full `training.world.base.pretrain` (the shipped plan, its processes included; the seed draws
the initial weights and the data order) into OUT/seedN, run `--jobs` at a time;
a seed already built there is reused. Prints, per task of the quick check, each seed's accuracy and
the spread (max - min), and writes OUT/spread.json. docs/world.md records the measured spread and the
range tests/test_base_range.py holds the cached base to.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def build(family: str, size: str, seed: int, out: str, threads: int) -> dict:
    import torch

    from training.run import run_in_processes
    from training.world.base import BASE_JSON, is_built, pretrain

    torch.set_num_threads(threads)
    if not is_built(out):
        t0 = time.perf_counter()
        pretrain(family, size, out, run_in_processes, seed=seed, overrides=["train.progress=false"])
        print(f"seed {seed}: built in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads((Path(out) / BASE_JSON).read_text())


def spread(reports: dict[int, dict]) -> dict:
    """{task: {"seeds": {seed: accuracy}, "mean", "min", "max", "spread"}} over the seeds' quick checks."""
    tasks = next(iter(reports.values()))["quick_check"]
    out = {}
    for task in tasks:
        acc = {s: r["quick_check"][task]["accuracy"] for s, r in reports.items()}
        vals = list(acc.values())
        out[task] = {"seeds": acc, "mean": round(statistics.mean(vals), 2), "min": min(vals), "max": max(vals),
                     "spread": round(max(vals) - min(vals), 2), "chance": tasks[task]["chance"]}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    ap.add_argument("--out", required=True, help="folder for OUT/seedN and OUT/spread.json")
    ap.add_argument("--family", default="qwen2_5_vl")
    ap.add_argument("--size", default="toy")
    ap.add_argument("--jobs", type=int, default=None,
                    help="builds at a time (default: as many as the cores hold, each build taking the plan's processes)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    from training.world.base import PRETRAIN_PROCESSES

    cores = os.cpu_count() or 1
    jobs = args.jobs or max(1, min(len(seeds), cores // PRETRAIN_PROCESSES[args.size]))
    threads = max(1, cores // jobs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from training.world.build import ensure_world
    from training.world.models import WORLD_OF_SIZE

    ensure_world(size=WORLD_OF_SIZE[args.size])  # once, before the workers race for it
    t0 = time.perf_counter()
    with ProcessPoolExecutor(jobs) as pool:
        futures = {s: pool.submit(build, args.family, args.size, s, str(out / f"seed{s}"), threads) for s in seeds}
        reports = {s: f.result() for s, f in futures.items()}
    table = spread(reports)
    (out / "spread.json").write_text(json.dumps({"family": args.family, "size": args.size, "seeds": seeds,
                                                 "seconds": round(time.perf_counter() - t0, 1),
                                                 "build_seconds": {s: r["pretrain_seconds"] for s, r in reports.items()},
                                                 "tasks": table}, indent=1) + "\n")
    print(f"{'task':<18s}" + "".join(f"{'seed ' + str(s):>9s}" for s in seeds) + f"{'spread':>8s}{'chance':>8s}")
    for task, row in table.items():
        print(f"{task:<18s}" + "".join(f"{row['seeds'][s]:9.1f}" for s in seeds)
              + f"{row['spread']:8.1f}{row['chance']:8.1f}")
    print(f"wrote {out / 'spread.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
