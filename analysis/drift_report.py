"""python -m analysis.drift_report --run-dir DIR [--run-dir DIR ...] [--out DIR]

The drift tables beyond the number-token probe, for every run that has them, under --out (default as
analysis.run: RUN/analysis for one run, analysis/ in the runs' common folder for several):

| file | from | what |
|---|---|---|
| signature_moves.csv, signature_summary.csv, figures/signature_moves.png | probes.parquet sig_*_mass | which stage moves which task signature (analysis/signatures.py) |
| layers_sa_vs_mlp.csv, figures/layers_sa_vs_mlp_MEASURE.png | layers.parquet | self-attention vs MLP write-back per layer and recipe (analysis/layers.py) |
| monitor_prediction_points.csv, monitor_prediction.csv, figures/monitor_PROBE.png | monitor.parquet + evals.parquet | does the in-training probe predict the stage-end held-out change (analysis/drift_monitor.py) |
| monitor_cost.csv | monitor_cost.json, monitor.parquet | seconds per monitor check vs one held-out evaluation |

A part whose tables no run has is skipped (and said so).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import pandas as pd

from probes.schemas import PROBES, TableError

from . import drift_monitor, layers, signatures
from .report import default_out
from .tables import Run, expand_run_dirs, load_run, read_manifest, read_table

MONITOR_PROBES = ("number_mass", "kl_to_base")
LAYER_MEASURES = ("logit_l2", "number_logmass")


def load(dirs) -> list[Run]:
    """Every run, with evals and probes where it has them (a run without evals.parquet is still read)."""
    runs = []
    names = [Path(d).name for d in dirs]
    for d in dirs:
        d = Path(d)
        label = f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name
        if (d / "evals.parquet").is_file():
            runs.append(load_run(d, probes=False, label=label))
        else:
            probes = read_table(d / PROBES.file, PROBES.columns) if (d / PROBES.file).is_file() else None
            runs.append(Run(label, d, read_manifest(d), None, probes))
    return runs


def write(runs: list[Run], out: Path, n_boot: int = 2000, n_perm: int = 2000, seed: int = 0) -> tuple[list[Path], dict]:
    from .figures import close

    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    written, tables = [], {}

    def save_csv(name, df):
        df.to_csv(out / name, index=False)
        written.append(out / name)
        tables[name] = df

    def save_fig(name, fig):
        fig.savefig(out / "figures" / name, dpi=150, bbox_inches="tight")
        close(fig)
        written.append(out / "figures" / name)

    moves = pd.concat([signatures.signature_moves(r) for r in runs], ignore_index=True)
    if len(moves):
        save_csv("signature_moves.csv", moves)
        save_csv("signature_summary.csv", signatures.summary(moves))
        save_fig("signature_moves.png", signatures.figure(moves))
    lt = layers.load_layers([r.path for r in runs], [r.label for r in runs])
    if len(lt):
        lt["recipe"] = lt["run"].map({r.label: r.recipe for r in runs}).fillna(lt["recipe"])
        save_csv("layers_sa_vs_mlp.csv", pd.concat([layers.sa_vs_mlp(lt, m).assign(measure=m)
                                                    for m in sorted(set(lt["measure"]))], ignore_index=True))
        for m in LAYER_MEASURES:
            if (lt["measure"] == m).any() and (lt["stage"] > 0).any():
                save_fig(f"layers_sa_vs_mlp_{m}.png", layers.figure(lt, m))
    points = drift_monitor.prediction_points(runs)
    if len(points):
        save_csv("monitor_prediction_points.csv", points)
        save_csv("monitor_prediction.csv", drift_monitor.prediction_table(points, n_boot, n_perm, seed))
    mons = [m for m in (drift_monitor.load_monitor(r) for r in runs) if m is not None]
    for probe in MONITOR_PROBES:
        if any((m["probe"] == probe).any() for m in mons):
            save_fig(f"monitor_{probe}.png", drift_monitor.figure(runs, probe))
    cost = drift_monitor.cost_table(runs)
    if len(cost):
        save_csv("monitor_cost.csv", cost)
    return written, tables


def print_report(tables: dict) -> None:
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        if "signature_summary.csv" in tables:
            print("which stage moves which signature (largest |log2 S[s]/S[s-1]|; own = the stage's task's own):")
            print(tables["signature_summary.csv"].drop(columns=["n_signatures"]).to_string(index=False))
        else:
            print("signatures: no sig_*_mass probes (run probes.run --signatures)")
        if "layers_sa_vs_mlp.csv" in tables:
            t = tables["layers_sa_vs_mlp.csv"]
            print("\nself-attention vs MLP write-back per layer (mean over runs and stages >= 1):")
            print(t[t["measure"] == "logit_l2"].drop(columns=["measure"]).to_string(index=False))
        else:
            print("\nlayers: no layers.parquet (run python -m probes.layers)")
        if "monitor_prediction.csv" in tables:
            print("\nin-training probe vs held-out change at the stage end, pooled over runs and stages (Spearman; "
                  "all methods and probes in monitor_prediction.csv):")
            t = tables["monitor_prediction.csv"]
            t = t[(t["method"] == "spearman") & ~t["probe"].str.endswith("_max_prob")]
            for _, r in t.iterrows():
                print(f"  {r.probe:22s} {r.x:12s} {r.estimate:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}]"
                      f"  p={r.p_value:.3g}  n={r.n} ({r.n_runs} runs)")
        else:
            print("\nmonitor: no monitor.parquet with evals.parquet (train with monitor.every=N, run probes.evaluate)")
        if "monitor_cost.csv" in tables:
            print("\nmonitor cost:")
            for _, r in tables["monitor_cost.csv"].iterrows():
                print(f"  {r.run}: check {r.check_seconds:.3f} s ({r.check_captions} captions; in training "
                      f"{r.check_seconds_in_training:.3f} s), held-out evaluation {r.heldout_seconds:.3f} s "
                      f"({r.heldout_items} items): ratio {r.ratio_heldout_to_check:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analysis.drift_report", description=__doc__.split("\n\n")[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", action="append", required=True, help="a run directory (repeatable)")
    ap.add_argument("--out", help="output folder (default: as analysis.run)")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--n-perm", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        dirs = expand_run_dirs(args.run_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            written, tables = write(load(dirs), args.out or default_out(dirs), args.n_boot, args.n_perm, args.seed)
    except TableError as e:
        print(f"analysis.drift_report: {e}", file=sys.stderr)
        return 2
    print_report(tables)
    print(f"\nwrote {len(written)} files under {args.out or default_out(dirs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
