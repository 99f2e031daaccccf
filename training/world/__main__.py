"""`python -m training.world --out DIR [--size toy|tiny] [--seed N]`: write one world explicitly."""
from __future__ import annotations

import argparse
import json
import sys
import time

from .build import WORLD_SIZES, write_world


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.world", description=__doc__)
    ap.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    ap.add_argument("--size", default="toy", choices=sorted(WORLD_SIZES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
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


if __name__ == "__main__":
    sys.exit(main())
