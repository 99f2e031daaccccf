"""Drift-guided tuning: short trials of candidate recipes, their held-out change forecast from the drift
monitor, ranked on the learning / forgetting frontier (docs/advise.md).

    python -m training.advise --config toy-tiny --candidates sa_proj,mlp_gate_up,full,sa_proj:train.lr=1e-5 \\
        --steps 2 [--stage NAME] [--forecast PATH] [--slice 16] --out DIR [key=value ...]

A candidate is a recipe or a method (as `--recipe` takes it), optionally with `:key=value` overrides
(`sa_proj:train.lr=1e-5:mix.share=0.25`); `key=value` arguments after the flags apply to every candidate.
Each candidate trains, with training.run and the drift monitor on (a check at step 0 and at step N), from the
config's base on the config's first task (or `--stage NAME`), and stops after `--steps` N optimizer steps of
the stage's own schedule. Measured per candidate:
- learning_proxy: the answer-token loss on the first `--slice` examples of the task's training data, before
  the trial minus after it (nats; positive = it learns the task);
- target_gain: the task's target benchmarks (probes.evaluate) on their first `--target-items` (16) items,
  after the trial minus before it (pp; coarse on so few items, reported, not ranked on);
- the drift features of analysis.forecast at step N (kl_to_base, number_mass_shift, ...), and from them the
  forecast stage-end held-out change (pp) with its interval (`--forecast`, default the shipped
  training/configs/forecast/default.json).
Recommendation: among the candidates whose learning proxy reaches `--min-learning` (0.5) of the best one's,
the one with the highest predicted held-out change (the least forgetting); the rank follows the same order.

Writes DIR/advice.parquet (probes.schemas.ADVICE, one row per candidate), DIR/frontier.png and
DIR/trials/CANDIDATE/ (each trial's run directory; `seconds` is a trial's wall time, setup and target
scoring included, `train_seconds` its training stage alone); prints the ranked table, the recommendation and why,
and which forecaster made the predictions.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analysis.forecast import Forecaster, stage_features
from probes.schemas import ADVICE, TableError

from . import checkpoints
from .config import ConfigError, apply, load_config, parse_override, resolve_path
from .data import Collator, DataError
from .families import CheckpointError
from .loop import StageHooks
from .manifest import load as load_manifest
from .manifest import names_task
from .mixing import stage_dataset
from .recipes import RecipeError
from .run import TRAIN_LOG, Plan, RunError, run

DEFAULT_FORECAST = Path(__file__).parent / "configs" / "forecast" / "default.json"


def parse_candidate(text: str) -> tuple[str, list[str]]:
    """`recipe[:key=value[:key=value]]` -> (recipe, ["key=value", ...]); a piece without "=" continues the
    previous value (`data.root=world:tiny`)."""
    name, *rest = text.split(":")
    overrides: list[str] = []
    for piece in rest:
        if "=" in piece or not overrides:
            overrides.append(piece)
        else:
            overrides[-1] += ":" + piece
    for o in overrides:
        parse_override(o)           # a malformed override fails before any training
    if not name:
        raise ConfigError(f"candidate {text!r}: no recipe or method before ':'")
    return name, overrides


def _to(v, model):
    if not torch.is_tensor(v):
        return v
    return v.to(model.device, dtype=model.dtype) if v.is_floating_point() else v.to(model.device)


def answer_loss(model, batches: list[dict]) -> float:
    """Mean loss over the answer tokens of `batches` (eval mode, no grad; the model's mode is restored)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for b in batches:
                b = {k: _to(v, model) for k, v in b.items()}
                n = int((b["labels"][:, 1:] != -100).sum())
                total += float(model(**b).loss) * n
                count += n
    finally:
        model.train(was)
    return total / max(count, 1)


class Trial(StageHooks):
    """Stops the stage after `steps` optimizer steps; measures the slice's answer loss before and after."""

    def __init__(self, steps: int, batches: list[dict]):
        self.steps, self.batches = steps, batches
        self.before = self.after = None
        self.done = 0

    def on_stage_start(self, stage, model) -> None:
        self.before = answer_loss(model, self.batches)

    def on_step(self, step, model, optimizer, scheduler) -> bool:
        if step < self.steps:
            return False
        self.after, self.done = answer_loss(model, self.batches), step
        return True

    def on_stage_end(self, steps, model):
        if self.after is None:          # the stage had fewer steps than asked
            self.after, self.done = answer_loss(model, self.batches), steps
        return None


def slice_batches(cfg: dict, config_name: str, n: int) -> list[dict]:
    """The first `n` training examples of the trial's task, collated as training collates them."""
    plan = Plan(cfg, config_name)
    opts = checkpoints.LoadOptions(attn=cfg["model"]["attn_implementation"])
    processor = checkpoints.load_processor(plan.base, opts)
    data, _ = stage_dataset(plan.tasks[0], [], processor, share=0.0, seed=cfg["seed"], stage=1,
                            max_examples=cfg["data"]["max_examples"])
    collate = Collator(plan.family, processor.tokenizer.pad_token_id)
    idx = list(range(min(n, len(data))))
    bs = int(cfg["train"]["batch_size"])
    return [collate([data[i] for i in idx[j:j + bs]]) for j in range(0, len(idx), bs)]


def trial_config(config: str, overrides: list[str], recipe: str, task: str | None, steps: int, out: Path) -> dict:
    cfg = load_config(config, overrides)
    apply(cfg, "recipe", recipe, "--candidates")
    task = task or cfg["tasks"][0]
    if task not in cfg["tasks"]:
        raise ConfigError(f"--stage {task!r} is not among the config's tasks ({', '.join(cfg['tasks'])})")
    apply(cfg, "tasks", [task], "--stage")
    apply(cfg, "monitor.every", steps, "--steps")   # checks at step 0 and step N: the features' early check
    apply(cfg, "monitor.kl", True, "training.advise")
    apply(cfg, "monitor.budget", None, "training.advise")
    apply(cfg, "out", str(out), "--out")
    return cfg


def run_trial(config: str, candidate: str, overrides: list[str], args) -> dict:
    recipe, own = parse_candidate(candidate)
    out = Path(args.out) / "trials" / re.sub(r"[^A-Za-z0-9_.+-]+", "_", candidate)
    cfg = trial_config(config, overrides + own, recipe, args.stage, args.steps, out)
    shutil.rmtree(out, ignore_errors=True)          # a trial always starts from the base
    name = resolve_path(config).stem
    trial = Trial(args.steps, slice_batches(cfg, name, args.slice))
    start = time.perf_counter()
    run(cfg, name, allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, hooks=[trial])
    f = stage_features(pd.read_parquet(out / "monitor.parquet"), 1, cfg["tasks"][0])
    log = [json.loads(line) for line in (out / TRAIN_LOG).read_text().splitlines() if line.strip()]
    train_seconds = sum(r["seconds"] for r in log if r.get("event") == "stage_end")
    gain, items = target_gain(out, cfg["tasks"][0], args.target_items, args.max_new_tokens)
    seconds = time.perf_counter() - start           # the whole trial: setup, training, target scoring
    return {"candidate": candidate, "recipe": recipe, "task": cfg["tasks"][0], "steps": trial.done,
            "loss_before": trial.before, "loss_after": trial.after, "learning_proxy": trial.before - trial.after,
            "target_gain": gain, "target_items": items,
            **f, "seconds": seconds, "train_seconds": train_seconds, "trial_dir": str(out)}


def target_gain(trial_dir: Path, task: str, items: int, max_new_tokens: int) -> tuple[float, int]:
    """(score after - score before in pp, items scored) on the first `items` items of the task's target
    benchmarks (probes.evaluate on the trial's two checkpoints); (nan, 0) when off or nothing to score."""
    if items <= 0:
        return float("nan"), 0
    from probes.evaluate import main as evaluate
    from probes.schemas import EVALS

    names = [b for b in load_manifest(trial_dir / "run.json")["benchmarks"] if names_task(b, task)]
    if not names or evaluate(["--ckpt-dir", str(trial_dir), "--benchmarks", ",".join(names), "--limit", str(items),
                              "--max-new-tokens", str(max_new_tokens)]) != 0:
        print(f"[training.advise] {trial_dir.name}: no target accuracy (benchmarks {names or 'none'})", file=sys.stderr)
        return float("nan"), 0
    ev = pd.read_parquet(trial_dir / EVALS.file)
    ev = ev[ev["split"] == "target"]
    by_stage = ev.groupby("stage")["score"].mean()
    return float(by_stage.get(1, np.nan) - by_stage.get(0, np.nan)), int(ev.loc[ev["stage"] == 1, "n"].sum())


def rank(table: pd.DataFrame, min_learning: float) -> pd.DataFrame:
    """Adds eligible (learning >= min_learning x the best), pareto (no candidate learns more and is predicted
    to forget less) and rank (eligible first, then by predicted held-out change, highest first)."""
    best = table["learning_proxy"].max()
    t = table.assign(eligible=table["learning_proxy"] >= min_learning * best if best > 0 else True)
    L, P = t["learning_proxy"].to_numpy(), t["predicted_heldout_change"].to_numpy()
    t["pareto"] = [not np.any((L >= L[i]) & (P >= P[i]) & ((L > L[i]) | (P > P[i]))) for i in range(len(t))]
    t = t.sort_values(["eligible", "predicted_heldout_change", "learning_proxy"], ascending=[False, False, False],
                      kind="stable").reset_index(drop=True)
    t["rank"] = np.arange(1, len(t) + 1)
    return t


def recommendation(t: pd.DataFrame, min_learning: float) -> str:
    top = t.iloc[0]
    best = t.loc[t["learning_proxy"].idxmax()]
    why = (f"it learns (answer-loss drop {top['learning_proxy']:.4f}, >= {min_learning:.0%} of the best, "
           f"{best['candidate']}'s {best['learning_proxy']:.4f}) and is forecast to change held-out accuracy by "
           f"{top['predicted_heldout_change']:+.2f} pp [{top['ci_low']:+.2f}, {top['ci_high']:+.2f}], the least "
           f"forgetting among those that learn")
    if len(t) > 1:
        second = t.iloc[1]
        overlap = top["ci_low"] <= second["ci_high"]
        why += (f"; runner-up {second['candidate']} ({second['predicted_heldout_change']:+.2f} pp)"
                + (": the intervals overlap, so the forecast alone does not separate them" if overlap else ""))
    return f"recommend {top['candidate']}: {why}."


def figure(t: pd.DataFrame, forecaster_name: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    yerr = [t["predicted_heldout_change"] - t["ci_low"], t["ci_high"] - t["predicted_heldout_change"]]
    ax.errorbar(t["learning_proxy"], t["predicted_heldout_change"], yerr=yerr, fmt="none", ecolor="0.7", lw=0.8)
    ax.scatter(t["learning_proxy"], t["predicted_heldout_change"], c=np.where(t["pareto"], "C3", "C0"), zorder=3)
    front = t[t["pareto"]].sort_values("learning_proxy")
    ax.plot(front["learning_proxy"], front["predicted_heldout_change"], color="C3", lw=1, ls="--", label="frontier")
    for _, r in t.iterrows():
        ax.annotate(f"{r['rank']}. {r['candidate']}", (r["learning_proxy"], r["predicted_heldout_change"]),
                    fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xlabel("learning proxy: answer-loss drop on the task slice (nats)")
    ax.set_ylabel("forecast held-out change at the stage's end (pp)")
    ax.set_title(f"Candidates after {int(t['steps'].max())} steps (forecaster: {forecaster_name})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def advise(args, overrides: list[str]) -> pd.DataFrame:
    forecast_path = Path(args.forecast) if args.forecast else DEFAULT_FORECAST
    forecaster = Forecaster.load(forecast_path)
    rows = [run_trial(args.config, c, overrides, args) for c in args.candidates.split(",") if c]
    table = pd.DataFrame(rows)
    pred, lo, hi = forecaster.interval(table)
    table = rank(table.assign(predicted_heldout_change=pred, ci_low=lo, ci_high=hi, forecaster=str(forecast_path)),
                 args.min_learning)
    out = Path(args.out)
    table[list(ADVICE.columns)].to_parquet(out / ADVICE.file, index=False)
    figure(table, forecast_path.name).savefig(out / "frontier.png", dpi=120)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table[["rank", "candidate", "steps", "learning_proxy", "target_gain", "kl_to_base", "number_mass_shift",
                     "predicted_heldout_change", "ci_low", "ci_high", "pareto", "seconds"]].to_string(index=False))
    print(recommendation(table, args.min_learning))
    print(f"forecaster {forecast_path}: fitted on {forecaster.fitted_on.get('points')} stages of "
          f"{len(forecaster.fitted_on.get('runs', []))} runs ({forecaster.fitted_on.get('note') or 'no note'}); "
          f"leave-one-run-out MAE {forecaster.loro.get('mae', float('nan')):.2f} pp, Spearman "
          f"{forecaster.loro.get('spearman', float('nan')):.2f}; {forecaster.level:.0%} intervals")
    early = forecaster.fitted_on.get("early_steps") or []
    if early and args.steps not in early:
        print(f"note: the forecaster's features were measured at step(s) {early}, the trials at step {args.steps}")
    print(f"wrote {out / 'advice.parquet'} and {out / 'frontier.png'}")
    return table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m training.advise", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="a YAML file, or a name in training/configs")
    ap.add_argument("--candidates", required=True, help="comma-separated: RECIPE_OR_METHOD[:key=value...]")
    ap.add_argument("--steps", type=int, required=True, help="optimizer steps of each trial")
    ap.add_argument("--stage", help="the task to try on (default: the config's first)")
    ap.add_argument("--forecast", help=f"a forecaster JSON (analysis.forecast; default {DEFAULT_FORECAST.name})")
    ap.add_argument("--slice", type=int, default=16, help="training examples of the learning proxy (default 16)")
    ap.add_argument("--target-items", type=int, default=16, help="target-benchmark items scored before and after "
                    "each trial (greedy answers; 0: off; default 16)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="answer length of that scoring (default 16)")
    ap.add_argument("--min-learning", type=float, default=0.5, help="share of the best learning proxy a "
                    "candidate needs to be recommended (default 0.5)")
    ap.add_argument("--out", required=True, help="folder of advice.parquet, frontier.png and the trials")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="applied to every candidate")
    ap.add_argument("--allow-pickle", action="store_true")
    ap.add_argument("--trust-remote-code", action="store_true")
    args = ap.parse_intermixed_args(argv)
    if args.steps < 1:
        ap.error("--steps must be >= 1")
    try:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        advise(args, args.overrides)
    except (ConfigError, DataError, RecipeError, CheckpointError, RunError, TableError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
