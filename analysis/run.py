"""python -m analysis.run --run-dir DIR [--run-dir DIR ...]

Reads each run's run.json, evals.parquet and probes.parquet and writes, under --out (default RUN/analysis
for one run; analysis/ in the runs' common folder for several): metrics.csv, correlations.csv,
recovery.csv, summary.csv, figures/*.png, paired.csv (each stage vs the base and the previous stage on
the same items, for runs with an items.parquet), and cells.csv (forgetting per 2x2 cell, for runs whose run.json has
"domains"). A folder without run.json stands for the runs inside it. Definitions: docs/metrics.md.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from probes.schemas import TableError

from .cells import cell_summary
from .paired import compare_runs
from .report import analyze, default_out, write
from .tables import expand_run_dirs, load_runs


def _print_summary(an) -> None:
    cols = {"run": "run", "recipe": "recipe", "target_overall": "target overall (pp)",
            "heldout_change_final": "held-out change (pp)", "heldout_change_min": "worst held-out (pp)",
            "recovery_events": "recoveries", "probe_peak_shift": "probe peak shift",
            "probe_peak_stage": "at stage", "recipe_spearman": "recipe rho (vs base)"}
    s = an.summary[[c for c in cols if c in an.summary]].rename(columns=cols)
    probe, mode = an.primary()
    print(f"per run (probe: {probe} {mode or ''}):" if probe else "per run (no probes):")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.3g}".format):
        print(s.to_string(index=False))
    if len(an.cells):
        cells = cell_summary(an.cells)
        print("\nforgetting per 2x2 cell (mean over stages of the change each stage's tuning made, pp):")
        with pd.option_context("display.width", 200, "display.float_format", "{:+.2f}".format):
            print(cells.pivot(index=["run", "recipe"], columns="cell", values="mean_change_prev").to_string())
    if probe:
        c = an.correlations
        c = c[(c["probe"] == probe) & (c["mode"] == mode) & (c["group"] == "pooled")
              & c["method"].isin(["pearson", "spearman", "kendall", "partial_spearman"])]
        print(f"\n{probe} ({mode}) vs held-out change, pooled over runs:")
        for _, r in c.iterrows():
            print(f"  {r.comparison:15s} {r.method:17s} {r.estimate:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                  f"  p={r.p_value:.3g}  n={r.n}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.run", description=__doc__.split("\n\n")[1])
    ap.add_argument("--run-dir", action="append", required=True, help="a run directory (repeatable)")
    ap.add_argument("--out", help="output folder (default: see above)")
    ap.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples per correlation")
    ap.add_argument("--n-perm", type=int, default=2000, help="permutations per p-value")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recovery-min", type=float, default=0.0,
                    help="pp a held-out deficit and rise must exceed to count as a recovery event")
    ap.add_argument("--no-probes", action="store_true", help="metrics only; probes.parquet may be absent")
    args = ap.parse_args(argv)
    try:
        dirs = expand_run_dirs(args.run_dir)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs = load_runs(dirs, probes=not args.no_probes)
            an = analyze(runs, n_boot=args.n_boot, n_perm=args.n_perm, seed=args.seed,
                         recovery_min=args.recovery_min)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
    except TableError as e:
        print(f"analysis.run: {e}", file=sys.stderr)
        return 2
    out = args.out or default_out(dirs)
    written = write(an, out)
    try:
        paired = compare_runs(dirs, n_boot=args.n_boot, seed=args.seed)
    except TableError as e:
        print(f"analysis.run: {e}", file=sys.stderr)
        return 2
    if len(paired):   # runs evaluated with per-item results: each stage vs the base and the previous stage
        paired.to_csv(Path(out) / "paired.csv", index=False)
        written.append(Path(out) / "paired.csv")
    _print_summary(an)
    print(f"\nwrote {len(written)} files under {out}:")
    for p in written:
        print(f"  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
