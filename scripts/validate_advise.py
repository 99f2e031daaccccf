"""Validate training.advise against full runs of the same candidates (docs/advise.md, "Validation").

    python scripts/validate_advise.py --runs runs/demo --advice ADVICE_DIR [--out DIR]

ADVICE_DIR is a `training.advise` output whose candidates are named like the full runs' folders (e.g.
`--candidates sa_proj,mlp_gate_up,lora,moe,lwf` against the demo's runs). Measures, torch-free:
1. the forecaster's leave-one-run-out error over every stage of the full runs (analysis.forecast);
2. that a trial's drift features equal the full run's at the same step of its first stage (same start,
   same data order, same schedule);
3. the advisor's forecast per candidate by a forecaster fitted WITHOUT that candidate's full run, against
   the full run's measured held-out change at the end of the trial's stage, and the rankings: the
   advisor's (its rank) against the full runs' stage and whole-sequence trade-offs (summary metrics);
4. time: the trials' wall and training seconds against the full runs' training seconds, and against their
   training plus a held-out evaluation of every checkpoint (timed by probes.monitor_cost).
Prints the numbers and writes OUT/validation.json, OUT/loro.png, OUT/loro_points.csv.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from analysis import forecast as F  # noqa: E402
from analysis.metrics import RunMetrics  # noqa: E402
from analysis.stats import correlate  # noqa: E402
from analysis.tables import load_runs  # noqa: E402


def _spearman(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")                                # a constant side (ties everywhere): undefined
    return correlate(x, y, "spearman", n_boot=1, n_perm=1)["estimate"]


def full_run_facts(runs, task: str) -> pd.DataFrame:
    rows = []
    for run in runs:
        m = RunMetrics(run)
        s = int(run.stages.index[run.stages["task"] == task][0])
        dH = m.H - m.H.loc[0]
        T = m.target_mean()
        log = [json.loads(x) for x in (run.path / "train_log.jsonl").read_text().splitlines() if x.strip()]
        cost = run.path / "monitor_cost.json"   # probes.monitor_cost: one held-out evaluation of a checkpoint, timed
        per_eval = json.loads(cost.read_text())["heldout"]["seconds"] if cost.is_file() else float("nan")
        rows.append({"candidate": run.label, "stage": s, "measured_heldout_change": float(dH.loc[s]),
                     "measured_target_change": float(T.loc[s] - T.loc[0]), **m.scalars(),
                     "full_train_seconds": sum(r["seconds"] for r in log if r.get("event") == "stage_end"),
                     # what choosing by full runs pays besides training: held-out evaluation of every checkpoint
                     "full_eval_seconds": per_eval * len(run.stages)})
    return pd.DataFrame(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True)
    ap.add_argument("--advice", required=True)
    ap.add_argument("--out", help="default: ADVICE/validation")
    args = ap.parse_args(argv)
    out = Path(args.out or Path(args.advice) / "validation")
    out.mkdir(parents=True, exist_ok=True)

    pts = F.points([args.runs])
    f_all, loro = F.fit(pts)
    pts.assign(loro_prediction=loro).to_csv(out / "loro_points.csv", index=False)
    F.figure(pts, loro, f_all).savefig(out / "loro.png", dpi=120)

    adv = pd.read_parquet(Path(args.advice) / "advice.parquet")
    task = adv["task"].iloc[0]
    runs = [r for r in load_runs([args.runs], probes=False) if r.label in set(adv["candidate"])]
    facts = full_run_facts(runs, task)
    t = adv.merge(facts, on="candidate")
    feats = list(F.FEATURES)
    same = pts[pts["stage"] == t["stage"].iloc[0]].set_index("run").loc[t["candidate"], feats].to_numpy(float)
    feature_diff = float(np.max(np.abs(same - t[feats].to_numpy(float))))
    honest = []
    for _, r in t.iterrows():              # each candidate forecast without its own full run
        f, _ = F.fit(pts[pts["run"] != r["candidate"]])
        p, lo, hi = f.interval(pd.DataFrame([r[feats]]))
        honest.append({"loro_pred": p[0], "loro_low": lo[0], "loro_high": hi[0]})
    t = pd.concat([t.reset_index(drop=True), pd.DataFrame(honest)], axis=1)
    t["covered"] = (t["measured_heldout_change"] >= t["loro_low"]) & (t["measured_heldout_change"] <= t["loro_high"])
    by_final = t.sort_values(["heldout_change_final", "target_overall"], ascending=False)["candidate"].tolist()
    res = {
        "forecaster_loro": f_all.loro,
        "trial_vs_full_feature_max_abs_diff": feature_diff,
        "stage": int(t["stage"].iloc[0]), "task": task, "trial_steps": int(t["steps"].max()),
        "advice_loro_mae": float(np.mean(np.abs(t["loro_pred"] - t["measured_heldout_change"]))),
        "advice_loro_coverage": float(t["covered"].mean()),
        "spearman_pred_vs_measured_stage": _spearman(t["loro_pred"], t["measured_heldout_change"]),
        "spearman_pred_vs_final_heldout": _spearman(t["loro_pred"], t["heldout_change_final"]),
        "advisor_top": t.loc[t["rank"].idxmin(), "candidate"],
        "measured_stage_heldout_values": sorted(set(np.round(t["measured_heldout_change"], 3))),
        "full_runs_best_final_tradeoff": by_final[0], "full_runs_order_final": by_final,
        "advice_wall_seconds": float(t["seconds"].sum()), "advice_train_seconds": float(t["train_seconds"].sum()),
        "full_train_seconds": float(t["full_train_seconds"].sum()),
        "full_eval_seconds": float(t["full_eval_seconds"].sum()),
    }
    res["time_ratio_wall"] = res["advice_wall_seconds"] / res["full_train_seconds"]
    res["time_ratio_wall_vs_train_and_eval"] = res["advice_wall_seconds"] / (res["full_train_seconds"]
                                                                             + res["full_eval_seconds"])
    res["time_ratio_train"] = res["advice_train_seconds"] / res["full_train_seconds"]
    cols = ["candidate", "rank", "learning_proxy", "target_gain", "kl_to_base", "predicted_heldout_change", "loro_pred",
            "loro_low", "loro_high", "measured_heldout_change", "measured_target_change", "heldout_change_final",
            "target_overall", "seconds", "train_seconds", "full_train_seconds", "full_eval_seconds"]
    t[cols].to_csv(out / "advice_vs_full.csv", index=False)
    (out / "validation.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(t[cols].round(4).to_string(index=False))
    print(json.dumps(res, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
