"""Synthetic run directories (run.json + evals.parquet + probes.parquet, no checkpoints) with effects
planted in them, for the analysis and notebook tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from probes.schemas import EVALS, PROBES


def write_run(run_dir, recipe: str, tasks: list[str], scores: pd.DataFrame, splits: dict[str, str],
              probes: dict[tuple[str, str], list[float]] | None = None, family: str = "qwen2_5_vl") -> Path:
    """Write a run directory. `scores`: index = stage 0..L, columns = benchmarks (0-100); `tasks`: the
    task trained at stages 1..L; `probes`: (probe, mode) -> mean per stage."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = ["base"] + tasks
    stages = [{"index": i, "name": n, "task": None if i == 0 else n, "path": f"stage-{i:02d}-{n}"}
              for i, n in enumerate(names)]
    (run_dir / "run.json").write_text(json.dumps({
        "family": family, "recipe": recipe, "base": "synthetic", "tasks": tasks, "config": {"synthetic": True},
        "stages": stages}, indent=1))
    common = lambda s: {"run": run_dir.name, "stage": s, "stage_name": names[s],  # noqa: E731
                        "task": stages[s]["task"], "recipe": recipe, "checkpoint": stages[s]["path"]}
    evals = [{**common(s), "benchmark": b, "split": splits[b], "metric": "accuracy", "score": float(scores.at[s, b]),
              "n": 100} for s in scores.index for b in scores.columns]
    pd.DataFrame(evals, columns=list(EVALS.columns)).to_parquet(run_dir / "evals.parquet")
    rows = []
    for (probe, mode), means in (probes or {}).items():
        for s, m in enumerate(means):
            rows.append({**common(s), "probe": probe, "mode": mode, "mean": float(m), "std": 0.01,
                         "ci_low": float(m) - 0.002, "ci_high": float(m) + 0.002, "n_samples": 64,
                         "n_positions": 640, "dataset": "synthetic-captions", "dataset_hash": "0" * 16})
    pd.DataFrame(rows, columns=list(PROBES.columns)).to_parquet(run_dir / "probes.parquet")
    return run_dir


TASKS = ["count", "colour", "clock"]
HELDOUT = ["shapes_qa", "chart_qa", "doc_qa"]
SPLITS = {**{t: "target" for t in TASKS}, **{h: "heldout" for h in HELDOUT}}


def planted_study(root, n_stages: int = 6, rho: float | dict = -0.7, seed: int = 0,
                  recipes=("full", "mlp", "sa_proj", "mlp_gate_up"), runs_per_recipe: int = 2) -> dict:
    """Runs whose per-stage (probe shift, held-out change) pairs are independent draws from a bivariate
    normal with correlation `rho` (one value, or recipe -> value; probe sd 0.05, held-out sd 8 pp).
    Every held-out benchmark moves by the same y, so H[s] - H[0] = y exactly. Targets: each learns
    40 pp at its stage and keeps it. Returns {"dirs", "x", "y"} (the planted pairs, stage >= 1)."""
    rng = np.random.default_rng(seed)
    tasks = [TASKS[i % 3] + ("" if i < 3 else str(i // 3 + 1)) for i in range(n_stages)]  # count, ..., count2
    dirs, xs, ys = [], [], []
    for recipe in recipes:
        for k in range(runs_per_recipe):
            r = rho[recipe] if isinstance(rho, dict) else rho
            cov = [[1, r], [r, 1]]
            u = rng.multivariate_normal([0, 0], cov, size=n_stages)
            x, y = 0.05 * u[:, 0], 8.0 * u[:, 1]
            bench = tasks + HELDOUT
            A = pd.DataFrame(0.0, index=range(n_stages + 1), columns=bench)
            for i, t in enumerate(tasks):
                A[t] = [20.0 + (40.0 if s >= i + 1 else 0.0) for s in range(n_stages + 1)]
            for j, h in enumerate(HELDOUT):
                A[h] = 50.0 + 5 * j + np.concatenate([[0.0], y])
            splits = {**{t: "target" for t in tasks}, **{h: "heldout" for h in HELDOUT}}
            probes = {("number_mass", "teacher-forced"): list(0.1 + np.concatenate([[0.0], x])),
                      ("number_mass", "generate"): list(0.12 + np.concatenate([[0.0], 0.5 * x]))}
            dirs.append(write_run(Path(root) / f"{recipe}-seed{k}", recipe, tasks, A, splits, probes))
            xs.append(x)
            ys.append(y)
    return {"dirs": dirs, "x": np.concatenate(xs), "y": np.concatenate(ys)}


def hand_run(root, name: str = "hand") -> Path:
    """The hand-computed run of test_analysis_metrics (values and arithmetic there)."""
    A = pd.DataFrame({
        "count":  [10, 70, 50, 60], "colour": [20, 25, 80, 75], "clock": [30, 30, 38, 85],
        "h1":     [60, 40, 50, 58], "h2":     [40, 30, 42, 44],
    }, dtype=float)
    splits = {"count": "target", "colour": "target", "clock": "target", "h1": "heldout", "h2": "heldout"}
    probes = {("number_mass", "teacher-forced"): [0.01, 0.20, 0.08, 0.02],
              ("max_number_prob", "generate"): [0.1, 0.5, 0.3, 0.2]}
    return write_run(Path(root) / name, "full", ["count", "colour", "clock"], A, splits, probes)
