"""Does the paper's recipe ranking appear in the world when fine-tuning looks like the paper's?

    python scripts/regime_grid.py --out runs/regime                      # the grid of docs/demo.md
    python scripts/regime_grid.py --settings "lr=3e-4,epochs=2;lr=3e-5,epochs=1" --recipes full,sa_proj

For every setting (train.* overrides of config `toy`; vision_lr defaults to half the LR, as in toy.yaml)
and every recipe, one run of the first two stages (cub200, then counting), the same commands as the demo
(training.run, probes.run --drift, probes.evaluate, optionally probes.layers), then analysis.run over the
setting's runs. Prints and writes OUT/regime.csv: per (setting, recipe) the counting gain at its stage,
the mean gain of the trained targets (learning), the change of the world's eight held-out abilities after
counting, number_mass and KL to the base after counting. Every command resumes, so a second call only redoes the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from demo import COUNTING_TASK, RECIPES, ROOT, SLOTS, step  # noqa: E402  (scripts/ is not a package)

# The demo's regime (LR 3e-4, 2 epochs), then two closer to the paper's (an LR far below pretraining's
# 1e-3, one epoch).
SETTINGS = "lr=3e-4,epochs=2;lr=1e-4,epochs=1;lr=3e-5,epochs=1"
TASKS = ["cub200", COUNTING_TASK]


def parse_settings(text: str) -> dict[str, list[str]]:
    """'lr=3e-4,epochs=2;lr=1e-4,epochs=1' -> {'lr3e-4_ep2': ['train.lr=3e-4', 'train.vision_lr=1.5e-4',
    'train.epochs=2'], ...}; an unknown key or a malformed value is an error naming the setting."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        kv = dict(item.split("=", 1) for item in part.split(",") if "=" in item)
        if set(kv) - {"lr", "vision_lr", "epochs"} or len(kv) != part.count("=") or "lr" not in kv:
            raise ValueError(f"--settings: {part!r}: give lr=X[,vision_lr=Y][,epochs=N]")
        try:
            lr, epochs = float(kv["lr"]), float(kv.get("epochs", 1))
            vision = float(kv.get("vision_lr", lr / 2))
        except ValueError:
            raise ValueError(f"--settings: {part!r}: values must be numbers") from None
        name = f"lr{kv['lr']}_ep{kv.get('epochs', '1')}" + (f"_v{kv['vision_lr']}" if "vision_lr" in kv else "")
        out[name] = [f"train.lr={lr:g}", f"train.vision_lr={vision:g}", f"train.epochs={epochs:g}"]
    if not out:
        raise ValueError("--settings: no setting given")
    return out


def chain(setting: str, overrides: list[str], recipe: str, out: Path, args) -> None:
    py, run, log = sys.executable, out / setting / recipe, out / "logs" / f"{setting}-{recipe}.log"
    label = f"{setting} {recipe}"
    step([py, "-m", "training.run", "--config", args.config, "--recipe", recipe, "--out", str(run),
          f"tasks=[{','.join(TASKS)}]", "monitor.every=0", *overrides], log, f"{label}: training.run")
    step([py, "-m", "probes.run", "--ckpt-dir", str(run), "--num-samples", str(args.captions),
          "--mode", "teacher-forced", "--batch-size", "32", "--drift"], log, f"{label}: probes.run")
    step([py, "-m", "probes.evaluate", "--ckpt-dir", str(run), "--limit", str(args.eval_limit),
          "--batch-size", "64"], log, f"{label}: probes.evaluate")
    if args.layers:
        step([py, "-m", "probes.layers", "--ckpt-dir", str(run), "--num-samples", "64", "--batch-size", "32"],
             log, f"{label}: probes.layers")


def regime_rows(out: Path, setting: str, recipes: list[str]) -> list[dict]:
    """One row per recipe of a setting, from analysis.run's tables and each run's probes and evals. Held-out:
    the world's eight held-out abilities (as in the demo's table; a two-stage run's own held-out set would
    also hold the three targets it never trains)."""
    import pandas as pd

    from training.world.registry import HELDOUT_TASKS

    metrics = pd.read_csv(out / setting / "analysis" / "metrics.csv")
    rows = []
    for recipe in recipes:
        m = metrics[metrics.run == recipe]
        learn = m[m.metric == "target_learning"].set_index("benchmark")["value"]
        evals = pd.read_parquet(out / setting / recipe / "evals.parquet")
        heldout = evals[evals.benchmark.isin(HELDOUT_TASKS)].groupby("stage")["score"].mean()
        change = heldout - heldout.loc[0]
        tf = pd.read_parquet(out / setting / recipe / "probes.parquet")
        tf = tf[tf["mode"] == "teacher-forced"]
        mass = tf[tf.probe == "number_mass"].set_index("stage")
        kl = tf[tf.probe == "kl_to_base"].set_index("stage")["mean"]
        count = int(mass[mass.task == COUNTING_TASK].index[0])
        rows.append({"setting": setting, "recipe": recipe, "counting gain": learn.get(COUNTING_TASK),
                     "learning": learn.mean(), "held-out @count": change.loc[count],
                     "number_mass x base @count": mass.loc[count, "mean"] / mass.loc[0, "mean"],
                     "KL @count": kl.get(count, float("nan"))})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "runs" / "regime"))
    ap.add_argument("--settings", default=SETTINGS, help=f"';'-separated lr=X[,vision_lr=Y][,epochs=N] (default {SETTINGS})")
    ap.add_argument("--recipes", default=",".join(RECIPES), help="comma-separated recipes (default: the paper's five)")
    ap.add_argument("--config", default="toy", help="training config (toy-tiny: a quick try)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--captions", type=int, default=256)
    ap.add_argument("--eval-limit", type=int, default=100)
    ap.add_argument("--layers", action="store_true", help="also probes.layers (SA vs MLP write-back) per run")
    args = ap.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as e:
        ap.error(str(e))
    recipes = [r for r in args.recipes.split(",") if r]
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    for slot in range(max(args.workers, 1)):
        SLOTS.put(slot)
    t0 = time.time()
    with ThreadPoolExecutor(args.workers) as pool:
        for f in [pool.submit(chain, s, o, r, out, args) for s, o in settings.items() for r in recipes]:
            f.result()
    import pandas as pd

    rows = []
    for setting in settings:
        run_dirs = sum((["--run-dir", str(out / setting / r)] for r in recipes), [])
        step([sys.executable, "-m", "analysis.run", *run_dirs, "--out", str(out / setting / "analysis")],
             out / "logs" / "analysis.log", f"{setting}: analysis.run")
        rows += regime_rows(out, setting, recipes)
    table = pd.DataFrame(rows)
    table.to_csv(out / "regime.csv", index=False)
    with pd.option_context("display.width", 200, "display.float_format", "{:+.3g}".format):
        print(table.to_string(index=False))
    print(f"\nregime grid: {len(rows)} runs in {time.time() - t0:.0f} s; {out / 'regime.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
