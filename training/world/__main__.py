"""The embedded world from the command line.

    python -m training.world --out DIR [--size toy|tiny] [--seed N]   write one world explicitly
    python -m training.world --base qwen2_5_vl:toy                     the cached base model (built once):
                                                                       its path and quick-check scores
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .build import WORLD_SIZES, write_world


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.world", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--out", help="folder to create (must not exist or be empty)")
    what.add_argument("--base", metavar="FAMILY:SIZE", help="build (once) or find the pretrained base model")
    ap.add_argument("--size", default="toy", choices=sorted(WORLD_SIZES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    if args.base:
        return show_base(args.base)
    try:
        out = write_world(args.out, size=args.size, seed=args.seed)
    except (FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "world.json").read_text())
    n_images = sum(1 for _ in (out / "images").rglob("*.png"))
    print(f"wrote {out}: {info['n_captions']} captions, {len(info['tasks'])} tasks, {n_images} images, "
          f"{info['n_pretrain']} pretraining records in {time.perf_counter() - t0:.1f} s")
    return 0


def show_base(spec: str) -> int:
    from ..run import run_in_processes
    from .base import BASE_JSON, base_checkpoint, documented_range, out_of_range

    family, _, size = spec.partition(":")
    try:
        path = base_checkpoint(family, size or "toy", train=run_in_processes)
    except (KeyError, ValueError) as e:
        print(f"error: --base {spec!r}: {e}", file=sys.stderr)
        return 2
    info = json.loads((path / BASE_JSON).read_text())
    print(f"base model: {path} ({info['steps']} pretraining steps, {info['pretrain_seconds']:.0f} s when built)")
    check = info.get("quick_check") or {}
    if check:
        print(f"  {'task':<14s} {'kind':<8s} {'accuracy':>8s} {'chance':>7s}")
        for name, r in check.items():
            print(f"  {name:<14s} {r.get('kind', ''):<8s} {r['accuracy']:8.1f} {r['chance']:7.1f}")
        if documented_range(family, size or "toy"):
            bad = out_of_range(check, family, size or "toy")
            print("  every score within its documented range (docs/world.md)" if not bad else
                  "  WARNING: outside the documented range (docs/world.md), so this machine's numbers will differ "
                  "from docs/demo.md's: " + "; ".join(bad))
    return 0


if __name__ == "__main__":
    sys.exit(main())
